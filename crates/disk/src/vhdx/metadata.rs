//! The metadata region ([MS-VHDX] 2.6): a table of items describing the virtual disk.
//!
//! Table header (first 64 KiB of the region): `Signature "metadata"` @0, reserved u16
//! @8, `EntryCount` u16 @10 (at most 2047), reserved to 32. Entries of 32 bytes:
//! `ItemId` GUID @0, `Offset` u32 @16 (from the region start, at least 64 KiB),
//! `Length` u32 @20 (at most 1 MiB), flags u32 @24 (bit 0 `IsUser`, bit 1
//! `IsVirtualDisk`, bit 2 `IsRequired`), reserved u32 @28.
//!
//! Known items (2.6.2): file parameters (block size u32, flags u32: bit 0
//! `LeaveBlockAllocated`, bit 1 `HasParent`), virtual disk size u64, virtual disk id
//! (page 83 data) GUID, logical and physical sector size u32, parent locator.

use super::guid::Guid;
use super::le::{put_u16, put_u32, to_utf16le, u16_at, u32_at, u64_at, utf16le};
use super::region_table::Region;
use super::MIB;
use crate::io::ImageFile;
use crate::{Error, Result};

const SIGNATURE: &[u8; 8] = b"metadata";
const TABLE_SIZE: u64 = 64 << 10;
const MAX_ENTRIES: u16 = 2047;
const MAX_ITEM: u32 = 1 << 20;
/// Largest virtual disk the spec allows: 64 TiB ([MS-VHDX] 2.6.2.2).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

const FILE_PARAMETERS: Guid =
    Guid::from_fields(0xCAA1_6737, 0xFA36, 0x4D43, [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B]);
const VIRTUAL_DISK_SIZE: Guid =
    Guid::from_fields(0x2FA5_4224, 0xCD1B, 0x4876, [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8]);
const VIRTUAL_DISK_ID: Guid =
    Guid::from_fields(0xBECA_12AB, 0xB2E6, 0x4523, [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46]);
const LOGICAL_SECTOR_SIZE: Guid =
    Guid::from_fields(0x8141_BF1D, 0xA96F, 0x4709, [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F]);
const PHYSICAL_SECTOR_SIZE: Guid =
    Guid::from_fields(0xCDA3_48C7, 0x445D, 0x4471, [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56]);
const PARENT_LOCATOR: Guid =
    Guid::from_fields(0xA8D3_5F2D, 0xB30B, 0x454D, [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C]);
/// `LocatorType` of the VHDX parent locator ([MS-VHDX] 2.6.2.6).
const VHDX_LOCATOR_TYPE: Guid =
    Guid::from_fields(0xB04A_EFB7, 0xD19E, 0x4A81, [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13]);

const FLAG_VIRTUAL_DISK: u32 = 2;
const FLAG_REQUIRED: u32 = 4;

/// The parent locator: key/value pairs in stored order ([MS-VHDX] 2.6.2.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// `(key, value)` pairs, e.g. `parent_linkage`, `relative_path`.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// The value stored under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Everything the metadata region says.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    pub block_size: u64,
    pub leave_block_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub virtual_disk_id: Guid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub parent_locator: Option<ParentLocator>,
}

/// Read and validate the metadata region.
pub(crate) fn read_metadata(file: &ImageFile, region: Region) -> Result<Metadata> {
    let path = file.path();
    let bad = |m: String| Error::corrupt(path, format!("metadata region: {m}"));
    let mut table = vec![0u8; TABLE_SIZE as usize];
    file.read_exact_at(&mut table, region.offset)?;
    if &table[0..8] != SIGNATURE {
        return Err(bad("table signature is not \"metadata\"".into()));
    }
    let count = u16_at(&table, 10);
    if count > MAX_ENTRIES {
        return Err(bad(format!("EntryCount {count} is above the maximum {MAX_ENTRIES}")));
    }
    let mut items: Vec<(Guid, Vec<u8>)> = Vec::new();
    for i in 0..count as usize {
        let e = 32 + 32 * i;
        let id = Guid::from_slice(&table[e..]);
        let (offset, length, flags) =
            (u32_at(&table, e + 16), u32_at(&table, e + 20), u32_at(&table, e + 24));
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            VIRTUAL_DISK_ID,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ]
        .contains(&id);
        if !known {
            if flags & FLAG_REQUIRED != 0 {
                return Err(Error::unsupported(
                    path,
                    format!("metadata item {id} (entry {i}) is required but tern does not know it"),
                ));
            }
            continue;
        }
        if items.iter().any(|(g, _)| *g == id) {
            return Err(bad(format!("item {id} is listed twice")));
        }
        if length > MAX_ITEM {
            return Err(bad(format!("item {id} is {length} bytes long, above the 1 MiB maximum")));
        }
        let in_region =
            u64::from(offset).checked_add(u64::from(length)).is_some_and(|end| end <= region.length);
        if length > 0 && (u64::from(offset) < TABLE_SIZE || !in_region) {
            return Err(bad(format!(
                "item {id} at offset {offset} of length {length} is not inside the region after the table"
            )));
        }
        let mut data = vec![0u8; length as usize];
        file.read_exact_at(&mut data, region.offset + u64::from(offset))?;
        items.push((id, data));
    }
    let item = |id: Guid, name: &str, len: usize| -> Result<&[u8]> {
        let (_, d) = items
            .iter()
            .find(|(g, _)| *g == id)
            .ok_or_else(|| bad(format!("the required {name} item is missing")))?;
        if d.len() != len {
            return Err(bad(format!("the {name} item is {} bytes long instead of {len}", d.len())));
        }
        Ok(d)
    };

    let fp = item(FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = u64::from(u32_at(fp, 0));
    let flags = u32_at(fp, 4);
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(bad(format!("BlockSize {block_size} is not a power of two from 1 MiB to 256 MiB")));
    }
    let logical_sector_size = u32_at(item(LOGICAL_SECTOR_SIZE, "logical sector size", 4)?, 0);
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(bad(format!("LogicalSectorSize {logical_sector_size} is neither 512 nor 4096")));
    }
    let physical_sector_size = u32_at(item(PHYSICAL_SECTOR_SIZE, "physical sector size", 4)?, 0);
    if physical_sector_size != 512 && physical_sector_size != 4096 {
        return Err(bad(format!("PhysicalSectorSize {physical_sector_size} is neither 512 nor 4096")));
    }
    let virtual_size = u64_at(item(VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || !virtual_size.is_multiple_of(u64::from(logical_sector_size))
    {
        return Err(bad(format!(
            "VirtualDiskSize {virtual_size} is not a non-zero multiple of the {logical_sector_size}-byte sector up to 64 TiB"
        )));
    }
    let virtual_disk_id = Guid::from_slice(item(VIRTUAL_DISK_ID, "virtual disk id", 16)?);
    let has_parent = flags & 2 != 0;
    let parent_locator = match items.iter().find(|(g, _)| *g == PARENT_LOCATOR) {
        Some((_, d)) => Some(parse_locator(d).map_err(|m| bad(format!("parent locator: {m}")))?),
        None => None,
    };
    if has_parent && parent_locator.is_none() {
        return Err(bad("the file parameters say HasParent but there is no parent locator".into()));
    }
    Ok(Metadata {
        block_size,
        leave_block_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        virtual_disk_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator: if has_parent { parent_locator } else { None },
    })
}

/// Parse a parent locator item ([MS-VHDX] 2.6.2.6): `LocatorType` GUID @0, reserved
/// u16 @16, `KeyValueCount` u16 @18, then 12-byte entries: `KeyOffset` u32,
/// `ValueOffset` u32, `KeyLength` u16, `ValueLength` u16; offsets are from the item
/// start and strings are UTF-16LE.
fn parse_locator(d: &[u8]) -> std::result::Result<ParentLocator, String> {
    if d.len() < 20 {
        return Err(format!("{} bytes is too short for its header", d.len()));
    }
    let kind = Guid::from_slice(d);
    if kind != VHDX_LOCATOR_TYPE {
        return Err(format!("LocatorType {kind} is not the VHDX parent locator"));
    }
    let count = usize::from(u16_at(d, 18));
    let table_end = 20 + 12 * count;
    if table_end > d.len() {
        return Err(format!("{count} entries do not fit in {} bytes", d.len()));
    }
    let string = |off: u32, len: u16, what: &str, i: usize| -> std::result::Result<String, String> {
        let (off, len) = (off as usize, usize::from(len));
        match off.checked_add(len) {
            Some(end) if end <= d.len() && len % 2 == 0 && len > 0 => Ok(utf16le(&d[off..end])),
            _ => Err(format!("entry {i}: {what} at offset {off} of length {len} is outside the item or odd")),
        }
    };
    let mut entries = Vec::with_capacity(count);
    for i in 0..count {
        let e = 20 + 12 * i;
        let key = string(u32_at(d, e), u16_at(d, e + 8), "key", i)?;
        let value = string(u32_at(d, e + 4), u16_at(d, e + 10), "value", i)?;
        if entries.iter().any(|(k, _): &(String, String)| *k == key) {
            return Err(format!("key {key:?} appears twice"));
        }
        entries.push((key, value));
    }
    Ok(ParentLocator { entries })
}

/// Serialize a parent locator item.
fn locator_bytes(loc: &ParentLocator) -> Vec<u8> {
    let mut head = vec![0u8; 20 + 12 * loc.entries.len()];
    head[..16].copy_from_slice(&VHDX_LOCATOR_TYPE.0);
    put_u16(&mut head, 18, loc.entries.len() as u16);
    let mut strings = Vec::new();
    for (i, (k, v)) in loc.entries.iter().enumerate() {
        let (k, v) = (to_utf16le(k), to_utf16le(v));
        let e = 20 + 12 * i;
        let key_off = head.len() + strings.len();
        strings.extend_from_slice(&k);
        let value_off = head.len() + strings.len();
        strings.extend_from_slice(&v);
        put_u32(&mut head, e, key_off as u32);
        put_u32(&mut head, e + 4, value_off as u32);
        put_u16(&mut head, e + 8, k.len() as u16);
        put_u16(&mut head, e + 10, v.len() as u16);
    }
    head.extend_from_slice(&strings);
    head
}

/// Serialize a whole metadata region (table + items) of `len` bytes.
pub(crate) fn region_bytes(md: &Metadata, len: usize) -> Vec<u8> {
    let mut fp = [0u8; 8];
    put_u32(&mut fp, 0, md.block_size as u32);
    put_u32(&mut fp, 4, u32::from(md.leave_block_allocated) | (u32::from(md.has_parent) << 1));
    let mut items: Vec<(Guid, u32, Vec<u8>)> = vec![
        (FILE_PARAMETERS, FLAG_REQUIRED, fp.to_vec()),
        (VIRTUAL_DISK_SIZE, FLAG_REQUIRED | FLAG_VIRTUAL_DISK, md.virtual_size.to_le_bytes().to_vec()),
        (VIRTUAL_DISK_ID, FLAG_REQUIRED | FLAG_VIRTUAL_DISK, md.virtual_disk_id.0.to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            md.logical_sector_size.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            FLAG_REQUIRED | FLAG_VIRTUAL_DISK,
            md.physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(loc) = &md.parent_locator {
        items.push((PARENT_LOCATOR, FLAG_REQUIRED, locator_bytes(loc)));
    }
    let mut b = vec![0u8; len];
    b[..8].copy_from_slice(SIGNATURE);
    put_u16(&mut b, 10, items.len() as u16);
    let mut at = TABLE_SIZE as usize;
    for (i, (id, flags, data)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        b[e..e + 16].copy_from_slice(&id.0);
        put_u32(&mut b, e + 16, at as u32);
        put_u32(&mut b, e + 20, data.len() as u32);
        put_u32(&mut b, e + 24, *flags);
        b[at..at + data.len()].copy_from_slice(data);
        at += data.len();
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_round_trip() {
        let loc = ParentLocator {
            entries: vec![
                ("parent_linkage".into(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}".into()),
                ("relative_path".into(), ".\\p.vhdx".into()),
            ],
        };
        assert_eq!(parse_locator(&locator_bytes(&loc)).unwrap(), loc);
    }

    #[test]
    fn locator_garbage_is_refused_not_panicking() {
        let mut b = locator_bytes(&ParentLocator { entries: vec![("k".into(), "v".into())] });
        put_u32(&mut b, 20, u32::MAX);
        assert!(parse_locator(&b).is_err());
        put_u16(&mut b, 18, u16::MAX);
        assert!(parse_locator(&b).is_err());
        assert!(parse_locator(&b[..10]).is_err());
    }
}
