//! What `amend` changes beyond header bits: a downgrade to compat=0.10,
//! another refcount width, and an upgrade to compat=1.1 that must write
//! the snapshot table anew. Each as one switch to metadata built beside the
//! image's, so a kill or power cut at any point leaves the image as it was
//! or as it is meant to be, nothing lost (the way [`super::snapshots`]
//! switches):
//!
//! - downgrade: v2 has no zero clusters, so every L2 table (active or an
//!   internal snapshot's) holding one is copied with them expanded, as
//!   QEMU's `qcow2_expand_zero_clusters` expands them: without a backing
//!   file a zero cluster that holds no host cluster becomes unallocated,
//!   else it gets a new zeroed cluster; one that holds a host cluster
//!   keeps it, zeroed. The L1 tables and the snapshot table pointing at
//!   copies move too; the refcounts are counted in the snapshot code's
//!   next generation, and the header switches to a v2 header (72 bytes, no
//!   feature bits, no bitmaps extension) in one write.
//! - refcount width: every refcount is written again at the new width into
//!   refcount blocks and a table in clusters free now, counted in
//!   themselves; one header write switches the width and the table.
//! - upgrade: the snapshot table written anew with v3's extra data,
//!   counted in a next generation; one write of the v3 header switches
//!   to it.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::super::header::{autoclear, CompressionType, Header};
use super::super::l2::{
    l1_entry, l1_retarget, l1_table_offset, reftable_block_offset, ClusterKind, Geometry, L2Entry,
};
use super::super::refcount::{encode_refcount, Refcounts};
use super::backing::write_header;
use super::snapshots::NextGen;
use super::Qcow2Writer;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;

const DOWNGRADE_POINTS: [&str; 3] = [
    "amend.downgrade.written",
    "amend.downgrade.before_switch",
    "amend.downgrade.switched",
];
const UPGRADE_POINTS: [&str; 3] = [
    "amend.upgrade.written",
    "amend.upgrade.before_switch",
    "amend.upgrade.switched",
];

/// One L1 table the downgrade walks: the active one (`None`) or snapshot
/// `Some(index)`'s.
struct L1Table {
    snapshot: Option<usize>,
    entries: Vec<u64>,
}

impl Qcow2Writer {
    /// Why `compat=0.10` cannot be had (with refcounts `2^refcount_order`
    /// bits wide and a disk of `size` bytes by then), in QEMU's words,
    /// checked before anything is written; `None` when it can.
    pub fn downgrade_refusal(&mut self, refcount_order: u32, size: u64) -> Result<Option<String>> {
        use super::super::header::incompat;
        if self.h.version < 3 {
            return Ok(None);
        }
        if self.data.is_some() || self.h.has_data_file() {
            return Ok(Some("Cannot downgrade an image with a data file".into()));
        }
        if refcount_order != 4 {
            return Ok(Some("compat=0.10 requires refcount_bits=16".into()));
        }
        if self.snapshots()?.iter().any(|s| {
            s.vm_state_size > u64::from(u32::MAX)
                || s.disk_size.unwrap_or(self.virtual_size()) != size
        }) {
            return Ok(Some("Internal snapshots prevent downgrade of image".into()));
        }
        let features = self.h.incompatible_features & !incompat::COMPRESSION;
        if features != 0 {
            return Ok(Some(format!(
                "Cannot downgrade an image with incompatible features 0x{features:x} set"
            )));
        }
        // As QEMU, only the active disk is asked for compressed clusters.
        if self.h.compression_type == CompressionType::Zstd && self.active_has_compressed()? {
            return Ok(Some(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters"
                    .into(),
            ));
        }
        Ok(None)
    }

    fn active_has_compressed(&mut self) -> Result<bool> {
        let geo = self.geo;
        let l1 = self.l1.clone();
        for t in tables_in(&l1) {
            let table = self.table_next(t)?;
            if (0..table.len() / geo.entry_words()).any(|i| geo.entry_at(&table, i).is_compressed())
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Make the image compat=0.10 (see the module's comment); refused with
    /// [`Self::downgrade_refusal`]'s reason.
    pub fn downgrade(&mut self) -> Result<()> {
        if let Some(why) = self.downgrade_refusal(self.h.refcount_order, self.virtual_size())? {
            return Err(Error::invalid(&self.path, why));
        }
        if self.h.version < 3 {
            return Ok(());
        }
        self.flush_metadata()?;
        let (cs, geo) = (self.cs, self.geo);
        let has_backing = self.h.backing_file.is_some();
        let mut snaps = self.snapshots()?;
        let mut l1s = vec![L1Table {
            snapshot: None,
            entries: self.l1.clone(),
        }];
        for (i, sn) in snaps.iter().enumerate() {
            l1s.push(L1Table {
                snapshot: Some(i),
                entries: self.read_snapshot_l1(sn)?,
            });
        }
        // How many L1 entries point at each table: its copy gets as many
        // references, and so do the clusters the copy maps anew.
        let mut paths: BTreeMap<u64, u64> = BTreeMap::new();
        for l1 in &l1s {
            for t in l1.entries.iter().map(|&e| l1_table_offset(e)) {
                if t != 0 {
                    *paths.entry(t).or_default() += 1;
                }
            }
        }
        // Tables holding zero clusters, and the references zero entries
        // hold to host clusters (weighted by the paths to their table).
        let mut zero_tables = Vec::new();
        let mut zero_refs: HashMap<u64, u64> = HashMap::new();
        let mut fresh = 0u64;
        for (&t, &n) in &paths {
            let table = self.table_next(t)?;
            let mut has_zero = false;
            for i in 0..table.len() / geo.entry_words() {
                let e = geo.entry_at(&table, i);
                if !is_zero(geo, e) {
                    continue;
                }
                has_zero = true;
                let host = e.host();
                if host != 0 {
                    *zero_refs.entry(host / cs).or_default() += n;
                } else if has_backing {
                    fresh += 1;
                }
            }
            if has_zero {
                zero_tables.push(t);
            }
        }
        let bitmaps = if self.h.autoclear_features & autoclear::BITMAPS != 0 {
            self.bitmaps()?
        } else {
            Vec::new()
        };
        self.ensure_downgrade_room(
            zero_tables.len() as u64 + fresh + zero_refs.len() as u64,
            &l1s,
        )?;

        let mut g = NextGen::default();
        let mut copies: HashMap<u64, u64> = HashMap::new();
        for &t in &zero_tables {
            let n = paths[&t];
            let mut table = self.table_next(t)?;
            for i in 0..table.len() / geo.entry_words() {
                let e = geo.entry_at(&table, i);
                if !is_zero(geo, e) {
                    continue;
                }
                let host = e.host();
                let cluster =
                    if host != 0 && self.next_ref(&g, host / cs)? == zero_refs[&(host / cs)] {
                        // Only zero entries reach it: every reader sees zeros
                        // already, so zeroing it in place changes nothing yet.
                        crate::engine::raw::zero_range(&self.file, &self.path, host, cs)?;
                        Some(host)
                    } else if host != 0 || has_backing {
                        // Shared with entries that read its data (or a zero
                        // cluster over a backing file): a new zeroed cluster.
                        if host != 0 {
                            self.add_next_n(&mut g, host / cs, -(n as i64))?;
                        }
                        let c = self.alloc_next(&mut g, 1)?;
                        self.add_next_n(&mut g, c / cs, n as i64 - 1)?;
                        self.zeroed(c)?;
                        Some(c)
                    } else {
                        None
                    };
                let expanded = match cluster {
                    Some(c) => {
                        let sole = self.next_ref(&g, c / cs)? == 1;
                        geo.data_entry(c).with_copied(sole)
                    }
                    None => L2Entry::UNALLOCATED,
                };
                geo.set_entry_at(&mut table, i, expanded);
            }
            let copy = self.alloc_next(&mut g, 1)?;
            self.add_next_n(&mut g, copy / cs, n as i64 - 1)?;
            self.add_next_n(&mut g, t / cs, -(n as i64))?;
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            // A cluster free in the image now: nothing it uses changes.
            self.pwrite(&raw, copy)?;
            copies.insert(t, copy);
        }

        let mut l1_offset = self.h.l1_table_offset;
        let mut new_active = self.l1.clone();
        let mut snaps_changed = false;
        for l1 in &l1s {
            if !l1
                .entries
                .iter()
                .any(|&e| copies.contains_key(&l1_table_offset(e)))
            {
                continue;
            }
            let entries: Vec<u64> = l1
                .entries
                .iter()
                .map(|&e| match copies.get(&l1_table_offset(e)) {
                    // QEMU keeps COPIED true only in the active L1.
                    Some(&copy) if l1.snapshot.is_none() && paths[&l1_table_offset(e)] == 1 => {
                        l1_entry(copy)
                    }
                    Some(&copy) if l1.snapshot.is_none() => copy,
                    Some(&copy) => l1_retarget(e, copy),
                    None => e,
                })
                .collect();
            let bytes = entries.len() as u64 * 8;
            let offset = self.alloc_next(&mut g, bytes.div_ceil(cs))?;
            g.writes.push((
                offset,
                entries.iter().flat_map(|e| e.to_be_bytes()).collect(),
            ));
            match l1.snapshot {
                None => {
                    self.add_range(&mut g, self.h.l1_table_offset, bytes, -1)?;
                    l1_offset = offset;
                    new_active = entries;
                }
                Some(i) => {
                    self.add_range(&mut g, snaps[i].l1_table_offset, bytes, -1)?;
                    snaps[i].l1_table_offset = offset;
                    snaps_changed = true;
                }
            }
        }
        let (nb_snapshots, snapshots_offset) = if snaps_changed {
            self.replace_snapshot_table(&mut g, &snaps)?
        } else {
            (self.h.nb_snapshots, self.h.snapshots_offset)
        };
        // v2 cannot carry bitmaps: they go with their clusters.
        for bm in &bitmaps {
            for (off, len) in self.bitmap_clusters(bm)? {
                self.add_range(&mut g, off, len, -1)?;
            }
        }
        if let (Some(ext), false) = (&self.h.extensions.bitmaps, bitmaps.is_empty()) {
            let (off, len) = (ext.directory_offset, ext.directory_size);
            self.add_range(&mut g, off, len, -1)?;
        }

        let mut h: Header = self.h.clone();
        h.version = 2;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.compression_type = CompressionType::Deflate;
        h.unknown_fields.clear();
        h.extensions.bitmaps = None;
        h.l1_table_offset = l1_offset;
        h.nb_snapshots = nb_snapshots;
        h.snapshots_offset = snapshots_offset;
        self.switch_generation(g, h, DOWNGRADE_POINTS)?;
        self.l1 = new_active;
        Ok(())
    }

    /// Whether compat=1.1 needs the snapshot table written anew: QEMU's
    /// `qcow2_upgrade` rewrites it when an entry's extra data lacks the
    /// 64-bit VM state size or the disk size, which v3 requires.
    pub fn upgrade_rewrites_snapshots(&self) -> Result<bool> {
        Ok(self.h.version < 3 && self.snapshots()?.iter().any(|s| s.disk_size.is_none()))
    }

    /// compat=1.1 with the snapshot table written anew, as QEMU's
    /// `qcow2_write_snapshots` writes it (each entry with the 24 bytes of
    /// extra data QEMU knows: a disk size missing is the disk's now, an
    /// icount missing -1, as QEMU fills them in on reading); `upgrade`
    /// makes the header v3 (with amend's other header bits). QEMU writes
    /// the table, points the header at it, frees the old one and then
    /// rewrites the header; here the new table and the old one's release
    /// are counted in a next generation and the v3 header switches to
    /// both in one write, so a crash leaves the v2 image or the v3 one,
    /// nothing leaked.
    pub fn upgrade_with_snapshot_table(&mut self, upgrade: impl FnOnce(&mut Header)) -> Result<()> {
        self.flush_metadata()?;
        let snaps = self.snapshots()?;
        let mut g = NextGen::default();
        let (nb_snapshots, snapshots_offset) = self.replace_snapshot_table(&mut g, &snaps)?;
        let mut h = self.h.clone();
        upgrade(&mut h);
        h.nb_snapshots = nb_snapshots;
        h.snapshots_offset = snapshots_offset;
        self.switch_generation(g, h, UPGRADE_POINTS)
    }

    /// `delta` on `cluster`'s next refcount (none: nothing recorded).
    fn add_next_n(&mut self, g: &mut NextGen, cluster: u64, delta: i64) -> Result<()> {
        if delta == 0 {
            return Ok(());
        }
        self.add_next(g, cluster, delta)
    }

    /// Zeros in cluster `offset`, which lies inside the file afterwards (an
    /// L2 entry pointing past the end is corruption to `qemu-img check`).
    fn zeroed(&mut self, offset: u64) -> Result<()> {
        let len = self.file.metadata().at(&self.path)?.len();
        if len < offset + self.cs {
            self.file.set_len(offset + self.cs).at(&self.path)?;
        }
        crate::engine::raw::zero_range(&self.file, &self.path, offset, self.cs)
    }

    fn ensure_downgrade_room(&self, clusters: u64, l1s: &[L1Table]) -> Result<()> {
        let l1: u64 = l1s
            .iter()
            .map(|t| (t.entries.len() as u64 * 8).div_ceil(self.cs))
            .sum();
        let refcounts = self.refs.table().iter().filter(|&&e| e != 0).count() as u64
            + u64::from(self.h.refcount_table_clusters);
        let table = (2 * 65536u64).div_ceil(self.cs) + 1;
        crate::engine::space::ensure_fits(
            &self.path,
            (clusters + l1 + table + refcounts * 2 + 4) * self.cs,
        )
    }

    /// Write generation `g`, flush, switch to header `h` in one write, and
    /// carry on from it, passing `points` (written, before the switch,
    /// switched).
    fn switch_generation(
        &mut self,
        mut g: NextGen,
        mut h: Header,
        points: [&'static str; 3],
    ) -> Result<()> {
        let (rt_offset, rt_clusters) = self.write_generation(&mut g, points[0])?;
        fault::point(points[1]);
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = rt_clusters as u32;
        write_header(&self.file, &self.path, &mut h)?;
        fault::point(points[2]);
        self.h = h;
        self.carry_on_from(g)
    }

    // ------------------------------------------------ refcount width --

    /// Store every refcount `bits` wide (1, 2, 4, ... 64), as QEMU's
    /// `qcow2_change_refcount_order` does, refusing (in its words) when a
    /// refcount does not fit.
    pub fn change_refcount_width(&mut self, bits: u32) -> Result<()> {
        if !bits.is_power_of_two() || bits > 64 {
            return Err(Error::invalid(
                &self.path,
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        let order = bits.trailing_zeros();
        if order == self.h.refcount_order {
            return Ok(());
        }
        self.flush_metadata()?;
        let cs = self.cs;
        let end = self.past_end;
        let max = u64::MAX >> (64 - bits);
        // The clusters the old structure holds go in the new one.
        let mut old_structure: HashSet<u64> = HashSet::new();
        let rt = self.h.refcount_table_offset / cs;
        old_structure.extend(rt..rt + u64::from(self.h.refcount_table_clusters));
        for &e in self.refs.table() {
            let off = reftable_block_offset(e);
            if off != 0 {
                old_structure.insert(off / cs);
            }
        }
        let per_block = (cs * 8) >> order;
        // New blocks with a refcount other than 0, and a check that each
        // refcount fits the new width.
        let mut needed: HashSet<u64> = HashSet::new();
        for c in 0..end {
            if old_structure.contains(&c) {
                continue;
            }
            let r = self.refcount(c)?;
            if r > max {
                return Err(Error::invalid(
                    &self.path,
                    format!(
                        "Cannot decrease refcount entry width to {bits} bits: Cluster at \
                         offset 0x{:x} has a refcount of {r}",
                        c * cs
                    ),
                ));
            }
            if r != 0 {
                needed.insert(c / per_block);
            }
        }
        // Homes for the new blocks and table in clusters free now, counted
        // in themselves: placed until nothing more is needed.
        let mut block_at: BTreeMap<u64, u64> = BTreeMap::new();
        let mut table: Option<(u64, u64)> = None;
        let mut placed: HashSet<u64> = HashSet::new();
        loop {
            let homeless: Vec<u64> = needed
                .iter()
                .copied()
                .filter(|i| !block_at.contains_key(i))
                .collect();
            for i in homeless {
                let c = self.find_free(1)?;
                self.free_hint = c + 1;
                block_at.insert(i, c);
                placed.insert(c);
                needed.insert(c / per_block);
            }
            let entries = block_at.keys().max().map_or(0, |&i| i + 1);
            let clusters = (entries * 8).div_ceil(cs).max(1);
            if let Some((off, have)) = table {
                if have >= clusters && needed.iter().all(|i| block_at.contains_key(i)) {
                    break;
                }
                if have >= clusters {
                    continue;
                }
                // Too small after all: given up (never written).
                for c in off / cs..off / cs + have {
                    placed.remove(&c);
                }
            }
            if clusters * cs > super::super::header::MAX_REFTABLE_BYTES {
                return Err(Error::invalid(
                    &self.path,
                    "the refcount table would exceed QEMU's 8 MiB limit",
                ));
            }
            let first = self.find_free(clusters)?;
            self.free_hint = first + clusters;
            for c in first..first + clusters {
                placed.insert(c);
                needed.insert(c / per_block);
            }
            table = Some((first * cs, clusters));
        }
        let Some((rt_offset, rt_clusters)) = table else {
            return Err(Error::invalid(
                &self.path,
                "internal: no refcount table placed",
            ));
        };
        crate::engine::space::ensure_fits(&self.path, (block_at.len() as u64 + rt_clusters) * cs)?;
        let mut reftable = vec![0u8; (rt_clusters * cs) as usize];
        for (&i, &c) in &block_at {
            let mut block = vec![0u8; cs as usize];
            for k in 0..per_block {
                let cluster = i * per_block + k;
                let r = if placed.contains(&cluster) {
                    1
                } else if cluster >= end || old_structure.contains(&cluster) {
                    0
                } else {
                    self.refcount(cluster)?
                };
                if r != 0 {
                    encode_refcount(&mut block, 0, k, u64::from(bits), r);
                }
            }
            // Clusters free in the image now: nothing it uses changes.
            self.pwrite(&block, c * cs)?;
            let at = (i * 8) as usize;
            reftable[at..at + 8].copy_from_slice(&(c * cs).to_be_bytes());
        }
        self.pwrite(&reftable, rt_offset)?;
        fault::point("amend.refcount.written");
        self.file.sync_data().at(&self.path)?;
        fault::point("amend.refcount.before_switch");
        let mut h = self.h.clone();
        // As QEMU on a writable open: the autoclear bits it does not know
        // go.
        h.autoclear_features &= autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        h.refcount_order = order;
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = rt_clusters as u32;
        write_header(&self.file, &self.path, &mut h)?;
        fault::point("amend.refcount.switched");
        self.h = h;
        self.refs = Refcounts::load(&self.file, &self.path, &self.h)?;
        for c in old_structure {
            if self.refcount(c)? == 0 {
                let _ = crate::engine::raw::punch_hole(&self.file, c * cs, cs);
                self.free_hint = self.free_hint.min(c);
            }
        }
        Ok(())
    }
}

/// The L2 tables an L1 table points at, each once.
fn tables_in(l1: &[u64]) -> Vec<u64> {
    let mut seen = HashSet::new();
    l1.iter()
        .map(|&e| l1_table_offset(e))
        .filter(|&t| t != 0 && seen.insert(t))
        .collect()
}

/// Whether v2 cannot hold entry `e`: a zero cluster (with or without a
/// host cluster).
fn is_zero(geo: Geometry, e: L2Entry) -> bool {
    matches!(
        geo.cluster_kind(e),
        ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc
    )
}
