//! `measure`: how large a new image would be, as `qemu-img measure` computes
//! it (QEMU's `qcow2_measure` / `raw_measure`, QCOW2.md §6.6).
//!
//! `fully_allocated` is the file size with every cluster of the disk
//! allocated: header, every L2 table, the L1 rounded up to a cluster,
//! refcount metadata covering all of that, and the data. `required` drops
//! the data clusters a copy of the source would not write: every target
//! cluster holding at least one byte of non-zero data of the source's
//! flattened chain counts, the rest does not. Metadata is always counted,
//! so `required` overestimates on purpose.
//!
//! A plain engine function: convert's free-space guard calls it too.

use std::path::Path;

use crate::engine::chain::Chain;
use crate::engine::error::{Error, Result};
use crate::engine::format::Format;
use crate::engine::ops::create::{check_qcow2_options, CreateOptions};
use crate::engine::ops::info::read_bitmap_directory;
use crate::engine::qcow2::header::MAX_L1_BYTES;
use crate::engine::qcow2::refcount::refcount_structure;

/// Bytes of one reftable entry and one L1 entry.
const TABLE_ENTRY: u64 = 8;
/// Fixed part of a bitmap directory entry.
const BITMAP_DIR_ENTRY_FIXED: u64 = 24;
/// One bitmap table entry.
const BITMAP_TABLE_ENTRY: u64 = 8;

/// What `qemu-img measure` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
    /// Space for the source's persistent bitmaps: only when both the source
    /// (qcow2 v3) and the target (qcow2 v3) can hold bitmaps.
    pub bitmaps: Option<u64>,
}

/// `preallocation=` of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

/// The target's creation options that change its size.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Qcow2 or raw.
    pub format: Format,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    /// 3 (compat=1.1) or 2 (compat=0.10).
    pub version: u32,
    pub extended_l2: bool,
    pub preallocation: Preallocation,
    /// The target would get a backing file (`-o backing_file=`): QEMU then
    /// counts every cluster, not knowing what the backing shares.
    pub backing: bool,
}

impl Default for MeasureOptions {
    fn default() -> Self {
        MeasureOptions {
            format: Format::Qcow2,
            cluster_size: 65536,
            refcount_bits: 16,
            version: 3,
            extended_l2: false,
            preallocation: Preallocation::Off,
            backing: false,
        }
    }
}

/// What to measure: a disk of a given size, or a copy of an image (with its
/// whole backing chain flattened).
#[derive(Debug, Clone, Copy)]
pub enum MeasureSource<'a> {
    Size(u64),
    Image {
        path: &'a Path,
        format: Option<Format>,
    },
}

/// Measure a new image made with `opts` from `source`.
pub fn measure(source: MeasureSource<'_>, opts: &MeasureOptions) -> Result<Measure> {
    let here = match source {
        MeasureSource::Image { path, .. } => path,
        MeasureSource::Size(_) => Path::new("measure"),
    };
    let bad = |msg: &str| Error::invalid(here, msg.to_string());
    match opts.format {
        Format::Raw => return measure_raw(source),
        Format::Qcow2 => {}
        Format::Other(o) => {
            return Err(Error::UnsupportedFormat {
                path: here.to_path_buf(),
                format: o.name(),
            })
        }
    }
    let cs = opts.cluster_size;
    let rb = opts.refcount_bits;
    check_qcow2_options(
        here,
        &CreateOptions {
            cluster_size: cs,
            refcount_bits: rb,
            version: opts.version,
            extended_l2: opts.extended_l2,
            ..CreateOptions::default()
        },
    )?;
    let l2e = if opts.extended_l2 { 16 } else { 8 };

    let (virtual_size, mut required, bitmaps) = match source {
        MeasureSource::Size(n) => (n.next_multiple_of(cs), 0, None),
        MeasureSource::Image { path, format } => {
            let chain = Chain::open(path, format)?;
            let ssize = chain.virtual_size();
            let required = if opts.backing {
                ssize.next_multiple_of(cs)
            } else {
                data_bytes(&chain, cs)?
            };
            let bitmaps = if opts.version >= 3 {
                source_bitmaps(&chain, cs)?
            } else {
                None
            };
            (ssize.next_multiple_of(cs), required, bitmaps)
        }
    };
    // QEMU checks the size it was given before it looks at the source.
    let size_for_check = match source {
        MeasureSource::Size(_) => virtual_size,
        MeasureSource::Image { .. } => 0,
    };
    let l2_tables = (size_for_check / cs).div_ceil(cs / l2e);
    if l2_tables * TABLE_ENTRY > MAX_L1_BYTES {
        return Err(bad(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    if matches!(
        opts.preallocation,
        Preallocation::Full | Preallocation::Falloc
    ) {
        required = virtual_size;
    }
    let fully_allocated = prealloc_size(virtual_size, cs, rb.trailing_zeros(), l2e)
        .ok_or_else(|| bad("The image size is too large (try using a larger cluster size)"))?;
    Ok(Measure {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// QEMU's `raw_measure`: the source's length, or the size rounded up to a
/// sector; unallocated sectors take room in a raw file too.
fn measure_raw(source: MeasureSource<'_>) -> Result<Measure> {
    let n = match source {
        MeasureSource::Size(n) => n.next_multiple_of(512),
        MeasureSource::Image { path, format } => Chain::open(path, format)?.virtual_size(),
    };
    Ok(Measure {
        required: n,
        fully_allocated: n,
        bitmaps: None,
    })
}

/// Bytes of target clusters (size `cs`) that hold data of the flattened
/// chain, as QEMU's loop over `bdrv_block_status_above` adds them up: zero
/// ranges are skipped, a data range is extended to the end of its cluster
/// and counted from the start of its first cluster.
fn data_bytes(chain: &Chain, cs: u64) -> Result<u64> {
    let size = chain.virtual_size();
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let st = chain.block_status(offset, size - offset)?;
        let mut pnum = st.length;
        if !st.zero && st.data {
            pnum = (offset + pnum).next_multiple_of(cs) - offset;
            required += offset % cs + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size`, for a qcow2 v3 source
/// (the only kind that stores bitmaps); `None` for any other source.
fn source_bitmaps(chain: &Chain, cs: u64) -> Result<Option<u64>> {
    let top = chain.top();
    let Some(q) = top.image.as_qcow2() else {
        return Ok(None);
    };
    let h = q.header();
    if h.version < 3 {
        return Ok(None);
    }
    let Some(ext) = &h.extensions.bitmaps else {
        return Ok(Some(0));
    };
    let list = read_bitmap_directory(
        &top.path,
        q.file(),
        ext.directory_offset,
        ext.directory_size,
        ext.nb_bitmaps,
    )?;
    let disk = q.virtual_size();
    let mut total = 0u64;
    let mut dir = 0u64;
    for bm in list {
        let bytes = disk.div_ceil(bm.granularity).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * BITMAP_TABLE_ENTRY).next_multiple_of(cs);
        dir += (BITMAP_DIR_ENTRY_FIXED + bm.name.len() as u64).next_multiple_of(8);
    }
    Ok(Some(total + dir.next_multiple_of(cs)))
}

/// QEMU's `qcow2_calc_prealloc_size`: the file of a fully allocated image.
fn prealloc_size(total: u64, cs: u64, refcount_order: u32, l2e: u64) -> Option<u64> {
    let aligned = total.checked_next_multiple_of(cs)?;
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / TABLE_ENTRY);
    meta += nl1e * TABLE_ENTRY;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta.checked_add(aligned)
}

/// QEMU's `qcow2_refcount_metadata_size`: refcount blocks and table clusters
/// needed to count `clusters` clusters plus themselves (the fixed point).
pub(crate) fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let (blocks, table) = refcount_structure(clusters, cs, refcount_order);
    (blocks + table) * cs
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values printed by qemu-img measure 10.0.2 (QCOW2.md §6.6).
    #[test]
    fn one_gib_defaults() {
        let m = measure(MeasureSource::Size(1 << 30), &MeasureOptions::default()).unwrap();
        assert_eq!(m.required, 393_216);
        assert_eq!(m.fully_allocated, 1_074_135_040);
        assert_eq!(m.bitmaps, None);
    }

    #[test]
    fn raw_rounds_to_sectors() {
        let opts = MeasureOptions {
            format: Format::Raw,
            ..MeasureOptions::default()
        };
        let m = measure(MeasureSource::Size(1000), &opts).unwrap();
        assert_eq!((m.required, m.fully_allocated), (1024, 1024));
    }
}
