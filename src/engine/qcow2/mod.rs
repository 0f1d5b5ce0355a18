//! The qcow2 format: header, L1/L2 mapping, compression, snapshots.

pub mod bitmap;
pub mod cache;
pub mod compress;
pub mod header;
pub mod image;
pub mod l2;
pub mod refcount;
pub mod snapshot;
pub mod stream;
pub mod writer;

pub use header::Header;
pub use image::Qcow2Image;
pub use writer::Qcow2Writer;

/// Decode a table of big-endian 64-bit entries (L1, L2, refcount table).
pub(crate) fn be64_table(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}
