//! VHD (Microsoft Virtual Hard Disk Image Format Specification): fixed, dynamic and
//! differencing disks, read; fixed and dynamic disks, written.
//!
//! - A **fixed** disk is the guest bytes followed by a 512-byte footer ([`footer`]).
//! - A **dynamic** disk is a footer copy, a dynamic header ([`dynamic_header`]), a block
//!   allocation table and blocks, each a sector bitmap plus data ([`bat`]), then the
//!   footer. Sectors whose bitmap bit is clear, and blocks never allocated, read as zero.
//! - A **differencing** disk is a dynamic disk whose absent sectors come from a parent
//!   named by parent locators ([`parent`]); the parent is opened only with
//!   [`OpenOptions::allow_backing`], and must carry the unique id the child expects.
//!
//! The virtual size follows QEMU's rule (see [`footer::Footer::virtual_size`]) so that
//! tern and `qemu-img convert -O raw` read the same bytes. One deliberate difference:
//! QEMU ignores sector bitmaps and reads every sector of an allocated block from the
//! file; tern follows the specification and reads sectors whose bit is clear as zero
//! (or from the parent). The two agree on images QEMU writes (all bits set) and on
//! images whose bytes under clear bits are zero, which is what Windows and tern write.
//! Writing is in [`VhdWriter`].
//!
//! Image metadata is untrusted: the footer and header checksums are verified, every
//! BAT entry is checked to point inside the file and clear of metadata and other
//! blocks, and every offset and length is checked before it is used.

pub mod bat;
pub mod dynamic_header;
pub mod footer;
pub mod parent;
mod writer;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::io::ImageFile;
use crate::{
    check_range, BackingInfo, Disk, Error, Format, ImageInfo, MapKind, Mapping, OpenOptions, Result,
};
use bat::{Bat, BlockIndex, BlockLayout, Region, SECTOR};
use dynamic_header::{DynamicHeader, HEADER_SIZE};
use footer::{DiskType, Footer, FooterPlace, SizeRule, FOOTER_SIZE, MAX_DISK_SECTORS};
use parent::Locator;

pub use footer::COOKIE;
pub use writer::VhdWriter;

/// How many block bitmaps a reader keeps: enough for several readers walking the
/// disk at different places, small whatever the disk size (at most 32 × 64 KiB).
const BITMAP_CACHE: usize = 32;

/// An open VHD image.
pub struct VhdDisk {
    file: ImageFile,
    footer: Footer,
    footer_note: Option<String>,
    size: u64,
    size_rule: SizeRule,
    dynamic: Option<Box<Dynamic>>,
}

/// What dynamic and differencing disks have beyond the footer.
struct Dynamic {
    header: DynamicHeader,
    layout: BlockLayout,
    bat: Bat,
    bitmaps: Mutex<Vec<(u64, Arc<[u8]>)>>,
    locators: Vec<Locator>,
    parent: Option<Box<dyn Disk>>,
    parent_path: Option<PathBuf>,
}

/// A piece of guest range inside one block: stored in the file at `file_offset`, or
/// absent (zero, or the parent's).
struct Segment {
    end: u64,
    file_offset: Option<u64>,
}

impl VhdDisk {
    /// Open a VHD image. `seen` is the backing chain above it (see `detect.rs`).
    pub fn open(file: ImageFile, options: &OpenOptions, seen: &mut Vec<PathBuf>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let located = footer::locate(&file)?;
        let footer = located.footer;
        let (size, size_rule) = footer.virtual_size();
        if size / SECTOR > MAX_DISK_SECTORS {
            return Err(Error::unsupported(
                &path,
                format!("VHD virtual size {size} is larger than the format's maximum of 2040 GiB"),
            ));
        }
        let file_len = file.len()?;
        let data_end = file_len - located.trailing_len;
        let dynamic = match footer.disk_type {
            DiskType::Fixed => {
                if size > data_end {
                    return Err(Error::corrupt(
                        &path,
                        format!(
                            "fixed VHD: the data area before the footer is {data_end} bytes, smaller than the virtual size {size}"
                        ),
                    ));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => {
                Some(Box::new(open_dynamic(&file, &footer, located.place, size, data_end, options, seen)?))
            }
        };
        Ok(VhdDisk { file, footer, footer_note: located.note, size, size_rule, dynamic })
    }

    /// The block containing `pos` and what it holds from `pos` up to at most `end`.
    fn segment(&self, d: &Dynamic, pos: u64, end: u64) -> Result<Segment> {
        let bs = d.layout.block_size;
        let block = pos / bs;
        let block_start = block * bs;
        let seg_end = end.min(block_start + bs);
        let Some(boff) = d.bat.block_offset(BlockIndex(block)) else {
            return Ok(Segment { end: seg_end, file_offset: None });
        };
        let bitmap = self.bitmap(d, block, boff)?;
        let first = (pos - block_start) / SECTOR;
        let max = (seg_end - block_start).div_ceil(SECTOR) - first;
        let (present, n) = bat::run(&bitmap, first, max);
        let end = seg_end.min(block_start + (first + n) * SECTOR);
        let file_offset = present.then(|| boff + d.layout.bitmap_size + (pos - block_start));
        Ok(Segment { end, file_offset })
    }

    /// The sector bitmap of `block` (stored at file offset `boff`), cached.
    fn bitmap(&self, d: &Dynamic, block: u64, boff: u64) -> Result<Arc<[u8]>> {
        {
            let cache = d.bitmaps.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, b)) = cache.iter().find(|(i, _)| *i == block) {
                return Ok(b.clone());
            }
        }
        // Bitmap sizes are at most 64 KiB (block size is bounded).
        let mut buf = vec![0u8; d.layout.bitmap_size as usize];
        self.file.read_exact_at(&mut buf, boff)?;
        let bitmap: Arc<[u8]> = buf.into();
        let mut cache = d.bitmaps.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= BITMAP_CACHE {
            cache.remove(0);
        }
        cache.push((block, bitmap.clone()));
        Ok(bitmap)
    }

    /// Bytes of an absent range: the parent's, zero beyond the parent's end or
    /// without a parent.
    fn read_absent(d: &Dynamic, buf: &mut [u8], offset: u64) -> Result<()> {
        match &d.parent {
            Some(p) if offset < p.virtual_size() => {
                let n = (p.virtual_size() - offset).min(buf.len() as u64) as usize;
                p.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
            }
            _ => buf.fill(0),
        }
        Ok(())
    }

    /// The mapping of an absent range `[offset, offset + len)`.
    fn map_absent(d: &Dynamic, offset: u64, len: u64) -> Result<Mapping> {
        match &d.parent {
            Some(p) if offset < p.virtual_size() => {
                let m = p.mapping(offset, len.min(p.virtual_size() - offset))?;
                Ok(Mapping { start: offset, length: m.length.clamp(1, len), kind: m.kind })
            }
            // Past the end of a smaller parent: nothing there, zeros by definition.
            Some(_) => Ok(Mapping { start: offset, length: len, kind: MapKind::Zero }),
            None => Ok(Mapping { start: offset, length: len, kind: MapKind::Unallocated }),
        }
    }

    fn backing_info(&self, d: &Dynamic) -> Option<BackingInfo> {
        if self.footer.disk_type != DiskType::Differencing {
            return None;
        }
        let name = d
            .locators
            .iter()
            .find(|l| l.lookup.is_some())
            .map(|l| l.text.clone())
            .unwrap_or_else(|| d.header.parent_name.clone());
        Some(BackingInfo {
            name,
            locators: d.locators.iter().map(|l| l.text.clone()).collect(),
            format: Some("vhd".to_string()),
            opened: d.parent_path.clone(),
        })
    }
}

/// Read and check the dynamic header, the parent locators and the BAT, and open the
/// parent of a differencing disk when allowed.
fn open_dynamic(
    file: &ImageFile,
    footer: &Footer,
    place: FooterPlace,
    size: u64,
    data_end: u64,
    options: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Dynamic> {
    let path = file.path();
    let file_len = file.len()?;
    let header_offset = footer.data_offset;
    if header_offset.checked_add(HEADER_SIZE as u64).is_none_or(|end| end > file_len) {
        return Err(Error::corrupt(
            path,
            format!(
                "VHD footer: data offset {header_offset} (the dynamic header) points past the end of the file ({file_len} bytes)"
            ),
        ));
    }
    let head_footer = (place == FooterPlace::Start).then_some(0..FOOTER_SIZE as u64);
    if head_footer.as_ref().is_some_and(|r| header_offset < r.end) {
        return Err(Error::corrupt(
            path,
            format!("VHD footer: data offset {header_offset} overlaps the footer copy at offset 0"),
        ));
    }
    let mut buf = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut buf, header_offset)?;
    let header = DynamicHeader::parse(path, &buf, header_offset)?;
    let layout = BlockLayout::new(path, header.block_size)?;

    let entries = u64::from(header.max_table_entries);
    let needed = size.div_ceil(layout.block_size);
    if entries < needed {
        return Err(Error::corrupt(
            path,
            format!(
                "VHD dynamic header: max table entries {entries} cannot cover the virtual size {size} (needs {needed} blocks of {} bytes)",
                layout.block_size
            ),
        ));
    }
    let most = (MAX_DISK_SECTORS * SECTOR).div_ceil(layout.block_size).max(needed);
    if entries > most {
        return Err(Error::corrupt(
            path,
            format!(
                "VHD dynamic header: max table entries {entries} is more than a 2040 GiB disk of {}-byte blocks needs ({most})",
                layout.block_size
            ),
        ));
    }
    // entries <= 2^32, so this cannot overflow; the end is checked against the file by
    // Bat::load.
    let bat_len = (entries * 4).div_ceil(SECTOR) * SECTOR;
    let bat_region = Region {
        name: "block allocation table".into(),
        start: header.table_offset,
        end: header.table_offset.saturating_add(bat_len),
    };
    let header_region = Region {
        name: "dynamic header".into(),
        start: header_offset,
        end: header_offset + HEADER_SIZE as u64,
    };
    if bat_region.start < header_region.end && header_region.start < bat_region.end
        || head_footer.as_ref().is_some_and(|r| bat_region.start < r.end)
    {
        return Err(Error::corrupt(
            path,
            format!(
                "VHD dynamic header: the block allocation table [{}, {}) overlaps the header or the footer copy",
                bat_region.start, bat_region.end
            ),
        ));
    }

    let differencing = footer.disk_type == DiskType::Differencing;
    let locators = if differencing { parent::read_locators(file, &header)? } else { Vec::new() };
    let mut regions = vec![header_region, bat_region];
    if let Some(r) = head_footer {
        regions.push(Region { name: "footer copy".into(), start: r.start, end: r.end });
    }
    if differencing {
        for (i, e) in header.locators.iter().enumerate().filter(|(_, e)| !e.is_empty()) {
            // Checked inside the file by read_locators.
            regions.push(Region {
                name: format!("parent locator {i} data"),
                start: e.data_offset,
                end: e.data_offset + u64::from(e.data_length),
            });
        }
    }
    let bat = Bat::load(file, header.table_offset, header.max_table_entries, &layout, data_end, &regions)?;

    let (parent, parent_path) = if differencing && options.allow_backing {
        let (disk, p) = parent::open_parent(path, &header, &locators, options, seen)?;
        (Some(disk), Some(p))
    } else {
        (None, None)
    };
    Ok(Dynamic { header, layout, bat, bitmaps: Mutex::new(Vec::new()), locators, parent, parent_path })
}

impl Disk for VhdDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.size)?;
        let Some(d) = &self.dynamic else {
            return self.file.read_exact_at(buf, offset);
        };
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let seg = self.segment(d, pos, end)?;
            let piece = &mut buf[(pos - offset) as usize..(seg.end - offset) as usize];
            match seg.file_offset {
                Some(at) => self.file.read_exact_at(piece, at)?,
                None => Self::read_absent(d, piece, pos)?,
            }
            pos = seg.end;
        }
        Ok(())
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        if offset >= self.size {
            return Err(Error::invalid(
                Some(self.file.path()),
                format!("map offset {offset} is beyond the virtual size {}", self.size),
            ));
        }
        let end = offset + max_len.min(self.size - offset).max(1);
        let Some(d) = &self.dynamic else {
            // Fixed: the data area is a plain file; its holes are zeros.
            let (kind, run_end) = match self.file.seek_data(offset)? {
                None => (MapKind::Zero, end),
                Some(s) if s > offset => (MapKind::Zero, s),
                Some(_) => (MapKind::Data, self.file.seek_hole(offset)?.unwrap_or(end)),
            };
            let length = run_end.clamp(offset + 1, end) - offset;
            return Ok(Mapping { start: offset, length, kind });
        };
        let first = self.segment(d, offset, end)?;
        let present = first.file_offset.is_some();
        let mut run_end = first.end;
        while run_end < end {
            let seg = self.segment(d, run_end, end)?;
            if seg.file_offset.is_some() != present {
                break;
            }
            run_end = seg.end;
        }
        if present {
            Ok(Mapping { start: offset, length: run_end - offset, kind: MapKind::Data })
        } else {
            Self::map_absent(d, offset, run_end - offset)
        }
    }

    fn info(&self) -> Result<ImageInfo> {
        let f = &self.footer;
        let mut details = vec![
            (
                "creator".to_string(),
                format!("{} {}", footer::fourcc(&f.creator_app).trim_end(), f.creator_version_string()),
            ),
            ("creator host os".to_string(), footer::fourcc(&f.creator_os)),
            ("geometry".to_string(), f.geometry.to_string()),
            ("current size".to_string(), f.current_size.to_string()),
            ("original size".to_string(), f.original_size.to_string()),
            ("size from".to_string(), self.size_rule.describe().to_string()),
            ("unique id".to_string(), parent::hex_id(&f.unique_id)),
        ];
        if f.saved_state != 0 {
            details.push(("saved state".into(), "set".into()));
        }
        if let Some(note) = &self.footer_note {
            details.push(("footer".into(), note.clone()));
        }
        let mut backing = None;
        if let Some(d) = &self.dynamic {
            details.push(("allocated blocks".into(), d.bat.allocated().to_string()));
            details.push(("max table entries".into(), d.header.max_table_entries.to_string()));
            if f.disk_type == DiskType::Differencing {
                details.push(("parent name".into(), d.header.parent_name.clone()));
                details.push(("parent unique id".into(), parent::hex_id(&d.header.parent_unique_id)));
                for (i, l) in d.locators.iter().enumerate() {
                    details.push((format!("parent locator {i}"), format!("{} {}", l.platform, l.text)));
                }
            }
            backing = self.backing_info(d);
        }
        Ok(ImageInfo {
            format: Format::Vhd,
            subformat: f.disk_type.name().to_string(),
            virtual_size: self.size,
            allocated_bytes: self.file.allocated_bytes()?,
            file_size: self.file.len()?,
            cluster_size: self.dynamic.as_ref().map(|d| d.layout.block_size),
            logical_sector_size: 512,
            backing,
            details,
        })
    }
}
