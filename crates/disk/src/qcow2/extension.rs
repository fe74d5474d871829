//! Header extensions (QEMU docs/interop/qcow2.txt, "Header extensions"): the
//! type-length-value records between the header and the end of the first cluster.
//!
//! ```text
//!   0  type (u32): 0 = end, 0xe2792aca backing format, 0x6803f857 feature names,
//!                  0x44415441 external data file name, 0x23852875 bitmaps (kept
//!                  raw here, read by `bitmaps.rs`), others ignored
//!   4  length of the data (u32)
//!   8  data, padded with zeros to a multiple of 8
//! ```

use std::path::Path;

use crate::{Error, Result};

/// End of the header extension area.
const END: u32 = 0;
/// Backing file format name string ("String header extensions").
const BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table ("Feature name table").
const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// External data file name string.
const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// Bitmaps extension ("Bitmaps extension"): noted for `info`, decoded by `bitmaps.rs`.
const BITMAPS: u32 = 0x2385_2875;

/// One entry of the feature name table: 48 bytes ("Feature name table").
const FEATURE_ENTRY_LEN: usize = 48;
/// Longest string extension we accept; qemu bounds names to 1023 bytes as well.
const MAX_STRING_EXTENSION: usize = 1023;

/// The header extensions tern understands.
#[derive(Debug, Default, Clone)]
pub(crate) struct Extensions {
    /// Format of the backing file, as qemu names it (`qcow2`, `raw`, `vpc`...).
    pub backing_format: Option<String>,
    /// (feature type, bit, name) from the feature name table.
    pub feature_names: Vec<(u8, u8, String)>,
    /// The external data file name, if the image has one.
    pub data_file: Option<String>,
    /// Every bitmaps extension record, undecoded: opening an image to read its data
    /// does not depend on them; `bitmaps.rs` validates them when bitmaps are asked for.
    pub bitmaps: Vec<RawExtension>,
}

/// One header extension record kept as stored.
#[derive(Debug, Clone)]
pub(crate) struct RawExtension {
    /// File offset of the record (its type field).
    pub at: usize,
    /// The extension data, without padding (at most a cluster).
    pub data: Vec<u8>,
}

impl Extensions {
    /// Parse the extensions in `first` (the first cluster) starting at `start` (the end
    /// of the header). Every length is checked against the cluster; the walk is bounded
    /// because each record is at least 8 bytes long.
    pub fn parse(first: &[u8], start: usize, path: &Path) -> Result<Extensions> {
        let mut ext = Extensions::default();
        let mut at = start;
        loop {
            // A first cluster that ends without an end marker: qemu accepts this (the
            // area simply runs to the end of the cluster).
            if at + 8 > first.len() {
                return Ok(ext);
            }
            let kind = u32::from_be_bytes(first[at..at + 4].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(first[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
            if kind == END {
                return Ok(ext);
            }
            let data_start = at + 8;
            let data = match data_start.checked_add(len) {
                Some(end) if end <= first.len() => &first[data_start..end],
                _ => {
                    return Err(Error::corrupt(
                        path,
                        format!(
                            "header extension {kind:#010x} at offset {at} claims {len} bytes, past the end of the first cluster ({} bytes)",
                            first.len()
                        ),
                    ))
                }
            };
            match kind {
                BACKING_FORMAT => {
                    ext.backing_format = Some(string_extension(data, "backing format", at, path)?)
                }
                EXTERNAL_DATA_FILE => {
                    ext.data_file = Some(string_extension(data, "external data file name", at, path)?)
                }
                FEATURE_NAME_TABLE => {
                    for entry in data.chunks_exact(FEATURE_ENTRY_LEN) {
                        let name = &entry[2..];
                        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                        ext.feature_names.push((
                            entry[0],
                            entry[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                BITMAPS => ext.bitmaps.push(RawExtension { at, data: data.to_vec() }),
                _ => {}
            }
            at = data_start + len.next_multiple_of(8);
        }
    }

    /// The name the image gives to bit `bit` of feature bitmap `kind` (0 incompatible,
    /// 1 compatible, 2 autoclear), if it has a feature name table that says.
    pub fn feature_name(&self, kind: u8, bit: u32) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && u32::from(*b) == bit)
            .map(|(_, _, n)| n.as_str())
    }
}

fn string_extension(data: &[u8], what: &str, at: usize, path: &Path) -> Result<String> {
    if data.len() > MAX_STRING_EXTENSION {
        return Err(Error::corrupt(
            path,
            format!(
                "{what} header extension at offset {at} is {} bytes long, above the maximum {MAX_STRING_EXTENSION}",
                data.len()
            ),
        ));
    }
    String::from_utf8(data.to_vec()).map_err(|_| {
        Error::corrupt(path, format!("{what} header extension at offset {at} is not valid UTF-8"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = kind.to_be_bytes().to_vec();
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v.resize(v.len().next_multiple_of(8), 0);
        v
    }

    #[test]
    fn reads_backing_format_and_feature_names() {
        let mut c = vec![0u8; 16];
        c.extend(record(BACKING_FORMAT, b"qcow2"));
        let mut entry = vec![0u8, 9];
        entry.extend_from_slice(b"future");
        entry.resize(FEATURE_ENTRY_LEN, 0);
        c.extend(record(FEATURE_NAME_TABLE, &entry));
        c.extend([0u8; 8]);
        c.resize(512, 0);
        let e = Extensions::parse(&c, 16, Path::new("t")).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(e.feature_name(0, 9), Some("future"));
    }

    #[test]
    fn length_past_cluster_is_corrupt() {
        let mut c = vec![0u8; 8];
        c.extend(0x1234u32.to_be_bytes());
        c.extend(u32::MAX.to_be_bytes());
        c.resize(512, 0);
        let e = Extensions::parse(&c, 8, Path::new("t")).unwrap_err();
        assert!(e.to_string().contains("header extension"), "{e}");
    }
}
