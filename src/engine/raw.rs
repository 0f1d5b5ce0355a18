//! Raw images, read side. Allocation comes from SEEK_DATA/SEEK_HOLE, exactly
//! as QEMU's file-posix driver reports it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::error::{Error, IoContext, Result};
use super::format::read_up_to;
use super::layer::LayerStatus;

const SECTOR: u64 = 512;

/// Give `[offset, offset + len)` of `file` back to the file system: it then
/// reads as zeros and the file keeps its size. Err where the file system
/// cannot punch holes.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> nix::Result<()> {
    nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
}

/// Make `[offset, offset + len)` of `file` read as zeros, as QEMU's
/// write-zeroes on a file does: a hole where the file system can punch
/// one (the file stays sparse), else zero bytes.
pub fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    if punch_hole(file, offset, len).is_ok() {
        return Ok(());
    }
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done).at(path)?;
        done += n as u64;
    }
    Ok(())
}

pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RawImage {
    pub fn open(path: &Path, file: File) -> Result<Self> {
        let meta = file.metadata().at(path)?;
        if meta.is_dir() {
            return Err(Error::invalid(path, "is a directory"));
        }
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report 0 in st_size.
            let fd = file.as_raw_fd();
            let end = lseek(fd, 0, Whence::SeekEnd).map_err(|e| Error::io(path, e.into()))?;
            end as u64
        };
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// QEMU counts whole sectors: a 1000-byte file is a 1024-byte disk.
    pub fn virtual_size(&self) -> u64 {
        self.size.next_multiple_of(SECTOR)
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn status(&self, offset: u64, max_len: u64) -> Result<(LayerStatus, u64)> {
        let len = max_len.min(self.virtual_size() - offset);
        let (data, n) = host_allocation(&self.file, &self.path, offset, len)?;
        let offset = Some(offset);
        if data {
            Ok((
                LayerStatus::Data {
                    offset,
                    zero: false,
                },
                n,
            ))
        } else {
            Ok((LayerStatus::Zero { offset }, n))
        }
    }

    pub fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<()> {
        let n = read_up_to(&self.file, buf, host).at(&self.path)?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// Is `[offset, offset + len)` of a host file data or a hole, and for how
/// many bytes (> 0, ≤ len)? QEMU's file-posix answer: SEEK_DATA/SEEK_HOLE,
/// past the last data (and past EOF) is a hole, and a file system without
/// the information is all data.
pub(crate) fn host_allocation(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let fd = file.as_raw_fd();
    let seek = |whence| match lseek(fd, offset as i64, whence) {
        Ok(p) => Ok(Some(p as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(Error::io(path, e.into())),
    };
    let data = seek(Whence::SeekData).unwrap_or(Some(offset));
    match data {
        None => Ok((false, len)),
        Some(d) if d > offset => Ok((false, (d - offset).min(len))),
        Some(_) => {
            let hole = match seek(Whence::SeekHole)? {
                Some(h) => h,
                None => offset + len,
            };
            Ok((true, (hole - offset).clamp(1, len)))
        }
    }
}
