//! The qcow2 format: header, L1/L2 mapping, compression, snapshots.

pub mod compress;
pub mod header;
pub mod image;
pub mod l2;
pub mod refcount;
pub mod snapshot;
pub mod writer;

pub use header::Header;
pub use image::Qcow2Image;
pub use writer::Qcow2Writer;
