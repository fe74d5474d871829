//! Writing new VHDX images: dynamic, and differencing on a VHDX parent.
//!
//! Layout of what this writer produces (every piece 1 MiB aligned):
//!
//! ```text
//! 0      header section (identifier, 2 headers, 2 region tables)
//! 1 MiB  log, 1 MiB, empty (LogGuid zero)
//! 2 MiB  metadata region, 1 MiB
//! 3 MiB  BAT region, the table rounded up to whole MiB
//! ...    payload blocks (and sector bitmap blocks) in the order first written
//! ```
//!
//! Blocks are allocated at the end of the file on first write and the file is sparse,
//! so the unwritten rest of a new block reads as zeros without being written; writes
//! of zeros to blocks never allocated are skipped. The BAT (8 bytes per block) stays
//! in memory, block data never does. The headers are written last, after everything
//! else is flushed: an image whose writer was not finished has no valid header and is
//! refused by every reader.
//!
//! A differencing image records which sectors it holds in sector bitmap blocks (read
//! and updated in the file, not kept in memory); at finish, blocks with every sector
//! written are marked FULLY_PRESENT and the others PARTIALLY_PRESENT.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use super::bat::{
    entry, Geometry, PAYLOAD_FULLY_PRESENT, PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, SB_PRESENT,
    SECTOR_BITMAP_BLOCK,
};
use super::guid::Guid;
use super::header::{identifier_bytes, Header, HEADER_OFFSETS};
use super::metadata::{region_bytes, Metadata, ParentLocator, MAX_VIRTUAL_SIZE};
use super::region_table::{table_bytes, Region, Regions, REGION_TABLE_OFFSETS};
use super::{VhdxDisk, MIB};
use crate::convert::is_zero;
use crate::io::ImageFile;
use crate::{block_pieces, check_range, BlockPiece, Disk, Error, OpenOptions, Result};

const LOGICAL_SECTOR: u64 = 512;
const PHYSICAL_SECTOR: u32 = 4096;
const LOG: Region = Region { offset: MIB, length: MIB };
const METADATA: Region = Region { offset: 2 * MIB, length: MIB };
const BAT_OFFSET: u64 = 3 * MIB;

/// What makes a new image a differencing child: its size (the parent's) and the
/// parent locator, which must hold `parent_linkage` (the parent's `DataWriteGuid`).
#[derive(Debug, Clone)]
pub struct DifferencingOptions {
    /// Guest size; the parent's.
    pub virtual_size: u64,
    /// Key/value pairs stored in the parent locator.
    pub locator: ParentLocator,
}

impl DifferencingOptions {
    /// Options for a child at `child` of the VHDX at `parent`: `parent_linkage` from
    /// the parent's header, `relative_path` when the parent sits in the child's folder
    /// (Windows style, `.\name`), and the absolute path under `absolute_win32_path`.
    pub fn for_parent(child: &Path, parent: &Path) -> Result<DifferencingOptions> {
        let file = ImageFile::open(parent, false)?;
        let disk = VhdxDisk::open(file, &OpenOptions::read_only(), &mut Vec::new())?;
        if disk.md.logical_sector_size != LOGICAL_SECTOR as u32 {
            return Err(Error::unsupported(
                parent,
                "tern writes differencing images only on 512-byte-sector parents",
            ));
        }
        let abs = parent.canonicalize().map_err(|e| Error::io(parent, "resolve path", e))?;
        let mut entries = vec![("parent_linkage".to_string(), disk.data_write_guid().to_string())];
        let child_dir = child.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let same_dir = child_dir.canonicalize().ok().as_deref() == abs.parent();
        if let (true, Some(name)) = (same_dir, abs.file_name().and_then(|n| n.to_str())) {
            entries.push(("relative_path".to_string(), format!(".\\{name}")));
        }
        if let Some(a) = abs.to_str() {
            entries.push(("absolute_win32_path".to_string(), a.to_string()));
        }
        Ok(DifferencingOptions { virtual_size: disk.virtual_size(), locator: ParentLocator { entries } })
    }
}

/// Writes a new VHDX image.
pub struct VhdxWriter {
    payload: Arc<Payload>,
    locator: Option<ParentLocator>,
}

/// What guest writes need: the file, its geometry and the block allocation, which is
/// the one thing concurrent writers share (a block is allocated under the lock, its
/// data written outside it).
struct Payload {
    file: Arc<ImageFile>,
    geometry: Geometry,
    alloc: Mutex<Allocation>,
}

struct Allocation {
    bat: Vec<u64>,
    next_free: u64,
}

impl Allocation {
    fn allocate(&mut self, len: u64, file: &ImageFile) -> Result<u64> {
        let off = self.next_free;
        self.next_free =
            off.checked_add(len).ok_or_else(|| Error::invalid(Some(file.path()), "file too large"))?;
        Ok(off)
    }
}

impl Payload {
    fn alloc(&self) -> MutexGuard<'_, Allocation> {
        // A panic while holding the lock leaves the table consistent (every update is
        // one assignment), so a poisoned lock is still usable.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write guest data into a dynamic (not differencing) image: blocks are allocated
    /// on the first non-zero write; zeros to an unallocated block are skipped.
    fn write_dynamic(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.geometry.virtual_size)?;
        let bs = self.geometry.block_size;
        for BlockPiece { block, within, buf: range } in block_pieces(offset, buf.len(), bs) {
            let piece = &buf[range];
            let index = self.geometry.payload_index(block) as usize;
            let at = {
                let mut a = self.alloc();
                if a.bat[index] & 7 == u64::from(PAYLOAD_NOT_PRESENT) {
                    if is_zero(piece) {
                        continue;
                    }
                    let at = a.allocate(bs, &self.file)?;
                    // Growing the file here, as qemu-img does, keeps the data writes
                    // inside the file's size: they then need not update it.
                    self.file.set_len(a.next_free)?;
                    a.bat[index] = entry(PAYLOAD_FULLY_PRESENT, at);
                }
                (a.bat[index] >> 20) * MIB
            };
            self.file.write_all_at(piece, at + within)?;
        }
        Ok(())
    }
}

impl crate::ConcurrentWrite for Payload {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_dynamic(buf, offset)
    }
}

impl VhdxWriter {
    /// Create a dynamic VHDX of `size` bytes (rounded up to whole 512-byte sectors, as
    /// qemu-img does) with `block_size` blocks (a power of two, 1 MiB ..= 256 MiB).
    pub fn create(path: &Path, size: u64, block_size: u64) -> Result<Self> {
        Self::create_inner(path, size, block_size, None)
    }

    /// Create a differencing VHDX whose unwritten sectors read from the parent named in
    /// `options`. Writes must be whole 512-byte sectors.
    pub fn create_differencing(path: &Path, block_size: u64, options: &DifferencingOptions) -> Result<Self> {
        let linkage = options.locator.get("parent_linkage");
        if linkage.and_then(Guid::parse).is_none() {
            return Err(Error::invalid(Some(path), "the parent locator needs a parent_linkage GUID"));
        }
        Self::create_inner(path, options.virtual_size, block_size, Some(options.locator.clone()))
    }

    fn create_inner(path: &Path, size: u64, block_size: u64, locator: Option<ParentLocator>) -> Result<Self> {
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(Error::invalid(
                Some(path),
                format!("VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
            ));
        }
        let size = size.div_ceil(LOGICAL_SECTOR).saturating_mul(LOGICAL_SECTOR);
        if size == 0 || size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(
                Some(path),
                format!("VHDX virtual size {size} is not between 1 byte and 64 TiB"),
            ));
        }
        let geometry = Geometry::new(block_size, LOGICAL_SECTOR, size, locator.is_some());
        let bat_len = geometry.table_bytes().div_ceil(MIB) * MIB;
        let entries = usize::try_from(geometry.total_entries)
            .map_err(|_| Error::invalid(Some(path), "BAT too large for this machine"))?;
        let file = ImageFile::create_new(path)?;
        file.write_all_at(&identifier_bytes(&format!("tern {}", env!("CARGO_PKG_VERSION"))), 0)?;
        let alloc = Mutex::new(Allocation { bat: vec![0; entries], next_free: BAT_OFFSET + bat_len });
        Ok(VhdxWriter { payload: Arc::new(Payload { file: Arc::new(file), geometry, alloc }), locator })
    }

    /// Mark guest sectors `[offset, offset + len)` (inside one block) as written in the
    /// sector bitmap of their chunk.
    fn mark_sectors(&mut self, block: u64, offset: u64, len: u64) -> Result<()> {
        let p = &*self.payload;
        let g = p.geometry;
        let sb_index = g.bitmap_index(block / g.chunk_ratio) as usize;
        let sb_offset = {
            let mut a = p.alloc();
            if a.bat[sb_index] & 7 != u64::from(SB_PRESENT) {
                let off = a.allocate(SECTOR_BITMAP_BLOCK, &p.file)?;
                a.bat[sb_index] = entry(SB_PRESENT, off);
            }
            (a.bat[sb_index] >> 20) * MIB
        };
        let per_chunk = 1u64 << 23;
        let (first, last) =
            ((offset / LOGICAL_SECTOR) % per_chunk, ((offset + len) / LOGICAL_SECTOR - 1) % per_chunk);
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        let at = sb_offset + first / 8;
        p.file.read_at_zero_fill(&mut bits, at)?;
        for s in first..=last {
            let b = s - (first / 8) * 8;
            bits[(b / 8) as usize] |= 1 << (b % 8);
        }
        p.file.write_all_at(&bits, at)
    }

    /// Whether every sector of payload block `block` inside the disk was written.
    fn block_complete(&self, block: u64, bat: &[u64]) -> Result<bool> {
        let p = &*self.payload;
        let g = p.geometry;
        let sb = bat[g.bitmap_index(block / g.chunk_ratio) as usize];
        let sectors = g.block_bytes(block) / LOGICAL_SECTOR;
        let first = (block % g.chunk_ratio) * g.sectors_per_block();
        let mut bits = vec![0u8; sectors.div_ceil(8) as usize];
        p.file.read_at_zero_fill(&mut bits, (sb >> 20) * MIB + first / 8)?;
        let full_bytes = (sectors / 8) as usize;
        let rest = sectors % 8;
        Ok(bits[..full_bytes].iter().all(|&b| b == 0xff)
            && (rest == 0 || bits[full_bytes] & ((1u8 << rest) - 1) == (1u8 << rest) - 1))
    }
}

impl crate::DiskWriter for VhdxWriter {
    fn virtual_size(&self) -> u64 {
        self.payload.geometry.virtual_size
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        if self.locator.is_none() {
            return self.payload.write_dynamic(buf, offset);
        }
        let path = self.payload.file.path().to_path_buf();
        check_range(&path, offset, buf.len(), self.payload.geometry.virtual_size)?;
        if !offset.is_multiple_of(LOGICAL_SECTOR) || !(buf.len() as u64).is_multiple_of(LOGICAL_SECTOR) {
            return Err(Error::invalid(
                Some(&path),
                format!(
                    "write of {} bytes at {offset}: differencing VHDX writes must be whole 512-byte sectors",
                    buf.len()
                ),
            ));
        }
        // In a differencing image even zeros are data: they hide the parent's.
        let bs = self.payload.geometry.block_size;
        for BlockPiece { block, within, buf: range } in block_pieces(offset, buf.len(), bs) {
            let (off, n) = (offset + range.start as u64, range.len());
            let p = &*self.payload;
            let index = p.geometry.payload_index(block) as usize;
            let at = {
                let mut a = p.alloc();
                if a.bat[index] & 7 == u64::from(PAYLOAD_NOT_PRESENT) {
                    let at = a.allocate(bs, &p.file)?;
                    a.bat[index] = entry(PAYLOAD_FULLY_PRESENT, at);
                }
                (a.bat[index] >> 20) * MIB
            };
            p.file.write_all_at(&buf[range], at + within)?;
            self.mark_sectors(block, off, n as u64)?;
        }
        Ok(())
    }

    fn skip_sync(&mut self) {
        self.payload.file.set_sync(false);
    }

    fn concurrent(&self) -> Option<Arc<dyn crate::ConcurrentWrite>> {
        // Dynamic images: writers share only the block allocation. Differencing images
        // also read-modify-write sector bitmaps, so they are written from one thread.
        match self.locator {
            None => Some(self.payload.clone()),
            Some(_) => None,
        }
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let p = &*self.payload;
        let g = p.geometry;
        let (mut bat, next_free) = {
            let a = p.alloc();
            (a.bat.clone(), a.next_free)
        };
        if self.locator.is_some() {
            for block in 0..g.data_blocks {
                let index = g.payload_index(block) as usize;
                if bat[index] & 7 == u64::from(PAYLOAD_FULLY_PRESENT) && !self.block_complete(block, &bat)? {
                    bat[index] = (bat[index] & !7) | u64::from(PAYLOAD_PARTIALLY_PRESENT);
                }
            }
        }
        let file = &*p.file;
        file.set_len(next_free)?;
        let bat_bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        file.write_all_at(&bat_bytes, BAT_OFFSET)?;
        let md = Metadata {
            block_size: g.block_size,
            leave_block_allocated: false,
            has_parent: self.locator.is_some(),
            virtual_size: g.virtual_size,
            virtual_disk_id: random_guid(file)?,
            logical_sector_size: LOGICAL_SECTOR as u32,
            physical_sector_size: PHYSICAL_SECTOR,
            parent_locator: self.locator.clone(),
        };
        file.write_all_at(&region_bytes(&md, METADATA.length as usize), METADATA.offset)?;
        let regions = Regions {
            bat: Region { offset: BAT_OFFSET, length: g.table_bytes().div_ceil(MIB) * MIB },
            metadata: METADATA,
        };
        let table = table_bytes(&regions);
        for off in REGION_TABLE_OFFSETS {
            file.write_all_at(&table, off)?;
        }
        file.sync()?;
        // The commit point: valid headers make the image usable.
        let data_write_guid = random_guid(file)?;
        let file_write_guid = random_guid(file)?;
        for (i, off) in HEADER_OFFSETS.into_iter().enumerate() {
            let h = Header {
                sequence_number: i as u64 + 1,
                file_write_guid,
                data_write_guid,
                log_guid: Guid::ZERO,
                log_version: 0,
                version: 1,
                log_length: LOG.length as u32,
                log_offset: LOG.offset,
            };
            file.write_all_at(&h.to_bytes(), off)?;
        }
        file.sync()
    }
}

fn random_guid(file: &ImageFile) -> Result<Guid> {
    Guid::random().map_err(|e| Error::io(file.path(), "generate a GUID", e))
}
