//! A fresh qcow2 written front to back, for `convert -O qcow2`.
//!
//! Clusters are handed out in increasing host order from one cursor, as
//! QEMU's allocator does on an empty image when writes arrive in guest order
//! (QCOW2.md §3.3, §6.3): header, refcount table, first refblock, L1, then
//! each L2 table just before the first cluster it maps, data and compressed
//! bytes after it. A refblock is placed at the cursor when the cursor enters
//! the range it covers, so it counts itself. Refcounts are kept in memory
//! for the ranges still being filled and written once complete; the L1, the
//! refcount table and the header are written last, so the file is a valid
//! image only when `finish` returns (it lives under a temporary name until
//! then anyway).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, MAX_REFTABLE_BYTES};
use super::l2::{l1_entry, Geometry, L2Entry};
use super::refcount::{encode_refcount, refcount_structure};
use crate::engine::error::{Error, IoContext, Result};

/// Sequential data is gathered up to this size before one `pwrite`.
const WRITE_BATCH: usize = 2 << 20;
/// Data at least this long is written straight from the caller's buffer.
const DIRECT_WRITE: usize = 64 << 10;

pub struct StreamWriter<'f> {
    file: &'f File,
    path: PathBuf,
    h: Header,
    geo: Geometry,
    cs: u64,
    l2_entries: u64,
    /// Refcount entries per refblock.
    per_block: u64,
    refcount_bits: u64,
    max_refcount: u64,
    /// Byte offset of each refblock (0 = none yet).
    reftable: Vec<u64>,
    l1: Vec<u64>,
    /// The L2 table being filled: (L1 index, host offset, entries).
    l2: Option<(u64, u64, Vec<u64>)>,
    /// Next free cluster index.
    cursor: u64,
    /// Where the next compressed bytes may go: the end of the last ones,
    /// inside a cluster they only partly fill (byte-packed, as QEMU packs
    /// them).
    compressed_end: Option<u64>,
    /// Counts of the refblock ranges not yet written, by reftable index.
    counts: BTreeMap<u64, Vec<u64>>,
    /// Ranges whose refblock is written.
    written: BTreeSet<u64>,
    /// Data waiting to be written at `pending_at`.
    pending: Vec<u8>,
    pending_at: u64,
    /// End of the last byte written anywhere.
    written_end: u64,
}

impl<'f> StreamWriter<'f> {
    /// Start an image with header `h` (layout fields are set here) in the
    /// empty `file`. `max_data_clusters` bounds the data clusters that will
    /// be written; the refcount table is sized for it once and for all.
    pub fn new(file: &'f File, path: &Path, mut h: Header, max_data_clusters: u64) -> Result<Self> {
        let cs = h.cluster_size();
        let geo = Geometry {
            cluster_bits: h.cluster_bits,
            extended: h.has_extended_l2(),
            external_data: false,
            version: h.version,
        };
        if geo.extended {
            return Err(Error::invalid(
                path,
                "cowshed convert does not write extended L2 entries (extended_l2=on)",
            ));
        }
        let l1_size = (h.size & !511).div_ceil(h.l1_entry_span());
        if l1_size * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::invalid(
                path,
                "Image is too big for this cluster size (L1 table would exceed 32 MiB)",
            ));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let refcount_bits = u64::from(h.refcount_bits());
        let per_block = cs * 8 / refcount_bits;
        // Everything but the refcount structures, then those: refblocks
        // also cover themselves and the table.
        let clusters = 1 + l1_clusters + l1_size + max_data_clusters + 2;
        let (_, table_clusters) = refcount_structure(clusters, cs, h.refcount_order);
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                path,
                "the refcount table this image needs would exceed 8 MiB; use a larger cluster size",
            ));
        }
        h.refcount_table_offset = cs;
        h.refcount_table_clusters = table_clusters as u32;
        h.l1_size = l1_size as u32;
        let mut w = StreamWriter {
            file,
            path: path.to_path_buf(),
            geo,
            cs,
            l2_entries: h.l2_entries(),
            per_block,
            refcount_bits,
            max_refcount: if refcount_bits == 64 {
                u64::MAX
            } else {
                (1 << refcount_bits) - 1
            },
            reftable: vec![0; (table_clusters * cs / 8) as usize],
            l1: vec![0; l1_size as usize],
            l2: None,
            cursor: 1 + table_clusters,
            compressed_end: None,
            counts: BTreeMap::new(),
            written: BTreeSet::new(),
            pending: Vec::with_capacity(WRITE_BATCH),
            pending_at: 0,
            written_end: 0,
            h,
        };
        for c in 0..1 + table_clusters {
            w.count(c)?;
        }
        for c in 0..1 + table_clusters {
            w.ensure_refblock(c)?;
        }
        if l1_size > 0 {
            w.h.l1_table_offset = w.alloc_run(l1_clusters)? * cs;
        }
        Ok(w)
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// Guest clusters from `gc` on hold `data` (whole clusters). Runs of
    /// clusters that land next to each other on disk are written straight
    /// from `data`, in one call each.
    pub fn put_data_run(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs as usize;
        debug_assert_eq!(data.len() % cs, 0);
        // (host offset, index in data) of the run being gathered.
        let mut run: Option<(u64, usize)> = None;
        for k in 0..data.len() / cs {
            let g = gc + k as u64;
            self.l2_for(g)?;
            let host = self.alloc_run(1)? * self.cs;
            self.set_entry(g, self.geo.data_entry(host));
            match run {
                Some((h, s)) if h + (k * cs - s) as u64 == host => {}
                Some((h, s)) => {
                    self.write_large(h, &data[s..k * cs])?;
                    run = Some((host, k * cs));
                }
                None => run = Some((host, k * cs)),
            }
        }
        if let Some((h, s)) = run {
            self.write_large(h, &data[s..])?;
        }
        Ok(())
    }

    /// Guest cluster `gc` holds compressed bytes (shorter than a cluster).
    pub fn put_compressed(&mut self, gc: u64, data: &[u8]) -> Result<()> {
        debug_assert!(!data.is_empty() && (data.len() as u64) < self.cs);
        self.l2_for(gc)?;
        let at = self.alloc_bytes(data.len() as u64)?;
        self.write(at, data)?;
        let desc = self.geo.compressed_descriptor(at, data.len() as u64);
        self.set_entry(gc, L2Entry::compressed(desc));
        Ok(())
    }

    /// Guest cluster `gc` reads as zeros whatever the backing holds.
    pub fn put_zero(&mut self, gc: u64) -> Result<()> {
        if self.h.version < 3 {
            return Err(Error::invalid(
                &self.path,
                "internal: zero clusters need a version 3 image",
            ));
        }
        self.l2_for(gc)?;
        self.set_entry(gc, self.geo.zero_entry(0));
        Ok(())
    }

    /// Write the remaining tables and the header. Returns the file length.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_l2()?;
        self.flush_pending()?;
        let regions: Vec<u64> = self.counts.keys().copied().collect();
        for r in regions {
            self.write_refblock(r)?;
        }
        let mut table = Vec::with_capacity(self.reftable.len() * 8);
        for e in &self.reftable {
            table.extend_from_slice(&e.to_be_bytes());
        }
        self.write_now(self.cs, &table)?;
        if !self.l1.is_empty() {
            let mut l1 = Vec::with_capacity(self.l1.len() * 8);
            for e in &self.l1 {
                l1.extend_from_slice(&e.to_be_bytes());
            }
            self.write_now(self.h.l1_table_offset, &l1)?;
        }
        let mut h = self.h.clone();
        let cluster0 = h.to_cluster(&self.path)?;
        self.write_now(0, &cluster0)?;
        // Compressed bytes may end inside a sector; QEMU reads whole ones.
        let len = self.written_end.next_multiple_of(512);
        self.file.set_len(len).at(&self.path)?;
        Ok(len)
    }

    fn set_entry(&mut self, gc: u64, entry: L2Entry) {
        if let Some((_, _, t)) = &mut self.l2 {
            self.geo
                .set_entry_at(t, (gc % self.l2_entries) as usize, entry);
        }
    }

    /// Make the L2 table covering guest cluster `gc` the current one,
    /// allocating it at the cursor the first time.
    fn l2_for(&mut self, gc: u64) -> Result<()> {
        let idx = gc / self.l2_entries;
        if matches!(&self.l2, Some((i, _, _)) if *i == idx) {
            return Ok(());
        }
        self.flush_l2()?;
        if idx as usize >= self.l1.len() || self.l1[idx as usize] != 0 {
            return Err(Error::invalid(
                &self.path,
                format!("internal: guest cluster {gc} written out of order"),
            ));
        }
        let host = self.alloc_run(1)? * self.cs;
        self.l1[idx as usize] = l1_entry(host);
        self.l2 = Some((idx, host, vec![0; self.l2_entries as usize]));
        Ok(())
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((_, host, t)) = self.l2.take() {
            let mut b = Vec::with_capacity(t.len() * 8);
            for e in &t {
                b.extend_from_slice(&e.to_be_bytes());
            }
            self.write_now(host, &b)?;
        }
        Ok(())
    }

    /// Add one reference to cluster `c`.
    fn count(&mut self, c: u64) -> Result<()> {
        let per_block = self.per_block;
        if self.written.contains(&(c / per_block)) {
            return Err(Error::invalid(
                &self.path,
                format!("internal: cluster {c} counted after its refblock was written"),
            ));
        }
        let counts = self
            .counts
            .entry(c / per_block)
            .or_insert_with(|| vec![0; per_block as usize]);
        let n = &mut counts[(c % per_block) as usize];
        if *n == self.max_refcount {
            return Err(Error::invalid(
                &self.path,
                format!("internal: refcount overflow at cluster {c}"),
            ));
        }
        *n += 1;
        Ok(())
    }

    fn refcount(&self, c: u64) -> u64 {
        self.counts
            .get(&(c / self.per_block))
            .map_or(0, |v| v[(c % self.per_block) as usize])
    }

    fn has_refblock(&self, c: u64) -> bool {
        self.reftable
            .get((c / self.per_block) as usize)
            .is_some_and(|&o| o != 0)
    }

    /// Give the range covering cluster `c` a refblock, at the cursor. When
    /// that spot lies in another range without a refblock, that range gets
    /// one first (QEMU's rule, as in `create`).
    fn ensure_refblock(&mut self, c: u64) -> Result<()> {
        let r = (c / self.per_block) as usize;
        if r >= self.reftable.len() {
            return Err(Error::invalid(
                &self.path,
                "internal: the refcount table was sized too small",
            ));
        }
        if self.reftable[r] != 0 {
            return Ok(());
        }
        let b = self.cursor;
        self.cursor += 1;
        self.reftable[r] = b * self.cs;
        self.count(b)?;
        self.ensure_refblock(b)
    }

    /// `k` contiguous clusters at the cursor, each counted once.
    fn alloc_run(&mut self, k: u64) -> Result<u64> {
        loop {
            let start = self.cursor;
            match (start..start + k).find(|&c| !self.has_refblock(c)) {
                None => break,
                Some(c) => self.ensure_refblock(c)?,
            }
        }
        let start = self.cursor;
        self.cursor += k;
        for c in start..start + k {
            self.count(c)?;
        }
        self.write_done_refblocks()?;
        Ok(start)
    }

    /// Room for `n` compressed bytes, as QEMU's `qcow2_alloc_bytes` finds
    /// it: right after the previous compressed bytes while they fit in that
    /// cluster (even when other clusters were allocated since), running on
    /// into a new cluster when that one is the next on disk, else at the
    /// start of a new cluster. Every cluster the bytes touch gains one
    /// reference; a cluster whose refcount is at its maximum takes no more.
    fn alloc_bytes(&mut self, n: u64) -> Result<u64> {
        let cs = self.cs;
        let open = self
            .compressed_end
            .filter(|&p| self.refcount(p / cs) < self.max_refcount);
        let start = match open {
            Some(p) if cs - p % cs >= n => {
                self.count(p / cs)?;
                p
            }
            _ => {
                let fresh = self.alloc_run(1)?;
                match open {
                    Some(p) if p.div_ceil(cs) == fresh => {
                        self.count(p / cs)?;
                        p
                    }
                    _ => fresh * cs,
                }
            }
        };
        let end = start + n;
        self.compressed_end = (end % cs != 0).then_some(end);
        Ok(start)
    }

    /// Write the refblocks of ranges no future allocation can touch: those
    /// behind the cursor, except the one holding the open compressed
    /// cluster.
    fn write_done_refblocks(&mut self) -> Result<()> {
        // The last cluster handed out may still take compressed bytes.
        let first_open = self.cursor.saturating_sub(1) / self.per_block;
        let keep = self.compressed_end.map(|p| p / self.cs / self.per_block);
        let done: Vec<u64> = self
            .counts
            .keys()
            .copied()
            .take_while(|&r| r < first_open)
            .filter(|&r| Some(r) != keep)
            .collect();
        for r in done {
            self.write_refblock(r)?;
        }
        Ok(())
    }

    fn write_refblock(&mut self, r: u64) -> Result<()> {
        let Some(counts) = self.counts.remove(&r) else {
            return Ok(());
        };
        self.written.insert(r);
        let at = self.reftable[r as usize];
        if at == 0 {
            return Err(Error::invalid(
                &self.path,
                "internal: counted clusters without a refblock",
            ));
        }
        let mut block = vec![0u8; self.cs as usize];
        for (i, &n) in counts.iter().enumerate().filter(|(_, &n)| n != 0) {
            encode_refcount(&mut block, 0, i as u64, self.refcount_bits, n);
        }
        self.write_now(at, &block)
    }

    /// Queue sequential data; anything else is written at once.
    fn write(&mut self, at: u64, data: &[u8]) -> Result<()> {
        if self.pending.is_empty() || self.pending_at + self.pending.len() as u64 != at {
            self.flush_pending()?;
            self.pending_at = at;
        }
        self.pending.extend_from_slice(data);
        if self.pending.len() >= WRITE_BATCH {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Writes of 64 KiB or more skip the gathering buffer: copying into it
    /// cost more than the syscalls it saves (perf: the kernel's copy from
    /// the 2 MiB buffer took 3.7x qemu-img's time for the same bytes).
    fn write_large(&mut self, at: u64, data: &[u8]) -> Result<()> {
        if data.len() < DIRECT_WRITE {
            return self.write(at, data);
        }
        self.flush_pending()?;
        self.write_now(at, data)
    }

    fn flush_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        self.write_now(self.pending_at, &data)?;
        self.pending = data;
        self.pending.clear();
        Ok(())
    }

    fn write_now(&mut self, at: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, at).at(&self.path)?;
        self.written_end = self.written_end.max(at + data.len() as u64);
        Ok(())
    }
}
