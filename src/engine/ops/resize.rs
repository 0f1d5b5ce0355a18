//! `resize`: change the virtual size of a raw or qcow2 image, as
//! `qemu-img resize` does. Growing is always safe for the guest's data (the
//! new range reads as zeros; images that use this one as backing keep
//! their own size and read zeros past its old end, as before). Shrinking
//! drops the data past the new end, so it needs `shrink` (qemu-img's
//! `--shrink`), and, beyond qemu-img, is refused while other images use
//! the file as backing: what they read past the new end would change.
//! Persistent bitmaps come along, as QEMU keeps them: resized, their bits
//! kept (see [`Qcow2Writer::resize_keeping_bitmaps`]).

use std::path::{Path, PathBuf};

use crate::engine::dependents::{find_dependents, Scope};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::{open_image_file, probe_file, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::preflight::ensure_no_vm_users;
use crate::engine::qcow2::Qcow2Writer;

#[derive(Debug, Clone, Default)]
pub struct ResizeOptions {
    /// The format given with -f; probed when absent.
    pub format: Option<Format>,
    /// Allow a smaller size (qemu-img's --shrink).
    pub shrink: bool,
    /// Shrink even when other images use the file as backing.
    pub force: bool,
    /// Where to look for such images besides the file's own directory
    /// (walked recursively).
    pub roots: Vec<PathBuf>,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
}

/// How a size argument is meant: absolute, or relative to the current
/// size (qemu-img's `+SIZE` and `-SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    Exactly(u64),
    Plus(u64),
    Minus(u64),
}

impl NewSize {
    fn resolve(self, path: &Path, current: u64) -> Result<u64> {
        match self {
            NewSize::Exactly(n) => Ok(n),
            NewSize::Plus(n) => current
                .checked_add(n)
                .ok_or_else(|| Error::invalid(path, "Image size too large")),
            NewSize::Minus(n) => current
                .checked_sub(n)
                .ok_or_else(|| Error::invalid(path, "New image size must be positive")),
        }
    }
}

/// Resize `path`; returns the new virtual size. Refusals (a QEMU holding
/// the image, a shrink without `opts.shrink`, dependents, an inconsistent
/// bitmap) leave the file byte-identical.
pub fn resize(path: &Path, size: NewSize, opts: &ResizeOptions) -> Result<u64> {
    let file = open_image_file(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe_file(&file, path)?,
    };
    drop(file);
    ensure_no_vm_users(path, &opts.vms)?;
    match format {
        Format::Qcow2 => {
            // Locks (QEMU's writer), then the metadata check, then reading.
            let mut w = Qcow2Writer::open(path)?;
            let old = w.virtual_size();
            let new = checked(path, size.resolve(path, old)?, old, opts)?;
            if new != old && w.header().version < 3 && w.header().nb_snapshots > 0 {
                // A v2 snapshot table entry has no room for its disk size.
                return Err(Error::invalid(
                    path,
                    "Can't resize a v2 image which has snapshots",
                ));
            }
            if !w.bitmaps()?.is_empty() {
                // Checked even for the same size, as QEMU's truncate
                // checks them.
                if new < old && w.header().has_data_file() {
                    return Err(shrink_data_file(path));
                }
                let hide_backing = w.backing_chain().is_some_and(|c| c.virtual_size() > old);
                w.resize_keeping_bitmaps(new)?;
                if new > old && hide_backing {
                    w.write_zeroes(old, new - old)?;
                }
            } else if new > old {
                // A backing longer than the old end would show through the
                // new range: QEMU zeroes it instead, with zero clusters,
                // and fails on compat=0.10 images, which have none.
                let hide_backing = w.backing_chain().is_some_and(|c| c.virtual_size() > old);
                if hide_backing && w.header().version < 3 {
                    return Err(Error::invalid(
                        path,
                        "Failed to zero out new clusters: Operation not supported (a compat=0.10 \
                         image cannot hide its backing file's data past its old end)",
                    ));
                }
                w.grow(new)?;
                if hide_backing {
                    w.write_zeroes(old, new - old)?;
                }
            } else if new < old {
                if w.header().has_data_file() {
                    return Err(shrink_data_file(path));
                }
                w.shrink(new)?;
            }
            w.flush()?;
            Ok(new)
        }
        Format::Raw => {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .at(path)?;
            let _lock = ImageLock::acquire(&file, path, LockMode::WRITER)?;
            let old = file.metadata().at(path)?.len();
            let new = checked(path, size.resolve(path, old)?, old, opts)?;
            if new != old {
                file.set_len(new).at(path)?;
                file.sync_all().at(path)?;
            }
            Ok(new)
        }
        other => Err(Error::UnsupportedFormat {
            path: path.to_path_buf(),
            format: other.name(),
        }),
    }
}

fn shrink_data_file(path: &Path) -> Error {
    Error::invalid(
        path,
        "shrinking an image with an external data file is not supported",
    )
}

/// The new size, once it is allowed.
fn checked(path: &Path, new: u64, old: u64, opts: &ResizeOptions) -> Result<u64> {
    if new % 512 != 0 {
        return Err(Error::invalid(
            path,
            "The new size must be a multiple of 512",
        ));
    }
    if new < old {
        if !opts.shrink {
            return Err(Error::invalid(
                path,
                "Use the --shrink option to perform a shrink operation (shrinking deletes all \
                 data beyond the new end of the disk)",
            ));
        }
        if !opts.force {
            let users = find_dependents(path, &Scope::around(path, &opts.roots))?;
            if !users.is_empty() {
                return Err(Error::invalid(
                    path,
                    format!(
                        "is the backing file of {}: shrinking it changes what they read past \
                         the new end (--force shrinks it anyway)",
                        users
                            .iter()
                            .map(|d| format!("'{}'", d.path.display()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
        }
    }
    Ok(new)
}
