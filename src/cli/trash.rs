//! `cowshed trash`: what `rm --trash` (and the TUI's delete) moved into
//! `.cowshed-trash/`: list it, put images back, empty it for good.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::human_size;
use crate::engine::trash;

#[derive(Debug, Args)]
pub struct TrashArgs {
    #[command(subcommand)]
    command: TrashCommand,
}

#[derive(Debug, Subcommand)]
enum TrashCommand {
    /// List the items in the trashes under DIR (recursively; default: the
    /// current directory): the item to restore, where it came from, when,
    /// and its size on disk.
    List {
        #[arg(value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
    /// Put items back where they were (an item is a directory that `list`
    /// names). An existing file is never replaced.
    Restore {
        #[arg(required = true, value_name = "ITEM")]
        items: Vec<PathBuf>,
    },
    /// Delete everything in the trashes under DIR for good (recursively;
    /// default: the current directory).
    Empty {
        #[arg(value_name = "DIR")]
        dirs: Vec<PathBuf>,
    },
}

fn or_here(dirs: Vec<PathBuf>) -> Vec<PathBuf> {
    if dirs.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        dirs
    }
}

impl TrashArgs {
    pub(super) fn writes(&self) -> bool {
        !matches!(self.command, TrashCommand::List { .. })
    }
}

pub fn run(a: TrashArgs) -> color_eyre::Result<i32> {
    match a.command {
        TrashCommand::List { dirs } => {
            for item in trash::list(&or_here(dirs))? {
                let (from, when) = match &item.record {
                    Some(r) => (r.path.display().to_string(), trash::utc_text(r.deleted)),
                    None => ("?".into(), "?".into()),
                };
                let state = if item.image.is_some() {
                    String::new()
                } else {
                    " (incomplete: no image; `trash empty` removes it)".into()
                };
                println!(
                    "{}\t{from}\t{when}\t{}{state}",
                    item.dir.display(),
                    human_size(item.allocated)
                );
            }
            Ok(0)
        }
        TrashCommand::Restore { items } => {
            // Each item is checked before any is moved back.
            let mut plans = Vec::new();
            for i in &items {
                let item = trash::read_item(i)?;
                if let Some(to) = item.restore_path() {
                    if to.symlink_metadata().is_ok() {
                        color_eyre::eyre::bail!(
                            "{}: exists: a restore never replaces a file; move it away first",
                            to.display()
                        );
                    }
                }
                plans.push(item);
            }
            for item in plans {
                let to = trash::restore(&item.dir)?;
                println!("restored {}", to.display());
            }
            Ok(0)
        }
        TrashCommand::Empty { dirs } => {
            let (n, bytes) = trash::empty(&or_here(dirs))?;
            println!("deleted {n} item(s) for good, {} freed", human_size(bytes));
            Ok(0)
        }
    }
}
