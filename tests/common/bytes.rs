//! Reading and patching an image's bytes by hand: how the hostile, check,
//! pre-flight and power-cut tests make the corruptions they test.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The big-endian u32 at `at` in `b`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The big-endian u64 at `at` in `b`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The big-endian u64 at offset `at` of the file at `path`.
pub fn file_be64(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut b, at))
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    u64::from_be_bytes(b)
}

/// Overwrite `bytes` at offset `at` of the file at `path`, in place.
pub fn poke(path: &Path, at: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, at))
        .unwrap_or_else(|e| panic!("patch {}: {e}", path.display()));
}
