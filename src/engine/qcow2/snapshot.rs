//! The internal snapshot table (read only).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use crate::engine::error::{Error, IoContext, Result};

const ENTRY_FIXED: usize = 40;
const MAX_EXTRA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// From the 64-bit extra field when present, else the 32-bit one.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (extra data), if recorded.
    pub disk_size: Option<u64>,
    pub icount: Option<i64>,
    /// Bytes this entry takes in the snapshot table (padded to 8).
    pub entry_bytes: u64,
}

pub fn read_snapshots(
    file: &File,
    path: &Path,
    h: &Header,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    let bad = |msg: String| Error::invalid(path, msg);
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    let table_start = off;
    for i in 0..h.nb_snapshots {
        let mut fixed = [0u8; ENTRY_FIXED];
        if off + ENTRY_FIXED as u64 > file_len {
            return Err(bad(format!(
                "Snapshot table entry {i} lies past the end of the file"
            )));
        }
        file.read_exact_at(&mut fixed, off).at(path)?;
        let be32 = |a: usize| u32::from_be_bytes(fixed[a..a + 4].try_into().unwrap_or([0; 4]));
        let be16 = |a: usize| u16::from_be_bytes(fixed[a..a + 2].try_into().unwrap_or([0; 2]));
        let be64 = |a: usize| u64::from_be_bytes(fixed[a..a + 8].try_into().unwrap_or([0; 8]));
        let l1_table_offset = be64(0);
        let l1_size = be32(8);
        let id_len = be16(12) as usize;
        let name_len = be16(14) as usize;
        let extra_len = be32(36);
        if extra_len > MAX_EXTRA {
            return Err(bad(format!(
                "Too much extra metadata in snapshot table entry {i}"
            )));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let entry_len = (ENTRY_FIXED + var_len).next_multiple_of(8) as u64;
        if off + entry_len - table_start > MAX_TABLE_BYTES {
            return Err(bad("Snapshot table too large".into()));
        }
        if off + ENTRY_FIXED as u64 + var_len as u64 > file_len {
            return Err(bad(format!(
                "Snapshot table entry {i} lies past the end of the file"
            )));
        }
        // var_len is bounded: extra ≤ 1 KiB, id and name ≤ 64 KiB each.
        let mut var = vec![0u8; var_len];
        file.read_exact_at(&mut var, off + ENTRY_FIXED as u64)
            .at(path)?;
        let extra = &var[..extra_len as usize];
        let ex64 = |a: usize| {
            extra
                .get(a..a + 8)
                .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
        };
        let vm_state_size = ex64(0).unwrap_or(u64::from(be32(32)));
        let id_start = extra_len as usize;
        let name_start = id_start + id_len;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&var[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&var[name_start..name_start + name_len]).into_owned(),
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            vm_state_size,
            disk_size: ex64(8),
            icount: ex64(16).map(|v| v as i64),
            entry_bytes: entry_len,
        });
        off += entry_len;
    }
    Ok(out)
}
