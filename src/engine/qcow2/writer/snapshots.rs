//! Internal snapshots: create, apply and delete, each as one switch from
//! the image's metadata to a next generation built beside it.
//!
//! QEMU raises and drops refcounts in place and fixes the COPIED flags of
//! the shared L2 tables in place (`qcow2_update_snapshot_refcount`). A crash
//! between the refcount raise and the L2 rewrite then leaves data clusters
//! flagged COPIED with a refcount of 2, which `qemu-img check` counts as
//! corruption (and the writer's pre-flight refuses): the flag and the
//! refcount live in different clusters, and no order of in-place writes
//! keeps them agreeing. So here nothing the current metadata uses is
//! written before the switch:
//! - the refcount blocks that change are copied, changed in memory, and
//!   written to new clusters with a new refcount table;
//! - an active L2 table whose COPIED flags change is copied too (a table
//!   only snapshots use is fixed in place: QEMU reads COPIED only through
//!   the active L1), and the active L1 moves to new clusters;
//! - the snapshot table is written anew, as QEMU writes it;
//! - after a flush, one write of header bytes 24..72 (size, L1, refcount
//!   table, snapshot table: adjacent fields) switches to all of it at once.
//!
//! A crash before the switch leaves the image as it was (the new clusters
//! are free in it: not even leaked); after it, the next generation is
//! complete and durable. The clusters only the old generation used are
//! free in the new one and get their space back last.
//!
//! The result is QEMU's layout but for where tables sit: a new snapshot
//! keeps the L1 table the image had (the image gets the copy), and the L2
//! tables the image alone used are copied for it rather than shared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt;

use super::super::be64_table;
use super::super::header::{autoclear, MAX_L1_BYTES};
use super::super::l2::{l1_entry, l1_table_offset, L2Entry};
use super::super::refcount::{decode_refcount, encode_refcount, Refcounts};
use super::super::snapshot::{encode_table, read_snapshots, Snapshot};
use super::backing::write_header;
use super::Qcow2Writer;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;

/// The image after the operation, as far as it differs from the image now.
#[derive(Default)]
pub(super) struct NextGen {
    /// Copies of the refcount blocks that change, by refcount table index.
    pub(super) blocks: BTreeMap<u64, Vec<u8>>,
    /// Where each copied block is written.
    pub(super) block_at: HashMap<u64, u64>,
    /// The new refcount table: (offset, clusters).
    pub(super) reftable: Option<(u64, u64)>,
    /// L2 tables written before the switch: copies in new clusters, or
    /// tables only snapshots use, fixed in place. Both are written at once
    /// (neither is anything the current metadata relies on), so that only
    /// refcount blocks are held in memory.
    tables: HashSet<u64>,
    /// Other clusters written before the switch: (offset, bytes).
    pub(super) writes: Vec<(u64, Vec<u8>)>,
    /// Clusters whose refcount dropped to 0.
    pub(super) freed: Vec<u64>,
}

/// The header fields the switch writes (bytes 24..72 but the refcount
/// table, which the generation brings).
#[derive(Debug, Clone, Copy)]
struct Switch {
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    nb_snapshots: u32,
    snapshots_offset: u64,
}

impl Qcow2Writer {
    /// The image's internal snapshots.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let len = self.file.metadata().at(&self.path)?.len();
        read_snapshots(&self.file, &self.path, &self.h, len)
    }

    /// Take a disk-only snapshot named `name` with id `id` at `date`
    /// (seconds, nanoseconds), as `qemu-img snapshot -c` does.
    pub fn snapshot_create(
        &mut self,
        id: &[u8],
        name: &[u8],
        date: (u32, u32),
    ) -> Result<Snapshot> {
        self.snapshot_prologue()?;
        let mut snaps = self.snapshots()?;
        if snaps.len() >= super::super::header::MAX_SNAPSHOTS as usize {
            return Err(Error::invalid(
                &self.path,
                "File too large (65536 snapshots at most)",
            ));
        }
        self.ensure_room(&[], &snaps)?;
        let mut g = NextGen::default();
        let old_l1 = self.l1.clone();
        // The snapshot keeps the L1 table where it is: one more path to
        // every table and cluster it maps.
        self.add_paths(&mut g, &old_l1, 1)?;
        let active = tables_of(&old_l1);
        let new_l1 = self.settle_active(&mut g, &old_l1, &active)?;
        let l1_offset = self.place_l1(&mut g, &new_l1)?;
        let sn = Snapshot::disk_only(
            id,
            name,
            (self.h.l1_table_offset, self.h.l1_size),
            self.virtual_size(),
            date,
        );
        snaps.push(sn.clone());
        let (nb_snapshots, snapshots_offset) = self.replace_snapshot_table(&mut g, &snaps)?;
        self.commit_generation(
            g,
            Switch {
                size: self.h.size,
                l1_size: self.h.l1_size,
                l1_offset,
                nb_snapshots,
                snapshots_offset,
            },
            new_l1,
        )?;
        Ok(sn)
    }

    /// Make the image read as snapshot `index` (of [`Self::snapshots`])
    /// does, with its disk size, as `qemu-img snapshot -a` does; what the
    /// image held that no snapshot keeps is freed.
    pub fn snapshot_apply(&mut self, index: usize) -> Result<()> {
        self.snapshot_prologue()?;
        let snaps = self.snapshots()?;
        let Some(sn) = snaps.get(index) else {
            return Err(Error::invalid(&self.path, "internal: no such snapshot"));
        };
        let size = sn.disk_size.unwrap_or(self.virtual_size());
        if size != self.virtual_size() && self.h.version < 3 {
            return Err(Error::invalid(
                &self.path,
                "Can't resize a v2 image which has snapshots",
            ));
        }
        let sn_l1 = self.read_snapshot_l1(sn)?;
        self.ensure_room(&sn_l1, &[])?;
        let mut g = NextGen::default();
        // Raises first, as QEMU does: a refcount at its maximum refuses
        // here as it does there.
        self.add_paths(&mut g, &sn_l1, 1)?;
        let old_l1 = self.l1.clone();
        self.add_paths(&mut g, &old_l1, -1)?;
        self.add_range(
            &mut g,
            self.h.l1_table_offset,
            u64::from(self.h.l1_size) * 8,
            -1,
        )?;
        let len = sn_l1.len().max(old_l1.len());
        let mut entries = sn_l1;
        entries.resize(len, 0);
        let new_l1 = self.settle_active(&mut g, &entries, &tables_of(&old_l1))?;
        let l1_offset = self.place_l1(&mut g, &new_l1)?;
        self.commit_generation(
            g,
            Switch {
                size,
                l1_size: len as u32,
                l1_offset,
                nb_snapshots: self.h.nb_snapshots,
                snapshots_offset: self.h.snapshots_offset,
            },
            new_l1,
        )
    }

    /// Drop snapshot `index` (of [`Self::snapshots`]): its entry, its L1
    /// table, and what only it kept, as `qemu-img snapshot -d` does.
    pub fn snapshot_delete(&mut self, index: usize) -> Result<()> {
        self.snapshot_prologue()?;
        let mut snaps = self.snapshots()?;
        if index >= snaps.len() {
            return Err(Error::invalid(&self.path, "internal: no such snapshot"));
        }
        let sn = snaps.remove(index);
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        self.ensure_room(&[], &snaps)?;
        let mut g = NextGen::default();
        self.add_paths(&mut g, &sn_l1, -1)?;
        self.add_range(&mut g, sn.l1_table_offset, u64::from(sn.l1_size) * 8, -1)?;
        let old_l1 = self.l1.clone();
        let new_l1 = self.settle_active(&mut g, &old_l1, &tables_of(&old_l1))?;
        let l1_offset = if new_l1 == old_l1 {
            self.h.l1_table_offset
        } else {
            self.add_range(
                &mut g,
                self.h.l1_table_offset,
                u64::from(self.h.l1_size) * 8,
                -1,
            )?;
            self.place_l1(&mut g, &new_l1)?
        };
        let (nb_snapshots, snapshots_offset) = self.replace_snapshot_table(&mut g, &snaps)?;
        self.commit_generation(
            g,
            Switch {
                size: self.h.size,
                l1_size: self.h.l1_size,
                l1_offset,
                nb_snapshots,
                snapshots_offset,
            },
            new_l1,
        )
    }

    /// What every snapshot operation needs first: nothing deferred left
    /// in memory, no external data file (QEMU: "Operation not supported"),
    /// and autoclear bits this writer does not keep consistent cleared.
    /// Persistent bitmaps stay: a snapshot's metadata does not change what
    /// the guest sees, so they stay true (QEMU keeps them too). Bitmaps a
    /// program without bitmap support wrote past (their autoclear bit off)
    /// lose their extension, as QEMU's writable open drops it (their
    /// clusters leak there too).
    fn snapshot_prologue(&mut self) -> Result<()> {
        if self.data.is_some() || self.h.has_data_file() {
            return Err(Error::invalid(
                &self.path,
                "Operation not supported (images with an external data file have no internal \
                 snapshots)",
            ));
        }
        self.flush_metadata()?;
        let keep = autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        let stale = self.h.autoclear_features & autoclear::BITMAPS == 0;
        if self.h.version >= 3 && self.h.extensions.bitmaps.is_some() && stale {
            let mut h = self.h.clone();
            h.autoclear_features &= keep;
            h.extensions.bitmaps = None;
            write_header(&self.file, &self.path, &mut h)?;
            self.h = h;
        }
        if self.h.version >= 3 && self.h.autoclear_features & !keep != 0 {
            self.h.autoclear_features &= keep;
            self.h.patch_autoclear(&self.file, &self.path)?;
        }
        Ok(())
    }

    /// Refuse up front, with nothing written, when the file system cannot
    /// take the most an operation writes to new clusters: a copy of every
    /// L2 table the active L1 (and `other_l1`) points at, an L1 table, a
    /// snapshot table for `snaps` and one more, and the whole refcount
    /// structure anew.
    fn ensure_room(&self, other_l1: &[u64], snaps: &[Snapshot]) -> Result<()> {
        let tables = self
            .l1
            .iter()
            .chain(other_l1)
            .filter(|&&e| l1_table_offset(e) != 0)
            .count() as u64;
        let l1 = (self.l1.len().max(other_l1.len()) as u64 * 8).div_ceil(self.cs);
        let table: u64 = snaps.iter().map(|s| s.entry_bytes).sum::<u64>() + 64 + 2 * 65536;
        let refcounts = self.refs.table().iter().filter(|&&e| e != 0).count() as u64
            + u64::from(self.h.refcount_table_clusters);
        // Headroom for refcount blocks the new clusters themselves need.
        let clusters = tables + l1 + table.div_ceil(self.cs) + refcounts * 2 + 4;
        crate::engine::space::ensure_fits(&self.path, clusters * self.cs)
    }

    /// A snapshot's L1 table, checked as QEMU checks it before use.
    pub(super) fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        let len = self.file.metadata().at(&self.path)?.len();
        if bytes > MAX_L1_BYTES {
            return Err(Error::invalid(&self.path, "Snapshot L1 table too large"));
        }
        if sn.l1_table_offset % self.cs != 0
            || sn
                .l1_table_offset
                .checked_add(bytes)
                .is_none_or(|end| end > len && bytes > 0)
        {
            return Err(Error::invalid(
                &self.path,
                "Snapshot L1 table offset invalid",
            ));
        }
        self.read_table(sn.l1_table_offset, sn.l1_size as usize)
    }

    fn read_table(&self, offset: u64, entries: usize) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; entries * 8];
        self.file.read_exact_at(&mut raw, offset).at(&self.path)?;
        Ok(be64_table(&raw))
    }

    /// An L2 table as the next generation has it.
    pub(super) fn table_next(&self, offset: u64) -> Result<Vec<u64>> {
        if offset % self.cs != 0 {
            return Err(Error::invalid(
                &self.path,
                format!("L2 table offset 0x{offset:x} unaligned"),
            ));
        }
        self.read_table(offset, (self.cs / 8) as usize)
    }

    /// The host clusters an L2 entry holds a reference to (word 0; the
    /// subcluster bitmap of extended L2 does not matter here).
    fn referenced(&self, entry: L2Entry) -> Result<std::ops::Range<u64>> {
        let cs = self.cs;
        if let Some(desc) = entry.compressed_descriptor() {
            let (host, span) = self.geo.compressed_span(desc);
            return Ok(host / cs..(host + span - 1) / cs + 1);
        }
        let host = entry.host();
        if host == 0 {
            return Ok(0..0);
        }
        if host % cs != 0 {
            return Err(Error::invalid(
                &self.path,
                format!("Cluster allocation offset 0x{host:x} unaligned"),
            ));
        }
        Ok(host / cs..host / cs + 1)
    }

    /// One path more (`delta` 1) or less (-1) from an L1 table to every L2
    /// table it points at and every cluster those map, as QEMU's
    /// `qcow2_update_snapshot_refcount` counts them (and `qemu-img check`
    /// recounts them): entries first, then the table.
    pub(super) fn add_paths(&mut self, g: &mut NextGen, l1: &[u64], delta: i64) -> Result<()> {
        for &e in l1 {
            let t = l1_table_offset(e);
            if t == 0 {
                continue;
            }
            let table = self.table_next(t)?;
            for i in 0..table.len() / self.geo.entry_words() {
                for c in self.referenced(self.geo.entry_at(&table, i))? {
                    self.add_next(g, c, delta)?;
                }
            }
            self.add_next(g, t / self.cs, delta)?;
        }
        Ok(())
    }

    /// `delta` on every cluster of `[offset, offset + len)`.
    pub(super) fn add_range(
        &mut self,
        g: &mut NextGen,
        offset: u64,
        len: u64,
        delta: i64,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in offset / self.cs..=(offset + len - 1) / self.cs {
            self.add_next(g, c, delta)?;
        }
        Ok(())
    }

    /// The active L1 of the next generation, pointing at `entries`' tables
    /// with COPIED set exactly where the next refcounts are 1. A table
    /// whose entries' flags change is fixed in place when the current
    /// active L1 does not reach it, else copied to a new cluster.
    pub(super) fn settle_active(
        &mut self,
        g: &mut NextGen,
        entries: &[u64],
        active_now: &HashSet<u64>,
    ) -> Result<Vec<u64>> {
        let mut copies: HashMap<u64, u64> = HashMap::new();
        let mut targets = Vec::with_capacity(entries.len());
        for &e in entries {
            let t = l1_table_offset(e);
            if t == 0 {
                targets.push(0);
                continue;
            }
            if let Some(&copy) = copies.get(&t) {
                // The same table twice in one L1: the copy is shared too.
                self.add_next(g, t / self.cs, -1)?;
                self.add_next(g, copy / self.cs, 1)?;
                targets.push(copy);
                continue;
            }
            let table = self.table_next(t)?;
            let mut fixed = table.clone();
            for i in 0..fixed.len() / self.geo.entry_words() {
                let entry = self.geo.entry_at(&fixed, i);
                let host = entry.host();
                let sole =
                    !entry.is_compressed() && host != 0 && self.next_ref(g, host / self.cs)? == 1;
                self.geo
                    .set_entry_at(&mut fixed, i, entry.with_copied(sole));
            }
            if fixed == table {
                targets.push(t);
            } else if !active_now.contains(&t) {
                self.write_table(g, t, &fixed)?;
                targets.push(t);
            } else {
                let copy = self.alloc_next(g, 1)?;
                self.write_table(g, copy, &fixed)?;
                self.add_next(g, t / self.cs, -1)?;
                copies.insert(t, copy);
                targets.push(copy);
            }
        }
        let mut l1 = Vec::with_capacity(targets.len());
        for t in targets {
            l1.push(match t {
                0 => 0,
                t if self.next_ref(g, t / self.cs)? == 1 => l1_entry(t),
                t => t,
            });
        }
        Ok(l1)
    }

    fn write_table(&mut self, g: &mut NextGen, offset: u64, entries: &[u64]) -> Result<()> {
        let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&raw, offset)?;
        g.tables.insert(offset);
        Ok(())
    }

    /// New clusters for an active L1 table holding `l1` (none when empty,
    /// where QEMU records offset 0).
    pub(super) fn place_l1(&mut self, g: &mut NextGen, l1: &[u64]) -> Result<u64> {
        if l1.is_empty() {
            return Ok(0);
        }
        let bytes = l1.len() as u64 * 8;
        let offset = self.alloc_next(g, bytes.div_ceil(self.cs))?;
        g.writes
            .push((offset, l1.iter().flat_map(|e| e.to_be_bytes()).collect()));
        Ok(offset)
    }

    /// The snapshot table holding `snaps`, in new clusters (none when
    /// empty: QEMU then records offset 0); the old table's clusters go.
    pub(super) fn replace_snapshot_table(
        &mut self,
        g: &mut NextGen,
        snaps: &[Snapshot],
    ) -> Result<(u32, u64)> {
        let old: u64 = self.snapshots()?.iter().map(|s| s.entry_bytes).sum();
        self.add_range(g, self.h.snapshots_offset, old, -1)?;
        if snaps.is_empty() {
            return Ok((0, 0));
        }
        let table = encode_table(snaps, self.virtual_size()).ok_or_else(|| {
            Error::invalid(&self.path, "File too large (snapshot table over 64 MiB)")
        })?;
        let offset = self.alloc_next(g, (table.len() as u64).div_ceil(self.cs))?;
        g.writes.push((offset, table));
        Ok((snaps.len() as u32, offset))
    }

    // ------------------------------------------------ next refcounts --

    fn refcount_max(&self) -> u64 {
        u64::MAX >> (64 - (1u32 << self.h.refcount_order))
    }

    /// The next generation's copy of refcount block `index`.
    fn block_next<'g>(&self, g: &'g mut NextGen, index: u64) -> Result<&'g mut Vec<u8>> {
        match g.blocks.entry(index) {
            std::collections::btree_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(v) => {
                let mut block = vec![0u8; self.cs as usize];
                if let Some(off) = self.refs.refblock_offset(index * self.refs.per_block()) {
                    self.pread(&mut block, off)?;
                }
                Ok(v.insert(block))
            }
        }
    }

    pub(super) fn next_ref(&mut self, g: &NextGen, cluster: u64) -> Result<u64> {
        let per_block = self.refs.per_block();
        match g.blocks.get(&(cluster / per_block)) {
            Some(block) => Ok(decode_refcount(
                block,
                cluster % per_block,
                1 << self.h.refcount_order,
            )),
            None => self.refcount(cluster),
        }
    }

    fn set_next(&mut self, g: &mut NextGen, cluster: u64, value: u64) -> Result<()> {
        let per_block = self.refs.per_block();
        let bits = 1u64 << self.h.refcount_order;
        let block = self.block_next(g, cluster / per_block)?;
        encode_refcount(block, 0, cluster % per_block, bits, value);
        Ok(())
    }

    /// Change a refcount of the next generation, refusing to overflow (as
    /// QEMU refuses: "Invalid argument") or to drop below zero.
    pub(super) fn add_next(&mut self, g: &mut NextGen, cluster: u64, delta: i64) -> Result<()> {
        let now = self.next_ref(g, cluster)?;
        let max = self.refcount_max();
        let next = i128::from(now) + i128::from(delta);
        if next > i128::from(max) {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "Invalid argument: the refcount of cluster {cluster} would exceed {max}, the \
                     most refcount_bits={} holds",
                    1u32 << self.h.refcount_order
                ),
            ));
        }
        if next < 0 {
            return Err(Error::invalid(
                &self.path,
                format!("refcount of cluster {cluster} would drop below zero; run `cowshed check`"),
            ));
        }
        if next == 0 {
            g.freed.push(cluster);
        }
        self.set_next(g, cluster, next as u64)
    }

    /// `n` contiguous clusters free now (the current metadata never sees
    /// them used) with refcount 1 in the next generation.
    pub(super) fn alloc_next(&mut self, g: &mut NextGen, n: u64) -> Result<u64> {
        let first = self.find_free(n)?;
        // Past everything handed out: the current refcounts of these
        // clusters stay 0, so only the hint keeps them from coming again.
        self.free_hint = first + n;
        for c in first..first + n {
            self.set_next(g, c, 1)?;
        }
        Ok(first * self.cs)
    }

    /// New homes for the copied refcount blocks and a new refcount table
    /// pointing at them, counted in themselves (each placement can copy
    /// another block: repeated until nothing moves).
    pub(super) fn place_refcount_structure(&mut self, g: &mut NextGen) -> Result<Vec<u64>> {
        let cs = self.cs;
        let per_block = self.refs.per_block();
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.add_range(g, self.h.refcount_table_offset, old_clusters * cs, -1)?;
        loop {
            loop {
                let homeless: Vec<u64> = g
                    .blocks
                    .keys()
                    .copied()
                    .filter(|i| !g.block_at.contains_key(i))
                    .collect();
                if homeless.is_empty() {
                    break;
                }
                for i in homeless {
                    if let Some(old) = self.refs.refblock_offset(i * per_block) {
                        self.add_next(g, old / cs, -1)?;
                    }
                    let at = self.alloc_next(g, 1)?;
                    g.block_at.insert(i, at);
                }
            }
            let old_entries = self.refs.reftable_entries();
            let needed = g
                .block_at
                .keys()
                .max()
                .map_or(0, |&i| i + 1)
                .max(old_entries);
            let entries = if needed > old_entries {
                // Headroom, as the writer's own growth leaves.
                (needed * 3 / 2).next_multiple_of(cs / 8)
            } else {
                old_entries
            };
            let clusters = (entries * 8).div_ceil(cs);
            match g.reftable {
                Some((_, have)) if have >= clusters => break,
                Some((off, have)) => {
                    // Too small after all: given back (never written).
                    self.add_range(g, off, have * cs, -1)?;
                }
                None => {}
            }
            if clusters * cs > super::super::header::MAX_REFTABLE_BYTES {
                return Err(Error::invalid(
                    &self.path,
                    "the refcount table would exceed QEMU's 8 MiB limit",
                ));
            }
            let off = self.alloc_next(g, clusters)?;
            g.reftable = Some((off, clusters));
        }
        let (_, clusters) = g.reftable.unwrap_or((0, 0));
        let mut table: Vec<u64> = self.refs.table().to_vec();
        table.resize((clusters * cs / 8) as usize, 0);
        for (&i, &at) in &g.block_at {
            table[i as usize] = at;
        }
        Ok(table)
    }

    /// Write the next generation, make it durable, switch the header to it
    /// in one write, and carry on from it.
    fn commit_generation(&mut self, mut g: NextGen, sw: Switch, l1: Vec<u64>) -> Result<()> {
        let (rt_offset, rt_clusters) = self.write_generation(&mut g, "snapshot.written")?;
        fault::point("snapshot.before_switch");
        // The encryption field between them is rewritten as it is.
        let mut next = self.h.clone();
        next.size = sw.size;
        next.l1_size = sw.l1_size;
        next.l1_table_offset = sw.l1_offset;
        next.refcount_table_offset = rt_offset;
        next.refcount_table_clusters = rt_clusters as u32;
        next.nb_snapshots = sw.nb_snapshots;
        next.snapshots_offset = sw.snapshots_offset;
        next.patch_tables(&self.file, &self.path)?;
        fault::point("snapshot.switched");
        self.h = next;
        self.l1 = l1;
        self.carry_on_from(g)
    }

    /// Place generation `g`'s refcount structure, write all of it (passing
    /// `written` once it is, before the flush) and make it durable; the
    /// header does not point at it yet. Returns the new refcount table
    /// (offset, clusters).
    pub(super) fn write_generation(
        &mut self,
        g: &mut NextGen,
        written: &'static str,
    ) -> Result<(u64, u64)> {
        let table = self.place_refcount_structure(g)?;
        let Some((rt_offset, rt_clusters)) = g.reftable else {
            return Err(Error::invalid(
                &self.path,
                "internal: no refcount table placed",
            ));
        };
        // The L2 tables are written (a failure there left nothing the
        // image uses changed); the rest must fit.
        let new_bytes = (g.blocks.len() as u64 + rt_clusters) * self.cs
            + g.writes.iter().map(|w| w.1.len() as u64).sum::<u64>();
        crate::engine::space::ensure_fits(&self.path, new_bytes)?;
        for (off, bytes) in &g.writes {
            self.pwrite(bytes, *off)?;
        }
        for (i, at) in &g.block_at {
            if let Some(block) = g.blocks.get(i) {
                self.pwrite(block, *at)?;
            }
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&raw, rt_offset)?;
        fault::point(written);
        self.file.sync_data().at(&self.path)?;
        Ok((rt_offset, rt_clusters))
    }

    /// After the header switched to generation `g` (and `self.h` says so):
    /// its refcounts are the image's, and the clusters only the old
    /// generation used give their space back to the file system.
    pub(super) fn carry_on_from(&mut self, mut g: NextGen) -> Result<()> {
        self.refs = Refcounts::load(&self.file, &self.path, &self.h)?;
        self.l2_cache.clear();
        for c in std::mem::take(&mut g.freed) {
            if self.refcount(c)? == 0 {
                let _ = crate::engine::raw::punch_hole(&self.file, c * self.cs, self.cs);
                self.free_hint = self.free_hint.min(c);
            }
        }
        Ok(())
    }
}

/// The L2 tables an L1 table points at.
pub(super) fn tables_of(l1: &[u64]) -> HashSet<u64> {
    l1.iter()
        .map(|&e| l1_table_offset(e))
        .filter(|&t| t != 0)
        .collect()
}
