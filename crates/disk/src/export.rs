//! Any [`Disk`] as an NBD export ([`tern_nbd::Export`]), read-only: reads through
//! [`Disk::read_at`], `base:allocation` from [`Disk::mapping`] (zero and unallocated
//! runs are holes that read as zeros, as qemu-nbd reports them). Raw images are better
//! served by [`tern_nbd::FileExport`], which also writes.

use tern_nbd::proto::{STATE_HOLE, STATE_ZERO};
use tern_nbd::{
    Capabilities, Export, ExportError, ExportErrorKind as ErrorKind, ExportResult, Extent, ZeroOptions,
};

use crate::{Disk, Format, MapKind};

/// Most mapping runs one block status answer gathers.
const MAX_RUNS: usize = 1024;

/// A read-only export of an open image.
pub struct DiskExport {
    disk: Box<dyn Disk>,
    format: Format,
}

impl DiskExport {
    /// Export `disk`, whose container format is `format` (for the description).
    pub fn new(disk: Box<dyn Disk>, format: Format) -> Self {
        DiskExport { disk, format }
    }
}

fn export_error(e: crate::Error) -> ExportError {
    let kind = match e.kind() {
        crate::ErrorKind::InvalidInput => ErrorKind::Invalid,
        _ => ErrorKind::Io,
    };
    ExportError::new(kind, e.to_string())
}

fn read_only() -> ExportError {
    ExportError::new(ErrorKind::Permission, "the export is read-only")
}

impl Export for DiskExport {
    fn size(&self) -> u64 {
        self.disk.virtual_size()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: true, trim: false, fast_zero: false, multi_conn: true }
    }

    fn description(&self) -> Option<String> {
        Some(format!("{} image", self.format))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> ExportResult<()> {
        self.disk.read_at(buf, offset).map_err(export_error)
    }

    fn write_at(&self, _: &[u8], _: u64, _: bool) -> ExportResult<()> {
        Err(read_only())
    }

    fn flush(&self) -> ExportResult<()> {
        Ok(())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroOptions) -> ExportResult<()> {
        Err(read_only())
    }

    fn extents(&self, offset: u64, length: u64) -> ExportResult<Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.disk.virtual_size());
        let mut out = Vec::new();
        let mut at = offset;
        while at < end && out.len() < MAX_RUNS {
            let m = self.disk.mapping(at, end - at).map_err(export_error)?;
            let n = m.length.min(end - at).max(1);
            let flags = match m.kind {
                MapKind::Data => 0,
                MapKind::Zero | MapKind::Unallocated => STATE_HOLE | STATE_ZERO,
            };
            out.push(Extent { length: n, flags });
            at += n;
        }
        Ok(out)
    }
}
