//! The base index: for one disk at one point, chunk number -> chunk address.
//!
//! Layout, version 1 (integers little-endian; see docs/formats/index.md). The encoded
//! index is stored inside an envelope of kind `Index`:
//! ```text
//! offset size field
//!  0     8    magic "TERNIDX" followed by the version byte 0x01
//!  8     8    disk size in bytes
//! 16     4    chunk size in bytes
//! 20     4    reserved, zero
//! 24     8    chunk count = ceil(disk size / chunk size)
//! 32   32*n   one address per chunk, in chunk order; 32 zero bytes = a zero chunk
//! ```
//! A zero chunk has no object. A keyed BLAKE3 digest of all zeros would need a
//! 2^-256 coincidence, so the sentinel cannot collide with a real address.

use crate::{ChunkAddress, Error, ErrorKind, Result, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// NEVER CHANGE the bytes of a released version.
const MAGIC_V1: [u8; 8] = *b"TERNIDX\x01";
const HEADER_LEN: usize = 32;

/// One chunk's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexEntry {
    /// All zero: nothing stored.
    Zero,
    /// Stored at this address.
    Chunk(ChunkAddress),
}

/// A full map of one disk at one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseIndex {
    disk_size: u64,
    chunk_size: u32,
    entries: Vec<IndexEntry>,
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

impl BaseIndex {
    /// An index of a disk of `disk_size` bytes in chunks of `chunk_size`, all zero.
    pub fn new(disk_size: u64, chunk_size: u32) -> Result<Self> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("chunk size {chunk_size} must be a power of two from 64 KiB to 64 MiB"),
            ));
        }
        let count = disk_size.div_ceil(chunk_size as u64);
        let count =
            usize::try_from(count).map_err(|_| Error::new(ErrorKind::InvalidInput, "disk too large"))?;
        Ok(BaseIndex { disk_size, chunk_size, entries: vec![IndexEntry::Zero; count] })
    }

    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the disk has no chunks (size 0).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of chunk `n`.
    pub fn get(&self, n: usize) -> Option<IndexEntry> {
        self.entries.get(n).copied()
    }

    /// Set the entry of chunk `n`.
    pub fn set(&mut self, n: usize, entry: IndexEntry) -> Result<()> {
        let len = self.entries.len();
        let slot = self.entries.get_mut(n).ok_or_else(|| {
            Error::new(ErrorKind::InvalidInput, format!("chunk {n} is past the end ({len} chunks)"))
        })?;
        *slot = entry;
        Ok(())
    }

    /// All entries in chunk order.
    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Guest byte range of chunk `n` (the last chunk may be short).
    pub fn chunk_range(&self, n: usize) -> std::ops::Range<u64> {
        let start = n as u64 * self.chunk_size as u64;
        start..(start + self.chunk_size as u64).min(self.disk_size)
    }

    /// Encode (version 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 32 * self.entries.len());
        out.extend_from_slice(&MAGIC_V1);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            match e {
                IndexEntry::Zero => out.extend_from_slice(&[0; 32]),
                IndexEntry::Chunk(a) => out.extend_from_slice(a.as_bytes()),
            }
        }
        out
    }

    /// Decode, checking every field.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!("index is {} bytes, shorter than its header", bytes.len())));
        }
        if bytes[..7] != MAGIC_V1[..7] {
            return Err(corrupt("not a tern index (bad magic)"));
        }
        if bytes[7] != MAGIC_V1[7] {
            return Err(corrupt(format!(
                "index version {} is not supported (this tern reads version 1)",
                bytes[7]
            )));
        }
        let disk_size = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let chunk_size = u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"));
        let count = u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes"));
        if bytes[20..24] != [0; 4] {
            return Err(corrupt("index reserved bytes are not zero"));
        }
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(corrupt(format!(
                "index chunk size {chunk_size} is not a power of two from 64 KiB to 64 MiB"
            )));
        }
        let expected = disk_size.div_ceil(chunk_size as u64);
        if count != expected {
            return Err(corrupt(format!(
                "index declares {count} chunks; a {disk_size}-byte disk in {chunk_size}-byte chunks has {expected}"
            )));
        }
        // Checked against the bytes actually present before anything is allocated.
        let body = &bytes[HEADER_LEN..];
        if Some(body.len() as u64) != count.checked_mul(32) {
            return Err(corrupt(format!("index body is {} bytes, expected 32 x {count}", body.len())));
        }
        let mut index =
            BaseIndex::new(disk_size, chunk_size).map_err(|e| corrupt(format!("index header: {e}")))?;
        for (slot, raw) in index.entries.iter_mut().zip(body.chunks_exact(32)) {
            if raw != [0u8; 32] {
                *slot = IndexEntry::Chunk(ChunkAddress(raw.try_into().expect("32 bytes")));
            }
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut i = BaseIndex::new(10 << 20, 4 << 20).unwrap();
        assert_eq!(i.len(), 3);
        i.set(1, IndexEntry::Chunk(ChunkAddress([9; 32]))).unwrap();
        assert_eq!(i.chunk_range(2), (8 << 20)..(10 << 20));
        let d = BaseIndex::decode(&i.encode()).unwrap();
        assert_eq!(d, i);
    }

    #[test]
    fn malformed_indexes_are_refused() {
        let good = BaseIndex::new(10 << 20, 4 << 20).unwrap().encode();
        let mut bad_count = good.clone();
        bad_count[24] = 9;
        let mut bad_chunk = good.clone();
        bad_chunk[16..20].copy_from_slice(&3u32.to_le_bytes());
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        for (name, b) in [
            ("short", &good[..20]),
            ("count", &bad_count[..]),
            ("chunk size", &bad_chunk[..]),
            ("huge", &huge[..]),
            ("truncated body", &good[..good.len() - 1]),
        ] {
            assert_eq!(BaseIndex::decode(b).unwrap_err().kind(), ErrorKind::Corrupt, "{name}");
        }
    }
}
