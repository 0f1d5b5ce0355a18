//! The allocating writer: guest writes into an existing qcow2 image, in
//! place, crash-safe by ordering (QCOW2.md §3.3): a refcount is raised
//! before anything points at its cluster, data is written before the L2
//! entry that maps it, an L2 table before the L1 entry, and old clusters
//! are released last. A crash can leak clusters, never leave a reference to
//! an unowned or unwritten one.
//!
//! The order holds on disk, not only in the page cache (which writes back
//! in any order on a power cut), the way QEMU's cache flush dependencies
//! do it: L2 entry changes stay in memory and go out in batches, after an
//! fsync made the data and refcounts they depend on durable; clusters they
//! replaced are released after a second fsync made the tables durable; a
//! new L2 table or refcount block is fsynced before the L1 or refcount
//! table points at it.
//!
//! Covered: v2 and v3, standard L2 entries, every cluster size and refcount
//! width, copy-on-write from the backing chain, clusters and L2 tables
//! shared with internal snapshots (COPIED), compressed clusters rewritten,
//! zero writes (whole clusters freed where QEMU's MAY_UNMAP frees them),
//! extended L2 entries (as QEMU, only the subclusters written become
//! allocated, in place in a cluster this image owns or in a new one for an
//! entry without one; a cluster shared or compressed is copied whole); the
//! L1 table grows when the disk does, the refcount table when the file
//! does. Refused with a clear error
//! for now: encryption. External data files hold the data clusters, at
//! their guest offsets (QEMU's mapping), uncounted; a raw one is kept a
//! valid raw image of the disk.

pub mod amend;
pub mod backing;
pub mod bitmaps;
pub mod resize;
pub mod snapshots;
use super::be64_table;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cache::{TableCache, L2_CACHE_BYTES};
use super::compress;
use super::header::{autoclear, Header};
use super::l2::{is_copied, l1_entry, l1_table_offset, Geometry, L2Entry, Unit};
use super::refcount::{encode_refcount, Refcounts};
use crate::engine::chain::{classify_backing, BackingName};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::{read_up_to, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::Chain;

pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    _lock: ImageLock,
    /// The external data file, when guest data lives there: a data
    /// cluster's host offset is its guest offset in that file (QEMU maps
    /// them one to one and counts no references to them).
    data: Option<DataFile>,
    h: Header,
    geo: Geometry,
    cs: u64,
    l1: Vec<u64>,
    refs: Refcounts,
    /// First cluster index worth looking at for a free cluster.
    free_hint: u64,
    /// The backing chain, for copy-on-write of partially written clusters.
    /// Shared: a caller may read it from another thread while this writes.
    backing: Option<std::sync::Arc<Chain>>,
    autoclear_cleared: bool,
    /// Keep persistent bitmaps up to date through writes, as QEMU does
    /// ([`Qcow2Writer::keep_bitmaps`]), instead of invalidating them.
    keep_bitmaps: bool,
    /// What a write marks in the bitmaps is rounded out to this.
    bitmap_align: u64,
    /// The bitmaps marked in use and the writes they are to record.
    bitmap_session: Option<bitmaps::Session>,
    /// L2 tables read or written, by offset: the writer is the image's only
    /// writer (it holds QEMU's locks), so they stay true. Dirty ones hold
    /// entries not yet written: they go out only after the data and
    /// refcounts they depend on are durable (the cache's flush barrier).
    l2_cache: TableCache<Vec<u64>>,
    /// Host ranges to release once no durable table points at them.
    pending_release: Vec<(u64, u64)>,
    /// Old content of the partly written clusters at the edges of the
    /// current write, by guest offset: read before anything is allocated or
    /// written (see [`Qcow2Writer::read_edges`]).
    edges: Vec<(u64, Vec<u8>)>,
    /// The first cluster wholly past the end of the file as opened, or
    /// past the last one allocated since. The pre-flight check found no
    /// reference beyond the end of the file, so a refcount stored for such
    /// a cluster is a leak: it is free. (Trusting it let a refblock of
    /// garbage past the end push new clusters terabytes out, one refcount
    /// read at a time.)
    past_end: u64,
}

/// Dirty L2 tables or pending releases that trigger a metadata flush on
/// their own, bounding memory and what a power cut can leak.
const DIRTY_TABLES_MAX: usize = 256;
const PENDING_RELEASES_MAX: usize = 8192;

struct DataFile {
    path: PathBuf,
    file: File,
    _lock: ImageLock,
    /// `data_file_raw`: the data file is a valid raw image of the disk
    /// too, so zeros are written into it as well.
    raw: bool,
}

/// Whether a whole zeroed cluster keeps its host cluster (`qemu-io write
/// -z`) or gives it back (BDRV_REQ_MAY_UNMAP, `write -z -u`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroMode {
    KeepAllocation,
    MayUnmap,
}

/// What [`Qcow2Writer::write_direct`] calls to fill `(guest, host, len)`
/// runs of the data file.
pub type FillRuns<'a> = dyn FnMut(&[(u64, u64, u64)]) -> Result<()> + 'a;

/// One cluster of a write: where its bytes go, and what it replaces.
struct Placed {
    guest: u64,
    /// Its L2 entry before the write.
    old: L2Entry,
    host: u64,
    /// A new cluster, mapped after its data is written.
    fresh: bool,
    /// Extended L2: this image's own cluster, written in place, though
    /// some of its subclusters read from the backing or as zeros; the
    /// written ones are marked allocated, the rest keep what they read.
    fill_units: bool,
    /// The L2 entry to store once the data is written (None: unchanged).
    new_entry: Option<L2Entry>,
}

/// Open a qcow2 image read-write under QEMU's writer locks (taken before
/// anything is read, so a running QEMU stops us first) and read its header;
/// dirty images, images marked corrupt and images whose metadata is corrupt
/// are refused before anything is written.
pub(super) fn open_locked(path: &Path) -> Result<(File, ImageLock, Header)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .at(path)?;
    let lock = ImageLock::acquire(&file, path, LockMode::WRITER)?;
    let file_len = file.metadata().at(path)?.len();
    let h = Header::read(&file, path, file_len)?;
    if h.is_corrupt() || h.is_dirty() {
        return Err(Error::invalid(
            path,
            "the image is marked dirty or corrupt; repair it first with `cowshed check -r all`",
        ));
    }
    crate::engine::preflight::ensure_metadata_sound(path, &file)?;
    Ok((file, lock, h))
}

impl Qcow2Writer {
    /// Open `path` for writing: QEMU's writer locks are taken first, so a
    /// running QEMU makes this fail before anything is read or written.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, lock, h) = open_locked(path)?;
        let past_end = file.metadata().at(path)?.len().div_ceil(h.cluster_size());
        let refuse = |what: &str| {
            Err(Error::invalid(
                path,
                format!("cowshed cannot write into images with {what} yet"),
            ))
        };
        if h.crypt_method != super::header::CryptMethod::None {
            return refuse("encryption");
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, h.l1_table_offset).at(path)?;
        let l1 = be64_table(&raw);
        let refs = Refcounts::load(&file, path, &h)?;
        let data = match (&h.extensions.data_file, h.has_data_file()) {
            (Some(name), true) => {
                let data_path = crate::engine::chain::data_file_path(name);
                let data_file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&data_path)
                    .map_err(|e| {
                        Error::invalid(
                            path,
                            format!(
                                "Could not open external data file '{}': {e}",
                                data_path.display()
                            ),
                        )
                    })?;
                let lock = ImageLock::acquire(&data_file, &data_path, LockMode::WRITER)?;
                Some(DataFile {
                    path: data_path,
                    file: data_file,
                    _lock: lock,
                    raw: h.data_file_raw(),
                })
            }
            (None, true) => return refuse("an external data file it cannot name"),
            _ => None,
        };
        let backing = match &h.backing_file {
            None => None,
            Some(name) => {
                let BackingName::Path(p) = classify_backing(path, name) else {
                    return Err(Error::UnfollowedBacking {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        kind: "json: or protocol",
                    });
                };
                let fmt = h
                    .extensions
                    .backing_format
                    .as_deref()
                    .and_then(Format::from_name);
                // A file that cannot be opened is named with what it is
                // to this image, as when the chain is opened from the top.
                let chain = Chain::open(&p, fmt).map_err(|e| match e {
                    Error::Io { cause, .. } => Error::invalid(
                        path,
                        format!("Could not open backing file '{}': {cause}", p.display()),
                    ),
                    other => other,
                })?;
                Some(std::sync::Arc::new(chain))
            }
        };
        Ok(Qcow2Writer {
            path: path.to_path_buf(),
            geo: Geometry {
                cluster_bits: h.cluster_bits,
                extended: h.has_extended_l2(),
                external_data: h.has_data_file(),
                version: h.version,
            },
            cs: h.cluster_size(),
            file,
            _lock: lock,
            data,
            l1,
            refs,
            free_hint: 0,
            backing,
            autoclear_cleared: false,
            keep_bitmaps: false,
            bitmap_align: 1,
            bitmap_session: None,
            l2_cache: TableCache::new(L2_CACHE_BYTES, h.cluster_size()),
            pending_release: Vec::new(),
            edges: Vec::new(),
            past_end,
            h,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.h.size & !511
    }

    fn pwrite(&self, buf: &[u8], off: u64) -> Result<()> {
        self.file.write_all_at(buf, off).at(&self.path)
    }

    fn pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let n = read_up_to(&self.file, buf, off).at(&self.path)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Where data clusters live: the external data file, else the image.
    fn data_target(&self) -> (&Path, &File) {
        match &self.data {
            Some(d) => (&d.path, &d.file),
            None => (&self.path, &self.file),
        }
    }

    /// Read a data cluster's bytes (zeros past the end of its file).
    fn data_pread(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let (path, file) = self.data_target();
        let n = read_up_to(file, buf, off).at(path)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// Make `[off, off + len)` of a raw external data file read as zeros,
    /// so its raw view stays the disk's (a hole where the file system can).
    fn zero_raw_data(&self, off: u64, len: u64) -> Result<()> {
        let Some(d) = self.data.as_ref().filter(|d| d.raw) else {
            return Ok(());
        };
        crate::engine::raw::zero_range(&d.file, &d.path, off, len)
    }

    /// Autoclear bits mark extensions a writer keeps consistent (bitmaps);
    /// cowshed does not maintain them, so it clears them before its first
    /// write, as QEMU clears the ones it does not know.
    fn before_first_write(&mut self) -> Result<()> {
        if self.autoclear_cleared {
            return Ok(());
        }
        if self.start_bitmap_session()? {
            self.autoclear_cleared = true;
            return Ok(());
        }
        if self.h.version >= 3 && self.h.autoclear_features & !autoclear::DATA_FILE_RAW != 0 {
            self.h.autoclear_features &= autoclear::DATA_FILE_RAW;
            self.h.patch_autoclear(&self.file, &self.path)?;
        }
        self.autoclear_cleared = true;
        Ok(())
    }

    // ---------------------------------------------------------- refcounts --

    fn refcount(&mut self, cluster: u64) -> Result<u64> {
        self.refs.get(&self.file, &self.path, cluster)
    }

    /// Set a refcount, creating the refblock that covers it if needed.
    fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        if self.refs.refblock_offset(cluster).is_none() {
            self.new_refblock(cluster)?;
        }
        let (off, bytes) = self
            .refs
            .set_in_block(&self.file, &self.path, cluster, value)?;
        self.pwrite(&bytes, off)
    }

    /// A refblock for `cluster`'s range, placed in the first free cluster.
    /// If that cluster lies in the new block's own range the block counts
    /// itself; else the block covering it is made (or updated) first.
    fn new_refblock(&mut self, cluster: u64) -> Result<()> {
        let per_block = self.refs.per_block();
        let index = cluster / per_block;
        if index >= self.refs.reftable_entries() {
            return self.grow_reftable(cluster);
        }
        let at = self.find_free(1)?;
        // Taken: a refblock made for `at` below must not land on it.
        self.free_hint = at + 1;
        let mut block = vec![0u8; self.cs as usize];
        let bits = 1u64 << self.h.refcount_order;
        if at / per_block == index {
            encode_refcount(&mut block, at * self.cs, at % per_block, bits, 1);
            self.pwrite(&block, at * self.cs)?;
        } else {
            // Claim the block's own cluster in the block covering it.
            self.pwrite(&block, at * self.cs)?;
            self.set_refcount(at, 1)?;
        }
        // The block is on disk before the table points at it.
        self.file.sync_data().at(&self.path)?;
        fault::point("writer.refblock.before_link");
        self.pwrite(
            &(at * self.cs).to_be_bytes(),
            self.h.refcount_table_offset + index * 8,
        )?;
        self.refs.install_refblock(index, at * self.cs, block);
        Ok(())
    }

    /// The refcount table cannot reach `cluster`'s refblock: a larger table
    /// goes into fresh clusters past everything in use, with the new
    /// refblocks it needs (for `cluster` and for the new clusters
    /// themselves), as QEMU's refcount area does. Blocks and table are
    /// written and flushed before the header points at them (its offset and
    /// size fields are adjacent: one write); the old table is released
    /// last. A crash before the switch leaks the new clusters at worst.
    fn grow_reftable(&mut self, cluster: u64) -> Result<()> {
        let cs = self.cs;
        let per_block = self.refs.per_block();
        let old_entries = self.refs.reftable_entries();
        let file_clusters = self.file.metadata().at(&self.path)?.len().div_ceil(cs);
        // Past the file, the caller's cluster and anything it reserved.
        let start = file_clusters.max(cluster + 1).max(self.free_hint);
        let needs_block = |i: u64, refs: &Refcounts| refs.refblock_offset(i * per_block).is_none();
        // Fixed point: the new clusters must be counted by the blocks and
        // the table they are part of.
        let mut new_blocks: Vec<u64> = Vec::new();
        let mut table_clusters = 1u64;
        let entries = loop {
            let end = start + new_blocks.len() as u64 + table_clusters;
            let covered = ((end - 1) / per_block + 1).max(cluster / per_block + 1);
            // Headroom, so the table does not grow again at every block.
            let entries = (covered.max(old_entries) * 3 / 2).next_multiple_of(cs / 8);
            let want_clusters = entries * 8 / cs;
            let mut want_blocks: Vec<u64> = (start / per_block..=(end - 1) / per_block)
                .chain(std::iter::once(cluster / per_block))
                .filter(|&i| needs_block(i, &self.refs))
                .collect();
            want_blocks.sort_unstable();
            want_blocks.dedup();
            if want_blocks == new_blocks && want_clusters == table_clusters {
                break entries;
            }
            new_blocks = want_blocks;
            table_clusters = want_clusters;
        };
        if entries * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::invalid(
                &self.path,
                "the refcount table would exceed QEMU's 8 MiB limit",
            ));
        }
        let bits = 1u64 << self.h.refcount_order;
        let table_off = (start + new_blocks.len() as u64) * cs;
        let mut blocks: Vec<(u64, u64, Vec<u8>)> = new_blocks
            .iter()
            .enumerate()
            .map(|(k, &i)| (i, (start + k as u64) * cs, vec![0u8; cs as usize]))
            .collect();
        // Count the new clusters: in a new block where one covers them,
        // else in the existing block (before the switch: a leak at worst).
        let area_end = table_off / cs + table_clusters;
        // Taken, though past what `find_free` was asked for.
        self.past_end = self.past_end.max(area_end);
        for c in start..area_end {
            if let Some((_, off, block)) = blocks.iter_mut().find(|(i, ..)| *i == c / per_block) {
                encode_refcount(block, *off, c % per_block, bits, 1);
            } else {
                self.set_refcount(c, 1)?;
            }
        }
        let mut table: Vec<u64> = self.refs.table().to_vec();
        table.resize(entries as usize, 0);
        for (i, off, block) in &blocks {
            self.pwrite(block, *off)?;
            table[*i as usize] = *off;
        }
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.pwrite(&raw, table_off)?;
        self.file.sync_data().at(&self.path)?;
        fault::point("writer.reftable.before_switch");
        let mut next = self.h.clone();
        next.refcount_table_offset = table_off;
        next.refcount_table_clusters = table_clusters as u32;
        next.patch_refcount_table(&self.file, &self.path)?;
        fault::point("writer.reftable.switched");
        let old = (
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        );
        self.h = next;
        self.refs = Refcounts::load(&self.file, &self.path, &self.h)?;
        self.release(old.0, old.1)
    }

    /// The first `n` contiguous clusters with refcount 0.
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let mut c = self.free_hint;
        let mut run = 0;
        loop {
            if c >= self.past_end || self.refcount(c)? == 0 {
                run += 1;
                if run == n {
                    self.past_end = self.past_end.max(c + 1);
                    return Ok(c + 1 - n);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    /// Allocate one cluster: its refcount is 1 on disk when this returns.
    fn alloc_cluster(&mut self) -> Result<u64> {
        self.alloc_clusters(1)
    }

    /// Allocate `n` contiguous clusters; their refcounts are 1 on disk when
    /// this returns (one write per refblock touched). Returns the byte
    /// offset of the first.
    fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let c = self.find_free(n)?;
        // Taken before the refcounts are set: a new refblock must not land
        // in the run.
        self.free_hint = c + n;
        let mut pending: Option<(u64, Vec<u8>)> = None;
        for k in c..c + n {
            if self.refs.refblock_offset(k).is_none() {
                if let Some((off, bytes)) = pending.take() {
                    self.pwrite(&bytes, off)?;
                }
                self.new_refblock(k)?;
            }
            let (off, bytes) = self.refs.set_in_block(&self.file, &self.path, k, 1)?;
            pending = match pending.take() {
                // Sub-byte refcounts: the same byte again.
                Some((p, mut acc)) if p + acc.len() as u64 - 1 == off && bytes.len() == 1 => {
                    *acc.last_mut().unwrap_or(&mut 0) = bytes[0];
                    Some((p, acc))
                }
                Some((p, mut acc)) if p + acc.len() as u64 == off => {
                    acc.extend_from_slice(&bytes);
                    Some((p, acc))
                }
                Some((p, acc)) => {
                    self.pwrite(&acc, p)?;
                    Some((off, bytes))
                }
                None => Some((off, bytes)),
            };
        }
        if let Some((off, bytes)) = pending {
            self.pwrite(&bytes, off)?;
        }
        Ok(c * self.cs)
    }

    /// Drop one reference to each cluster of `[offset, offset + len)`.
    fn release(&mut self, offset: u64, len: u64) -> Result<()> {
        let mut freed = Vec::new();
        self.drop_references(offset, len, &mut freed)?;
        self.punch_freed(freed);
        Ok(())
    }

    /// Drop one reference to each cluster of `[offset, offset + len)`;
    /// the clusters left unreferenced are added to `freed`.
    fn drop_references(&mut self, offset: u64, len: u64, freed: &mut Vec<u64>) -> Result<()> {
        let first = offset / self.cs;
        let last = (offset + len - 1) / self.cs;
        for c in first..=last {
            let r = self.refcount(c)?;
            if r == 0 {
                return Err(Error::invalid(
                    &self.path,
                    format!("refcount of cluster {c} would drop below zero; run `cowshed check`"),
                ));
            }
            self.set_refcount(c, r - 1)?;
            if r == 1 {
                self.free_hint = self.free_hint.min(c);
                freed.push(c);
            }
        }
        Ok(())
    }

    /// Give unreferenced clusters' space back to the file system, one
    /// hole per run of adjacent ones: a hole punched costs about as much
    /// whatever its length (measured: a commit freeing 486 clusters of the
    /// 2 GiB fixture one by one spent 0.8 s in fallocate).
    fn punch_freed(&self, mut freed: Vec<u64>) {
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let n = (j - i) as u64;
            let _ = crate::engine::raw::punch_hole(&self.file, freed[i] * self.cs, n * self.cs);
            i = j;
        }
    }

    // -------------------------------------------------------------- L1/L2 --

    /// Entries per L2 table (16-byte entries with extended L2).
    fn l2_entries(&self) -> u64 {
        self.cs / (8 * self.geo.entry_words() as u64)
    }

    /// Index of `g`'s entry in its L2 table.
    fn l2_index(&self, g: u64) -> usize {
        (g / self.cs % self.l2_entries()) as usize
    }

    /// The L2 table for guest offset `g`, writable in place (COPIED):
    /// allocated when missing, copied when shared with a snapshot.
    fn l2_for_write(&mut self, g: u64) -> Result<u64> {
        let idx = (g / (self.cs * self.l2_entries())) as usize;
        let entry = self.l1[idx];
        let off = l1_table_offset(entry);
        if off != 0 && is_copied(entry) {
            return Ok(off);
        }
        let new = self.alloc_cluster()?;
        let mut table = vec![0u8; self.cs as usize];
        if off != 0 {
            self.pread(&mut table, off)?;
        }
        self.pwrite(&table, new)?;
        // Data and refcounts, then the new table, durable before the L1
        // points at it.
        self.file.sync_data().at(&self.path)?;
        fault::point("writer.l2_table.before_link");
        self.cache_table(new, &table)?;
        let new_entry = l1_entry(new);
        self.pwrite(
            &new_entry.to_be_bytes(),
            self.h.l1_table_offset + idx as u64 * 8,
        )?;
        self.l1[idx] = new_entry;
        if off != 0 {
            self.pending_release.push((off, self.cs));
        }
        Ok(new)
    }

    fn cache_table(&mut self, off: u64, raw: &[u8]) -> Result<()> {
        if self.l2_cache.full_of_dirty() {
            // Dirty tables are written before the cache forgets any.
            self.flush_metadata()?;
        }
        self.l2_cache
            .insert(off, be64_table(raw))
            .map_err(|_| Error::invalid(&self.path, "internal: L2 cache full after a flush"))
    }

    /// The cached L2 table at `off`, read in if it was evicted (then it
    /// was clean: the file has it as it is).
    fn l2_table_dirty(&mut self, off: u64) -> Result<&mut Vec<u64>> {
        if !self.l2_cache.contains(off) {
            let mut raw = vec![0u8; self.cs as usize];
            self.pread(&mut raw, off)?;
            self.cache_table(off, &raw)?;
        }
        match self.l2_cache.get_dirty(off) {
            Some(table) => Ok(table),
            None => Err(Error::invalid(&self.path, "internal: L2 table not cached")),
        }
    }

    /// Write what the in-memory state owes the file, in dependency order:
    /// fsync (data and refcounts durable), dirty L2 tables, fsync (tables
    /// durable), then the releases of what they no longer point at.
    fn flush_metadata(&mut self) -> Result<()> {
        let (file, path) = (&self.file, &self.path);
        let barrier = || {
            file.sync_data().at(path)?;
            fault::point("writer.l2_batch.before");
            Ok(())
        };
        let write = |off: u64, table: &Vec<u64>| {
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            file.write_all_at(&raw, off).at(path)
        };
        if self.l2_cache.flush(barrier, write)? {
            fault::point("writer.l2_batch.after");
        }
        if !self.pending_release.is_empty() {
            self.file.sync_data().at(&self.path)?;
            fault::point("writer.releases.before");
            let mut freed = Vec::new();
            for (off, len) in std::mem::take(&mut self.pending_release) {
                self.drop_references(off, len, &mut freed)?;
            }
            self.punch_freed(freed);
            fault::point("writer.releases.after");
        }
        Ok(())
    }

    /// Keep the memory held by deferred metadata bounded.
    fn bound_deferred(&mut self) -> Result<()> {
        if self.l2_cache.dirty_count() > DIRTY_TABLES_MAX
            || self.pending_release.len() > PENDING_RELEASES_MAX
        {
            self.flush_metadata()?;
        }
        Ok(())
    }

    /// `g`'s L2 entry (with its subcluster bitmap under extended L2).
    fn l2_entry(&mut self, g: u64) -> Result<L2Entry> {
        let idx = (g / (self.cs * self.l2_entries())) as usize;
        let off = l1_table_offset(self.l1[idx]);
        if off == 0 {
            return Ok(L2Entry::UNALLOCATED);
        }
        let (geo, i) = (self.geo, self.l2_index(g));
        if let Some(table) = self.l2_cache.get(off) {
            return Ok(geo.entry_at(table, i));
        }
        let mut raw = vec![0u8; self.cs as usize];
        self.pread(&mut raw, off)?;
        self.cache_table(off, &raw)?;
        Ok(self
            .l2_cache
            .get(off)
            .map_or(L2Entry::UNALLOCATED, |t| geo.entry_at(t, i)))
    }

    /// Set entries of one L2 table in memory; [`Self::flush_metadata`]
    /// writes them out.
    fn set_l2_entries(&mut self, l2: u64, entries: &[(u64, L2Entry)]) -> Result<()> {
        let (geo, span) = (self.geo, self.cs * self.l2_entries());
        let table = self.l2_table_dirty(l2)?;
        for &(g, entry) in entries {
            geo.set_entry_at(table, (g % span / geo.cluster_size()) as usize, entry);
        }
        Ok(())
    }

    fn set_l2_entry(&mut self, l2: u64, g: u64, value: L2Entry) -> Result<()> {
        self.set_l2_entries(l2, &[(g, value)])
    }

    // --------------------------------------------------------------- data --

    /// The guest content of the whole cluster at `g`, as it reads now
    /// (unit by unit: subclusters with extended L2).
    fn cluster_content(&mut self, g: u64, entry: L2Entry, buf: &mut [u8]) -> Result<()> {
        let unit = self.geo.unit_size() as usize;
        for (sc, part) in buf.chunks_mut(unit).enumerate() {
            let at = g + (sc * unit) as u64;
            match self.geo.classify(entry, sc as u64) {
                Unit::Normal(host) => self.data_pread(part, host)?,
                Unit::ZeroPlain | Unit::ZeroAlloc(_) => part.fill(0),
                Unit::Compressed(desc) => {
                    // Compressed clusters have no subclusters: the whole one.
                    let (host, span) = self.geo.compressed_span(desc);
                    let mut input = vec![0u8; span as usize];
                    self.pread(&mut input, host)?;
                    return compress::decompress(self.h.compression_type, &input, buf).map_err(
                        |why| {
                            Error::invalid(
                                &self.path,
                                format!("compressed cluster at 0x{g:x}: {why}"),
                            )
                        },
                    );
                }
                Unit::Unallocated | Unit::UnallocatedAlloc(_) => self.backing_read(at, part)?,
                Unit::Invalid(why) => {
                    return Err(Error::invalid(
                        &self.path,
                        format!("{why} at guest offset 0x{at:x}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Backing data (zeros past a shorter backing or without one).
    fn backing_read(&self, g: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        let Some(chain) = &self.backing else {
            return Ok(());
        };
        let size = chain.virtual_size();
        if g >= size {
            return Ok(());
        }
        let n = (buf.len() as u64).min(size - g) as usize;
        chain.read_at(&mut buf[..n], g)
    }

    /// Release what an L2 entry owned in this image (after it was
    /// replaced), once the table that replaced it is durable.
    fn release_entry(&mut self, entry: L2Entry) {
        if self.data.is_some() {
            // Data clusters in an external file are not refcounted.
            return;
        }
        if let Some(range) = self.geo.occupied(entry) {
            self.pending_release.push(range);
        }
    }

    /// Whether this image alone owns every cluster of `[offset, offset +
    /// len)` as data (allocated, COPIED, in a COPIED L2 table), so writing
    /// there needs no new cluster. Past the end of the disk: no.
    pub fn owns_range(&mut self, offset: u64, len: u64) -> Result<bool> {
        if self.check_range(offset, len).is_err() {
            return Ok(false);
        }
        let cs = self.cs;
        let span = cs * self.l2_entries();
        let mut g = offset - offset % cs;
        while g < offset + len {
            if !is_copied(self.l1[(g / span) as usize]) {
                return Ok(false);
            }
            let entry = self.l2_entry(g)?;
            if self.geo.owned_data(entry).is_none() {
                return Ok(false);
            }
            g += cs;
        }
        Ok(true)
    }

    /// The file data clusters live in (the image, or its external data
    /// file): what [`Qcow2Writer::write_direct`]'s runs are offsets of.
    pub fn data_file(&self) -> &File {
        self.data_target().1
    }

    /// Write guest bytes at `offset`.
    pub fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.read_edges(offset, offset + data.len() as u64)?;
        self.before_first_write()?;
        self.record_write(offset, data.len() as u64);
        let span = self.cs * self.l2_entries();
        let mut done = 0usize;
        let r = (|| {
            while done < data.len() {
                let g = offset + done as u64;
                let n = ((span - g % span) as usize).min(data.len() - done);
                self.write_in_table(&data[done..done + n], g)?;
                done += n;
            }
            Ok(())
        })();
        self.edges.clear();
        r
    }

    /// Read the old content of the clusters `[offset, end)` only partly
    /// covers and that will be copied into new clusters (the first and the
    /// last), before the write allocates or writes anything: a backing
    /// file or compressed cluster that cannot be read then fails the write
    /// with the image as it was, not with clusters allocated for nothing.
    fn read_edges(&mut self, offset: u64, end: u64) -> Result<()> {
        self.edges.clear();
        if offset >= end {
            return Ok(());
        }
        let cs = self.cs;
        let first = offset - offset % cs;
        let last = (end - 1) - (end - 1) % cs;
        for g in [first, last] {
            let partial = offset > g || end < g + cs;
            if !partial || self.edges.iter().any(|e| e.0 == g) {
                continue;
            }
            let old = self.l2_entry(g)?;
            if self.geo.owned_data(old).is_some() {
                continue;
            }
            let mut buf = vec![0u8; cs as usize];
            self.cluster_content(g, old, &mut buf)?;
            self.edges.push((g, buf));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.virtual_size())
        {
            return Err(Error::invalid(
                &self.path,
                format!("write of {len} bytes at {offset} is past the end of the disk"),
            ));
        }
        Ok(())
    }

    /// Write `data` at guest `offset`, all under one L2 table. Clusters this
    /// image owns alone are written in place; the others get new clusters,
    /// allocated as one contiguous run where the file allows (refcounts on
    /// disk first), filled (old content around partial writes), and only
    /// then mapped, with one write for the table's changed entries; what
    /// they replaced is released last. Adjacent host ranges go out in one
    /// vectored write.
    fn write_in_table(&mut self, data: &[u8], offset: u64) -> Result<()> {
        let cs = self.cs;
        let l2 = self.l2_for_write(offset)?;
        let first = offset - offset % cs;
        let end = offset + data.len() as u64;
        let mut placed = self.place(first, end)?;
        // Partial new clusters carry the old content around the new bytes.
        let mut merged: Vec<Vec<u8>> = Vec::new();
        let mut plan: Vec<(u64, usize, usize, Option<usize>)> = Vec::new();
        let unit = self.geo.unit_size();
        for p in placed.iter_mut() {
            let lo = offset.max(p.guest);
            let hi = end.min(p.guest + cs);
            let range = ((lo - offset) as usize, (hi - offset) as usize);
            if hi - lo < cs && (p.fill_units || self.fresh_by_units(p)) {
                // Only the subclusters written become allocated; the bytes
                // of theirs the write leaves out keep what they read.
                let (ulo, uhi) = (
                    (lo - p.guest) / unit * unit,
                    (hi - p.guest).next_multiple_of(unit),
                );
                let units = ((1u64 << ((uhi - ulo) / unit)) - 1) << (ulo / unit);
                let bitmap = (p.old.bitmap | units) & !(units << 32);
                let word = if p.fresh {
                    self.geo.data_entry(p.host).word
                } else {
                    p.old.word
                };
                p.new_entry = Some(L2Entry::new(word, bitmap));
                if ulo == lo - p.guest && uhi == hi - p.guest {
                    plan.push((p.host + (lo - p.guest), range.0, range.1, None));
                    continue;
                }
                let mut buf = match self.edges.iter().position(|e| e.0 == p.guest) {
                    Some(i) => self.edges.swap_remove(i).1,
                    None => {
                        let mut buf = vec![0u8; cs as usize];
                        self.cluster_content(p.guest, p.old, &mut buf)?;
                        buf
                    }
                };
                buf[(lo - p.guest) as usize..(hi - p.guest) as usize]
                    .copy_from_slice(&data[range.0..range.1]);
                merged.push(buf[ulo as usize..uhi as usize].to_vec());
                plan.push((p.host + ulo, 0, 0, Some(merged.len() - 1)));
            } else if p.fresh && hi - lo < cs {
                let mut buf = match self.edges.iter().position(|e| e.0 == p.guest) {
                    Some(i) => self.edges.swap_remove(i).1,
                    None => {
                        let mut buf = vec![0u8; cs as usize];
                        self.cluster_content(p.guest, p.old, &mut buf)?;
                        buf
                    }
                };
                buf[(lo - p.guest) as usize..(hi - p.guest) as usize]
                    .copy_from_slice(&data[range.0..range.1]);
                merged.push(buf);
                plan.push((p.host, 0, 0, Some(merged.len() - 1)));
            } else {
                plan.push((p.host + (lo - p.guest), range.0, range.1, None));
            }
        }
        let pieces: Vec<(u64, &[u8])> = plan
            .iter()
            .map(|&(host, a, b, m)| (host, m.map_or(&data[a..b], |i| &merged[i][..])))
            .collect();
        self.pwrite_runs(&pieces)?;
        self.map_fresh(l2, &placed)
    }

    /// Where each cluster of `[first, end)` (one L2 table's range) is
    /// written: in place where this image owns it alone, else in a new
    /// cluster (one contiguous run, refcounts on disk when this returns;
    /// external data: at its guest offset).
    fn place(&mut self, first: u64, end: u64) -> Result<Vec<Placed>> {
        let cs = self.cs;
        let mut placed = Vec::new();
        let mut g = first;
        while g < end {
            let old = self.l2_entry(g)?;
            let (host, fresh, fill_units) = match self.geo.owned_data(old) {
                Some(host) => (host, false, false),
                None => match self.owned_with_units_elsewhere(old) {
                    Some(host) => (host, false, true),
                    None => (0, true, false),
                },
            };
            placed.push(Placed {
                guest: g,
                old,
                host,
                fresh,
                fill_units,
                new_entry: None,
            });
            g += cs;
        }
        let fresh = placed.iter().filter(|p| p.fresh).count() as u64;
        let mut next = if fresh > 0 && self.data.is_none() {
            self.alloc_clusters(fresh)?
        } else {
            0
        };
        for p in placed.iter_mut().filter(|p| p.fresh) {
            p.host = if self.data.is_some() { p.guest } else { next };
            next += cs;
        }
        // Whole clusters read as their data once written; a partial write
        // into a `fill_units` cluster narrows this (see `write_in_table`).
        for p in placed.iter_mut().filter(|p| p.fresh || p.fill_units) {
            p.new_entry = Some(self.geo.data_entry(p.host));
        }
        Ok(placed)
    }

    /// Extended L2: a new cluster for an entry that had none (its
    /// subclusters read from the backing or as zeros) takes only the
    /// subclusters written, as QEMU allocates them; the others keep
    /// reading what they read. One replacing a host cluster (shared with
    /// a snapshot, compressed) is copied whole.
    fn fresh_by_units(&self, p: &Placed) -> bool {
        p.fresh
            && self.geo.extended
            && self.data.is_none()
            && p.old.host() == 0
            && !p.old.is_compressed()
    }

    /// Extended L2: the host cluster of an entry this image alone owns
    /// (COPIED, neither compressed nor invalid) but whose subclusters are
    /// not all its data. QEMU writes such a cluster in place, subcluster
    /// by subcluster, rather than copying it to a new one; so does this.
    fn owned_with_units_elsewhere(&self, e: L2Entry) -> Option<u64> {
        if !self.geo.extended || self.data.is_some() || e.is_compressed() || !e.is_copied() {
            return None;
        }
        let host = e.host();
        let sound = (0..self.geo.units_per_cluster())
            .all(|sc| !matches!(self.geo.classify(e, sc), Unit::Invalid(_)));
        (host != 0 && sound).then_some(host)
    }

    /// Map the new clusters of `placed` (their data is written), mark the
    /// subclusters written in place, and release what new clusters replace
    /// once that is durable.
    fn map_fresh(&mut self, l2: u64, placed: &[Placed]) -> Result<()> {
        let entries: Vec<(u64, L2Entry)> = placed
            .iter()
            .filter_map(|p| Some((p.guest, p.new_entry?)))
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        self.set_l2_entries(l2, &entries)?;
        for p in placed.iter().filter(|p| p.fresh) {
            self.release_entry(p.old);
        }
        self.bound_deferred()
    }

    /// Write whole clusters `[offset, offset + len)` with bytes the caller
    /// puts in place itself (say, `copy_file_range` from another file):
    /// the writer places the clusters as [`Qcow2Writer::write`] would (in
    /// place where this image owns them, else new ones, refcounts first),
    /// calls `fill` with the `(guest, host, len)` runs of its data file
    /// ([`Qcow2Writer::data_file`]) to fill, and maps the new clusters only
    /// after `fill` returned. False, with nothing done, when the range is
    /// not made of whole clusters.
    pub fn write_direct(&mut self, offset: u64, len: u64, fill: &mut FillRuns) -> Result<bool> {
        let cs = self.cs;
        if offset % cs != 0 || len % cs != 0 {
            return Ok(false);
        }
        self.check_range(offset, len)?;
        self.before_first_write()?;
        self.record_write(offset, len);
        let span = cs * self.l2_entries();
        let end = offset + len;
        let mut g = offset;
        while g < end {
            let table_end = ((g / span + 1) * span).min(end);
            let l2 = self.l2_for_write(g)?;
            let placed = self.place(g, table_end)?;
            let mut runs: Vec<(u64, u64, u64)> = Vec::new();
            for p in &placed {
                match runs.last_mut() {
                    Some((_, h, n)) if *h + *n == p.host => *n += cs,
                    _ => runs.push((p.guest, p.host, cs)),
                }
            }
            fill(&runs)?;
            self.map_fresh(l2, &placed)?;
            g = table_end;
        }
        Ok(true)
    }

    /// Write `(host offset, bytes)` pieces of data clusters, merging
    /// host-contiguous ones into one vectored write.
    fn pwrite_runs(&self, pieces: &[(u64, &[u8])]) -> Result<()> {
        let mut i = 0;
        while i < pieces.len() {
            let start = pieces[i].0;
            let mut end = start + pieces[i].1.len() as u64;
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].0 == end && j - i < 512 {
                end += pieces[j].1.len() as u64;
                j += 1;
            }
            let (path, file) = self.data_target();
            if j - i == 1 {
                file.write_all_at(pieces[i].1, start).at(path)?;
            } else {
                let slices: Vec<std::io::IoSlice> = pieces[i..j]
                    .iter()
                    .map(|p| std::io::IoSlice::new(p.1))
                    .collect();
                let n = nix::sys::uio::pwritev(file, &slices, start as i64)
                    .map_err(std::io::Error::from)
                    .at(path)?;
                // A short write: the rest one piece at a time.
                let mut at = start;
                for p in &pieces[i..j] {
                    let len = p.1.len() as u64;
                    if at + len > start + n as u64 {
                        let skip = (start + n as u64).saturating_sub(at) as usize;
                        file.write_all_at(&p.1[skip..], at + skip as u64).at(path)?;
                    }
                    at += len;
                }
            }
            i = j;
        }
        Ok(())
    }

    fn write_cluster(&mut self, g: u64, in_cluster: usize, bytes: &[u8]) -> Result<()> {
        self.write_in_table(bytes, g + in_cluster as u64)
    }

    /// Make `[offset, offset + len)` read as zeros: whole clusters become
    /// zero clusters (v3; an allocated cluster owned here keeps its space,
    /// as `qemu-io write -z` does), partial ones get zero bytes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, ZeroMode::KeepAllocation)
    }

    /// Zeros as [`Qcow2Writer::write_zeroes`] writes them, except that
    /// whole clusters give their host cluster back, as QEMU's write-zeroes
    /// with BDRV_REQ_MAY_UNMAP does (what `qemu-img commit` asks of the
    /// base; checked with `qemu-img map` and `check`): v3 clusters become
    /// zero clusters without an offset (preallocated, extended-L2 and
    /// snapshot-shared ones too), v2 clusters of an image without backing
    /// become unallocated (they read as zeros then), and a v2 image with a
    /// backing still gets zero bytes. Partial clusters get zero bytes.
    /// The freed clusters are released only once the L2 tables that no
    /// longer point at them are durable: a crash leaks them at worst.
    pub fn write_zeroes_unmap(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, ZeroMode::MayUnmap)
    }

    fn zero_range(&mut self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.check_range(offset, len)?;
        self.read_edges(offset, offset + len)?;
        let r = self.write_zeroes_edges_read(offset, len, mode);
        self.edges.clear();
        r
    }

    fn write_zeroes_edges_read(&mut self, offset: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.before_first_write()?;
        self.record_write(offset, len);
        let unmap = mode == ZeroMode::MayUnmap;
        let end = offset + len;
        let mut g = offset;
        while g < end {
            let cluster = g - g % self.cs;
            let n = (cluster + self.cs).min(end) - g;
            let v2_discard =
                unmap && self.h.version < 3 && self.backing.is_none() && self.data.is_none();
            if n < self.cs || (self.h.version < 3 && !v2_discard) {
                let zeros = vec![0u8; n as usize];
                self.write_cluster(cluster, (g - cluster) as usize, &zeros)?;
            } else {
                let l2 = self.l2_for_write(cluster)?;
                let entry = self.l2_entry(cluster)?;
                if self.data.as_ref().is_some_and(|d| d.raw) {
                    self.set_raw_data_zero(l2, cluster)?;
                    g += n;
                    continue;
                }
                let replacement = if v2_discard {
                    // Without a backing, an unallocated v2 cluster reads
                    // as zeros: QEMU discards it.
                    L2Entry::UNALLOCATED
                } else {
                    self.geo.zero_entry(0)
                };
                match entry.owned_host() {
                    // External data clusters are not counted: kept mapped.
                    Some(host) if !unmap || self.data.is_some() => {
                        self.set_l2_entry(l2, cluster, self.geo.zero_entry(host))?
                    }
                    _ => {
                        self.set_l2_entry(l2, cluster, replacement)?;
                        self.release_entry(entry);
                        self.bound_deferred()?;
                    }
                }
            }
            g += n;
        }
        Ok(())
    }

    /// A raw external data file keeps every cluster mapped at its guest
    /// offset: a zeroed cluster stays mapped, flagged zero, and its bytes in
    /// the data file become zeros too.
    fn set_raw_data_zero(&mut self, l2: u64, cluster: u64) -> Result<()> {
        self.zero_raw_data(cluster, self.cs)?;
        // Mapped even at guest (and host) offset 0: COPIED says so.
        let zero = self.geo.zero_entry(0);
        let mapped = L2Entry::new(zero.word | cluster, zero.bitmap).with_copied(true);
        self.set_l2_entry(l2, cluster, mapped)
    }

    /// Drop this image's own data for the whole clusters of
    /// `[offset, offset + len)`: they read from the backing again (or as
    /// zeros without one). This is how commit empties the top image.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.before_first_write()?;
        self.record_write(offset, len);
        if self.data.as_ref().is_some_and(|d| d.raw) {
            // No backing is allowed beside a raw data file: reading from
            // "the backing" means reading zeros, kept mapped.
            let first = offset.div_ceil(self.cs) * self.cs;
            let end = (offset + len) / self.cs * self.cs;
            return if first < end {
                self.write_zeroes(first, end - first)
            } else {
                Ok(())
            };
        }
        let first = offset.div_ceil(self.cs) * self.cs;
        let end = (offset + len) / self.cs * self.cs;
        let span = self.cs * self.l2_entries();
        let mut g = first;
        while g < end {
            let table_end = ((g / span + 1) * span).min(end);
            if l1_table_offset(self.l1[(g / span) as usize]) == 0 {
                // Nothing allocated under this L1 entry.
                g = table_end;
                continue;
            }
            let l2 = self.l2_for_write(g)?;
            // One table write per L2 table, then the releases: the table no
            // longer points at the clusters before they are freed.
            let (geo, cs, entries) = (self.geo, self.cs, self.l2_entries());
            let table = self.l2_table_dirty(l2)?;
            let mut released = Vec::new();
            while g < table_end {
                let i = (g / cs % entries) as usize;
                let old = geo.entry_at(table, i);
                if old.word != 0 {
                    released.push(old);
                }
                geo.set_entry_at(table, i, L2Entry::UNALLOCATED);
                g += cs;
            }
            for entry in released {
                self.release_entry(entry);
            }
            self.bound_deferred()?;
        }
        Ok(())
    }

    /// Empty the image: it then reads entirely from its backing. Like
    /// QEMU's make_empty, an image without snapshots or bitmaps is laid out
    /// afresh (same header, extensions and backing; the file shrinks to a
    /// few clusters), written beside it and renamed over it, so a crash
    /// leaves either the old or the new file. Others are emptied cluster by
    /// cluster.
    pub fn make_empty(mut self) -> Result<()> {
        self.before_first_write()?;
        // QEMU's make_empty is no guest write: bitmaps record nothing.
        self.stop_recording();
        // External data: the data file is not part of a fresh layout.
        if self.h.nb_snapshots > 0 || self.h.extensions.bitmaps.is_some() || self.data.is_some() {
            let size = self.virtual_size();
            self.discard(0, size)?;
            return self.flush();
        }
        // Nothing deferred is worth writing into a file about to be replaced.
        self.l2_cache.clear();
        self.pending_release.clear();
        let (len, extents) = crate::engine::ops::create::fresh_layout(&self.path, self.h.clone())?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &self.file.metadata().at(&self.path)?.permissions(),
        );
        let tmp = tempfile::Builder::new()
            .prefix(".cowshed-empty-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
            .tempfile_in(&dir)
            .at(&self.path)?;
        for (off, data) in &extents {
            tmp.as_file().write_all_at(data, *off).at(&self.path)?;
        }
        tmp.as_file().set_len(len).at(&self.path)?;
        tmp.as_file().sync_all().at(&self.path)?;
        fault::point("writer.empty.before_rename");
        tmp.persist(&self.path)
            .map_err(|e| Error::io(&self.path, e.error))?;
        File::open(&dir).and_then(|d| d.sync_all()).at(&dir)?;
        Ok(())
    }

    /// Grow the virtual disk to `new_size` (rounded up to 512), growing the
    /// L1 table if it must; never shrinks.
    pub fn grow(&mut self, new_size: u64) -> Result<()> {
        let new_size = new_size.next_multiple_of(512);
        if new_size <= self.virtual_size() {
            return Ok(());
        }
        let needed = new_size.div_ceil(self.cs * self.l2_entries());
        self.before_first_write()?;
        self.bitmaps_before_resize()?;
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.before_first_write()?;
        if let Some(d) = self.data.as_ref().filter(|d| d.raw) {
            // The raw view grows with the disk.
            if d.file.metadata().at(&d.path)?.len() < new_size {
                d.file.set_len(new_size).at(&d.path)?;
            }
        }
        let mut next = self.h.clone();
        next.size = new_size;
        next.patch_size(&self.file, &self.path)?;
        self.h = next;
        Ok(())
    }

    /// Shrink the virtual disk to `new_size` (a multiple of 512) in QEMU's
    /// order: the clusters past the new end are dropped first (a crash then
    /// leaves the old size with a zeroed tail, never stale data that a later
    /// grow would show again), then the L1 entries past it and their
    /// tables, then the header's size; last, the file's free tail is cut.
    pub fn shrink(&mut self, new_size: u64) -> Result<()> {
        let old = self.virtual_size();
        if new_size >= old {
            return Ok(());
        }
        self.before_first_write()?;
        let first = new_size.next_multiple_of(self.cs);
        if first < old {
            self.discard(first, old - first)?;
        }
        self.flush_metadata()?;
        fault::point("writer.shrink.discarded");
        let keep = new_size.div_ceil(self.cs * self.l2_entries()) as usize;
        let tables: Vec<u64> = self.l1[keep..]
            .iter()
            .map(|&e| l1_table_offset(e))
            .filter(|&off| off != 0)
            .collect();
        if !tables.is_empty() {
            let zeros = vec![0u8; (self.l1.len() - keep) * 8];
            self.pwrite(&zeros, self.h.l1_table_offset + keep as u64 * 8)?;
            self.file.sync_data().at(&self.path)?;
            fault::point("writer.shrink.l1_cut");
            self.l1[keep..].fill(0);
            for off in tables {
                self.l2_cache.remove(off);
                self.release(off, self.cs)?;
            }
            self.file.sync_data().at(&self.path)?;
        }
        let mut next = self.h.clone();
        next.size = new_size;
        next.patch_size(&self.file, &self.path)?;
        fault::point("writer.shrink.resized");
        self.h = next;
        self.cut_free_tail()
    }

    /// Give the clusters free at the end of the file back to the file
    /// system, as QEMU's shrink truncates the file.
    fn cut_free_tail(&mut self) -> Result<()> {
        let len = self.file.metadata().at(&self.path)?.len();
        let mut end = len.div_ceil(self.cs);
        while end > 0 && self.refcount(end - 1)? == 0 {
            end -= 1;
        }
        if end * self.cs < len {
            self.file.set_len(end * self.cs).at(&self.path)?;
            self.file.sync_all().at(&self.path)?;
        }
        Ok(())
    }

    /// A larger L1 table in new clusters: written and flushed, then the
    /// header's size and offset fields (adjacent: one write) switched to
    /// it, then the old table released, as QEMU does.
    fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::invalid(&self.path, "Active L1 table too large"));
        }
        let clusters = (entries * 8).div_ceil(self.cs);
        let start = self.find_free(clusters)?;
        // Taken before the refcounts are set: new refblocks go elsewhere.
        self.free_hint = start + clusters;
        for c in start..start + clusters {
            self.set_refcount(c, 1)?;
        }
        let new_off = start * self.cs;
        let mut table = vec![0u8; (entries * 8) as usize];
        for (i, e) in self.l1.iter().enumerate() {
            table[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.pwrite(&table, new_off)?;
        self.file.sync_data().at(&self.path)?;
        fault::point("writer.l1.before_switch");
        let mut next = self.h.clone();
        next.l1_size = entries as u32;
        next.l1_table_offset = new_off;
        next.patch_l1_table(&self.file, &self.path)?;
        fault::point("writer.l1.switched");
        let (old_off, old_len) = (self.h.l1_table_offset, u64::from(self.h.l1_size) * 8);
        self.h = next;
        self.l1.resize(entries as usize, 0);
        if old_len > 0 {
            self.release(old_off, old_len)?;
        }
        Ok(())
    }

    /// Flush everything written so far to stable storage.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_metadata()?;
        self.finish_bitmap_session()?;
        self.file.sync_all().at(&self.path)
    }
}

impl Drop for Qcow2Writer {
    /// A writer dropped without [`Qcow2Writer::flush`] (an error or a
    /// cancel part way) still leaves its deferred entries mapped, in order;
    /// what was written stays readable and nothing leaks.
    fn drop(&mut self) {
        let _ = self.flush_metadata();
        // As QEMU stores its bitmaps when it closes after a failed job.
        let _ = self.finish_bitmap_session();
    }
}
