//! `cowshed rebase`: point a qcow2 image at another backing file, like
//! `qemu-img rebase`.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;

use super::progress::run_cancellable;
use crate::engine::{self, Format, RebaseOptions};

#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Only change the header (do not copy any data; the old backing need
    /// not exist).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// The new backing file, stored as given ("" to remove the backing).
    #[arg(short = 'b', value_name = "BACKING", allow_hyphen_values = true)]
    backing: String,
    /// Format of the new backing file (qcow2 or raw); required unless -b "".
    #[arg(short = 'F', value_name = "FMT", value_parser = super::parse_format)]
    backing_format: Option<Format>,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet (accepted for qemu-img compatibility; rebase prints nothing on
    /// success).
    #[arg(short = 'q')]
    quiet: bool,
    /// The qcow2 image to rebase.
    file: PathBuf,
}

pub fn run(a: RebaseArgs, session: &Session) -> color_eyre::Result<i32> {
    let opts = RebaseOptions {
        backing: a.backing.clone(),
        backing_format: a.backing_format,
        unsafe_header_only: a.unsafe_mode,
        vms: session.vm_users()?,
    };
    let cancelled = || {
        format!(
            "rebase cancelled; {} still uses its old backing file and reads as before",
            a.file.display()
        )
    };
    let done = run_cancellable(a.progress && !a.quiet, cancelled, |progress, cancel| {
        engine::rebase(&a.file, &opts, progress, cancel)
    })?;
    Ok(if done.is_some() { 0 } else { 130 })
}
