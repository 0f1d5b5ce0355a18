//! Persistent dirty bitmaps: the bitmap directory of the qcow2 bitmaps
//! extension, decoded in full so that it can be written back with only the
//! entries an operation changes (extra data and unknown flags kept).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::BitmapsExt;
use super::l2::bitmap_table_data_offset;
use crate::engine::error::{Error, IoContext, Result};

pub mod flags {
    /// Written by a QEMU that has not stored the bitmap back yet: its
    /// contents cannot be trusted ("inconsistent").
    pub const IN_USE: u32 = 1 << 0;
    /// Enabled: records the guest's writes.
    pub const AUTO: u32 = 1 << 1;
}

/// QEMU's limits (block/qcow2-bitmap.c).
pub const MAX_BITMAPS: usize = 65535;
pub const MAX_NAME: usize = 1023;
pub const MIN_GRANULARITY_BITS: u32 = 9;
pub const MAX_GRANULARITY_BITS: u32 = 31;
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// QEMU's caps on a bitmap it stores: table entries (BME_MAX_TABLE_SIZE)
/// and bytes of bits (BME_MAX_PHYS_SIZE).
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
const ENTRY_FIXED: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: Vec<u8>,
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    /// A new, empty bitmap over a disk of `disk_size` bytes whose table
    /// (all zeros) lies at `table_offset`.
    pub fn new(
        name: &[u8],
        granularity_bits: u8,
        enabled: bool,
        table_offset: u64,
        table_size: u32,
    ) -> Self {
        BitmapEntry {
            table_offset,
            table_size,
            flags: if enabled { flags::AUTO } else { 0 },
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits,
            name: name.to_vec(),
            extra: Vec::new(),
        }
    }

    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }

    fn encoded_len(&self) -> usize {
        (ENTRY_FIXED + self.extra.len() + self.name.len()).next_multiple_of(8)
    }
}

/// Entries in a bitmap table for a disk of `disk_size` bytes: one data
/// cluster covers `granularity * cluster_size * 8` bytes of the disk.
pub fn table_entries(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    let per_cluster = (cluster_size * 8) << granularity_bits;
    disk_size.div_ceil(per_cluster)
}

/// Bits in a bitmap of granularity `2^granularity_bits` over `disk_size`
/// bytes: one per granule, the last one partial.
pub fn bit_count(disk_size: u64, granularity_bits: u32) -> u64 {
    disk_size.div_ceil(1u64 << granularity_bits)
}

/// Whether QEMU can store a bitmap of granularity `2^granularity_bits`
/// over a disk of `disk_size` bytes (`check_constraints_on_bitmap`: its
/// bits fit BME_MAX_PHYS_SIZE and BME_MAX_TABLE_SIZE clusters).
pub fn storable(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> bool {
    let bytes = bit_count(disk_size, granularity_bits).div_ceil(8);
    bytes <= MAX_PHYS_BYTES && bytes <= MAX_TABLE_ENTRIES.saturating_mul(cluster_size)
}

/// The most bitmap bytes loaded into memory at once (QEMU, too, holds a
/// whole bitmap in memory): 1 GiB of bits covers 4 TiB at 512-byte
/// granularity, 512 TiB at 64 KiB; a hostile size is refused before
/// anything is allocated.
pub const MAX_LOADED_BYTES: u64 = 1 << 30;

/// Table entry bits that must be 0 (QEMU's BME_TABLE_ENTRY_RESERVED_MASK).
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// An entry without offset whose data reads as all ones.
const TABLE_ALL_ONES: u64 = 1;

/// Bitmap `bm`'s bits over a disk of `disk_size` bytes, as QEMU serializes
/// them: bit `k` (granule `k`) is bit `k % 8` of byte `k / 8`; each table
/// entry holds one cluster of these bytes. Bits past the disk read 0.
pub fn read_bits(
    file: &File,
    path: &Path,
    bm: &BitmapEntry,
    disk_size: u64,
    cluster_size: u64,
) -> Result<Vec<u8>> {
    let name = String::from_utf8_lossy(&bm.name);
    let bad = |why: &str| Error::invalid(path, format!("bitmap '{name}' {why}"));
    let g = u32::from(bm.granularity_bits);
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&g) {
        return Err(bad("has an invalid granularity"));
    }
    let bits = bit_count(disk_size, g);
    let bytes = bits.div_ceil(8);
    if bytes > MAX_LOADED_BYTES {
        return Err(bad("is too large to load"));
    }
    if u64::from(bm.table_size) != table_entries(disk_size, g, cluster_size) {
        return Err(bad("has a table whose size does not match the disk"));
    }
    let mut out = vec![0u8; bytes as usize];
    if bm.table_size == 0 {
        return Ok(out);
    }
    if bm.table_offset == 0 || bm.table_offset % cluster_size != 0 {
        return Err(bad("has an invalid table offset"));
    }
    let mut raw = vec![0u8; bm.table_size as usize * 8];
    file.read_exact_at(&mut raw, bm.table_offset).at(path)?;
    for (chunk, e) in out
        .chunks_mut(cluster_size as usize)
        .zip(raw.chunks_exact(8))
    {
        let e = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let off = bitmap_table_data_offset(e);
        if e & TABLE_RESERVED_MASK != 0
            || (off != 0 && (e & TABLE_ALL_ONES != 0 || off % cluster_size != 0))
        {
            return Err(bad("has an invalid table entry"));
        }
        if off != 0 {
            file.read_exact_at(chunk, off).at(path)?;
        } else if e & TABLE_ALL_ONES != 0 {
            chunk.fill(0xff);
        }
    }
    clear_past(&mut out, bits);
    Ok(out)
}

/// Clear the bits from `bits` on (past the disk's last granule).
pub fn clear_past(map: &mut [u8], bits: u64) {
    let whole = (bits / 8) as usize;
    if let Some(partial) = map.get_mut(whole) {
        *partial &= (1u16 << (bits % 8)).wrapping_sub(1) as u8;
    }
    if let Some(rest) = map.get_mut(whole + 1..) {
        rest.fill(0);
    }
}

/// Set, in `map` (granularity `2^granularity_bits`), every bit whose
/// granule overlaps `[start, start + len)` of a disk of `disk_size` bytes:
/// what a write there does to a bitmap that records it.
pub fn mark(map: &mut [u8], granularity_bits: u32, disk_size: u64, start: u64, len: u64) {
    let end = start.saturating_add(len).min(disk_size);
    if start >= end {
        return;
    }
    let first = start >> granularity_bits;
    let last = (end - 1) >> granularity_bits;
    for k in first..=last {
        if let Some(byte) = map.get_mut((k / 8) as usize) {
            *byte |= 1 << (k % 8);
        }
    }
}

/// The byte ranges `[start, end)` of the disk whose bits are set in `map`.
pub fn dirty_ranges(map: &[u8], granularity_bits: u32, disk_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &byte) in map.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for b in 0..8 {
            if byte & (1 << b) == 0 {
                continue;
            }
            let k = i as u64 * 8 + b;
            let start = k << granularity_bits;
            if start >= disk_size {
                break;
            }
            let end = (start + (1u64 << granularity_bits)).min(disk_size);
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
    }
    out
}

/// `src` (granularity `2^src_bits`) merged into `dst` (`2^dst_bits`) as
/// QEMU merges bitmaps: the same granularity ORs the bits; otherwise each
/// dirty range of `src` marks the granules of `dst` it overlaps.
pub fn merge_into(dst: &mut [u8], dst_bits: u32, src: &[u8], src_bits: u32, disk_size: u64) {
    if dst_bits == src_bits {
        for (d, s) in dst.iter_mut().zip(src) {
            *d |= s;
        }
        clear_past(dst, bit_count(disk_size, dst_bits));
        return;
    }
    for (start, end) in dirty_ranges(src, src_bits, disk_size) {
        mark(dst, dst_bits, disk_size, start, end - start);
    }
}

/// The directory the extension points at.
pub fn read_directory(file: &File, path: &Path, ext: &BitmapsExt) -> Result<Vec<BitmapEntry>> {
    let file_len = file.metadata().at(path)?.len();
    if ext
        .directory_offset
        .checked_add(ext.directory_size)
        .is_none_or(|end| end > file_len)
        || ext.directory_size > MAX_DIRECTORY_BYTES
    {
        return Err(Error::invalid(
            path,
            "bitmap directory lies past the end of the file",
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_exact_at(&mut dir, ext.directory_offset)
        .at(path)?;
    let truncated = || Error::invalid(path, "bitmap directory truncated");
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        let e = dir.get(pos..pos + ENTRY_FIXED).ok_or_else(truncated)?;
        let be32 = |at: usize| u32::from_be_bytes([e[at], e[at + 1], e[at + 2], e[at + 3]]);
        let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra_len = be32(20) as usize;
        let extra_start = pos + ENTRY_FIXED;
        let name_start = extra_start.checked_add(extra_len).ok_or_else(truncated)?;
        let extra = dir.get(extra_start..name_start).ok_or_else(truncated)?;
        let name = dir
            .get(name_start..name_start + name_len)
            .ok_or_else(truncated)?;
        if u32::from(e[17]) > 63 {
            return Err(Error::invalid(path, "bitmap granularity out of range"));
        }
        out.push(BitmapEntry {
            table_offset: u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]),
            table_size: be32(8),
            flags: be32(12),
            kind: e[16],
            granularity_bits: e[17],
            name: name.to_vec(),
            extra: extra.to_vec(),
        });
        pos = (name_start + name_len).next_multiple_of(8);
    }
    Ok(out)
}

/// The directory's bytes, as QEMU lays it out: each entry padded to 8.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.iter().map(BitmapEntry::encoded_len).sum());
    for e in entries {
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(e.kind);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(&e.name);
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trips() {
        let mut a = BitmapEntry::new(b"one", 16, true, 0x30000, 1);
        a.extra = vec![1, 2, 3];
        let b = BitmapEntry::new(b"a-longer-name", 9, false, 0x40000, 3);
        let bytes = encode_directory(&[a.clone(), b.clone()]);
        assert_eq!(bytes.len() % 8, 0);
        let dir = std::env::temp_dir().join(format!("cowshed-bm-{}", std::process::id()));
        std::fs::write(&dir, &bytes).unwrap();
        let f = File::open(&dir).unwrap();
        let ext = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: bytes.len() as u64,
            directory_offset: 0,
        };
        let back = read_directory(&f, &dir, &ext).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(back, vec![a, b]);
    }

    #[test]
    fn marks_cover_every_granule_a_range_touches() {
        let mut map = vec![0u8; 2];
        // Granules of 512 over 5000 bytes: 10 bits.
        mark(&mut map, 9, 5000, 511, 2);
        assert_eq!(map, [0b11, 0]);
        mark(&mut map, 9, 5000, 4700, 1000);
        assert_eq!(map, [0b11, 0b10]);
        assert_eq!(dirty_ranges(&map, 9, 5000), [(0, 1024), (4608, 5000)]);
    }

    #[test]
    fn merging_across_granularities_marks_overlapping_granules() {
        let disk = 1 << 20;
        let mut fine = vec![0u8; bit_count(disk, 9).div_ceil(8) as usize];
        mark(&mut fine, 9, disk, 70_000, 1);
        let mut coarse = vec![0u8; bit_count(disk, 16).div_ceil(8) as usize];
        merge_into(&mut coarse, 16, &fine, 9, disk);
        assert_eq!(dirty_ranges(&coarse, 16, disk), [(65536, 131072)]);
        let mut back = vec![0u8; fine.len()];
        merge_into(&mut back, 9, &coarse, 16, disk);
        assert_eq!(dirty_ranges(&back, 9, disk), [(65536, 131072)]);
    }

    #[test]
    fn one_table_cluster_covers_granularity_times_cluster_bits() {
        assert_eq!(table_entries(64 << 20, 16, 65536), 1);
        assert_eq!(table_entries((32u64 << 30) + 1, 16, 65536), 2);
        assert_eq!(table_entries(0, 16, 65536), 0);
    }
}
