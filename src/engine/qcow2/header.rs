//! The qcow2 header (v2 and v3) and its extensions: parsed once into a typed
//! value and validated there, with QEMU's limits and QEMU's wording.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::read_up_to;

pub const MAGIC: u32 = 0x5146_49fb;
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the fixed v3 header QEMU writes (104 bytes + compression type +
/// padding).
pub const V3_HEADER_LEN: u32 = 112;
const V3_MIN_HEADER_LEN: u32 = 104;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// QEMU's caps (block/qcow2.h).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_BACKING_NAME: u32 = 1023;
pub const MAX_BACKING_FORMAT: usize = 15;

/// Byte offsets of the fixed header fields (QCOW2.md §1), named once: the
/// parser, the serializer and the in-place `Header::patch_*` writes use
/// these.
pub mod field {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const BACKING_FILE_OFFSET: usize = 8;
    pub const BACKING_FILE_SIZE: usize = 16;
    pub const CLUSTER_BITS: usize = 20;
    pub const SIZE: usize = 24;
    pub const CRYPT_METHOD: usize = 32;
    pub const L1_SIZE: usize = 36;
    pub const L1_TABLE_OFFSET: usize = 40;
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub const NB_SNAPSHOTS: usize = 60;
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// v3 from here on.
    pub const INCOMPATIBLE_FEATURES: usize = 72;
    pub const COMPATIBLE_FEATURES: usize = 80;
    pub const AUTOCLEAR_FEATURES: usize = 88;
    pub const REFCOUNT_ORDER: usize = 96;
    pub const HEADER_LENGTH: usize = 100;
    pub const COMPRESSION_TYPE: usize = 104;
}

pub mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION: u64 = 1 << 3;
    pub const EXTL2: u64 = 1 << 4;
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

pub mod compat {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

pub mod autoclear {
    pub const BITMAPS: u64 = 1 << 0;
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

pub mod ext {
    pub const END: u32 = 0x0000_0000;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Deflate,
    Zstd,
}

impl CompressionType {
    /// The name `qemu-img info` shows.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CryptMethod {
    None,
    Aes,
    Luks,
}

impl CryptMethod {
    pub fn name(self) -> &'static str {
        match self {
            CryptMethod::None => "none",
            CryptMethod::Aes => "aes",
            CryptMethod::Luks => "luks",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoExt {
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub backing_format: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExt>,
    pub crypto: Option<CryptoExt>,
    pub data_file: Option<String>,
    /// Extensions we do not know, kept verbatim (type, data) in file order.
    pub unknown: Vec<(u32, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: CryptMethod,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Header bytes past the fields we know (v3 header_length > 112).
    pub unknown_fields: Vec<u8>,
    pub extensions: Extensions,
    /// The backing file name exactly as stored.
    pub backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Cluster 0, read lazily: most headers fit in the first 4 KiB, so a probe of
/// a 2 MiB-cluster image does not read 2 MiB.
struct Cluster0<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    /// Bytes that exist in the file (the file may be shorter than a cluster).
    limit: usize,
}

impl<'a> Cluster0<'a> {
    fn new(file: &'a File, path: &'a Path, limit: usize) -> Result<Self> {
        let mut c = Cluster0 {
            file,
            path,
            buf: Vec::new(),
            limit,
        };
        c.ensure(4096.min(limit))?;
        Ok(c)
    }

    /// Make `[0, end)` available; `false` if the file is shorter.
    fn ensure(&mut self, end: usize) -> Result<bool> {
        if end > self.limit {
            return Ok(false);
        }
        if end > self.buf.len() {
            let old = self.buf.len();
            // Grow geometrically so a long extension list costs few reads.
            let want = end.max(old * 2).min(self.limit);
            self.buf.resize(want, 0);
            let n = read_up_to(self.file, &mut self.buf[old..], old as u64).at(self.path)?;
            self.buf.truncate(old + n);
            self.limit = self.limit.min(old + n);
        }
        Ok(end <= self.buf.len())
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTL2 != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Bytes of guest data one L2 entry maps.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.has_extended_l2() {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// Guest bytes one L1 entry covers.
    pub fn l1_entry_span(&self) -> u64 {
        self.cluster_size() * self.l2_entries()
    }

    /// Read and validate the header and its extensions from `file`.
    /// `file_len` is the file's size; the header must lie inside it.
    pub fn read(file: &File, path: &Path, file_len: u64) -> Result<Header> {
        let mut c0 = Cluster0::new(file, path, file_len.min(1 << MAX_CLUSTER_BITS) as usize)?;
        if !c0.ensure(V2_HEADER_LEN as usize)? {
            return Err(Error::invalid(
                path,
                "Could not read qcow2 header: file too short",
            ));
        }
        let (mut h, crypt) = Header::read_v2_fields(&c0.buf, path)?;
        if h.version == 3 {
            h.read_v3_fields(&mut c0, path)?;
        }
        let cs = h.cluster_size();
        if h.backing_file_offset > cs {
            return Err(Error::invalid(path, "Invalid backing file offset"));
        }
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cs
        };
        h.extensions = read_extensions(&mut c0, &h, ext_end as usize, path)?;
        h.check_features(path, crypt)?;
        h.check_tables(path)?;
        h.read_backing_name(&mut c0, path)?;
        Ok(h)
    }

    /// The fields every version has (the first 72 bytes), with the v3
    /// ones at their v2 defaults; also the raw encryption method, judged
    /// once the extensions are known.
    fn read_v2_fields(b: &[u8], path: &Path) -> Result<(Header, u32)> {
        let bad = |msg: String| Error::invalid(path, msg);
        if be32(b, field::MAGIC) != MAGIC {
            return Err(bad("Image is not in qcow2 format".into()));
        }
        let version = be32(b, field::VERSION);
        if !(2..=3).contains(&version) {
            return Err(bad(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(b, field::CLUSTER_BITS);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!("Unsupported cluster size: 2^{cluster_bits}")));
        }
        let h = Header {
            version,
            backing_file_offset: be64(b, field::BACKING_FILE_OFFSET),
            backing_file_size: be32(b, field::BACKING_FILE_SIZE),
            cluster_bits,
            size: be64(b, field::SIZE),
            crypt_method: CryptMethod::None,
            l1_size: be32(b, field::L1_SIZE),
            l1_table_offset: be64(b, field::L1_TABLE_OFFSET),
            refcount_table_offset: be64(b, field::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: be32(b, field::REFCOUNT_TABLE_CLUSTERS),
            nb_snapshots: be32(b, field::NB_SNAPSHOTS),
            snapshots_offset: be64(b, field::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            unknown_fields: Vec::new(),
            extensions: Extensions::default(),
            backing_file: None,
        };
        Ok((h, be32(b, field::CRYPT_METHOD)))
    }

    /// The v3 fields: feature bits, refcount width, header length (and
    /// the fields past those we know), compression type.
    fn read_v3_fields(&mut self, c0: &mut Cluster0, path: &Path) -> Result<()> {
        let bad = |msg: String| Error::invalid(path, msg);
        let too_short = || bad("Could not read qcow2 header: file too short".into());
        if !c0.ensure(V3_MIN_HEADER_LEN as usize)? {
            return Err(too_short());
        }
        let b = &c0.buf;
        self.incompatible_features = be64(b, field::INCOMPATIBLE_FEATURES);
        self.compatible_features = be64(b, field::COMPATIBLE_FEATURES);
        self.autoclear_features = be64(b, field::AUTOCLEAR_FEATURES);
        self.refcount_order = be32(b, field::REFCOUNT_ORDER);
        self.header_length = be32(b, field::HEADER_LENGTH);
        if self.header_length < V3_MIN_HEADER_LEN {
            return Err(bad("qcow2 header too short".into()));
        }
        if u64::from(self.header_length) > self.cluster_size() {
            return Err(bad("qcow2 header exceeds cluster size".into()));
        }
        if !c0.ensure(self.header_length as usize)? {
            return Err(too_short());
        }
        let b = &c0.buf;
        let compression = if self.header_length > V3_MIN_HEADER_LEN {
            b[field::COMPRESSION_TYPE]
        } else {
            0
        };
        if self.header_length > V3_HEADER_LEN {
            self.unknown_fields = b[V3_HEADER_LEN as usize..self.header_length as usize].to_vec();
        }
        let bit_set = self.incompatible_features & incompat::COMPRESSION != 0;
        self.compression_type = match (compression, bit_set) {
            (0, false) => CompressionType::Deflate,
            (0, true) => {
                return Err(bad(
                    "Compression type incompatible feature bit must not be set".into(),
                ))
            }
            (1, true) => CompressionType::Zstd,
            (1, false) => {
                return Err(bad(
                    "Compression type incompatible feature bit must be set".into()
                ))
            }
            (t, _) => return Err(bad(format!("Unknown compression type {t}"))),
        };
        Ok(())
    }

    /// Feature bits, refcount width and encryption, judged after the
    /// extensions: the feature table names unknown bits.
    fn check_features(&mut self, path: &Path, crypt: u32) -> Result<()> {
        let bad = |msg: &str| Error::invalid(path, msg);
        let unknown = self.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::UnsupportedFeature {
                path: path.to_path_buf(),
                features: describe_unknown_incompat(unknown, &self.extensions.feature_names),
            });
        }
        if self.refcount_order > 6 {
            return Err(bad(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        self.crypt_method = match crypt {
            0 => CryptMethod::None,
            1 => CryptMethod::Aes,
            2 => CryptMethod::Luks,
            m => {
                return Err(Error::invalid(
                    path,
                    format!("Unsupported encryption method: {m}"),
                ))
            }
        };
        if self.crypt_method == CryptMethod::Luks && self.extensions.crypto.is_none() {
            return Err(bad(
                "LUKS encryption requires a full disk encryption header extension",
            ));
        }
        if self.has_extended_l2() && self.cluster_bits < 14 {
            return Err(bad(
                "The cluster size is too small for extended L2 entries (at least 16 KiB)",
            ));
        }
        if self.has_data_file() && self.extensions.data_file.is_none() {
            return Err(bad(
                "The image has an external data file but names none (data file extension missing)",
            ));
        }
        Ok(())
    }

    /// The refcount, snapshot and L1 tables' places and sizes, as QEMU
    /// validates them at open.
    fn check_tables(&self, path: &Path) -> Result<()> {
        let bad = |msg: &str| Error::invalid(path, msg);
        let cs = self.cluster_size();
        validate_table(
            path,
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cs,
            1,
            MAX_REFTABLE_BYTES,
            cs,
            "Reference count table",
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad("Too many snapshots"));
        }
        // Checked even without snapshots, as QEMU does.
        validate_table(
            path,
            self.snapshots_offset,
            u64::from(self.nb_snapshots),
            40,
            u64::from(MAX_SNAPSHOTS) * 1024,
            cs,
            "Snapshot table",
        )?;
        if u64::from(self.l1_size) > MAX_L1_BYTES / 8 {
            return Err(bad("Active L1 table too large"));
        }
        let needed_l1 = self.size.div_ceil(self.l1_entry_span());
        if needed_l1 > i32::MAX as u64 {
            return Err(bad("Image is too big"));
        }
        if u64::from(self.l1_size) < needed_l1 {
            return Err(bad("L1 table is too small"));
        }
        if self.l1_size > 0 {
            validate_table(
                path,
                self.l1_table_offset,
                u64::from(self.l1_size),
                8,
                MAX_L1_BYTES,
                cs,
                "Active L1 table",
            )?;
        }
        Ok(())
    }

    fn read_backing_name(&mut self, c0: &mut Cluster0, path: &Path) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME
            || u64::from(len) >= self.cluster_size() - self.backing_file_offset
        {
            return Err(Error::invalid(path, "Backing file name too long"));
        }
        let start = self.backing_file_offset as usize;
        let end = start + len as usize;
        if !c0.ensure(end)? {
            return Err(Error::invalid(
                path,
                "Could not read backing file name: file too short",
            ));
        }
        self.backing_file = Some(String::from_utf8_lossy(&c0.buf[start..end]).into_owned());
        Ok(())
    }
}

/// QEMU's qcow2_validate_table: size cap, no overflow, cluster alignment.
fn validate_table(
    path: &Path,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cs: u64,
    name: &str,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::invalid(path, format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || offset % cs != 0 {
        return Err(Error::invalid(path, format!("{name} offset invalid")));
    }
    Ok(())
}

fn describe_unknown_incompat(mut bits: u64, table: &[FeatureName]) -> String {
    let mut parts = Vec::new();
    for f in table.iter().filter(|f| f.kind == 0 && f.bit < 64) {
        let mask = 1u64 << f.bit;
        if bits & mask != 0 {
            parts.push(f.name.clone());
            bits &= !mask;
        }
    }
    if bits != 0 {
        parts.push(format!("Unknown incompatible feature: {bits:x}"));
    }
    parts.join(", ")
}

fn read_extensions(
    c0: &mut Cluster0<'_>,
    h: &Header,
    end: usize,
    path: &Path,
) -> Result<Extensions> {
    let bad = |msg: &str| Error::invalid(path, msg.to_string());
    let mut exts = Extensions::default();
    let mut seen: Vec<u32> = Vec::new();
    let mut off = h.header_length as usize;
    loop {
        if off + 8 > end {
            // No room for another extension: QEMU stops here too.
            break;
        }
        if !c0.ensure(off + 8)? {
            // The file ends inside cluster 0; missing bytes read as zero,
            // which is the end marker.
            break;
        }
        let ty = be32(&c0.buf, off);
        let len = be32(&c0.buf, off + 4) as usize;
        off += 8;
        if ty == ext::END {
            break;
        }
        if len > end - off {
            return Err(bad("Header extension too large"));
        }
        if !c0.ensure(off + len)? {
            return Err(bad("Header extension runs past the end of the file"));
        }
        let data = &c0.buf[off..off + len];
        if ty != 0 && seen.contains(&ty) && ty != ext::FEATURE_TABLE {
            return Err(Error::invalid(
                path,
                format!("Duplicate header extension 0x{ty:08x}"),
            ));
        }
        seen.push(ty);
        match ty {
            ext::BACKING_FORMAT => {
                if len > MAX_BACKING_FORMAT {
                    return Err(Error::invalid(
                        path,
                        format!("ext_backing_format: len={len} too large (>=16)"),
                    ));
                }
                exts.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            ext::FEATURE_TABLE => {
                for e in data.chunks_exact(48) {
                    let name_bytes = &e[2..48];
                    let n = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                    exts.feature_names.push(FeatureName {
                        kind: e[0],
                        bit: e[1],
                        name: String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                    });
                }
            }
            ext::BITMAPS => {
                if len != 24 {
                    return Err(bad("bitmaps_ext: Invalid extension length"));
                }
                let nb = be32(data, 0);
                let reserved = be32(data, 4);
                let dir_size = be64(data, 8);
                let dir_off = be64(data, 16);
                if reserved != 0 {
                    return Err(bad("bitmaps_ext: Reserved field is not zero"));
                }
                if nb == 0 || nb > 65535 {
                    return Err(bad("bitmaps_ext: Image has an invalid number of bitmaps"));
                }
                if dir_size > 1024 * 65535 {
                    return Err(bad("bitmaps_ext: bitmap directory size is too big"));
                }
                if dir_off % h.cluster_size() != 0 {
                    return Err(bad("bitmaps_ext: invalid bitmap directory offset"));
                }
                exts.bitmaps = Some(BitmapsExt {
                    nb_bitmaps: nb,
                    directory_size: dir_size,
                    directory_offset: dir_off,
                });
            }
            ext::CRYPTO => {
                if len != 16 {
                    return Err(bad("crypto header extension: invalid length"));
                }
                exts.crypto = Some(CryptoExt {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                });
            }
            ext::DATA_FILE => {
                exts.data_file = Some(String::from_utf8_lossy(data).into_owned());
            }
            _ => exts.unknown.push((ty, data.to_vec())),
        }
        off += len.next_multiple_of(8);
    }
    Ok(exts)
}

/// The feature name table QEMU writes into every v3 header with clusters
/// larger than 4 KiB: (type, bit, name).
const FEATURE_TABLE: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

impl Header {
    /// Serialize cluster 0 the way QEMU's `qcow2_update_header` does: fixed
    /// header, unknown header fields, extensions in QEMU's order, end marker,
    /// then the backing file name; zeros to the end of the cluster. Sets
    /// `backing_file_offset`/`backing_file_size` to where the name lands.
    pub fn to_cluster(&mut self, path: &Path) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = Vec::with_capacity(cs);
        let fixed = if self.version >= 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        self.header_length = fixed + self.unknown_fields.len() as u32;
        b.resize(fixed as usize, 0);
        b.extend_from_slice(&self.unknown_fields);

        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.extensions.backing_format {
            push_ext(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some(d) = &self.extensions.data_file {
            push_ext(&mut b, ext::DATA_FILE, d.as_bytes());
        }
        if let Some(c) = &self.extensions.crypto {
            let mut data = c.offset.to_be_bytes().to_vec();
            data.extend_from_slice(&c.length.to_be_bytes());
            push_ext(&mut b, ext::CRYPTO, &data);
        }
        if self.version >= 3 && cs > 4096 {
            let mut table = Vec::with_capacity(FEATURE_TABLE.len() * 48);
            for (kind, bit, name) in FEATURE_TABLE {
                let mut e = [0u8; 48];
                e[0] = kind;
                e[1] = bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&e);
            }
            push_ext(&mut b, ext::FEATURE_TABLE, &table);
        }
        if let Some(bm) = &self.extensions.bitmaps {
            let mut data = bm.nb_bitmaps.to_be_bytes().to_vec();
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&bm.directory_size.to_be_bytes());
            data.extend_from_slice(&bm.directory_offset.to_be_bytes());
            push_ext(&mut b, ext::BITMAPS, &data);
        }
        for (ty, data) in self.extensions.unknown.iter().rev() {
            push_ext(&mut b, *ty, data);
        }
        b.extend_from_slice(&[0u8; 8]);

        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = b.len() as u64;
                self.backing_file_size = name.len() as u32;
                b.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        if b.len() > cs {
            return Err(Error::invalid(
                path,
                "the header, its extensions and the backing file name do not fit in the first cluster",
            ));
        }
        b.resize(cs, 0);

        b[..fixed as usize].copy_from_slice(&self.fixed_fields()[..fixed as usize]);
        Ok(b)
    }

    /// The fixed fields as stored (v3 layout; a v2 header is its first
    /// 72 bytes).
    fn fixed_fields(&self) -> [u8; V3_HEADER_LEN as usize] {
        let mut b = [0u8; V3_HEADER_LEN as usize];
        let mut put32 = |at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        put32(field::MAGIC, MAGIC);
        put32(field::VERSION, self.version);
        put32(field::BACKING_FILE_SIZE, self.backing_file_size);
        put32(field::CLUSTER_BITS, self.cluster_bits);
        put32(
            field::CRYPT_METHOD,
            match self.crypt_method {
                CryptMethod::None => 0,
                CryptMethod::Aes => 1,
                CryptMethod::Luks => 2,
            },
        );
        put32(field::L1_SIZE, self.l1_size);
        put32(field::REFCOUNT_TABLE_CLUSTERS, self.refcount_table_clusters);
        put32(field::NB_SNAPSHOTS, self.nb_snapshots);
        if self.version >= 3 {
            put32(field::REFCOUNT_ORDER, self.refcount_order);
            put32(field::HEADER_LENGTH, self.header_length);
        }
        let mut put64 = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put64(field::BACKING_FILE_OFFSET, self.backing_file_offset);
        put64(field::SIZE, self.size);
        put64(field::L1_TABLE_OFFSET, self.l1_table_offset);
        put64(field::REFCOUNT_TABLE_OFFSET, self.refcount_table_offset);
        put64(field::SNAPSHOTS_OFFSET, self.snapshots_offset);
        if self.version >= 3 {
            put64(field::INCOMPATIBLE_FEATURES, self.incompatible_features);
            put64(field::COMPATIBLE_FEATURES, self.compatible_features);
            put64(field::AUTOCLEAR_FEATURES, self.autoclear_features);
            b[field::COMPRESSION_TYPE] = match self.compression_type {
                CompressionType::Deflate => 0,
                CompressionType::Zstd => 1,
            };
        }
        b
    }

    // In-place header updates. Each writes this header's value of adjacent
    // fields in one write and fsyncs it, so the fields switch together and
    // are durable before anything that depends on them; callers set the
    // new values on a copy and keep it once the patch returned.

    fn patch(&self, file: &File, path: &Path, fields: std::ops::Range<usize>) -> Result<()> {
        let b = self.fixed_fields();
        file.write_all_at(&b[fields.clone()], fields.start as u64)
            .at(path)?;
        file.sync_data().at(path)
    }

    /// The virtual disk size.
    pub fn patch_size(&self, file: &File, path: &Path) -> Result<()> {
        self.patch(file, path, field::SIZE..field::SIZE + 8)
    }

    /// The active L1 table's size and offset.
    pub fn patch_l1_table(&self, file: &File, path: &Path) -> Result<()> {
        self.patch(file, path, field::L1_SIZE..field::L1_TABLE_OFFSET + 8)
    }

    /// The refcount table's offset and size.
    pub fn patch_refcount_table(&self, file: &File, path: &Path) -> Result<()> {
        let end = field::REFCOUNT_TABLE_CLUSTERS + 4;
        self.patch(file, path, field::REFCOUNT_TABLE_OFFSET..end)
    }

    /// Size, L1 table, refcount table and snapshot table at once: a
    /// switch to a new metadata generation (snapshot create, apply,
    /// delete).
    pub fn patch_tables(&self, file: &File, path: &Path) -> Result<()> {
        self.patch(file, path, field::SIZE..field::SNAPSHOTS_OFFSET + 8)
    }

    /// The incompatible feature bits (v3): dirty, corrupt.
    pub fn patch_incompatible(&self, file: &File, path: &Path) -> Result<()> {
        debug_assert!(self.version >= 3);
        let at = field::INCOMPATIBLE_FEATURES;
        self.patch(file, path, at..at + 8)
    }

    /// The autoclear feature bits (v3).
    pub fn patch_autoclear(&self, file: &File, path: &Path) -> Result<()> {
        debug_assert!(self.version >= 3);
        let at = field::AUTOCLEAR_FEATURES;
        self.patch(file, path, at..at + 8)
    }
}
