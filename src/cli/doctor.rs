//! `cowshed doctor`: the problems of every backing chain under some
//! directories, each with its fix; `--fix` applies those that change only
//! a header, through the engine's `rebase -u`.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::{display, Output};
use crate::catalog::doctor::{
    self, diagnose_all, plan_header_fix, DoctorOptions, Fix, HeaderFix, Problem,
};
use crate::catalog::scan::scan_all;
use crate::catalog::{Forest, NodeId};
use crate::engine::{self, Cancel, Progress};

const EXIT_CODES: &str = "\
Exit codes:
  0  no problem is left (none found, or --fix fixed every one)
  1  problems remain: some have no header-only fix (flatten or commit is
     offered, a backing is missing, ...), or a fix failed or was skipped
     because a process holds the image
  2  usage error, a bad config file, or a directory or file that could not
     be scanned (the list may be incomplete)";

#[derive(Debug, Args)]
#[command(after_help = EXIT_CODES)]
pub struct DoctorArgs {
    /// Apply the fixes that change only an image's header (record the
    /// probed backing format, make an absolute backing name relative), as
    /// `rebase -u` does: under QEMU's locks, refused on corrupt metadata;
    /// an image a process holds is skipped and reported. Flatten and
    /// commit copy data: their commands are printed, never run.
    #[arg(long)]
    fix: bool,
    /// Report chains in which an image reads through more than N backing
    /// files (default: the config file's [doctor] max_depth, else 8).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_depth: Option<u64>,
    /// Config file to read [doctor] settings from (default:
    /// $XDG_CONFIG_HOME/cowshed/config.toml, if it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Directories (or image files) to scan, recursively.
    #[arg(default_value = ".")]
    roots: Vec<PathBuf>,
}

/// What became of an image's header-only fix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Not tried (no --fix), with the command that would do it.
    Offered(String),
    Fixed(String),
    /// Could not even be planned (no relative name reaches the file, ...).
    Unplannable(String),
    Failed(String),
    /// A process holds the image.
    Skipped(String),
}

struct ImageReport {
    path: PathBuf,
    problems: Vec<Problem>,
    header: Option<Outcome>,
}

impl DoctorArgs {
    pub(super) fn fixes(&self) -> bool {
        self.fix
    }
}

pub fn run(a: DoctorArgs) -> color_eyre::Result<i32> {
    let mut opts = match crate::tui::config::Config::load(a.config.as_deref()) {
        Ok(c) => c.doctor,
        Err(e) => {
            eprintln!("cowshed: {e}");
            return Ok(2);
        }
    };
    if let Some(n) = a.max_depth {
        opts.max_depth = usize::try_from(n).unwrap_or(usize::MAX);
    }
    let (forest, errors) = scan(&a.roots);
    let mut reports: Vec<ImageReport> = diagnose_all(&forest, &opts)
        .into_iter()
        .map(|(id, problems)| report(&forest, id, problems, a.fix))
        .collect();
    let found: usize = reports.iter().map(|r| r.problems.len()).sum();
    let applied = reports
        .iter()
        .any(|r| matches!(r.header, Some(Outcome::Fixed(_))));
    // What is left is what a fresh look finds, not what was hoped.
    let remaining = if applied {
        let (after, _) = scan(&a.roots);
        diagnose_all(&after, &opts)
            .iter()
            .map(|(_, p)| p.len())
            .sum()
    } else {
        found
    };
    let failed = reports.iter().any(|r| {
        matches!(
            r.header,
            Some(Outcome::Failed(_) | Outcome::Skipped(_) | Outcome::Unplannable(_))
        ) && a.fix
    });
    reports.sort_by(|x, y| x.path.cmp(&y.path));
    match a.output {
        Output::Human => print_human(&reports, &errors, found, remaining, a.fix),
        Output::Json => print_json(&reports, &errors, &opts, found, remaining)?,
    }
    Ok(if !errors.is_empty() {
        2
    } else if remaining > 0 || failed {
        1
    } else {
        0
    })
}

fn scan(roots: &[PathBuf]) -> (Forest, Vec<(PathBuf, String)>) {
    let (records, errors) = scan_all(roots);
    (Forest::build(records), errors)
}

/// The problems of one image, and its header-only fix planned (and with
/// `apply`, applied).
fn report(forest: &Forest, id: NodeId, problems: Vec<Problem>, apply: bool) -> ImageReport {
    let path = forest.nodes[id].record.path.clone();
    let mut fixes: Vec<Fix> = problems
        .iter()
        .flat_map(Problem::fixes)
        .filter(|f| f.is_header_only())
        .collect();
    fixes.dedup();
    let header = (!fixes.is_empty()).then(|| match plan_header_fix(&path, &fixes) {
        Err(why) => Outcome::Unplannable(why),
        Ok(plan) if !apply => Outcome::Offered(plan.command()),
        Ok(plan) => apply_fix(&plan),
    });
    ImageReport {
        path,
        problems,
        header,
    }
}

fn apply_fix(plan: &HeaderFix) -> Outcome {
    match engine::rebase(
        &plan.image,
        &plan.rebase_options(),
        &Progress::new(),
        &Cancel::new(),
    ) {
        Ok(()) => Outcome::Fixed(plan.command()),
        Err(e @ engine::Error::Locked { .. }) => Outcome::Skipped(e.to_string()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn print_human(
    reports: &[ImageReport],
    errors: &[(PathBuf, String)],
    found: usize,
    remaining: usize,
    fix: bool,
) {
    for r in reports {
        println!("{}", display(&r.path));
        for p in &r.problems {
            let fixes = p.fixes();
            println!(
                "  {} {}",
                if fixes.is_empty() { "✗" } else { "!" },
                p.describe()
            );
            if fixes.is_empty() {
                println!("      no fix: repair or remove it by hand");
            } else if fixes.iter().any(|f| f.is_header_only()) {
                match &r.header {
                    Some(Outcome::Offered(cmd)) => println!("      fix (--fix applies it): {cmd}"),
                    Some(Outcome::Fixed(cmd)) => println!("      fixed: {cmd}"),
                    Some(Outcome::Unplannable(why)) => println!("      no fix now: {why}"),
                    Some(Outcome::Failed(why)) => println!("      fix failed: {why}"),
                    Some(Outcome::Skipped(why)) => println!("      skipped: {why}"),
                    None => {}
                }
            } else {
                let cmds: Vec<String> = fixes
                    .iter()
                    .filter_map(|&f| {
                        doctor::command(f, &r.path).map(|c| format!("{c}  ({})", f.describe()))
                    })
                    .collect();
                println!(
                    "      fix (copies data, so --fix leaves it to you): {}",
                    cmds.join("  or  ")
                );
            }
        }
    }
    for (path, msg) in errors {
        eprintln!("cowshed: {}: {msg}", path.display());
    }
    let images = reports.len();
    if found == 0 {
        println!("no problems found");
    } else if fix {
        println!(
            "{found} problem{} in {images} image{}; {remaining} remain",
            plural(found),
            plural(images)
        );
    } else {
        println!(
            "{found} problem{} in {images} image{}",
            plural(found),
            plural(images)
        );
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct DocJson<'a> {
    max_depth: usize,
    images: Vec<ImageJson<'a>>,
    errors: Vec<ErrorJson>,
    /// Problems found before any fix.
    problems: usize,
    /// Problems found by a fresh scan after the fixes (as `problems`
    /// without --fix).
    remaining: usize,
}

#[derive(Serialize)]
struct ImageJson<'a> {
    filename: String,
    problems: Vec<ProblemJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ProblemJson<'a> {
    kind: &'static str,
    text: String,
    fixes: Vec<FixJson>,
    /// `open` (no --fix, or no header-only fix), `fixed`, `failed`,
    /// `skipped` (held by a process) or `unplannable`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct FixJson {
    kind: &'static str,
    header_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<String>,
}

#[derive(Serialize)]
struct ErrorJson {
    filename: String,
    error: String,
}

fn print_json(
    reports: &[ImageReport],
    errors: &[(PathBuf, String)],
    opts: &DoctorOptions,
    found: usize,
    remaining: usize,
) -> color_eyre::Result<()> {
    let images = reports
        .iter()
        .map(|r| ImageJson {
            filename: display(&r.path),
            problems: r
                .problems
                .iter()
                .map(|p| problem_json(p, &r.path, r.header.as_ref()))
                .collect(),
        })
        .collect();
    let doc = DocJson {
        max_depth: opts.max_depth,
        images,
        errors: errors
            .iter()
            .map(|(p, m)| ErrorJson {
                filename: display(p),
                error: m.clone(),
            })
            .collect(),
        problems: found,
        remaining,
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

fn problem_json<'a>(p: &Problem, image: &Path, header: Option<&'a Outcome>) -> ProblemJson<'a> {
    let fixes = p.fixes();
    let header_fixable = fixes.iter().any(|f| f.is_header_only());
    let header_cmd = match header {
        Some(Outcome::Offered(c) | Outcome::Fixed(c)) => Some(c.clone()),
        _ => None,
    };
    let (status, error) = match header.filter(|_| header_fixable) {
        Some(Outcome::Fixed(_)) => ("fixed", None),
        Some(Outcome::Failed(e)) => ("failed", Some(e.as_str())),
        Some(Outcome::Skipped(e)) => ("skipped", Some(e.as_str())),
        Some(Outcome::Unplannable(e)) => ("unplannable", Some(e.as_str())),
        Some(Outcome::Offered(_)) | None => ("open", None),
    };
    ProblemJson {
        kind: p.kind(),
        text: p.describe(),
        fixes: fixes
            .iter()
            .map(|&f| FixJson {
                kind: f.kind(),
                header_only: f.is_header_only(),
                command: if f.is_header_only() {
                    header_cmd.clone()
                } else {
                    doctor::command(f, image)
                },
            })
            .collect(),
        status,
        error,
    }
}
