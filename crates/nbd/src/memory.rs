//! [`MemoryExport`]: bytes in memory, for tests and fuzzing of the server.

use std::sync::RwLock;

use crate::export::{BlockSizes, Capabilities, ErrorKind, Export, ExportError, ExportResult, ZeroOptions};

/// An export held in memory; writes, trims and zeroes change it.
#[derive(Debug)]
pub struct MemoryExport {
    bytes: RwLock<Vec<u8>>,
    read_only: bool,
    sizes: BlockSizes,
}

impl MemoryExport {
    /// `size` zero bytes with the given constraints.
    pub fn new(size: usize, read_only: bool, sizes: BlockSizes) -> Self {
        MemoryExport { bytes: RwLock::new(vec![0; size]), read_only, sizes }
    }

    /// A copy of the content.
    pub fn content(&self) -> Vec<u8> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(&self, offset: u64, len: u64) -> ExportResult<std::ops::Range<usize>> {
        let size = self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(ExportError::new(ErrorKind::Invalid, "beyond the end")),
        }
    }
}

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.bytes.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: self.read_only, trim: true, fast_zero: true, multi_conn: true }
    }

    fn block_sizes(&self) -> BlockSizes {
        self.sizes
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ExportResult<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes.read().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> ExportResult<()> {
        let r = self.range(offset, buf.len() as u64)?;
        self.bytes.write().unwrap_or_else(|e| e.into_inner())[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, _o: ZeroOptions) -> ExportResult<()> {
        let r = self.range(offset, length)?;
        self.bytes.write().unwrap_or_else(|e| e.into_inner())[r].fill(0);
        Ok(())
    }
}
