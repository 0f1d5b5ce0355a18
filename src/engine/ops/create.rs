//! `create`: a fresh qcow2 or raw image, laid out byte for byte as
//! `qemu-img create` lays it out (QCOW2.md §5).
//!
//! The image is written to a temporary file beside the target, flushed, and
//! then hard-linked into place, which fails if the name exists: an existing
//! file is never overwritten, and a crash leaves no half-written image
//! under the target's name.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::engine::chain::{classify_backing, open_image, BackingName};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::Format;
use crate::engine::qcow2::header::{
    self, compat, incompat, CompressionType, CryptMethod, Extensions, Header,
};

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub format: Format,
    /// Virtual size; with a backing file it defaults to the backing's.
    pub size: Option<u64>,
    /// Backing file name, stored exactly as given.
    pub backing: Option<String>,
    pub backing_format: Option<Format>,
    /// Do not open the backing file (qemu-img create -u); needs `size`.
    pub unsafe_backing: bool,
    pub cluster_size: u64,
    /// qcow2 version: 3 (compat=1.1, default) or 2 (compat=0.10).
    pub version: u32,
    pub compression: CompressionType,
    pub lazy_refcounts: bool,
    pub extended_l2: bool,
    pub refcount_bits: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: Format::Qcow2,
            size: None,
            backing: None,
            backing_format: None,
            unsafe_backing: false,
            cluster_size: 65536,
            version: 3,
            compression: CompressionType::Deflate,
            lazy_refcounts: false,
            extended_l2: false,
            refcount_bits: 16,
        }
    }
}

/// Create the image at `path` and return its virtual size.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<u64> {
    let bad = |msg: &str| Error::invalid(path, msg.to_string());
    if path.symlink_metadata().is_ok() {
        return Err(bad("file exists; cowshed create never overwrites an image"));
    }
    let size = resolve_size(path, opts)?.next_multiple_of(512);
    let (len, extents) = match opts.format {
        Format::Qcow2 => Qcow2Layout::new(path, opts, size)?.build()?,
        Format::Raw => {
            if opts.backing.is_some() {
                return Err(bad("raw images cannot have a backing file"));
            }
            (size, Vec::new())
        }
        Format::Other(o) => {
            return Err(Error::UnsupportedFormat {
                path: path.to_path_buf(),
                format: o.name(),
            })
        }
    };
    write_new_file(path, len, &extents)?;
    Ok(size)
}

fn resolve_size(path: &Path, opts: &CreateOptions) -> Result<u64> {
    let bad = |msg: &str| Error::invalid(path, msg.to_string());
    match (&opts.backing, opts.backing_format) {
        (Some(_), None) => return Err(bad("Backing file specified without backing format")),
        (None, Some(_)) => return Err(bad("-F needs a backing file (-b)")),
        _ => {}
    }
    let Some(name) = &opts.backing else {
        return opts
            .size
            .ok_or_else(|| bad("Image creation needs a size parameter"));
    };
    if opts.unsafe_backing {
        return opts.size.ok_or_else(|| {
            bad("Image creation needs a size parameter (the backing file is not opened with -u)")
        });
    }
    // Opened like QEMU does: relative to the new image's directory.
    let backing_path = match classify_backing(path, name) {
        BackingName::Path(p) => p,
        _ => {
            return Err(bad(
                "json: and protocol backing names are not followed; use -u to store one anyway",
            ))
        }
    };
    let (image, _) = open_image(&backing_path, opts.backing_format)
        .map_err(|e| Error::invalid(path, format!("Could not open backing image '{name}': {e}")))?;
    Ok(opts.size.unwrap_or_else(|| image.virtual_size()))
}

/// Bytes to write at a file offset.
pub(crate) type Extent = (u64, Vec<u8>);

/// qemu-img create's checks of the qcow2 options, with its messages (also
/// what `measure` accepts).
pub(crate) fn check_qcow2_options(path: &Path, opts: &CreateOptions) -> Result<()> {
    let bad = |msg: &str| Error::invalid(path, msg.to_string());
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(bad(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(bad(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if opts.version == 2 {
        if rb != 16 {
            return Err(bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
        }
        if opts.lazy_refcounts {
            return Err(bad("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
        if opts.compression != CompressionType::Deflate {
            return Err(bad("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
        if opts.extended_l2 {
            return Err(bad("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(bad(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    Ok(())
}

/// Where everything lands in a fresh qcow2, computed the way QEMU's
/// allocator places it: header, reftable, first refblock, L1, then any
/// further refblocks the L1 needs.
struct Qcow2Layout<'a> {
    path: &'a Path,
    opts: &'a CreateOptions,
    size: u64,
    cs: u64,
    refcount_order: u32,
}

impl<'a> Qcow2Layout<'a> {
    fn new(path: &'a Path, opts: &'a CreateOptions, size: u64) -> Result<Self> {
        check_qcow2_options(path, opts)?;
        let cs = opts.cluster_size;
        let rb = opts.refcount_bits;
        Ok(Qcow2Layout {
            path,
            opts,
            size,
            cs,
            refcount_order: rb.trailing_zeros(),
        })
    }

    /// The file's length and its non-zero extents `(offset, bytes)`.
    fn build(&self) -> Result<(u64, Vec<Extent>)> {
        fresh_layout(self.path, self.header())
    }

    /// The header for these options, its layout fields (L1, reftable) still
    /// unset: `fresh_layout` and `convert -O qcow2` place those.
    fn header(&self) -> Header {
        let cs = self.cs;
        let mut incompatible = 0;
        if self.opts.compression == CompressionType::Zstd {
            incompatible |= incompat::COMPRESSION;
        }
        if self.opts.extended_l2 {
            incompatible |= incompat::EXTL2;
        }
        Header {
            version: self.opts.version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: cs.trailing_zeros(),
            size: self.size,
            crypt_method: CryptMethod::None,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: incompatible,
            compatible_features: if self.opts.lazy_refcounts {
                compat::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: self.refcount_order,
            header_length: 0,
            compression_type: self.opts.compression,
            unknown_fields: Vec::new(),
            extensions: Extensions {
                backing_format: self
                    .opts
                    .backing
                    .as_ref()
                    .and(self.opts.backing_format)
                    .map(|f| f.name().to_string()),
                ..Extensions::default()
            },
            backing_file: self.opts.backing.clone(),
        }
    }
}

/// The validated qcow2 header `qemu-img create` would write for `opts` and
/// a disk of `size` bytes, before its tables are placed. `convert -O qcow2`
/// starts from it so its header cluster is create's, byte for byte.
pub(crate) fn qcow2_header(path: &Path, opts: &CreateOptions, size: u64) -> Result<Header> {
    Ok(Qcow2Layout::new(path, opts, size.next_multiple_of(512))?.header())
}

/// Lay out a fresh image for header `h` (its layout fields are set here):
/// header, refcount table, first refblock, an empty L1 sized for the disk,
/// then refblocks the L1 pushes past the first block's coverage, placed as
/// QEMU's allocator places them. Returns the file length and the non-zero
/// extents. Shared by `create` and by emptying an overlay after a commit.
pub(crate) fn fresh_layout(path: &Path, mut h: Header) -> Result<(u64, Vec<Extent>)> {
    let cs = h.cluster_size();
    let l1_span = h.l1_entry_span();
    let l1_size = (h.size & !511).div_ceil(l1_span);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(Error::invalid(
            path,
            "Image is too big for this cluster size (L1 table would exceed 32 MiB)",
        ));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let per_block = (cs * 8) >> h.refcount_order;
    let mut alloc = RefblockAllocator {
        per_block,
        reftable: vec![2],
        next_free: 3 + l1_clusters,
        used: (0..3 + l1_clusters).collect(),
    };
    for c in 0..3 + l1_clusters {
        alloc.ensure(c);
    }
    let RefblockAllocator {
        reftable,
        next_free,
        used,
        ..
    } = alloc;
    let reftable: Vec<u64> = reftable.iter().map(|&c| c * cs).collect();
    if reftable.len() as u64 > cs / 8 {
        return Err(Error::invalid(
            path,
            "this size needs a refcount table larger than one cluster, which cowshed does not lay out yet; use a larger cluster size",
        ));
    }
    h.l1_size = l1_size as u32;
    h.l1_table_offset = if l1_size > 0 { 3 * cs } else { 0 };
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = 1;
    h.nb_snapshots = 0;
    h.snapshots_offset = 0;
    let cluster0 = h.to_cluster(path)?;

    let mut table = vec![0u8; cs as usize];
    for (k, &off) in reftable.iter().enumerate() {
        table[k * 8..k * 8 + 8].copy_from_slice(&off.to_be_bytes());
    }
    let mut extents = vec![(0, cluster0), (cs, table)];
    for (k, &off) in reftable.iter().enumerate().filter(|(_, &o)| o != 0) {
        let covered = used
            .iter()
            .filter(|&&c| c / per_block == k as u64)
            .map(|&c| c % per_block);
        extents.push((off, refblock(cs, h.refcount_order, covered)));
    }
    // The L1 is all zeros, but QEMU writes it out to its exact length.
    let mut len = next_free * cs;
    if l1_size > 0 && next_free == 3 + l1_clusters {
        len = 3 * cs + l1_size * 8;
    }
    Ok((len, extents))
}

/// QEMU's refblock placement for a fresh image: a missing refblock takes the
/// next free cluster; when that cluster lies outside the block's own
/// coverage, the block covering it is allocated first (recursively).
struct RefblockAllocator {
    per_block: u64,
    /// Cluster index of each refblock (0 = none).
    reftable: Vec<u64>,
    next_free: u64,
    used: Vec<u64>,
}

impl RefblockAllocator {
    fn ensure(&mut self, cluster: u64) {
        let k = (cluster / self.per_block) as usize;
        if self.reftable.len() <= k {
            self.reftable.resize(k + 1, 0);
        }
        if self.reftable[k] != 0 {
            return;
        }
        let block = self.next_free;
        self.next_free += 1;
        self.used.push(block);
        if (block / self.per_block) as usize != k {
            self.ensure(block);
        }
        self.reftable[k] = block;
    }
}

/// One refblock with count 1 for each of the given indexes.
fn refblock(cs: u64, order: u32, indexes: impl Iterator<Item = u64>) -> Vec<u8> {
    let mut b = vec![0u8; cs as usize];
    let bits = 1u64 << order;
    for idx in indexes {
        if bits < 8 {
            let bit = idx * bits;
            b[(bit / 8) as usize] |= 1 << (bit % 8);
        } else {
            let w = (bits / 8) as usize;
            b[idx as usize * w + w - 1] = 1;
        }
    }
    b
}

/// Write the image beside `path`, flush it, then link it into place (which
/// fails if `path` appeared meanwhile).
fn write_new_file(path: &Path, len: u64, extents: &[Extent]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".cowshed-create-")
        // 0666 less the umask, like any new file (tempfile's default is 0600).
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .at(path)?;
    let f: &File = tmp.as_file();
    for (off, data) in extents {
        f.write_all_at(data, *off).at(path)?;
    }
    f.set_len(len).at(path)?;
    f.sync_all().at(path)?;
    fault::point("create.before_link");
    std::fs::hard_link(tmp.path(), path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::invalid(
                path,
                "file exists; cowshed create never overwrites an image",
            )
        } else {
            Error::io(path, e)
        }
    })?;
    drop(tmp);
    File::open(dir).and_then(|d| d.sync_all()).at(dir)?;
    Ok(())
}
