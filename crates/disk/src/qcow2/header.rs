//! The qcow2 header (QEMU docs/interop/qcow2.txt, "Header"): parsing with every field
//! checked, and encoding for the writer.
//!
//! Layout (big endian; v2 stops after byte 71, v3 is at least 104 bytes):
//!
//! ```text
//!   0  magic "QFI\xfb"            36  l1_size (u32)
//!   4  version (2 | 3)            40  l1_table_offset (u64)
//!   8  backing_file_offset (u64)  48  refcount_table_offset (u64)
//!  16  backing_file_size (u32)    56  refcount_table_clusters (u32)
//!  20  cluster_bits (u32)         60  nb_snapshots (u32)
//!  24  size (u64)                 64  snapshots_offset (u64)
//!  32  crypt_method (u32)
//!  -- v3 --
//!  72  incompatible_features      96  refcount_order (u32)
//!  80  compatible_features       100  header_length (u32)
//!  88  autoclear_features        104  compression_type (u8, if header_length > 104)
//! ```

use std::path::Path;

use super::extension::Extensions;
use super::geometry::Geometry;
use crate::{Error, Result};

/// `QFI\xfb` at offset 0 ("Header", bytes 0-3). Never changes.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a version 2 header ("For version 2, the header is exactly 72 bytes").
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header (fields through header_length).
pub(crate) const V3_MIN_HEADER_LEN: u32 = 104;
/// The header tern writes: v3 fields plus the compression_type byte, padded to 8.
pub(crate) const V3_WRITTEN_HEADER_LEN: u32 = 112;
/// Longest backing file name ("Must not be longer than 1023 bytes").
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits ("Header", bytes 72-79).
pub(crate) mod incompatible {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits ("Header", bytes 80-87).
pub(crate) mod compatible {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits ("Header", bytes 88-95).
pub(crate) mod autoclear {
    /// The bitmaps extension is consistent: a writer that does not know bitmaps clears
    /// it (as it must clear every autoclear bit it does not know) when it changes the image.
    pub const BITMAPS: u64 = 1 << 0;
}

/// How compressed clusters are compressed ("Header", byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    /// Type 0: raw deflate (zlib without its header), the only type before QEMU 5.1.
    Deflate,
    /// Type 1: zstd frames.
    Zstd,
}

impl Compression {
    /// The name `qemu-img info` uses.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Deflate => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// A parsed and validated header. Offsets of tables are checked against the file by
/// the reader (which knows the file length), not here.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Parse the header from `first`, the first cluster of the file (or all of the file
    /// if it is shorter). Checks everything that does not need the file length:
    /// version, cluster size, header length, feature bits, encryption, compression
    /// type, refcount order, backing name placement, and the L1 size against the
    /// virtual size. Returns the header and its extensions.
    pub fn parse(first: &[u8], path: &Path) -> Result<(Header, Extensions)> {
        let corrupt = |msg: String| Error::corrupt(path, msg);
        if first.len() < V2_HEADER_LEN as usize {
            return Err(corrupt(format!(
                "truncated: the qcow2 header needs {V2_HEADER_LEN} bytes but the file is {} bytes long",
                first.len()
            )));
        }
        if first[..4] != MAGIC {
            return Err(corrupt("bad magic: not a qcow2 image (expected \"QFI\\xfb\" at offset 0)".into()));
        }
        let version = be32(first, 4);
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::unsupported(
                    path,
                    "qcow version 1 (the original qcow format, header field `version` at offset 4) is not supported; only qcow2 versions 2 and 3 are",
                ))
            }
            v => {
                return Err(Error::unsupported(
                    path,
                    format!("unknown qcow2 version {v} (header field `version` at offset 4); only 2 and 3 are supported"),
                ))
            }
        }
        let cluster_bits = be32(first, 20);
        Geometry::check_cluster_bits(cluster_bits, path)?;
        let cluster_size = 1usize << cluster_bits;
        // Everything the header describes must sit in its first cluster.
        let first = &first[..first.len().min(cluster_size)];

        let mut h = Header {
            version,
            backing_file_offset: be64(first, 8),
            backing_file_size: be32(first, 16),
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Deflate,
        };
        let crypt_method = be32(first, 32);
        if crypt_method != 0 {
            let what = match crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(Error::unsupported(
                path,
                format!("encrypted qcow2 images are not supported (crypt_method {crypt_method}, {what}, at offset 32)"),
            ));
        }

        if version >= 3 {
            if first.len() < V3_MIN_HEADER_LEN as usize {
                return Err(corrupt(format!(
                    "truncated: a qcow2 v3 header needs {V3_MIN_HEADER_LEN} bytes but only {} are present",
                    first.len()
                )));
            }
            h.incompatible = be64(first, 72);
            h.compatible = be64(first, 80);
            h.autoclear = be64(first, 88);
            h.refcount_order = be32(first, 96);
            h.header_length = be32(first, 100);
            if h.header_length < V3_MIN_HEADER_LEN || h.header_length & 7 != 0 {
                return Err(corrupt(format!(
                    "header_length {} (offset 100) must be a multiple of 8 and at least {V3_MIN_HEADER_LEN}",
                    h.header_length
                )));
            }
            if h.header_length as usize > first.len() {
                return Err(corrupt(format!(
                    "header_length {} (offset 100) runs past the first cluster ({} bytes available)",
                    h.header_length,
                    first.len()
                )));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!(
                    "refcount_order {} (offset 96) is above the maximum 6",
                    h.refcount_order
                )));
            }
        }

        let extensions = Extensions::parse(first, h.header_length as usize, path)?;
        h.check_features(&extensions, path)?;

        if h.incompatible & incompatible::COMPRESSION_TYPE != 0 {
            if h.header_length <= 104 {
                return Err(corrupt(
                    "the compression type feature bit is set but the header has no compression_type field (offset 104)".into(),
                ));
            }
            h.compression = match first[104] {
                0 => return Err(corrupt(
                    "the compression type feature bit is set but compression_type (offset 104) is 0 (zlib)"
                        .into(),
                )),
                1 => Compression::Zstd,
                t => {
                    return Err(Error::unsupported(
                        path,
                        format!("unknown compression_type {t} (offset 104); known are 0 (zlib) and 1 (zstd)"),
                    ))
                }
            };
        } else if h.header_length > 104 && first[104] != 0 {
            return Err(corrupt(format!(
                "compression_type {} (offset 104) is set without the compression type feature bit",
                first[104]
            )));
        }

        h.check_backing_name(path)?;
        let geometry = Geometry::new(cluster_bits, h.extended_l2());
        geometry.check_l1_size(h.size, h.l1_size, path)?;
        Ok((h, extensions))
    }

    /// Refuse what cannot be read correctly without implementing it.
    fn check_features(&self, ext: &Extensions, path: &Path) -> Result<()> {
        let unknown = self.incompatible & !incompatible::KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64u32)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match ext.feature_name(0, b) {
                    Some(name) => format!("bit {b} ({name:?})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(Error::unsupported(
                path,
                format!(
                    "unknown incompatible feature {} set in incompatible_features (offset 72)",
                    bits.join(", ")
                ),
            ));
        }
        if self.incompatible & incompatible::EXTERNAL_DATA_FILE != 0 {
            let name = ext.data_file.as_deref().unwrap_or("(not named)");
            return Err(Error::unsupported(
                path,
                format!("qcow2 images with an external data file ({name:?}) are not supported"),
            ));
        }
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(Error::corrupt(
                path,
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, but cluster_bits is {}",
                    self.cluster_bits
                ),
            ));
        }
        Ok(())
    }

    fn check_backing_name(&self, path: &Path) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = self.backing_file_size;
        if len > MAX_BACKING_NAME {
            return Err(Error::corrupt(
                path,
                format!("backing file name length {len} (backing_file_size, offset 16) is above the maximum {MAX_BACKING_NAME}"),
            ));
        }
        let cluster = 1u64 << self.cluster_bits;
        if self.backing_file_offset.checked_add(len as u64).is_none_or(|end| end > cluster) {
            return Err(Error::corrupt(
                path,
                format!(
                    "backing file name at offset {} ({len} bytes, backing_file_offset at offset 8) is outside the first cluster",
                    self.backing_file_offset
                ),
            ));
        }
        Ok(())
    }

    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & incompatible::EXTENDED_L2 != 0
    }

    /// The backing file name, if the image has one (checked by `parse` to lie within
    /// `first`).
    pub fn backing_name(&self, first: &[u8], path: &Path) -> Result<Option<String>> {
        if self.backing_file_offset == 0 {
            return Ok(None);
        }
        let start = self.backing_file_offset as usize;
        let end = start + self.backing_file_size as usize;
        let bytes = first.get(start..end).ok_or_else(|| {
            Error::corrupt(
                path,
                format!("truncated: the backing file name at offset {start} ({} bytes) is past the end of the file", end - start),
            )
        })?;
        match std::str::from_utf8(bytes) {
            Ok(s) if !s.is_empty() => Ok(Some(s.to_string())),
            Ok(_) => Err(Error::corrupt(path, format!("the backing file name at offset {start} is empty"))),
            Err(_) => Err(Error::unsupported(
                path,
                format!("the backing file name at offset {start} is not valid UTF-8"),
            )),
        }
    }

    /// Encode a v3 header of [`V3_WRITTEN_HEADER_LEN`] bytes (for the writer, which
    /// never writes a backing file, snapshots or optional features).
    pub fn encode_v3(&self) -> [u8; V3_WRITTEN_HEADER_LEN as usize] {
        let mut b = [0u8; V3_WRITTEN_HEADER_LEN as usize];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        // 32..36 crypt_method: 0
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        // 64..72 snapshots_offset: 0
        b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
        b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
        b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
        b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&V3_WRITTEN_HEADER_LEN.to_be_bytes());
        b[104] = match self.compression {
            Compression::Deflate => 0,
            Compression::Zstd => 1,
        };
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_WRITTEN_HEADER_LEN,
            compression: Compression::Deflate,
        }
    }

    fn cluster_with(h: &Header) -> Vec<u8> {
        let mut c = vec![0u8; 1 << h.cluster_bits];
        c[..V3_WRITTEN_HEADER_LEN as usize].copy_from_slice(&h.encode_v3());
        c
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let h = sample();
        let (p, _) = Header::parse(&cluster_with(&h), Path::new("t")).unwrap();
        assert_eq!((p.version, p.cluster_bits, p.size, p.l1_size), (3, 16, 1 << 30, 2));
        assert_eq!(p.l1_table_offset, 0x30000);
        assert_eq!(p.header_length, V3_WRITTEN_HEADER_LEN);
    }

    #[test]
    fn l1_too_small_for_size_is_corrupt() {
        let mut h = sample();
        h.size = 1 << 40;
        let e = Header::parse(&cluster_with(&h), Path::new("t")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("l1_size"), "{e}");
    }

    #[test]
    fn any_prefix_never_panics() {
        let c = cluster_with(&sample());
        for n in 0..200 {
            let _ = Header::parse(&c[..n], Path::new("t"));
        }
    }
}
