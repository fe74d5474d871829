//! The answer to "what is at guest offset X, for how long?".

use serde::Serialize;

use crate::{Disk, Result};

/// What a run of guest bytes is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MapKind {
    /// Bytes stored in the image (may still happen to be zero).
    Data,
    /// Known zero without reading: a zero cluster, a hole punched on purpose.
    Zero,
    /// Nothing stored here and no backing opened: reads as zero.
    Unallocated,
}

impl MapKind {
    /// Whether the run reads as zeros without looking at the bytes.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, MapKind::Data)
    }
}

/// A run of guest bytes of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Mapping {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes (at least 1).
    pub length: u64,
    /// What backs it.
    pub kind: MapKind,
}

impl Mapping {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// The whole map of a disk, adjacent runs of the same kind merged.
pub fn collect_map(disk: &dyn Disk) -> Result<Vec<Mapping>> {
    let size = disk.virtual_size();
    let mut out: Vec<Mapping> = Vec::new();
    let mut off = 0;
    while off < size {
        let m = disk.mapping(off, size - off)?;
        debug_assert!(m.start == off && m.length > 0 && m.end() <= size);
        if m.length == 0 {
            // A format bug must not hang `tern disk map`.
            return Err(crate::Error::new(
                crate::ErrorKind::Corrupt,
                None,
                format!("mapping returned an empty run at offset {off}"),
            ));
        }
        match out.last_mut() {
            Some(last) if last.kind == m.kind && last.end() == m.start => last.length += m.length,
            _ => out.push(m),
        }
        off = m.end();
    }
    Ok(out)
}
