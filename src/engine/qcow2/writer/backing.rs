//! What `rebase` needs from the writer: where this image allocates (at
//! QEMU's granularity), the old backing chain it reads through, whole zero
//! clusters at the disk's end, and the header rewrite that switches the
//! backing file. The header is rewritten in one write, after everything
//! else is on disk, so a crash leaves either the old or the new backing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::super::header::{autoclear, Header};
use super::super::l2::{L2Entry, Unit};
use super::Qcow2Writer;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::read_up_to;
use crate::engine::lock::ImageLock;
use crate::engine::Chain;

impl Qcow2Writer {
    pub fn header(&self) -> &Header {
        &self.h
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// What is allocated on its own: a subcluster with extended L2, else a
    /// cluster.
    pub fn unit_size(&self) -> u64 {
        self.geo.unit_size()
    }

    /// The same chain, shared, for reading on another thread.
    pub fn shared_backing_chain(&self) -> Option<std::sync::Arc<Chain>> {
        self.backing.clone()
    }

    /// The backing chain this image reads through now (the old one during
    /// a rebase), if it has one.
    pub fn backing_chain(&self) -> Option<&Chain> {
        self.backing.as_deref()
    }

    /// Whether the cluster at guest offset `g` is allocated in this image
    /// (data, zero or compressed: QEMU's BDRV_BLOCK_ALLOCATED), and how many
    /// bytes from `g`, at most `max`, give the same answer. A run never
    /// crosses an L2 table's end, as QEMU's qcow2 block status does.
    pub fn allocation_run(&mut self, g: u64, max: u64) -> Result<(bool, u64)> {
        let span = self.cs * self.l2_entries();
        let end = (g + max).min((g / span + 1) * span);
        let first = self.is_allocated(g)?;
        // Subclusters with extended L2: each is allocated or not on its own.
        let unit = self.geo.unit_size();
        let mut p = g - g % unit + unit;
        while p < end && self.is_allocated(p)? == first {
            p += unit;
        }
        Ok((first, p.min(end) - g))
    }

    fn is_allocated(&mut self, g: u64) -> Result<bool> {
        let entry = self.l2_entry(g)?;
        let sc = g % self.cs / self.geo.unit_size();
        Ok(!matches!(
            self.geo.classify(entry, sc),
            Unit::Unallocated | Unit::UnallocatedAlloc(_)
        ))
    }

    /// Make the clusters covering `[offset, offset + len)`, which this image
    /// does not allocate, read as zeros. A partial last cluster at the end
    /// of the disk becomes a zero cluster as a whole, as QEMU's
    /// write-zeroes makes it (v3); v2 has no zero clusters: zero bytes.
    pub fn zero_unallocated(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.geo.extended && self.h.version >= 3 && self.data.is_none() {
            return self.zero_unallocated_units(offset, len);
        }
        // v2 has no zero clusters; with subclusters the range may share a
        // cluster with this image's own data: zero writes keep that.
        if self.h.version < 3 || self.geo.extended {
            return self.write_zeroes(offset, len);
        }
        self.check_range(offset, len)?;
        self.before_first_write()?;
        self.record_write(offset, len);
        let mut g = offset - offset % self.cs;
        while g < offset + len {
            let l2 = self.l2_for_write(g)?;
            let entry = self.l2_entry(g)?;
            if !matches!(self.geo.classify(entry, 0), Unit::Unallocated) {
                return Err(Error::invalid(
                    &self.path,
                    format!("internal: cluster at 0x{g:x} is allocated"),
                ));
            }
            self.set_l2_entry(l2, g, self.geo.zero_entry(0))?;
            g += self.cs;
        }
        Ok(())
    }

    /// Extended L2: the range may share a cluster with this image's own
    /// data, so its subclusters are marked zero in their entries (the last
    /// one rounded up at the disk's end), as QEMU's write-zeroes marks
    /// them: nothing written, nothing allocated. Not whole subclusters:
    /// zero bytes.
    fn zero_unallocated_units(&mut self, offset: u64, len: u64) -> Result<()> {
        let (cs, unit) = (self.cs, self.geo.unit_size());
        let mut end = offset + len;
        if end == self.virtual_size() {
            end = end.next_multiple_of(unit);
        }
        if offset % unit != 0 || end % unit != 0 {
            return self.write_zeroes(offset, len);
        }
        self.check_range(offset, len)?;
        self.before_first_write()?;
        self.record_write(offset, len);
        let mut g = offset;
        while g < end {
            let cluster = g - g % cs;
            let to = (cluster + cs).min(end);
            let l2 = self.l2_for_write(cluster)?;
            let entry = self.l2_entry(cluster)?;
            if entry.is_compressed() {
                return Err(Error::invalid(
                    &self.path,
                    format!("internal: cluster at 0x{cluster:x} is allocated"),
                ));
            }
            let count = (to - g) / unit;
            let units = ((1u64 << count) - 1) << ((g - cluster) / unit);
            let bitmap = (entry.bitmap & !units) | (units << 32);
            self.set_l2_entry(l2, cluster, L2Entry::new(entry.word, bitmap))?;
            g = to;
        }
        Ok(())
    }

    /// Flush the data, then point the header at a new backing file (`None`:
    /// no backing; the format extension goes with it) in one write.
    /// Rewrite the header with `change` applied (amend's feature bits and
    /// compat level), in the one write `set_backing` uses.
    pub fn rewrite(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = self.h.clone();
        change(&mut h);
        if h == self.h {
            return Ok(());
        }
        write_header(&self.file, &self.path, &mut h)?;
        self.h = h;
        Ok(())
    }

    pub fn set_backing(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        // First: the flush may store bitmaps, a header change of its own.
        self.flush()?;
        let mut h = with_backing(&self.h, name, format);
        if h.version >= 3 {
            // As QEMU on a writable open: unknown autoclear bits go.
            h.autoclear_features &= autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        }
        crate::engine::fault::point("writer.backing.before_switch");
        write_header(&self.file, &self.path, &mut h)?;
        self.h = h;
        Ok(())
    }
}

/// `h` with another backing name and format.
pub fn with_backing(h: &Header, name: Option<&str>, format: Option<&str>) -> Header {
    let mut new = h.clone();
    new.backing_file = name.map(str::to_string);
    new.extensions.backing_format = match name {
        Some(_) => format.map(str::to_string),
        None => None,
    };
    new
}

/// Would `h` with this backing fit in its first cluster? The error names
/// the file and says why.
pub fn check_fits(h: &Header, path: &Path, name: Option<&str>, format: Option<&str>) -> Result<()> {
    crate::engine::preflight::ensure_backing_allowed(h, path, name)?;
    let mut new = with_backing(h, name, format);
    new.to_cluster(path).map(|_| ()).map_err(|_| {
        Error::invalid(
            path,
            format!(
                "the new backing file name ({} bytes) does not fit in the header cluster ({} bytes) \
                 beside the header and its extensions",
                name.map_or(0, str::len),
                h.cluster_size()
            ),
        )
    })
}

/// Write the header `h` (fixed fields, extensions, backing name) in one
/// write over the old one: the bytes up to the end of whichever of the two
/// is longer (the rest of the cluster is zeros in the new header), then
/// flush.
pub(super) fn write_header(file: &File, path: &Path, h: &mut Header) -> Result<()> {
    let cluster = h.to_cluster(path)?;
    let mut old = vec![0u8; cluster.len()];
    let n = read_up_to(file, &mut old, 0).at(path)?;
    old.truncate(n);
    let used = |b: &[u8]| b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1);
    let len = used(&old)
        .max(used(&cluster))
        .next_multiple_of(512)
        .min(cluster.len());
    file.write_all_at(&cluster[..len], 0).at(path)?;
    file.sync_all().at(path)
}

/// The header of a qcow2 image, held as QEMU's writer holds it, for
/// changing only its backing file (`rebase -u`): the backing chain is never
/// opened, so it need not exist.
pub struct HeaderEditor {
    path: PathBuf,
    file: File,
    _lock: ImageLock,
    h: Header,
}

impl HeaderEditor {
    /// The lock is taken before the header is read.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, lock, h) = super::open_locked(path)?;
        Ok(HeaderEditor {
            path: path.to_path_buf(),
            file,
            _lock: lock,
            h,
        })
    }

    pub fn header(&self) -> &Header {
        &self.h
    }

    /// Rewrite the header with `change` applied (amend's feature bits and
    /// compat level), in the one write `set_backing` uses.
    pub fn rewrite(&mut self, change: impl FnOnce(&mut Header)) -> Result<()> {
        let mut h = self.h.clone();
        change(&mut h);
        if h == self.h {
            return Ok(());
        }
        write_header(&self.file, &self.path, &mut h)?;
        self.h = h;
        Ok(())
    }

    pub fn set_backing(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let mut h = with_backing(&self.h, name, format);
        // QEMU clears the autoclear bits it does not know on a writable
        // open; it knows these two.
        if h.version >= 3 {
            h.autoclear_features &= autoclear::BITMAPS | autoclear::DATA_FILE_RAW;
        }
        write_header(&self.file, &self.path, &mut h)?;
        self.h = h;
        Ok(())
    }
}
