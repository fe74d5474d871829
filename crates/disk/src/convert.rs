//! Sparse-aware copy from any [`Disk`] into any new image.
//!
//! Ranges the source maps as zero or unallocated are neither read nor written; data
//! ranges are read in buffers and every all-zero 64 KiB piece of them is skipped too,
//! as `qemu-img convert` does by default, so the output is as sparse as the content.
//!
//! The disk is copied in aligned pieces. When the output format takes concurrent writes
//! ([`crate::DiskWriter::concurrent`]), several threads copy pieces at once so that
//! reading, decompressing and writing overlap (one thread per core, up to four);
//! otherwise one thread copies them in order.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{create_disk, CreateFormat, CreateOptions, Disk, Error, Result};

/// How large one piece (and one read) is. Large enough to amortise per-call costs,
/// small enough that memory stays flat whatever the disk size.
const PIECE: u64 = 2 << 20;
/// Granularity of zero detection inside data runs.
const ZERO_DETECT: usize = 64 << 10;
/// At most this many copy threads when the output takes concurrent writes (memory: one
/// piece each).
const MAX_THREADS: usize = 4;

/// Copy threads: one per core, up to [`MAX_THREADS`]. Copying from and into the page
/// cache is CPU work (the kernel's memcpy), and a file system serialises buffered writes
/// to one file: threads beyond the cores only spin on that lock (measured on ext4: 4
/// threads on 2 cores spent 28% of the copy's CPU spinning, and were slower than 2).
fn copy_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS)
}

/// Progress report: bytes of the guest handled so far and the total.
pub type ConvertProgress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// What to produce.
pub struct ConvertOptions<'a> {
    /// Output format.
    pub format: CreateFormat,
    /// Output virtual size; `None` keeps the source's. Must not be smaller than the source.
    pub virtual_size: Option<u64>,
    /// Called as pieces complete with (done, total).
    pub progress: Option<ConvertProgress<'a>>,
    /// fsync the output before returning (the default everywhere tern writes images);
    /// `false` is qemu-img's unsafe cache mode.
    pub sync: bool,
}

/// Copy the guest content of `src` into a new image at `dst` (which must not exist).
/// On error the partial output is removed.
pub fn convert(src: &dyn Disk, dst: &Path, options: &ConvertOptions<'_>) -> Result<()> {
    let info = src.info()?;
    if let Some(b) = &info.backing {
        if b.opened.is_none() {
            return Err(Error::backing(
                dst,
                format!("the source image has a backing file/parent {:?} that was not opened; allow backing files to copy its full content", b.name),
            ));
        }
    }
    let src_size = src.virtual_size();
    let size = options.virtual_size.unwrap_or(src_size);
    if size < src_size {
        return Err(Error::invalid(
            Some(dst),
            format!("output size {size} is smaller than the source's {src_size}"),
        ));
    }
    let mut writer = create_disk(dst, &CreateOptions { format: options.format, virtual_size: size })?;
    if !options.sync {
        writer.skip_sync();
    }
    let copied = match writer.concurrent() {
        Some(w) => copy_parallel(src, &|buf, off| w.write_at(buf, off), options),
        None => copy_sequential(src, writer.as_mut(), options),
    };
    let result = copied.and_then(|()| writer.finish());
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_sequential(
    src: &dyn Disk,
    writer: &mut dyn crate::DiskWriter,
    options: &ConvertOptions<'_>,
) -> Result<()> {
    let size = src.virtual_size();
    let mut buf = vec![0u8; PIECE as usize];
    let mut off = 0;
    while off < size {
        let end = (off + PIECE).min(size);
        copy_piece(src, off..end, &mut buf, &mut |data, at| writer.write_at(data, at))?;
        off = end;
        if let Some(p) = options.progress {
            p(off, size);
        }
    }
    Ok(())
}

fn copy_parallel(
    src: &dyn Disk,
    write: &(dyn Fn(&[u8], u64) -> Result<()> + Sync),
    options: &ConvertOptions<'_>,
) -> Result<()> {
    let size = src.virtual_size();
    let pieces = size.div_ceil(PIECE);
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..copy_threads().min(pieces.max(1) as usize) {
            scope.spawn(|| {
                let mut buf = vec![0u8; PIECE as usize];
                while !failed.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= pieces {
                        break;
                    }
                    let start = n * PIECE;
                    let end = (start + PIECE).min(size);
                    if let Err(e) = copy_piece(src, start..end, &mut buf, &mut |data, at| write(data, at)) {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().expect("error slot").get_or_insert(e);
                        break;
                    }
                    let total = done.fetch_add(end - start, Ordering::Relaxed) + (end - start);
                    if let Some(p) = options.progress {
                        p(total, size);
                    }
                }
            });
        }
    });
    match first_error.into_inner().expect("error slot") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Copy the guest bytes of `range` that are not known or found to be zero.
fn copy_piece(
    src: &dyn Disk,
    range: std::ops::Range<u64>,
    buf: &mut [u8],
    write: &mut dyn FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut off = range.start;
    while off < range.end {
        let m = src.mapping(off, range.end - off)?;
        if !m.kind.reads_as_zero() {
            let data = &mut buf[..m.length as usize];
            src.read_at(data, off)?;
            write_nonzero(write, data, off)?;
        }
        off += m.length;
    }
    Ok(())
}

/// Write the parts of `data` that are not all zero (checked in 64 KiB pieces),
/// coalescing adjacent non-zero pieces. For writers into a new image, where unwritten
/// ranges already read as zero: the output stays as sparse as the content.
pub fn write_nonzero(
    write: &mut dyn FnMut(&[u8], u64) -> Result<()>,
    data: &[u8],
    offset: u64,
) -> Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + ZERO_DETECT).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                write(&data[s..pos], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        write(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body = words.all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}
