//! The dynamic disk header: where dynamic and differencing disks keep their block
//! size, their block allocation table, and (differencing only) who their parent is.
//!
//! Layout (VHD specification, "Dynamic Disk Header Format"; big-endian, 1024 bytes):
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! |      0 |    8 | cookie `cxsparse`                                  |
//! |      8 |    8 | data offset, unused: all ones                      |
//! |     16 |    8 | table offset: absolute file offset of the BAT      |
//! |     24 |    4 | header version 0x00010000                          |
//! |     28 |    4 | max table entries: BAT entries                     |
//! |     32 |    4 | block size in bytes (2 MiB by default)             |
//! |     36 |    4 | checksum (as the footer's, over these 1024 bytes)  |
//! |     40 |   16 | parent unique id (the parent footer's unique id)   |
//! |     56 |    4 | parent time stamp                                  |
//! |     60 |    4 | reserved                                           |
//! |     64 |  512 | parent unicode name, UTF-16BE, zero padded         |
//! |    576 |  192 | 8 parent locator entries of 24 bytes               |
//! |    768 |  256 | reserved                                           |
//!
//! A parent locator entry: platform code (4), platform data space (4), platform data
//! length (4), reserved (4), platform data offset (8, absolute file offset).

use std::path::Path;

use super::footer::{be32, be64, checksum, fourcc, verify_checksum};
use crate::{Error, Result};

/// Size of the dynamic header.
pub const HEADER_SIZE: usize = 1024;
/// Its cookie.
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// Header version of the only published version.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Number of parent locator entries.
pub const LOCATOR_COUNT: usize = 8;

const OFF_DATA_OFFSET: usize = 8;
const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_TABLE_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_CHECKSUM: usize = 36;
const OFF_PARENT_ID: usize = 40;
const OFF_PARENT_TIMESTAMP: usize = 56;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_LEN: usize = 512;
const OFF_LOCATORS: usize = 576;
const LOCATOR_SIZE: usize = 24;

/// One parent locator entry, as stored (its data not read yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocatorEntry {
    /// Platform code (`W2ku`, `W2ru`, `MacX`...); 0 for an unused entry.
    pub platform: [u8; 4],
    /// Space reserved for the data (sectors per the specification; Windows writes bytes).
    pub data_space: u32,
    /// Length of the data in bytes.
    pub data_length: u32,
    /// Absolute file offset of the data.
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Whether the entry is unused.
    pub fn is_empty(&self) -> bool {
        self.platform == [0; 4]
    }
}

/// A parsed, checksum-verified dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's name, decoded from UTF-16BE up to the first NUL (lossy).
    pub parent_name: String,
    pub locators: [LocatorEntry; LOCATOR_COUNT],
}

impl DynamicHeader {
    /// Parse the header read at file offset `offset`.
    pub fn parse(path: &Path, buf: &[u8; HEADER_SIZE], offset: u64) -> Result<DynamicHeader> {
        if &buf[..8] != COOKIE {
            return Err(Error::corrupt(
                path,
                format!(
                    "no VHD dynamic header at offset {offset} (the footer's data offset): cookie is {:?}, expected \"cxsparse\"",
                    fourcc(&buf[..8])
                ),
            ));
        }
        verify_checksum(path, buf, OFF_CHECKSUM, &format_args!("VHD dynamic header at offset {offset}"))?;
        let version = be32(buf, OFF_VERSION);
        if version >> 16 != 1 {
            return Err(Error::unsupported(
                path,
                format!("VHD dynamic header version 0x{version:08x} is not 1.x"),
            ));
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&buf[OFF_PARENT_ID..OFF_PARENT_ID + 16]);
        let name_units: Vec<u16> = buf[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_LEN]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators =
            [LocatorEntry { platform: [0; 4], data_space: 0, data_length: 0, data_offset: 0 }; LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let o = OFF_LOCATORS + i * LOCATOR_SIZE;
            let mut platform = [0u8; 4];
            platform.copy_from_slice(&buf[o..o + 4]);
            *loc = LocatorEntry {
                platform,
                data_space: be32(buf, o + 4),
                data_length: be32(buf, o + 8),
                data_offset: be64(buf, o + 16),
            };
        }
        Ok(DynamicHeader {
            table_offset: be64(buf, OFF_TABLE_OFFSET),
            max_table_entries: be32(buf, OFF_MAX_TABLE_ENTRIES),
            block_size: be32(buf, OFF_BLOCK_SIZE),
            parent_unique_id,
            parent_timestamp: be32(buf, OFF_PARENT_TIMESTAMP),
            parent_name: String::from_utf16_lossy(&name_units),
            locators,
        })
    }

    /// Serialize a header without parent (a dynamic disk), checksum computed.
    pub fn dynamic_bytes(table_offset: u64, max_table_entries: u32, block_size: u32) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(COOKIE);
        // The specification says 0xFFFFFFFF, but Microsoft's tools (and QEMU) write all
        // 64 bits set.
        b[OFF_DATA_OFFSET..OFF_DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        b[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&table_offset.to_be_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&HEADER_VERSION.to_be_bytes());
        b[OFF_MAX_TABLE_ENTRIES..OFF_MAX_TABLE_ENTRIES + 4].copy_from_slice(&max_table_entries.to_be_bytes());
        b[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&block_size.to_be_bytes());
        let sum = checksum(&b, 0..0);
        b[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        b
    }
}
