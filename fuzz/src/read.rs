//! Target `read`: the whole guest view, read in one call and again extent
//! by extent (block status, then each extent's data) and in odd-sized
//! pieces; all three must agree. Read-only: no file may change.

use crate::harness::{assert_same_view, measured, view_of, Exec, Input};
use cowshed::engine::Chain;

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let before = exec.fingerprints();
    let f0 = exec.path("f0");
    measured("read", exec.files_bytes, || {
        let Ok(chain) = Chain::open(&f0, None) else {
            return;
        };
        let Some(whole) = view_of(&chain) else {
            return;
        };
        let size = whole.len() as u64;
        // Extent by extent.
        let mut pos = 0u64;
        let mut by_extent = vec![0u8; whole.len()];
        while pos < size {
            let Ok(st) = chain.block_status(pos, size - pos) else {
                panic!("read: the whole view read, but block status at {pos:#x} fails");
            };
            assert!(st.length > 0 && st.start == pos && pos + st.length <= size);
            let buf = &mut by_extent[pos as usize..(pos + st.length) as usize];
            if let Err(e) = chain.read_extent(&st, buf) {
                panic!("read: the whole view read, but the extent at {pos:#x} fails: {e}");
            }
            pos += st.length;
        }
        assert_same_view("read extent by extent", &whole, &by_extent);
        // Pieces at offsets and lengths the input chooses.
        for chunk in input.rest.chunks(6).take(32) {
            let mut b = [0u8; 8];
            b[..chunk.len().min(4)].copy_from_slice(&chunk[..chunk.len().min(4)]);
            let off = u64::from_le_bytes(b) % size.max(1);
            let len = chunk
                .get(4..6)
                .map_or(1, |l| u64::from(u16::from_le_bytes([l[0], l[1]])) * 7 + 1)
                .min(size - off);
            let mut piece = vec![0u8; len as usize];
            match chain.read_at(&mut piece, off) {
                Ok(()) => assert_same_view(
                    &format!("read of {len} bytes at {off:#x}"),
                    &whole[off as usize..(off + len) as usize],
                    &piece,
                ),
                Err(e) => {
                    panic!("read: the whole view read, but {len} bytes at {off:#x} fail: {e}")
                }
            }
        }
    });
    exec.assert_unchanged("read (read-only)", &before, &[], &[]);
}
