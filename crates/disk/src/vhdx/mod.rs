//! VHDX ([MS-VHDX]).
//!
//! Placeholder until the VHDX reader and writer land: detection works, opening and
//! creating are refused with an `Unsupported` error.

use std::path::{Path, PathBuf};

use crate::io::ImageFile;
use crate::{Disk, Error, ImageInfo, Mapping, OpenOptions, Result};

/// File type identifier signature at offset 0 ([MS-VHDX] 2.2.1).
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";

/// An open VHDX image.
pub struct VhdxDisk {
    _file: ImageFile,
}

impl VhdxDisk {
    /// Open a VHDX image.
    pub fn open(file: ImageFile, _options: &OpenOptions, _seen: &mut Vec<PathBuf>) -> Result<Self> {
        Err(Error::unsupported(file.path(), "VHDX is not implemented yet"))
    }
}

impl Disk for VhdxDisk {
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

/// Writes a new VHDX image.
pub struct VhdxWriter;

impl VhdxWriter {
    /// Create a dynamic VHDX.
    pub fn create(path: &Path, _size: u64, _block_size: u64) -> Result<Self> {
        Err(Error::unsupported(path, "writing VHDX is not implemented yet"))
    }
}

impl crate::DiskWriter for VhdxWriter {
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
