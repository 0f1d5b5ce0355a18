//! The internal snapshot table: read, and laid out anew the way QEMU's
//! `qcow2_write_snapshots` lays it out (a writer replaces the whole table
//! in new clusters, then switches the header to it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use crate::engine::error::{Error, IoContext, Result};

const ENTRY_FIXED: usize = 40;
const MAX_EXTRA: u32 = 1024;
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// The extra data QEMU 10 knows and writes: 64-bit VM state size, disk
/// size, icount.
pub const KNOWN_EXTRA: u32 = 24;

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
    /// The id and name as stored (QEMU compares and copies them as C
    /// strings: up to the first NUL).
    pub raw_id: Vec<u8>,
    pub raw_name: Vec<u8>,
    /// Extra data past the fields QEMU knows, kept verbatim on rewrite.
    pub unknown_extra: Vec<u8>,
}

impl Snapshot {
    /// A disk-only snapshot as `qemu-img snapshot -c` records it: no VM
    /// state, VM clock 0, icount 0, the disk size at the time.
    pub fn disk_only(
        id: &[u8],
        name: &[u8],
        l1: (u64, u32),
        disk_size: u64,
        date: (u32, u32),
    ) -> Self {
        Snapshot {
            l1_table_offset: l1.0,
            l1_size: l1.1,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(disk_size),
            icount: Some(0),
            entry_bytes: 0,
            raw_id: id.to_vec(),
            raw_name: name.to_vec(),
            unknown_extra: Vec::new(),
        }
    }

    /// The id and name as QEMU sees them: C strings.
    pub fn id_bytes(&self) -> &[u8] {
        c_string(&self.raw_id)
    }

    pub fn name_bytes(&self) -> &[u8] {
        c_string(&self.raw_name)
    }
}

fn c_string(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |n| &b[..n])
}

/// The snapshot table as QEMU writes it: each entry at a multiple of 8,
/// extra data of at least the 24 bytes QEMU knows (disk size: the entry's,
/// else `disk_size`, as QEMU fills it in on reading), ids and names cut at
/// their first NUL; gaps are zeros. The length is QEMU's `snapshots_size`
/// (the last entry unpadded). `None` when it would exceed QEMU's 64 MiB.
pub fn encode_table(snaps: &[Snapshot], disk_size: u64) -> Option<Vec<u8>> {
    let mut out: Vec<u8> = Vec::new();
    for sn in snaps {
        out.resize(out.len().next_multiple_of(8), 0);
        let (id, name) = (sn.id_bytes(), sn.name_bytes());
        let extra_len = KNOWN_EXTRA as usize + sn.unknown_extra.len();
        if out.len() + ENTRY_FIXED + extra_len + id.len() + name.len() > MAX_TABLE_BYTES as usize
            || id.len() > usize::from(u16::MAX)
            || name.len() > usize::from(u16::MAX)
        {
            return None;
        }
        out.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&sn.l1_size.to_be_bytes());
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(&sn.date_sec.to_be_bytes());
        out.extend_from_slice(&sn.date_nsec.to_be_bytes());
        out.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
        // Older readers see a VM state too large for 32 bits as none.
        let small_vm_state = u32::try_from(sn.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small_vm_state.to_be_bytes());
        out.extend_from_slice(&(extra_len as u32).to_be_bytes());
        out.extend_from_slice(&sn.vm_state_size.to_be_bytes());
        out.extend_from_slice(&sn.disk_size.unwrap_or(disk_size).to_be_bytes());
        out.extend_from_slice(&sn.icount.unwrap_or(-1).to_be_bytes());
        out.extend_from_slice(&sn.unknown_extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
    }
    Some(out)
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
        let raw_id = var[id_start..name_start].to_vec();
        let raw_name = var[name_start..name_start + name_len].to_vec();
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(c_string(&raw_id)).into_owned(),
            name: String::from_utf8_lossy(c_string(&raw_name)).into_owned(),
            date_sec: be32(16),
            date_nsec: be32(20),
            vm_clock_nsec: be64(24),
            vm_state_size,
            disk_size: ex64(8),
            icount: ex64(16).map(|v| v as i64),
            entry_bytes: entry_len,
            unknown_extra: extra.get(KNOWN_EXTRA as usize..).unwrap_or(&[]).to_vec(),
            raw_id,
            raw_name,
        });
        off += entry_len;
    }
    Ok(out)
}
