//! `cowshed commit`: write an overlay's data into its base, like
//! `qemu-img commit`.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;

use super::progress::run_cancellable;
use crate::engine::{self, CommitOptions};

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Commit into this image of the backing chain instead of the direct
    /// backing file (implies -d: the top keeps its own data and backing).
    #[arg(short = 'b')]
    base: Option<PathBuf>,
    /// Do not empty the top image afterwards.
    #[arg(short = 'd')]
    keep_top: bool,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Suppress the "Image committed." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The overlay (qcow2) whose data goes down into its base.
    file: PathBuf,
}

pub fn run(a: CommitArgs, session: &Session) -> color_eyre::Result<i32> {
    let opts = CommitOptions {
        base: a.base.clone(),
        keep_top: a.keep_top,
        vms: session.vm_users()?,
    };
    let cancelled = || {
        format!(
            "commit cancelled; {} is unchanged, its base holds part of its data",
            a.file.display()
        )
    };
    let done = run_cancellable(a.progress, cancelled, |progress, cancel| {
        engine::commit(&a.file, &opts, progress, cancel)
    })?;
    if done.is_none() {
        return Ok(130);
    }
    if !a.quiet {
        println!("Image committed.");
    }
    Ok(0)
}
