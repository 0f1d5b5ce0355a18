//! Persistent dirty bitmaps: add, remove, clear, enable and disable, as
//! `qemu-img bitmap` leaves them. Each operation is one switch to a next
//! metadata generation built beside the current one, as the snapshot
//! operations do ([`super::snapshots`]): the new bitmap table and
//! directory go to clusters free now, counted (with the old directory and
//! what a removed or cleared bitmap held dropped) in copies of the
//! refcount blocks that change, written to new clusters with a new
//! refcount table; after a flush, one header write switches the refcount
//! table and the bitmaps extension together. A crash before the switch
//! leaves the image as it was, after it as it is meant to be: nothing
//! leaked either way.

use super::super::bitmap::{encode_directory, flags, read_directory, table_entries, BitmapEntry};
use super::super::header::{autoclear, BitmapsExt, MAX_L1_BYTES};
use super::super::l2::bitmap_table_data_offset;
use super::backing::write_header;
use super::snapshots::NextGen;
use super::Qcow2Writer;
use crate::engine::error::{Error, Result};
use crate::engine::fault;

impl Qcow2Writer {
    /// The bitmaps QEMU loads: none without the extension, or when the
    /// autoclear bit is off (a program without bitmap support wrote since,
    /// so QEMU drops them as inconsistent).
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        match &self.h.extensions.bitmaps {
            Some(ext) if self.bitmaps_valid() => read_directory(&self.file, &self.path, ext),
            _ => Ok(Vec::new()),
        }
    }

    fn bitmaps_valid(&self) -> bool {
        self.h.autoclear_features & autoclear::BITMAPS != 0
    }

    /// Add an empty bitmap (all its table entries zero) at the end of the
    /// directory, recording writes if `enabled`.
    pub fn bitmap_add(&mut self, name: &[u8], granularity_bits: u32, enabled: bool) -> Result<()> {
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        let mut list = self.bitmaps()?;
        let entries = table_entries(self.virtual_size(), granularity_bits, self.cs);
        let mut g = NextGen::default();
        let table = self.zero_table(&mut g, entries)?;
        list.push(BitmapEntry::new(
            name,
            granularity_bits as u8,
            enabled,
            table,
            entries as u32,
        ));
        self.switch_bitmaps(g, &list, Vec::new())
    }

    /// Drop bitmap `index` (of [`Self::bitmaps`]) with its table and data.
    pub fn bitmap_remove(&mut self, index: usize) -> Result<()> {
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        let mut list = self.bitmaps()?;
        if index >= list.len() {
            return Err(Error::invalid(&self.path, "internal: no such bitmap"));
        }
        let old = list.remove(index);
        let freed = self.bitmap_clusters(&old)?;
        self.switch_bitmaps(NextGen::default(), &list, freed)
    }

    /// Make bitmap `index` all zeros: a new zero table, the old table and
    /// its data freed after the switch.
    pub fn bitmap_clear(&mut self, index: usize) -> Result<()> {
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        let mut list = self.bitmaps()?;
        let Some(bm) = list.get(index).cloned() else {
            return Err(Error::invalid(&self.path, "internal: no such bitmap"));
        };
        let freed = self.bitmap_clusters(&bm)?;
        let mut g = NextGen::default();
        let table = self.zero_table(&mut g, u64::from(bm.table_size))?;
        list[index].table_offset = table;
        self.switch_bitmaps(g, &list, freed)
    }

    /// Start (`true`) or stop recording writes in bitmap `index`.
    pub fn bitmap_set_enabled(&mut self, index: usize, enabled: bool) -> Result<()> {
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        let mut list = self.bitmaps()?;
        let Some(bm) = list.get_mut(index) else {
            return Err(Error::invalid(&self.path, "internal: no such bitmap"));
        };
        bm.flags = if enabled {
            bm.flags | flags::AUTO
        } else {
            bm.flags & !flags::AUTO
        };
        self.switch_bitmaps(NextGen::default(), &list, Vec::new())
    }

    /// A bitmap table of `entries` zeros in new clusters (offset 0 when
    /// empty).
    fn zero_table(&mut self, g: &mut NextGen, entries: u64) -> Result<u64> {
        if entries == 0 {
            return Ok(0);
        }
        let bytes = entries * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::invalid(&self.path, "bitmap table too large"));
        }
        let off = self.alloc_next(g, bytes.div_ceil(self.cs))?;
        g.writes.push((off, vec![0u8; bytes as usize]));
        Ok(off)
    }

    /// The (offset, length) ranges bitmap `bm` holds: its table and the
    /// data clusters the table points at.
    pub(super) fn bitmap_clusters(&self, bm: &BitmapEntry) -> Result<Vec<(u64, u64)>> {
        let bytes = u64::from(bm.table_size) * 8;
        if bytes == 0 || bm.table_offset == 0 {
            return Ok(Vec::new());
        }
        if bytes > MAX_L1_BYTES || bm.table_offset % self.cs != 0 {
            return Err(Error::invalid(
                &self.path,
                format!(
                    "bitmap '{}' has an invalid table",
                    String::from_utf8_lossy(&bm.name)
                ),
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.pread(&mut raw, bm.table_offset)?;
        let mut out: Vec<(u64, u64)> = super::super::be64_table(&raw)
            .into_iter()
            .map(bitmap_table_data_offset)
            .filter(|&off| off != 0)
            .map(|off| (off, self.cs))
            .collect();
        out.push((bm.table_offset, bytes));
        Ok(out)
    }

    /// Write `list` as the new directory in generation `g`, the old
    /// directory and `freed` dropped from it, switch the header to it in
    /// one write, and carry on from it.
    fn switch_bitmaps(
        &mut self,
        mut g: NextGen,
        list: &[BitmapEntry],
        freed: Vec<(u64, u64)>,
    ) -> Result<()> {
        let old_dir = self
            .h
            .extensions
            .bitmaps
            .clone()
            .filter(|_| self.bitmaps_valid());
        let mut h = self.h.clone();
        // As QEMU on a writable open: the autoclear bits it does not know
        // go.
        h.autoclear_features &= autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        if list.is_empty() {
            h.extensions.bitmaps = None;
            h.autoclear_features &= !autoclear::BITMAPS;
        } else {
            let dir = encode_directory(list);
            // Refused before anything is written: the header with the
            // extension must fit its cluster.
            let mut probe = h.clone();
            probe.extensions.bitmaps = Some(BitmapsExt {
                nb_bitmaps: 1,
                directory_size: 0,
                directory_offset: 0,
            });
            probe.to_cluster(&self.path)?;
            let off = self.alloc_next(&mut g, (dir.len() as u64).div_ceil(self.cs))?;
            h.extensions.bitmaps = Some(BitmapsExt {
                nb_bitmaps: list.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            });
            g.writes.push((off, dir));
            h.autoclear_features |= autoclear::BITMAPS;
        }
        let mut freed = freed;
        if let Some(old) = old_dir {
            freed.push((old.directory_offset, old.directory_size));
        }
        for (off, len) in freed {
            self.add_range(&mut g, off, len, -1)?;
        }
        let (rt_offset, rt_clusters) = self.write_generation(&mut g, "bitmap.written")?;
        fault::point("bitmap.before_switch");
        h.refcount_table_offset = rt_offset;
        h.refcount_table_clusters = rt_clusters as u32;
        write_header(&self.file, &self.path, &mut h)?;
        fault::point("bitmap.switched");
        self.h = h;
        self.carry_on_from(g)
    }
}
