//! `cowshed protect`: make the bases under some directories read-only on
//! disk (and back with `--off`), so that nothing opens them for writing by
//! mistake and corrupts their overlays.

use std::collections::HashSet;
use std::path::PathBuf;

use clap::Args;

use super::display;
use crate::catalog::scan::scan_all;
use crate::catalog::Forest;
use crate::engine::ops::protect::{protect, recorded_mode, unprotect, MODE_ATTR};
use crate::engine::LockState;

const AFTER_HELP: &str = "\
Protecting removes every write bit of each base (an image that other
images use as their backing file) under DIR, after recording its mode in
the file's extended attribute user.cowshed.mode. QEMU opens backing files
read-only, so overlays that run on a protected base are unaffected; a
process that tries to open the base for writing (a VM booted on it by
mistake, a commit into it) is refused by the system, unless it runs as
root, which mode bits do not stop.

--off restores the mode recorded when protecting; where none was recorded
(the file system keeps no user attributes, or the file was made read-only
by other means) it gives the owner write permission back. --off also acts
on images that no longer have dependents but were protected.

Every file changed, left as it was, or that could not be changed is
reported.

Exit codes:
  0  every base is protected (or, with --off, writable)
  1  a file could not be changed (the message says which and why)
  2  usage error, or a directory or file that could not be scanned";

#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ProtectArgs {
    /// Give the bases their write permission back.
    #[arg(long)]
    off: bool,
    /// More directories searched for overlays that use the bases (they
    /// make an image a base; only bases under DIR are changed).
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Directories (or image files) whose bases are protected.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
}

pub fn run(a: ProtectArgs) -> color_eyre::Result<i32> {
    let (mine, mut errors) = scan_all(&a.dirs);
    let mine: HashSet<PathBuf> = mine.into_iter().map(|r| r.key).collect();
    let all: Vec<PathBuf> = a.dirs.iter().chain(&a.roots).cloned().collect();
    let (records, more_errors) = scan_all(&all);
    errors.extend(more_errors);
    errors.sort();
    errors.dedup();
    let forest = Forest::build(records);
    let mut failed = false;
    let mut acted = 0;
    for &root in &forest.roots {
        for (id, _) in forest.walk(root) {
            let node = &forest.nodes[id];
            let r = &node.record;
            let is_base = !node.children.is_empty();
            if !mine.contains(&r.key) {
                if is_base
                    && node
                        .children
                        .iter()
                        .any(|&c| mine.contains(&forest.nodes[c].record.key))
                {
                    println!(
                        "{}: base of images under the given directories, but not under them: \
                         unchanged",
                        display(&r.path)
                    );
                }
                continue;
            }
            let was_protected = !is_base && a.off && recorded_mode(&r.path).is_some();
            if !is_base && !was_protected {
                continue;
            }
            acted += 1;
            let result = if a.off {
                unprotect(&r.path)
            } else {
                protect(&r.path)
            };
            match result {
                Ok(change) => {
                    let dependents = forest.subtree(id).dependents;
                    let users = if is_base {
                        format!(
                            "; {dependents} image{} depend{} on it",
                            if dependents == 1 { "" } else { "s" },
                            if dependents == 1 { "s" } else { "" }
                        )
                    } else {
                        "; nothing depends on it any more".to_string()
                    };
                    println!("{}: {}{users}", display(&r.path), change.describe());
                    if !a.off && r.lock == LockState::Writer {
                        let who: Vec<String> = r
                            .holders
                            .iter()
                            .filter(|h| h.writable)
                            .map(|h| format!("pid {} ({})", h.pid, h.command))
                            .collect();
                        println!(
                            "  warning: it is open for writing{}: the mode stops new opens only, \
                             that process keeps writing until it closes it",
                            if who.is_empty() {
                                String::new()
                            } else {
                                format!(" by {}", who.join(", "))
                            }
                        );
                    }
                }
                Err(e) => {
                    failed = true;
                    eprintln!("cowshed: {e}");
                }
            }
        }
    }
    if acted == 0 {
        println!(
            "{}",
            if a.off {
                format!(
                    "no base and no image protected by cowshed ({MODE_ATTR}) under the given \
                     directories: nothing to change"
                )
            } else {
                "no base (an image others use as backing file) under the given directories: \
                 nothing to protect"
                    .to_string()
            }
        );
    }
    for (path, msg) in &errors {
        eprintln!("cowshed: {}: {msg}", path.display());
    }
    Ok(if !errors.is_empty() {
        2
    } else if failed {
        1
    } else {
        0
    })
}
