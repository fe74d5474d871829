//! Format detection from magic numbers, and the one entry point that opens any image.

use std::path::{Path, PathBuf};

use crate::io::ImageFile;
use crate::{qcow2, raw, vhd, vhdx, Disk, Error, ErrorKind, Format, OpenOptions, Result};

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

/// The format a file name promises: `.qcow2`; `.vhd` / `.avhd`; `.vhdx` / `.avhdx`
/// (case-insensitive). Other names (`.raw`, `.img`, none, a block device) promise none.
pub fn format_from_name(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "qcow2" => Some(Format::Qcow2),
        "vhd" | "avhd" => Some(Format::Vhd),
        "vhdx" | "avhdx" => Some(Format::Vhdx),
        _ => None,
    }
}

/// What the bytes of a file that is not `expected` look like, for the error message.
fn found_instead(found: Format, expected: Format) -> String {
    let missing = match expected {
        Format::Qcow2 => "no qcow2 magic (\"QFI\\xfb\") at offset 0",
        Format::Vhdx => "no VHDX signature (\"vhdxfile\") at offset 0",
        Format::Vhd => "no VHD footer (the \"conectix\" cookie) in its last 512 bytes or at offset 0",
        Format::Raw => "",
    };
    match found {
        Format::Raw => {
            format!("{missing}: it is not a {expected} image (truncated, or another kind of file)")
        }
        other => format!("{missing}; its content is a {other} image"),
    }
}

/// The rules a detected image must pass (issue: "any file is accepted as a raw disk"):
/// a name that promises a format must hold that format, and a raw disk is whole 512-byte
/// sectors. `forced` is the format the caller gave, which overrides the name.
fn check_detected(path: &Path, file: &ImageFile, detected: Format, forced: Option<Format>) -> Result<()> {
    if forced.is_none() {
        if let Some(expected) = format_from_name(path) {
            if expected != detected {
                return Err(Error::new(
                    ErrorKind::NotADisk,
                    path.to_path_buf(),
                    format!(
                        "the name says {expected}, but the file has {}; if it is a raw disk after all, open it as raw",
                        found_instead(detected, expected)
                    ),
                ));
            }
        }
    }
    if detected == Format::Raw {
        let len = file.len()?;
        if len % SECTOR != 0 {
            return Err(Error::new(
                ErrorKind::NotADisk,
                path.to_path_buf(),
                format!(
                    "not a disk image: as a raw disk it would be {len} bytes, which is not a whole number of \
                     {SECTOR}-byte sectors (raw disks are; is this the right file?)"
                ),
            ));
        }
    }
    Ok(())
}

/// Sector size a raw disk's length must be a multiple of.
const SECTOR: u64 = 512;

/// Open an image, detecting its format unless `options.format` says. A detected format
/// must agree with what the file's name promises ([`format_from_name`]), and a raw disk
/// must be whole 512-byte sectors: otherwise an [`ErrorKind::NotADisk`] error says what
/// was expected and what was found.
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
    // A format given by the caller, or named by the child for its backing file, is
    // forced: the name then promises nothing.
    let forced = format;
    let format = match forced {
        Some(f) => f,
        None => detect_format(&file)?,
    };
    check_detected(path, &file, format, forced)?;
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
