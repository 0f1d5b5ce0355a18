//! `info`: what an image is, from its header and its file's metadata. Plain
//! info reads one image and never opens its backing file, like qemu-img.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::engine::chain::{classify_backing, open_image, BackingName, Chain, FormatSource};
use crate::engine::error::{IoContext, Result};
use crate::engine::format::Format;
use crate::engine::layer::Image;
use crate::engine::lock::{lock_bytes, LockState};
use crate::engine::qcow2::header::{CompressionType, CryptMethod, Header};
use crate::engine::qcow2::snapshot::Snapshot;

#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub filename: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes allocated on disk (st_blocks × 512); qemu-img's actual-size.
    pub actual_size: u64,
    /// st_size.
    pub apparent_size: u64,
    pub lock: LockState,
    pub qcow2: Option<Qcow2Info>,
    /// How this image's format was decided when it was opened as a backing
    /// file.
    pub format_source: FormatSource,
}

#[derive(Debug, Clone)]
pub struct Qcow2Info {
    pub version: u32,
    pub cluster_size: u64,
    pub backing_filename: Option<String>,
    pub full_backing_filename: Option<PathBuf>,
    pub backing_format: Option<String>,
    pub dirty: bool,
    pub corrupt: bool,
    pub lazy_refcounts: bool,
    pub refcount_bits: u32,
    pub compression_type: CompressionType,
    pub extended_l2: bool,
    pub encryption: CryptMethod,
    pub data_file: Option<String>,
    pub data_file_raw: bool,
    pub bitmaps: Vec<BitmapInfo>,
    pub snapshots: Vec<Snapshot>,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// Where the bitmap's table lies and how many entries it has.
    pub table_offset: u64,
    pub table_entries: u32,
    pub granularity: u64,
    pub in_use: bool,
    pub auto: bool,
}

impl Qcow2Info {
    /// qemu-img's `compat` string.
    pub fn compat(&self) -> &'static str {
        if self.version >= 3 {
            "1.1"
        } else {
            "0.10"
        }
    }

    /// The overlay does not record its backing's format: opening the chain
    /// probes it (QCOW2.md §8).
    pub fn backing_format_missing(&self) -> bool {
        self.backing_filename.is_some() && self.backing_format.is_none()
    }
}

/// Info for one image, without opening its backing chain.
pub fn info(path: &Path, format: Option<Format>) -> Result<ImageInfo> {
    let (image, _) = open_image(path, format)?;
    describe(path, &image, FormatSource::Recorded)
}

/// Info for every layer of the chain, top first (`--backing-chain`).
pub fn info_chain(path: &Path, format: Option<Format>) -> Result<Vec<ImageInfo>> {
    let chain = Chain::open(path, format)?;
    chain
        .layers()
        .iter()
        .map(|l| describe(&l.path, &l.image, l.format_source))
        .collect()
}

fn describe(path: &Path, image: &Image, source: FormatSource) -> Result<ImageInfo> {
    let meta = image.file().metadata().at(path)?;
    let lock = match lock_bytes(image.file(), path) {
        Ok(b) => b.state(),
        Err(_) => LockState::None,
    };
    let qcow2 = match image {
        Image::Qcow2(q) => Some(qcow2_info(path, q.header(), q.snapshots(), q.file())?),
        Image::Raw(_) => None,
    };
    Ok(ImageInfo {
        filename: path.to_path_buf(),
        format: image.format(),
        virtual_size: image.virtual_size(),
        actual_size: meta.blocks() * 512,
        apparent_size: meta.len(),
        lock,
        qcow2,
        format_source: source,
    })
}

fn qcow2_info(path: &Path, h: &Header, snapshots: &[Snapshot], file: &File) -> Result<Qcow2Info> {
    let full_backing_filename =
        h.backing_file
            .as_ref()
            .map(|name| match classify_backing(path, name) {
                BackingName::Path(p) => p,
                _ => PathBuf::from(name),
            });
    let bitmaps = match &h.extensions.bitmaps {
        Some(ext) => read_bitmap_directory(
            path,
            file,
            ext.directory_offset,
            ext.directory_size,
            ext.nb_bitmaps,
        )?,
        None => Vec::new(),
    };
    Ok(Qcow2Info {
        version: h.version,
        cluster_size: h.cluster_size(),
        backing_filename: h.backing_file.clone(),
        full_backing_filename,
        backing_format: h.extensions.backing_format.clone(),
        dirty: h.is_dirty(),
        corrupt: h.is_corrupt(),
        lazy_refcounts: h.lazy_refcounts(),
        refcount_bits: h.refcount_bits(),
        compression_type: h.compression_type,
        extended_l2: h.has_extended_l2(),
        encryption: h.crypt_method,
        data_file: h.extensions.data_file.clone(),
        data_file_raw: h.data_file_raw(),
        bitmaps,
        snapshots: snapshots.to_vec(),
        incompatible_features: h.incompatible_features,
        compatible_features: h.compatible_features,
        autoclear_features: h.autoclear_features,
    })
}

/// Persistent dirty bitmaps: only their names, granularity and flags.
pub(crate) fn read_bitmap_directory(
    path: &Path,
    file: &File,
    offset: u64,
    size: u64,
    count: u32,
) -> Result<Vec<BitmapInfo>> {
    let ext = crate::engine::qcow2::header::BitmapsExt {
        nb_bitmaps: count,
        directory_size: size,
        directory_offset: offset,
    };
    Ok(
        crate::engine::qcow2::bitmap::read_directory(file, path, &ext)?
            .into_iter()
            .map(|b| BitmapInfo {
                name: String::from_utf8_lossy(&b.name).into_owned(),
                table_offset: b.table_offset,
                table_entries: b.table_size,
                granularity: 1u64 << b.granularity_bits,
                in_use: b.in_use(),
                auto: b.flags & crate::engine::qcow2::bitmap::flags::AUTO != 0,
            })
            .collect(),
    )
}

/// What a scan needs to know about a file, from its first cluster only: no
/// L1, no snapshot table, no backing file opened. `None` format means the
/// file is not an image we recognise by magic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSummary {
    pub format: Format,
    pub virtual_size: u64,
    pub cluster_size: Option<u64>,
    pub backing_filename: Option<String>,
    pub backing_format: Option<String>,
    pub version: Option<u32>,
    pub dirty: bool,
    pub corrupt: bool,
    pub encrypted: bool,
    pub compression: Option<CompressionType>,
    pub extended_l2: bool,
    pub snapshots: u32,
}

impl HeaderSummary {
    /// A file without a qcow2 header: its size is its disk (whole sectors).
    pub fn plain(format: Format, file_len: u64) -> Self {
        HeaderSummary {
            format,
            virtual_size: file_len.next_multiple_of(512),
            cluster_size: None,
            backing_filename: None,
            backing_format: None,
            version: None,
            dirty: false,
            corrupt: false,
            encrypted: false,
            compression: None,
            extended_l2: false,
            snapshots: 0,
        }
    }
}

/// Read just enough of `path` to place it in a forest of backing chains.
pub fn inspect(path: &Path) -> Result<HeaderSummary> {
    let file = crate::engine::format::open_image_file(path)?;
    inspect_file(&file, path)
}

/// [`inspect`] on a file already open.
pub fn inspect_file(file: &File, path: &Path) -> Result<HeaderSummary> {
    let meta = file.metadata().at(path)?;
    let format = crate::engine::format::probe_file(file, path)?;
    let mut s = HeaderSummary::plain(format, meta.len());
    if format == Format::Qcow2 {
        let h = Header::read(file, path, meta.len())?;
        s.virtual_size = h.size & !511;
        s.cluster_size = Some(h.cluster_size());
        s.backing_filename = h.backing_file.clone();
        s.backing_format = h.extensions.backing_format.clone();
        s.version = Some(h.version);
        s.dirty = h.is_dirty();
        s.corrupt = h.is_corrupt();
        s.encrypted = h.crypt_method != CryptMethod::None;
        s.compression = Some(h.compression_type);
        s.extended_l2 = h.has_extended_l2();
        s.snapshots = h.nb_snapshots;
    }
    Ok(s)
}
