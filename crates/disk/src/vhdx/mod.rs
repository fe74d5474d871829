//! VHDX ([MS-VHDX], Microsoft's Virtual Hard Disk v2): reading fixed, dynamic and
//! differencing images, replaying their metadata log, and writing dynamic images.
//!
//! File layout (all structures little-endian, [MS-VHDX] 2.1):
//!
//! ```text
//! 0 .. 1 MiB   header section: file type identifier, header 1 (64 KiB),
//!              header 2 (128 KiB), region table 1 (192 KiB), region table 2 (256 KiB)
//! anywhere     log, BAT region and metadata region, 1 MiB aligned, where the
//!              header (log) and the region table (BAT, metadata) say
//! anywhere     payload blocks and sector bitmap blocks, 1 MiB aligned, as the BAT says
//! ```
//!
//! One concept per file: [`header`] (identifier, headers, which is current),
//! [`region_table`], [`metadata`] (items and the parent locator), [`bat`] (entries,
//! geometry, bounded page cache), [`log`] (finding and replaying the active sequence),
//! [`parent`] (locating a differencing image's parent) and [`writer`].
//!
//! Opening read-only never writes. An image whose log holds entries to replay is
//! refused read-only (its metadata on disk is not the image's state until replayed);
//! opened writable, the log is replayed, flushed, and cleared in a new header before
//! anything else is read.

mod bat;
mod guid;
mod header;
mod le;
mod log;
mod metadata;
mod parent;
mod region_table;
mod writer;

use std::path::PathBuf;

use bat::{
    Bat, BatStats, Entry, Geometry, PAYLOAD_FULLY_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_ZERO,
    SB_PRESENT,
};
use header::{read_headers, read_identifier, update_headers, Header, Headers};
use metadata::{read_metadata, Metadata};
use region_table::{read_regions, Region, Regions};

use crate::io::ImageFile;
use crate::{
    block_pieces, check_range, BackingInfo, BlockPiece, Disk, Error, Format, ImageInfo, MapKind, Mapping,
    OpenOptions, Result,
};

pub use guid::Guid;
pub use header::FILE_SIGNATURE;
pub use metadata::ParentLocator;
pub use writer::{DifferencingOptions, VhdxWriter};

const MIB: u64 = 1 << 20;
/// The header section every VHDX starts with.
const HEADER_SECTION: Region = Region { offset: 0, length: MIB };

/// An open VHDX image.
pub struct VhdxDisk {
    file: ImageFile,
    creator: String,
    headers: Headers,
    md: Metadata,
    geometry: Geometry,
    bat: Bat,
    stats: BatStats,
    log_state: String,
    /// The parent, for differencing images opened with `allow_backing`.
    parent: Option<(Box<dyn Disk>, PathBuf)>,
}

impl VhdxDisk {
    /// Open a VHDX image. With `options.writable` a pending log is replayed first; with
    /// `options.allow_backing` a differencing image's parent is opened too.
    pub fn open(file: ImageFile, options: &OpenOptions, seen: &mut Vec<PathBuf>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let creator = read_identifier(&file)?;
        let len = file.len()?;
        if len < HEADER_SECTION.length {
            return Err(Error::corrupt(
                &path,
                format!("truncated: {len} bytes is shorter than the 1 MiB header section"),
            ));
        }
        let mut headers = read_headers(&file)?;
        let log =
            Region { offset: headers.current.log_offset, length: u64::from(headers.current.log_length) };
        if log.length > 0 && log.end() > len {
            return Err(Error::corrupt(
                &path,
                format!(
                    "the log at offset {} of {} bytes ends past the end of the file ({len} bytes)",
                    log.offset, log.length
                ),
            ));
        }
        let log_state = if headers.current.log_guid.is_zero() {
            "empty".to_string()
        } else {
            match log::find_active_sequence(&file, log, headers.current.log_guid)? {
                None => "no valid entries (nothing to replay)".to_string(),
                Some(_) if !file.writable() => {
                    return Err(Error::invalid(
                        Some(&path),
                        "the VHDX has a pending log; open it writable to replay it",
                    ))
                }
                Some(seq) => {
                    let protected = [(Region { offset: 0, length: 192 << 10 }, "headers"), (log, "log")];
                    log::replay(&file, &seq, &protected)?;
                    let next = Header {
                        log_guid: Guid::ZERO,
                        file_write_guid: Guid::random()
                            .map_err(|e| Error::io(&path, "generate a GUID", e))?,
                        ..headers.current.clone()
                    };
                    headers = update_headers(&file, &headers, next)?;
                    format!("replayed {} entries", seq.len())
                }
            }
        };
        let len = file.len()?;
        let Regions { bat: bat_region, metadata: md_region } = read_regions(&file, len, log)?;
        let md = read_metadata(&file, md_region)?;
        let geometry =
            Geometry::new(md.block_size, u64::from(md.logical_sector_size), md.virtual_size, md.has_parent);
        if bat_region.length < geometry.table_bytes() {
            return Err(Error::corrupt(
                &path,
                format!(
                    "the BAT region is {} bytes but {} entries need {}",
                    bat_region.length,
                    geometry.total_entries,
                    geometry.table_bytes()
                ),
            ));
        }
        let reserved = vec![
            (HEADER_SECTION, "header section"),
            (log, "log"),
            (bat_region, "BAT region"),
            (md_region, "metadata region"),
        ];
        let bat = Bat::new(bat_region, geometry, reserved, len);
        let stats = bat.validate_all(&file)?;
        let parent = match (&md.parent_locator, options.allow_backing) {
            (Some(loc), true) => Some(parent::open_parent(&file, loc, options, seen)?),
            _ => None,
        };
        Ok(VhdxDisk { file, creator, headers, md, geometry, bat, stats, log_state, parent })
    }

    /// The image's `DataWriteGuid` (what a child's `parent_linkage` names).
    pub fn data_write_guid(&self) -> Guid {
        self.headers.current.data_write_guid
    }

    /// The parent locator of a differencing image.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.md.parent_locator.as_ref()
    }

    /// Fill `buf` from the parent at guest `offset`, zeros where there is none.
    fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some((p, _)) if offset < p.virtual_size() => {
                let n = (p.virtual_size() - offset).min(buf.len() as u64) as usize;
                p.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
            }
            _ => buf.fill(0),
        }
        Ok(())
    }

    /// Runs of sectors present / absent in a PARTIALLY_PRESENT block, covering guest
    /// `[offset, offset + len)` (inside `block`), as (start, length, present); at most
    /// `max_runs` of them, the last one possibly ending before `offset + len`.
    ///
    /// The sector bitmap is read through a window of [`BITMAP_WINDOW`] bytes, so one
    /// call costs in proportion to the runs it returns, not to the block: mapping a
    /// 256 MiB block of alternating sectors run by run stays linear.
    fn bitmap_runs(
        &self,
        block: u64,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, u64, bool)>> {
        let g = &self.geometry;
        let chunk = block / g.chunk_ratio;
        let sb: Entry = self.bat.bitmap(&self.file, chunk)?;
        if sb.state != SB_PRESENT {
            return Err(Error::corrupt(
                self.file.path(),
                format!("payload block {block} is PARTIALLY_PRESENT but the sector bitmap of its chunk {chunk} is not present"),
            ));
        }
        let lss = g.logical_sector_size;
        // A chunk covers 2^23 sectors: one bit each in its 1 MiB bitmap block, which
        // the BAT check placed inside the file.
        let per_chunk = 1u64 << 23;
        let first = offset / lss;
        let last = (offset + len - 1) / lss;
        let mut window = BitmapWindow { base: sb.offset, start: 0, bytes: Vec::new() };
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for s in first..=last {
            let start = (s * lss).max(offset);
            let end = ((s + 1) * lss).min(offset + len);
            let p = window.bit(&self.file, s % per_chunk)?;
            match runs.last_mut() {
                Some(r) if r.2 == p => r.1 += end - start,
                _ => {
                    if runs.len() == max_runs {
                        break;
                    }
                    runs.push((start, end - start, p));
                }
            }
        }
        Ok(runs)
    }
}

/// Bytes of a sector bitmap read at a time.
const BITMAP_WINDOW: u64 = 4096;

/// A window onto one 1 MiB sector bitmap block at file offset `base`.
struct BitmapWindow {
    base: u64,
    /// Byte of the bitmap where `bytes` starts.
    start: u64,
    bytes: Vec<u8>,
}

impl BitmapWindow {
    /// Bit `i` (< 2^23) of the bitmap, least significant bit first ([MS-VHDX] 2.5.1.2).
    fn bit(&mut self, file: &ImageFile, i: u64) -> Result<bool> {
        let byte = i / 8;
        if byte < self.start || byte >= self.start + self.bytes.len() as u64 {
            let n = BITMAP_WINDOW.min(bat::SECTOR_BITMAP_BLOCK - byte);
            self.bytes.resize(n as usize, 0);
            file.read_exact_at(&mut self.bytes, self.base + byte)?;
            self.start = byte;
        }
        Ok(self.bytes[(byte - self.start) as usize] & (1 << (i % 8)) != 0)
    }
}

impl Disk for VhdxDisk {
    fn virtual_size(&self) -> u64 {
        self.md.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.md.virtual_size)?;
        let bs = self.geometry.block_size;
        for BlockPiece { block, within, buf: range } in block_pieces(offset, buf.len(), bs) {
            let (off, n) = (offset + range.start as u64, range.len());
            let out = &mut buf[range];
            let e = self.bat.payload(&self.file, block)?;
            match e.state {
                PAYLOAD_FULLY_PRESENT => self.file.read_exact_at(out, e.offset + within)?,
                PAYLOAD_ZERO => out.fill(0),
                PAYLOAD_PARTIALLY_PRESENT => {
                    for (start, len, present) in self.bitmap_runs(block, off, n as u64, usize::MAX)? {
                        let piece = &mut out[(start - off) as usize..(start - off + len) as usize];
                        if present {
                            self.file.read_exact_at(piece, e.offset + start % bs)?;
                        } else {
                            self.read_parent(piece, start)?;
                        }
                    }
                }
                // NOT_PRESENT, UNDEFINED, UNMAPPED: the parent's bytes in a
                // differencing image, zeros otherwise.
                _ => self.read_parent(out, off)?,
            }
        }
        Ok(())
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let size = self.md.virtual_size;
        if offset >= size {
            return Err(Error::invalid(
                Some(self.file.path()),
                format!("map offset {offset} is beyond the end"),
            ));
        }
        let limit = offset + max_len.clamp(1, size - offset);
        let bs = self.geometry.block_size;
        let mut kind: Option<MapKind> = None;
        let mut pos = offset;
        while pos < limit {
            let block = pos / bs;
            let seg_end = ((block + 1) * bs).min(limit);
            let e = self.bat.payload(&self.file, block)?;
            if kind.is_some() && self.needs_detail(e.state) {
                break;
            }
            let seg_kind = match e.state {
                PAYLOAD_FULLY_PRESENT => MapKind::Data,
                PAYLOAD_ZERO => MapKind::Zero,
                PAYLOAD_PARTIALLY_PRESENT => {
                    let (start, len, present) = self.bitmap_runs(block, pos, seg_end - pos, 1)?[0];
                    if present {
                        return Ok(Mapping { start, length: len, kind: MapKind::Data });
                    }
                    return self.parent_mapping(start, len);
                }
                _ if self.parent.is_some() => return self.parent_mapping(pos, seg_end - pos),
                _ => MapKind::Unallocated,
            };
            match kind {
                None => kind = Some(seg_kind),
                Some(k) if k != seg_kind => break,
                Some(_) => {}
            }
            pos = seg_end;
        }
        Ok(Mapping { start: offset, length: pos - offset, kind: kind.unwrap_or(MapKind::Unallocated) })
    }

    fn info(&self) -> Result<ImageInfo> {
        let md = &self.md;
        let subformat = if md.has_parent {
            "differencing"
        } else if md.leave_block_allocated
            && self.stats.fully_present + self.stats.zero == self.geometry.data_blocks
        {
            // Hyper-V's fixed images have every block present; qemu-img's mark blocks
            // ZERO until written when the file system reads holes as zeros.
            "fixed"
        } else {
            "dynamic"
        };
        let backing = md.parent_locator.as_ref().map(|loc| BackingInfo {
            name: parent::first_name(loc),
            locators: parent::describe(loc),
            format: Some("vhdx".to_string()),
            opened: self.parent.as_ref().map(|(_, p)| p.clone()),
        });
        let h = &self.headers.current;
        let mut details = vec![
            ("creator".to_string(), self.creator.clone()),
            ("log".to_string(), self.log_state.clone()),
            ("physical sector size".to_string(), md.physical_sector_size.to_string()),
            ("leave blocks allocated".to_string(), md.leave_block_allocated.to_string()),
            (
                "blocks".to_string(),
                format!(
                    "{} total, {} fully present, {} partially present, {} zero, {} not present",
                    self.geometry.data_blocks,
                    self.stats.fully_present,
                    self.stats.partially_present,
                    self.stats.zero,
                    self.stats.not_present
                ),
            ),
            ("virtual disk id".to_string(), md.virtual_disk_id.to_string()),
            ("data write guid".to_string(), h.data_write_guid.to_string()),
        ];
        if let Some(l) = md.parent_locator.as_ref().and_then(|l| l.get("parent_linkage")) {
            details.push(("parent linkage".to_string(), l.to_string()));
        }
        Ok(ImageInfo {
            format: Format::Vhdx,
            subformat: subformat.to_string(),
            virtual_size: md.virtual_size,
            allocated_bytes: self.file.allocated_bytes()?,
            file_size: self.file.len()?,
            cluster_size: Some(md.block_size),
            logical_sector_size: md.logical_sector_size,
            backing,
            details,
        })
    }
}

impl VhdxDisk {
    /// Whether a block in `state` maps through a bitmap or the parent, which ends a
    /// merged run (its answer is computed on its own).
    fn needs_detail(&self, state: u8) -> bool {
        state == PAYLOAD_PARTIALLY_PRESENT
            || (state != PAYLOAD_FULLY_PRESENT && state != PAYLOAD_ZERO && self.parent.is_some())
    }

    /// The mapping of `[offset, offset + len)` taken from the parent.
    fn parent_mapping(&self, offset: u64, len: u64) -> Result<Mapping> {
        match &self.parent {
            Some((p, _)) if offset < p.virtual_size() => {
                let m = p.mapping(offset, len.min(p.virtual_size() - offset))?;
                Ok(Mapping { start: offset, length: m.length.min(len).max(1), kind: m.kind })
            }
            _ => Ok(Mapping { start: offset, length: len, kind: MapKind::Unallocated }),
        }
    }
}
