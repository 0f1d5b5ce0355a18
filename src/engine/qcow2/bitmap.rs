//! Persistent dirty bitmaps: the bitmap directory of the qcow2 bitmaps
//! extension, decoded in full so that it can be written back with only the
//! entries an operation changes (extra data and unknown flags kept).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::BitmapsExt;
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
    fn one_table_cluster_covers_granularity_times_cluster_bits() {
        assert_eq!(table_entries(64 << 20, 16, 65536), 1);
        assert_eq!(table_entries((32u64 << 30) + 1, 16, 65536), 2);
        assert_eq!(table_entries(0, 16, 65536), 0);
    }
}
