//! `cowshed rm`: delete images nothing depends on (for good, or into the
//! trash with `--trash`); `--stream` first rebases the dependents onto the
//! image's own backing.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;

use super::progress::run_cancellable;
use crate::engine::ops::remove::Gone;
use crate::engine::{self, RemoveOptions};

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Also look for dependents under DIR, recursively (each FILE's own
    /// directory is always searched). May be given several times.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Take FILE out of the middle of its chain: every image that uses it
    /// as backing file is first rebased (safe mode, the guest view kept)
    /// onto FILE's own backing, or flattened when FILE has none; then FILE
    /// is deleted. Interrupted, it leaves every dependent on FILE or on
    /// FILE's backing with the same view; run it again to finish.
    #[arg(long)]
    stream: bool,
    /// Move into the trash (`.cowshed-trash/` in FILE's directory) instead
    /// of deleting for good; `cowshed trash restore` puts it back.
    #[arg(long)]
    trash: bool,
    /// Show progress on stderr (with --stream).
    #[arg(short = 'p')]
    progress: bool,
    /// The images to delete.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
}

pub fn run(a: RmArgs, session: &Session) -> color_eyre::Result<i32> {
    let opts = RemoveOptions {
        roots: a.roots.clone(),
        stream: a.stream,
        trash: a.trash,
        vms: session.vm_users()?,
    };
    let cancelled = || {
        "rm cancelled: every image is still readable; dependents already streamed read as \
         before, and the same command finishes the job"
            .to_string()
    };
    let done = run_cancellable(a.progress, cancelled, |progress, cancel| {
        engine::remove(&a.files, &opts, progress, cancel)
    })?;
    let Some(removal) = done else {
        return Ok(130);
    };
    for s in &removal.streamed {
        if s.backing.is_empty() {
            println!("flattened {}", s.dependent.display());
        } else {
            println!("rebased {} onto {}", s.dependent.display(), s.backing);
        }
    }
    for g in &removal.gone {
        match g {
            Gone::Deleted(p) => println!("deleted {}", p.display()),
            Gone::Trashed { path, item } => {
                println!("moved {} to the trash: {}", path.display(), item.display())
            }
        }
    }
    Ok(0)
}
