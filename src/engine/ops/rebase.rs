//! `rebase`: point a qcow2 image at another backing file (QCOW2.md §6.2).
//!
//! Safe mode keeps the guest view: wherever the image does not allocate a
//! cluster itself and the old and the new backing chains read differently,
//! the old chain's content is written into the image first; the header is
//! switched last, in one write, once the data is flushed. A cancel, an
//! error or a kill before that leaves the old backing in the header and
//! only data equal to what the old chain reads there, so the view is the
//! same. Unsafe mode (`-u`) rewrites the header only.
//!
//! What is written matches QEMU 10's `qemu-img rebase` (checked with
//! `qemu-img map`): whole clusters (subclusters with extended L2),
//! compared in chunks of at most 2 MiB that never cross an allocated one
//! or an L2 table's end; differing ones get the old content as data (zeros
//! included), except in chunks that start past the old backing's end,
//! where they become zero clusters.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::engine::buf::AlignedBuf;
use crate::engine::chain::{classify_backing, BackingName, Chain};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::{probe, Format};
use crate::engine::preflight::ensure_no_vm_users;
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::writer::backing::{check_fits, HeaderEditor};
use crate::engine::qcow2::Qcow2Writer;
use crate::engine::space;

#[derive(Debug, Clone, Default)]
pub struct RebaseOptions {
    /// The new backing file name, stored as given; empty: no backing.
    pub backing: String,
    /// The new backing's format (qemu-img's -F), required unless `backing`
    /// is empty, as QEMU 10 requires it.
    pub backing_format: Option<Format>,
    /// Change the header only (qemu-img rebase -u).
    pub unsafe_header_only: bool,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
}

/// QEMU's IO_BUF_SIZE: the largest range compared at once.
const CHUNK: u64 = 2 << 20;

/// Rebase `file` onto `opts.backing`.
pub fn rebase(
    file: &Path,
    opts: &RebaseOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let name = (!opts.backing.is_empty()).then_some(opts.backing.as_str());
    let format = match (name, opts.backing_format) {
        (Some(n), None) => {
            return Err(Error::invalid(
                file,
                format!(
                    "Could not change the backing file to '{n}': backing format must be specified"
                ),
            ))
        }
        (Some(_), Some(f)) => Some(f),
        (None, _) => None,
    };
    let format_name = format.map(Format::name);
    ensure_no_vm_users(file, &opts.vms)?;
    if opts.unsafe_header_only {
        let mut editor = HeaderEditor::open(file).map_err(|e| not_qcow2(file, e))?;
        // The new backing need not exist; if it does, it must not lead back
        // here.
        if let (Some(n), Some(f)) = (name, format) {
            match open_new(file, n, f) {
                Ok(chain) => refuse_cycle(file, n, &chain)?,
                Err(e @ Error::BackingCycle { .. }) => return Err(e),
                Err(_) => {}
            }
        }
        check_fits(editor.header(), file, name, format_name)?;
        return editor.set_backing(name, format_name);
    }

    let (mut w, new) = open_safe(file, name, format)?;
    let size = w.virtual_size();
    let cs = w.cluster_size();
    let old_size = w.backing_chain().map_or(0, Chain::virtual_size);
    let new_size = new.as_ref().map_or(0, Chain::virtual_size);
    let needed = needed_bytes(&mut w, new.as_ref(), size, cs, cancel)?;
    space::ensure_fits(file, needed)?;

    progress.set_total(size);
    // Shared with the reader thread while the writer writes.
    let old_reader = w.shared_backing_chain();
    compare_and_copy(
        &mut w,
        old_reader.as_deref(),
        new.as_ref(),
        (old_size, new_size),
        progress,
        cancel,
    )?;
    cancel.check()?;
    fault::point("rebase.before_header_switch");
    w.set_backing(name, format_name)?;
    fault::point("rebase.header_switched");
    Ok(())
}

/// The image (locked as QEMU's writer, with its old chain) and the new
/// chain, checked: no loop, and the new header fits.
fn open_safe(
    file: &Path,
    name: Option<&str>,
    format: Option<Format>,
) -> Result<(Qcow2Writer, Option<Chain>)> {
    // The lock first, then the metadata (the writer reads it after locking)
    // and the old chain.
    let mut w = Qcow2Writer::open(file).map_err(|e| not_qcow2(file, e))?;
    // What a safe rebase copies in is recorded in the image's enabled
    // bitmaps, as QEMU's writes are.
    w.keep_bitmaps(false);
    let new = match (name, format) {
        (Some(n), Some(f)) => {
            let chain = open_new(file, n, f)?;
            refuse_cycle(file, n, &chain)?;
            Some(chain)
        }
        _ => None,
    };
    check_fits(w.header(), file, name, format.map(Format::name))?;
    Ok((w, new))
}

/// How many bytes a safe rebase of `file` may add to it at most (what the
/// free-space check asks for); 0 for `-u`.
pub fn rebase_space_needed(file: &Path, opts: &RebaseOptions) -> Result<u64> {
    if opts.unsafe_header_only {
        return Ok(0);
    }
    let name = (!opts.backing.is_empty()).then_some(opts.backing.as_str());
    let (mut w, new) = open_safe(file, name, opts.backing_format.filter(|_| name.is_some()))?;
    let (size, cs) = (w.virtual_size(), w.cluster_size());
    needed_bytes(&mut w, new.as_ref(), size, cs, &Cancel::new())
}

/// Write into the image, cluster-wise, where the old and the new chain
/// differ (`differs`, a flag per cluster of the chunk at `pos`): the old
/// content, or zero clusters once past the old backing's end. Runs of
/// differing clusters are written at once, as QEMU's compare_buffers and
/// old_backing_eof split them.
/// A chunk the image does not allocate, to compare between the chains.
struct Job {
    pos: u64,
    n: u64,
    old_n: u64,
    new_n: u64,
    old_zero: bool,
    new_zero: bool,
    bufs: (AlignedBuf, AlignedBuf),
}

/// A compared chunk: the old chain's bytes and which clusters differ.
struct Compared {
    pos: u64,
    n: u64,
    bufs: (AlignedBuf, AlignedBuf),
    differs: Vec<bool>,
}

/// Chunks the image does not allocate are read from both chains and
/// compared on a reader thread while this one writes the differences of
/// the chunk before: reading and writing each keep a core busy (measured:
/// flatten of the 2 GiB fixture spent as long in preads as in pwrites).
/// Writes stay in disk order.
fn compare_and_copy(
    w: &mut Qcow2Writer,
    old: Option<&Chain>,
    new: Option<&Chain>,
    (old_size, new_size): (u64, u64),
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let size = w.virtual_size();
    // Compared and written unit by unit: with extended L2, QEMU copies
    // only the subclusters that differ, into the image's own clusters in
    // place (checked with `qemu-img map`); whole clusters compared from a
    // run's first subcluster would straddle two clusters and allocate both.
    let cs = w.unit_size();
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(1);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<Result<Compared>>(2);
    std::thread::scope(|s| {
        s.spawn(move || {
            for job in job_rx {
                if done_tx.send(compare(job, old, new, cs)).is_err() {
                    break;
                }
            }
        });
        let mut spare: Vec<(AlignedBuf, AlignedBuf)> = (0..3)
            .map(|_| {
                (
                    AlignedBuf::zeroed(CHUNK as usize),
                    AlignedBuf::zeroed(CHUNK as usize),
                )
            })
            .collect();
        let mut in_flight = 0usize;
        let write = |w: &mut Qcow2Writer, done: Result<Compared>, spare: &mut Vec<_>| {
            let c = done?;
            let copied = copy_differences(
                w,
                &c.bufs.0[..c.n as usize],
                &c.differs,
                c.pos,
                old_size,
                cs,
            )?;
            progress.add_copied(copied);
            fault::point("rebase.copied");
            spare.push(c.bufs);
            Ok::<(), Error>(())
        };
        let walked = (|| -> Result<()> {
            let mut pos = 0u64;
            while pos < size {
                cancel.check()?;
                let (allocated, n) = w.allocation_run(pos, (size - pos).min(CHUNK))?;
                if !allocated {
                    let old_n = old_size.saturating_sub(pos).min(n);
                    let new_n = new_size.saturating_sub(pos).min(n);
                    let old_zero = reads_zero(old, pos, old_n)?;
                    let new_zero = reads_zero(new, pos, new_n)?;
                    if !(old_zero && new_zero) {
                        let bufs = match spare.pop() {
                            Some(b) => b,
                            None => {
                                let done = done_rx.recv().map_err(|_| reader_gone(w))?;
                                in_flight -= 1;
                                write(w, done, &mut spare)?;
                                spare.pop().ok_or_else(|| reader_gone(w))?
                            }
                        };
                        let job = Job {
                            pos,
                            n,
                            old_n,
                            new_n,
                            old_zero,
                            new_zero,
                            bufs,
                        };
                        job_tx.send(job).map_err(|_| reader_gone(w))?;
                        in_flight += 1;
                    }
                }
                while let Ok(done) = done_rx.try_recv() {
                    in_flight -= 1;
                    write(w, done, &mut spare)?;
                }
                pos += n;
                progress.advance(n);
            }
            while in_flight > 0 {
                let done = done_rx.recv().map_err(|_| reader_gone(w))?;
                in_flight -= 1;
                write(w, done, &mut spare)?;
            }
            Ok(())
        })();
        drop(job_tx);
        walked
    })
}

fn reader_gone(w: &Qcow2Writer) -> Error {
    Error::invalid(w.path(), "internal: the compare thread stopped")
}

/// Read a job's chunk from both chains and mark the clusters that differ.
/// The two chains are read at once, on two threads: the kernel's copy out of
/// the page cache is nearly all a rebase costs when little differs (a
/// rebase of the fixture's overlay onto a raw copy of its base spent 90% of
/// its time in the kernel, on one core).
fn compare(job: Job, old: Option<&Chain>, new: Option<&Chain>, cs: u64) -> Result<Compared> {
    let Job {
        pos,
        n,
        old_n,
        new_n,
        old_zero,
        new_zero,
        mut bufs,
    } = job;
    let (o, nw) = (&mut bufs.0[..n as usize], &mut bufs.1[..n as usize]);
    let both = !old_zero && !new_zero && old_n > 0 && new_n > 0;
    let (read_old, read_new) = if both {
        std::thread::scope(|s| {
            let h = s.spawn(|| fill(new, nw, pos, new_n, new_zero));
            let r = fill(old, o, pos, old_n, old_zero);
            (r, h.join().unwrap_or_else(|_| Err(reader_panicked(pos))))
        })
    } else {
        (
            fill(old, o, pos, old_n, old_zero),
            fill(new, nw, pos, new_n, new_zero),
        )
    };
    read_old?;
    read_new?;
    let differs = o
        .chunks(cs as usize)
        .zip(nw.chunks(cs as usize))
        .map(|(x, y)| x != y)
        .collect();
    Ok(Compared {
        pos,
        n,
        bufs,
        differs,
    })
}

fn reader_panicked(pos: u64) -> Error {
    Error::invalid(
        "rebase",
        format!("internal: the reader of the chunk at 0x{pos:x} panicked"),
    )
}

fn copy_differences(
    w: &mut Qcow2Writer,
    old: &[u8],
    differs: &[bool],
    pos: u64,
    old_size: u64,
    cs: u64,
) -> Result<u64> {
    let n = old.len();
    let mut copied = 0u64;
    let cs = cs as usize;
    let mut old_eof = pos >= old_size;
    let mut i = 0usize;
    while i < differs.len() {
        let first = differs[i];
        let mut j = i + 1;
        while j < differs.len() && differs[j] == first {
            j += 1;
        }
        let (from, to) = (i * cs, (j * cs).min(n));
        if first {
            let at = pos + from as u64;
            if old_eof {
                w.zero_unallocated(at, (to - from) as u64)?;
            } else {
                w.write(&old[from..to], at)?;
                copied += (to - from) as u64;
            }
        }
        i = j;
        if pos + to as u64 >= old_size {
            old_eof = true;
        }
    }
    Ok(copied)
}

/// Does `[pos, pos + len)` of `chain` read as zeros, by its block status
/// alone? (`len` 0 or no chain: yes.)
fn reads_zero(chain: Option<&Chain>, pos: u64, len: u64) -> Result<bool> {
    let Some(chain) = chain else {
        return Ok(true);
    };
    let mut p = pos;
    while p < pos + len {
        let st = chain.block_status(p, pos + len - p)?;
        if st.data && !st.zero {
            return Ok(false);
        }
        p += st.length;
    }
    Ok(true)
}

/// `buf` = the chain's content at `pos` for `len` bytes, zeros after.
fn fill(chain: Option<&Chain>, buf: &mut [u8], pos: u64, len: u64, zero: bool) -> Result<()> {
    let len = len as usize;
    match chain {
        Some(c) if !zero && len > 0 => {
            c.read_at(&mut buf[..len], pos)?;
            buf[len..].fill(0);
        }
        _ => buf.fill(0),
    }
    Ok(())
}

/// An upper bound of what safe mode may add to the file: every cluster the
/// image does not allocate, below the old backing's end (v3), where the old or
/// the new chain does not read zeros; plus an L2 table for each table range
/// written to and refblocks to count all of it.
fn needed_bytes(
    w: &mut Qcow2Writer,
    new: Option<&Chain>,
    size: u64,
    cs: u64,
    cancel: &Cancel,
) -> Result<u64> {
    let old_size = w.backing_chain().map_or(0, Chain::virtual_size);
    let new_size = new.map_or(0, Chain::virtual_size);
    // Past the old backing's end differences become zero clusters, which
    // take no space; v2 has none and writes zero bytes there.
    let limit = if w.header().version >= 3 {
        size.min(old_size)
    } else {
        size
    };
    let l2_span = cs * (cs / 8);
    let mut clusters = 0u64;
    // Zero clusters past the old end need L2 tables too.
    let mut tables = if limit < size {
        (size - 1) / l2_span + 1 - limit / l2_span
    } else {
        0
    };
    let mut last_table = None;
    // Clusters before this offset are counted already.
    let mut counted = 0u64;
    let mut pos = 0u64;
    while pos < limit {
        cancel.check()?;
        let (allocated, n) = w.allocation_run(pos, (limit - pos).min(CHUNK))?;
        if !allocated {
            let mut p = pos;
            while p < pos + n {
                let mut step = pos + n - p;
                let mut nonzero = false;
                for (chain, end) in [(w.backing_chain(), old_size), (new, new_size)] {
                    if let Some(c) = chain.filter(|_| p < end) {
                        let st = c.block_status(p, step.min(end - p))?;
                        step = step.min(st.length);
                        nonzero |= st.data && !st.zero;
                    }
                }
                if nonzero {
                    let from = (p - p % cs).max(counted);
                    let to = (p + step).next_multiple_of(cs);
                    if to > from {
                        clusters += (to - from) / cs;
                        // An L2 table for each table's range touched.
                        let (first, last) = (from / l2_span, (to - 1) / l2_span);
                        tables += last + 1 - first - u64::from(last_table == Some(first));
                        last_table = Some(last);
                    }
                    counted = counted.max(to);
                }
                p += step;
            }
        }
        pos += n;
    }
    // Refblocks for everything new (they cover themselves too).
    let per_refblock = cs * 8 / u64::from(w.header().refcount_bits());
    let metadata = tables + (clusters + tables).div_ceil(per_refblock) + 1;
    Ok((clusters + metadata) * cs)
}

/// Open the new backing chain as the image will see it: a relative name
/// resolved against the image's directory.
fn open_new(file: &Path, name: &str, format: Format) -> Result<Chain> {
    let BackingName::Path(p) = classify_backing(file, name) else {
        return Err(Error::invalid(
            file,
            format!("'{name}' is a json: or protocol name; cowshed only rebases onto files"),
        ));
    };
    Chain::open(&p, Some(format)).map_err(|e| match e {
        e @ Error::BackingCycle { .. } => e,
        e => Error::invalid(
            file,
            format!("Could not open new backing file '{name}': {e}"),
        ),
    })
}

/// The new chain must not contain the image itself.
fn refuse_cycle(file: &Path, name: &str, chain: &Chain) -> Result<()> {
    let me = std::fs::metadata(file).at(file)?;
    for layer in chain.layers() {
        let m = layer.image.file().metadata().at(&layer.path)?;
        if (m.dev(), m.ino()) == (me.dev(), me.ino()) {
            return Err(Error::invalid(
                file,
                format!(
                    "cannot rebase onto '{name}': its backing chain contains this image ('{}'), \
                     which would make a loop",
                    layer.path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// A clearer error when the image is not qcow2 (only qcow2 records a
/// backing file).
fn not_qcow2(file: &Path, e: Error) -> Error {
    if !matches!(e, Error::Invalid { .. }) {
        return e;
    }
    match probe(file) {
        Ok(Format::Qcow2) | Err(_) => e,
        Ok(f) => Error::invalid(
            file,
            format!(
                "is a {} image; only qcow2 images have a backing file to rebase",
                f.name()
            ),
        ),
    }
}
