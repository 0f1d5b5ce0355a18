//! `commit`: copy what the top image (and, with a base further down, the
//! images between) allocates into the base, data and zeros; grow the base
//! if it is smaller; then empty the top unless told not to (QCOW2.md §6.1).
//!
//! The top is not touched until the base holds everything and is flushed,
//! so a cancel, an error or a kill leaves the top's view as it was.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::engine::buf::AlignedBuf;
use crate::engine::chain::Chain;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::Format;
use crate::engine::layer::Image;
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::preflight::ensure_no_vm_users;
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::Qcow2Writer;

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Commit into this image of the chain (default: the top's backing).
    /// Implies `keep_top`, as in qemu-img.
    pub base: Option<PathBuf>,
    /// Leave the top image as it is (qemu-img commit -d).
    pub keep_top: bool,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
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

    /// Zeros as QEMU's commit writes them into the base (MAY_UNMAP):
    /// whole qcow2 clusters given back, holes in a raw file.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Target::Qcow2(w) => w.write_zeroes_unmap(offset, len),
            Target::Raw { file, path, .. } => {
                crate::engine::raw::zero_range(file, path, offset, len)
            }
        }
    }

    /// See [`Qcow2Writer::write_direct`]; a raw target's runs are the
    /// guest offsets themselves.
    fn write_direct(
        &mut self,
        offset: u64,
        len: u64,
        fill: &mut crate::engine::qcow2::writer::FillRuns,
    ) -> Result<bool> {
        match self {
            Target::Qcow2(w) => w.write_direct(offset, len, fill),
            Target::Raw { .. } => fill(&[(offset, offset, len)]).map(|()| true),
        }
    }

    fn data_file(&self) -> &File {
        match self {
            Target::Qcow2(w) => w.data_file(),
            Target::Raw { file, .. } => file,
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

    fn flush(&mut self) -> Result<()> {
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
    let mut top_writer = Qcow2Writer::open(top)?;
    // Emptied as QEMU empties it: its bitmaps kept, recording nothing.
    top_writer.keep_bitmaps(false);
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
    // The base takes the data and every layer above it is emptied or
    // skipped: a machine booting any of them would see a changed disk.
    for layer in &layers[..=base_depth] {
        ensure_no_vm_users(&layer.path, &opts.vms)?;
    }

    // A running QEMU on the base stops us here, before any write.
    let mut target = match &layers[base_depth].image {
        Image::Qcow2(_) => {
            let mut w = Qcow2Writer::open(&base_path)?;
            // The base's enabled bitmaps record what is committed into it,
            // whole base clusters, as QEMU's do.
            w.keep_bitmaps(true);
            Target::Qcow2(Box::new(w))
        }
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
    crate::engine::space::ensure_fits(&base_path, space_needed(&chain, base_depth, &mut target)?)?;
    progress.set_total(size);
    target.grow(size)?;
    copy_into(
        &chain,
        base_depth,
        &mut target,
        &base_path,
        progress,
        cancel,
    )?;
    target.flush()?;
    fault::point("commit.base_flushed");
    drop(target);
    if !keep_top {
        cancel.check()?;
        fault::point("commit.before_empty");
        top_writer.make_empty()?;
        fault::point("commit.emptied");
    }
    Ok(base_path)
}

/// Bytes the base's file may grow by: data bound for ranges the base does
/// not own yet (holes of a raw base, clusters a qcow2 base must allocate),
/// plus room for the qcow2 metadata that maps them.
fn space_needed(chain: &Chain, base_depth: usize, target: &mut Target) -> Result<u64> {
    let size = chain.virtual_size();
    let base = &chain.layers()[base_depth].image;
    let mut needed = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let st = chain.block_status(pos, (size - pos).min(CHUNK))?;
        if st.present && st.depth < base_depth && st.data {
            needed += match (&mut *target, base) {
                // Clusters the base owns are overwritten in place.
                (Target::Qcow2(w), _) => {
                    if w.owns_range(pos, st.length)? {
                        0
                    } else {
                        st.length
                    }
                }
                (Target::Raw { .. }, Image::Raw(raw)) => {
                    // Only the base's holes take new space.
                    let (mut at, end, mut holes) = (pos, pos + st.length, 0);
                    while at < end.min(raw.virtual_size()) {
                        let (status, n) = raw.status(at, end - at)?;
                        if !matches!(status, crate::engine::layer::LayerStatus::Data { .. }) {
                            holes += n;
                        }
                        at += n.max(1);
                    }
                    holes + end.saturating_sub(raw.virtual_size().max(pos))
                }
                _ => st.length,
            };
        }
        pos += st.length;
    }
    Ok(needed + needed / 64)
}

/// Copy what the layers above `base_depth` provide into the target. Data
/// bound for clusters the target already owns goes file to file in the
/// kernel ([`copy_in_kernel`]); the rest (new clusters, compressed
/// sources, zeros) through the target's writer. Measured on the 2 GiB
/// fixture: the page-cache copy is the commit's whole cost, and two
/// threads writing one file only queue on its inode lock.
fn copy_into(
    chain: &Chain,
    base_depth: usize,
    target: &mut Target,
    base_path: &Path,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let size = chain.virtual_size();
    // A second handle on the same open file (same locks), so the target's
    // writer can be borrowed mutably alongside it.
    let file = target.data_file().try_clone().at(base_path)?;
    // Data file lengths of the layers above the base (0: not copied in
    // the kernel, e.g. encrypted), once: a stat per extent showed up.
    let src_lens: Vec<u64> = chain.layers()[..base_depth]
        .iter()
        .map(|l| {
            l.image
                .data_file()
                .and_then(|f| f.metadata().at(&l.path))
                .map_or(0, |m| m.len())
        })
        .collect();
    let mut buf = AlignedBuf::zeroed(CHUNK as usize);
    let mut pos = 0u64;
    let mut written = 0u64;
    // Cleared when the kernel cannot copy between these files (another
    // file system: EXDEV); the buffered path does the rest.
    let mut in_kernel = true;
    while pos < size {
        cancel.check()?;
        // Zeros are asked for whole, not in chunks: a zero run split at a
        // chunk edge inside one of the target's clusters (2 MiB clusters)
        // would be written as zero bytes in both halves where QEMU sets
        // one zero flag. Only data passes through the buffer.
        let mut st = chain.block_status(pos, size - pos)?;
        if st.data {
            st.length = st.length.min(CHUNK);
        }
        if st.present && st.depth < base_depth {
            if st.data {
                progress.add_copied(st.length);
            }
            if st.data
                && !st.compressed
                && in_kernel
                && copy_in_kernel(
                    chain,
                    &st,
                    src_lens[st.depth],
                    target,
                    &file,
                    base_path,
                    &mut in_kernel,
                )?
            {
                // Copied without passing through this process.
            } else if st.data {
                let chunk = &mut buf[..st.length as usize];
                chain.read_extent(&st, chunk)?;
                target.write(chunk, pos)?;
            } else {
                target.write_zeroes(pos, st.length)?;
            }
            fault::point("commit.copied");
        }
        pos += st.length;
        progress.advance(st.length);
        written += st.length;
        if written >= WRITEBACK_EVERY {
            written = 0;
            start_writeback(&file);
        }
    }
    Ok(())
}

/// Bytes copied between two nudges of the kernel's writeback.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Start writing the file's dirty pages to disk now, without waiting, so
/// the final flush finds most of them written (the disk works while the
/// copy goes on, as it would not with one flush at the end). Only a hint:
/// durability still comes from the flush.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `file` keeps open; it reads
    // no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Copy a plain data extent straight from its layer's file into the
/// target's with `copy_file_range`: the kernel moves the bytes page cache
/// to page cache, one copy instead of a read and a write through a buffer.
/// The target's writer places the clusters (in place, or new ones mapped
/// once filled). False (nothing done) for ranges that are not whole
/// clusters of the target, or a source that ends early (past its end it
/// reads as zeros, which only the buffered path writes). `src_len` is the
/// answering layer's data file length (it cannot change: the chain above
/// the base is ours while we hold the top's lock). Where the kernel cannot
/// copy between the two files (EXDEV across file systems, or a file system
/// without the call), the clusters already placed are filled by reading
/// and writing, and `in_kernel` is cleared for the extents after.
fn copy_in_kernel(
    chain: &Chain,
    st: &crate::engine::chain::BlockStatus,
    src_len: u64,
    target: &mut Target,
    out: &File,
    out_path: &Path,
    in_kernel: &mut bool,
) -> Result<bool> {
    let Some(src_host) = st.offset else {
        return Ok(false);
    };
    if src_host + st.length > src_len {
        return Ok(false);
    }
    let src = chain.layers()[st.depth].image.data_file()?;
    let src_path: &Path = &chain.layers()[st.depth].path;
    let mut copy = |runs: &[(u64, u64, u64)]| -> Result<()> {
        for &(g, host, n) in runs {
            let mut from = (src_host + g - st.start) as i64;
            let mut to = host as i64;
            let mut left = n as usize;
            while left > 0 {
                if !*in_kernel {
                    // The rest of this run; the runs after it come here too.
                    copy_buffered(
                        (src, src_path),
                        from as u64,
                        (out, out_path),
                        to as u64,
                        left,
                    )?;
                    break;
                }
                let copied = match nix::fcntl::copy_file_range(
                    src,
                    Some(&mut from),
                    out,
                    Some(&mut to),
                    left,
                ) {
                    Ok(n) => n,
                    Err(
                        nix::errno::Errno::EXDEV
                        | nix::errno::Errno::ENOSYS
                        | nix::errno::Errno::EOPNOTSUPP
                        | nix::errno::Errno::EINVAL,
                    ) => {
                        *in_kernel = false;
                        continue;
                    }
                    Err(e) => return Err(std::io::Error::from(e)).at(out_path),
                };
                if copied == 0 {
                    return Err(Error::invalid(out_path, "copy_file_range copied nothing"));
                }
                left -= copied;
            }
        }
        Ok(())
    };
    target.write_direct(st.start, st.length, &mut copy)
}

/// Copy `len` bytes from `src` at `from` to `out` at `to` through a buffer.
fn copy_buffered(
    (src, src_path): (&File, &Path),
    from: u64,
    (out, out_path): (&File, &Path),
    to: u64,
    len: usize,
) -> Result<()> {
    let mut buf = AlignedBuf::zeroed(len.min(CHUNK as usize));
    let mut done = 0usize;
    while done < len {
        let n = buf.len().min(len - done);
        src.read_exact_at(&mut buf[..n], from + done as u64)
            .at(src_path)?;
        out.write_all_at(&buf[..n], to + done as u64).at(out_path)?;
        done += n;
    }
    Ok(())
}
