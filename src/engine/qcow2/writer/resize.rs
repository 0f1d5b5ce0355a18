//! Resizing an image that has persistent bitmaps, as `qemu-img resize`
//! resizes it (measured with 10.0.2): every bitmap, enabled or not, comes
//! to cover the new size, its bits as they were, the new range clean, the
//! bits wholly past a smaller end dropped (a partial last granule keeps
//! its bit); an in-use (inconsistent) bitmap refuses the resize, even to
//! the same size, in QEMU's words.
//!
//! QEMU marks the bitmaps in use, resizes in place and stores them again
//! when it closes: a crash in between leaves them inconsistent (and the
//! in-place shrink leaks). Here the whole resize is one switch, as the
//! snapshot and bitmap operations switch ([`super::snapshots`]): a larger
//! L1 table, or for a shrink the L1 table without the entries past the
//! new end and a copy of the L2 table the new end cuts, and the bitmaps'
//! new tables and directory go to clusters free now, counted (with what
//! the dropped tables and entries held released) in a next generation;
//! one header write switches the size, the L1 table, the refcount table
//! and the bitmaps extension together. A crash leaves the old size with
//! the old bitmaps or the new size with the new ones, nothing leaked.

use super::super::bitmap::{bit_count, clear_past, read_bits, storable, MAX_LOADED_BYTES};
use super::super::header::MAX_L1_BYTES;
use super::super::l2::{l1_table_offset, L2Entry};
use super::snapshots::{tables_of, NextGen};
use super::Qcow2Writer;
use crate::engine::error::{Error, IoContext, Result};

impl Qcow2Writer {
    /// Change the disk's size to `new_size` (a multiple of 512) keeping
    /// the persistent bitmaps, in one switch (see the module's comment).
    /// What the caller writes afterwards (the zeros that hide a longer
    /// backing file) is no guest write: the bitmaps record none of it,
    /// as QEMU's do not.
    pub fn resize_keeping_bitmaps(&mut self, new_size: u64) -> Result<()> {
        let mut list = self.bitmaps()?;
        if let Some(bm) = list.iter().find(|b| b.in_use()) {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "Bitmap '{}' is inconsistent and cannot be used\nTry \
                     block-dirty-bitmap-remove to delete this bitmap from disk",
                    String::from_utf8_lossy(&bm.name)
                ),
            ));
        }
        let old = self.virtual_size();
        if new_size == old {
            return Ok(());
        }
        // QEMU resizes and then fails to store such a bitmap ("Lost
        // persistent bitmaps", all left in use, exit 0; measured with
        // 10.0.2); refused here, before anything is written or loaded.
        let mut bytes = 0u64;
        for bm in &list {
            let granularity = u32::from(bm.granularity_bits);
            if !storable(new_size, granularity, self.cs) {
                return Err(Error::invalid(
                    &self.path,
                    format!(
                        "Bitmap '{}' doesn't satisfy the constraints: Too much space will be \
                         occupied by the bitmap. Use larger granularity",
                        String::from_utf8_lossy(&bm.name)
                    ),
                ));
            }
            bytes += bit_count(new_size, granularity).div_ceil(8);
        }
        if bytes > MAX_LOADED_BYTES {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "the persistent bitmaps would take {bytes} bytes at the new size, more \
                     than cowshed loads into memory at once ({MAX_LOADED_BYTES})"
                ),
            ));
        }
        if new_size % 512 != 0 {
            return Err(Error::invalid(
                &self.path,
                "internal: a size not a multiple of 512",
            ));
        }
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        if let Some(d) = self.data.as_ref().filter(|d| d.raw) {
            // The raw view grows with the disk (a longer file is harmless
            // to the old one).
            if d.file.metadata().at(&d.path)?.len() < new_size {
                d.file.set_len(new_size).at(&d.path)?;
            }
        }
        let mut g = NextGen::default();
        let old_l1 = self.l1.clone();
        let span = self.cs * self.l2_entries();
        let mut entries = old_l1.clone();
        let needed = new_size.div_ceil(span);
        if new_size > old {
            if needed > entries.len() as u64 {
                if needed * 8 > MAX_L1_BYTES {
                    return Err(Error::invalid(&self.path, "Active L1 table too large"));
                }
                entries.resize(needed as usize, 0);
            }
        } else {
            // QEMU keeps the L1 table's size and zeroes the entries past
            // the new end.
            let keep = needed as usize;
            self.add_paths(&mut g, &old_l1[keep..], -1)?;
            entries[keep..].fill(0);
            if let Some(last) = keep.checked_sub(1) {
                self.cut_table(&mut g, &mut entries, last, new_size)?;
            }
        }
        let new_l1 = self.settle_active(&mut g, &entries, &tables_of(&old_l1))?;
        let l1_offset = if new_l1 == old_l1 {
            self.h.l1_table_offset
        } else {
            self.add_range(&mut g, self.h.l1_table_offset, old_l1.len() as u64 * 8, -1)?;
            self.place_l1(&mut g, &new_l1)?
        };
        let mut stores = Vec::with_capacity(list.len());
        for (i, bm) in list.iter().enumerate() {
            let mut bits = read_bits(&self.file, &self.path, bm, old, self.cs)?;
            let count = bit_count(new_size, u32::from(bm.granularity_bits));
            bits.resize(count.div_ceil(8) as usize, 0);
            clear_past(&mut bits, count);
            stores.push((i, bits));
        }
        let freed = self.stage_bitmap_stores(&mut g, &mut list, &stores, new_size)?;
        let l1_size = new_l1.len() as u32;
        self.switch_bitmaps_with(g, &list, freed, |h| {
            h.size = new_size;
            h.l1_table_offset = l1_offset;
            h.l1_size = l1_size;
        })?;
        self.l1 = new_l1;
        // The bitmaps are kept: a first write must not clear their
        // autoclear bit.
        self.autoclear_cleared = true;
        if new_size < old {
            self.cut_free_tail()?;
        }
        Ok(())
    }

    /// Drop from L1 entry `index`'s table the entries of the clusters
    /// wholly past `size` (a partial last cluster stays, as in QEMU): the
    /// cut table goes to a new cluster (the old one is what the current
    /// metadata reads), the active L1's path through the old table goes,
    /// one through the copy comes.
    fn cut_table(
        &mut self,
        g: &mut NextGen,
        entries: &mut [u64],
        index: usize,
        size: u64,
    ) -> Result<()> {
        let t = l1_table_offset(entries[index]);
        if t == 0 {
            return Ok(());
        }
        let span = self.cs * self.l2_entries();
        let first = (size.next_multiple_of(self.cs) - index as u64 * span) / self.cs;
        let table = self.table_next(t)?;
        let mut cut = table.clone();
        for i in first as usize..self.l2_entries() as usize {
            self.geo.set_entry_at(&mut cut, i, L2Entry::UNALLOCATED);
        }
        if cut == table {
            return Ok(());
        }
        self.add_paths(g, &entries[index..=index], -1)?;
        let copy = self.alloc_next(g, 1)?;
        // A cluster free now: nothing the image uses changes.
        let raw: Vec<u8> = cut.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&raw, copy)?;
        // Counted once by alloc_next already; add_paths counts the table
        // as well as what it maps.
        self.add_paths(g, &[copy], 1)?;
        self.add_next(g, copy / self.cs, -1)?;
        entries[index] = copy;
        Ok(())
    }
}
