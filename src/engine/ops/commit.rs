//! `commit`: copy what the top image (and, with a base further down, the
//! images between) allocates into the base, data and zeros; grow the base
//! if it is smaller; then empty the top unless told not to (QCOW2.md §6.1).
//!
//! The top is not touched until the base holds everything and is flushed,
//! so a cancel, an error or a kill leaves the top's view as it was.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::engine::chain::Chain;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::Format;
use crate::engine::layer::Image;
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::Qcow2Writer;

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Commit into this image of the chain (default: the top's backing).
    /// Implies `keep_top`, as in qemu-img.
    pub base: Option<PathBuf>,
    /// Leave the top image as it is (qemu-img commit -d).
    pub keep_top: bool,
}

/// Largest extent copied at once.
const CHUNK: u64 = 1 << 20;

enum Target {
    Qcow2(Box<Qcow2Writer>),
    Raw {
        file: File,
        path: PathBuf,
        _lock: ImageLock,
    },
}

impl Target {
    fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Target::Qcow2(w) => w.write(data, offset),
            Target::Raw { file, path, .. } => file.write_all_at(data, offset).at(path),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        match self {
            Target::Qcow2(w) => w.write_zeroes(offset, len),
            Target::Raw { .. } => {
                buf.clear();
                buf.resize(len as usize, 0);
                let zeros = std::mem::take(buf);
                let r = self.write(&zeros, offset);
                *buf = zeros;
                r
            }
        }
    }

    fn grow(&mut self, size: u64) -> Result<()> {
        match self {
            Target::Qcow2(w) => w.grow(size),
            Target::Raw { file, path, .. } => {
                if file.metadata().at(path)?.len() < size {
                    file.set_len(size).at(path)?;
                }
                Ok(())
            }
        }
    }

    fn flush(&self) -> Result<()> {
        match self {
            Target::Qcow2(w) => w.flush(),
            Target::Raw { file, path, .. } => file.sync_all().at(path),
        }
    }
}

/// Commit `top` into its base. Returns the base's path.
pub fn commit(
    top: &Path,
    opts: &CommitOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<PathBuf> {
    // The top's lock first: its metadata is read only once no QEMU can
    // change it. Held as a writer throughout (its writer is what empties
    // it at the end; two of our own opens would conflict like any two).
    let top_writer = Qcow2Writer::open(top)?;
    let chain = Chain::open(top, Some(Format::Qcow2))?;
    let layers = chain.layers();
    if layers.len() < 2 {
        return Err(Error::invalid(top, "Image does not have a backing file"));
    }
    let base_depth = match &opts.base {
        None => 1,
        Some(b) => {
            let want = std::fs::metadata(b).at(b)?;
            layers
                .iter()
                .position(|l| {
                    l.image
                        .file()
                        .metadata()
                        .is_ok_and(|m| (m.dev(), m.ino()) == (want.dev(), want.ino()))
                })
                .filter(|&d| d > 0)
                .ok_or_else(|| {
                    Error::invalid(
                        top,
                        format!(
                            "'{}' is not in the backing chain of this image",
                            b.display()
                        ),
                    )
                })?
        }
    };
    let keep_top = opts.keep_top || opts.base.is_some();
    let base_path = layers[base_depth].path.clone();

    // A running QEMU on the base stops us here, before any write.
    let mut target = match &layers[base_depth].image {
        Image::Qcow2(_) => Target::Qcow2(Box::new(Qcow2Writer::open(&base_path)?)),
        Image::Raw(_) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&base_path)
                .at(&base_path)?;
            let lock = ImageLock::acquire(&file, &base_path, LockMode::WRITER)?;
            Target::Raw {
                file,
                path: base_path.clone(),
                _lock: lock,
            }
        }
    };

    let size = chain.virtual_size();
    progress.set_total(size);
    target.grow(size)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut zeros = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        cancel.check()?;
        let st = chain.block_status(pos, (size - pos).min(CHUNK))?;
        if st.present && st.depth < base_depth {
            if st.data {
                let chunk = &mut buf[..st.length as usize];
                chain.read_extent(&st, chunk)?;
                target.write(chunk, pos)?;
            } else {
                target.write_zeroes(pos, st.length, &mut zeros)?;
            }
        }
        pos += st.length;
        progress.advance(st.length);
    }
    target.flush()?;
    drop(target);
    if !keep_top {
        cancel.check()?;
        top_writer.make_empty()?;
    }
    Ok(base_path)
}
