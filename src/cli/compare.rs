//! `cowshed compare`: do two images hold the same guest data, like
//! `qemu-img compare`, with its messages and exit codes.

use std::path::PathBuf;

use clap::Args;

use super::parse_format;
use super::progress::run_cancellable;
use crate::engine::ops::compare::{compare, CompareOptions, Stage, Verdict};
use crate::engine::{Chain, Error, Format};

#[derive(Debug, Args)]
#[command(
    after_help = "Exit codes (as qemu-img's): 0 the images read the same, 1 they \
    differ, 2 an image could not be opened, 3 a block status could not be read, 4 data \
    could not be read, 130 interrupted.\n\n\
    Images of different sizes are compared up to the shorter one's end, then the rest of \
    the longer one must read as zeros (\"Warning: Image size mismatch!\"), unless -s."
)]
pub struct CompareArgs {
    /// Format of FILE1 (qcow2 or raw); probed if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format1: Option<Format>,
    /// Format of FILE2 (qcow2 or raw); probed if absent.
    #[arg(short = 'F', value_parser = parse_format)]
    format2: Option<Format>,
    /// Strict: images of different sizes, or whose allocation (block
    /// status) differs anywhere, differ even where their bytes are equal.
    #[arg(short = 's')]
    strict: bool,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing; the exit code tells.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (cowshed takes no lock to read).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for qemu-img compatibility (cowshed reads through the page
    /// cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    cache: Option<String>,
    file1: PathBuf,
    file2: PathBuf,
}

pub fn run(a: CompareArgs) -> color_eyre::Result<i32> {
    let _ = (a.force_share, &a.cache);
    let say = |line: &str| {
        if !a.quiet {
            println!("{line}");
        }
    };
    let open = |path: &PathBuf, format| {
        Chain::open(path, format).map_err(|e| {
            eprintln!("cowshed: Could not open '{}': {e}", path.display());
        })
    };
    let (Ok(c1), Ok(c2)) = (open(&a.file1, a.format1), open(&a.file2, a.format2)) else {
        return Ok(2);
    };
    let opts = CompareOptions { strict: a.strict };
    let outcome = run_cancellable(
        a.progress,
        || "compare interrupted".into(),
        |progress, cancel| match compare(&c1, &c2, opts, progress, cancel) {
            Err(e) if matches!(e.source, Error::Cancelled) => Err(Error::Cancelled),
            other => Ok(other),
        },
    )?;
    let Some(outcome) = outcome else {
        return Ok(130);
    };
    let result = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cowshed: {e}");
            return Ok(match e.stage {
                Stage::Status => 3,
                Stage::Read => 4,
            });
        }
    };
    // qemu-img warns once the common part matched, before the tail.
    let tail_reached = match result.verdict {
        Verdict::Identical => true,
        Verdict::ContentMismatch(at) => at >= c1.virtual_size().min(c2.virtual_size()),
        _ => false,
    };
    if result.sizes_differ && tail_reached {
        say("Warning: Image size mismatch!");
    }
    Ok(match result.verdict {
        Verdict::Identical => {
            say("Images are identical.");
            0
        }
        Verdict::ContentMismatch(at) => {
            say(&format!("Content mismatch at offset {at}!"));
            1
        }
        Verdict::SizeMismatch => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Verdict::StatusMismatch(at) => {
            say(&format!("Strict mode: Offset {at} block status mismatch!"));
            1
        }
    })
}
