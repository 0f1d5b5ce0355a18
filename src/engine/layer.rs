//! One layer of a backing chain: a qcow2 or a raw image behind one face.

use std::fs::File;
use std::path::Path;

use super::error::Result;
use super::format::Format;
use super::qcow2::Qcow2Image;
use super::raw::RawImage;

/// What a single layer says about a guest range, before the chain is
/// consulted (QEMU's per-driver block status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    /// Guest data stored in this layer at `offset` (in the layer's file, or
    /// its external data file). `None` when the layer hides it (encryption).
    /// `zero`: the host range is a hole in a metadata-preallocated image, so
    /// the data reads as zeros (QEMU reports both flags then).
    Data { offset: Option<u64>, zero: bool },
    /// Reads as zeros, decided by this layer (zero cluster, or a hole in a
    /// raw file).
    Zero { offset: Option<u64> },
    /// Compressed clusters stored in this layer.
    Compressed,
    /// Not allocated here: the backing file decides. `offset` is set for
    /// subclusters whose host space is reserved.
    Unallocated { offset: Option<u64> },
}

impl LayerStatus {
    /// QEMU's BDRV_BLOCK_ALLOCATED: this layer answers for the range.
    pub fn is_allocated(self) -> bool {
        !matches!(self, LayerStatus::Unallocated { .. })
    }
}

pub enum Image {
    Qcow2(Box<Qcow2Image>),
    Raw(RawImage),
}

impl Image {
    pub fn open(path: &Path, file: File, format: Format) -> Result<Image> {
        match format {
            Format::Qcow2 => Ok(Image::Qcow2(Box::new(Qcow2Image::open(path, file)?))),
            Format::Raw => Ok(Image::Raw(RawImage::open(path, file)?)),
            Format::Other(o) => Err(super::error::Error::UnsupportedFormat {
                path: path.to_path_buf(),
                format: o.name(),
            }),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Image::Qcow2(_) => Format::Qcow2,
            Image::Raw(_) => Format::Raw,
        }
    }

    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.virtual_size(),
            Image::Raw(r) => r.virtual_size(),
        }
    }

    pub fn file(&self) -> &File {
        match self {
            Image::Qcow2(q) => q.file(),
            Image::Raw(r) => r.file(),
        }
    }

    /// The file that data host offsets refer to (see
    /// [`Qcow2Image::data_source`]); a raw image's own.
    pub fn data_file(&self) -> Result<&File> {
        match self {
            Image::Qcow2(q) => q.data_source().map(|(_, f)| f),
            Image::Raw(r) => Ok(r.file()),
        }
    }

    pub fn as_qcow2(&self) -> Option<&Qcow2Image> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }

    /// Open an external data file now (reading needs it; info does not).
    pub fn open_data_file(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.open_data_file(),
            Image::Raw(_) => Ok(()),
        }
    }

    /// See [`Qcow2Image::status`]; `offset` must be below the virtual size.
    pub fn status(&self, offset: u64, max_len: u64) -> Result<(LayerStatus, u64)> {
        match self {
            Image::Qcow2(q) => q.status(offset, max_len),
            Image::Raw(r) => r.status(offset, max_len),
        }
    }

    /// Read bytes this layer reported as `Data` at host `offset`.
    pub fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_data(host, buf),
            Image::Raw(r) => r.read_data(host, buf),
        }
    }

    /// Read guest bytes inside one compressed cluster (qcow2 only).
    pub fn read_compressed(&self, guest: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_compressed(guest, buf),
            Image::Raw(_) => unreachable!("raw layers report no compressed ranges"),
        }
    }
}
