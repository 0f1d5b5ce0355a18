//! Persistent dirty bitmaps: add, remove, clear, enable, disable and
//! store new contents (merge; the writes of a commit or rebase), as
//! QEMU leaves them. Each operation is one switch to a next
//! metadata generation built beside the current one, as the snapshot
//! operations do ([`super::snapshots`]): the new bitmap table and
//! directory go to clusters free now, counted (with the old directory and
//! what a removed or cleared bitmap held dropped) in copies of the
//! refcount blocks that change, written to new clusters with a new
//! refcount table; after a flush, one header write switches the refcount
//! table and the bitmaps extension together. A crash before the switch
//! leaves the image as it was, after it as it is meant to be: nothing
//! leaked either way.

use super::super::bitmap::{
    bit_count, encode_directory, flags, mark, read_bits, read_directory, table_entries, BitmapEntry,
};
use super::super::header::{autoclear, BitmapsExt, Header, MAX_L1_BYTES};
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

    /// Bitmap `index`'s bits (see [`read_bits`]).
    pub fn bitmap_bits(&self, index: usize) -> Result<Vec<u8>> {
        let list = self.bitmaps()?;
        let Some(bm) = list.get(index) else {
            return Err(Error::invalid(&self.path, "internal: no such bitmap"));
        };
        read_bits(&self.file, &self.path, bm, self.virtual_size(), self.cs)
    }

    /// In one switch: store new bits for the bitmaps of `stores` (index,
    /// bits as [`read_bits`] gives them, over the disk's size now) and set
    /// (`true`) or clear the in-use flag of the bitmaps of `in_use`. Each
    /// stored bitmap gets a new table; as QEMU stores them, a table
    /// cluster's worth of zero bits is a zero entry, not a data cluster.
    pub fn bitmaps_store(
        &mut self,
        stores: &[(usize, Vec<u8>)],
        in_use: &[(usize, bool)],
    ) -> Result<()> {
        // The generation is counted from the refcounts on disk.
        self.flush_metadata()?;
        let mut list = self.bitmaps()?;
        let mut g = NextGen::default();
        let size = self.virtual_size();
        let freed = self.stage_bitmap_stores(&mut g, &mut list, stores, size)?;
        for &(index, set) in in_use {
            let Some(bm) = list.get_mut(index) else {
                return Err(Error::invalid(&self.path, "internal: no such bitmap"));
            };
            bm.flags = if set {
                bm.flags | flags::IN_USE
            } else {
                bm.flags & !flags::IN_USE
            };
        }
        self.switch_bitmaps(g, &list, freed)
    }

    /// Stage, in generation `g`, new tables for the bitmaps of `stores`
    /// (index in `list`, bits over a disk of `size` bytes), `list`
    /// pointing at them; what the old tables held is returned, to be
    /// dropped by the switch. As QEMU stores them, a table cluster's worth
    /// of zero bits is a zero entry, not a data cluster.
    pub(super) fn stage_bitmap_stores(
        &mut self,
        g: &mut NextGen,
        list: &mut [BitmapEntry],
        stores: &[(usize, Vec<u8>)],
        size: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let mut freed = Vec::new();
        for (index, bits) in stores {
            let Some(bm) = list.get(*index).cloned() else {
                return Err(Error::invalid(&self.path, "internal: no such bitmap"));
            };
            let granularity = u32::from(bm.granularity_bits);
            let entries = table_entries(size, granularity, self.cs);
            let expected = bit_count(size, granularity).div_ceil(8);
            if bits.len() as u64 != expected || entries * 8 > MAX_L1_BYTES {
                return Err(Error::invalid(&self.path, "internal: bitmap size mismatch"));
            }
            freed.extend(self.bitmap_clusters(&bm)?);
            let mut table = Vec::with_capacity(entries as usize);
            for chunk in bits.chunks(self.cs as usize) {
                if chunk.iter().all(|&b| b == 0) {
                    table.push(0u64);
                    continue;
                }
                let off = self.alloc_next(g, 1)?;
                let mut data = chunk.to_vec();
                data.resize(self.cs as usize, 0);
                g.writes.push((off, data));
                table.push(off);
            }
            table.resize(entries as usize, 0);
            let table_offset = if entries == 0 {
                0
            } else {
                let off = self.alloc_next(g, (entries * 8).div_ceil(self.cs))?;
                g.writes
                    .push((off, table.iter().flat_map(|e| e.to_be_bytes()).collect()));
                off
            };
            list[*index].table_offset = table_offset;
            list[*index].table_size = entries as u32;
        }
        Ok(freed)
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
        g: NextGen,
        list: &[BitmapEntry],
        freed: Vec<(u64, u64)>,
    ) -> Result<()> {
        self.switch_bitmaps_with(g, list, freed, |_| {})
    }

    /// [`Self::switch_bitmaps`], with `edit` applied to the header the
    /// switch writes (a resize's size and L1 table).
    pub(super) fn switch_bitmaps_with(
        &mut self,
        mut g: NextGen,
        list: &[BitmapEntry],
        freed: Vec<(u64, u64)>,
        edit: impl FnOnce(&mut Header),
    ) -> Result<()> {
        let old_dir = self
            .h
            .extensions
            .bitmaps
            .clone()
            .filter(|_| self.bitmaps_valid());
        let mut h = self.h.clone();
        edit(&mut h);
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

/// Persistent bitmaps kept up to date through a run of writes, as QEMU
/// keeps them: on the first write every consistent bitmap is marked in
/// use on disk (a crash from then on leaves them inconsistent, as a QEMU
/// that dies leaves them); the guest ranges written are collected; at the
/// flush the enabled ones get those ranges marked and all are stored with
/// the in-use flag cleared, in one switch.
#[derive(Debug)]
pub(crate) struct Session {
    /// The bitmaps this session marked in use (the in-use ones before it
    /// are left as they are, as QEMU leaves them).
    marked: Vec<usize>,
    /// Guest ranges written, `[start, end)`, adjacent ones joined.
    dirty: Vec<(u64, u64)>,
    recording: bool,
    /// The disk's size when the session began, if it has grown since:
    /// the bitmaps on disk still cover that.
    size_before: Option<u64>,
}

impl Qcow2Writer {
    /// Keep the image's persistent bitmaps valid through the writes to
    /// come, recording them in its enabled bitmaps as QEMU does (commit
    /// into a base, a safe rebase), instead of clearing the autoclear bit
    /// that makes QEMU drop them. With `whole_clusters`, a write marks the
    /// whole clusters of this image it touches, as QEMU's commit marks a
    /// base's bitmaps (measured with qemu-img 10.0.2: a 1 KiB extent
    /// committed into a base of 64 KiB clusters marks 64 KiB).
    pub fn keep_bitmaps(&mut self, whole_clusters: bool) {
        self.keep_bitmaps = true;
        self.bitmap_align = if whole_clusters { self.cs } else { 1 };
    }

    /// Begin a session if bitmaps are to be kept and there are consistent
    /// ones: whether one began.
    pub(super) fn start_bitmap_session(&mut self) -> Result<bool> {
        if !self.keep_bitmaps || self.h.version < 3 || self.bitmap_session.is_some() {
            return Ok(false);
        }
        let list = self.bitmaps()?;
        let marked: Vec<usize> = (0..list.len()).filter(|&i| !list[i].in_use()).collect();
        if list.is_empty() {
            return Ok(false);
        }
        let set: Vec<(usize, bool)> = marked.iter().map(|&i| (i, true)).collect();
        self.bitmaps_store(&[], &set)?;
        fault::point("bitmap.session.marked");
        self.bitmap_session = Some(Session {
            marked,
            dirty: Vec::new(),
            recording: true,
            size_before: None,
        });
        Ok(true)
    }

    /// Guest range `[offset, offset + len)` written.
    pub(super) fn record_write(&mut self, offset: u64, len: u64) {
        let Some(s) = self.bitmap_session.as_mut().filter(|s| s.recording) else {
            return;
        };
        let align = self.bitmap_align.max(1);
        let end = offset.saturating_add(len).next_multiple_of(align);
        let offset = offset - offset % align;
        match s.dirty.last_mut() {
            Some(last) if last.1 >= offset && last.0 <= offset => last.1 = last.1.max(end),
            _ => s.dirty.push((offset, end)),
        }
    }

    /// What follows is no guest write (emptying an image).
    pub(super) fn stop_recording(&mut self) {
        if let Some(s) = self.bitmap_session.as_mut() {
            s.recording = false;
        }
    }

    /// Before the disk grows: the bitmaps the session keeps grow with it
    /// (the new range clean, as QEMU grows them) when stored; an in-use
    /// bitmap refuses the growth, as it fails QEMU's commit job
    /// ("Operation not supported").
    pub(super) fn bitmaps_before_resize(&mut self) -> Result<()> {
        let size = self.virtual_size();
        let Some(s) = self.bitmap_session.as_mut() else {
            if self.keep_bitmaps && !self.bitmaps()?.is_empty() {
                return Err(Error::invalid(
                    &self.path,
                    "cannot grow an image with an in-use (inconsistent) persistent bitmap: \
                     Operation not supported",
                ));
            }
            return Ok(());
        };
        s.size_before.get_or_insert(size);
        let all = self.bitmaps()?.len();
        if self
            .bitmap_session
            .as_ref()
            .is_some_and(|s| s.marked.len() != all)
        {
            return Err(Error::invalid(
                &self.path,
                "cannot grow an image with an in-use (inconsistent) persistent bitmap: \
                 Operation not supported",
            ));
        }
        Ok(())
    }

    /// End the session: the enabled bitmaps it marked get the ranges
    /// written, and all it marked are stored with the in-use flag cleared.
    pub(super) fn finish_bitmap_session(&mut self) -> Result<()> {
        let Some(s) = self.bitmap_session.take() else {
            return Ok(());
        };
        let list = self.bitmaps()?;
        let size = self.virtual_size();
        let mut stores = Vec::new();
        for &i in &s.marked {
            let Some(bm) = list.get(i) else {
                continue;
            };
            let enabled = bm.flags & flags::AUTO != 0;
            if s.size_before.is_none() && (!enabled || s.dirty.is_empty()) {
                continue;
            }
            let granularity = u32::from(bm.granularity_bits);
            let old_size = s.size_before.unwrap_or(size);
            let mut bits = read_bits(&self.file, &self.path, bm, old_size, self.cs)?;
            bits.resize(bit_count(size, granularity).div_ceil(8) as usize, 0);
            if enabled {
                for &(start, end) in &s.dirty {
                    mark(&mut bits, granularity, size, start, end - start);
                }
            }
            stores.push((i, bits));
        }
        let clear: Vec<(usize, bool)> = s.marked.iter().map(|&i| (i, false)).collect();
        self.bitmaps_store(&stores, &clear)?;
        self.autoclear_cleared = false;
        Ok(())
    }
}
