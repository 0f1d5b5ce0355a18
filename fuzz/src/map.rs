//! Target `map`: the merged block status of the whole disk (qemu-img map)
//! and the raw block status under it. Extents must tile the disk in order
//! with no gap, never be empty, and extents said to be zero must read as
//! zeros. Read-only: no file may change.

use crate::harness::{measured, Exec, Input};
use cowshed::engine::{map, Chain, Error};

/// Disks larger than this are not mapped whole: the block status of an
/// empty 2^60-byte disk takes as many steps as QEMU's does, which is time,
/// not a bug.
const MAP_BUDGET: u64 = 256 << 20;
/// Extents looked at most (each one may be read to check zeros).
const EXTENTS_MAX: usize = 20_000;
/// Bytes of zero extents read back at most.
const ZEROS_READ_MAX: u64 = 4 << 20;

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let before = exec.fingerprints();
    let f0 = exec.path("f0");
    measured("map", exec.files_bytes, || {
        let Ok(chain) = Chain::open(&f0, None) else {
            return;
        };
        let size = chain.virtual_size();
        if size > MAP_BUDGET {
            return;
        }
        let mut next = 0u64;
        let mut seen = 0usize;
        let mut zeros_read = 0u64;
        let r = map(&chain, 0, size, |e| {
            if size > 0 {
                assert!(e.length > 0, "map: an empty extent at {:#x}", e.start);
            }
            assert_eq!(e.start, next, "map: extents out of order or with a gap");
            next = e.start + e.length;
            if e.zero && zeros_read + e.length <= ZEROS_READ_MAX {
                zeros_read += e.length;
                let mut buf = vec![0xa5u8; e.length as usize];
                if chain.read_at(&mut buf, e.start).is_ok() {
                    assert!(
                        buf.iter().all(|&b| b == 0),
                        "map: an extent said to be zero at {:#x}+{:#x} does not read as zeros",
                        e.start,
                        e.length
                    );
                }
            }
            seen += 1;
            if seen >= EXTENTS_MAX {
                return Err(Error::invalid(&f0, "enough extents"));
            }
            Ok(())
        });
        if r.is_ok() {
            assert_eq!(next, size, "map: the extents do not cover the disk");
        }
        // The block status the map is made of, asked at odd places.
        // (block_status wants a range inside the disk.)
        for chunk in input.rest.chunks(8).take(if size > 0 { 16 } else { 0 }) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let pos = u64::from_le_bytes(b) % size.max(1);
            if let Ok(st) = chain.block_status(pos, size - pos) {
                assert_eq!(st.start, pos, "block_status: starts elsewhere");
                assert!(
                    st.length > 0 && st.start + st.length <= size,
                    "block_status: a bad length {:#x} at {pos:#x}",
                    st.length
                );
            }
        }
    });
    exec.assert_unchanged("map (read-only)", &before, &[], &[]);
}
