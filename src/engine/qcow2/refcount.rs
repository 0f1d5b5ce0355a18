//! Refcount table and blocks, read side: the refcount of a host cluster.

use super::be64_table;
use super::cache::{TableCache, REFCOUNT_CACHE_BYTES};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use super::l2::reftable_block_offset;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::read_up_to;

pub struct Refcounts {
    table: Vec<u64>,
    cluster_bits: u32,
    refcount_order: u32,
    /// Refcount blocks read, bounded; changes are written through by the
    /// caller (see [`Refcounts::set_in_block`]), so they are never dirty.
    blocks: TableCache<Vec<u8>>,
}

impl Refcounts {
    /// Load the refcount table (≤ 8 MiB by header validation).
    pub fn load(file: &File, path: &Path, h: &Header) -> Result<Self> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        let file_len = file.metadata().at(path)?.len();
        if h.refcount_table_offset + bytes > file_len {
            return Err(Error::invalid(
                path,
                "Reference count table lies past the end of the file",
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        file.read_exact_at(&mut raw, h.refcount_table_offset)
            .at(path)?;
        Ok(Refcounts::new(be64_table(&raw), h))
    }

    /// Like [`Refcounts::load`], but a table running past the end of the
    /// file reads as zeros there, as QEMU reads it: `check` must report on
    /// such images, not refuse them.
    pub fn load_lenient(file: &File, path: &Path, h: &Header) -> Result<Self> {
        let bytes = u64::from(h.refcount_table_clusters) * h.cluster_size();
        // ≤ 8 MiB by header validation.
        let mut raw = vec![0u8; bytes as usize];
        let n = read_up_to(file, &mut raw, h.refcount_table_offset).at(path)?;
        raw[n..].fill(0);
        Ok(Refcounts::new(be64_table(&raw), h))
    }

    fn new(table: Vec<u64>, h: &Header) -> Self {
        Refcounts {
            table,
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
            blocks: TableCache::new(REFCOUNT_CACHE_BYTES, h.cluster_size()),
        }
    }

    /// The refcount table's raw entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    fn entries_per_block(&self) -> u64 {
        (1u64 << (self.cluster_bits + 3)) >> self.refcount_order
    }

    /// Refcount of host cluster `cluster` (index, not byte offset).
    pub fn get(&mut self, file: &File, path: &Path, cluster: u64) -> Result<u64> {
        let per_block = self.entries_per_block();
        let Some(&entry) = self.table.get((cluster / per_block) as usize) else {
            return Ok(0);
        };
        let block_off = reftable_block_offset(entry);
        if block_off == 0 {
            return Ok(0);
        }
        let cs = 1u64 << self.cluster_bits;
        if block_off % cs != 0 {
            return Err(Error::invalid(
                path,
                format!("Refblock offset 0x{block_off:x} unaligned"),
            ));
        }
        let bits = 1u64 << self.refcount_order;
        if let Some(block) = self.blocks.get(block_off) {
            return Ok(decode_refcount(block, cluster % per_block, bits));
        }
        // Past EOF reads as zeros, as in QEMU.
        let mut raw = vec![0u8; cs as usize];
        let n = read_up_to(file, &mut raw, block_off).map_err(|e| {
            Error::invalid(
                path,
                format!("cannot read refcount block at 0x{block_off:x}: {e}"),
            )
        })?;
        raw[n..].fill(0);
        let value = decode_refcount(&raw, cluster % per_block, bits);
        self.cache_block(block_off, raw);
        Ok(value)
    }

    /// Blocks are written through, never dirty, so the cache always has
    /// room; were it refused, the block would only be read again.
    fn cache_block(&mut self, offset: u64, block: Vec<u8>) {
        let _ = self.blocks.insert(offset, block);
    }
}

impl Refcounts {
    pub(crate) fn per_block(&self) -> u64 {
        self.entries_per_block()
    }

    /// The refblock covering `cluster`, if there is one.
    pub(crate) fn refblock_offset(&self, cluster: u64) -> Option<u64> {
        let e = *self
            .table
            .get((cluster / self.entries_per_block()) as usize)?;
        let off = reftable_block_offset(e);
        (off != 0).then_some(off)
    }

    pub(crate) fn reftable_entries(&self) -> u64 {
        self.table.len() as u64
    }

    /// Record a new refblock (already written) in the in-memory table.
    pub(crate) fn install_refblock(&mut self, index: u64, offset: u64, block: Vec<u8>) {
        if let Some(slot) = self.table.get_mut(index as usize) {
            *slot = offset;
        }
        self.cache_block(offset, block);
    }

    /// Set the refcount of `cluster` in its (existing, loaded) refblock and
    /// return the bytes to write: (file offset, bytes).
    pub(crate) fn set_in_block(
        &mut self,
        file: &File,
        path: &Path,
        cluster: u64,
        value: u64,
    ) -> Result<(u64, Vec<u8>)> {
        // Load the block through `get` (it validates and caches).
        self.get(file, path, cluster)?;
        let Some(block_off) = self.refblock_offset(cluster) else {
            return Err(Error::invalid(path, "internal: no refblock to update"));
        };
        let idx = cluster % self.entries_per_block();
        let bits = 1u64 << self.refcount_order;
        let Some(block) = self.blocks.get_written(block_off) else {
            return Err(Error::invalid(path, "internal: refblock not cached"));
        };
        Ok(encode_refcount(block, block_off, idx, bits, value))
    }
}

/// Refcount blocks and table clusters needed to count `clusters` clusters
/// plus themselves: the fixed point of QEMU's `qcow2_refcount_metadata_size`.
pub(crate) fn refcount_structure(clusters: u64, cs: u64, refcount_order: u32) -> (u64, u64) {
    let per_block = (cs * 8) >> refcount_order;
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let b = (clusters + blocks + table).div_ceil(per_block);
        let t = b.div_ceil(cs / 8);
        if (b, t) == (blocks, table) {
            return (blocks, table);
        }
        (blocks, table) = (b, t);
    }
}

/// The refcount at entry `idx` of a refblock with `bits`-wide entries.
pub(crate) fn decode_refcount(block: &[u8], idx: u64, bits: u64) -> u64 {
    if bits < 8 {
        let bit = idx * bits;
        let byte = block[(bit / 8) as usize];
        u64::from((byte >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
    } else {
        let w = (bits / 8) as usize;
        let at = idx as usize * w;
        block[at..at + w]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Store `value` at entry `idx` of a refblock with `bits`-wide entries;
/// returns the file offset and bytes that changed.
pub(crate) fn encode_refcount(
    block: &mut [u8],
    block_off: u64,
    idx: u64,
    bits: u64,
    value: u64,
) -> (u64, Vec<u8>) {
    if bits < 8 {
        let bit = idx * bits;
        let at = (bit / 8) as usize;
        let shift = bit % 8;
        let mask = (((1u16 << bits) - 1) << shift) as u8;
        block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
        (block_off + at as u64, vec![block[at]])
    } else {
        let w = (bits / 8) as usize;
        let at = idx as usize * w;
        let bytes = value.to_be_bytes();
        block[at..at + w].copy_from_slice(&bytes[8 - w..]);
        (block_off + at as u64, block[at..at + w].to_vec())
    }
}

/// QEMU's `qcow2_detect_metadata_preallocation`: more clusters are in use by
/// refcount than the file has allocated on disk, so most data clusters must
/// be preallocated holes. QEMU then asks the host file whether data clusters
/// are holes and reports those as zero.
pub fn detect_metadata_preallocation(file: &File, path: &Path, h: &Header) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().at(path)?;
    let cs = h.cluster_size();
    let real_clusters = meta.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end_cluster = meta.len().div_ceil(cs);
    let mut refs = Refcounts::load(file, path, h)?;
    let mut count = 0u64;
    let mut i = 0u64;
    while i < end_cluster && count < threshold {
        if refs.get(file, path, i)? != 0 {
            count += 1;
        }
        i += 1;
    }
    // `>=`, as QEMU: a fresh image with one compressed cluster appended
    // (8 clusters in use, 6 allocated on disk) already counts as
    // preallocated, and qemu-img map then reports its data clusters' holes.
    Ok(count >= threshold)
}
