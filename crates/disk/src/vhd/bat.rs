//! The block allocation table (BAT) and the per-block sector bitmaps of dynamic and
//! differencing disks.
//!
//! VHD specification, "Block Allocation Table and Data Blocks": the BAT is an array
//! of big-endian u32, one per block, holding the *sector* offset (file offset / 512) of
//! the block, or 0xFFFFFFFF for a block never allocated. A block is a sector bitmap
//! (one bit per sector of the block, most significant bit first, padded to a
//! 512-byte boundary) followed by the block's data. A set bit means the sector is
//! stored in the block; a clear bit means it reads as zero (dynamic) or from the
//! parent (differencing).

use std::path::Path;

use crate::io::ImageFile;
use crate::{Error, Result};

/// A BAT entry for a block never allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Sector size of VHD, fixed by the specification.
pub const SECTOR: u64 = 512;
/// Smallest block size accepted (one sector, as QEMU).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size accepted. The specification only ever shows 2 MiB (and Hyper-V
/// writes 512 KiB or 2 MiB); 256 MiB keeps a cached bitmap at 64 KiB.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// A block number: guest offset / block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockIndex(pub u64);

/// The geometry of blocks: block size, bitmap size, sectors per block.
#[derive(Debug, Clone, Copy)]
pub struct BlockLayout {
    /// Data bytes per block (a power of two).
    pub block_size: u64,
    /// Bytes of the sector bitmap in front of each block, padded to 512.
    pub bitmap_size: u64,
}

impl BlockLayout {
    /// Validate a block size read from a header.
    pub fn new(path: &Path, block_size: u32) -> Result<BlockLayout> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(Error::corrupt(
                path,
                format!(
                    "VHD dynamic header: block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let block_size = u64::from(block_size);
        let bitmap_bytes = (block_size / SECTOR).div_ceil(8);
        Ok(BlockLayout { block_size, bitmap_size: bitmap_bytes.div_ceil(SECTOR) * SECTOR })
    }

    /// Sectors per block.
    pub fn sectors(&self) -> u64 {
        self.block_size / SECTOR
    }

    /// Bytes one allocated block occupies in the file (bitmap + data).
    pub fn footprint(&self) -> u64 {
        self.bitmap_size + self.block_size
    }
}

/// Most BAT entries accepted: 64 Mi entries is 256 MiB of table in memory, enough for
/// the largest disk (2040 GiB) with blocks of 32 KiB or more; real images use 512 KiB
/// or 2 MiB blocks (a 4 MiB table at most).
pub const MAX_ENTRIES: u32 = 64 << 20;

/// A metadata region blocks must not overlap, named for messages.
#[derive(Debug, Clone)]
pub struct Region {
    pub name: String,
    pub start: u64,
    pub end: u64,
}

/// The BAT of an open image, validated.
#[derive(Debug)]
pub struct Bat {
    entries: Vec<u32>,
}

impl Bat {
    /// Read `count` entries at `offset` and check that every allocated block lies inside
    /// `[0, data_end)` and overlaps neither `regions` nor another block.
    pub fn load(
        file: &ImageFile,
        offset: u64,
        count: u32,
        layout: &BlockLayout,
        data_end: u64,
        regions: &[Region],
    ) -> Result<Bat> {
        let path = file.path();
        if count > MAX_ENTRIES {
            return Err(Error::unsupported(
                path,
                format!("VHD block allocation table of {count} entries is larger than the {MAX_ENTRIES} tern accepts"),
            ));
        }
        let bytes = u64::from(count) * 4;
        let file_len = file.len()?;
        if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(
                path,
                format!(
                    "VHD block allocation table of {count} entries at offset {offset} runs past the end of the file ({file_len} bytes)"
                ),
            ));
        }
        // Bounded by the file length just checked.
        let mut raw = vec![0u8; bytes as usize];
        file.read_exact_at(&mut raw, offset)?;
        let entries: Vec<u32> =
            raw.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes"))).collect();

        // Blocks that do not overlap fit this many times in the data area; more
        // means an overlap, found without holding them all.
        let fit = data_end / layout.footprint();
        let mut placed: Vec<(u64, u64)> = Vec::new();
        for (i, &e) in entries.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            // u32 * 512 + a footprint of at most 256 MiB + 64 KiB cannot overflow u64.
            let end = start + layout.footprint();
            if end > data_end {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "VHD BAT entry for block {i} points to file offset {start}: the block (bitmap + data, {} bytes) ends at {end}, past the end of the data area ({data_end})",
                        layout.footprint()
                    ),
                ));
            }
            if let Some(r) = regions.iter().find(|r| start < r.end && r.start < end) {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "VHD BAT entry for block {i} points to file offset {start}: the block [{start}, {end}) overlaps the {} [{}, {})",
                        r.name, r.start, r.end
                    ),
                ));
            }
            if placed.len() as u64 >= fit {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "VHD BAT entry for block {i}: more blocks are allocated than fit in the file, so some overlap"
                    ),
                ));
            }
            placed.push((start, i as u64));
        }
        placed.sort_unstable();
        for w in placed.windows(2) {
            let ((a, ia), (b, ib)) = (w[0], w[1]);
            if b < a + layout.footprint() {
                return Err(Error::corrupt(
                    path,
                    format!("VHD BAT entries for blocks {ia} and {ib} overlap (file offsets {a} and {b})"),
                ));
            }
        }
        Ok(Bat { entries })
    }

    /// File offset of the block's bitmap, or `None` if the block is not allocated
    /// (or beyond the table).
    pub fn block_offset(&self, block: BlockIndex) -> Option<u64> {
        let e = *self.entries.get(usize::try_from(block.0).ok()?)?;
        (e != UNALLOCATED).then(|| u64::from(e) * SECTOR)
    }

    /// Number of allocated blocks.
    pub fn allocated(&self) -> usize {
        self.entries.iter().filter(|&&e| e != UNALLOCATED).count()
    }
}

/// Whether sector `i` of a block is present in its bitmap (most significant bit first).
pub fn bit(bitmap: &[u8], i: u64) -> bool {
    bitmap[(i / 8) as usize] & (0x80 >> (i % 8)) != 0
}

/// Set sector `i` in a bitmap.
pub fn set_bit(bitmap: &mut [u8], i: u64) {
    bitmap[(i / 8) as usize] |= 0x80 >> (i % 8);
}

/// The length, in sectors, of the run of sectors with the same bit as sector `first`,
/// looking at most at `max` sectors; returns (present, length >= 1).
pub fn run(bitmap: &[u8], first: u64, max: u64) -> (bool, u64) {
    let present = bit(bitmap, first);
    let full = if present { 0xFF } else { 0x00 };
    let mut n = 1;
    while n < max {
        let s = first + n;
        // Whole bytes at a time where possible: bitmaps are mostly all set or all clear.
        if s & 7 == 0 && max - n >= 8 && bitmap[(s / 8) as usize] == full {
            n += 8;
            continue;
        }
        if bit(bitmap, s) != present {
            break;
        }
        n += 1;
    }
    (present, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_msb_first_bits() {
        let mut bm = vec![0u8; 512];
        bm[0] = 0b0110_0000;
        bm[2] = 0xFF;
        bm[3] = 0xFF;
        assert_eq!(run(&bm, 0, 4096), (false, 1));
        assert_eq!(run(&bm, 1, 4096), (true, 2));
        assert_eq!(run(&bm, 3, 4096), (false, 13));
        assert_eq!(run(&bm, 16, 4096), (true, 16));
        assert_eq!(run(&bm, 16, 5), (true, 5));
        assert_eq!(run(&bm, 32, 4096 - 32), (false, 4096 - 32));
    }

    #[test]
    fn block_sizes_are_checked() {
        let p = Path::new("x");
        assert!(BlockLayout::new(p, 0).is_err());
        assert!(BlockLayout::new(p, 3 << 20).is_err());
        assert!(BlockLayout::new(p, 256).is_err());
        let l = BlockLayout::new(p, 2 << 20).unwrap();
        assert_eq!(l.bitmap_size, 512);
        let l = BlockLayout::new(p, 512).unwrap();
        assert_eq!(l.bitmap_size, 512);
    }
}
