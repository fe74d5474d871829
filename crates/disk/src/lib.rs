//! Disk image formats: raw, qcow2, VHD and VHDX.
//!
//! Every format answers the same two questions about a disk, through [`Disk`]:
//! *what bytes are at guest offset X* ([`Disk::read_at`]) and *what is at guest offset X,
//! for how long* ([`Disk::mapping`]: data, zero or unallocated). Copying, comparing and
//! later chunking are written once against those two questions, so a sparse copy of a
//! VHDX costs the same code as one of a qcow2.
//!
//! Writing goes through [`DiskWriter`], obtained from [`create_disk`]. Writers accept
//! writes at any guest offset and finish by writing the format's metadata; a writer
//! that is dropped without [`DiskWriter::finish`] leaves an image that must not be used.
//!
//! Layout: one folder per format (`raw/`, `qcow2/`, `vhd/`, `vhdx/`); [`open_disk`]
//! detects the format from magic numbers. Image metadata is untrusted: every size,
//! offset and count read from a file is checked before use, and backing files named
//! inside an image are opened only when [`OpenOptions::allow_backing`] says so.
//!
//! Invariants:
//! - `read_at` of any range inside the virtual size returns the guest's bytes; reads
//!   of unallocated ranges return the backing file's bytes, or zeros without one.
//! - `mapping` never reports `Zero` or `Unallocated` for a range whose bytes are not
//!   all zero (when no backing is opened); it may report `Data` for zeros.

mod aligned;
mod compare;
mod convert;
mod detect;
mod error;
mod export;
mod io;
mod mapping;
pub mod nbd;

pub mod qcow2;
pub mod raw;
pub mod vhd;
pub mod vhdx;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use compare::{compare, CompareOutcome};
pub use convert::{convert, is_zero, write_nonzero, ConvertOptions, ConvertProgress};
pub use detect::{detect_format, format_from_name, open_disk};
pub use error::{Error, ErrorKind, Result};
pub use export::DiskExport;
pub use io::ImageFile;
pub use mapping::{collect_map, MapKind, Mapping};
pub use qcow2::{qcow2_bitmap_extents, qcow2_bitmaps, StoredBitmap};

/// The image formats tern reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain file (or block device) holding the guest bytes.
    Raw,
    /// QEMU copy-on-write v2 or v3.
    Qcow2,
    /// Microsoft Virtual Hard Disk (fixed, dynamic, differencing).
    Vhd,
    /// Microsoft Virtual Hard Disk v2 (fixed, dynamic, differencing).
    Vhdx,
}

impl Format {
    /// The name used on the command line and in `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backing file (qcow2) or parent (VHD/VHDX differencing) named by an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackingInfo {
    /// The name as stored in the image (a path, relative or absolute; for VHD/VHDX the
    /// first usable parent locator).
    pub name: String,
    /// Every locator the image stores (VHD/VHDX keep several), for error messages.
    pub locators: Vec<String>,
    /// The format the image claims for it, if it says.
    pub format: Option<String>,
    /// The path it resolved to, if it was opened.
    pub opened: Option<PathBuf>,
}

/// What `tern disk info` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The container format.
    pub format: Format,
    /// Subformat: `fixed` / `dynamic` / `differencing` for VHD and VHDX, `v2` / `v3` for
    /// qcow2, `file` / `block-device` for raw.
    pub subformat: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes the image file occupies on its filesystem.
    pub allocated_bytes: u64,
    /// Length of the image file in bytes.
    pub file_size: u64,
    /// Allocation unit: qcow2 cluster, VHD/VHDX block size; `None` for raw.
    pub cluster_size: Option<u64>,
    /// Logical sector size the image declares (512 unless VHDX says 4096).
    pub logical_sector_size: u32,
    /// Backing file / parent, if the image names one.
    pub backing: Option<BackingInfo>,
    /// Format-specific facts worth showing (`compat`, `creator`, `compression`...), in order.
    pub details: Vec<(String, String)>,
}

/// Options for opening an existing image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-write. VHDX replays a pending log only when writable.
    pub writable: bool,
    /// Open the backing file / parent named inside the image. Image metadata is untrusted,
    /// so this is off unless the user asks for it. With it off, an image that names a
    /// backing file still opens (for `info` and `map`), reads its unallocated ranges as
    /// zeros and maps them `Unallocated`; [`ImageInfo::backing`] then has `opened: None`
    /// and whole-content operations (convert, compare) refuse it with a clear error.
    /// With it on, a missing parent is a `Backing` error naming every locator tried.
    pub allow_backing: bool,
    /// Force a format instead of detecting it.
    pub format: Option<Format>,
    /// How deep a backing chain may be before it is refused (loops are refused anyway).
    pub max_chain_depth: Option<usize>,
}

/// Default limit for backing chain depth.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 64;

impl OpenOptions {
    /// Read-only, no backing files.
    pub fn read_only() -> Self {
        Self::default()
    }
}

/// An open disk image. Shared across threads: reads take `&self`.
pub trait Disk: Send + Sync {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Fill `buf` with the guest bytes at `offset`. `offset + buf.len()` must not exceed
    /// the virtual size (an `InvalidInput` error otherwise).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// What is at `offset`, for how long: a run of one kind starting at `offset` of at
    /// least one byte and at most `max_len` bytes, clipped to the virtual size.
    /// `offset` must be below the virtual size.
    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping>;

    /// Facts about the image for `tern disk info`.
    fn info(&self) -> Result<ImageInfo>;
}

/// Output formats tern can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateFormat {
    /// Sparse raw file.
    Raw,
    /// qcow2 v3 with the given cluster size (a power of two, 512 B ..= 2 MiB).
    Qcow2 { cluster_size: u64 },
    /// Dynamic VHD with 2 MiB blocks.
    VhdDynamic,
    /// Fixed VHD: raw data followed by a footer.
    VhdFixed,
    /// Dynamic VHDX with the given block size (1 MiB ..= 256 MiB, power of two).
    Vhdx { block_size: u64 },
}

/// Options for creating an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Output format.
    pub format: CreateFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
}

/// Writes a new image. Writes may come in any order; bytes never written read as zero.
pub trait DiskWriter: Send {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Write `buf` at guest `offset`; `offset + buf.len()` must not exceed the virtual size.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Write the remaining metadata, flush, and fsync. The image is valid only after this.
    fn finish(self: Box<Self>) -> Result<()>;

    /// Skip the fsyncs of [`DiskWriter::finish`] (qemu-img convert's default cache mode
    /// is unsafe too): faster, but the image is not durable when `finish` returns.
    fn skip_sync(&mut self);

    /// A handle for writing guest data from several threads at once, offered by formats
    /// whose guest-to-file mapping is fixed when the image is created (raw, fixed VHD:
    /// nothing to allocate, nothing to lock) and by dynamic VHDX (only the block
    /// allocation is locked). `None` for the others.
    /// Writes through the handle must end before [`DiskWriter::finish`].
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentWrite>> {
        None
    }
}

/// Guest writes from many threads; see [`DiskWriter::concurrent`].
pub trait ConcurrentWrite: Send + Sync {
    /// Write `buf` at guest `offset`; `offset + buf.len()` must not exceed the virtual size.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// From now on, write buffers aligned to [`DIRECT_ALIGN`] (in memory, offset and
    /// length: [`AlignedBuf`] slices at aligned offsets) straight to the device,
    /// bypassing the page cache; other writes are unaffected. `false` when the file
    /// system or platform cannot, which is no error.
    fn direct_io(&self) -> bool {
        false
    }
}

/// Create a new image at `path` (which must not exist).
pub fn create_disk(path: &Path, options: &CreateOptions) -> Result<Box<dyn DiskWriter>> {
    match options.format {
        CreateFormat::Raw => Ok(Box::new(raw::RawWriter::create(path, options.virtual_size)?)),
        CreateFormat::Qcow2 { cluster_size } => {
            Ok(Box::new(qcow2::Qcow2Writer::create(path, options.virtual_size, cluster_size)?))
        }
        CreateFormat::VhdDynamic => Ok(Box::new(vhd::VhdWriter::create_dynamic(path, options.virtual_size)?)),
        CreateFormat::VhdFixed => Ok(Box::new(vhd::VhdWriter::create_fixed(path, options.virtual_size)?)),
        CreateFormat::Vhdx { block_size } => {
            Ok(Box::new(vhdx::VhdxWriter::create(path, options.virtual_size, block_size)?))
        }
    }
}

/// One piece of a guest access that lies within one block (cluster) of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockPiece {
    /// Block number.
    pub block: u64,
    /// Offset of the piece in its block.
    pub within: u64,
    /// Where the piece is in the caller's buffer (`pos = offset + buf.start`).
    pub buf: std::ops::Range<usize>,
}

/// An access of `len` bytes at guest `offset`, split at the boundaries of blocks of
/// `block_size` bytes, in order: the walk every block-mapped format does per read or
/// write.
pub(crate) fn block_pieces(offset: u64, len: usize, block_size: u64) -> impl Iterator<Item = BlockPiece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let within = pos % block_size;
        let n = usize::try_from(block_size - within).unwrap_or(usize::MAX).min(len - done);
        let piece = BlockPiece { block: pos / block_size, within, buf: done..done + n };
        done += n;
        Some(piece)
    })
}

/// Check a guest range against the virtual size; the common prologue of every read/write.
pub(crate) fn check_range(path: &Path, offset: u64, len: usize, virtual_size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= virtual_size => Ok(()),
        _ => Err(Error::invalid(
            Some(path),
            format!("access of {len} bytes at offset {offset} is beyond the virtual size {virtual_size}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_pieces_split_at_block_boundaries_and_cover_the_access() {
        let pieces: Vec<_> = block_pieces(1000, 5000, 2048).collect();
        let want = [(0, 1000, 0..1048), (1, 0, 1048..3096), (2, 0, 3096..5000)];
        assert_eq!(pieces.len(), want.len());
        for (p, (block, within, buf)) in pieces.iter().zip(want) {
            assert_eq!((p.block, p.within, p.buf.clone()), (block, within, buf));
        }
        assert_eq!(block_pieces(4096, 4096, 4096).count(), 1);
        assert_eq!(block_pieces(7, 0, 4096).count(), 0);
        // A block larger than any buffer: one piece.
        assert_eq!(block_pieces(1 << 40, 10, 1 << 41).next().unwrap().buf, 0..10);
    }
}
