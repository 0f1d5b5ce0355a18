//! Scan roots for images: walk (walkdir, following links with loop
//! detection), then probe each candidate's header on a few threads. Results
//! stream out as they come, so a UI can show the forest before the scan
//! ends.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;

use crossbeam_channel::{bounded, Sender};

use super::holders::find_holders;
use super::{ImageRecord, Sizes};
use crate::engine::lock::lock_bytes;
use crate::engine::{inspect_file, Format, LockState};

#[derive(Debug)]
pub enum ScanEvent {
    Image(Box<ImageRecord>),
    /// A visible file that is no image cowshed reads (a UI shows it, greyed,
    /// with the reason, so nothing vanishes silently). Hidden files (a dot
    /// first) are not reported.
    Skipped {
        path: PathBuf,
        reason: String,
        sizes: Sizes,
    },
    /// A directory or file that could not be read; the scan goes on.
    Error {
        path: PathBuf,
        message: String,
    },
    /// Every root has been walked and every candidate probed.
    Done,
}

/// Scan `roots` recursively with `threads` probing threads, sending events
/// to `tx` and ending with [`ScanEvent::Done`]. Blocks until done; run it on
/// a thread of its own to stream.
pub fn scan(roots: &[PathBuf], threads: usize, tx: &Sender<ScanEvent>) {
    let (work_tx, work_rx) = bounded::<PathBuf>(1024);
    thread::scope(|s| {
        for _ in 0..threads.max(1) {
            let rx = work_rx.clone();
            let tx = tx.clone();
            s.spawn(move || {
                for path in rx {
                    let ev = match classify(&path) {
                        Ok(Found::Image(r)) => ScanEvent::Image(r),
                        Ok(Found::Other { reason, sizes }) if !is_hidden(&path) => {
                            ScanEvent::Skipped {
                                path,
                                reason,
                                sizes,
                            }
                        }
                        Ok(Found::Other { .. }) => continue,
                        Err(message) => ScanEvent::Error { path, message },
                    };
                    let _ = tx.send(ev);
                }
            });
        }
        drop(work_rx);
        let mut seen = HashSet::new();
        for root in roots {
            // The trash holds deleted images: they are gone from the tree.
            let walk = walkdir::WalkDir::new(root)
                .follow_links(true)
                .into_iter()
                .filter_entry(|e| !crate::engine::trash::is_trash_name(e.file_name()));
            for entry in walk {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        let path = e.path().unwrap_or(root).to_path_buf();
                        let message = match e.loop_ancestor() {
                            Some(a) => format!("symlink loop back to {}", a.display()),
                            None => e
                                .io_error()
                                .map_or_else(|| e.to_string(), |io| io.to_string()),
                        };
                        let _ = tx.send(ScanEvent::Error { path, message });
                        continue;
                    }
                };
                if !entry.file_type().is_file() {
                    continue;
                }
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                // Reached twice (a link, or overlapping roots): shown once.
                if seen.insert((meta.dev(), meta.ino())) && work_tx.send(entry.into_path()).is_err()
                {
                    break;
                }
            }
        }
        drop(work_tx);
    });
    let _ = tx.send(ScanEvent::Done);
}

/// Scan and collect: images in the order found, and errors.
pub fn scan_all(roots: &[PathBuf]) -> (Vec<ImageRecord>, Vec<(PathBuf, String)>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let threads = thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    scan(roots, threads, &tx);
    drop(tx);
    let (mut images, mut errors) = (Vec::new(), Vec::new());
    for ev in rx {
        match ev {
            ScanEvent::Image(r) => images.push(*r),
            ScanEvent::Error { path, message } => errors.push((path, message)),
            ScanEvent::Skipped { .. } | ScanEvent::Done => {}
        }
    }
    images.sort_by(|a, b| a.path.cmp(&b.path));
    (images, errors)
}

/// What a file turned out to be.
pub enum Found {
    Image(Box<ImageRecord>),
    /// Not an image cowshed reads, and why.
    Other {
        reason: String,
        sizes: Sizes,
    },
}

/// Stat and probe one file: `Ok(None)` if it is not an image.
pub fn read_record(path: &Path) -> Result<Option<ImageRecord>, String> {
    Ok(match classify(path)? {
        Found::Image(r) => Some(*r),
        Found::Other { .. } => None,
    })
}

/// Stat and probe one file: an image's record, or why it is none.
pub fn classify(path: &Path) -> Result<Found, String> {
    let file = crate::engine::format::open_image_file(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let sizes = Sizes {
        virtual_size: 0,
        allocated: meta.blocks() * 512,
        apparent: meta.len(),
    };
    let other = |reason: String| Ok(Found::Other { reason, sizes });
    if !meta.is_file() {
        return other("not a regular file".into());
    }
    let (summary, error) = match inspect_file(&file, path) {
        Ok(s) => (Some(s), None),
        // A qcow2 magic with a header we refuse is still an image, shown
        // with its problem.
        Err(e) => match crate::engine::format::probe_file(&file, path) {
            Ok(Format::Qcow2) => (None, Some(e.to_string())),
            _ => return other(format!("unreadable: {e}")),
        },
    };
    if let Some(s) = &summary {
        if s.format == Format::Raw && !crate::engine::format::named_like_an_image(path) {
            return other(
                "not a disk image cowshed recognises (no image header; raw images are \
                 named .raw or .img)"
                    .into(),
            );
        }
    }
    let lock = lock_bytes(&file, path).map_or(LockState::None, |b| b.state());
    let dev_ino = (meta.dev(), meta.ino());
    let holders = if lock == LockState::None {
        Vec::new()
    } else {
        find_holders(&HashSet::from([dev_ino]))
            .remove(&dev_ino)
            .unwrap_or_default()
    };
    Ok(Found::Image(Box::new(ImageRecord {
        path: path.to_path_buf(),
        key: path.canonicalize().unwrap_or_else(|_| path.to_path_buf()),
        host: None,
        dev_ino,
        sizes: Sizes {
            virtual_size: summary.as_ref().map_or(0, |s| s.virtual_size),
            allocated: meta.blocks() * 512,
            apparent: meta.len(),
        },
        summary,
        error,
        mtime: meta.modified().ok(),
        created: meta.created().ok(),
        mode: meta.mode() & 0o7777,
        lock,
        holders,
        identity: None,
        vms: Vec::new(),
        seen_on: Vec::new(),
    })))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}
