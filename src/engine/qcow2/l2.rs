//! L1/L2 entries: bit layouts and classification, as QEMU's
//! `qcow2_get_cluster_type` / `qcow2_get_subcluster_type` do it.

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// What one allocation unit (a cluster, or a subcluster with extended L2)
/// holds. Host offsets are those of the unit's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Normal(u64),
    ZeroPlain,
    ZeroAlloc(u64),
    Unallocated,
    /// Host space reserved but this subcluster reads from the backing.
    UnallocatedAlloc(u64),
    /// The compressed descriptor (bits 0..61).
    Compressed(u64),
    Invalid(&'static str),
}

/// Geometry needed to classify entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
    pub external_data: bool,
    pub version: u32,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of one allocation unit.
    pub fn unit_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }

    pub fn units_per_cluster(&self) -> u64 {
        if self.extended {
            SUBCLUSTERS
        } else {
            1
        }
    }

    /// Words per L2 entry.
    pub fn entry_words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }

    /// Classify subcluster `sc` (0 without extended L2) of an entry.
    pub fn classify(&self, entry: u64, bitmap: u64, sc: u64) -> Unit {
        let cs = self.cluster_size();
        if entry & OFLAG_COMPRESSED != 0 {
            if self.external_data {
                return Unit::Invalid("compressed cluster in an image with an external data file");
            }
            return Unit::Compressed(entry & !(OFLAG_COPIED | OFLAG_COMPRESSED));
        }
        let host = entry & L2_OFFSET_MASK;
        if !self.extended && entry & OFLAG_ZERO != 0 {
            if self.version < 3 {
                return Unit::Invalid("zero cluster entry found in a pre-v3 image");
            }
            if host == 0 {
                return Unit::ZeroPlain;
            }
            if host % cs != 0 {
                return Unit::Invalid("cluster allocation offset unaligned");
            }
            return Unit::ZeroAlloc(host);
        }
        let normal = host != 0 || (self.external_data && entry & OFLAG_COPIED != 0);
        if host % cs != 0 {
            return Unit::Invalid("cluster allocation offset unaligned");
        }
        if !self.extended {
            return if normal {
                Unit::Normal(host)
            } else {
                Unit::Unallocated
            };
        }
        let alloc = bitmap & (1 << sc) != 0;
        let zero = bitmap & (1 << (32 + sc)) != 0;
        let unit_host = host + sc * self.unit_size();
        if normal {
            if (bitmap >> 32) & bitmap & BITMAP_ALL_ALLOC != 0 {
                Unit::Invalid("subcluster both allocated and zero")
            } else if zero {
                Unit::ZeroAlloc(unit_host)
            } else if alloc {
                Unit::Normal(unit_host)
            } else {
                Unit::UnallocatedAlloc(unit_host)
            }
        } else if bitmap & BITMAP_ALL_ALLOC != 0 {
            Unit::Invalid("allocated subcluster in an unallocated cluster")
        } else if zero {
            Unit::ZeroPlain
        } else {
            Unit::Unallocated
        }
    }

    /// Decode a compressed descriptor into (host offset, bytes to read).
    pub fn compressed_span(&self, desc: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = desc & ((1u64 << x) - 1);
        let sectors = (desc >> x) & ((1u64 << (self.cluster_bits - 8)) - 1);
        let len = (sectors + 1) * 512 - (offset & 511);
        (offset, len)
    }

    /// Encode a compressed descriptor (bits 0..61) for `len` compressed
    /// bytes at host byte `offset`: the extra-sector count is that of the
    /// 512-byte sectors the bytes touch, less one (QCOW2.md §2.4).
    pub fn compressed_descriptor(&self, offset: u64, len: u64) -> u64 {
        let x = 62 - (self.cluster_bits - 8);
        let sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        (sectors << x) | offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(extended: bool) -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended,
            external_data: false,
            version: 3,
        }
    }

    // Entries below were produced by qemu-io (QCOW2.md §2.3-2.5).
    #[test]
    fn standard_entries() {
        let g = geo(false);
        assert_eq!(g.classify(0x8000000000050000, 0, 0), Unit::Normal(0x50000));
        assert_eq!(
            g.classify(0x8000000000050001, 0, 0),
            Unit::ZeroAlloc(0x50000)
        );
        assert_eq!(g.classify(0x0000000000000001, 0, 0), Unit::ZeroPlain);
        assert_eq!(g.classify(0, 0, 0), Unit::Unallocated);
        assert!(matches!(
            g.classify(0x8000000000050200, 0, 0),
            Unit::Invalid(_)
        ));
    }

    #[test]
    fn compressed_descriptors() {
        let g = geo(false);
        let Unit::Compressed(d) = g.classify(0x400000000006004F, 0, 0) else {
            panic!()
        };
        assert_eq!(g.compressed_span(d), (0x6004f, 512 - 0x4f));
        let Unit::Compressed(d) = g.classify(0x53C00000000639FC, 0, 0) else {
            panic!()
        };
        assert_eq!(g.compressed_span(d), (0x639fc, 80 * 512 - 0x1fc));
        // And back: 79 bytes at 0x60000 is one sector; the span above
        // needs the bytes to reach into its 80th sector.
        assert_eq!(g.compressed_descriptor(0x60000, 79), 0x0000000000060000);
        assert_eq!(
            g.compressed_descriptor(0x639fc, 79 * 512 + 1) | OFLAG_COMPRESSED,
            0x53C00000000639FC
        );
    }

    #[test]
    fn extended_entries() {
        let g = geo(true);
        let (e, b) = (0x8000000000050000, 0x0000003000000003);
        assert_eq!(g.classify(e, b, 0), Unit::Normal(0x50000));
        assert_eq!(g.classify(e, b, 1), Unit::Normal(0x50800));
        assert_eq!(g.classify(e, b, 2), Unit::UnallocatedAlloc(0x51000));
        assert_eq!(g.classify(e, b, 4), Unit::ZeroAlloc(0x52000));
        assert_eq!(g.classify(0, 1 << 33, 1), Unit::ZeroPlain);
        assert!(matches!(g.classify(0, 1, 0), Unit::Invalid(_)));
    }
}
