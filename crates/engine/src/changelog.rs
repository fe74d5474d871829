//! Change logs: the host-side staging file of one disk for one cycle
//! (docs/formats/change-log.md, version 1). A cycle writes the changed extents of the
//! frozen view into a log, seals it (fsync, rename, fsync of the folder) and only then
//! drops the view; the sealed log is uploaded later and deleted once its point is
//! committed.
//!
//! [`LogWriter`] writes `<seq>.tlog.partial` and renames it to `<seq>.tlog` at
//! [`LogWriter::seal`]: a `.tlog` is complete or absent. [`LogReader::open`] checks
//! the whole file (digests, order, bounds, counts) before it gives out a record.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"TERNLOG\x01";
const TRAILER_MAGIC: &[u8; 8] = b"TERNLEND";
const HEADER_LEN: u64 = 96;
const TRAILER_LEN: u64 = 64;
const RECORD_LEN: u64 = 16;
/// Largest record (and largest `data` call).
pub const MAX_RECORD: u64 = 64 << 20;
const SECTOR: u64 = 512;

/// Kind of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The bytes follow in the log.
    Data,
    /// The range reads as zeros (write-zeroes, discard, or data that was all zero).
    Zero,
}

/// What a log is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// The VM's 128-bit id.
    pub vm_id: [u8; 16],
    /// The disk's index in the VM.
    pub disk: u32,
    /// The cycle's sequence number.
    pub seq: u64,
    /// The cut's instant, milliseconds since the Unix epoch (UTC).
    pub instant_ms: u64,
    /// The disk's virtual size at the cut.
    pub virtual_size: u64,
    /// The tracking granularity (a power of two).
    pub granularity: u64,
}

impl LogHeader {
    fn to_bytes(self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..24].copy_from_slice(&self.vm_id);
        b[24..28].copy_from_slice(&self.disk.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.instant_ms.to_le_bytes());
        b[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.granularity.to_le_bytes());
        let d = blake3::hash(&b[..64]);
        b[64..96].copy_from_slice(d.as_bytes());
        b
    }
}

/// The file names of cycle `seq`'s log in `dir`: (partial, sealed).
pub fn log_paths(dir: &Path, seq: u64) -> (PathBuf, PathBuf) {
    (dir.join(format!("{seq:020}.tlog.partial")), dir.join(format!("{seq:020}.tlog")))
}

/// Counts of a sealed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedLog {
    /// The sealed file.
    pub path: PathBuf,
    /// Records.
    pub records: u64,
    /// Sum of record lengths.
    pub changed_bytes: u64,
    /// Sum of data record lengths (bytes of guest data in the file).
    pub data_bytes: u64,
    /// The file's length.
    pub file_bytes: u64,
}

/// Writes one change log.
pub struct LogWriter {
    out: BufWriter<File>,
    partial: PathBuf,
    sealed: PathBuf,
    header: LogHeader,
    hasher: blake3::Hasher,
    records: u64,
    changed: u64,
    data: u64,
    end: u64,
    written: u64,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    // A full file system is a backlog, not a failure: the changes stay tracked.
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        return Error::new(
            ErrorKind::Busy,
            format!("change log {}: {what}: the file system is full", path.display()),
        );
    }
    Error::new(ErrorKind::Io, format!("change log {}: {what}: {e}", path.display()))
}

impl LogWriter {
    /// Start the log of cycle `header.seq` in `dir` (created if missing, mode 0700).
    /// A `.partial` left by a killed run is replaced.
    pub fn create(dir: &Path, header: LogHeader) -> Result<LogWriter> {
        if !header.granularity.is_power_of_two() || !header.virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "change log: granularity {} must be a power of two and size {} whole sectors",
                    header.granularity, header.virtual_size
                ),
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, "create the folder", e))?;
        let (partial, sealed) = log_paths(dir, header.seq);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(|e| io_err(&partial, "create", e))?;
        let mut w = LogWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            partial,
            sealed,
            header,
            hasher: blake3::Hasher::new(),
            records: 0,
            changed: 0,
            data: 0,
            end: 0,
            written: 0,
        };
        w.put(&header.to_bytes())?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        self.out.write_all(bytes).map_err(|e| io_err(&self.partial, "write", e))
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let bad = |m: String| {
            Err(Error::new(ErrorKind::InvalidInput, format!("change log {}: {m}", self.partial.display())))
        };
        if len == 0 || len > MAX_RECORD || !len.is_multiple_of(SECTOR) || !offset.is_multiple_of(SECTOR) {
            return bad(format!("extent {offset}+{len} is not whole sectors of at most 64 MiB"));
        }
        if offset < self.end {
            return bad(format!("extent at {offset} is before the end of the previous one ({})", self.end));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.header.virtual_size) {
            return bad(format!(
                "extent {offset}+{len} is past the disk's {} bytes",
                self.header.virtual_size
            ));
        }
        Ok(())
    }

    fn record(&mut self, offset: u64, len: u64, kind: RecordKind) -> Result<()> {
        let mut r = [0u8; RECORD_LEN as usize];
        r[..8].copy_from_slice(&offset.to_le_bytes());
        r[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        r[12] = match kind {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
        };
        self.put(&r)?;
        self.records += 1;
        self.changed += len;
        self.end = offset + len;
        Ok(())
    }

    /// Record the guest bytes `bytes` at `offset`; all-zero bytes become a zero record.
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let len = bytes.len() as u64;
        self.check(offset, len)?;
        if tern_disk::is_zero(bytes) {
            return self.record(offset, len, RecordKind::Zero);
        }
        self.record(offset, len, RecordKind::Data)?;
        self.put(bytes)?;
        self.data += len;
        Ok(())
    }

    /// Record that `[offset, offset + len)` reads as zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.record(offset, len, RecordKind::Zero)
    }

    /// Bytes written so far (for the log space budget).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Write the trailer, fsync, rename to the sealed name, fsync the folder.
    pub fn seal(mut self) -> Result<SealedLog> {
        let mut t = [0u8; TRAILER_LEN as usize];
        t[..8].copy_from_slice(TRAILER_MAGIC);
        t[8..16].copy_from_slice(&self.records.to_le_bytes());
        t[16..24].copy_from_slice(&self.changed.to_le_bytes());
        t[24..32].copy_from_slice(&self.data.to_le_bytes());
        self.hasher.update(&t[..32]);
        let d = self.hasher.finalize();
        t[32..].copy_from_slice(d.as_bytes());
        self.out.write_all(&t).map_err(|e| io_err(&self.partial, "write", e))?;
        self.written += TRAILER_LEN;
        let file = self.out.into_inner().map_err(|e| io_err(&self.partial, "write", e.into_error()))?;
        file.sync_all().map_err(|e| io_err(&self.partial, "fsync", e))?;
        std::fs::rename(&self.partial, &self.sealed)
            .map_err(|e| io_err(&self.sealed, "rename into place", e))?;
        if let Some(dir) = self.sealed.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, "fsync the folder", e))?;
        }
        Ok(SealedLog {
            path: self.sealed,
            records: self.records,
            changed_bytes: self.changed,
            data_bytes: self.data,
            file_bytes: self.written,
        })
    }
}

/// One record of a sealed log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data or zero.
    pub kind: RecordKind,
    /// Where the data starts in the file (data records).
    file_offset: u64,
}

/// A sealed log, checked whole when opened.
#[derive(Debug)]
pub struct LogReader {
    file: File,
    path: PathBuf,
    header: LogHeader,
    records: Vec<Record>,
}

impl LogReader {
    /// Open and check the sealed log at `path`.
    pub fn open(path: &Path) -> Result<LogReader> {
        let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("change log {}: {m}", path.display()));
        let mut file = File::open(path).map_err(|e| io_err(path, "open", e))?;
        let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
        let mut h = [0u8; HEADER_LEN as usize];
        let first = file.read(&mut h[..8]).map_err(|e| io_err(path, "read the header", e))?;
        if first < 7 || h[..7] != MAGIC[..7] {
            return Err(bad("not a tern change log (wrong magic)".into()));
        }
        if first == 8 && h[7] != MAGIC[7] {
            return Err(bad(format!("version {} is not supported (this tern reads version 1)", h[7])));
        }
        if len < HEADER_LEN + TRAILER_LEN {
            return Err(bad(format!("{len} bytes is shorter than a header and a trailer")));
        }
        file.read_exact(&mut h[first..]).map_err(|e| io_err(path, "read the header", e))?;
        if blake3::hash(&h[..64]).as_bytes() != &h[64..96] {
            return Err(bad("the header digest does not match".into()));
        }
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        if h[28..32] != [0; 4] {
            return Err(bad("a reserved header field is not zero".into()));
        }
        let header = LogHeader {
            vm_id: h[8..24].try_into().expect("16 bytes"),
            disk: u32::from_le_bytes(h[24..28].try_into().expect("4 bytes")),
            seq: u64_at(&h, 32),
            instant_ms: u64_at(&h, 40),
            virtual_size: u64_at(&h, 48),
            granularity: u64_at(&h, 56),
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h);
        let body_end = len - TRAILER_LEN;
        let mut pos = HEADER_LEN;
        let mut records = Vec::new();
        let mut end = 0u64;
        let (mut changed, mut data) = (0u64, 0u64);
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &mut file);
        let mut buf = vec![0u8; 1 << 20];
        while pos < body_end {
            if body_end - pos < RECORD_LEN {
                return Err(bad(format!("a record header cut short at byte {pos}")));
            }
            let mut r = [0u8; RECORD_LEN as usize];
            reader.read_exact(&mut r).map_err(|e| io_err(path, "read", e))?;
            hasher.update(&r);
            let offset = u64_at(&r, 0);
            let length = u64::from(u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")));
            let kind = match r[12] {
                1 => RecordKind::Data,
                2 => RecordKind::Zero,
                k => return Err(bad(format!("record at byte {pos} has unknown kind {k}"))),
            };
            if r[13..16] != [0; 3] {
                return Err(bad(format!("record at byte {pos} has non-zero reserved bytes")));
            }
            if length == 0
                || length > MAX_RECORD
                || !length.is_multiple_of(SECTOR)
                || !offset.is_multiple_of(SECTOR)
            {
                return Err(bad(format!(
                    "record at byte {pos}: extent {offset}+{length} is not whole sectors of at most 64 MiB"
                )));
            }
            if offset < end {
                return Err(bad(format!(
                    "record at byte {pos}: offset {offset} overlaps or precedes the previous record"
                )));
            }
            if offset + length > header.virtual_size {
                return Err(bad(format!(
                    "record at byte {pos}: extent {offset}+{length} is past the disk's {} bytes",
                    header.virtual_size
                )));
            }
            pos += RECORD_LEN;
            let file_offset = pos;
            if kind == RecordKind::Data {
                if body_end - pos < length {
                    return Err(bad(format!("record at byte {} is cut short", pos - RECORD_LEN)));
                }
                let mut left = length;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    reader.read_exact(&mut buf[..n]).map_err(|e| io_err(path, "read", e))?;
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                pos += length;
                data += length;
            }
            changed += length;
            end = offset + length;
            records.push(Record { offset, length, kind, file_offset });
        }
        let mut t = [0u8; TRAILER_LEN as usize];
        reader.read_exact(&mut t).map_err(|e| io_err(path, "read the trailer", e))?;
        if &t[..8] != TRAILER_MAGIC {
            return Err(bad("the trailer is missing (the log was not sealed)".into()));
        }
        hasher.update(&t[..32]);
        if hasher.finalize().as_bytes() != &t[32..] {
            return Err(bad("the digest does not match: the log was changed or damaged".into()));
        }
        if u64_at(&t, 8) != records.len() as u64 || u64_at(&t, 16) != changed || u64_at(&t, 24) != data {
            return Err(bad("the trailer's counts disagree with the records".into()));
        }
        drop(reader);
        Ok(LogReader { file, path: path.to_path_buf(), header, records })
    }

    /// The header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The records, in offset order.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Read the data of `record` into `buf` (its length; zeros for a zero record).
    pub fn read(&self, record: &Record, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 != record.length {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "change log read: buffer length is not the record's",
            ));
        }
        match record.kind {
            RecordKind::Zero => buf.fill(0),
            RecordKind::Data => {
                self.file.read_exact_at(buf, record.file_offset).map_err(|e| io_err(&self.path, "read", e))?
            }
        }
        Ok(())
    }
}
