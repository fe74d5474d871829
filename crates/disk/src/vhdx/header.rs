//! The header section: file type identifier and the two headers ([MS-VHDX] 2.2).
//!
//! ```text
//! 0       64K        128K       192K          256K          320K ... 1 MiB
//! | ident | header 1 | header 2 | region tbl 1 | region tbl 2 | reserved |
//! ```
//!
//! Header (4 KiB used of its 64 KiB slot, [MS-VHDX] 2.2.2):
//! `Signature "head"` u32 @0, `Checksum` u32 @4 (CRC-32C over the 4 KiB with this
//! field zero), `SequenceNumber` u64 @8, `FileWriteGuid` @16, `DataWriteGuid` @32,
//! `LogGuid` @48, `LogVersion` u16 @64 (0), `Version` u16 @66 (1), `LogLength` u32 @68,
//! `LogOffset` u64 @72, reserved to 4096.
//!
//! The current header is the valid one with the larger sequence number; updates go to
//! the other slot so that a torn write never loses both.

use super::guid::Guid;
use super::le::{crc32c_with_hole, put_u16, put_u32, put_u64, u16_at, u32_at, u64_at, utf16le};
use super::MIB;
use crate::io::ImageFile;
use crate::{Error, Result};

/// File type identifier signature at offset 0 ([MS-VHDX] 2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Header signature `head` ([MS-VHDX] 2.2.2).
const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// Offsets of the two header copies.
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes covered by a header's checksum.
pub(crate) const HEADER_SIZE: usize = 4096;
/// Bytes of the creator string (UTF-16) in the file type identifier.
const CREATOR_BYTES: usize = 512;

/// One parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Serialize into a 4 KiB block with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIGNATURE);
        put_u64(&mut b, 8, self.sequence_number);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put_u16(&mut b, 64, self.log_version);
        put_u16(&mut b, 66, self.version);
        put_u32(&mut b, 68, self.log_length);
        put_u64(&mut b, 72, self.log_offset);
        let crc = crc32c_with_hole(&b, 4);
        put_u32(&mut b, 4, crc);
        b
    }

    /// Parse one header slot; `Err(reason)` says why it is not a valid header.
    fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        if &b[0..4] != HEADER_SIGNATURE {
            return Err("signature is not \"head\"".into());
        }
        let stored = u32_at(b, 4);
        let computed = crc32c_with_hole(&b[..HEADER_SIZE], 4);
        if stored != computed {
            return Err(format!("checksum {stored:#010x} does not match computed {computed:#010x}"));
        }
        Ok(Header {
            sequence_number: u64_at(b, 8),
            file_write_guid: Guid::from_slice(&b[16..]),
            data_write_guid: Guid::from_slice(&b[32..]),
            log_guid: Guid::from_slice(&b[48..]),
            log_version: u16_at(b, 64),
            version: u16_at(b, 66),
            log_length: u32_at(b, 68),
            log_offset: u64_at(b, 72),
        })
    }

    /// Check the fields a valid header must have ([MS-VHDX] 2.2.2).
    fn validate(&self) -> std::result::Result<(), String> {
        if self.version != 1 {
            return Err(format!("Version is {} (only 1 is defined)", self.version));
        }
        if self.log_version != 0 {
            return Err(format!("LogVersion is {} (only 0 is defined)", self.log_version));
        }
        if u64::from(self.log_length) % MIB != 0 {
            return Err(format!("LogLength {} is not a multiple of 1 MiB", self.log_length));
        }
        if !self.log_offset.is_multiple_of(MIB) || self.log_offset < MIB {
            return Err(format!("LogOffset {} is not a multiple of 1 MiB at or past 1 MiB", self.log_offset));
        }
        Ok(())
    }
}

/// Which slot holds the current header, and both parsed slots.
#[derive(Debug, Clone)]
pub(crate) struct Headers {
    pub current: Header,
    pub current_slot: usize,
}

/// Check the file type identifier and return its creator string.
pub(crate) fn read_identifier(file: &ImageFile) -> Result<String> {
    let mut b = vec![0u8; 8 + CREATOR_BYTES];
    file.read_exact_at(&mut b, 0)?;
    if &b[..8] != FILE_SIGNATURE {
        return Err(Error::corrupt(
            file.path(),
            "not a VHDX file: the file type identifier is not \"vhdxfile\"",
        ));
    }
    Ok(utf16le(&b[8..]))
}

/// The file type identifier block (first 64 KiB, only 520 bytes used).
pub(crate) fn identifier_bytes(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 8 + CREATOR_BYTES];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    let c = super::le::to_utf16le(creator);
    let n = c.len().min(CREATOR_BYTES - 2);
    b[8..8 + n].copy_from_slice(&c[..n]);
    b
}

/// Read both headers and pick the current one: the valid header with the larger
/// sequence number ([MS-VHDX] 2.2.2.1). Both invalid is a `Corrupt` error naming why.
pub(crate) fn read_headers(file: &ImageFile) -> Result<Headers> {
    let mut parsed = Vec::with_capacity(2);
    for off in HEADER_OFFSETS {
        let mut b = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut b, off)?;
        parsed.push(Header::parse(&b).and_then(|h| h.validate().map(|()| h)));
    }
    let pick = match (&parsed[0], &parsed[1]) {
        (Ok(a), Ok(b)) => {
            if b.sequence_number > a.sequence_number {
                1
            } else {
                0
            }
        }
        (Ok(_), Err(_)) => 0,
        (Err(_), Ok(_)) => 1,
        (Err(a), Err(b)) => {
            return Err(Error::corrupt(
                file.path(),
                format!(
                "both VHDX headers are invalid: header 1 (offset 65536): {a}; header 2 (offset 131072): {b}"
            ),
            ))
        }
    };
    let current = parsed.swap_remove(pick).map_err(|_| Error::corrupt(file.path(), "header vanished"))?;
    Ok(Headers { current, current_slot: pick })
}

/// Make `next` current the way [MS-VHDX] 2.2.2.1 updates headers: write it to the
/// non-current slot with the next sequence number and flush, then refresh the other
/// slot with the number after so both copies are valid. Returns the new state.
pub(crate) fn update_headers(file: &ImageFile, old: &Headers, mut next: Header) -> Result<Headers> {
    let exhausted =
        || Error::corrupt(file.path(), "header SequenceNumber is at its maximum and cannot be advanced");
    let mut seq = old.current.sequence_number;
    let mut slot = 1 - old.current_slot;
    for _ in 0..2 {
        seq = seq.checked_add(1).ok_or_else(exhausted)?;
        next.sequence_number = seq;
        file.write_all_at(&next.to_bytes(), HEADER_OFFSETS[slot])?;
        file.sync()?;
        slot = 1 - slot;
    }
    Ok(Headers { current: next, current_slot: old.current_slot })
}
