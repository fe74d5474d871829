//! Page-aligned buffers, for writes that bypass the page cache (`O_DIRECT`), which the
//! kernel accepts only from memory, at file offsets and in lengths aligned to the
//! device's logical block size. [`DIRECT_ALIGN`] covers every common block size.

use std::ops::{Deref, DerefMut};

/// Alignment of direct I/O: memory address, file offset and length.
pub const DIRECT_ALIGN: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; DIRECT_ALIGN]);

/// A zero-initialised byte buffer whose first byte is [`DIRECT_ALIGN`]-aligned; slices
/// of it at aligned offsets are aligned too.
pub struct AlignedBuf {
    pages: Vec<Page>,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        AlignedBuf { pages: vec![Page([0; DIRECT_ALIGN]); len.div_ceil(DIRECT_ALIGN)], len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `Page` is a repr(C) byte array whose size equals its alignment, so the
        // pages are `pages.len() * DIRECT_ALIGN` contiguous initialised bytes, and `len`
        // never exceeds that (`zeroed` rounds up). The borrow of `self` keeps them alive.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the unique borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// Whether a write of `buf` at `offset` meets the alignment of direct I/O.
pub(crate) fn is_direct_aligned(buf: &[u8], offset: u64) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_exact_length() {
        for len in [0, 1, 4095, 4096, 4097, 3 << 20] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
            if len > 0 {
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
        let b = AlignedBuf::zeroed(3 * DIRECT_ALIGN);
        assert!(is_direct_aligned(&b[DIRECT_ALIGN..], 8192));
        assert!(!is_direct_aligned(&b[1..DIRECT_ALIGN + 1], 8192));
        assert!(!is_direct_aligned(&b[..100], 0));
        assert!(!is_direct_aligned(&b[..DIRECT_ALIGN], 512));
    }
}
