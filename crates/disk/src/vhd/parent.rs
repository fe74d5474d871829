//! Parent locators of differencing disks, and opening the parent they name.
//!
//! VHD specification, "Dynamic Disk Header Format", fields "Parent Locator Entries":
//! each of the 8 entries names the parent on one platform. The platform codes:
//!
//! | code   | data                                                        |
//! |--------|-------------------------------------------------------------|
//! | `W2ru` | relative path, UTF-16LE (`.\parent.vhd`)                    |
//! | `W2ku` | absolute path, UTF-16LE (`C:\dir\parent.vhd`)               |
//! | `Wi2r` | relative path, deprecated, single-byte characters           |
//! | `Wi2k` | absolute path, deprecated, single-byte characters           |
//! | `MacX` | file URL, UTF-8 (`file://localhost/Users/x/parent.vhd`)     |
//! | `Mac ` | a Mac OS alias record (binary; not usable here)             |
//!
//! Locator data is untrusted: an image may name any file on the host, which is why
//! a parent is opened only with [`crate::OpenOptions::allow_backing`], and why the
//! parent found must carry the unique id the child expects.

use std::path::{Path, PathBuf};

use super::dynamic_header::DynamicHeader;
use super::footer::{self, fourcc};
use crate::detect::{open_backing, resolve_backing};
use crate::io::ImageFile;
use crate::{Disk, Error, Format, OpenOptions, Result};

/// Longest locator data accepted: 32 Ki UTF-16 units is the longest Windows path.
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// A decoded parent locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    /// Platform code as text (`W2ku`...).
    pub platform: String,
    /// The locator as stored, decoded to text (a path, a URL, or a description of
    /// binary data).
    pub text: String,
    /// The name to look up on this host, relative to the child's folder if relative;
    /// `None` when the locator cannot name a file here (a Mac alias).
    pub lookup: Option<String>,
}

/// Read and decode every used locator entry. Each entry's data must lie inside the
/// file.
pub fn read_locators(file: &ImageFile, header: &DynamicHeader) -> Result<Vec<Locator>> {
    let path = file.path();
    let file_len = file.len()?;
    let mut out = Vec::new();
    for (i, e) in header.locators.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let platform = fourcc(&e.platform);
        if e.data_length > MAX_LOCATOR_LEN {
            return Err(Error::corrupt(
                path,
                format!(
                    "VHD parent locator {i} ({platform}): data length {} is larger than {MAX_LOCATOR_LEN}",
                    e.data_length
                ),
            ));
        }
        let end = e.data_offset.checked_add(u64::from(e.data_length));
        if end.is_none_or(|end| end > file_len) {
            return Err(Error::corrupt(
                path,
                format!(
                    "VHD parent locator {i} ({platform}): {} bytes at offset {} run past the end of the file ({file_len} bytes)",
                    e.data_length, e.data_offset
                ),
            ));
        }
        let mut data = vec![0u8; e.data_length as usize];
        file.read_exact_at(&mut data, e.data_offset)?;
        out.push(decode(&e.platform, &platform, &data));
    }
    Ok(out)
}

fn utf16le(data: &[u8]) -> String {
    let units: Vec<u16> =
        data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    String::from_utf16_lossy(&units)
}

fn until_nul(data: &[u8]) -> &[u8] {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    &data[..end]
}

fn decode(code: &[u8; 4], platform: &str, data: &[u8]) -> Locator {
    let (text, lookup) = match code {
        b"W2ru" | b"W2ku" => {
            let t = utf16le(data);
            let l = windows_lookup(&t);
            (t, l)
        }
        b"Wi2r" | b"Wi2k" => {
            let t = String::from_utf8_lossy(until_nul(data)).into_owned();
            let l = windows_lookup(&t);
            (t, l)
        }
        b"MacX" => {
            let t = String::from_utf8_lossy(until_nul(data)).into_owned();
            let l = file_url_path(&t);
            (t, l)
        }
        _ => (format!("({} bytes of {platform} data)", data.len()), None),
    };
    Locator { platform: platform.to_string(), text, lookup }
}

/// How a Windows path is looked up on this host: relative paths with `\` turned into
/// `/` (resolved against the child's folder later); absolute `X:\...` paths cannot
/// exist here, so their file name is looked up next to the child, which is where
/// a copied disk chain usually ends up. The parent's unique id guards against
/// picking a wrong file this way.
fn windows_lookup(text: &str) -> Option<String> {
    if text.is_empty() {
        return None;
    }
    let unixy = text.replace('\\', "/");
    let b = text.as_bytes();
    let drive = b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':';
    if drive || unixy.starts_with("//") {
        return unixy.rsplit('/').next().filter(|n| !n.is_empty()).map(str::to_string);
    }
    Some(unixy.strip_prefix("./").unwrap_or(&unixy).to_string())
}

/// `file://host/path` → `/path` (percent escapes decoded).
fn file_url_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("file://")?;
    let path = &rest[rest.find('/')?..];
    let mut out = Vec::new();
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Find and open the parent of the differencing disk `child`, trying every locator
/// in order (relative ones first, since a copied chain keeps its relative layout), and
/// check that it is the parent the child was made from (unique id).
pub fn open_parent(
    child: &Path,
    header: &DynamicHeader,
    locators: &[Locator],
    options: &OpenOptions,
    seen: &mut Vec<PathBuf>,
) -> Result<(Box<dyn Disk>, PathBuf)> {
    let mut order: Vec<&Locator> = locators.iter().collect();
    order.sort_by_key(|l| !matches!(l.platform.as_str(), "W2ru" | "Wi2r"));
    let mut tried = Vec::new();
    for loc in order {
        let Some(name) = &loc.lookup else {
            tried.push(format!("{} \"{}\" (cannot be used on this host)", loc.platform, loc.text));
            continue;
        };
        let candidate = resolve_backing(child, name);
        if !candidate.is_file() {
            tried.push(format!("{} \"{}\" (looked for {})", loc.platform, loc.text, candidate.display()));
            continue;
        }
        check_unique_id(child, &candidate, &header.parent_unique_id)?;
        let disk = open_backing(child, name, Some(Format::Vhd), options, seen)?;
        return Ok((disk, candidate));
    }
    let tried =
        if tried.is_empty() { "the image stores no parent locator".to_string() } else { tried.join("; ") };
    Err(Error::backing(child, format!("parent not found: parent \"{}\"; tried {tried}", header.parent_name)))
}

/// The parent's footer must carry the unique id the child recorded when it was made;
/// anything else is another disk (or the parent recreated), whose sectors would be
/// silently wrong.
fn check_unique_id(child: &Path, parent: &Path, expected: &[u8; 16]) -> Result<()> {
    let file = ImageFile::open(parent, false)?;
    let located = footer::locate(&file).map_err(|e| {
        Error::backing(child, format!("parent {} is not a usable VHD: {e}", parent.display()))
    })?;
    if &located.footer.unique_id != expected {
        return Err(Error::backing(
            child,
            format!(
                "parent {} has unique id {} but the differencing disk expects {}: it is not the disk this one was made from",
                parent.display(),
                hex_id(&located.footer.unique_id),
                hex_id(expected)
            ),
        ));
    }
    Ok(())
}

/// A unique id as hex, in stored byte order.
pub fn hex_id(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_become_lookups() {
        assert_eq!(windows_lookup(r".\fat-parent.vhd").as_deref(), Some("fat-parent.vhd"));
        assert_eq!(windows_lookup(r"..\base\p.vhd").as_deref(), Some("../base/p.vhd"));
        assert_eq!(windows_lookup(r"C:\Projects\x\p.vhd").as_deref(), Some("p.vhd"));
        assert_eq!(windows_lookup(r"\\server\share\p.vhd").as_deref(), Some("p.vhd"));
        assert_eq!(windows_lookup(""), None);
    }

    #[test]
    fn file_urls_become_paths() {
        assert_eq!(file_url_path("file://localhost/Users/a%20b/p.vhd").as_deref(), Some("/Users/a b/p.vhd"));
        assert_eq!(file_url_path("file:///p.vhd").as_deref(), Some("/p.vhd"));
        assert_eq!(file_url_path("http://x/p.vhd"), None);
        assert_eq!(file_url_path("file://%"), None);
        assert_eq!(file_url_path("file://h/%4"), Some("/%4".to_string()));
    }
}
