//! `cowshed mv`: rename or move an image (or a directory of images) and
//! re-point every image that uses it as backing file.

use super::session::Session;
use std::path::{Path, PathBuf};

use clap::Args;

use super::progress::run_cancellable;
use crate::engine::{self, MoveOptions};

#[derive(Debug, Args)]
pub struct MvArgs {
    /// Also look for dependents in DIR, recursively (SRC's own directory
    /// is always looked at). May be given several times.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Show progress on stderr (a copy across file systems).
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image, or a directory of images, to move.
    src: PathBuf,
    /// The new name, or an existing directory to move SRC into. Never
    /// replaced if it exists.
    dst: PathBuf,
}

pub fn run(a: MvArgs, session: &Session) -> color_eyre::Result<i32> {
    let opts = MoveOptions {
        roots: a.roots.clone(),
        vms: session.vm_users()?,
    };
    let cancelled = || {
        format!(
            "mv cancelled; {} is where it was and no image was changed",
            a.src.display()
        )
    };
    let done = run_cancellable(a.progress && !a.quiet, cancelled, |progress, cancel| {
        engine::move_image(&a.src, &a.dst, &opts, progress, cancel)
    })?;
    let Some(report) = done else {
        return Ok(130);
    };
    if a.quiet {
        return Ok(0);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    let show = |p: &Path| shown(&cwd, p);
    let how = match (report.copied, report.resumed) {
        (true, true) => " (an interrupted move completed; copied across file systems and verified)",
        (true, false) => " (copied across file systems, verified, then removed)",
        (false, true) => " (an interrupted move completed)",
        (false, false) => "",
    };
    println!("moved {} -> {}{how}", show(&report.src), show(&report.dst));
    for r in &report.rewritten {
        let whose = if r.moved { "own backing" } else { "re-pointed" };
        println!("{whose} {}: '{}' -> '{}'", show(&r.image), r.old, r.new);
    }
    for p in &report.left_behind {
        println!(
            "left in place: {} (files that appeared there during the move)",
            show(p)
        );
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    Ok(0)
}

/// A path as the user would type it from here: relative below the current
/// directory, absolute elsewhere.
fn shown(cwd: &Path, p: &Path) -> String {
    match p.strip_prefix(cwd) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => p.display().to_string(),
    }
}
