//! The hard disk footer: the 512-byte structure every VHD ends with (and that dynamic
//! and differencing disks also copy to offset 0), its checksum, the CHS geometry, and
//! the rule that turns it into a virtual size.
//!
//! Layout (VHD specification, "Hard Disk Footer Format"; all fields big-endian):
//!
//! | offset | size | field                                       |
//! |-------:|-----:|---------------------------------------------|
//! |      0 |    8 | cookie `conectix`                           |
//! |      8 |    4 | features (bit 1 "reserved" is always set)   |
//! |     12 |    4 | file format version 0x00010000              |
//! |     16 |    8 | data offset: dynamic header, or all ones    |
//! |     24 |    4 | time stamp, seconds since 2000-01-01 UTC    |
//! |     28 |    4 | creator application (`vpc `, `qemu`, `win `)|
//! |     32 |    4 | creator version (major u16, minor u16)      |
//! |     36 |    4 | creator host OS (`Wi2k`, `Mac `)            |
//! |     40 |    8 | original size in bytes                      |
//! |     48 |    8 | current size in bytes                       |
//! |     56 |    4 | geometry: cylinders u16, heads u8, sectors u8|
//! |     60 |    4 | disk type: 2 fixed, 3 dynamic, 4 differencing|
//! |     64 |    4 | checksum                                    |
//! |     68 |   16 | unique id                                   |
//! |     84 |    1 | saved state                                 |
//! |     85 |  427 | reserved, zero                              |

use std::path::Path;

use crate::io::ImageFile;
use crate::{Error, Result};

/// Size of the footer (and of a sector) in bytes.
pub const FOOTER_SIZE: usize = 512;
/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// `features`: the "reserved" bit the specification says must always be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// `file format version` of the only published version.
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// `data offset` of a fixed disk, which has no further structure.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;
/// The largest CHS geometry the specification's algorithm produces (65535/16/255).
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// The largest disk VHD allows: 2040 GiB (the limit QEMU and Hyper-V enforce).
pub const MAX_DISK_SECTORS: u64 = 0xff00_0000;

const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_GEOMETRY: usize = 56;
const OFF_DISK_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// The three kinds of VHD ("Hard Disk Footer Format", field "Disk Type").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Data at offset 0, footer at the end.
    Fixed,
    /// Footer copy, dynamic header, BAT, blocks, footer.
    Dynamic,
    /// A dynamic disk whose absent sectors come from a parent.
    Differencing,
}

impl DiskType {
    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The name `tern disk info` shows as subformat.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads and sectors per track, as the footer stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// Sectors the geometry addresses.
    pub fn total_sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The geometry for a disk of `total_sectors`, by the algorithm of the VHD
    /// specification (appendix "CHS Calculation"). The result may address fewer
    /// sectors than asked for; sizes beyond 65535/16/255 get that maximum.
    pub fn for_sectors(total_sectors: u64) -> Geometry {
        let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
        let (spt, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        // Every value fits its field: total <= 65535*16*255 bounds cylinders by 65535.
        Geometry {
            cylinders: (cyl_times_heads / heads) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }
}

impl std::fmt::Display for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{} (C/H/S)", self.cylinders, self.heads, self.sectors_per_track)
    }
}

/// How the virtual size was derived from the footer (see [`Footer::virtual_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeRule {
    /// Cylinders × heads × sectors × 512.
    Geometry,
    /// The footer's current size, rounded down to whole sectors.
    CurrentSize,
}

impl SizeRule {
    /// A short explanation for `tern disk info`.
    pub fn describe(self) -> &'static str {
        match self {
            SizeRule::Geometry => "CHS geometry (creator vpc/qemu, as QEMU reads it)",
            SizeRule::CurrentSize => "current size field",
        }
    }
}

/// A parsed, checksum-verified footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub format_version: u32,
    /// Absolute file offset of the dynamic header; all ones for fixed disks.
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: [u8; 4],
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
}

/// The VHD checksum: the ones' complement of the sum of all bytes, with the checksum
/// field itself counted as zero (the caller passes a buffer where it is zero, or says
/// where it is with `skip`).
pub fn checksum(buf: &[u8], skip: std::ops::Range<usize>) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// Check the checksum stored (big-endian) at `at` in `buf`; a mismatch is a `Corrupt`
/// error naming `what` (the structure and where it is).
pub fn verify_checksum(path: &Path, buf: &[u8], at: usize, what: &dyn std::fmt::Display) -> Result<()> {
    let stored = be32(buf, at);
    let computed = checksum(buf, at..at + 4);
    if stored == computed {
        return Ok(());
    }
    Err(Error::corrupt(
        path,
        format!("{what} fails its checksum: stored 0x{stored:08x}, computed 0x{computed:08x}"),
    ))
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Four bytes of an identifier field (creator app, host OS, platform code) for
/// messages: printable ASCII as is, anything else escaped.
pub fn fourcc(code: &[u8]) -> String {
    code.iter().flat_map(|&b| std::ascii::escape_default(b)).map(char::from).collect()
}

impl Footer {
    /// Parse a footer read at `where_` (for messages) from `buf`, verifying cookie,
    /// checksum and disk type.
    pub fn parse(path: &Path, buf: &[u8; FOOTER_SIZE], where_: &str) -> Result<Footer> {
        if &buf[..8] != COOKIE {
            return Err(Error::corrupt(
                path,
                format!("no VHD footer {where_}: cookie is {:?}, expected \"conectix\"", fourcc(&buf[..8])),
            ));
        }
        verify_checksum(path, buf, OFF_CHECKSUM, &format_args!("VHD footer {where_}"))?;
        let type_code = be32(buf, OFF_DISK_TYPE);
        let disk_type = DiskType::from_code(type_code).ok_or_else(|| {
            Error::unsupported(
                path,
                format!("VHD footer {where_}: disk type {type_code} is not fixed (2), dynamic (3) or differencing (4)"),
            )
        })?;
        let format_version = be32(buf, OFF_VERSION);
        if format_version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                format!("VHD footer {where_}: file format version 0x{format_version:08x} is not 1.x"),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[OFF_CREATOR_APP..OFF_CREATOR_APP + 4]);
        let mut creator_os = [0u8; 4];
        creator_os.copy_from_slice(&buf[OFF_CREATOR_OS..OFF_CREATOR_OS + 4]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&buf[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16]);
        Ok(Footer {
            features: be32(buf, OFF_FEATURES),
            format_version,
            data_offset: be64(buf, OFF_DATA_OFFSET),
            timestamp: be32(buf, OFF_TIMESTAMP),
            creator_app,
            creator_version: be32(buf, OFF_CREATOR_VERSION),
            creator_os,
            original_size: be64(buf, OFF_ORIGINAL_SIZE),
            current_size: be64(buf, OFF_CURRENT_SIZE),
            geometry: Geometry {
                cylinders: be16(buf, OFF_GEOMETRY),
                heads: buf[OFF_GEOMETRY + 2],
                sectors_per_track: buf[OFF_GEOMETRY + 3],
            },
            disk_type,
            unique_id,
            saved_state: buf[OFF_SAVED_STATE],
        })
    }

    /// Serialize, with the checksum computed.
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        b[OFF_FEATURES..OFF_FEATURES + 4].copy_from_slice(&self.features.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&self.format_version.to_be_bytes());
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        b[OFF_TIMESTAMP..OFF_TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        b[OFF_CREATOR_APP..OFF_CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        b[OFF_CREATOR_VERSION..OFF_CREATOR_VERSION + 4].copy_from_slice(&self.creator_version.to_be_bytes());
        b[OFF_CREATOR_OS..OFF_CREATOR_OS + 4].copy_from_slice(&self.creator_os);
        b[OFF_ORIGINAL_SIZE..OFF_ORIGINAL_SIZE + 8].copy_from_slice(&self.original_size.to_be_bytes());
        b[OFF_CURRENT_SIZE..OFF_CURRENT_SIZE + 8].copy_from_slice(&self.current_size.to_be_bytes());
        b[OFF_GEOMETRY..OFF_GEOMETRY + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[OFF_GEOMETRY + 2] = self.geometry.heads;
        b[OFF_GEOMETRY + 3] = self.geometry.sectors_per_track;
        b[OFF_DISK_TYPE..OFF_DISK_TYPE + 4].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[OFF_UNIQUE_ID..OFF_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[OFF_SAVED_STATE] = self.saved_state;
        let sum = checksum(&b, 0..0);
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// The guest-visible size in bytes and the rule that gave it, as QEMU 10 computes it
    /// (block/vpc.c, `vpc_open` and `vpc_ignore_current_size`), so that tern reads the
    /// same number of bytes as `qemu-img convert -O raw`:
    ///
    /// - Virtual PC (`vpc `) and QEMU before 2.6 (`qemu`) sized disks by their CHS
    ///   geometry, and the current size they stored may be larger than what a guest
    ///   saw: for those two creators the size is cylinders × heads × sectors × 512 ...
    /// - ... unless the geometry is the maximum 65535/16/255, which means the disk is too
    ///   large for CHS and only the current size is meaningful.
    /// - Every other creator (Hyper-V `win `, `qem2`, `d2v `, Azure `wa\0\0`, tern's
    ///   `tern`...) is sized by the current size. QEMU 10 made this the default (it
    ///   used to list the current-size creators instead, and used CHS for unknown ones).
    ///
    /// Either way the size is counted in whole 512-byte sectors.
    pub fn virtual_size(&self) -> (u64, SizeRule) {
        let chs = self.geometry.total_sectors();
        let geometry_creator = &self.creator_app == b"vpc " || &self.creator_app == b"qemu";
        if geometry_creator && chs != MAX_GEOMETRY_SECTORS {
            (chs * 512, SizeRule::Geometry)
        } else {
            (self.current_size / 512 * 512, SizeRule::CurrentSize)
        }
    }

    /// `creator_version` as "major.minor".
    pub fn creator_version_string(&self) -> String {
        format!("{}.{}", self.creator_version >> 16, self.creator_version & 0xffff)
    }
}

/// Where the footer that describes the image was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterPlace {
    /// The last 512 bytes of the file.
    End,
    /// The last 511 bytes (some old tools wrote a 511-byte footer).
    End511,
    /// The copy at offset 0 (dynamic/differencing disks whose end footer is missing).
    Start,
}

/// The footer that describes an image, where it was found, and how many bytes at the
/// end of the file it occupies (0 when only the copy at offset 0 exists).
#[derive(Debug, Clone)]
pub struct LocatedFooter {
    pub footer: Footer,
    pub place: FooterPlace,
    pub trailing_len: u64,
    /// Something odd about the other footer copy, for `info`.
    pub note: Option<String>,
}

/// Find and verify the footer of an image.
///
/// A fixed disk has its footer only at the end, a dynamic or differencing one at the
/// end and at offset 0. QEMU reads offset 0 first; tern prefers a valid fixed footer at
/// the end, so that a fixed disk whose guest data happens to start with `conectix` (a
/// VHD stored on a VHD) is still read as what it is. Otherwise the copy at offset 0
/// describes the disk, and the end footer is used when the copy is missing.
pub fn locate(file: &ImageFile) -> Result<LocatedFooter> {
    let path = file.path();
    let len = file.len()?;
    if len < FOOTER_SIZE as u64 - 1 {
        return Err(Error::corrupt(
            path,
            format!("truncated: a VHD is at least 512 bytes (its footer) but the file is {len} bytes long"),
        ));
    }
    let mut end = [0u8; FOOTER_SIZE];
    let mut end_place = None;
    if len >= FOOTER_SIZE as u64 {
        file.read_exact_at(&mut end, len - FOOTER_SIZE as u64)?;
        if &end[..8] == COOKIE {
            end_place = Some(FooterPlace::End);
        }
    }
    if end_place.is_none() {
        let mut short = [0u8; FOOTER_SIZE - 1];
        file.read_exact_at(&mut short, len - (FOOTER_SIZE as u64 - 1))?;
        if &short[..8] == COOKIE {
            end = [0u8; FOOTER_SIZE];
            end[..FOOTER_SIZE - 1].copy_from_slice(&short);
            end_place = Some(FooterPlace::End511);
        }
    }
    let trailing = |place: FooterPlace| match place {
        FooterPlace::End => FOOTER_SIZE as u64,
        FooterPlace::End511 => FOOTER_SIZE as u64 - 1,
        FooterPlace::Start => 0,
    };
    if let Some(place) = end_place {
        if be32(&end, OFF_DISK_TYPE) == DiskType::Fixed.code() {
            let footer = Footer::parse(path, &end, "at the end of the file")?;
            return Ok(LocatedFooter { footer, place, trailing_len: trailing(place), note: None });
        }
    }
    let mut start = [0u8; FOOTER_SIZE];
    if len >= FOOTER_SIZE as u64 {
        file.read_exact_at(&mut start, 0)?;
    }
    if &start[..8] == COOKIE {
        let footer = Footer::parse(path, &start, "copy at offset 0")?;
        // The end footer should be an identical copy. QEMU never looks at it; tern does
        // not refuse the image over it either (the copy at offset 0 is what both
        // read), but says so in `info`.
        let (trailing_len, note) = match end_place {
            Some(place) => {
                let note = match Footer::parse(path, &end, "at the end of the file") {
                    Ok(end_footer) if end_footer == footer => None,
                    Ok(_) => Some("the footer at the end differs from its copy at offset 0".to_string()),
                    Err(e) => Some(e.message().to_string()),
                };
                (trailing(place), note)
            }
            None => (0, Some("no footer at the end of the file, only the copy at offset 0".to_string())),
        };
        return Ok(LocatedFooter { footer, place: FooterPlace::Start, trailing_len, note });
    }
    match end_place {
        Some(place) => {
            let footer = Footer::parse(path, &end, "at the end of the file")?;
            Ok(LocatedFooter { footer, place, trailing_len: trailing(place), note: None })
        }
        None => Err(Error::corrupt(
            path,
            "no VHD footer: no \"conectix\" cookie at offset 0 or at the end of the file",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_specification_examples() {
        // 64 MiB rounds down to 963/8/17; `qemu-img create -f vpc 64M` asks for one
        // sector more at a time until it gets 964/8/17 (67125248 bytes).
        let g = Geometry::for_sectors(64 << 11);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (963, 8, 17));
        let g = Geometry::for_sectors(67125248 / 512);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (964, 8, 17));
        // 127 GiB and up: 255 sectors per track.
        let g = Geometry::for_sectors(200 << 21);
        assert_eq!((g.heads, g.sectors_per_track), (16, 255));
        // Beyond the CHS range: the maximum.
        let g = Geometry::for_sectors(u64::MAX);
        assert_eq!(g.total_sectors(), MAX_GEOMETRY_SECTORS);
        // Tiny disks keep at least 4 heads.
        let g = Geometry::for_sectors(100);
        assert_eq!((g.heads, g.sectors_per_track), (4, 17));
    }

    #[test]
    fn footer_round_trips_and_checksum_is_verified() {
        let f = Footer {
            features: FEATURES_RESERVED,
            format_version: FORMAT_VERSION,
            data_offset: 512,
            timestamp: 1,
            creator_app: *b"tern",
            creator_version: 0x0001_0002,
            creator_os: *b"Wi2k",
            original_size: 1 << 20,
            current_size: 1 << 20,
            geometry: Geometry::for_sectors(2048),
            disk_type: DiskType::Dynamic,
            unique_id: [7; 16],
            saved_state: 0,
        };
        let mut b = f.to_bytes();
        assert_eq!(Footer::parse(Path::new("x"), &b, "here").unwrap(), f);
        assert_eq!(f.virtual_size(), (1 << 20, SizeRule::CurrentSize));
        b[100] ^= 1;
        let e = Footer::parse(Path::new("x"), &b, "here").unwrap_err();
        assert!(e.message().contains("checksum"), "{e}");
    }
}
