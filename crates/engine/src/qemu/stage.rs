//! Staging a cut: the dirty extents of each disk's frozen view, read over NBD, copied
//! into that disk's change log and sealed, so the view can be released at once (its
//! copy-before-write window lasts as long as this local copy, not an upload).

use std::path::Path;
use std::time::Duration;

use tern_disk::nbd::{NbdClient, STATE_DIRTY};

use super::cut::FrozenDisk;
use crate::changelog::{LogHeader, LogWriter, SealedLog};
use crate::error::{Error, ErrorKind, Result};

/// Largest piece read and logged at once (memory per disk while staging).
const PIECE: u64 = 4 << 20;

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
    let ctx = format!("qemu:dirty-bitmap:{bitmap}");
    let nbd =
        |e: tern_disk::Error| Error::new(ErrorKind::Io, format!("disk {}: reading the cut: {e}", disk.node));
    let mut client = NbdClient::connect_unix(nbd_socket, &disk.export_name, &[&ctx], timeout).map_err(nbd)?;
    if client.size() != header.virtual_size {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "disk {}: the view has {} bytes, the log header says {}",
                disk.node,
                client.size(),
                header.virtual_size
            ),
        ));
    }
    let extents = client.extents(&ctx, 0, client.size()).map_err(nbd)?;
    let mut log = LogWriter::create(log_dir, header)?;
    let mut buf = vec![0u8; PIECE as usize];
    let over_budget = |log: &LogWriter| log.bytes_written() > budget;
    for e in extents.iter().filter(|e| e.flags & STATE_DIRTY != 0) {
        let mut at = e.offset;
        let end = e.offset + e.length;
        while at < end {
            let n = (end - at).min(PIECE);
            let b = &mut buf[..n as usize];
            client.read(b, at).map_err(nbd)?;
            if let Err(e) = log.data(at, b) {
                let partial = crate::changelog::log_paths(log_dir, header.seq).0;
                drop(log);
                let _ = std::fs::remove_file(partial);
                return Err(e);
            }
            at += n;
            if over_budget(&log) {
                let partial = crate::changelog::log_paths(log_dir, header.seq).0;
                drop(log);
                let _ = std::fs::remove_file(partial);
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("disk {}: the change log would exceed its budget of {budget} bytes; the changes stay in the bitmap", disk.node),
                ));
            }
        }
    }
    client.disconnect();
    log.seal()
}
