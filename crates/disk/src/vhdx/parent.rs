//! Finding the parent of a differencing VHDX from its parent locator ([MS-VHDX]
//! 2.6.2.6): the paths it stores are tried in order (`relative_path` against the
//! child's folder, then the absolute ones), and a file found there is accepted only if
//! its `DataWriteGuid` is the child's `parent_linkage` (or `parent_linkage2`), since a
//! different file at the same path would silently give wrong data.

use std::path::{Path, PathBuf};

use super::guid::Guid;
use super::header::{read_headers, read_identifier};
use super::metadata::ParentLocator;
use crate::detect::{open_backing, resolve_backing};
use crate::io::ImageFile;
use crate::{Disk, Error, Format, OpenOptions, Result};

/// Locator keys that hold paths, in the order they are tried.
const PATH_KEYS: [&str; 3] = ["relative_path", "absolute_win32_path", "volume_path"];

/// Every locator entry that names a path, as `key "value"`, for messages and info.
pub(crate) fn describe(locator: &ParentLocator) -> Vec<String> {
    PATH_KEYS.iter().filter_map(|k| locator.get(k).map(|v| format!("{k} {v:?}"))).collect()
}

/// The first path-like locator value, used as the parent's name.
pub(crate) fn first_name(locator: &ParentLocator) -> String {
    PATH_KEYS.iter().find_map(|k| locator.get(k)).unwrap_or("").to_string()
}

/// The GUIDs a parent's `DataWriteGuid` may have.
fn linkages(child: &Path, locator: &ParentLocator) -> Result<Vec<Guid>> {
    let raw = locator
        .get("parent_linkage")
        .ok_or_else(|| Error::corrupt(child, "the parent locator has no parent_linkage"))?;
    let first = Guid::parse(raw).ok_or_else(|| {
        Error::corrupt(child, format!("parent locator: parent_linkage {raw:?} is not a GUID"))
    })?;
    let mut out = vec![first];
    out.extend(locator.get("parent_linkage2").and_then(Guid::parse));
    Ok(out)
}

/// Where a locator value points on this system, or why it cannot be used.
fn candidate(child: &Path, key: &str, value: &str) -> std::result::Result<PathBuf, &'static str> {
    // Windows separators; `.\` prefixes are plain relative paths.
    let unix = value.replace('\\', "/");
    if key == "relative_path" {
        return Ok(resolve_backing(child, &unix));
    }
    if unix.starts_with('/') && !unix.starts_with("//") {
        Ok(PathBuf::from(unix))
    } else {
        Err("not a path on this system")
    }
}

/// Open the parent named by `locator` (read-only, as the next link of `seen`).
pub(crate) fn open_parent(
    child: &ImageFile,
    locator: &ParentLocator,
    options: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<(Box<dyn Disk>, PathBuf)> {
    let path = child.path();
    let wanted = linkages(path, locator)?;
    let mut tried = Vec::new();
    let mut mismatches = Vec::new();
    for key in PATH_KEYS {
        let Some(value) = locator.get(key) else { continue };
        let p = match candidate(path, key, value) {
            Ok(p) => p,
            Err(why) => {
                tried.push(format!("{key} {value:?} ({why})"));
                continue;
            }
        };
        if !p.is_file() {
            tried.push(format!("{key} {value:?} (looked for {})", p.display()));
            continue;
        }
        let found = parent_data_write_guid(&p)?;
        if !wanted.contains(&found) {
            mismatches.push(format!(
                "{} (from {key}) has DataWriteGuid {found} but the child's parent_linkage is {}",
                p.display(),
                wanted[0]
            ));
            continue;
        }
        let canonical = p.canonicalize().map_err(|e| Error::io(&p, "resolve parent path", e))?;
        let name = canonical.to_str().ok_or_else(|| {
            Error::backing(path, format!("parent path {} is not UTF-8", canonical.display()))
        })?;
        let disk = open_backing(path, name, Some(Format::Vhdx), options, seen)?;
        return Ok((disk, canonical));
    }
    if !mismatches.is_empty() {
        return Err(Error::backing(
            path,
            format!(
                "parent refused: {} (the parent changed after the child was made)",
                mismatches.join("; ")
            ),
        ));
    }
    Err(Error::backing(
        path,
        format!(
            "parent not found: tried {}",
            if tried.is_empty() {
                "nothing (the parent locator holds no path)".to_string()
            } else {
                tried.join(", ")
            }
        ),
    ))
}

/// The `DataWriteGuid` of the VHDX at `p`, from its current header.
pub(crate) fn parent_data_write_guid(p: &Path) -> Result<Guid> {
    let f = ImageFile::open(p, false)?;
    read_identifier(&f)?;
    Ok(read_headers(&f)?.current.data_write_guid)
}
