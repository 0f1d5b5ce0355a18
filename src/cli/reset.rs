//! `cowshed reset`: throw away an overlay's own changes.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;

use crate::engine::{self, ResetOptions};

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Also look for dependents under DIR, recursively (FILE's own
    /// directory is always searched). May be given several times.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// The qcow2 overlay to reset.
    file: PathBuf,
}

pub fn run(a: ResetArgs, session: &Session) -> color_eyre::Result<i32> {
    let opts = ResetOptions {
        roots: a.roots,
        vms: session.vm_users()?,
    };
    engine::reset(&a.file, &opts)?;
    println!(
        "reset {}: its own changes are gone, it reads as its backing file",
        a.file.display()
    );
    Ok(0)
}
