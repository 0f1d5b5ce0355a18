//! `cowshed commit`: write an overlay's data into its base, like
//! `qemu-img commit`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::progress::{install_ctrlc, spawn_reporter};
use crate::engine::{self, Cancel, CommitOptions, Progress};

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

pub fn run(a: CommitArgs) -> color_eyre::Result<i32> {
    let cancel = Cancel::new();
    install_ctrlc(&cancel)?;
    let progress = Arc::new(Progress::new());
    let reporter = a.progress.then(|| spawn_reporter(progress.clone()));
    let opts = CommitOptions {
        base: a.base.clone(),
        keep_top: a.keep_top,
    };
    let result = engine::commit(&a.file, &opts, &progress, &cancel);
    if let Some((stop, handle)) = reporter {
        stop.cancel();
        let _ = handle.join();
    }
    match result {
        Ok(_) => {
            if !a.quiet {
                println!("Image committed.");
            }
            Ok(0)
        }
        Err(engine::Error::Cancelled) => {
            eprintln!(
                "cowshed: commit cancelled; {} is unchanged, its base holds part of its data",
                a.file.display()
            );
            Ok(130)
        }
        Err(e) => Err(e.into()),
    }
}
