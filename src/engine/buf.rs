//! Buffers the kernel copies file data into.

use std::ops::{Deref, DerefMut};

const PAGE: usize = 4096;

/// A zeroed byte buffer that starts on a page boundary. Most of a rebase's
/// or a compare's time is the kernel's copy out of the page cache
/// (`_copy_to_iter`), and that copy is faster into an aligned destination;
/// glibc hands out large allocations 16 bytes past a page boundary.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + PAGE];
        let start = storage.as_ptr().align_offset(PAGE).min(PAGE);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_page_and_holds_len_zeros() {
        for len in [0, 1, 4096, 2 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(1);
        }
    }
}
