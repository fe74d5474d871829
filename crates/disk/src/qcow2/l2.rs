//! L1 and L2 table entries (QEMU docs/interop/qcow2.txt, "Cluster mapping" and
//! "Extended L2 Entries"): what one allocation unit of the guest is backed by.
//!
//! ```text
//! L1 entry:  bits 9-55 L2 table offset | bit 63 "copied" (refcount is 1)
//! L2 entry:  bit 63 copied | bit 62 compressed | bits 0-61 descriptor
//!   standard:   bit 0 reads-as-zero (v3) | bits 9-55 host cluster offset
//!   compressed: bits 0..x-1 host byte offset | bits x-61 extra 512-byte sectors,
//!               x = 62 - (cluster_bits - 8)
//! extended L2 entries add a second u64: bits 0-31 subcluster allocated,
//!   bits 32-63 subcluster reads as zero.
//! ```

use std::path::Path;

use super::geometry::Geometry;
use crate::{Error, Result};

/// An offset into the image file, kept apart from guest offsets (plain `u64`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct HostOffset(pub u64);

/// Bits 9-55 of an L1 or standard L2 entry: the host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor: the cluster reads as zeros (v3 only).
pub(crate) const ZERO: u64 = 1;
/// Compressed data is counted in 512-byte sectors.
const SECTOR: u64 = 512;

/// A compressed cluster's bytes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CompressedCluster {
    /// First byte of the compressed data (not aligned to anything).
    pub host: HostOffset,
    /// Bytes the descriptor allows the compressed data to span; the stream may end
    /// earlier, and the tail may lie past the end of the file.
    pub len: u64,
}

/// What one allocation unit (a cluster, or a subcluster with extended L2 entries) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Stored uncompressed; the host offset of the unit's first byte.
    Data(HostOffset),
    /// Part of a compressed cluster (compressed clusters have no subclusters).
    Compressed(CompressedCluster),
    /// Reads as zeros without looking at a backing file.
    Zero,
    /// Nothing here: the backing file's bytes, or zeros.
    Unallocated,
}

/// Decodes L1 and L2 entries of one image, checking every offset against the file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryDecoder {
    pub geometry: Geometry,
    /// Length of the image file when it was opened.
    pub file_len: u64,
    /// Version 2 images have no zero flag.
    pub v3: bool,
}

impl EntryDecoder {
    /// The L2 table an L1 entry points to, or `None` if the whole range is unallocated.
    pub fn l2_table(&self, entry: u64, l1_index: u64, path: &Path) -> Result<Option<HostOffset>> {
        let off = entry & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cluster = self.geometry.cluster_size();
        let what = || format!("L1 entry {l1_index} points to an L2 table at offset {off:#x}");
        if off & (cluster - 1) != 0 {
            return Err(Error::corrupt(path, format!("{}, not aligned to a cluster", what())));
        }
        if off < cluster {
            return Err(Error::corrupt(path, format!("{}, inside the header cluster", what())));
        }
        if off.checked_add(cluster).is_none_or(|end| end > self.file_len) {
            return Err(Error::corrupt(
                path,
                format!("{}, past the end of the file ({} bytes)", what(), self.file_len),
            ));
        }
        Ok(Some(HostOffset(off)))
    }

    /// Decode unit `sub` (0 without extended entries) of the cluster described by
    /// `entry` (and `bitmap`, the second half of an extended entry; 0 otherwise).
    /// `guest` is the guest offset of the cluster, for messages.
    pub fn unit(&self, entry: u64, bitmap: u64, sub: u32, guest: u64, path: &Path) -> Result<Unit> {
        if entry & COMPRESSED != 0 {
            return self.compressed(entry, guest, path).map(Unit::Compressed);
        }
        let host = entry & OFFSET_MASK;
        if self.geometry.extended_l2 {
            let allocated = (bitmap >> sub) & 1 != 0;
            let zero = (bitmap >> (32 + sub)) & 1 != 0;
            return match (allocated, zero) {
                (true, true) => Err(Error::corrupt(
                    path,
                    format!("L2 entry for guest offset {guest:#x}: subcluster {sub} is marked both allocated and zero"),
                )),
                (true, false) => {
                    self.check_data(host, entry, guest, path)?;
                    Ok(Unit::Data(HostOffset(host + (u64::from(sub) << self.geometry.unit_bits()))))
                }
                (false, true) => Ok(Unit::Zero),
                (false, false) => Ok(Unit::Unallocated),
            };
        }
        if entry & ZERO != 0 {
            if !self.v3 {
                return Err(Error::corrupt(
                    path,
                    format!("L2 entry {entry:#018x} for guest offset {guest:#x} has the zero flag, which version 2 images cannot have"),
                ));
            }
            return Ok(Unit::Zero);
        }
        if host == 0 && entry & COPIED == 0 {
            return Ok(Unit::Unallocated);
        }
        self.check_data(host, entry, guest, path)?;
        Ok(Unit::Data(HostOffset(host)))
    }

    fn check_data(&self, host: u64, entry: u64, guest: u64, path: &Path) -> Result<()> {
        let cluster = self.geometry.cluster_size();
        let what =
            || format!("L2 entry {entry:#018x} for guest offset {guest:#x} points to host offset {host:#x}");
        if host & (cluster - 1) != 0 {
            return Err(Error::corrupt(path, format!("{}, not aligned to a cluster", what())));
        }
        if host < cluster {
            return Err(Error::corrupt(path, format!("{}, inside the header cluster", what())));
        }
        if host >= self.file_len {
            return Err(Error::corrupt(
                path,
                format!("{}, past the end of the file ({} bytes)", what(), self.file_len),
            ));
        }
        Ok(())
    }

    fn compressed(&self, entry: u64, guest: u64, path: &Path) -> Result<CompressedCluster> {
        let bits = self.geometry.cluster_bits;
        let x = 62 - (bits - 8);
        let host = entry & ((1u64 << x) - 1);
        let sectors = (entry >> x) & ((1u64 << (bits - 8)) - 1);
        let what = || format!("compressed L2 entry {entry:#018x} for guest offset {guest:#x}");
        if host >> 56 != 0 {
            return Err(Error::corrupt(path, format!("{} has reserved offset bits above 55 set", what())));
        }
        if host < self.geometry.cluster_size() {
            return Err(Error::corrupt(
                path,
                format!("{} points to host offset {host:#x}, inside the header cluster", what()),
            ));
        }
        if host >= self.file_len {
            return Err(Error::corrupt(
                path,
                format!(
                    "{} points to host offset {host:#x}, past the end of the file ({} bytes)",
                    what(),
                    self.file_len
                ),
            ));
        }
        let len = (sectors + 1) * SECTOR - (host % SECTOR);
        Ok(CompressedCluster { host: HostOffset(host), len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(extended: bool) -> EntryDecoder {
        EntryDecoder { geometry: Geometry::new(16, extended), file_len: 1 << 30, v3: true }
    }

    #[test]
    fn standard_entries() {
        let d = dec(false);
        let p = Path::new("t");
        assert_eq!(d.unit(0, 0, 0, 0, p).unwrap(), Unit::Unallocated);
        assert_eq!(d.unit(COPIED | 0x50000, 0, 0, 0, p).unwrap(), Unit::Data(HostOffset(0x50000)));
        assert_eq!(d.unit(0x50000 | ZERO, 0, 0, 0, p).unwrap(), Unit::Zero);
        assert!(d.unit(COPIED, 0, 0, 0, p).unwrap_err().to_string().contains("header"));
        assert!(d.unit(COPIED | 0x50200, 0, 0, 0, p).unwrap_err().to_string().contains("aligned"));
        assert!(d.unit(COPIED | (1 << 40), 0, 0, 0, p).unwrap_err().to_string().contains("past the end"));
        let v2 = EntryDecoder { v3: false, ..d };
        assert!(v2.unit(ZERO, 0, 0, 0, p).is_err());
    }

    #[test]
    fn compressed_entry_fields() {
        let d = dec(false);
        // cluster_bits 16: x = 54; 3 extra sectors, data at 0x12345.
        let e = COMPRESSED | (3u64 << 54) | 0x12345;
        let c = d.unit(e, 0, 0, 0, Path::new("t")).unwrap();
        assert_eq!(
            c,
            Unit::Compressed(CompressedCluster { host: HostOffset(0x12345), len: 4 * 512 - 0x145 })
        );
    }

    #[test]
    fn extended_subclusters() {
        let d = dec(true);
        let p = Path::new("t");
        let bitmap = 0b01 | (0b10u64 << 32);
        assert_eq!(d.unit(0x50000, bitmap, 0, 0, p).unwrap(), Unit::Data(HostOffset(0x50000)));
        assert_eq!(d.unit(0x50000, bitmap, 1, 0, p).unwrap(), Unit::Zero);
        assert_eq!(d.unit(0x50000, bitmap, 2, 0, p).unwrap(), Unit::Unallocated);
        assert!(d.unit(0x50000, 1 | (1 << 32), 0, 0, p).is_err());
    }
}
