//! Metadata entries: the bit layouts of L1, L2, refcount table and bitmap
//! table entries in one place, and L2 classification as QEMU's
//! `qcow2_get_cluster_type` / `qcow2_get_subcluster_type` do it. Code
//! elsewhere goes through [`L2Entry`] and the helpers here rather than
//! masking words itself.

pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reftable entry bits 9..63 hold the refblock offset.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bitmap table entries: the data cluster's offset; 0 with bit 0 clear
/// means all zeros, with bit 0 set all ones.
pub const BITMAP_TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
/// Bits an entry must leave clear (what `qemu-img check` reports).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Subclusters per cluster with extended L2.
pub const SUBCLUSTERS: u64 = 32;
/// Extended L2 bitmap halves: every subcluster allocated, every one zero.
pub const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff << 32;

/// The L2 table an L1 entry points at (0: none).
pub fn l1_table_offset(entry: u64) -> u64 {
    entry & L1_OFFSET_MASK
}

/// The L1 entry of an L2 table at `offset` that this image alone owns.
pub fn l1_entry(offset: u64) -> u64 {
    offset | OFLAG_COPIED
}

/// L1 entry `entry` pointing at the table at `offset` instead, its flag
/// bits kept.
pub fn l1_retarget(entry: u64, offset: u64) -> u64 {
    offset | (entry & !L1_OFFSET_MASK)
}

/// Whether an L1 (or L2) entry's COPIED flag says its cluster has
/// refcount 1: writable in place.
pub fn is_copied(entry: u64) -> bool {
    entry & OFLAG_COPIED != 0
}

/// The refcount block a reftable entry points at (0: none).
pub fn reftable_block_offset(entry: u64) -> u64 {
    entry & REFTABLE_OFFSET_MASK
}

/// The data cluster a bitmap table entry points at (0: none).
pub fn bitmap_table_data_offset(entry: u64) -> u64 {
    entry & BITMAP_TABLE_OFFSET_MASK
}

/// One L2 entry as stored: the descriptor word and, with extended L2, the
/// subcluster bitmap word that follows it (0 without extended L2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    pub word: u64,
    pub bitmap: u64,
}

impl L2Entry {
    pub const UNALLOCATED: L2Entry = L2Entry { word: 0, bitmap: 0 };

    pub fn new(word: u64, bitmap: u64) -> Self {
        L2Entry { word, bitmap }
    }

    /// A compressed cluster's entry for descriptor `desc` (bits 0..61).
    pub fn compressed(desc: u64) -> Self {
        L2Entry::new(OFLAG_COMPRESSED | desc, 0)
    }

    /// The host offset field (0: none), whatever the flags say.
    pub fn host(self) -> u64 {
        self.word & L2_OFFSET_MASK
    }

    pub fn is_copied(self) -> bool {
        is_copied(self.word)
    }

    pub fn is_compressed(self) -> bool {
        self.word & OFLAG_COMPRESSED != 0
    }

    /// The standard entry's zero flag (bit 0; unused with extended L2).
    pub fn has_zero_flag(self) -> bool {
        self.word & OFLAG_ZERO != 0
    }

    /// The compressed descriptor (bits 0..61) of a compressed entry.
    pub fn compressed_descriptor(self) -> Option<u64> {
        self.is_compressed()
            .then_some(self.word & !(OFLAG_COPIED | OFLAG_COMPRESSED))
    }

    /// The same entry with its COPIED flag set or cleared.
    pub fn with_copied(self, copied: bool) -> Self {
        let word = if copied {
            self.word | OFLAG_COPIED
        } else {
            self.word & !OFLAG_COPIED
        };
        L2Entry { word, ..self }
    }

    /// The host cluster this entry owns in its image's file (compressed
    /// clusters aside), whatever its subclusters say.
    pub fn owned_host(self) -> Option<u64> {
        let host = self.host();
        (!self.is_compressed() && host != 0 && self.is_copied()).then_some(host)
    }

    /// Extended L2: subclusters marked allocated (bits 0..31).
    pub fn alloc_bits(self) -> u64 {
        self.bitmap & BITMAP_ALL_ALLOC
    }

    /// Extended L2: subclusters marked zero, shifted down to bits 0..31.
    pub fn zero_bits(self) -> u64 {
        self.bitmap >> 32
    }
}

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

/// What a whole cluster's entry is, as QEMU's `qcow2_get_cluster_type`
/// sees it (subclusters aside): what `qemu-img check` counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
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

    /// Entry `index` of an L2 table held as 64-bit words.
    pub fn entry_at(&self, table: &[u64], index: usize) -> L2Entry {
        let i = index * self.entry_words();
        let word = table.get(i).copied().unwrap_or(0);
        let bitmap = if self.extended {
            table.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        L2Entry { word, bitmap }
    }

    /// Store `entry` as entry `index` of an L2 table held as 64-bit words.
    pub fn set_entry_at(&self, table: &mut [u64], index: usize, entry: L2Entry) {
        let i = index * self.entry_words();
        table[i] = entry.word;
        if self.extended {
            table[i + 1] = entry.bitmap;
        }
    }

    /// The entry of a cluster that reads entirely as data at `host`.
    pub fn data_entry(&self, host: u64) -> L2Entry {
        let bitmap = if self.extended { BITMAP_ALL_ALLOC } else { 0 };
        L2Entry::new(host | OFLAG_COPIED, bitmap)
    }

    /// The entry of a cluster reading as zeros, keeping `host` (0: none).
    pub fn zero_entry(&self, host: u64) -> L2Entry {
        let word = if host != 0 { host | OFLAG_COPIED } else { 0 };
        if self.extended {
            L2Entry::new(word, BITMAP_ALL_ZERO)
        } else {
            L2Entry::new(word | OFLAG_ZERO, 0)
        }
    }

    /// Whether every unit of the cluster is this entry's own data (no
    /// subcluster reads from the backing or as zeros).
    pub fn wholly_allocated(&self, e: L2Entry) -> bool {
        !self.extended || e.bitmap == BITMAP_ALL_ALLOC
    }

    /// The cluster's own host offset when this image alone owns it and it
    /// reads entirely as its data: a write can go there in place.
    pub fn owned_data(&self, e: L2Entry) -> Option<u64> {
        match self.classify(e, 0) {
            Unit::Normal(_) if e.is_copied() && self.wholly_allocated(e) => Some(e.host()),
            _ => None,
        }
    }

    /// Host bytes a compressed descriptor or a cluster entry occupies in
    /// the image file: `(offset, len)`, or None when it holds none.
    pub fn occupied(&self, e: L2Entry) -> Option<(u64, u64)> {
        match e.compressed_descriptor() {
            Some(desc) => Some(self.compressed_span(desc)),
            None => (e.host() != 0).then_some((e.host(), self.cluster_size())),
        }
    }

    /// The whole cluster's kind, flags only: no alignment or bitmap
    /// checks (the caller reports those).
    pub fn cluster_kind(&self, e: L2Entry) -> ClusterKind {
        if e.is_compressed() {
            ClusterKind::Compressed
        } else if e.has_zero_flag() && !self.extended {
            if e.host() != 0 {
                ClusterKind::ZeroAlloc
            } else {
                ClusterKind::ZeroPlain
            }
        } else if e.host() == 0 {
            if self.external_data && e.is_copied() {
                ClusterKind::Normal
            } else {
                ClusterKind::Unallocated
            }
        } else {
            ClusterKind::Normal
        }
    }

    /// Classify subcluster `sc` (0 without extended L2) of an entry.
    pub fn classify(&self, e: L2Entry, sc: u64) -> Unit {
        let L2Entry {
            word: entry,
            bitmap,
        } = e;
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
        assert_eq!(
            g.classify(L2Entry::new(0x8000000000050000, 0), 0),
            Unit::Normal(0x50000)
        );
        assert_eq!(
            g.classify(L2Entry::new(0x8000000000050001, 0), 0),
            Unit::ZeroAlloc(0x50000)
        );
        assert_eq!(
            g.classify(L2Entry::new(0x0000000000000001, 0), 0),
            Unit::ZeroPlain
        );
        assert_eq!(g.classify(L2Entry::new(0, 0), 0), Unit::Unallocated);
        assert!(matches!(
            g.classify(L2Entry::new(0x8000000000050200, 0), 0),
            Unit::Invalid(_)
        ));
    }

    // The entries QEMU writes for a fresh data cluster and a zero one
    // (QCOW2.md §2.3, §2.5), and their round trip through a table.
    #[test]
    fn constructors_match_qemu() {
        let g = geo(false);
        assert_eq!(g.data_entry(0x50000), L2Entry::new(0x8000000000050000, 0));
        assert_eq!(g.zero_entry(0x50000), L2Entry::new(0x8000000000050001, 0));
        assert_eq!(g.zero_entry(0), L2Entry::new(1, 0));
        let x = geo(true);
        assert_eq!(
            x.data_entry(0x50000),
            L2Entry::new(0x8000000000050000, 0xffff_ffff)
        );
        assert_eq!(x.zero_entry(0), L2Entry::new(0, 0xffff_ffff << 32));
        let mut table = vec![0u64; 8];
        x.set_entry_at(
            &mut table,
            2,
            L2Entry::new(0x8000000000050000, 0x3_0000_0003),
        );
        assert_eq!(table[4..6], [0x8000000000050000, 0x3_0000_0003]);
        assert_eq!(x.entry_at(&table, 2).alloc_bits(), 3);
        assert_eq!(x.entry_at(&table, 2).zero_bits(), 3);
        assert_eq!(x.entry_at(&table, 9), L2Entry::UNALLOCATED);
        let shared = g.data_entry(0x50000).with_copied(false);
        assert_eq!(shared.word, 0x50000);
        assert_eq!(g.owned_data(shared), None);
        assert_eq!(g.owned_data(g.data_entry(0x50000)), Some(0x50000));
        assert_eq!(x.owned_data(L2Entry::new(0x8000000000050000, 1)), None);
    }

    #[test]
    fn compressed_descriptors() {
        let g = geo(false);
        let Unit::Compressed(d) = g.classify(L2Entry::new(0x400000000006004F, 0), 0) else {
            panic!()
        };
        assert_eq!(g.compressed_span(d), (0x6004f, 512 - 0x4f));
        let Unit::Compressed(d) = g.classify(L2Entry::new(0x53C00000000639FC, 0), 0) else {
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
        assert_eq!(g.classify(L2Entry::new(e, b), 0), Unit::Normal(0x50000));
        assert_eq!(g.classify(L2Entry::new(e, b), 1), Unit::Normal(0x50800));
        assert_eq!(
            g.classify(L2Entry::new(e, b), 2),
            Unit::UnallocatedAlloc(0x51000)
        );
        assert_eq!(g.classify(L2Entry::new(e, b), 4), Unit::ZeroAlloc(0x52000));
        assert_eq!(g.classify(L2Entry::new(0, 1 << 33), 1), Unit::ZeroPlain);
        assert!(matches!(
            g.classify(L2Entry::new(0, 1), 0),
            Unit::Invalid(_)
        ));
    }
}
