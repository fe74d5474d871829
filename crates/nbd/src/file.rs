//! [`FileExport`]: a raw file or block device served read-write (or read-only), the
//! way nbdkit's file plugin does: `pread`/`pwrite`, holes punched for trim and zeroes,
//! `SEEK_DATA`/`SEEK_HOLE` for `base:allocation`.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::export::{
    write_zeroes_by_writes, BlockSizes, Capabilities, ErrorKind, Export, ExportError, ExportResult, Extent,
    ZeroOptions,
};
use crate::proto::{STATE_HOLE, STATE_ZERO};

/// Most extents one block status answer computes (each costs two `lseek`s).
const MAX_FILE_EXTENTS: usize = 1024;

/// A file served as an export; its size is fixed when it is opened.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
}

impl FileExport {
    /// Open `path` (a regular file or block device), writable unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileExport> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device { file.seek(SeekFrom::End(0))? } else { meta.len() };
        Ok(FileExport { file, path: path.to_path_buf(), size, read_only, block_device })
    }

    fn err(&self, e: &io::Error, what: impl std::fmt::Display) -> ExportError {
        ExportError::from_io(e, format_args!("{}: {what}", self.path.display()))
    }

    /// `fallocate` with `mode` over the range; `Ok(false)` when the file system cannot.
    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> ExportResult<bool> {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(ExportError::new(ErrorKind::Invalid, "range beyond what the OS addresses"));
        };
        // SAFETY: fallocate takes integers only; the descriptor lives as long as `self`.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV) => Ok(false),
            // Block devices refuse some modes with EINVAL.
            Some(libc::EINVAL) if self.block_device => Ok(false),
            _ => Err(self.err(&e, format_args!("fallocate {length} bytes at {offset}"))),
        }
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek takes integers only; the descriptor lives as long as `self`.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // No cache of its own: every connection sees the same page cache.
        Capabilities { read_only: self.read_only, trim: true, fast_zero: true, multi_conn: true }
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    fn description(&self) -> Option<String> {
        Some(format!("raw {}", if self.block_device { "block device" } else { "file" }))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ExportResult<()> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            // The file shrank under the export: what is gone reads as zeros would be
            // a lie; say it failed.
            Err(e) => Err(self.err(&e, format_args!("read {} bytes at {offset}", buf.len()))),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> ExportResult<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err(&e, format_args!("write {} bytes at {offset}", buf.len())))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> ExportResult<()> {
        self.file.sync_data().map_err(|e| self.err(&e, "fsync"))
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> ExportResult<()> {
        if length == 0 {
            return Ok(());
        }
        // A trim that cannot free space is still a correct trim.
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, o: ZeroOptions) -> ExportResult<()> {
        if length == 0 {
            return Ok(());
        }
        let done = if o.may_trim {
            self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, length)?
                || self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, length)?
        } else {
            self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, length)?
        };
        if !done {
            if o.fast {
                return Err(ExportError::new(
                    ErrorKind::NotSupported,
                    "this file system zeroes only by writing zeros",
                ));
            }
            return write_zeroes_by_writes(self, offset, length, o.fua);
        }
        if o.fua {
            self.flush()?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64) -> ExportResult<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        if self.block_device {
            return Ok(vec![Extent { length: end - offset, flags: 0 }]);
        }
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < MAX_FILE_EXTENTS {
            let data = self.lseek(at, libc::SEEK_DATA).map_err(|e| self.err(&e, "SEEK_DATA"))?;
            match data {
                None => {
                    out.push(Extent { length: end - at, flags: STATE_HOLE | STATE_ZERO });
                    at = end;
                }
                Some(d) if d > at => {
                    let n = d.min(end) - at;
                    out.push(Extent { length: n, flags: STATE_HOLE | STATE_ZERO });
                    at += n;
                }
                Some(_) => {
                    let hole = self.lseek(at, libc::SEEK_HOLE).map_err(|e| self.err(&e, "SEEK_HOLE"))?;
                    let n = hole.unwrap_or(end).min(end).max(at + 1) - at;
                    out.push(Extent { length: n, flags: 0 });
                    at += n;
                }
            }
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, length: u64) -> ExportResult<()> {
        // SAFETY: posix_fadvise takes integers only; advice, never an error that matters.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                length as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
        Ok(())
    }
}
