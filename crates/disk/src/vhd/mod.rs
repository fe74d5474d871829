//! VHD (Microsoft Virtual Hard Disk Image Format Specification).
//!
//! Placeholder until the VHD reader and writer land: detection works, opening and
//! creating are refused with an `Unsupported` error.

use std::path::{Path, PathBuf};

use crate::io::ImageFile;
use crate::{Disk, Error, ImageInfo, Mapping, OpenOptions, Result};

/// Footer cookie (VHD spec, "Hard Disk Footer Format").
pub const COOKIE: &[u8; 8] = b"conectix";

/// An open VHD image.
pub struct VhdDisk {
    _file: ImageFile,
}

impl VhdDisk {
    /// Open a VHD image.
    pub fn open(file: ImageFile, _options: &OpenOptions, _seen: &mut Vec<PathBuf>) -> Result<Self> {
        Err(Error::unsupported(file.path(), "VHD is not implemented yet"))
    }
}

impl Disk for VhdDisk {
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

/// Writes a new VHD image.
pub struct VhdWriter;

impl VhdWriter {
    /// Create a dynamic VHD.
    pub fn create_dynamic(path: &Path, _size: u64) -> Result<Self> {
        Err(Error::unsupported(path, "writing VHD is not implemented yet"))
    }

    /// Create a fixed VHD.
    pub fn create_fixed(path: &Path, _size: u64) -> Result<Self> {
        Err(Error::unsupported(path, "writing VHD is not implemented yet"))
    }
}

impl crate::DiskWriter for VhdWriter {
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
