//! The region table ([MS-VHDX] 2.2.3): where the BAT and metadata regions live.
//!
//! Two identical 64 KiB copies at 192 KiB and 256 KiB. Header: `Signature "regi"` u32
//! @0, `Checksum` u32 @4 (CRC-32C over the 64 KiB with this field zero), `EntryCount`
//! u32 @8 (at most 2047), reserved u32 @12. Entries of 32 bytes from @16: `Guid` @0,
//! `FileOffset` u64 @16 (1 MiB multiple, at least 1 MiB), `Length` u32 @24 (1 MiB
//! multiple), flags u32 @28 (bit 0 `Required`).

use super::guid::Guid;
use super::le::{crc32c_with_hole, put_u32, put_u64, u32_at, u64_at};
use super::MIB;
use crate::io::ImageFile;
use crate::{Error, Result};

/// Offsets of the two copies.
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Size of one copy (the span of its checksum).
pub(crate) const REGION_TABLE_SIZE: usize = 64 << 10;
const SIGNATURE: &[u8; 4] = b"regi";
const MAX_ENTRIES: u32 = 2047;

/// BAT region ([MS-VHDX] 2.2.3.2): 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub(crate) const BAT_GUID: Guid =
    Guid::from_fields(0x2DC2_7766, 0xF623, 0x4200, [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08]);
/// Metadata region ([MS-VHDX] 2.2.3.2): 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub(crate) const METADATA_GUID: Guid =
    Guid::from_fields(0x8B7C_A206, 0x4790, 0x4B9A, [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]);

/// A region of the file: `[offset, offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    pub offset: u64,
    pub length: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
    pub fn overlaps(&self, other: &Region) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// The two regions every VHDX has.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// Serialize a region table holding `regions`, each marked required.
pub(crate) fn table_bytes(regions: &Regions) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[0..4].copy_from_slice(SIGNATURE);
    put_u32(&mut b, 8, 2);
    for (i, (guid, r)) in [(BAT_GUID, regions.bat), (METADATA_GUID, regions.metadata)].into_iter().enumerate()
    {
        let e = 16 + 32 * i;
        b[e..e + 16].copy_from_slice(&guid.0);
        put_u64(&mut b, e + 16, r.offset);
        put_u32(&mut b, e + 24, r.length as u32);
        put_u32(&mut b, e + 28, 1);
    }
    let crc = crc32c_with_hole(&b, 4);
    put_u32(&mut b, 4, crc);
    b
}

/// Read the region table: the first copy, or the second when the first is damaged.
/// `log` is the log region from the header, which no region may overlap.
pub(crate) fn read_regions(file: &ImageFile, file_len: u64, log: Region) -> Result<Regions> {
    let mut reasons = Vec::new();
    for (i, off) in REGION_TABLE_OFFSETS.into_iter().enumerate() {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        file.read_exact_at(&mut b, off)?;
        match parse(&b) {
            Ok(entries) => return check(file, file_len, log, &entries),
            Err(why) => reasons.push(format!("copy {} (offset {off}): {why}", i + 1)),
        }
    }
    Err(Error::corrupt(file.path(), format!("both region tables are invalid: {}", reasons.join("; "))))
}

/// Parse one copy into (guid, region, required) entries; `Err` when its signature,
/// checksum or count is wrong, so that the other copy can be tried.
fn parse(b: &[u8]) -> std::result::Result<Vec<(Guid, Region, bool)>, String> {
    if &b[0..4] != SIGNATURE {
        return Err("signature is not \"regi\"".into());
    }
    let stored = u32_at(b, 4);
    let computed = crc32c_with_hole(b, 4);
    if stored != computed {
        return Err(format!("checksum {stored:#010x} does not match computed {computed:#010x}"));
    }
    let count = u32_at(b, 8);
    if count > MAX_ENTRIES {
        return Err(format!("EntryCount {count} is above the maximum {MAX_ENTRIES}"));
    }
    Ok((0..count as usize)
        .map(|i| {
            let e = 16 + 32 * i;
            let region = Region { offset: u64_at(b, e + 16), length: u64::from(u32_at(b, e + 24)) };
            (Guid::from_slice(&b[e..]), region, u32_at(b, e + 28) & 1 == 1)
        })
        .collect())
}

/// Validate the entries of a table whose checksum was right.
fn check(file: &ImageFile, file_len: u64, log: Region, entries: &[(Guid, Region, bool)]) -> Result<Regions> {
    let path = file.path();
    let mut bat = None;
    let mut metadata = None;
    for (i, (guid, r, required)) in entries.iter().enumerate() {
        let name = match *guid {
            BAT_GUID => "BAT",
            METADATA_GUID => "metadata",
            _ if *required => {
                return Err(Error::unsupported(
                    path,
                    format!("region table entry {i} is a required region {guid} that tern does not know"),
                ))
            }
            _ => continue,
        };
        if r.offset % MIB != 0 || r.offset < MIB || r.length == 0 || r.length % MIB != 0 {
            return Err(Error::corrupt(
                path,
                format!(
                    "{name} region at offset {} of length {} is not made of whole MiB at or past 1 MiB",
                    r.offset, r.length
                ),
            ));
        }
        match r.offset.checked_add(r.length) {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(Error::corrupt(
                    path,
                    format!(
                        "{name} region at offset {} of length {} ends past the end of the file ({file_len} bytes)",
                        r.offset, r.length
                    ),
                ))
            }
        }
        if log.length > 0 && r.overlaps(&log) {
            return Err(Error::corrupt(
                path,
                format!("{name} region at offset {} overlaps the log", r.offset),
            ));
        }
        let slot = if *guid == BAT_GUID { &mut bat } else { &mut metadata };
        if slot.replace(*r).is_some() {
            return Err(Error::corrupt(path, format!("the region table lists the {name} region twice")));
        }
    }
    let bat = bat.ok_or_else(|| Error::corrupt(path, "the region table has no BAT region"))?;
    let metadata = metadata.ok_or_else(|| Error::corrupt(path, "the region table has no metadata region"))?;
    if bat.overlaps(&metadata) {
        return Err(Error::corrupt(path, "the BAT and metadata regions overlap"));
    }
    Ok(Regions { bat, metadata })
}
