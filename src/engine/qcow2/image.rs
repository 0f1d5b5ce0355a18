//! An opened qcow2 image (read side): guest → host mapping through L1/L2 with
//! an L2 cache, per-layer block status, and reads of data and compressed
//! clusters.

use super::be64_table;
use super::cache::{TableCache, L2_CACHE_BYTES};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::compress;
use super::header::{CryptMethod, Header};
use super::l2::{l1_table_offset, Geometry, L2Entry, Unit};
use super::refcount::detect_metadata_preallocation;
use super::snapshot::{read_snapshots, Snapshot};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::read_up_to;
use crate::engine::layer::LayerStatus;
use crate::engine::raw::host_allocation;

pub struct Qcow2Image {
    path: PathBuf,
    file: File,
    header: Header,
    snapshots: Vec<Snapshot>,
    geo: Geometry,
    l1: Vec<u64>,
    /// The external data file's path, when the image has one, and the file
    /// once opened.
    data_file: Option<PathBuf>,
    data_file_handle: OnceLock<File>,
    /// Clean only: the reader never changes a table.
    l2_cache: Mutex<TableCache<Arc<Vec<u64>>>>,
    /// Last decompressed cluster (descriptor, bytes): small reads inside one
    /// compressed cluster decompress it once.
    last_compressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// QEMU's metadata-preallocation heuristic, computed on first status.
    prealloc: OnceLock<bool>,
    file_len: AtomicU64,
}

impl Qcow2Image {
    /// Open an image read-only. `path` is kept as given, for messages and for
    /// resolving a relative data file name.
    pub fn open(path: &Path, file: File) -> Result<Self> {
        let file_len = file.metadata().at(path)?.len();
        let header = Header::read(&file, path, file_len)?;
        let snapshots = read_snapshots(&file, path, &header, file_len)?;
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended: header.has_extended_l2(),
            external_data: header.has_data_file(),
            version: header.version,
        };

        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > 0 && header.l1_table_offset + l1_bytes > file_len {
            return Err(Error::invalid(
                path,
                format!(
                    "Active L1 table at offset 0x{:x} ({} entries) lies past the end of the file ({} bytes)",
                    header.l1_table_offset, header.l1_size, file_len
                ),
            ));
        }
        // Bounded: ≤ 32 MiB by header validation and inside the file.
        let mut raw = vec![0u8; l1_bytes as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .at(path)?;
        let l1 = be64_table(&raw);

        // Opened on first data access: info and scans work without it, as
        // in qemu-img.
        let data_file = match &header.extensions.data_file {
            Some(name) if header.has_data_file() => {
                Some(crate::engine::chain::data_file_path(name))
            }
            _ => None,
        };

        let l2_cache = TableCache::new(L2_CACHE_BYTES, header.cluster_size());
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            file,
            header,
            snapshots,
            geo,
            l1,
            data_file,
            data_file_handle: OnceLock::new(),
            l2_cache: Mutex::new(l2_cache),
            last_compressed: Mutex::new(None),
            prealloc: OnceLock::new(),
            file_len: AtomicU64::new(file_len),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// QEMU counts whole sectors: a header size of 1000 is a 512-byte disk.
    pub fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_file.as_deref()
    }

    fn corrupt(&self, msg: String) -> Error {
        Error::invalid(&self.path, msg)
    }

    /// The file's length, at least as far as `end` if the file reaches it.
    /// The length seen last is cached: a live image only grows, so a stat
    /// is needed only when an offset lies past what we saw.
    fn file_len_covering(&self, end: u64) -> Result<u64> {
        let known = self.file_len.load(Ordering::Relaxed);
        if end <= known {
            return Ok(known);
        }
        let now = self.file.metadata().at(&self.path)?.len();
        self.file_len.store(now, Ordering::Relaxed);
        Ok(now)
    }

    /// The L2 table for L1 index `l1_index`, or `None` when unallocated.
    fn l2_table(&self, l1_index: usize) -> Result<Option<Arc<Vec<u64>>>> {
        let Some(&entry) = self.l1.get(l1_index) else {
            return Ok(None);
        };
        let offset = l1_table_offset(entry);
        if offset == 0 {
            return Ok(None);
        }
        let cs = self.header.cluster_size();
        if offset % cs != 0 {
            return Err(self.corrupt(format!(
                "L2 table offset 0x{offset:x} unaligned (L1 index: 0x{l1_index:x})"
            )));
        }
        if let Some(t) = self.l2_cache.lock().map_err(poisoned)?.get(offset) {
            return Ok(Some(t.clone()));
        }
        if offset + cs > self.file_len_covering(offset + cs)? {
            return Err(self.corrupt(format!(
                "L2 table at offset 0x{offset:x} (L1 index 0x{l1_index:x}) lies past the end of the file"
            )));
        }
        let mut raw = vec![0u8; cs as usize];
        self.file.read_exact_at(&mut raw, offset).at(&self.path)?;
        let table: Arc<Vec<u64>> = Arc::new(be64_table(&raw));
        // Never dirty, so there is always room: the result can be ignored.
        let _ = self
            .l2_cache
            .lock()
            .map_err(poisoned)?
            .insert(offset, table.clone());
        Ok(Some(table))
    }

    /// Block status of this layer alone for `[offset, offset + max_len)`:
    /// the status at `offset` and how many bytes share it (> 0).
    pub fn status(&self, offset: u64, max_len: u64) -> Result<(LayerStatus, u64)> {
        let size = self.virtual_size();
        debug_assert!(offset < size);
        let max_len = max_len.min(size - offset);
        let unit = self.geo.unit_size();
        let upc = self.geo.units_per_cluster();
        let cs = self.geo.cluster_size();
        let l2_entries = self.header.l2_entries();
        let span = self.header.l1_entry_span();
        let l1_index = (offset / span) as usize;
        // A status never crosses an L2 table.
        let table_end = (l1_index as u64 + 1) * span;
        let limit = max_len.min(table_end - offset);

        let Some(table) = self.l2_table(l1_index)? else {
            return Ok((LayerStatus::Unallocated { offset: None }, limit));
        };
        let unit_at = |g: u64| -> Unit {
            let entry = self.geo.entry_at(&table, (g / cs % l2_entries) as usize);
            let sc = (g % cs) / unit;
            self.geo.classify(entry, sc % upc)
        };

        let first = unit_at(offset);
        if let Unit::Invalid(why) = first {
            return Err(self.corrupt(format!(
                "{why} (guest offset 0x{offset:x}, L1 index 0x{l1_index:x})"
            )));
        }
        let within = offset % unit;
        let mut len = (unit - within).min(limit);
        let host_of = |u: Unit| match u {
            Unit::Normal(h) | Unit::ZeroAlloc(h) | Unit::UnallocatedAlloc(h) => Some(h),
            _ => None,
        };
        let first_host = host_of(first);
        while len < limit {
            let g = offset + len;
            let next = unit_at(g);
            let same = match (first, next) {
                (Unit::Normal(_), Unit::Normal(_))
                | (Unit::ZeroAlloc(_), Unit::ZeroAlloc(_))
                | (Unit::UnallocatedAlloc(_), Unit::UnallocatedAlloc(_)) => {
                    host_of(next) == first_host.map(|h| h + within + len)
                }
                (Unit::ZeroPlain, Unit::ZeroPlain)
                | (Unit::Unallocated, Unit::Unallocated)
                | (Unit::Compressed(_), Unit::Compressed(_)) => true,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + unit).min(limit);
        }

        let encrypted = self.header.crypt_method != CryptMethod::None;
        let host = first_host.map(|h| h + within).filter(|_| !encrypted);
        let status = match first {
            Unit::Normal(_) => {
                if let (Some(h), true) = (host, self.metadata_preallocated()) {
                    let (path, file) = self.data_path_and_file()?;
                    let (data, n) = host_allocation(file, path, h, len)?;
                    return Ok((
                        LayerStatus::Data {
                            offset: host,
                            zero: !data,
                        },
                        n,
                    ));
                }
                LayerStatus::Data {
                    offset: host,
                    zero: false,
                }
            }
            Unit::ZeroAlloc(_) => LayerStatus::Zero { offset: host },
            Unit::ZeroPlain => LayerStatus::Zero { offset: None },
            Unit::UnallocatedAlloc(_) => LayerStatus::Unallocated { offset: host },
            Unit::Unallocated => LayerStatus::Unallocated { offset: None },
            Unit::Compressed(_) => LayerStatus::Compressed,
            Unit::Invalid(_) => unreachable!("handled above"),
        };
        Ok((status, len))
    }

    fn refuse_encrypted(&self) -> Result<()> {
        match self.header.crypt_method {
            CryptMethod::None => Ok(()),
            m => Err(Error::Encrypted {
                path: self.path.clone(),
                method: m.name(),
            }),
        }
    }

    /// Detected once, on first use: only block status needs it. Like QEMU,
    /// an image whose refcounts cannot be read is simply not preallocated.
    fn metadata_preallocated(&self) -> bool {
        *self.prealloc.get_or_init(|| {
            detect_metadata_preallocation(&self.file, &self.path, &self.header).unwrap_or(false)
        })
    }

    pub fn open_data_file(&self) -> Result<()> {
        self.data_path_and_file().map(|_| ())
    }

    /// Where guest data lives: the external data file (opened now if not
    /// yet) or the image itself.
    /// The file plain data clusters' host offsets point into (the image's
    /// own, or its external data file), for copies that bypass
    /// [`Qcow2Image::read_data`]'s buffer.
    pub fn data_source(&self) -> Result<(&Path, &File)> {
        self.refuse_encrypted()?;
        self.data_path_and_file()
    }

    fn data_path_and_file(&self) -> Result<(&Path, &File)> {
        let Some(p) = &self.data_file else {
            return Ok((self.path.as_path(), &self.file));
        };
        if let Some(f) = self.data_file_handle.get() {
            return Ok((p.as_path(), f));
        }
        let f = crate::engine::format::open_image_file(p).map_err(|e| {
            Error::invalid(
                &self.path,
                format!("Could not open external data file '{}': {e}", p.display()),
            )
        })?;
        Ok((p.as_path(), self.data_file_handle.get_or_init(|| f)))
    }

    /// Read guest data that `status` reported as `Data` at host offset `host`.
    /// Bytes past the end of the (data) file read as zeros, as in QEMU.
    pub fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        self.refuse_encrypted()?;
        let (path, file) = self.data_path_and_file()?;
        let n = read_up_to(file, buf, host).at(path)?;
        if n < buf.len() {
            let len = file.metadata().at(path)?.len();
            if host >= len {
                return Err(Error::invalid(
                    path,
                    format!(
                        "data cluster at host offset 0x{host:x} lies past the end of the file ({len} bytes)"
                    ),
                ));
            }
            buf[n..].fill(0);
        }
        Ok(())
    }

    /// Read guest bytes `[offset, offset + buf.len())` that lie inside one
    /// compressed cluster.
    pub fn read_compressed(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.refuse_encrypted()?;
        let cs = self.geo.cluster_size();
        let in_cluster = (offset % cs) as usize;
        debug_assert!(in_cluster + buf.len() <= cs as usize);
        let l1_index = (offset / self.header.l1_entry_span()) as usize;
        let table = self.l2_table(l1_index)?;
        let idx = ((offset / cs) % self.header.l2_entries()) as usize;
        let entry = table.map_or(L2Entry::UNALLOCATED, |t| self.geo.entry_at(&t, idx));
        let Unit::Compressed(desc) = self.geo.classify(entry, 0) else {
            return Err(self.corrupt(format!(
                "cluster at guest offset 0x{offset:x} is no longer compressed"
            )));
        };
        let cluster = self.decompress_cluster(desc, offset)?;
        buf.copy_from_slice(&cluster[in_cluster..in_cluster + buf.len()]);
        Ok(())
    }

    fn decompress_cluster(&self, desc: u64, guest: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((d, data)) = &*self.last_compressed.lock().map_err(poisoned)? {
            if *d == desc {
                return Ok(data.clone());
            }
        }
        let (host, span) = self.geo.compressed_span(desc);
        let file_len = self.file_len_covering(host + span)?;
        if host >= file_len {
            return Err(self.corrupt(format!(
                "compressed cluster for guest offset 0x{guest:x} at host offset 0x{host:x} lies past the end of the file"
            )));
        }
        // span ≤ cluster size + 512 by construction of the descriptor.
        let mut input = vec![0u8; span.min(file_len - host) as usize];
        let n = read_up_to(&self.file, &mut input, host).at(&self.path)?;
        input.truncate(n);
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        compress::decompress(self.header.compression_type, &input, &mut out).map_err(|why| {
            self.corrupt(format!(
                "could not decompress cluster at guest offset 0x{guest:x} (host 0x{host:x}): {why}"
            ))
        })?;
        let out = Arc::new(out);
        *self.last_compressed.lock().map_err(poisoned)? = Some((desc, out.clone()));
        Ok(out)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::invalid("<engine>", "internal lock poisoned by an earlier panic")
}
