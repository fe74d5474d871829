//! Staging a cut: the dirty extents of each disk's frozen view, read over NBD, copied
//! into that disk's change log and sealed, so the view can be released at once (its
//! copy-before-write window lasts as long as this local copy, not an upload).

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use tern_disk::nbd::{NbdClient, NbdDisk, STATE_DIRTY};

use super::cut::FrozenDisk;
use crate::changelog::{LogHeader, SealedLog};
use crate::error::{Error, ErrorKind, Result};

/// The extents `bitmap` marks dirty on `disk`'s view, from NBD block status
/// (`qemu:dirty-bitmap:NAME`), merged where they touch.
pub fn dirty_extents(
    nbd_socket: &Path,
    disk: &FrozenDisk,
    bitmap: &str,
    timeout: Duration,
) -> Result<Vec<Range<u64>>> {
    let ctx = format!("qemu:dirty-bitmap:{bitmap}");
    let mut client = NbdClient::connect_unix(nbd_socket, &disk.export_name, &[&ctx], timeout)
        .map_err(|e| nbd_error(disk, e))?;
    let extents = client.extents(&ctx, 0, client.size()).map_err(|e| nbd_error(disk, e))?;
    client.disconnect();
    let mut out: Vec<Range<u64>> = Vec::new();
    for e in extents.iter().filter(|e| e.flags & STATE_DIRTY != 0) {
        match out.last_mut() {
            Some(last) if last.end == e.offset => last.end += e.length,
            _ => out.push(e.offset..e.offset + e.length),
        }
    }
    Ok(out)
}

fn nbd_error(disk: &FrozenDisk, e: tern_disk::Error) -> Error {
    Error::new(ErrorKind::Io, format!("disk {}: reading the cut: {e}", disk.node))
}

/// Copy the extents `disk`'s frozen bitmap marks dirty from its view into a new change
/// log in `log_dir`, and seal it. `header.virtual_size` must be the view's size.
/// `budget` bounds the log's size: over it, nothing is sealed (the partial log is
/// removed) and an error of kind `Busy` says so, so the caller keeps the changes in
/// the bitmap for the next cut.
pub fn stage_disk(
    nbd_socket: &Path,
    disk: &FrozenDisk,
    log_dir: &Path,
    header: LogHeader,
    budget: u64,
    timeout: Duration,
) -> Result<SealedLog> {
    let bitmap = disk.bitmap.as_ref().ok_or_else(|| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("disk {}: the first cut has no bitmap to stage", disk.node),
        )
    })?;
    let extents = dirty_extents(nbd_socket, disk, bitmap, timeout)?;
    let view = NbdDisk::open_unix(nbd_socket, &disk.export_name, timeout).map_err(|e| nbd_error(disk, e))?;
    crate::track::stage_extents(&view, &extents, log_dir, header, budget)
        .map_err(|e| e.context(format!("disk {}", disk.node)))
}
