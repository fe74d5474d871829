//! The block allocation table ([MS-VHDX] 2.5).
//!
//! One u64 per entry: `State` bits 0..3, reserved bits 3..20, `FileOffsetMB` bits
//! 20..64 (the file offset in MiB). Payload block entries are interleaved with sector
//! bitmap entries: after every `chunk_ratio` payload entries comes the entry of the
//! sector bitmap block covering them, where
//! `chunk_ratio = 2^23 * logical_sector_size / block_size` (2.5.1).
//!
//! The table is read in pages through a bounded cache, so that memory does not grow
//! with the disk (a 64 TiB disk of 1 MiB blocks has a 512 MiB BAT). Every entry is
//! validated when its page is loaded: state known, offset 1 MiB aligned, the block
//! inside the file and clear of the header section, log, BAT and metadata regions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::region_table::Region;
use super::MIB;
use crate::io::ImageFile;
use crate::{Error, Result};

/// Payload block states (2.5.1.1).
pub(crate) const PAYLOAD_NOT_PRESENT: u8 = 0;
pub(crate) const PAYLOAD_UNDEFINED: u8 = 1;
pub(crate) const PAYLOAD_ZERO: u8 = 2;
pub(crate) const PAYLOAD_UNMAPPED: u8 = 3;
pub(crate) const PAYLOAD_FULLY_PRESENT: u8 = 6;
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap block states (2.5.1.2).
pub(crate) const SB_NOT_PRESENT: u8 = 0;
pub(crate) const SB_PRESENT: u8 = 6;

/// Sector bitmap blocks are 1 MiB, one bit per logical sector (2.5.1.2).
pub(crate) const SECTOR_BITMAP_BLOCK: u64 = MIB;
/// Entries per cached page (32 KiB of table).
const PAGE_ENTRIES: u64 = 4096;
/// Pages kept in memory at most: 1024 * 32 KiB = 32 MiB, a whole BAT up to 4 TiB of
/// 1 MiB blocks or the largest disk of 32 MiB blocks.
const MAX_CACHED_PAGES: usize = 1024;

/// Build a BAT entry.
pub(crate) fn entry(state: u8, file_offset: u64) -> u64 {
    debug_assert!(file_offset.is_multiple_of(MIB));
    (file_offset / MIB) << 20 | u64::from(state)
}

/// A decoded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub state: u8,
    pub offset: u64,
}

fn decode(raw: u64) -> Entry {
    Entry { state: (raw & 7) as u8, offset: (raw >> 20) * MIB }
}

/// Sizes derived from the metadata (2.5.1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub block_size: u64,
    pub logical_sector_size: u64,
    pub virtual_size: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub total_entries: u64,
    pub has_parent: bool,
}

impl Geometry {
    /// Derive the geometry; inputs are already validated (block size a power of two up
    /// to 256 MiB, sector 512 or 4096, size at most 64 TiB), so nothing overflows.
    pub fn new(block_size: u64, logical_sector_size: u64, virtual_size: u64, has_parent: bool) -> Geometry {
        let chunk_ratio = (1u64 << 23) * logical_sector_size / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let total_entries = if has_parent {
            bitmap_blocks * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Geometry {
            block_size,
            logical_sector_size,
            virtual_size,
            chunk_ratio,
            data_blocks,
            total_entries,
            has_parent,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    fn is_bitmap_index(&self, index: u64) -> bool {
        index % (self.chunk_ratio + 1) == self.chunk_ratio
    }

    /// Sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector_size
    }

    /// Bytes of payload block `block` that lie inside the virtual disk.
    pub fn block_bytes(&self, block: u64) -> u64 {
        (self.virtual_size - block * self.block_size).min(self.block_size)
    }

    /// Bytes of BAT table needed.
    pub fn table_bytes(&self) -> u64 {
        self.total_entries * 8
    }
}

/// Facts gathered while validating the whole table at open.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BatStats {
    pub fully_present: u64,
    pub partially_present: u64,
    pub zero: u64,
    pub not_present: u64,
}

/// The BAT of an open image.
pub(crate) struct Bat {
    region: Region,
    geometry: Geometry,
    /// Ranges no block may overlap: header section, log, BAT, metadata.
    reserved: Vec<(Region, &'static str)>,
    file_len: u64,
    cache: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

impl Bat {
    pub fn new(
        region: Region,
        geometry: Geometry,
        reserved: Vec<(Region, &'static str)>,
        file_len: u64,
    ) -> Bat {
        Bat { region, geometry, reserved, file_len, cache: Mutex::new(HashMap::new()) }
    }

    /// Load and validate every page once; returns counts of block states.
    pub fn validate_all(&self, file: &ImageFile) -> Result<BatStats> {
        let mut stats = BatStats::default();
        let pages = self.geometry.total_entries.div_ceil(PAGE_ENTRIES);
        for p in 0..pages {
            let page = self.page(file, p)?;
            for (i, &raw) in page.iter().enumerate() {
                let index = p * PAGE_ENTRIES + i as u64;
                if self.geometry.is_bitmap_index(index) {
                    continue;
                }
                match decode(raw).state {
                    PAYLOAD_FULLY_PRESENT => stats.fully_present += 1,
                    PAYLOAD_PARTIALLY_PRESENT => stats.partially_present += 1,
                    PAYLOAD_ZERO => stats.zero += 1,
                    _ => stats.not_present += 1,
                }
            }
        }
        Ok(stats)
    }

    /// The entry of payload block `block` (which must be below `data_blocks`).
    pub fn payload(&self, file: &ImageFile, block: u64) -> Result<Entry> {
        self.get(file, self.geometry.payload_index(block))
    }

    /// The entry of the sector bitmap block of `chunk` (differencing images only).
    pub fn bitmap(&self, file: &ImageFile, chunk: u64) -> Result<Entry> {
        self.get(file, self.geometry.bitmap_index(chunk))
    }

    fn get(&self, file: &ImageFile, index: u64) -> Result<Entry> {
        if index >= self.geometry.total_entries {
            return Err(Error::corrupt(file.path(), format!("BAT index {index} is past the table")));
        }
        let page = self.page(file, index / PAGE_ENTRIES)?;
        Ok(decode(page[(index % PAGE_ENTRIES) as usize]))
    }

    fn page(&self, file: &ImageFile, p: u64) -> Result<Arc<Vec<u64>>> {
        if let Some(page) = self.cache.lock().map_err(|_| poisoned(file))?.get(&p) {
            return Ok(page.clone());
        }
        let first = p * PAGE_ENTRIES;
        let count = (self.geometry.total_entries - first).min(PAGE_ENTRIES);
        let mut bytes = vec![0u8; (count * 8) as usize];
        file.read_exact_at(&mut bytes, self.region.offset + first * 8)?;
        let entries: Vec<u64> =
            bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunk"))).collect();
        for (i, &raw) in entries.iter().enumerate() {
            self.check(file, first + i as u64, raw)?;
        }
        let page = Arc::new(entries);
        let mut cache = self.cache.lock().map_err(|_| poisoned(file))?;
        if cache.len() >= MAX_CACHED_PAGES {
            // Any victim will do: reloading a page costs one 32 KiB read.
            if let Some(&victim) = cache.keys().next() {
                cache.remove(&victim);
            }
        }
        cache.insert(p, page.clone());
        Ok(page)
    }

    /// Validate one raw entry at `index`.
    fn check(&self, file: &ImageFile, index: u64, raw: u64) -> Result<()> {
        let g = &self.geometry;
        let e = decode(raw);
        let bad = |m: String| Error::corrupt(file.path(), format!("BAT entry {index}: {m}"));
        let len = if g.is_bitmap_index(index) {
            if !g.has_parent {
                // Not used without a parent; some writers leave junk here.
                return Ok(());
            }
            match e.state {
                SB_NOT_PRESENT => return Ok(()),
                SB_PRESENT => SECTOR_BITMAP_BLOCK,
                s => return Err(bad(format!("sector bitmap state {s} is not defined"))),
            }
        } else {
            let block = index - index / (g.chunk_ratio + 1);
            if block >= g.data_blocks {
                return Ok(());
            }
            match e.state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => return Ok(()),
                PAYLOAD_FULLY_PRESENT => g.block_bytes(block),
                PAYLOAD_PARTIALLY_PRESENT if g.has_parent => g.block_bytes(block),
                PAYLOAD_PARTIALLY_PRESENT => {
                    return Err(bad("block is PARTIALLY_PRESENT but the image has no parent".into()))
                }
                s => return Err(bad(format!("payload block state {s} is not defined"))),
            }
        };
        let block = Region { offset: e.offset, length: len };
        if e.offset.checked_add(len).is_none_or(|end| end > self.file_len) {
            return Err(bad(format!(
                "block at file offset {} of {len} bytes ends past the end of the file ({} bytes)",
                e.offset, self.file_len
            )));
        }
        if let Some((_, what)) = self.reserved.iter().find(|(r, _)| r.length > 0 && r.overlaps(&block)) {
            return Err(bad(format!("block at file offset {} overlaps the {what}", e.offset)));
        }
        Ok(())
    }
}

fn poisoned(file: &ImageFile) -> Error {
    Error::new(crate::ErrorKind::Io, file.path().to_path_buf(), "BAT cache lock poisoned by a panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_spec_formulas() {
        // 1 MiB blocks, 512-byte sectors: chunk ratio 4096.
        let g = Geometry::new(MIB, 512, 5 << 30, false);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(g.data_blocks, 5120);
        assert_eq!(g.total_entries, 5120 + 1);
        assert_eq!(g.payload_index(4096), 4097);
        let d = Geometry::new(32 * MIB, 512, 3 * MIB, true);
        assert_eq!(d.chunk_ratio, 128);
        assert_eq!(d.total_entries, 129);
        assert_eq!(d.bitmap_index(0), 128);
        let big = Geometry::new(256 * MIB, 4096, 64 << 40, true);
        assert_eq!(big.chunk_ratio, 128);
        assert_eq!(entry(PAYLOAD_FULLY_PRESENT, 3 * MIB), (3 << 20) | 6);
        assert_eq!(decode(entry(SB_PRESENT, 7 * MIB)), Entry { state: SB_PRESENT, offset: 7 * MIB });
    }
}
