//! Format detection from magic numbers, and the one entry point that opens any image.

use std::path::{Path, PathBuf};

use crate::io::ImageFile;
use crate::{qcow2, raw, vhd, vhdx, Disk, Error, Format, OpenOptions, Result};

/// Guess the format of an open file from its magic numbers:
/// qcow2 `QFI\xfb` at 0; VHDX `vhdxfile` at 0; VHD `conectix` at 0 (dynamic, the
/// footer copy) or in the last 512 bytes (fixed; some old tools wrote a 511-byte
/// footer, so the last 511 bytes are checked too); anything else is raw.
pub fn detect_format(file: &ImageFile) -> Result<Format> {
    let len = file.len()?;
    let mut head = [0u8; 8];
    if len >= 8 {
        file.read_exact_at(&mut head, 0)?;
        if head[..4] == qcow2::MAGIC {
            return Ok(Format::Qcow2);
        }
        if &head == vhdx::FILE_SIGNATURE {
            return Ok(Format::Vhdx);
        }
        if &head == vhd::COOKIE {
            return Ok(Format::Vhd);
        }
    }
    for footer in [512u64, 511] {
        if len >= footer {
            let mut cookie = [0u8; 8];
            file.read_exact_at(&mut cookie, len - footer)?;
            if &cookie == vhd::COOKIE {
                return Ok(Format::Vhd);
            }
        }
    }
    Ok(Format::Raw)
}

/// Open an image, detecting its format unless `options.format` says.
pub fn open_disk(path: &Path, options: &OpenOptions) -> Result<Box<dyn Disk>> {
    open_chained(path, options.format, options, &mut Vec::new())
}

/// Open `path` as one link of a backing chain, as `format` if given, else detected.
/// `seen` holds the canonical paths of the images above it, so that a chain that names
/// itself is refused instead of recursing forever.
fn open_chained(
    path: &Path,
    format: Option<Format>,
    options: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Box<dyn Disk>> {
    let canonical = path.canonicalize().map_err(|e| Error::io(path, "open", e))?;
    if seen.contains(&canonical) {
        return Err(Error::backing(path, format!("backing chain loops back to {}", canonical.display())));
    }
    let max_depth = options.max_chain_depth.unwrap_or(crate::DEFAULT_MAX_CHAIN_DEPTH);
    if seen.len() >= max_depth {
        return Err(Error::backing(path, format!("backing chain is deeper than {max_depth} images")));
    }
    let file = ImageFile::open(path, options.writable && seen.is_empty())?;
    let format = match format {
        Some(f) => f,
        None => detect_format(&file)?,
    };
    seen.push(canonical);
    let disk: Result<Box<dyn Disk>> = match format {
        Format::Raw => raw::RawDisk::open(file).map(|d| Box::new(d) as Box<dyn Disk>),
        Format::Qcow2 => qcow2::Qcow2Disk::open(file, options, seen).map(|d| Box::new(d) as Box<dyn Disk>),
        Format::Vhd => vhd::VhdDisk::open(file, options, seen).map(|d| Box::new(d) as Box<dyn Disk>),
        Format::Vhdx => vhdx::VhdxDisk::open(file, options, seen).map(|d| Box::new(d) as Box<dyn Disk>),
    };
    seen.pop();
    disk
}

/// Resolve a backing/parent name stored in `child` the way qemu does: absolute names as
/// they are, relative names against the directory holding the child.
#[allow(dead_code)] // used by the formats with backing files as they land
pub(crate) fn resolve_backing(child: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        child.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Open the backing file / parent `name` of `child` (read-only), as one more link of the
/// chain `seen`. `format` is the format the child names for it, if any.
/// Formats call this only when `options.allow_backing` is set.
#[allow(dead_code)] // used by the formats with backing files as they land
pub(crate) fn open_backing(
    child: &Path,
    name: &str,
    format: Option<Format>,
    options: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<Box<dyn Disk>> {
    let path = resolve_backing(child, name);
    if !path.exists() {
        return Err(Error::backing(
            child,
            format!("backing file {name:?} not found (looked for {})", path.display()),
        ));
    }
    let options = OpenOptions { writable: false, ..options.clone() };
    open_chained(&path, format, &options, seen)
}
