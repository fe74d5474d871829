//! The byte layer under every format: an image file read and written at explicit
//! offsets (`pread`/`pwrite`), so a `&self` reader can be shared by many threads.
//!
//! Every read of metadata goes through [`ImageFile::read_exact_at`], which turns a short
//! read into a `Corrupt` error naming the offset and the file size: image files are
//! untrusted input and a truncated file is the most common way they are broken.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

/// An open image file with its path (for messages) and its length at open time.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    writable: bool,
    /// Whether [`ImageFile::sync`] really syncs (see [`ImageFile::set_sync`]).
    sync: AtomicBool,
    /// A second descriptor of the same file opened with `O_DIRECT`, once
    /// [`ImageFile::enable_direct`] succeeded: aligned writes go through it.
    direct: OnceLock<File>,
}

impl ImageFile {
    /// Open `path` for reading, or reading and writing.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, if writable { "open for writing" } else { "open" }, e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            writable,
            sync: AtomicBool::new(true),
            direct: OnceLock::new(),
        })
    }

    /// Create `path` (truncating nothing: it must not exist).
    pub fn create_new(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, "create", e))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            writable: true,
            sync: AtomicBool::new(true),
            direct: OnceLock::new(),
        })
    }

    /// The path the file was opened by.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was opened writable.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Current length of the file in bytes.
    pub fn len(&self) -> Result<u64> {
        self.file.metadata().map(|m| m.len()).map_err(|e| Error::io(&self.path, "stat", e))
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes the file occupies on its filesystem (st_blocks * 512).
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).map_err(|e| Error::io(&self.path, "stat", e))
    }

    /// Read exactly `buf.len()` bytes at `offset`; a short read is a `Corrupt` error
    /// ("truncated") because every caller reads something the image claims exists.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                let len = self.len().unwrap_or(0);
                Err(Error::corrupt(
                    &self.path,
                    format!(
                        "truncated: needs {} bytes at offset {offset} but the file is {len} bytes long",
                        buf.len()
                    ),
                ))
            }
            Err(e) => Err(Error::io(&self.path, format!("read {} bytes at offset {offset}", buf.len()), e)),
        }
    }

    /// Read up to `buf.len()` bytes at `offset`, zero-filling past the end of file.
    /// For data areas of formats (raw) where a short file means zeros.
    pub fn read_at_zero_fill(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, format!("read at offset {offset}"), e)),
            }
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`: straight to the device when direct I/O is on
    /// and the write is aligned ([`crate::AlignedBuf`]), through the page cache otherwise.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(direct) = self.direct.get().filter(|_| crate::aligned::is_direct_aligned(buf, offset)) {
            match direct.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                // A filesystem that opened with O_DIRECT but refuses this write: the
                // buffered descriptor writes the whole buffer (again, should a first
                // direct part have gone through).
                Err(e) if e.raw_os_error() == Some(direct_io::EINVAL) => {}
                Err(e) => {
                    return Err(Error::io(
                        &self.path,
                        format!("direct write of {} bytes at offset {offset}", buf.len()),
                        e,
                    ))
                }
            }
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, format!("write {} bytes at offset {offset}", buf.len()), e))
    }

    /// Whether [`ImageFile::write_all_at`] sends this write past the page cache.
    pub(crate) fn goes_direct(&self, buf: &[u8], offset: u64) -> bool {
        self.direct.get().is_some() && crate::aligned::is_direct_aligned(buf, offset)
    }

    /// Send aligned writes past the page cache from now on (`O_DIRECT` on a second
    /// descriptor): a large output then costs no page-cache copy and does not evict the
    /// host's cache, and its data is on the device as each write returns (the final
    /// [`ImageFile::sync`] still makes metadata durable). Unaligned writes keep using the
    /// page cache; the kernel keeps the two coherent. Whether it is on: `false` where the
    /// filesystem or platform has no direct I/O, which is no error.
    pub fn enable_direct(&self) -> bool {
        if self.direct.get().is_some() {
            return true;
        }
        let Some(flag) = direct_io::O_DIRECT else { return false };
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new().write(true).custom_flags(flag).open(&self.path) {
            Ok(f) => {
                let _ = self.direct.set(f);
                true
            }
            Err(_) => false,
        }
    }

    /// Set the file length.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io(&self.path, format!("set length to {len}"), e))
    }

    /// Flush data and metadata to stable storage.
    pub fn sync(&self) -> Result<()> {
        if !self.sync.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.file.sync_all().map_err(|e| Error::io(&self.path, "fsync", e))
    }

    /// Turn [`ImageFile::sync`] into a no-op (`false`), for outputs the user asked not
    /// to make durable (qemu-img's `-t unsafe`): a crash soon after may lose them.
    pub fn set_sync(&self, on: bool) {
        self.sync.store(on, Ordering::Relaxed);
    }

    /// Ask the kernel to start writing `len` bytes at `offset` back to disk now, without
    /// waiting (sync_file_range with SYNC_FILE_RANGE_WRITE). Writers of large images call
    /// it behind themselves so that the final [`ImageFile::sync`] has little left to
    /// wait for: durability overlaps the copy instead of following it. Advisory only:
    /// an error here is ignored, the final sync still decides.
    /// Nothing to start when the file will not be synced.
    pub fn start_writeback(&self, offset: u64, len: u64) {
        if !self.sync.load(Ordering::Relaxed) {
            return;
        }
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        libc_seek::start_writeback(&self.file, off, n);
    }

    /// Find the next data region at or after `offset` (SEEK_DATA); `None` past the last.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        self.lseek(offset, libc_seek::SEEK_DATA)
    }

    /// Find the next hole at or after `offset` (SEEK_HOLE); the end of file counts as a hole.
    pub fn seek_hole(&self, offset: u64) -> Result<Option<u64>> {
        self.lseek(offset, libc_seek::SEEK_HOLE)
    }

    fn lseek(&self, offset: u64, whence: i32) -> Result<Option<u64>> {
        let off =
            i64::try_from(offset).map_err(|_| Error::invalid(Some(&self.path), "offset out of range"))?;
        match libc_seek::lseek(&self.file, off, whence) {
            Ok(pos) => Ok(Some(pos)),
            Err(e) if e.raw_os_error() == Some(libc_seek::ENXIO) => Ok(None),
            Err(e) => Err(Error::io(&self.path, "seek for data/hole", e)),
        }
    }
}

/// Concurrent guest writes into a file that holds the guest bytes at a fixed offset
/// (raw images, fixed VHDs): a guest write is one `pwrite`, safe from any thread.
pub(crate) struct FixedLayoutWriter {
    pub(crate) file: Arc<ImageFile>,
    /// File offset of guest byte 0.
    pub(crate) data_offset: u64,
    /// Guest size in bytes.
    pub(crate) size: u64,
}

impl crate::ConcurrentWrite for FixedLayoutWriter {
    fn direct_io(&self) -> bool {
        // Guest offsets map to file offsets by a shift that keeps alignment only when
        // the shift is itself aligned (0 for raw and fixed VHD).
        self.data_offset.is_multiple_of(crate::DIRECT_ALIGN as u64) && self.file.enable_direct()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        crate::check_range(self.file.path(), offset, buf.len(), self.size)?;
        let at = self.data_offset + offset;
        // A direct write leaves nothing dirty to start writing back.
        let direct = self.file.goes_direct(buf, at);
        self.file.write_all_at(buf, at)?;
        if !direct {
            self.file.start_writeback(at, buf.len() as u64);
        }
        Ok(())
    }
}

/// The platform's `O_DIRECT` open flag (it differs between architectures), declared
/// here like the lseek values below rather than pulling in the libc crate.
mod direct_io {
    #[cfg(target_arch = "x86_64")]
    pub const O_DIRECT: Option<i32> = Some(0o40000);
    #[cfg(any(target_arch = "aarch64", target_arch = "arm"))]
    pub const O_DIRECT: Option<i32> = Some(0o200000);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    pub const O_DIRECT: Option<i32> = None;
    pub const EINVAL: i32 = 22;
}

/// The two lseek whence values std does not expose, declared here rather than pulling
/// in the libc crate for one function.
mod libc_seek {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    pub const SEEK_DATA: i32 = 3;
    pub const SEEK_HOLE: i32 = 4;
    pub const ENXIO: i32 = 6;

    extern "C" {
        #[link_name = "lseek64"]
        fn c_lseek(fd: i32, offset: i64, whence: i32) -> i64;
    }

    const SYNC_FILE_RANGE_WRITE: u32 = 2;

    extern "C" {
        fn sync_file_range(fd: i32, offset: i64, nbytes: i64, flags: u32) -> i32;
    }

    pub fn start_writeback(file: &File, offset: i64, len: i64) {
        // SAFETY: sync_file_range takes integers only; the fd is valid for the lifetime
        // of `file`; it changes no memory of this process.
        let _ = unsafe { sync_file_range(file.as_raw_fd(), offset, len, SYNC_FILE_RANGE_WRITE) };
    }

    pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<u64> {
        // SAFETY: lseek only reads its integer arguments; the fd is valid for the
        // lifetime of `file`, and lseek on an fd has no memory-safety effects.
        let r = unsafe { c_lseek(file.as_raw_fd(), offset, whence) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    }
}
