//! Raw images: the file is the guest disk. Sparse files are mapped with
//! SEEK_DATA/SEEK_HOLE so that holes are neither read nor copied.

use std::path::Path;

use std::sync::Arc;

use crate::io::{FixedLayoutWriter, ImageFile};
use crate::{check_range, Disk, Error, Format, ImageInfo, MapKind, Mapping, Result};

/// An open raw image (a regular file or a block device).
#[derive(Debug)]
pub struct RawDisk {
    file: ImageFile,
    size: u64,
    block_device: bool,
}

impl RawDisk {
    /// Open a raw image from an already opened file.
    pub fn open(file: ImageFile) -> Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.file().metadata().map_err(|e| Error::io(file.path(), "stat", e))?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            use std::io::{Seek, SeekFrom};
            let mut f = file.file();
            f.seek(SeekFrom::End(0)).map_err(|e| Error::io(file.path(), "find size of block device", e))?
        } else {
            meta.len()
        };
        Ok(RawDisk { file, size, block_device })
    }
}

impl Disk for RawDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.size)?;
        self.file.read_at_zero_fill(buf, offset)
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        if offset >= self.size {
            return Err(Error::invalid(
                Some(self.file.path()),
                format!("map offset {offset} is beyond the end"),
            ));
        }
        let limit = max_len.min(self.size - offset).max(1);
        if self.block_device {
            return Ok(Mapping { start: offset, length: limit, kind: MapKind::Data });
        }
        // SEEK_DATA from offset: if data starts later, [offset, data) is a hole.
        let (kind, end) = match self.file.seek_data(offset)? {
            None => (MapKind::Zero, self.size),
            Some(d) if d > offset => (MapKind::Zero, d),
            Some(_) => (MapKind::Data, self.file.seek_hole(offset)?.unwrap_or(self.size)),
        };
        let length = end.min(offset + limit) - offset;
        Ok(Mapping { start: offset, length: length.max(1), kind })
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: Format::Raw,
            subformat: if self.block_device { "block-device" } else { "file" }.to_string(),
            virtual_size: self.size,
            allocated_bytes: self.file.allocated_bytes()?,
            file_size: self.size,
            cluster_size: None,
            logical_sector_size: 512,
            backing: None,
            details: Vec::new(),
        })
    }
}

/// Writes a sparse raw file: the file is sized up front, and only written ranges
/// get blocks.
#[derive(Debug)]
pub struct RawWriter {
    file: Arc<ImageFile>,
    size: u64,
}

impl RawWriter {
    /// Create a sparse raw image of `size` bytes at `path`.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = ImageFile::create_new(path)?;
        file.set_len(size)?;
        Ok(RawWriter { file: Arc::new(file), size })
    }
}

impl crate::DiskWriter for RawWriter {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset)?;
        self.file.start_writeback(offset, buf.len() as u64);
        Ok(())
    }

    fn skip_sync(&mut self) {
        self.file.set_sync(false);
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync()
    }

    fn concurrent(&self) -> Option<Arc<dyn crate::ConcurrentWrite>> {
        Some(Arc::new(FixedLayoutWriter { file: self.file.clone(), data_offset: 0, size: self.size }))
    }
}
