//! `check`: recompute every refcount from the metadata and compare it with
//! the refcounts stored in the image, the way `qemu-img check` does
//! (QCOW2.md §3.2, §3.4): leaks (stored > referenced) versus corruptions
//! (stored < referenced, misaligned or out-of-file structures, wrong COPIED
//! flags), with qemu-img's counters. The same checker repairs for
//! `check -r all` (see [`repair`]): it then writes, in the places and order
//! QEMU's `qcow2_check_refcounts` writes.

mod repair;

pub use repair::check_repair_all;

use crate::engine::qcow2::be64_table;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::engine::chain::open_image;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::{read_up_to, Format};
use crate::engine::layer::Image;
use crate::engine::ops::info::read_bitmap_directory;
use crate::engine::qcow2::header::{Header, MAX_L1_BYTES};
use crate::engine::qcow2::l2::{
    bitmap_table_data_offset, is_copied, l1_table_offset, reftable_block_offset, ClusterKind,
    Geometry, L1_RESERVED_MASK, L2_STD_RESERVED_MASK, OFLAG_COPIED, REFTABLE_RESERVED_MASK,
};
use crate::engine::qcow2::refcount::Refcounts;
use crate::engine::qcow2::Qcow2Image;

/// qemu-img check's result, field for field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub filename: PathBuf,
    pub format: &'static str,
    pub check_errors: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// Leaks repaired by [`check_repair_leaks`] or [`check_repair_all`].
    pub leaks_fixed: u64,
    /// Corruptions repaired by [`check_repair_all`].
    pub corruptions_fixed: u64,
    /// One line per finding, in qemu-img's words.
    pub findings: Vec<String>,
    /// (cluster, references found) of each leaked cluster.
    pub leaked: Vec<(u64, u64)>,
    /// Corruptions that are only COPIED flags disagreeing with stored
    /// refcounts: a leak repair can cure those (QEMU checks the flags after
    /// repairing the refcounts).
    pub copied_flag_corruptions: u64,
}

impl CheckReport {
    /// qemu-img check's exit code: 0 clean, 1 check not completed,
    /// 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// `check -r leaks`: lower the refcount of every leaked cluster to the
/// references found, as `qemu-img check -r leaks` does (QEMU's locks, the
/// same writes), then check again. An image whose refcount structure needs
/// a rebuild is left alone and the check fails, as in QEMU (exit 1);
/// corruptions are left for `-r all`.
pub fn check_repair_leaks(path: &Path, format: Option<Format>) -> Result<CheckReport> {
    repair::repair(path, format, FIX_LEAKS)
}

/// What a check may repair (QEMU's BdrvCheckMode bits).
pub(crate) const FIX_LEAKS: u8 = 1;
pub(crate) const FIX_ERRORS: u8 = 2;

/// Check the image at `path`. Raw images have nothing to check
/// ([`Error::CheckUnsupported`], qemu-img's exit 63).
pub fn check(path: &Path, format: Option<Format>) -> Result<CheckReport> {
    let (image, _) = open_image(path, format)?;
    let q = match &image {
        Image::Qcow2(q) => q,
        Image::Raw(_) => {
            return Err(Error::CheckUnsupported {
                path: path.to_path_buf(),
                format: "raw",
            })
        }
    };
    check_open(path, q)
}

/// [`check`] on an image already open (the writer's pre-flight).
pub(crate) fn check_open(path: &Path, q: &Qcow2Image) -> Result<CheckReport> {
    Checker::new(path, q)?.run()
}

struct Checker<'a> {
    path: &'a Path,
    file: &'a File,
    h: &'a Header,
    q: &'a Qcow2Image,
    geo: Geometry,
    cs: u64,
    file_len: u64,
    /// The in-memory refcount table: references found per host cluster.
    refs: Vec<u32>,
    refcount_max: u64,
    stored: Refcounts,
    report: CheckReport,
    /// What this pass may repair (0 for a read-only check).
    fix: u8,
    /// The refcount structure itself is broken: only a rebuild helps.
    rebuild: bool,
    /// A repair marked the image corrupt, as QEMU does (see `repair`).
    marked_corrupt: bool,
}

impl<'a> Checker<'a> {
    fn new(path: &'a Path, q: &'a Qcow2Image) -> Result<Self> {
        let h = q.header();
        let file = q.file();
        let file_len = file.metadata().at(path)?.len();
        let cs = h.cluster_size();
        let nb_clusters = file_len.div_ceil(cs);
        // One counter per cluster of the file, bounded by the file's size,
        // and by QEMU's limit on what a check counts (INT_MAX clusters): a
        // sparse file truncated to 1 TiB at 512-byte clusters is refused as
        // qemu-img refuses it, instead of walking 2^31 clusters.
        if nb_clusters > i32::MAX as u64 {
            return Err(Error::invalid(
                path,
                format!(
                    "Check failed: File too large ({} clusters of {cs} bytes; a check counts at \
                     most {})",
                    nb_clusters,
                    i32::MAX
                ),
            ));
        }
        let refs = vec![0u32; nb_clusters as usize];
        let refcount_max = if h.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1 << h.refcount_order)) - 1
        };
        Ok(Checker {
            path,
            file,
            h,
            q,
            geo: Geometry {
                cluster_bits: h.cluster_bits,
                extended: h.has_extended_l2(),
                external_data: h.has_data_file(),
                version: h.version,
            },
            cs,
            file_len,
            refs,
            refcount_max,
            stored: Refcounts::load_lenient(file, path, h)?,
            report: CheckReport {
                filename: path.to_path_buf(),
                format: "qcow2",
                total_clusters: q.virtual_size().div_ceil(cs),
                ..CheckReport::default()
            },
            fix: 0,
            rebuild: false,
            marked_corrupt: false,
        })
    }

    fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.report.findings.push(msg);
    }

    fn run(mut self) -> Result<CheckReport> {
        self.calculate_refcounts()?;
        self.compare_refcounts(0)?;
        self.check_oflag_copied(0)?;
        Ok(self.report)
    }

    /// QEMU's qcow2_inc_refcounts_imrt.
    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = offset.saturating_add(size);
        if end > self.file_len && end - self.file_len >= self.cs {
            self.corruption(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            return;
        }
        let first = offset / self.cs;
        let last = (end - 1) / self.cs;
        for k in first..=last {
            if k as usize >= self.refs.len() {
                // Less than a cluster past EOF: the last cluster may be
                // partly written.
                self.refs.resize(k as usize + 1, 0);
            }
            let r = &mut self.refs[k as usize];
            if u64::from(*r) >= self.refcount_max.min(u64::from(u32::MAX)) {
                self.corruption(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    k * self.cs
                ));
                continue;
            }
            *r += 1;
        }
    }

    fn read_table(&self, offset: u64, entries: u64) -> Result<Vec<u64>> {
        // Callers bound `entries` (L1 ≤ 32 MiB, L2 = one cluster).
        let mut raw = vec![0u8; (entries * 8) as usize];
        let n = read_up_to(self.file, &mut raw, offset).at(self.path)?;
        raw[n..].fill(0);
        Ok(be64_table(&raw))
    }

    fn calculate_refcounts(&mut self) -> Result<()> {
        let h = self.h;
        self.inc(0, self.cs);
        self.check_l1(h.l1_table_offset, u64::from(h.l1_size), true)?;
        if h.has_data_file() && h.nb_snapshots > 0 {
            self.corruption(format!(
                "ERROR {} snapshots in image with data file",
                h.nb_snapshots
            ));
        }
        let mut snapshots_size = 0;
        for sn in self.q.snapshots() {
            snapshots_size += sn.entry_bytes;
            if sn.l1_table_offset % self.cs != 0 {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset=0x{:x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_BYTES / 8 {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size=0x{:x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.check_l1(sn.l1_table_offset, u64::from(sn.l1_size), false)?;
        }
        self.inc(h.snapshots_offset, snapshots_size);
        let reftable_bytes = u64::from(h.refcount_table_clusters) * self.cs;
        self.inc(h.refcount_table_offset, reftable_bytes);
        if let Some(c) = &h.extensions.crypto {
            self.inc(c.offset, c.length);
        }
        if let Some(b) = &h.extensions.bitmaps {
            self.inc(b.directory_offset, b.directory_size);
            let bitmaps = read_bitmap_directory(
                self.path,
                self.file,
                b.directory_offset,
                b.directory_size,
                b.nb_bitmaps,
            )?;
            for bm in bitmaps {
                let entries = u64::from(bm.table_entries);
                self.inc(bm.table_offset, entries * 8);
                if entries * 8 > MAX_L1_BYTES || bm.table_offset % self.cs != 0 {
                    continue;
                }
                for e in self.read_table(bm.table_offset, entries)? {
                    let off = bitmap_table_data_offset(e);
                    if off != 0 {
                        self.inc(off, self.cs);
                    }
                }
            }
        }
        self.check_refblocks()
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u64, active: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_offset, l1_size * 8);
        let l1 = self.read_table(l1_offset, l1_size)?;
        for entry in l1 {
            if entry == 0 {
                continue;
            }
            if entry & L1_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {entry:x}"
                ));
            }
            let l2_offset = l1_table_offset(entry);
            self.inc(l2_offset, self.cs);
            if l2_offset % self.cs != 0 {
                self.corruption(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(l2_offset, active)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let words = self.geo.entry_words() as u64;
        let entries = self.cs / (8 * words);
        let table = self.read_table(l2_offset, entries * words)?;
        let mut next_contiguous = 0u64;
        for i in 0..entries as usize {
            let e = self.geo.entry_at(&table, i);
            let (entry, bitmap) = (e.word, e.bitmap);
            let ty = self.geo.cluster_kind(e);
            if ty != ClusterKind::Compressed && entry & L2_STD_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
            }
            match ty {
                ClusterKind::Compressed => {
                    let desc = e.compressed_descriptor().unwrap_or_default();
                    if e.is_copied() {
                        self.corruption(format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            self.geo.compressed_span(desc).0
                        ));
                    }
                    if self.geo.external_data {
                        self.corruption(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{entry:x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.corruption(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{entry:x}"
                        ));
                        continue;
                    }
                    let (coffset, csize) = self.geo.compressed_span(desc);
                    self.inc(coffset, csize);
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                }
                ClusterKind::ZeroAlloc | ClusterKind::Normal => {
                    let offset = e.host();
                    if e.zero_bits() & bitmap != 0 {
                        self.corruption(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if offset % self.cs != 0 {
                        let contains_data = if self.geo.extended {
                            e.alloc_bits() != 0
                        } else {
                            !e.has_zero_flag()
                        };
                        if contains_data {
                            self.corruption(format!("ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."));
                        } else if self.fix & FIX_ERRORS != 0 {
                            self.report.findings.push(format!("Repairing offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."));
                            self.report.corruptions += 1;
                            if self.fix_l2_entry_by_zero(l2_offset, i as u64, bitmap, active)? {
                                // Unused now: not counted.
                                continue;
                            }
                        } else {
                            self.corruption(format!("ERROR offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."));
                        }
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    if !self.geo.external_data {
                        self.inc(offset, self.cs);
                    }
                }
                ClusterKind::ZeroPlain => {}
                ClusterKind::Unallocated => {
                    if e.alloc_bits() != 0 {
                        self.corruption(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn check_refblocks(&mut self) -> Result<()> {
        let table = self.stored.table().to_vec();
        for (i, &entry) in table.iter().enumerate() {
            let offset = reftable_block_offset(entry);
            let cluster = offset / self.cs;
            if entry & REFTABLE_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if offset % self.cs != 0 {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            if cluster as usize >= self.refs.len() {
                // Past the end of the file. QEMU's -r all grows the file to
                // hold the block and sizes its in-memory table by that
                // offset: one number read from a hostile file then costs
                // gigabytes of memory and of file (13 KB -> 210 GB). Here
                // the entry is a broken refcount structure, which -r all
                // rebuilds for the clusters the file holds.
                self.corruption(format!("ERROR refcount block {i} is outside image"));
                if self.fix & FIX_ERRORS != 0 {
                    self.rebuild = true;
                }
                continue;
            }
            if offset != 0 {
                self.inc(offset, self.cs);
                let r = self.refs[cluster as usize];
                if r != 1 {
                    self.corruption(format!("ERROR refcount block {i} refcount={r}"));
                    self.rebuild = true;
                }
            }
        }
        Ok(())
    }

    fn compare_refcounts(&mut self, fix: u8) -> Result<()> {
        let mut highest = 0u64;
        for i in 0..self.refs.len() as u64 {
            let stored = match self.stored.get(self.file, self.path, i) {
                Ok(r) => r,
                Err(e) => {
                    self.report.check_errors += 1;
                    self.report
                        .findings
                        .push(format!("Can't get refcount for cluster {i}: {e}"));
                    if self.fix != 0 {
                        // A repair opens the image for writing, and QEMU
                        // then marks it corrupt on an unaligned refblock.
                        self.unaligned_refblock_seen(i);
                    }
                    continue;
                }
            };
            let referenced = u64::from(self.refs[i as usize]);
            if stored > 0 || referenced > 0 {
                highest = i;
            }
            if stored != referenced {
                let fixing = if stored == 0 {
                    self.rebuild = true;
                    false
                } else if stored > referenced {
                    fix & FIX_LEAKS != 0
                } else {
                    fix & FIX_ERRORS != 0
                };
                let word = if fixing {
                    "Repairing"
                } else if stored < referenced {
                    "ERROR"
                } else {
                    "Leaked"
                };
                self.report.findings.push(format!(
                    "{word} cluster {i} refcount={stored} reference={referenced}"
                ));
                if fixing {
                    match self.write_refcount(i, referenced) {
                        Ok(()) => {
                            if stored > referenced {
                                self.report.leaks_fixed += 1;
                            } else {
                                self.report.corruptions_fixed += 1;
                            }
                            continue;
                        }
                        Err(e) => self
                            .report
                            .findings
                            .push(format!("ERROR cannot update refcount of cluster {i}: {e}")),
                    }
                }
                if stored < referenced {
                    self.report.corruptions += 1;
                } else {
                    self.report.leaks += 1;
                    self.report.leaked.push((i, referenced));
                }
            }
        }
        self.report.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// COPIED must be set exactly where the stored refcount is 1 (active L1
    /// and the L2 tables it points to).
    fn check_oflag_copied(&mut self, fix: u8) -> Result<()> {
        let repair = if fix & FIX_ERRORS != 0 {
            true
        } else if fix & FIX_LEAKS != 0 {
            // Safe only when the refcounts were repaired completely.
            self.report.check_errors == 0 && self.report.corruptions == 0 && self.report.leaks == 0
        } else {
            false
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        let h = self.h;
        let l1 = self.read_table(h.l1_table_offset, u64::from(h.l1_size))?;
        let words = self.geo.entry_words() as u64;
        let entries = self.cs / (8 * words);
        for (i, &l1_entry) in l1.iter().enumerate() {
            let l2_offset = l1_table_offset(l1_entry);
            if l2_offset == 0 {
                continue;
            }
            let Ok(refcount) = self.stored.get(self.file, self.path, l2_offset / self.cs) else {
                continue;
            };
            if (refcount == 1) != is_copied(l1_entry) {
                self.report.copied_flag_corruptions += 1;
                self.corruption(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"
                ));
                if repair {
                    let fixed = l1_entry ^ OFLAG_COPIED;
                    self.write_table_bytes(
                        h.l1_table_offset + i as u64 * 8,
                        &fixed.to_be_bytes(),
                        repair::Ignore::ActiveL1,
                    )?;
                    self.report.copied_flag_corruptions -= 1;
                    self.report.corruptions -= 1;
                    self.report.corruptions_fixed += 1;
                }
            }
            let mut table = self.read_table(l2_offset, entries * words)?;
            let mut dirty = 0u64;
            for j in 0..entries as usize {
                let e = self.geo.entry_at(&table, j);
                let entry = e.word;
                if !matches!(
                    self.geo.cluster_kind(e),
                    ClusterKind::Normal | ClusterKind::ZeroAlloc
                ) {
                    continue;
                }
                let refcount = if self.geo.external_data {
                    1
                } else {
                    match self.stored.get(self.file, self.path, e.host() / self.cs) {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                };
                if (refcount == 1) != e.is_copied() {
                    self.report.copied_flag_corruptions += 1;
                    self.corruption(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                    ));
                    if repair {
                        self.geo
                            .set_entry_at(&mut table, j, e.with_copied(!e.is_copied()));
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.write_table_bytes(l2_offset, &raw, repair::Ignore::ActiveL2)?;
                self.report.copied_flag_corruptions -= dirty;
                self.report.corruptions -= dirty;
                self.report.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}
