//! `check -r leaks` and `check -r all`: QEMU's `qcow2_check_refcounts` with
//! its repair modes, step for step, so that the same image gets the same
//! repairs, counters, exit code (and, on the tested corruptions, the same
//! bytes) as with `qemu-img check -r`. For `-r all`:
//!
//! 1. Recompute every refcount from the metadata (preallocated clusters at
//!    unaligned offsets become zero clusters).
//! 2. Compare with the stored refcounts. When the refcount structure itself
//!    is broken (a referenced cluster with refcount 0, a refblock that is
//!    unaligned, has reserved bits, lies past the end of the file or is
//!    used by something else), rebuild
//!    it like QEMU's `rebuild_refcount_structure`: new refblocks and a new
//!    reftable in clusters that nothing references (first fit, the file
//!    grows when there are none), written and flushed, then the header's
//!    reftable offset and size switched in one write, flushed; the old
//!    structure is then leaked and its clusters freed like any leak.
//!    Otherwise raise refcounts that are too low and lower leaked ones in
//!    place.
//! 3. Fix COPIED flags in the active L1 and L2 tables.
//! 4. Clear the dirty and corrupt bits when nothing is left to repair.
//!
//! Every write is checked against the image's metadata first, as QEMU's
//! overlap check does (header, active L1/L2, refcount table and blocks,
//! snapshot table and L1s, bitmap directory): a write that would land on
//! metadata stops the repair with "Check failed" instead of corrupting.
//! The image stays locked with QEMU's writer locks throughout.
//!
//! `-r leaks` only lowers leaked refcounts; an image that needs a rebuild
//! fails the check (exit 1) untouched, as in QEMU.
//!
//! Not done (QEMU does not either): L2 entries pointing past the end of the
//! file or at unaligned data stay corruptions; the check then exits 2.
//! Deliberate differences from QEMU: a refblock offset past the end of the
//! file is a broken structure to rebuild, not a place to grow the file to
//! (QEMU grows it, and sizes its in-memory table by that offset: a hostile
//! 13 KB image became a 210 GB file and took gigabytes of memory), so
//! memory and the file stay bounded by the clusters the file holds; images
//! with persistent bitmaps keep them where they are (QEMU rewrites them
//! elsewhere on close); after a failed check the dirty bit stays set (QEMU
//! clears it on close); after an unaligned refblock marked the image
//! corrupt, the repairs cowshed makes all reach the disk (QEMU's last leak
//! repair does not) before the check fails with exit 1 like QEMU's.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{check, CheckReport, Checker, FIX_ERRORS, FIX_LEAKS};
use crate::engine::chain::open_image;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::Format;
use crate::engine::layer::Image;
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::qcow2::header::{autoclear, incompat, Header};
use crate::engine::qcow2::l2::{l1_table_offset, reftable_block_offset, L2Entry};
use crate::engine::qcow2::Qcow2Image;

/// QEMU's metadata kinds, for the overlap check (and its names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Header,
    ActiveL1,
    ActiveL2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    InactiveL1,
    BitmapDirectory,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
            Kind::BitmapDirectory => "bitmap directory",
        }
    }
}

/// Which metadata a write is allowed to overlap (the table it updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ignore {
    Nothing,
    ActiveL1,
    ActiveL2,
    /// An L2 table of a snapshot: inactive L2 tables are not in QEMU's
    /// default overlap check anyway.
    InactiveL2,
}

impl Ignore {
    fn covers(self, k: Kind) -> bool {
        matches!(
            (self, k),
            (Ignore::ActiveL1, Kind::ActiveL1) | (Ignore::ActiveL2, Kind::ActiveL2)
        )
    }
}

/// `check -r all` on the image at `path`: repair, then check again, with
/// qemu-img's counters (`leaks_fixed`, `corruptions_fixed`) and verdict.
pub fn check_repair_all(path: &Path, format: Option<Format>) -> Result<CheckReport> {
    repair(path, format, FIX_LEAKS | FIX_ERRORS)
}

/// QEMU's qcow2_check_refcounts with repair mode `fix`, then qemu-img's
/// second check when something was fixed.
pub(super) fn repair(path: &Path, format: Option<Format>, fix: u8) -> Result<CheckReport> {
    // Same format handling and errors as the read-only check.
    let (image, _) = open_image(path, format)?;
    if let Image::Raw(_) = image {
        return Err(Error::CheckUnsupported {
            path: path.to_path_buf(),
            format: "raw",
        });
    }
    drop(image);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .at(path)?;
    let _lock = ImageLock::acquire(&file, path, LockMode::WRITER)?;
    let q = Qcow2Image::open(path, file.try_clone().at(path)?)?;

    let mut c = Checker::new(path, &q)?;
    c.fix = fix;
    c.calculate_refcounts()?;
    let pre_compare = c.report.clone();
    c.compare_refcounts(0)?;
    // QEMU's image is unusable once it marked it corrupt: it repairs, but
    // its second check then fails (exit 1). cowshed repairs the same way
    // and fails the same way; the next `check -r all` clears the bit.
    let marked_corrupt = c.marked_corrupt;

    let mut report = if c.rebuild && fix & FIX_ERRORS != 0 {
        c.report
            .findings
            .push("Rebuilding refcount structure".into());
        let old = c.report.clone();
        c.rebuild_refcount_structure()
            .map_err(|e| prefixed(path, "Check failed", e))?;
        fault::point("check.repair.rebuilt");
        drop(c);
        // The header now points at the new structure: count again.
        let q = Qcow2Image::open(path, file.try_clone().at(path)?)?;
        let mut c = Checker::new(path, &q)?;
        c.report = CheckReport {
            corruptions: 0,
            leaks: 0,
            leaked: Vec::new(),
            copied_flag_corruptions: 0,
            ..old.clone()
        };
        c.calculate_refcounts()?;
        // The old structure is leaked now: free it. Leaks left over were
        // made by the rebuild itself.
        let saved = c.report.clone();
        c.report = CheckReport {
            findings: std::mem::take(&mut c.report.findings),
            ..CheckReport::default()
        };
        c.compare_refcounts(FIX_LEAKS)?;
        if c.rebuild {
            c.report
                .findings
                .push("ERROR rebuilt refcount structure is still broken".into());
        }
        let fresh_leaks = c.report.leaks;
        let end = c.report.image_end_offset;
        let findings = std::mem::take(&mut c.report.findings);
        c.report = CheckReport {
            findings,
            image_end_offset: end,
            ..saved
        };
        if c.report.corruptions < old.corruptions {
            c.report.corruptions_fixed += old.corruptions - c.report.corruptions;
        }
        if c.report.leaks < old.leaks {
            c.report.leaks_fixed += old.leaks - c.report.leaks;
        }
        c.report.leaks += fresh_leaks;
        file.sync_data().at(path)?;
        fault::point("check.repair.refcounts_fixed");
        c.check_oflag_copied(FIX_LEAKS | FIX_ERRORS)?;
        c.report
    } else {
        if c.rebuild {
            // Only `-r all` rebuilds; QEMU fails the check here.
            return Err(Error::invalid(
                path,
                "Check failed: the refcount structure needs a rebuild (use -r all)",
            ));
        }
        if fix == FIX_LEAKS && c.report.corruptions > 0 {
            // Beyond QEMU, which frees them anyway: next to corrupt entries
            // a "leaked" cluster may be the one such an entry was meant to
            // point at (the L2 table behind an unaligned L1 entry, the data
            // cluster whose entry now points at the L1 table), and freeing
            // it lets the next write overwrite it. Nothing is written;
            // `-r all` is the repair that changes such images.
            let first = c.report.findings.first().cloned().unwrap_or_default();
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                detail: format!(
                    "{} corruption(s) ({first}); -r leaks frees only clusters nothing refers \
                     to, which cannot be known while they stand; nothing was written",
                    c.report.corruptions
                ),
            });
        }
        if c.report.leaks > 0 || c.report.corruptions > 0 {
            let findings = std::mem::take(&mut c.report.findings);
            c.report = CheckReport {
                findings,
                ..pre_compare
            };
            c.compare_refcounts(fix)?;
        }
        // Refcounts on disk before COPIED flags are made to agree with them.
        file.sync_data().at(path)?;
        fault::point("check.repair.refcounts_fixed");
        c.check_oflag_copied(fix)?;
        c.report
    };
    drop(q);
    fault::point("check.repair.copied_flags_fixed");

    // QEMU also clears the dirty bit whenever it closes the image, even
    // after a failed check; cowshed leaves it set then, so that the next
    // QEMU to open the image still repairs it.
    if report.check_errors == 0 && report.corruptions == 0 {
        mark_clean_and_consistent(&file, path)?;
    }
    file.sync_all().at(path)?;
    if marked_corrupt {
        return Err(Error::invalid(
            path,
            "Check failed: the image was marked corrupt (a refblock offset is not cluster aligned); repairs were written, run the check again",
        ));
    }
    if report.corruptions_fixed == 0 && report.leaks_fixed == 0 {
        return Ok(report);
    }
    // As qemu-img: check the repaired image again, report what was fixed.
    let mut after = check(path, Some(Format::Qcow2))?;
    after.leaks_fixed = report.leaks_fixed;
    after.corruptions_fixed = report.corruptions_fixed;
    report.findings.append(&mut after.findings);
    after.findings = report.findings;
    Ok(after)
}

/// Clear the dirty and corrupt bits (v3 only), as QEMU's qcow2_mark_clean
/// and qcow2_mark_consistent after a complete repair.
fn mark_clean_and_consistent(file: &std::fs::File, path: &Path) -> Result<()> {
    let len = file.metadata().at(path)?.len();
    let mut h = Header::read(file, path, len)?;
    let bits = incompat::DIRTY | incompat::CORRUPT;
    if h.version < 3 || h.incompatible_features & bits == 0 {
        return Ok(());
    }
    file.sync_data().at(path)?;
    h.incompatible_features &= !bits;
    h.patch_incompatible(file, path)
}

/// `e` with `what` in front of its message (and the path said once).
fn prefixed(path: &Path, what: &str, e: Error) -> Error {
    let msg = match e {
        Error::Invalid { msg, .. } => msg,
        Error::Io { cause, .. } => cause.to_string(),
        other => other.to_string(),
    };
    Error::invalid(path, format!("{what}: {msg}"))
}

/// Set the corrupt bit (v3), as QEMU's qcow2_mark_corrupt.
fn mark_corrupt(file: &std::fs::File, path: &Path, h: &Header) -> Result<()> {
    if h.version < 3 || h.incompatible_features & incompat::CORRUPT != 0 {
        return Ok(());
    }
    let mut h = h.clone();
    h.incompatible_features |= incompat::CORRUPT;
    h.patch_incompatible(file, path)
}

/// QEMU's ranges_overlap.
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

impl Checker<'_> {
    /// Set a stored refcount in its (existing) refblock; a cluster whose
    /// count drops to 0 is given back to the file system, as QEMU does.
    pub(super) fn write_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        let (off, bytes) = self
            .stored
            .set_in_block(self.file, self.path, cluster, value)?;
        self.file.write_all_at(&bytes, off).at(self.path)?;
        if value == 0 {
            let _ = crate::engine::raw::punch_hole(self.file, cluster * self.cs, self.cs);
        }
        Ok(())
    }

    /// QEMU's qcow2_get_refcount on an image open for writing: a refblock
    /// offset that is not cluster aligned marks the image corrupt.
    pub(super) fn unaligned_refblock_seen(&mut self, cluster: u64) {
        if let Some(off) = self.stored.refblock_offset(cluster) {
            if off % self.cs != 0 && !self.marked_corrupt {
                // Best effort, as QEMU's marking.
                let _ = mark_corrupt(self.file, self.path, self.h);
                self.marked_corrupt = true;
            }
        }
    }

    /// The metadata QEMU's default ("cached") overlap check protects.
    fn metadata(&self) -> Result<Vec<(Kind, u64, u64)>> {
        let h = self.h;
        let mut m = vec![(Kind::Header, 0, self.cs)];
        let l1_size = u64::from(h.l1_size);
        if l1_size > 0 {
            m.push((Kind::ActiveL1, h.l1_table_offset, l1_size * 8));
        }
        m.push((
            Kind::RefcountTable,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * self.cs,
        ));
        let snapshots_size: u64 = self.q.snapshots().iter().map(|s| s.entry_bytes).sum();
        m.push((Kind::SnapshotTable, h.snapshots_offset, snapshots_size));
        for sn in self.q.snapshots() {
            m.push((
                Kind::InactiveL1,
                sn.l1_table_offset,
                u64::from(sn.l1_size) * 8,
            ));
        }
        for e in self.read_table(h.l1_table_offset, l1_size)? {
            let off = l1_table_offset(e);
            if off != 0 {
                m.push((Kind::ActiveL2, off, self.cs));
            }
        }
        for &e in self.stored.table() {
            let off = reftable_block_offset(e);
            if off != 0 {
                m.push((Kind::RefcountBlock, off, self.cs));
            }
        }
        if let Some(b) = &h.extensions.bitmaps {
            if h.autoclear_features & autoclear::BITMAPS != 0 {
                m.push((Kind::BitmapDirectory, b.directory_offset, b.directory_size));
            }
        }
        Ok(m)
    }

    /// QEMU's qcow2_pre_write_overlap_check: refuse a write to `[offset,
    /// offset + size)` (rounded out to clusters) that lands on metadata,
    /// and mark the image corrupt as QEMU does then (v3), so that no QEMU
    /// opens it for writing before it is looked at.
    fn overlap_check(&self, offset: u64, size: u64, ignore: Ignore) -> Result<()> {
        self.find_overlap(offset, size, ignore).inspect_err(|_| {
            // Best effort: the refusal is what matters.
            let _ = mark_corrupt(self.file, self.path, self.h);
        })
    }

    fn find_overlap(&self, offset: u64, size: u64, ignore: Ignore) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let start = offset - offset % self.cs;
        let len = (offset % self.cs + size).next_multiple_of(self.cs);
        for (kind, off, n) in self.metadata()? {
            if ignore.covers(kind) {
                continue;
            }
            let hit = if kind == Kind::Header {
                offset < self.cs
            } else {
                overlaps(start, len, off, n)
            };
            if hit {
                return Err(Error::invalid(
                    self.path,
                    format!(
                        "Preventing invalid write on metadata (overlaps with {}) at 0x{offset:x}",
                        kind.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Write a table (or part of one) after the overlap check, flushed.
    pub(super) fn write_table_bytes(
        &mut self,
        offset: u64,
        bytes: &[u8],
        ignore: Ignore,
    ) -> Result<()> {
        self.overlap_check(offset, bytes.len() as u64, ignore)?;
        self.file.write_all_at(bytes, offset).at(self.path)?;
        self.file.sync_data().at(self.path)
    }

    /// QEMU's fix_l2_entry_by_zero: a preallocated cluster at an unaligned
    /// offset becomes a zero cluster. Ok(true) when fixed.
    pub(super) fn fix_l2_entry_by_zero(
        &mut self,
        l2_offset: u64,
        index: u64,
        bitmap: u64,
        active: bool,
    ) -> Result<bool> {
        let words = self.geo.entry_words();
        let at = l2_offset + index * 8 * words as u64;
        // Subclusters that were allocated or zero read as zeros now.
        let zero = self.geo.zero_entry(0);
        let zero = if self.geo.extended {
            L2Entry::new(0, (bitmap | bitmap << 32) & zero.bitmap)
        } else {
            zero
        };
        let mut table = [0u64; 2];
        self.geo.set_entry_at(&mut table, 0, zero);
        let bytes: Vec<u8> = table[..words]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        let ignore = if active {
            Ignore::ActiveL2
        } else {
            Ignore::InactiveL2
        };
        if let Err(e) = self.overlap_check(at, bytes.len() as u64, ignore) {
            self.report
                .findings
                .push("ERROR: Overlap check failed".into());
            return Err(e);
        }
        if let Err(e) = self
            .file
            .write_all_at(&bytes, at)
            .and_then(|()| self.file.sync_data())
        {
            self.report
                .findings
                .push(format!("ERROR: Failed to overwrite L2 table entry: {e}"));
            return Ok(false);
        }
        self.report.corruptions -= 1;
        self.report.corruptions_fixed += 1;
        Ok(true)
    }

    /// QEMU's rebuild_refcount_structure: refblocks for every range with
    /// referenced clusters, then a reftable, all placed first-fit in
    /// clusters nothing references (allocations counted as they are made,
    /// until nothing moves), flushed; then the header switched in one
    /// write. The old structure is left for the caller to free as leaks.
    pub(super) fn rebuild_refcount_structure(&mut self) -> Result<()> {
        // The counts found are the new refcounts (capped at the width's
        // maximum by `inc`, as in QEMU's in-memory table).
        let mut refs = std::mem::take(&mut self.refs);
        let mut reftable: Vec<u64> = Vec::new();
        let end = refs.len() as u64;
        self.write_refblocks(&mut refs, 0, end, &mut reftable)?;
        let (offset, clusters) = loop {
            let clusters = (reftable.len() as u64 * 8).div_ceil(self.cs);
            let mut first_free = 0;
            let start = alloc_in_memory(&mut refs, clusters, &mut first_free);
            if !self.write_refblocks(&mut refs, start, start + clusters, &mut reftable)? {
                break (start * self.cs, clusters);
            }
        };
        if clusters > u64::from(u32::MAX) {
            return Err(Error::invalid(self.path, "reftable too large"));
        }
        let raw: Vec<u8> = reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.overlap_check(offset, raw.len() as u64, Ignore::Nothing)
            .map_err(|e| prefixed(self.path, "ERROR writing reftable", e))?;
        self.file.write_all_at(&raw, offset).at(self.path)?;
        // Everything the new header fields point at is on disk first.
        self.file.sync_data().at(self.path)?;
        fault::point("check.rebuild.before_switch");
        let mut next = self.h.clone();
        next.refcount_table_offset = offset;
        next.refcount_table_clusters = clusters as u32;
        next.patch_refcount_table(self.file, self.path)
    }

    /// QEMU's rebuild_refcounts_write_refblocks over clusters
    /// `[first, end)`: write the refblock of every range holding a
    /// referenced cluster, allocating it (in `refs`) when the new reftable
    /// has none yet. Returns whether the reftable had to grow.
    fn write_refblocks(
        &mut self,
        refs: &mut Vec<u32>,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool> {
        let per_block = self.stored.per_block();
        let mut first_free = 0u64;
        let mut grown = false;
        let mut cluster = first;
        while cluster < end {
            if refs.get(cluster as usize).copied().unwrap_or(0) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster / per_block;
            let block_start = index * per_block;
            let block_off = match reftable.get(index as usize) {
                Some(&off) if off != 0 => off,
                _ => {
                    first_free = first_free.max(block_start);
                    let c = alloc_in_memory(refs, 1, &mut first_free);
                    if c >= end {
                        // The block counting this block must be written too.
                        end = c + 1;
                    }
                    if reftable.len() as u64 <= index {
                        let entries = ((index + 1) * 8).next_multiple_of(self.cs) / 8;
                        reftable.resize(entries as usize, 0);
                        grown = true;
                    }
                    reftable[index as usize] = c * self.cs;
                    c * self.cs
                }
            };
            self.overlap_check(block_off, self.cs, Ignore::Nothing)
                .map_err(|e| prefixed(self.path, "ERROR writing refblock", e))?;
            let block = self.encode_refblock(refs, block_start);
            self.file.write_all_at(&block, block_off).at(self.path)?;
            cluster = block_start + per_block;
        }
        Ok(grown)
    }

    /// The on-disk refblock for clusters from `start`: a slice of `refs`.
    fn encode_refblock(&self, refs: &[u32], start: u64) -> Vec<u8> {
        let per_block = self.stored.per_block();
        let bits = 1u64 << self.h.refcount_order;
        let mut block = vec![0u8; self.cs as usize];
        for idx in 0..per_block {
            let Some(&v) = refs.get((start + idx) as usize) else {
                break;
            };
            let v = u64::from(v);
            if v == 0 {
                continue;
            }
            if bits < 8 {
                let bit = idx * bits;
                block[(bit / 8) as usize] |= (v as u8) << (bit % 8);
            } else {
                let w = (bits / 8) as usize;
                let at = idx as usize * w;
                block[at..at + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
            }
        }
        block
    }
}

/// QEMU's alloc_clusters_imrt: the first run of `count` clusters with no
/// references at or after `*first_free` (which moves to the first free
/// cluster seen), growing the in-memory table past the end of the file if
/// needed; the run is counted as used. Returns its first cluster.
fn alloc_in_memory(refs: &mut Vec<u32>, count: u64, first_free: &mut u64) -> u64 {
    let mut cluster = *first_free;
    let mut contiguous = 0u64;
    let mut first_gap = true;
    while cluster < refs.len() as u64 && contiguous < count {
        if refs[cluster as usize] == 0 {
            contiguous += 1;
            if first_gap {
                *first_free = cluster;
                first_gap = false;
            }
        } else {
            contiguous = 0;
        }
        cluster += 1;
    }
    if contiguous < count {
        let len = (cluster + count - contiguous) as usize;
        if len > refs.len() {
            refs.resize(len, 0);
        }
    }
    cluster -= contiguous;
    for c in cluster..cluster + count {
        refs[c as usize] = 1;
    }
    cluster
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_memory_allocation_is_first_fit_and_grows_past_the_end() {
        let mut refs = vec![1, 0, 1, 0, 0, 1];
        let mut first_free = 0;
        assert_eq!(alloc_in_memory(&mut refs, 1, &mut first_free), 1);
        assert_eq!(first_free, 1);
        assert_eq!(refs, [1, 1, 1, 0, 0, 1]);
        // Two together: the hole at 3-4.
        let mut first_free = 0;
        assert_eq!(alloc_in_memory(&mut refs, 2, &mut first_free), 3);
        // No room left: appended, the table grows.
        let mut first_free = 0;
        assert_eq!(alloc_in_memory(&mut refs, 2, &mut first_free), 6);
        assert_eq!(refs, [1; 8]);
        // Starting beyond the end.
        let mut first_free = 10;
        assert_eq!(alloc_in_memory(&mut refs, 1, &mut first_free), 10);
        assert_eq!(refs.len(), 11);
    }

    #[test]
    fn qemu_range_overlap() {
        assert!(overlaps(0x20000, 0x10000, 0x20200, 0x10000));
        assert!(!overlaps(0x10000, 0x10000, 0x20000, 0x10000));
        assert!(!overlaps(0x10000, 0, 0x10000, 0x10000));
    }
}
