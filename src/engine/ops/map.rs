//! `map`: the chain's block status over the whole disk, merged exactly as
//! `qemu-img map` merges its entries.

use crate::engine::chain::{BlockStatus, Chain};
use crate::engine::error::Result;

/// Largest range asked of the chain at once (QEMU asks up to 1 GiB too).
const STEP: u64 = 1 << 30;

/// QEMU's `entry_mergeable`: same flags and depth, and contiguous host
/// offsets when there are offsets.
pub fn mergeable(a: &BlockStatus, b: &BlockStatus) -> bool {
    a.length != 0
        && a.start + a.length == b.start
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && match (a.offset, b.offset) {
            (Some(x), Some(y)) => x + a.length == y,
            (None, None) => true,
            _ => false,
        }
}

/// Call `emit` with each merged extent of `[start, start + length)` in order.
pub fn map(
    chain: &Chain,
    start: u64,
    length: u64,
    mut emit: impl FnMut(&BlockStatus) -> Result<()>,
) -> Result<()> {
    let end = start.saturating_add(length).min(chain.virtual_size());
    if chain.virtual_size() == 0 {
        // qemu-img map prints one empty extent for an empty disk.
        return emit(&BlockStatus {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        });
    }
    let mut cur: Option<BlockStatus> = None;
    let mut pos = start;
    while pos < end {
        let next = chain.block_status(pos, (end - pos).min(STEP))?;
        pos += next.length;
        match &mut cur {
            Some(c) if mergeable(c, &next) => c.length += next.length,
            _ => {
                if let Some(c) = cur.replace(next) {
                    emit(&c)?;
                }
            }
        }
    }
    if let Some(c) = cur {
        emit(&c)?;
    }
    Ok(())
}
