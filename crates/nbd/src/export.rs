//! What the server exports: the [`Export`] trait, implemented by whatever holds the
//! bytes (a disk image, tern's journal sink, a recovery point), and the errors an
//! export returns, which become the protocol's error values.
//!
//! The server has already checked every request against [`Export::size`], the block
//! sizes and the read-only flag before it calls an export, so implementations need not
//! repeat those checks (they may, cheaply).

use std::io;

use crate::proto;

/// Why an export refused or failed a request; each kind is one NBD error value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `NBD_EIO`: the storage under the export failed.
    Io,
    /// `NBD_ENOSPC`: no space left (also for `EDQUOT` and `EFBIG`).
    NoSpace,
    /// `NBD_EPERM`: writing to something read-only.
    Permission,
    /// `NBD_EINVAL`: a request the export cannot take.
    Invalid,
    /// `NBD_ENOTSUP`: a fast zero that would not be fast.
    NotSupported,
    /// `NBD_EOVERFLOW`: a request too large to serve in one go.
    Overflow,
    /// `NBD_ESHUTDOWN`: the export is going away.
    Shutdown,
}

impl ErrorKind {
    /// The NBD error value.
    pub fn errno(self) -> u32 {
        match self {
            ErrorKind::Io => proto::EIO,
            ErrorKind::NoSpace => proto::ENOSPC,
            ErrorKind::Permission => proto::EPERM,
            ErrorKind::Invalid => proto::EINVAL,
            ErrorKind::NotSupported => proto::ENOTSUP,
            ErrorKind::Overflow => proto::EOVERFLOW,
            ErrorKind::Shutdown => proto::ESHUTDOWN,
        }
    }
}

/// An error of an [`Export`]: a kind (the NBD error sent) and a message (sent in the
/// structured error chunk when structured replies are on, and logged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ExportError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ExportError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ExportError { kind, message: message.into() }
    }

    /// An I/O error, classified by its OS error where it has one.
    pub fn from_io(e: &io::Error, context: impl std::fmt::Display) -> Self {
        // Linux errno values: EPERM 1, EACCES 13, EROFS 30, ENOSPC 28, EDQUOT 122,
        // EFBIG 27, EINVAL 22, EOPNOTSUPP 95.
        let kind = match e.raw_os_error() {
            Some(28 | 122 | 27) => ErrorKind::NoSpace,
            Some(1 | 13 | 30) => ErrorKind::Permission,
            Some(22) => ErrorKind::Invalid,
            Some(95) => ErrorKind::NotSupported,
            _ => ErrorKind::Io,
        };
        ExportError::new(kind, format!("{context}: {e}"))
    }
}

pub type ExportResult<T> = std::result::Result<T, ExportError>;

/// Size constraints of an export (`NBD_INFO_BLOCK_SIZE`; proto.md, Size constraints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this (a power of two, 1 ..= 64 KiB).
    pub minimum: u32,
    /// Requests of this alignment are efficient (a power of two, >= 512 and >= minimum).
    pub preferred: u32,
    /// The largest READ or WRITE payload taken (>= preferred).
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// What the protocol assumes when nothing is advertised: 1, 4096, 32 MiB.
    fn default() -> Self {
        BlockSizes { minimum: 1, preferred: 4096, maximum: proto::DEFAULT_MAX_PAYLOAD }
    }
}

impl BlockSizes {
    /// Whether these follow the protocol's rules for the three values.
    pub fn valid(&self) -> bool {
        self.minimum.is_power_of_two()
            && self.minimum <= 1 << 16
            && self.preferred.is_power_of_two()
            && self.preferred >= self.minimum.max(512)
            && self.maximum >= self.preferred
    }
}

/// A run of an export in `base:allocation` terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (at least 1).
    pub length: u64,
    /// [`proto::STATE_HOLE`] and/or [`proto::STATE_ZERO`], or 0 for data.
    pub flags: u32,
}

/// How an [`Export::write_zeroes`] may do its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroOptions {
    /// The range may be deallocated (the client did not set `NBD_CMD_FLAG_NO_HOLE`).
    pub may_trim: bool,
    /// Fail with [`ErrorKind::NotSupported`] rather than write zeros slowly
    /// (`NBD_CMD_FLAG_FAST_ZERO`); the content must then be left unchanged.
    pub fast: bool,
    /// Durable before the reply (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// What an export can do beyond reading, as advertised in the transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Writes (and trims, zeroes) are refused with `NBD_EPERM`.
    pub read_only: bool,
    /// [`Export::trim`] may free space (`NBD_FLAG_SEND_TRIM`).
    pub trim: bool,
    /// [`Export::write_zeroes`] can be fast (`NBD_FLAG_SEND_FAST_ZERO`).
    pub fast_zero: bool,
    /// Flushes and FUA on one connection are visible to all (`NBD_FLAG_CAN_MULTI_CONN`):
    /// true for an export that keeps no per-connection cache.
    pub multi_conn: bool,
}

/// Something served over NBD. Shared by every connection and request thread of the
/// server, so every method takes `&self` and may be called concurrently with others
/// (on disjoint or overlapping ranges: the client orders overlapping requests).
///
/// Ranges passed in are inside [`Export::size`], aligned to
/// [`BlockSizes::minimum`], and of at most [`BlockSizes::maximum`] bytes for reads and
/// writes (trim, zeroes and block status may be larger); writes reach only exports that
/// are not read-only.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Capabilities advertised to clients.
    fn capabilities(&self) -> Capabilities;

    /// Size constraints advertised to clients.
    fn block_sizes(&self) -> BlockSizes {
        BlockSizes::default()
    }

    /// A one-line description for `NBD_INFO_DESCRIPTION` (e.g. the image format).
    fn description(&self) -> Option<String> {
        None
    }

    /// Fill `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> ExportResult<()>;

    /// Write `buf` at `offset`; durable before returning when `fua`.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> ExportResult<()>;

    /// Make every write that has returned durable.
    fn flush(&self) -> ExportResult<()>;

    /// The client no longer needs `[offset, offset + length)`; its content is
    /// undefined until written again. Doing nothing is correct.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> ExportResult<()> {
        let _ = (offset, length, fua);
        Ok(())
    }

    /// Make `[offset, offset + length)` read as zeros.
    fn write_zeroes(&self, offset: u64, length: u64, options: ZeroOptions) -> ExportResult<()>;

    /// Runs of `[offset, offset + length)` (`base:allocation`): at least one extent,
    /// in order from `offset`, together not past `offset + length`. The default says
    /// "data" for the whole range, which is always correct.
    fn extents(&self, offset: u64, length: u64) -> ExportResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent { length, flags: 0 }])
    }

    /// The client will read `[offset, offset + length)` soon (`NBD_CMD_CACHE`).
    fn cache(&self, offset: u64, length: u64) -> ExportResult<()> {
        let _ = (offset, length);
        Ok(())
    }

    /// A client that used this export has gone, cleanly or not (`why` says how),
    /// after every reply to it was sent or abandoned. An export whose clients must
    /// never go unnoticed (the journal's sink) learns it here.
    fn closed(&self, why: &str) {
        let _ = why;
    }
}

/// Write zeros with ordinary writes, `chunk` bytes at a time: the fallback of exports
/// that have nothing faster (fast zero requests are refused before calling it).
pub fn write_zeroes_by_writes(export: &dyn Export, offset: u64, length: u64, fua: bool) -> ExportResult<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(length) as usize];
    let mut at = offset;
    let end = offset + length;
    while at < end {
        let n = (end - at).min(CHUNK) as usize;
        export.write_at(&zeros[..n], at, false)?;
        at += n as u64;
    }
    if fua {
        export.flush()?;
    }
    Ok(())
}
