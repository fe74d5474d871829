//! qcow2 v2 and v3 (QEMU's docs/interop/qcow2.txt).
//!
//! Placeholder until the qcow2 reader and writer land: detection works, opening and
//! creating are refused with an `Unsupported` error.

use std::path::{Path, PathBuf};

use crate::io::ImageFile;
use crate::{Disk, Error, ImageInfo, Mapping, OpenOptions, Result};

/// `QFI\xfb` at offset 0 (qcow2 spec, "Header").
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// An open qcow2 image.
pub struct Qcow2Disk {
    _file: ImageFile,
}

impl Qcow2Disk {
    /// Open a qcow2 image.
    pub fn open(file: ImageFile, _options: &OpenOptions, _seen: &mut Vec<PathBuf>) -> Result<Self> {
        Err(Error::unsupported(file.path(), "qcow2 is not implemented yet"))
    }
}

impl Disk for Qcow2Disk {
    fn virtual_size(&self) -> u64 {
        unreachable!("never constructed")
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        unreachable!("never constructed")
    }
    fn mapping(&self, _offset: u64, _max_len: u64) -> Result<Mapping> {
        unreachable!("never constructed")
    }
    fn info(&self) -> Result<ImageInfo> {
        unreachable!("never constructed")
    }
}

/// Writes a new qcow2 image.
pub struct Qcow2Writer;

impl Qcow2Writer {
    /// Create a qcow2 v3 image.
    pub fn create(path: &Path, _size: u64, _cluster_size: u64) -> Result<Self> {
        Err(Error::unsupported(path, "writing qcow2 is not implemented yet"))
    }
}

impl crate::DiskWriter for Qcow2Writer {
    fn virtual_size(&self) -> u64 {
        unreachable!("never constructed")
    }
    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> Result<()> {
        unreachable!("never constructed")
    }
    fn finish(self: Box<Self>) -> Result<()> {
        unreachable!("never constructed")
    }
}
