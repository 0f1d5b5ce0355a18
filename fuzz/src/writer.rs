//! Target `writer`: the allocating writer on f0, driven by the bytes after
//! the files: writes, zero writes, discards and flushes at offsets and
//! lengths they choose, mirrored on a model of the disk kept in memory.
//! After the writer is closed the image reads as the model (within the
//! part of the disk the model covers), an image that checked clean still
//! has no corruptions, the backing chain and every other file are
//! unchanged, and the file grew no more than the writes justify. A writer
//! that refuses to open, or whose first operation fails, has not changed a
//! byte.

use crate::harness::{
    assert_growth, assert_names_a_file, assert_same_view, assert_still_consistent, cluster_size,
    corruptions, file_len, measured, Exec, Input, VIEW_BUDGET,
};
use cowshed::engine::qcow2::Qcow2Writer;
use cowshed::engine::{info, Chain, Format};

/// Operations run at most per input.
const OPS_MAX: usize = 48;

#[derive(Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

fn ops(rest: &[u8], window: u64, cs: u64) -> Vec<Op> {
    let mut v = Vec::new();
    if window == 0 {
        return v;
    }
    for op in rest.chunks_exact(8).take(OPS_MAX) {
        let kind = op[0];
        let mut offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], op[4]])) % window;
        let unit = [1u64, 512, cs, 4096][usize::from((kind >> 4) & 3)];
        let mut len = (u64::from(u16::from_le_bytes([op[5], op[6]])) % 64 + 1) * unit;
        if kind & 8 != 0 {
            // Cluster-aligned start.
            offset -= offset % cs;
        }
        len = len.min(window - offset);
        let seed = op[7];
        v.push(match kind & 7 {
            0..=2 => Op::Write { offset, len, seed },
            3 | 4 => Op::Zero { offset, len },
            5 | 6 => Op::Discard { offset, len },
            _ => Op::Flush,
        });
    }
    v
}

fn pattern(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    if !exec.confined() {
        return;
    }
    let f0 = exec.path("f0");
    let data_file = info(&f0, None)
        .ok()
        .and_then(|i| i.qcow2)
        .and_then(|q| q.data_file);
    let mut may_change = vec!["f0"];
    if let Some(d) = data_file.as_deref() {
        may_change.push(d);
    }
    let before = exec.fingerprints();
    let pre = corruptions(&f0);
    let len0 = file_len(&f0);
    let cs = cluster_size(&f0);
    // The model: the guest view at the start, and what a discarded cluster
    // reads afterwards (the backing chain's view, zeros past it).
    let chain = Chain::open(&f0, Some(Format::Qcow2)).ok();
    let size = chain.as_ref().map_or(0, Chain::virtual_size);
    let window = size.min(VIEW_BUDGET) & !511;
    let model0 = chain.as_ref().and_then(|c| {
        let mut buf = vec![0u8; window as usize];
        c.read_at(&mut buf, 0).ok().map(|()| buf)
    });
    // Only the part under the window: the backing may be larger, and
    // unreadable further on.
    let has_backing = chain.as_ref().is_some_and(|c| c.layers().len() > 1);
    let backing_view = chain.as_ref().and_then(|c| {
        let b = c.layers().get(1)?;
        let bc = Chain::open(&b.path, Some(b.image.format())).ok()?;
        let mut buf = vec![0u8; bc.virtual_size().min(window) as usize];
        bc.read_at(&mut buf, 0).ok().map(|()| buf)
    });
    let data_file_raw = info(&f0, None)
        .ok()
        .and_then(|i| i.qcow2)
        .is_some_and(|q| q.data_file_raw);
    drop(chain);
    let ops = ops(input.rest, window, cs);

    let mut written = 0u64;
    let mut first_failed = false;
    let mut any_failed = false;
    // Without the backing's view a discard cannot be modelled.
    let mut model = model0.filter(|_| !has_backing || backing_view.is_some());
    let r = measured("writer", exec.files_bytes, || -> Result<(), String> {
        let mut w = match Qcow2Writer::open(&f0) {
            Ok(w) => w,
            Err(e) => {
                assert_names_a_file("writer open", &e, &exec);
                first_failed = true;
                return Err(e.to_string());
            }
        };
        for (i, op) in ops.iter().enumerate() {
            let r = match *op {
                Op::Write { offset, len, seed } => w.write(&pattern(seed, offset, len), offset),
                Op::Zero { offset, len } => w.write_zeroes(offset, len),
                Op::Discard { offset, len } => w.discard(offset, len),
                Op::Flush => w.flush(),
            };
            if let Err(e) = r {
                assert_names_a_file(&format!("writer {op:?}"), &e, &exec);
                first_failed = i == 0;
                any_failed = true;
                return Err(e.to_string());
            }
            if let Some(m) = model.as_mut() {
                apply(m, op, cs, backing_view.as_deref(), data_file_raw);
            }
            written += match *op {
                Op::Write { len, .. } | Op::Zero { len, .. } => len.div_ceil(cs) * cs + cs,
                _ => 0,
            };
        }
        w.flush().map_err(|e| e.to_string())
    });
    if r.is_err() && first_failed {
        exec.assert_unchanged("writer (failed at once)", &before, &[], &[]);
        return;
    }
    exec.assert_unchanged("writer", &before, &may_change, &[]);
    // Data, the L2 tables and refcount blocks they need (twice: a copy on
    // write leaves the old cluster leaked at worst), and a grown refcount
    // table.
    assert_growth("writer", &f0, len0, 3 * written + 64 * cs);
    if any_failed || r.is_err() {
        return;
    }
    if let Some(want) = &model {
        let chain = match Chain::open(&f0, Some(Format::Qcow2)) {
            Ok(c) => c,
            Err(e) => panic!("writer: the image cannot be opened after the writes: {e}"),
        };
        let mut now = vec![0u8; want.len()];
        if let Err(e) = chain.read_at(&mut now, 0) {
            panic!("writer: the image cannot be read after the writes: {e}");
        }
        assert_same_view(&format!("writer after {ops:?}"), want, &now);
    }
    assert_still_consistent("writer", &f0, pre);
}

fn apply(m: &mut [u8], op: &Op, cs: u64, backing: Option<&[u8]>, data_file_raw: bool) {
    match *op {
        Op::Write { offset, len, seed } => {
            m[offset as usize..(offset + len) as usize]
                .copy_from_slice(&pattern(seed, offset, len));
        }
        Op::Zero { offset, len } => m[offset as usize..(offset + len) as usize].fill(0),
        Op::Discard { offset, len } => {
            let first = offset.div_ceil(cs) * cs;
            let end = (offset + len) / cs * cs;
            let end = end.min(m.len() as u64);
            for g in first..end.max(first) {
                let b = if data_file_raw {
                    0
                } else {
                    backing
                        .and_then(|b| b.get(g as usize))
                        .copied()
                        .unwrap_or(0)
                };
                m[g as usize] = b;
            }
        }
        Op::Flush => {}
    }
}
