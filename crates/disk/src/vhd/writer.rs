//! Writing fixed and dynamic VHDs.
//!
//! Fixed: the file is sized to the virtual size plus the footer up front (sparse), guest
//! writes land at their own offset, and `finish` writes the footer.
//!
//! Dynamic, laid out as QEMU and Hyper-V do: footer copy at 0, dynamic header at 512,
//! BAT at 1536 (padded to a sector), then 2 MiB blocks, each a 512-byte sector bitmap
//! plus data, appended in the order they are first written, then the footer. The BAT
//! lives in memory (4 bytes per 2 MiB: 4 MiB for the largest disk); block data never
//! does. Bitmaps mark exactly the sectors written; a bounded cache of them is written
//! back on eviction and at `finish`.
//!
//! The footer says creator `tern`. QEMU 10 sizes every creator other than `vpc ` and
//! `qemu` by the footer's current size (see [`super::footer::Footer::virtual_size`]),
//! so our images round-trip their exact size even when CHS geometry cannot express
//! it (tested against `qemu-img info`). The geometry is still filled in by the
//! specification's algorithm for tools that want it.

use std::path::Path;
use std::sync::Arc;

use super::bat::{self, BlockLayout, SECTOR, UNALLOCATED};
use super::dynamic_header::DynamicHeader;
use super::footer::{
    DiskType, Footer, Geometry, FEATURES_RESERVED, FOOTER_SIZE, FORMAT_VERSION, MAX_DISK_SECTORS,
    NO_DATA_OFFSET, VHD_EPOCH_UNIX,
};
use crate::io::{FixedLayoutWriter, ImageFile};
use crate::{block_pieces, check_range, BlockPiece, Error, Result};

/// Block size of the dynamic disks tern writes: the specification's default, and what
/// QEMU and Hyper-V use.
pub const BLOCK_SIZE: u64 = 2 << 20;
/// Where the dynamic header goes.
const HEADER_OFFSET: u64 = 512;
/// Where the BAT goes, after the footer copy and the 1024-byte header.
const BAT_OFFSET: u64 = 1536;
/// Bitmaps kept in memory while writing (512 bytes each for 2 MiB blocks).
const BITMAP_CACHE: usize = 64;

/// Writes a new VHD image.
pub struct VhdWriter {
    file: Arc<ImageFile>,
    size: u64,
    footer: Footer,
    dynamic: Option<DynamicState>,
}

struct DynamicState {
    layout: BlockLayout,
    bat: Vec<u32>,
    /// File offset where the next block goes (and, at the end, the footer).
    next_free: u64,
    /// (block, bitmap, dirty), most recently used last.
    bitmaps: Vec<(usize, Vec<u8>, bool)>,
}

impl VhdWriter {
    /// Create a dynamic VHD with 2 MiB blocks at `path` (which must not exist).
    /// The size is rounded up to whole sectors.
    pub fn create_dynamic(path: &Path, size: u64) -> Result<Self> {
        let size = checked_size(path, size)?;
        let layout = BlockLayout::new(path, BLOCK_SIZE as u32)?;
        let entries = size.div_ceil(BLOCK_SIZE);
        let bat_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
        let file = ImageFile::create_new(path)?;
        let dynamic = DynamicState {
            layout,
            bat: vec![UNALLOCATED; entries as usize],
            next_free: BAT_OFFSET + bat_len,
            bitmaps: Vec::new(),
        };
        let footer = new_footer(size, DiskType::Dynamic, HEADER_OFFSET);
        Ok(VhdWriter { file: Arc::new(file), size, footer, dynamic: Some(dynamic) })
    }

    /// Create a fixed VHD at `path` (which must not exist). The size is rounded up to
    /// whole sectors.
    pub fn create_fixed(path: &Path, size: u64) -> Result<Self> {
        let size = checked_size(path, size)?;
        let file = ImageFile::create_new(path)?;
        file.set_len(size + FOOTER_SIZE as u64)?;
        let footer = new_footer(size, DiskType::Fixed, NO_DATA_OFFSET);
        Ok(VhdWriter { file: Arc::new(file), size, footer, dynamic: None })
    }

    /// The file offset of the data of `block`, allocating the block if needed.
    fn block_data(&mut self, block: usize) -> Result<u64> {
        let d = self.dynamic.as_mut().expect("dynamic");
        if d.bat[block] == UNALLOCATED {
            let sector =
                u32::try_from(d.next_free / SECTOR).ok().filter(|&s| s != UNALLOCATED).ok_or_else(|| {
                    Error::invalid(
                        Some(self.file.path()),
                        "VHD file grew past the 2 TiB a BAT entry can address",
                    )
                })?;
            d.bat[block] = sector;
            d.next_free += d.layout.footprint();
            // Extending the file makes the new bitmap and data read as zeros (a hole).
            self.file.set_len(d.next_free)?;
        }
        Ok(u64::from(d.bat[block]) * SECTOR)
    }

    /// Mark sectors `[first, last]` of `block` (bitmap at file offset `boff`) present.
    fn mark(&mut self, block: usize, boff: u64, first: u64, last: u64) -> Result<()> {
        let d = self.dynamic.as_mut().expect("dynamic");
        let pos = match d.bitmaps.iter().position(|(b, _, _)| *b == block) {
            Some(p) => p,
            None => {
                if d.bitmaps.len() >= BITMAP_CACHE {
                    let (b, bm, dirty) = d.bitmaps.remove(0);
                    if dirty {
                        self.file.write_all_at(&bm, u64::from(d.bat[b]) * SECTOR)?;
                    }
                }
                let mut bm = vec![0u8; d.layout.bitmap_size as usize];
                self.file.read_exact_at(&mut bm, boff)?;
                d.bitmaps.push((block, bm, false));
                d.bitmaps.len() - 1
            }
        };
        let entry = &mut d.bitmaps[pos];
        for s in first..=last {
            bat::set_bit(&mut entry.1, s);
        }
        entry.2 = true;
        Ok(())
    }
}

fn checked_size(path: &Path, size: u64) -> Result<u64> {
    let max = MAX_DISK_SECTORS * SECTOR;
    match size.checked_next_multiple_of(SECTOR) {
        Some(s) if s <= max => Ok(s),
        _ => Err(Error::invalid(
            Some(path),
            format!("VHD size {size} is larger than the format's maximum of 2040 GiB ({max} bytes)"),
        )),
    }
}

/// The geometry tern writes for a disk of `size` bytes: the specification's (appendix
/// "CHS Calculation") when it addresses exactly `size`, else the maximum 65535/16/255.
///
/// Why: readers disagree on which field sizes a VHD. Hyper-V, Azure and QEMU 10 take the
/// footer's current size for a creator like `tern`; QEMU up to 9 (Debian 12 ships 7.2,
/// block/vpc.c `vpc_open`) takes cylinders x heads x sectors for every creator it does
/// not list as a current-size one (`win `, `qem2`, `d2v `, `CTXS`, `tap\0`), which for
/// most sizes is less than the disk (a 1 GiB disk reads as 1073479680 bytes) and cuts
/// off its end, unless the geometry is the maximum, which every QEMU takes to mean "too
/// large for CHS, use the current size". So a size CHS cannot express exactly gets the
/// maximum geometry, and every reader sees the same size. (Only Virtual PC's BIOS, long
/// discontinued, uses the geometry itself.)
pub(crate) fn written_geometry(size: u64) -> Geometry {
    let spec = Geometry::for_sectors(size / SECTOR);
    if spec.total_sectors() * SECTOR == size {
        spec
    } else {
        Geometry { cylinders: 65535, heads: 16, sectors_per_track: 255 }
    }
}

fn new_footer(size: u64, disk_type: DiskType, data_offset: u64) -> Footer {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_UNIX);
    let major: u32 = env!("CARGO_PKG_VERSION_MAJOR").parse().unwrap_or(0);
    let minor: u32 = env!("CARGO_PKG_VERSION_MINOR").parse().unwrap_or(0);
    Footer {
        features: FEATURES_RESERVED,
        format_version: FORMAT_VERSION,
        data_offset,
        timestamp: now.saturating_sub(VHD_EPOCH_UNIX) as u32,
        creator_app: *b"tern",
        creator_version: (major << 16) | (minor & 0xffff),
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        geometry: written_geometry(size),
        disk_type,
        unique_id: random_id(),
        saved_state: 0,
    }
}

/// A random unique id (RFC 4122 version 4 layout). The operating system's random
/// source, or if that is unreadable, the per-process random keys of std's hasher.
fn random_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Read;
    let mut id = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut id));
    if from_os.is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, half) in id.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_usize(i);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

impl crate::DiskWriter for VhdWriter {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.size)?;
        if self.dynamic.is_none() {
            self.file.write_all_at(buf, offset)?;
            self.file.start_writeback(offset, buf.len() as u64);
            return Ok(());
        }
        for BlockPiece { block, within: in_block, buf: range } in block_pieces(offset, buf.len(), BLOCK_SIZE)
        {
            let block = block as usize;
            let n = range.len() as u64;
            let boff = self.block_data(block)?;
            let bitmap_size = self.dynamic.as_ref().expect("dynamic").layout.bitmap_size;
            self.file.write_all_at(&buf[range], boff + bitmap_size + in_block)?;
            self.mark(block, boff, in_block / SECTOR, (in_block + n - 1) / SECTOR)?;
        }
        Ok(())
    }

    fn skip_sync(&mut self) {
        self.file.set_sync(false);
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let footer = self.footer.to_bytes();
        match &self.dynamic {
            None => self.file.write_all_at(&footer, self.size)?,
            Some(d) => {
                for (b, bm, dirty) in &d.bitmaps {
                    if *dirty {
                        self.file.write_all_at(bm, u64::from(d.bat[*b]) * SECTOR)?;
                    }
                }
                // Padding after the last entry is all ones, as QEMU writes it.
                let mut table = vec![0xFFu8; (d.bat.len() * 4).div_ceil(SECTOR as usize) * SECTOR as usize];
                for (i, e) in d.bat.iter().enumerate() {
                    table[i * 4..i * 4 + 4].copy_from_slice(&e.to_be_bytes());
                }
                self.file.write_all_at(&table, BAT_OFFSET)?;
                let header = DynamicHeader::dynamic_bytes(BAT_OFFSET, d.bat.len() as u32, BLOCK_SIZE as u32);
                self.file.write_all_at(&header, HEADER_OFFSET)?;
                self.file.write_all_at(&footer, 0)?;
                self.file.write_all_at(&footer, d.next_free)?;
            }
        }
        self.file.sync()
    }

    fn concurrent(&self) -> Option<Arc<dyn crate::ConcurrentWrite>> {
        // A fixed VHD is the guest bytes from offset 0, then the footer.
        match self.dynamic {
            None => {
                Some(Arc::new(FixedLayoutWriter { file: self.file.clone(), data_offset: 0, size: self.size }))
            }
            Some(_) => None,
        }
    }
}
