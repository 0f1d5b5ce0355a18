//! A move across file systems copies: only the data extents of the source
//! (SEEK_DATA/SEEK_HOLE: a sparse image stays sparse), in the kernel where
//! it can (`copy_file_range`), made durable, then read back from the disk
//! (its cached pages dropped first) and compared with the source byte for
//! byte before anything may point at it. Mode, owner (where permitted)
//! and times go with it, as `mv` keeps them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::engine::buf::AlignedBuf;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::read_up_to;
use crate::engine::progress::{Cancel, Progress};
use crate::engine::raw::host_allocation;

/// Bytes copied (and compared) between two looks at the cancel flag.
const CHUNK: u64 = 8 << 20;

/// Bytes of data (not holes) in `path`: what a copy writes and reads back.
pub fn data_bytes(path: &Path) -> Result<u64> {
    let file = File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len();
    let mut pos = 0;
    let mut total = 0;
    while pos < len {
        let (data, n) = host_allocation(&file, path, pos, len - pos)?;
        if data {
            total += n;
        }
        pos += n;
    }
    Ok(total)
}

/// Copy the regular file `src` to the new file `dst` (never replacing one),
/// durably, and check the copy reads back equal.
pub fn copy_verified(src: &Path, dst: &Path, progress: &Progress, cancel: &Cancel) -> Result<()> {
    let from = File::open(src).at(src)?;
    let meta = from.metadata().at(src)?;
    if !meta.is_file() {
        return Err(Error::invalid(src, "is not a regular file"));
    }
    let to = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o7777)
        .open(dst)
        .at(dst)?;
    let len = meta.len();
    to.set_len(len).at(dst)?;
    let mut in_kernel = true;
    // Made when the kernel cannot copy between the two files itself.
    let mut buf = None;
    let mut pos = 0;
    while pos < len {
        let (data, n) = host_allocation(&from, src, pos, len - pos)?;
        if data {
            let mut at = pos;
            while at < pos + n {
                cancel.check()?;
                let step = (pos + n - at).min(CHUNK);
                copy_range((&from, src), (&to, dst), at, step, &mut in_kernel, &mut buf)?;
                progress.advance(step);
                progress.add_copied(step);
                fault::point("mv.copied");
                at += step;
            }
        }
        pos += n;
    }
    to.sync_all().at(dst)?;
    drop_cache(&to);
    verify_equal((&from, src), (&to, dst), len, progress, cancel)?;
    keep_owner_and_times(&to, dst, &meta)?;
    to.sync_all().at(dst)
}

fn copy_range(
    (from, src): (&File, &Path),
    (to, dst): (&File, &Path),
    at: u64,
    len: u64,
    in_kernel: &mut bool,
    buf: &mut Option<AlignedBuf>,
) -> Result<()> {
    let mut done = 0u64;
    while done < len {
        if *in_kernel {
            let (mut off_in, mut off_out) = ((at + done) as i64, (at + done) as i64);
            match nix::fcntl::copy_file_range(
                from,
                Some(&mut off_in),
                to,
                Some(&mut off_out),
                (len - done) as usize,
            ) {
                Ok(0) => {
                    return Err(Error::invalid(
                        src,
                        format!(
                            "the file ended early while it was copied (at {})",
                            at + done
                        ),
                    ))
                }
                Ok(n) => done += n as u64,
                // Across file systems (or on one without the call) the
                // bytes go through a buffer.
                Err(
                    nix::errno::Errno::EXDEV
                    | nix::errno::Errno::ENOSYS
                    | nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::EINVAL,
                ) => *in_kernel = false,
                Err(e) => return Err(Error::io(dst, e.into())),
            }
            continue;
        }
        let buf = buf.get_or_insert_with(|| AlignedBuf::zeroed(CHUNK as usize));
        let buf = &mut buf[..(len - done).min(CHUNK) as usize];
        let n = read_up_to(from, buf, at + done).at(src)?;
        if n < buf.len() {
            return Err(Error::invalid(
                src,
                format!(
                    "the file ended early while it was copied (at {})",
                    at + done
                ),
            ));
        }
        use std::os::unix::fs::FileExt;
        to.write_all_at(buf, at + done).at(dst)?;
        done += buf.len() as u64;
    }
    Ok(())
}

/// Ask the kernel to forget the copy's cached pages (written back by the
/// fsync before), so the comparison reads what the disk holds.
fn drop_cache(file: &File) {
    // SAFETY: a plain syscall on a descriptor `file` keeps open; it reads
    // no memory of ours. Only advice: an error changes nothing.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Compare `len` bytes of two files, skipping ranges that are holes in
/// both (they read as zeros in both).
fn verify_equal(
    (a, pa): (&File, &Path),
    (b, pb): (&File, &Path),
    len: u64,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    if b.metadata().at(pb)?.len() != len {
        return Err(Error::invalid(
            pb,
            "the copy's length differs from the source's",
        ));
    }
    let mut bufs = (
        AlignedBuf::zeroed(CHUNK as usize),
        AlignedBuf::zeroed(CHUNK as usize),
    );
    // Each file's current run (data or hole, and where it ends): asked
    // again only once passed, since SEEK_DATA/SEEK_HOLE walk the file
    // (on tmpfs, page by page: asking per chunk cost more than copying).
    let mut runs = [(false, 0u64); 2];
    let mut pos = 0;
    while pos < len {
        cancel.check()?;
        for (run, (f, p)) in runs.iter_mut().zip([(a, pa), (b, pb)]) {
            if run.1 <= pos {
                let (data, n) = host_allocation(f, p, pos, len - pos)?;
                *run = (data, pos + n);
            }
        }
        let [(da, ea), (db, eb)] = runs;
        let n = (ea.min(eb) - pos).min(CHUNK);
        if da || db {
            let (x, y) = (&mut bufs.0[..n as usize], &mut bufs.1[..n as usize]);
            // Both files at once, one on each core: the kernel's copies
            // out of the page cache (or the disk's reads) are the cost.
            let (rx, ry) = std::thread::scope(|s| {
                let other = s.spawn(|| read_up_to(b, y, pos));
                let mine = read_up_to(a, x, pos);
                (mine, other.join())
            });
            let ry = ry.map_err(|_| Error::invalid(pb, "internal: the reader thread panicked"))?;
            if rx.at(pa)? != x.len() || ry.at(pb)? != y.len() {
                return Err(Error::invalid(
                    pb,
                    "a file ended early while it was compared",
                ));
            }
            if x != y {
                let at = pos + x.iter().zip(y.iter()).take_while(|(p, q)| p == q).count() as u64;
                return Err(Error::invalid(
                    pb,
                    format!(
                        "the copy differs from '{}' at byte {at}: the disk did not keep what was \
                         written",
                        pa.display()
                    ),
                ));
            }
            if da {
                progress.advance(n);
            }
        }
        pos += n;
    }
    fault::point("mv.verified");
    Ok(())
}

fn keep_owner_and_times(to: &File, dst: &Path, meta: &std::fs::Metadata) -> Result<()> {
    // Only root may give a file away; others keep what they made, as mv.
    let _ = std::os::unix::fs::fchown(to, Some(meta.uid()), Some(meta.gid()));
    let times = std::fs::FileTimes::new()
        .set_accessed(meta.accessed().at(dst)?)
        .set_modified(meta.modified().at(dst)?);
    to.set_times(times).at(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_copy_is_equal_and_stays_sparse() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        {
            use std::os::unix::fs::FileExt;
            let f = File::create(&a).unwrap();
            f.set_len(64 << 20).unwrap();
            f.write_all_at(&[7u8; 100_000], 40 << 20).unwrap();
        }
        copy_verified(&a, &b, &Progress::new(), &Cancel::new()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
        assert!(blocks < 8 << 20, "the copy is not sparse: {blocks} bytes");
        // Never over an existing file.
        assert!(copy_verified(&a, &b, &Progress::new(), &Cancel::new()).is_err());
    }
}
