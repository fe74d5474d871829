//! Journal segments (docs/formats/journal.md, version 1): the guest's writes to one
//! disk in the order they arrived, and the compiler that turns segments into one
//! change log of a cut.
//!
//! A [`SegmentWriter`] appends with positioned writes to a file opened without
//! buffering in tern: a record is in the page cache when [`SegmentWriter::append`]
//! returns, so a killed tern loses nothing that it acknowledged (a host crash loses
//! what was not yet fsynced, which [`SegmentWriter::sync`] makes durable).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::changelog::{LogHeader, LogWriter, SealedLog};
use crate::{Error, ErrorKind, Result};

const MAGIC: &[u8; 8] = b"TERNJNL\x01";
/// Header bytes.
pub const HEADER_LEN: u64 = 64;
/// Record header bytes.
pub const RECORD_LEN: u64 = 32;
/// Largest record: the largest write the sink accepts.
pub const MAX_RECORD: u64 = 32 << 20;
const SECTOR: u64 = 512;
/// Largest record of the compiled change log.
const LOG_PIECE: u64 = 4 << 20;

/// Kind of a journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bytes follow.
    Data,
    /// Write-zeroes: the range reads as zeros.
    Zero,
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::Busy,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("journal segment {}: {what}: {e}", path.display()))
}

/// What a segment is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The VM's 128-bit id.
    pub vm_id: [u8; 16],
    /// The disk's index.
    pub disk: u32,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// When the segment was opened, ms since the Unix epoch.
    pub opened_ms: u64,
}

impl SegmentHeader {
    fn to_bytes(self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[..8].copy_from_slice(MAGIC);
        b[8..24].copy_from_slice(&self.vm_id);
        b[24..28].copy_from_slice(&self.disk.to_le_bytes());
        b[32..40].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.opened_ms.to_le_bytes());
        let d = blake3::hash(&b[..48]);
        b[48..64].copy_from_slice(&d.as_bytes()[..16]);
        b
    }
}

/// Appends records to one segment file.
#[derive(Debug)]
pub struct SegmentWriter {
    file: Arc<File>,
    path: PathBuf,
    header: SegmentHeader,
    len: u64,
}

impl SegmentWriter {
    /// Create the segment at `path` (replacing a leftover one), mode 0600.
    pub fn create(path: &Path, header: SegmentHeader) -> Result<SegmentWriter> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| io_err(path, "create", e))?;
        file.write_all_at(&header.to_bytes(), 0).map_err(|e| io_err(path, "write the header", e))?;
        Ok(SegmentWriter { file: Arc::new(file), path: path.to_path_buf(), header, len: HEADER_LEN })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no record was appended.
    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// The file, for an fsync outside the appending lock.
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    /// Check a record's range: whole sectors, inside the disk, at most 32 MiB.
    pub fn check(&self, offset: u64, len: u64) -> std::result::Result<(), String> {
        if len == 0 || len > MAX_RECORD || !len.is_multiple_of(SECTOR) || !offset.is_multiple_of(SECTOR) {
            return Err(format!("write {offset}+{len} is not whole 512-byte sectors of at most 32 MiB"));
        }
        if offset.checked_add(len).is_none_or(|e| e > self.header.virtual_size) {
            return Err(format!(
                "write {offset}+{len} is past the disk's {} bytes",
                self.header.virtual_size
            ));
        }
        Ok(())
    }

    /// Append a record: `data` for a data record, `None` for zeros of `len` bytes.
    /// The range must pass [`SegmentWriter::check`].
    pub fn append(&mut self, offset: u64, len: u64, data: Option<&[u8]>, seq: u64) -> Result<()> {
        let mut r = [0u8; RECORD_LEN as usize];
        r[..8].copy_from_slice(&offset.to_le_bytes());
        r[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        r[12] = if data.is_some() { 1 } else { 2 };
        r[16..24].copy_from_slice(&seq.to_le_bytes());
        let mut crc = crc32c::crc32c(&r[..24]);
        if let Some(d) = data {
            crc = crc32c::crc32c_append(crc, d);
        }
        r[24..28].copy_from_slice(&crc.to_le_bytes());
        match data {
            Some(d) => self.write_two(&r, d)?,
            None => self.file.write_all_at(&r, self.len).map_err(|e| io_err(&self.path, "append", e))?,
        }
        self.len += RECORD_LEN + data.map_or(0, |d| d.len() as u64);
        Ok(())
    }

    /// Write a record header and its data at the end in one system call (`pwritev`),
    /// finishing with positioned writes if it comes up short.
    fn write_two(&self, header: &[u8], data: &[u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        let iov = [
            libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() },
            libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() },
        ];
        // SAFETY: both iovecs point into live slices of the lengths given, only read.
        let n = unsafe { libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), 2, self.len as libc::off_t) };
        if n < 0 {
            return Err(io_err(&self.path, "append", std::io::Error::last_os_error()));
        }
        let n = n as usize;
        let (h, d) = (header.len(), data.len());
        if n < h {
            self.file
                .write_all_at(&header[n..], self.len + n as u64)
                .map_err(|e| io_err(&self.path, "append", e))?;
        }
        if n < h + d {
            let from = n.saturating_sub(h);
            self.file
                .write_all_at(&data[from..], self.len + (h + from) as u64)
                .map_err(|e| io_err(&self.path, "append", e))?;
        }
        Ok(())
    }

    /// Make every appended record durable.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| io_err(&self.path, "fsync", e))
    }
}

/// One record of a segment, as read.
#[derive(Debug, Clone, Copy)]
struct Rec {
    offset: u64,
    len: u64,
    /// The data's position in the file; `None`: zeros.
    at: Option<u64>,
}

/// Read and check every record header (and its CRC) of the segment at `path`.
fn read_segment(path: &Path, vm_id: &[u8; 16], disk: u32, size: u64) -> Result<(File, Vec<Rec>)> {
    let bad = |m: String| Error::new(ErrorKind::Corrupt, format!("journal segment {}: {m}", path.display()));
    let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
    let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
    let mut h = [0u8; HEADER_LEN as usize];
    if len < HEADER_LEN {
        return Err(bad(format!("{len} bytes is shorter than the header")));
    }
    file.read_exact_at(&mut h, 0).map_err(|e| io_err(path, "read the header", e))?;
    if h[..7] != MAGIC[..7] {
        return Err(bad("not a tern journal segment (wrong magic)".into()));
    }
    if h[7] != MAGIC[7] {
        return Err(bad(format!("version {} is not supported (this tern reads version 1)", h[7])));
    }
    if blake3::hash(&h[..48]).as_bytes()[..16] != h[48..64] {
        return Err(bad("the header digest does not match".into()));
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    if &h[8..24] != vm_id
        || u32::from_le_bytes(h[24..28].try_into().expect("4 bytes")) != disk
        || u64_at(&h, 32) != size
    {
        return Err(bad(format!("it is not the segment of disk {disk} of this VM at {size} bytes")));
    }
    let mut recs = Vec::new();
    let mut pos = HEADER_LEN;
    let mut last_seq = None;
    let mut buf = Vec::new();
    while pos < len {
        if len - pos < RECORD_LEN {
            return Err(bad(format!("the file ends inside the record at byte {pos}")));
        }
        let mut r = [0u8; RECORD_LEN as usize];
        file.read_exact_at(&mut r, pos).map_err(|e| io_err(path, "read", e))?;
        let offset = u64_at(&r, 0);
        let rlen = u64::from(u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")));
        let seq = u64_at(&r, 16);
        let data = match r[12] {
            1 => true,
            2 => false,
            k => return Err(bad(format!("record at byte {pos} has unknown kind {k}"))),
        };
        if r[13..16] != [0; 3] || r[28..32] != [0; 4] {
            return Err(bad(format!("record at byte {pos} has non-zero reserved bytes")));
        }
        if rlen == 0 || rlen > MAX_RECORD || !rlen.is_multiple_of(SECTOR) || !offset.is_multiple_of(SECTOR) {
            return Err(bad(format!(
                "record at byte {pos}: {offset}+{rlen} is not whole sectors of at most 32 MiB"
            )));
        }
        if offset.checked_add(rlen).is_none_or(|e| e > size) {
            return Err(bad(format!(
                "record at byte {pos}: {offset}+{rlen} is past the disk's {size} bytes"
            )));
        }
        if last_seq.is_some_and(|l| seq <= l) {
            return Err(bad(format!("record at byte {pos}: sequence {seq} does not increase")));
        }
        last_seq = Some(seq);
        let body = if data { rlen } else { 0 };
        if len - pos - RECORD_LEN < body {
            return Err(bad(format!("the file ends inside the record at byte {pos}")));
        }
        let mut crc = crc32c::crc32c(&r[..24]);
        if data {
            buf.resize(rlen as usize, 0);
            file.read_exact_at(&mut buf, pos + RECORD_LEN).map_err(|e| io_err(path, "read", e))?;
            crc = crc32c::crc32c_append(crc, &buf);
        }
        if crc != u32::from_le_bytes(r[24..28].try_into().expect("4 bytes")) {
            return Err(bad(format!("record at byte {pos}: the CRC does not match")));
        }
        recs.push(Rec { offset, len: rlen, at: data.then_some(pos + RECORD_LEN) });
        pos += RECORD_LEN + body;
    }
    Ok((file, recs))
}

/// Where the newest bytes of a range come from.
#[derive(Debug, Clone, Copy)]
struct Src {
    /// Index of the file.
    file: usize,
    /// Position of the range's first byte in that file; `None`: zeros.
    at: Option<u64>,
}

/// Lay `[offset, end)` from `src` over `map` (start → (end, src)).
fn overlay(map: &mut BTreeMap<u64, (u64, Src)>, offset: u64, end: u64, src: Src) {
    // Pieces that start before `offset` and reach into it: cut, keep their tail.
    if let Some((&s, &(e, old))) = map.range(..offset).next_back() {
        if e > offset {
            map.insert(s, (offset, old));
            if e > end {
                let shift = end - s;
                map.insert(end, (e, Src { file: old.file, at: old.at.map(|a| a + shift) }));
            }
        }
    }
    // Pieces that start inside: removed, a tail past `end` kept.
    let inside: Vec<u64> = map.range(offset..end).map(|(&s, _)| s).collect();
    for s in inside {
        let (e, old) = map.remove(&s).expect("listed");
        if e > end {
            let shift = end - s;
            map.insert(end, (e, Src { file: old.file, at: old.at.map(|a| a + shift) }));
        }
    }
    map.insert(offset, (end, src));
}

/// Compile `segments` (laid over each other in order; the records of each in file
/// order) into the change log of `header` in `dir`, sealed. Segments must be closed.
pub fn compile(segments: &[PathBuf], dir: &Path, header: LogHeader) -> Result<SealedLog> {
    let mut files = Vec::new();
    let mut map: BTreeMap<u64, (u64, Src)> = BTreeMap::new();
    for (i, p) in segments.iter().enumerate() {
        let (file, recs) = read_segment(p, &header.vm_id, header.disk, header.virtual_size)?;
        for r in recs {
            overlay(&mut map, r.offset, r.offset + r.len, Src { file: i, at: r.at });
        }
        files.push(file);
    }
    let mut log = LogWriter::create(dir, header)?;
    let mut buf = Vec::new();
    for (&start, &(end, src)) in &map {
        match src.at {
            None => log.zero(start, end - start)?,
            Some(at) => {
                let mut o = start;
                while o < end {
                    let n = (end - o).min(LOG_PIECE);
                    buf.resize(n as usize, 0);
                    files[src.file]
                        .read_exact_at(&mut buf, at + (o - start))
                        .map_err(|e| io_err(&segments[src.file], "read", e))?;
                    log.data(o, &buf)?;
                    o += n;
                }
            }
        }
    }
    log.seal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changelog::{LogReader, RecordKind};

    fn header(size: u64) -> SegmentHeader {
        SegmentHeader { vm_id: [7; 16], disk: 0, virtual_size: size, opened_ms: 1 }
    }

    fn log_header(size: u64) -> LogHeader {
        LogHeader { vm_id: [7; 16], disk: 0, seq: 3, instant_ms: 5, virtual_size: size, granularity: 65536 }
    }

    /// Apply a compiled log to a buffer.
    fn apply(log: &Path, img: &mut [u8]) {
        let r = LogReader::open(log).unwrap();
        let mut buf = Vec::new();
        for rec in r.records() {
            let range = rec.offset as usize..(rec.offset + rec.length) as usize;
            match rec.kind {
                RecordKind::Zero => img[range].fill(0),
                RecordKind::Data => {
                    buf.resize(rec.length as usize, 0);
                    r.read(rec, &mut buf).unwrap();
                    img[range].copy_from_slice(&buf);
                }
            }
        }
    }

    #[test]
    fn later_writes_win_byte_for_byte_whatever_their_order_and_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let mut expect = vec![0xeeu8; size as usize];
        let mut got = expect.clone();
        let mut w = SegmentWriter::create(&dir.path().join("a.tjnl"), header(size)).unwrap();
        // A deterministic mix of overlapping writes and zeroes.
        let mut x = 1u64;
        for seq in 1..400u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size / 512) * 512;
            let len = ((x >> 8) % 64 + 1) * 512;
            let len = len.min(size - off);
            if x.is_multiple_of(7) {
                w.check(off, len).unwrap();
                w.append(off, len, None, seq).unwrap();
                expect[off as usize..(off + len) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..len).map(|i| (seq as u8) ^ (i as u8)).collect();
                w.append(off, len, Some(&data), seq).unwrap();
                expect[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        let log = compile(&[w.path().to_path_buf()], &dir.path().join("logs"), log_header(size)).unwrap();
        apply(&log.path, &mut got);
        assert!(got == expect, "the compiled log must give the last write of every byte");
    }

    #[test]
    fn a_later_segment_is_laid_over_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 10;
        let mut base = SegmentWriter::create(&dir.path().join("base.tjnl"), header(size)).unwrap();
        base.append(0, 8192, Some(&[1u8; 8192]), 1).unwrap();
        let mut seg = SegmentWriter::create(&dir.path().join("seg.tjnl"), header(size)).unwrap();
        seg.append(4096, 512, Some(&[2u8; 512]), 1).unwrap();
        let log = compile(
            &[base.path().to_path_buf(), seg.path().to_path_buf()],
            &dir.path().join("logs"),
            log_header(size),
        )
        .unwrap();
        let mut img = vec![9u8; size as usize];
        apply(&log.path, &mut img);
        assert!(img[..4096].iter().all(|&b| b == 1));
        assert!(img[4096..4608].iter().all(|&b| b == 2));
        assert!(img[4608..8192].iter().all(|&b| b == 1));
        assert!(img[8192..].iter().all(|&b| b == 9));
    }

    #[test]
    fn a_damaged_or_foreign_segment_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 << 10;
        let path = dir.path().join("s.tjnl");
        let mut w = SegmentWriter::create(&path, header(size)).unwrap();
        w.append(0, 512, Some(&[3u8; 512]), 1).unwrap();
        w.append(512, 512, Some(&[4u8; 512]), 2).unwrap();
        let logs = dir.path().join("logs");
        // A flipped data byte.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], HEADER_LEN + RECORD_LEN + 10).unwrap();
        let e = compile(std::slice::from_ref(&path), &logs, log_header(size)).unwrap_err();
        assert!(e.to_string().contains("CRC") && e.to_string().contains("s.tjnl"), "{e}");
        // Cut short inside a record.
        f.set_len(HEADER_LEN + RECORD_LEN + 100).unwrap();
        let e = compile(std::slice::from_ref(&path), &logs, log_header(size)).unwrap_err();
        assert!(e.to_string().contains("ends inside"), "{e}");
        // Another disk's segment.
        let other = dir.path().join("o.tjnl");
        SegmentWriter::create(&other, SegmentHeader { disk: 1, ..header(size) }).unwrap();
        let e = compile(&[other], &logs, log_header(size)).unwrap_err();
        assert!(e.to_string().contains("not the segment of disk 0"), "{e}");
    }
}
