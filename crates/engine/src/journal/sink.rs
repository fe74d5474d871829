//! The sink of one disk: the NBD export QEMU's write-blocking mirror writes to.
//!
//! Every write is appended to the disk's open segment under the VM-wide lock, so that
//! a mark orders it before or after every other disk's writes, and the reply goes out
//! only after the append (a FUA write: after an fsync too). The sink never stalls
//! the guest on anything but that local append: a write it cannot take (over the
//! budget, out of shape, a failing file system) is refused at once, which ends the
//! mirror (QEMU never fails the guest's write for it, see docs/journal.md) and
//! marks the journal incomplete, so the next pass resyncs from QEMU's bitmap.
//!
//! The sink holds no disk content: a read (QEMU reads a target only to pad a write
//! that is not whole sectors, which a guest device never sends) and a discard (whose
//! effect on the source the sink cannot know) are refused the same way.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tern_nbd::{BlockSizes, Capabilities, Export, ExportError, ExportResult, ZeroOptions};

use super::segment::MAX_RECORD;
use super::Shared;

/// One disk's sink.
pub struct DiskSink {
    shared: Arc<Shared>,
    disk: usize,
    size: u64,
}

impl DiskSink {
    pub(crate) fn new(shared: Arc<Shared>, disk: usize, size: u64) -> DiskSink {
        DiskSink { shared, disk, size }
    }

    fn refuse(&self, kind: tern_nbd::ExportErrorKind, why: String) -> ExportError {
        self.shared.set_broken(format!("disk {}: {why}", self.disk));
        ExportError::new(kind, why)
    }

    /// Append one record (`data`, or zeros of `len`), then make it durable if `fua`.
    fn append(&self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) -> ExportResult<()> {
        let file = {
            let mut s = self.shared.lock();
            if let Some(why) = self.shared.broken() {
                return Err(ExportError::new(
                    tern_nbd::ExportErrorKind::Io,
                    format!("the journal is incomplete: {why}"),
                ));
            }
            let budget = self.shared.budget.load(Ordering::Relaxed);
            let seq = s.seq + 1;
            let w = &mut s.writers[self.disk];
            if let Err(why) = w.check(offset, len) {
                drop(s);
                return Err(self.refuse(tern_nbd::ExportErrorKind::Invalid, why));
            }
            let need = super::segment::RECORD_LEN + data.map_or(0, |d| d.len() as u64);
            if w.len() + need > budget {
                drop(s);
                return Err(self.refuse(
                    tern_nbd::ExportErrorKind::NoSpace,
                    format!("the journal segment would pass its budget of {budget} bytes"),
                ));
            }
            if let Err(e) = w.append(offset, len, data, seq) {
                drop(s);
                return Err(self.refuse(tern_nbd::ExportErrorKind::Io, e.to_string()));
            }
            s.seq = seq;
            fua.then(|| s.writers[self.disk].file())
        };
        if let Some(f) = file {
            if let Err(e) = f.sync_data() {
                return Err(
                    self.refuse(tern_nbd::ExportErrorKind::Io, format!("fsync of the journal segment: {e}"))
                );
            }
        }
        Ok(())
    }
}

impl Export for DiskSink {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        // Trim is advertised so that a discard reaches the sink and is refused (the
        // journal learns of it) instead of being dropped by QEMU's client unseen.
        Capabilities { read_only: false, trim: true, fast_zero: false, multi_conn: false }
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes { minimum: 512, preferred: 4096, maximum: MAX_RECORD as u32 }
    }

    fn description(&self) -> Option<String> {
        Some(format!("tern journal sink of disk {}", self.disk))
    }

    fn read_at(&self, _buf: &mut [u8], offset: u64) -> ExportResult<()> {
        Err(self.refuse(
            tern_nbd::ExportErrorKind::Io,
            format!("a read at {offset}: the journal's sink holds no disk content (a write that is not whole sectors?)"),
        ))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> ExportResult<()> {
        self.append(offset, buf.len() as u64, Some(buf), fua)
    }

    fn flush(&self) -> ExportResult<()> {
        let file = self.shared.lock().writers[self.disk].file();
        file.sync_data().map_err(|e| {
            self.refuse(tern_nbd::ExportErrorKind::Io, format!("fsync of the journal segment: {e}"))
        })
    }

    fn trim(&self, offset: u64, length: u64, _fua: bool) -> ExportResult<()> {
        Err(self.refuse(
            tern_nbd::ExportErrorKind::Io,
            format!("a discard of {offset}+{length}: what it leaves on the source is unknown to the journal"),
        ))
    }

    fn write_zeroes(&self, offset: u64, length: u64, options: ZeroOptions) -> ExportResult<()> {
        let end = offset.saturating_add(length);
        let mut o = offset;
        while o < end {
            let n = (end - o).min(MAX_RECORD);
            self.append(o, n, None, options.fua && o + n == end)?;
            o += n;
        }
        Ok(())
    }

    fn closed(&self, why: &str) {
        // QEMU holds the connection for as long as the mirror runs: its end means
        // writes from here on are not journaled.
        self.shared.set_broken(format!("disk {}: the mirror's connection ended ({why})", self.disk));
    }
}
