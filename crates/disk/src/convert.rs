//! Sparse-aware copy from any [`Disk`] into any new image.
//!
//! Ranges the source maps as zero or unallocated are neither read nor written; data
//! ranges are read in buffers and every all-zero 64 KiB piece of them is skipped too,
//! as `qemu-img convert` does by default, so the output is as sparse as the content.

use std::path::Path;

use crate::{create_disk, CreateFormat, CreateOptions, Disk, Error, Result};

/// How large one read is. Large enough to amortise per-call costs, small enough that
/// memory stays flat whatever the disk size.
const COPY_BUFFER: usize = 2 << 20;
/// Granularity of zero detection inside data runs.
const ZERO_DETECT: usize = 64 << 10;

/// Progress report: bytes of the guest handled so far and the total.
pub type ConvertProgress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// What to produce.
pub struct ConvertOptions<'a> {
    /// Output format.
    pub format: CreateFormat,
    /// Output virtual size; `None` keeps the source's. Must not be smaller than the source.
    pub virtual_size: Option<u64>,
    /// Called after every buffer with (done, total).
    pub progress: Option<ConvertProgress<'a>>,
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
    let result = copy_into(src, writer.as_mut(), options).and_then(|()| writer.finish());
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn copy_into(src: &dyn Disk, writer: &mut dyn crate::DiskWriter, options: &ConvertOptions<'_>) -> Result<()> {
    let size = src.virtual_size();
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut off = 0u64;
    while off < size {
        let m = src.mapping(off, (size - off).min(COPY_BUFFER as u64))?;
        let len = m.length as usize;
        if !m.kind.reads_as_zero() {
            let data = &mut buf[..len];
            src.read_at(data, off)?;
            write_nonzero(writer, data, off)?;
        }
        off += m.length;
        if let Some(p) = options.progress {
            p(off, size);
        }
    }
    Ok(())
}

/// Write the parts of `data` that are not all zero, coalescing adjacent non-zero pieces.
fn write_nonzero(writer: &mut dyn crate::DiskWriter, data: &[u8], offset: u64) -> Result<()> {
    let mut run_start: Option<usize> = None;
    let mut pos = 0;
    while pos < data.len() {
        let end = (pos + ZERO_DETECT).min(data.len());
        let zero = is_zero(&data[pos..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(s)) => {
                writer.write_at(&data[s..pos], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    if let Some(s) = run_start {
        writer.write_at(&data[s..], offset + s as u64)?;
    }
    Ok(())
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let body = words.all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}
