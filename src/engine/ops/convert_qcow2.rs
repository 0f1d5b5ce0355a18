//! `convert -O qcow2`: a chain (or, with `-B`, its top layer over a new
//! backing) written as a fresh qcow2, front to back (QCOW2.md §6.3).
//!
//! Three stages run at once: this thread reads the source and decides what
//! each target cluster becomes; with `-c`, one worker per core compresses
//! the clusters of whole batches; one writer thread takes the batches back
//! in guest order and lays them out through [`StreamWriter`], so host
//! offsets grow with guest offsets as in `qemu-img convert` without `-W`.
//!
//! What each target cluster becomes (what qemu-img 10 does):
//! * Without `-B`: a cluster that holds any data is written whole; ranges the
//!   chain reports as zero or unallocated, and runs of zero bytes of at
//!   least `-S` bytes, are not data; a cluster without data stays
//!   unallocated. `-S 0` writes every cluster.
//! * With `-B`: only what the source's top layer allocates counts. Ranges
//!   it leaves to its backing are skipped (they stay unallocated and read
//!   through the new backing), zeros it allocates become ZERO clusters so
//!   the backing stays hidden. A cluster mixing data with skipped ranges
//!   takes those ranges from the new backing (QEMU's copy-on-write); one
//!   mixing zeros with skipped ranges is a ZERO cluster when the backing
//!   reads zeros there, else it is written out.

use std::collections::BTreeMap;
use std::path::Path;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::convert::{claim_destination, is_zero, poison_reused, ConvertOptions, TempOutput};
use super::create::qcow2_header;
use crate::engine::buf::AlignedBuf;
use crate::engine::chain::{classify_backing, BackingName, BlockStatus, Chain};
use crate::engine::error::{Error, Result};
use crate::engine::fault;
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::compress::Compressor;
use crate::engine::qcow2::header::CompressionType;
use crate::engine::qcow2::refcount::refcount_structure;
use crate::engine::qcow2::stream::StreamWriter;
use crate::engine::space::ensure_fits;

/// Guest bytes read per batch (at least one cluster). Large enough to keep
/// the syscalls few, small enough that cancel is seen within a few ms and
/// that two compression workers get work early.
const BATCH: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Compression threads: one per core, and at least QEMU's own limit of
/// concurrent compression threads (QCOW2_MAX_THREADS = 4). Measured on a
/// 2-core machine shared with other builds: 4 threads finished the 2 GiB
/// fixture in 15-16 s against 23-27 s with 2 (same CPU time: the scheduler
/// shares a busy machine by thread); on an idle machine the extra two cost
/// nothing but a few context switches.
const MIN_COMPRESS_THREADS: usize = 4;

/// What a sector of the source is, for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Left to the target's backing file (`-B` only).
    Skip,
    /// Reads as zeros.
    Zero,
    Data,
}

/// What a target cluster becomes.
#[derive(Debug)]
enum Out {
    Skip,
    Zero,
    /// Its bytes are in the batch buffer.
    Data,
    Compressed(Vec<u8>),
}

struct Batch {
    seq: u64,
    /// First guest cluster.
    first: u64,
    /// Guest bytes covered (progress).
    len: u64,
    out: Vec<Out>,
    buf: AlignedBuf,
}

/// The source and what the target needs to know about it.
struct Plan<'a> {
    chain: &'a Chain,
    /// `-B`: the target's backing chain.
    backing: Option<Chain>,
    /// Virtual size of the target (the source's, in whole sectors).
    size: u64,
    cs: u64,
    min_sparse: u64,
    /// Zero clusters can be written (qcow2 v3).
    zero_clusters: bool,
    /// `-c`: clusters are decided whole, as compressed writes need.
    compressed: bool,
}

pub fn convert_to_qcow2(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let t = &opts.target;
    let bad = |m: String| Error::invalid(dst, m);
    match (&t.backing, t.backing_format) {
        (Some(_), None) => {
            return Err(bad(
                "Use of backing file requires explicit backing format".into()
            ))
        }
        (None, Some(_)) => return Err(bad("-F needs a backing file (-B)".into())),
        _ => {}
    }
    if t.extended_l2 {
        return Err(bad(
            "cowshed convert does not write extended L2 entries (extended_l2=on)".into(),
        ));
    }
    let chain = Chain::open(src, opts.src_format)?;
    let size = chain.virtual_size().next_multiple_of(SECTOR);
    let header = qcow2_header(dst, t, size)?;
    let backing = match (&t.backing, t.backing_format) {
        (Some(name), Some(fmt)) => {
            let BackingName::Path(p) = classify_backing(dst, name) else {
                return Err(bad(format!(
                    "backing file '{name}' is a json: or protocol name; cowshed does not follow it"
                )));
            };
            let b = Chain::open(&p, Some(fmt))
                .map_err(|e| bad(format!("Could not open backing image '{name}': {e}")))?;
            Some(b)
        }
        _ => None,
    };
    let sources: Vec<&Chain> = std::iter::once(&chain).chain(&backing).collect();
    let _claim = claim_destination(dst, &sources, opts)?;
    let plan = Plan {
        chain: &chain,
        backing,
        size,
        cs: header.cluster_size(),
        min_sparse: opts.min_sparse / SECTOR * SECTOR,
        zero_clusters: header.version >= 3,
        compressed: opts.compress,
    };
    progress.set_total(size);

    let data_clusters = plan.data_cluster_bound(cancel)?;
    let cs = plan.cs;
    let l2_tables = size.div_ceil(header.l1_entry_span());
    // Header, L1, L2 tables, and the refcount structure counting it all.
    let counted = 1 + (l2_tables * 8).div_ceil(cs) + l2_tables + data_clusters;
    let (blocks, table) = refcount_structure(counted, cs, header.refcount_order);
    let metadata = counted - data_clusters + blocks + table;
    ensure_fits(dst, (data_clusters + metadata) * cs)?;

    let tmp = TempOutput::new(dst)?;
    let writer = StreamWriter::new(tmp.file(), dst, header.clone(), data_clusters)?;
    let compression = opts.compress.then_some(header.compression_type);
    run_pipeline(&plan, writer, compression, dst, progress, cancel)?;
    fault::point("convert.qcow2.finished");
    tmp.persist(opts, cancel)
}

impl Plan<'_> {
    /// How a block-status extent of the source counts for the target.
    fn class(&self, st: &BlockStatus) -> Class {
        match &self.backing {
            None if st.data => Class::Data,
            None => Class::Zero,
            Some(b) => {
                if st.depth > 0 {
                    Class::Skip
                } else if st.data {
                    Class::Data
                } else if st.start >= b.virtual_size() {
                    // Past the backing's end the target reads zeros anyway.
                    Class::Skip
                } else {
                    Class::Zero
                }
            }
        }
    }

    /// Block status capped so that an extent does not straddle the end of
    /// the target's backing (where zeros stop needing ZERO clusters).
    fn status(&self, pos: u64, end: u64) -> Result<BlockStatus> {
        let src = self.chain.virtual_size();
        if pos >= src {
            // The sector-rounded tail of an odd-sized raw source.
            return Ok(BlockStatus {
                start: pos,
                length: end - pos,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let mut max = end.min(src) - pos;
        if let Some(b) = &self.backing {
            let bs = b.virtual_size();
            if pos < bs {
                max = max.min(bs - pos);
            }
        }
        self.chain.block_status(pos, max)
    }

    /// Whole batches from `pos` (batch aligned) that leave nothing in the
    /// target: what the chain reports as zeros without `-B`, what the top
    /// leaves to the backing with it. Skipping them unread keeps a sparse
    /// 100 GiB disk from costing 100 000 batches.
    fn skippable(&self, pos: u64, batch_len: u64) -> Result<u64> {
        let st = self.status(pos, self.size)?;
        let nothing = match self.class(&st) {
            Class::Skip => true,
            Class::Zero => self.backing.is_none() && self.min_sparse > 0,
            Class::Data => false,
        };
        if !nothing {
            return Ok(0);
        }
        let mut end = pos + st.length / batch_len * batch_len;
        if self.compressed && self.backing.is_some() {
            // With -c -B the short last cluster is read whatever it holds.
            end = end.min((self.size - 1) / batch_len * batch_len);
        }
        Ok(end.saturating_sub(pos))
    }

    /// An upper bound of the data clusters the target will hold: every
    /// cluster touched by a range that may become data. Sizes the free-space
    /// check and the refcount table.
    fn data_cluster_bound(&self, cancel: &Cancel) -> Result<u64> {
        let cs = self.cs;
        if self.backing.is_none() && self.min_sparse == 0 {
            return Ok(self.size.div_ceil(cs));
        }
        let mut count = 0u64;
        // Clusters below this index are counted.
        let mut counted_to = 0u64;
        let mut pos = 0u64;
        let mut since_check = 0u64;
        while pos < self.size {
            let st = self.status(pos, self.size)?;
            let class = self.class(&st);
            let maybe_data = match class {
                Class::Data => true,
                Class::Zero => self.backing.is_some(),
                Class::Skip => false,
            };
            if maybe_data {
                let first = (pos / cs).max(counted_to);
                let end = (pos + st.length).div_ceil(cs);
                count += end.saturating_sub(first);
                counted_to = counted_to.max(end);
            }
            pos += st.length;
            since_check += 1;
            if since_check % 256 == 0 {
                cancel.check()?;
            }
        }
        // With -c the short last cluster is read whole whatever it holds.
        Ok(count + u64::from(self.compressed))
    }

    /// Read `[start, start + len)` (cluster aligned) into `b` and decide
    /// each cluster.
    fn fill(&self, b: &mut Batch, start: u64, classes: &mut Vec<Class>) -> Result<()> {
        let cs = self.cs;
        let end = (start + b.len).min(self.size);
        poison_reused(&mut b.buf);
        let nsec = (end - start).div_ceil(SECTOR) as usize;
        classes.clear();
        classes.resize(nsec, Class::Skip);
        let mut pos = start;
        while pos < end {
            let st = self.status(pos, end)?;
            let class = self.class(&st);
            let (lo, hi) = ((pos - start) as usize, (pos - start + st.length) as usize);
            if class == Class::Data {
                self.chain.read_extent(&st, &mut b.buf[lo..hi])?;
            } else {
                // Every byte is defined: `-S 0`, `-c` and v2 images write
                // zero ranges out as data, and this buffer still holds an
                // earlier batch. Skipped ranges written out are refilled
                // from the new backing later.
                b.buf[lo..hi].fill(0);
            }
            for c in &mut classes[lo / SECTOR as usize..hi.div_ceil(SECTOR as usize)] {
                // Data wins a shared sector, then zero.
                *c = match (*c, class) {
                    (Class::Data, _) | (_, Class::Data) => Class::Data,
                    (Class::Zero, _) | (_, Class::Zero) => Class::Zero,
                    _ => Class::Skip,
                };
            }
            pos += st.length;
        }
        let bytes = (end - start) as usize;
        // Past the disk's end, the short last cluster reads zeros.
        b.buf[bytes..bytes.next_multiple_of(cs as usize)].fill(0);
        if self.compressed {
            if self.min_sparse == 0 {
                zeros_as_data(classes);
            }
        } else {
            self.detect_zeros(start / SECTOR, &b.buf, classes);
        }

        b.out.clear();
        let per = (cs / SECTOR) as usize;
        for (k, secs) in classes.chunks(per).enumerate() {
            let base = start + k as u64 * cs;
            let at = k * cs as usize;
            let out = if self.compressed {
                self.decide_compressed(&mut b.buf, at, base, secs, per)?
            } else {
                self.decide(&mut b.buf, at, base, secs)?
            };
            let out = match out {
                Out::Zero if !self.zero_clusters => {
                    b.buf[at..at + cs as usize].fill(0);
                    Out::Data
                }
                o => o,
            };
            b.out.push(out);
        }
        Ok(())
    }

    /// Without `-c`: a cluster holding data is written whole, zeros from the
    /// source and, with `-B`, the new backing's bytes in the ranges the top
    /// leaves to it (QEMU's copy-on-write).
    fn decide(&self, buf: &mut [u8], at: usize, base: u64, secs: &[Class]) -> Result<Out> {
        let has = |c: Class| secs.contains(&c);
        let (data, zero, skip) = (has(Class::Data), has(Class::Zero), has(Class::Skip));
        let out = if data {
            Out::Data
        } else if !zero || self.backing.is_none() {
            // Nothing, or zeros a fresh image without backing reads anyway.
            Out::Skip
        } else if !skip || self.backing_reads_zeros(base, secs)? {
            Out::Zero
        } else {
            Out::Data
        };
        if matches!(out, Out::Data) {
            self.complete_cluster(buf, at, base, secs)?;
        }
        Ok(out)
    }

    /// With `-c`, as qemu-img convert does it: compressed clusters are
    /// written whole, so a cluster not covered by one uniform range of the
    /// source (and the short last cluster) is read whole through the source
    /// chain; a cluster of data is then dropped only if all of it is zero.
    fn decide_compressed(
        &self,
        buf: &mut [u8],
        at: usize,
        base: u64,
        secs: &[Class],
        per: usize,
    ) -> Result<Out> {
        let uniform = secs.len() == per && secs.iter().all(|&c| c == secs[0]);
        let zero_out = if self.backing.is_some() {
            Out::Zero
        } else {
            Out::Skip
        };
        if uniform && secs[0] == Class::Skip {
            return Ok(Out::Skip);
        }
        if uniform && secs[0] == Class::Zero {
            return Ok(zero_out);
        }
        if !uniform {
            self.read_through_source(buf, at, base, secs)?;
        }
        let end = (at + self.cs as usize).min(buf.len());
        if self.min_sparse > 0 && is_zero(&buf[at..end]) {
            return Ok(zero_out);
        }
        Ok(Out::Data)
    }

    /// Fill the non-data sectors of the cluster at `buf[at..]` from the
    /// source chain (zeros where it reads zeros).
    fn read_through_source(
        &self,
        buf: &mut [u8],
        at: usize,
        base: u64,
        secs: &[Class],
    ) -> Result<()> {
        for class in [Class::Zero, Class::Skip] {
            for (lo, hi) in runs(secs, class) {
                let s = at + lo * SECTOR as usize;
                let e = (at + hi * SECTOR as usize).min(buf.len());
                let from = base + lo as u64 * SECTOR;
                let dst = &mut buf[s..e];
                let src = self.chain.virtual_size();
                if class == Class::Skip && from < src {
                    let n = (dst.len() as u64).min(src - from) as usize;
                    self.chain.read_at(&mut dst[..n], from)?;
                    dst[n..].fill(0);
                } else {
                    dst.fill(0);
                }
            }
        }
        Ok(())
    }

    /// Runs of zero sectors inside data become zeros as qemu-img's
    /// `is_allocated_sectors_min` decides it, run of data by run of data:
    /// a data run's end is aligned up and a zero run's end aligned down to
    /// `pow2floor(-S)`; a zero run at the start of a run of data always
    /// counts, later ones only if at least `-S` long. `-S 0` writes zeros
    /// as data.
    fn detect_zeros(&self, first_sector: u64, buf: &[u8], classes: &mut [Class]) {
        if self.min_sparse == 0 {
            zeros_as_data(classes);
            return;
        }
        let min = (self.min_sparse / SECTOR) as usize;
        let align = 1usize << min.ilog2();
        let zero: Vec<bool> = (0..classes.len())
            .map(|i| {
                classes[i] == Class::Data && {
                    let lo = i * SECTOR as usize;
                    is_zero(&buf[lo..(lo + SECTOR as usize).min(buf.len())])
                }
            })
            .collect();
        let mut a = 0;
        while a < classes.len() {
            if classes[a] != Class::Data {
                a += 1;
                continue;
            }
            let mut b = a;
            while b < classes.len() && classes[b] == Class::Data {
                b += 1;
            }
            // One run of data [a, b), as QEMU's convert_co_write loops on it.
            let mut p = a;
            while p < b {
                let n = b - p;
                let min = min.min(n);
                let (data, first) = same_run(&zero, p, n, first_sector, align);
                if !data {
                    classes[p..p + first].fill(Class::Zero);
                    p += first;
                    continue;
                }
                let (mut used, mut checked) = (first, first);
                while checked < n {
                    let (data, len) =
                        same_run(&zero, p + checked, n - checked, first_sector, align);
                    checked += len;
                    if data {
                        used = checked;
                    } else if len >= min {
                        break;
                    }
                }
                p += used;
            }
            a = b;
        }
    }

    /// Does the target's backing read zeros in the skipped sectors of the
    /// cluster at `base`? (QEMU asks the block status, not the bytes.)
    fn backing_reads_zeros(&self, base: u64, secs: &[Class]) -> Result<bool> {
        let Some(b) = &self.backing else {
            return Ok(true);
        };
        for (lo, hi) in runs(secs, Class::Skip) {
            let (from, to) = (base + lo as u64 * SECTOR, base + hi as u64 * SECTOR);
            let mut pos = from;
            while pos < to.min(b.virtual_size()) {
                let st = b.block_status(pos, to.min(b.virtual_size()) - pos)?;
                if st.data {
                    return Ok(false);
                }
                pos += st.length;
            }
        }
        Ok(true)
    }

    /// Make the cluster at `buf[at..]` hold what the target must store:
    /// zero sectors cleared, skipped sectors copied from the new backing.
    fn complete_cluster(&self, buf: &mut [u8], at: usize, base: u64, secs: &[Class]) -> Result<()> {
        for (lo, hi) in runs(secs, Class::Zero) {
            let s = at + lo * SECTOR as usize;
            let e = (at + hi * SECTOR as usize).min(buf.len());
            buf[s..e].fill(0);
        }
        for (lo, hi) in runs(secs, Class::Skip) {
            let s = at + lo * SECTOR as usize;
            let e = (at + hi * SECTOR as usize).min(buf.len());
            let from = base + lo as u64 * SECTOR;
            let dst = &mut buf[s..e];
            match &self.backing {
                Some(b) if from < b.virtual_size() => {
                    let n = (dst.len() as u64).min(b.virtual_size() - from) as usize;
                    b.read_at(&mut dst[..n], from)?;
                    dst[n..].fill(0);
                }
                _ => dst.fill(0),
            }
        }
        Ok(())
    }
}

/// QEMU's `is_allocated_sectors`: whether sectors `[p, p + n)` start with
/// data, and how long that first run is, aligned to `align` sectors of the
/// guest (data runs end aligned up, zero runs aligned down; a short zero
/// tail counts as data).
fn same_run(zero: &[bool], p: usize, n: usize, first_sector: u64, align: usize) -> (bool, usize) {
    let z = zero[p];
    let mut i = 1;
    while i < n && zero[p + i] == z {
        i += 1;
    }
    if i == n {
        return (!z, n);
    }
    let tail = (first_sector as usize + p + i) & (align - 1);
    let mut z = z;
    if tail != 0 {
        if z && i <= tail {
            z = false;
        }
        if !z {
            i = (i + align - tail).min(n);
        } else {
            i -= tail;
        }
    }
    (!z, i)
}

/// `-S 0`: zeros are written out like data.
fn zeros_as_data(classes: &mut [Class]) {
    for c in classes.iter_mut().filter(|c| **c == Class::Zero) {
        *c = Class::Data;
    }
}

/// Index ranges `[lo, hi)` of the runs of `class` in `secs`.
fn runs(secs: &[Class], class: Class) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut i = 0;
    while i < secs.len() {
        if secs[i] == class {
            let s = i;
            while i < secs.len() && secs[i] == class {
                i += 1;
            }
            v.push((s, i));
        } else {
            i += 1;
        }
    }
    v
}

fn run_pipeline(
    plan: &Plan<'_>,
    mut writer: StreamWriter<'_>,
    compression: Option<CompressionType>,
    dst: &Path,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let cs = plan.cs;
    let batch_len = BATCH.max(cs);
    let workers = match compression {
        Some(_) => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .max(MIN_COMPRESS_THREADS),
        None => 0,
    };
    let buffers = 2 * workers.max(1) + 2;
    let (free_tx, free_rx) = unbounded::<Batch>();
    for _ in 0..buffers {
        let _ = free_tx.send(Batch {
            seq: 0,
            first: 0,
            len: 0,
            out: Vec::new(),
            buf: AlignedBuf::zeroed(batch_len as usize),
        });
    }
    let (work_tx, work_rx) = bounded::<Batch>(buffers);
    let (done_tx, done_rx) = bounded::<Batch>(buffers);

    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for _ in 0..workers {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            let kind = compression.unwrap_or(CompressionType::Deflate);
            handles.push(s.spawn(move || compress_worker(kind, cs as usize, rx, tx, dst)));
        }
        drop(work_rx);
        // Without workers the reader hands batches straight to the writer.
        let to_next = if workers == 0 {
            done_tx.clone()
        } else {
            work_tx.clone()
        };
        drop(work_tx);
        drop(done_tx);
        let writing = s.spawn(move || -> Result<u64> {
            let mut held = BTreeMap::new();
            let mut next = 0u64;
            for b in done_rx {
                held.insert(b.seq, b);
                while let Some(b) = held.remove(&next) {
                    cancel.check()?;
                    let mut k = 0;
                    while k < b.out.len() {
                        let gc = b.first + k as u64;
                        let at = k * cs as usize;
                        match &b.out[k] {
                            Out::Skip => {}
                            Out::Zero => writer.put_zero(gc)?,
                            Out::Data => {
                                // Consecutive data clusters go down together.
                                let mut n = 1;
                                while matches!(b.out.get(k + n), Some(Out::Data)) {
                                    n += 1;
                                }
                                let end = at + n * cs as usize;
                                writer.put_data_run(gc, &b.buf[at..end])?;
                                progress.add_copied((end - at) as u64);
                                k += n;
                                continue;
                            }
                            Out::Compressed(v) => {
                                writer.put_compressed(gc, v)?;
                                progress.add_copied(v.len() as u64);
                            }
                        }
                        k += 1;
                    }
                    progress.advance(b.len);
                    fault::point("convert.qcow2.batch_written");
                    next += 1;
                    // Err once the reader is done: the buffer is not needed.
                    let _ = free_tx.send(b);
                }
            }
            writer.finish()
        });
        let read = (|| -> Result<()> {
            let mut classes = Vec::new();
            let mut pos = 0u64;
            let mut seq = 0u64;
            while pos < plan.size {
                cancel.check()?;
                let skip = plan.skippable(pos, batch_len)?;
                if skip > 0 {
                    progress.advance(skip);
                    pos += skip;
                    continue;
                }
                // Err: a later stage stopped; its own error is reported.
                let Ok(mut b) = free_rx.recv() else {
                    return Ok(());
                };
                b.seq = seq;
                b.first = pos / cs;
                b.len = batch_len.min(plan.size - pos);
                plan.fill(&mut b, pos, &mut classes)?;
                if to_next.send(b).is_err() {
                    return Ok(());
                }
                fault::point("convert.qcow2.batch_read");
                pos += batch_len;
                seq += 1;
            }
            Ok(())
        })();
        drop(to_next);
        drop(free_rx);
        let mut result = read;
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::invalid(dst, "compression thread panicked")));
            result = result.and(r);
        }
        let written = writing
            .join()
            .unwrap_or_else(|_| Err(Error::invalid(dst, "writer thread panicked")));
        // A cancelled read also ends the writer early: report the cancel.
        result.and(written).map(|_| ())
    })
}

/// Compress the data clusters of each batch; keep those that shrink.
fn compress_worker(
    kind: CompressionType,
    cs: usize,
    rx: Receiver<Batch>,
    tx: Sender<Batch>,
    dst: &Path,
) -> Result<()> {
    let mut c = Compressor::new(kind, cs).map_err(|e| Error::io(dst, e))?;
    for mut b in rx {
        for (k, out) in b.out.iter_mut().enumerate() {
            if matches!(out, Out::Data) {
                if let Some(packed) = c.compress(&b.buf[k * cs..(k + 1) * cs]) {
                    *out = Out::Compressed(packed.to_vec());
                }
            }
        }
        if tx.send(b).is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // qemu-img convert -S 4k (alignment 8 sectors) of a disk whose first
    // 12 sectors hold data, then 91 zero sectors, then data: its map shows
    // data up to 8192 and zeros from 8192 to 49152 (sector 96).
    #[test]
    fn zero_runs_align_like_is_allocated_sectors() {
        let mut zero = vec![false; 12];
        zero.extend(vec![true; 91]);
        zero.extend(vec![false; 20]);
        assert_eq!(same_run(&zero, 0, zero.len(), 0, 8), (true, 16));
        assert_eq!(same_run(&zero, 16, zero.len() - 16, 0, 8), (false, 80));
        // A zero run shorter than its misalignment counts as data.
        let zero = [false, false, false, true, true, false, false, false];
        assert_eq!(same_run(&zero, 0, 8, 0, 8), (true, 8));
        // All the same: no alignment.
        assert_eq!(same_run(&[true; 5], 0, 5, 3, 8), (false, 5));
    }

    #[test]
    fn runs_of_a_class() {
        use Class::*;
        let secs = [Skip, Data, Data, Skip, Zero, Skip];
        assert_eq!(runs(&secs, Skip), vec![(0, 1), (3, 4), (5, 6)]);
        assert_eq!(runs(&secs, Data), vec![(1, 3)]);
    }
}
