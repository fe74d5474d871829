//! The metadata log ([MS-VHDX] 2.3): a circular buffer of 4 KiB sectors holding
//! entries that describe pending writes to the file's metadata, replayed before use.
//!
//! Entry header (64 bytes at the start of the entry's first sector, 2.3.1.1):
//! `Signature "loge"` u32 @0, `Checksum` u32 @4 (CRC-32C over the whole entry with
//! this field zero), `EntryLength` u32 @8 (multiple of 4 KiB), `Tail` u32 @12 (log
//! offset of the first entry of the sequence), `SequenceNumber` u64 @16 (non-zero),
//! `DescriptorCount` u32 @24, reserved u32 @28, `LogGuid` @32, `FlushedFileOffset` u64
//! @48, `LastFileOffset` u64 @56. Descriptors (32 bytes each) follow the header, then
//! one data sector per data descriptor.
//!
//! Zero descriptor (2.3.1.2): `"zero"` @0, reserved u32 @4, `ZeroLength` u64 @8,
//! `FileOffset` u64 @16, `SequenceNumber` u64 @24. Data descriptor (2.3.1.3): `"desc"`
//! @0, `TrailingBytes` u32 @4, `LeadingBytes` u64 @8, `FileOffset` u64 @16,
//! `SequenceNumber` u64 @24. Data sector (2.3.1.4): `"data"` @0, `SequenceHigh` u32 @4,
//! 4084 bytes of data @8, `SequenceLow` u32 @4092; the 4 KiB written at `FileOffset` is
//! `LeadingBytes` + data + `TrailingBytes`.
//!
//! Replay (2.3.3): the active sequence is, among the runs of valid entries with
//! consecutive sequence numbers laid end to end, the one whose last entry (the head)
//! has the largest sequence number and whose head's `Tail` points at an entry of the
//! run; its entries are applied from the tail to the head. Invalid entries (bad
//! checksum, wrong GUID, torn sectors) are never part of a sequence, so a torn last
//! write is ignored as the spec intends.

use super::guid::Guid;
use super::le::{crc32c_with_hole, u32_at, u64_at};
use super::region_table::Region;
use super::MIB;
use crate::io::ImageFile;
use crate::{Error, Result};

/// Log sector size.
pub(crate) const LOG_SECTOR: u64 = 4096;
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
const DESC_SIGNATURE: &[u8; 4] = b"desc";
const DATA_SIGNATURE: &[u8; 4] = b"data";
/// Largest log tern reads into memory. Hyper-V and QEMU write 1 MiB logs.
const MAX_LOG: u64 = 64 * MIB;
/// Largest file a log entry may grow the image to: twice the largest virtual disk
/// ([MS-VHDX] 2.6.2.2, 64 TiB), room for every block plus any metadata. Beyond it the
/// entry is corrupt, not a file to create.
const MAX_FILE_SIZE: u64 = 2 * super::metadata::MAX_VIRTUAL_SIZE;
/// Bytes of log entries checksummed while searching for the active sequence, at
/// least: a hostile log of N sectors, each claiming to start an entry as long as the
/// log, would otherwise cost N times the log's length. A genuine log checks each
/// sector about once; stale entries from an earlier pass add a little.
const MIN_SCAN_BUDGET: u64 = 256 * MIB;

/// One write an entry describes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Data { file_offset: u64, sector: Box<[u8]> },
    Zero { file_offset: u64, length: u64 },
}

/// A validated log entry.
#[derive(Debug, Clone)]
struct Entry {
    start: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: Vec<Op>,
}

/// The entries to replay, tail first.
#[derive(Debug)]
pub(crate) struct Sequence {
    entries: Vec<Entry>,
}

impl Sequence {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Find the active sequence of the log at `log`, whose entries must carry `log_guid`.
/// `Ok(None)` when the log holds no valid sequence (nothing to replay).
pub(crate) fn find_active_sequence(
    file: &ImageFile,
    log: Region,
    log_guid: Guid,
) -> Result<Option<Sequence>> {
    if log.length == 0 {
        return Ok(None);
    }
    if log.length > MAX_LOG {
        return Err(Error::unsupported(
            file.path(),
            format!("the log is {} bytes long; tern replays logs up to {MAX_LOG} bytes", log.length),
        ));
    }
    let mut buf = vec![0u8; log.length as usize];
    file.read_exact_at(&mut buf, log.offset)?;
    let sectors = log.length / LOG_SECTOR;
    let mut budget = MIN_SCAN_BUDGET.max(8 * log.length);
    let mut entries: Vec<Option<Entry>> = Vec::with_capacity(sectors as usize);
    for s in 0..sectors {
        let entry = parse_entry(&buf, s * LOG_SECTOR, log_guid, &mut budget).map_err(|ScanBudgetSpent| {
            Error::corrupt(
                file.path(),
                format!(
                    "the log's entries overlap too much to search (more than {} bytes to checksum, at log sector {s})",
                    MIN_SCAN_BUDGET.max(8 * log.length)
                ),
            )
        })?;
        entries.push(entry);
    }

    let mut best: Option<Vec<usize>> = None;
    for s in 0..sectors as usize {
        let Some(first) = &entries[s] else { continue };
        // Follow entries laid end to end with consecutive sequence numbers, at most
        // once around the buffer.
        let mut run = vec![s];
        let (mut used, mut at, mut seq) =
            (first.length, (first.start + first.length) % log.length, first.sequence);
        while let Some(next) = &entries[(at / LOG_SECTOR) as usize] {
            if Some(next.sequence) != seq.checked_add(1) || used + next.length > log.length {
                break;
            }
            run.push((at / LOG_SECTOR) as usize);
            used += next.length;
            seq = next.sequence;
            at = (next.start + next.length) % log.length;
        }
        let head = entries[*run.last().expect("run has an entry")].as_ref().expect("valid entry");
        let Some(tail_pos) = run.iter().position(|&i| i as u64 * LOG_SECTOR == head.tail) else { continue };
        let candidate = run[tail_pos..].to_vec();
        let better = match &best {
            None => true,
            Some(b) => {
                let best_head = entries[*b.last().expect("non-empty")].as_ref().expect("valid").sequence;
                head.sequence > best_head
            }
        };
        if better {
            best = Some(candidate);
        }
    }
    Ok(best.map(|idx| Sequence {
        entries: idx.into_iter().map(|i| entries[i].clone().expect("valid entry")).collect(),
    }))
}

/// `parse_entry` ran out of its budget of bytes to checksum.
#[derive(Debug)]
struct ScanBudgetSpent;

/// Parse and validate the entry starting at log offset `start`; `Ok(None)` if there is
/// no valid entry there. The entry's bytes are taken from `budget` before they are
/// gathered and checksummed.
fn parse_entry(
    log: &[u8],
    start: u64,
    log_guid: Guid,
    budget: &mut u64,
) -> std::result::Result<Option<Entry>, ScanBudgetSpent> {
    let len = log.len() as u64;
    let h = &log[start as usize..(start + LOG_SECTOR) as usize];
    if &h[0..4] != ENTRY_SIGNATURE {
        return Ok(None);
    }
    let length = u64::from(u32_at(h, 8));
    let tail = u64::from(u32_at(h, 12));
    let sequence = u64_at(h, 16);
    let count = u64::from(u32_at(h, 24));
    if length == 0 || length % LOG_SECTOR != 0 || length > len || tail % LOG_SECTOR != 0 || tail >= len {
        return Ok(None);
    }
    if sequence == 0 || Guid::from_slice(&h[32..]) != log_guid {
        return Ok(None);
    }
    // Header and descriptors share the first sectors: 64 + 32 * count bytes.
    let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
    if desc_sectors > length / LOG_SECTOR {
        return Ok(None);
    }
    *budget = budget.checked_sub(length).ok_or(ScanBudgetSpent)?;
    // Gather the entry, which may wrap around the end of the buffer.
    let mut bytes = Vec::with_capacity(length as usize);
    for k in 0..length / LOG_SECTOR {
        let s = ((start + k * LOG_SECTOR) % len) as usize;
        bytes.extend_from_slice(&log[s..s + LOG_SECTOR as usize]);
    }
    if u32_at(&bytes, 4) != crc32c_with_hole(&bytes, 4) {
        return Ok(None);
    }
    let mut ops = Vec::with_capacity(count as usize);
    let mut data_sector = desc_sectors;
    for i in 0..count {
        let d = &bytes[(64 + 32 * i) as usize..(96 + 32 * i) as usize];
        let file_offset = u64_at(d, 16);
        if u64_at(d, 24) != sequence || !file_offset.is_multiple_of(LOG_SECTOR) {
            return Ok(None);
        }
        if &d[0..4] == ZERO_SIGNATURE {
            let length = u64_at(d, 8);
            if !length.is_multiple_of(LOG_SECTOR) {
                return Ok(None);
            }
            ops.push(Op::Zero { file_offset, length });
        } else if &d[0..4] == DESC_SIGNATURE {
            if data_sector >= length / LOG_SECTOR {
                return Ok(None);
            }
            let s = &bytes[(data_sector * LOG_SECTOR) as usize..((data_sector + 1) * LOG_SECTOR) as usize];
            let seq = (u64::from(u32_at(s, 4)) << 32) | u64::from(u32_at(s, 4092));
            if &s[0..4] != DATA_SIGNATURE || seq != sequence {
                return Ok(None);
            }
            let mut sector = vec![0u8; LOG_SECTOR as usize].into_boxed_slice();
            sector[0..8].copy_from_slice(&d[8..16]);
            sector[8..4092].copy_from_slice(&s[8..4092]);
            sector[4092..4096].copy_from_slice(&d[4..8]);
            ops.push(Op::Data { file_offset, sector });
            data_sector += 1;
        } else {
            return Ok(None);
        }
    }
    Ok(Some(Entry {
        start,
        length,
        tail,
        sequence,
        flushed_file_offset: u64_at(h, 48),
        last_file_offset: u64_at(h, 56),
        ops,
    }))
}

/// Apply `seq` to the file and flush. `protected` are ranges no entry may write
/// (the headers and the log itself); writes may not reach past the larger of the file
/// length and the entry's `LastFileOffset`.
pub(crate) fn replay(file: &ImageFile, seq: &Sequence, protected: &[(Region, &str)]) -> Result<()> {
    let path = file.path();
    for e in &seq.entries {
        let file_len = file.len()?;
        if e.flushed_file_offset > file_len {
            return Err(Error::corrupt(
                path,
                format!(
                    "log entry {} says the file was {} bytes when it was written, but it is {file_len}: the file was truncated",
                    e.sequence, e.flushed_file_offset
                ),
            ));
        }
        if e.last_file_offset > MAX_FILE_SIZE {
            return Err(Error::corrupt(
                path,
                format!(
                    "log entry {} says the file ends at {}, beyond any VHDX file ({MAX_FILE_SIZE} bytes)",
                    e.sequence, e.last_file_offset
                ),
            ));
        }
        let limit = file_len.max(e.last_file_offset);
        for op in &e.ops {
            let (off, len) = match op {
                Op::Data { file_offset, .. } => (*file_offset, LOG_SECTOR),
                Op::Zero { file_offset, length } => (*file_offset, *length),
            };
            let target = Region { offset: off, length: len };
            if off.checked_add(len).is_none_or(|end| end > limit) {
                return Err(Error::corrupt(
                    path,
                    format!("log entry {} writes {len} bytes at {off}, past the end of the file", e.sequence),
                ));
            }
            if let Some((_, what)) = protected.iter().find(|(r, _)| r.overlaps(&target)) {
                return Err(Error::corrupt(
                    path,
                    format!("log entry {} writes {len} bytes at {off}, over the {what}", e.sequence),
                ));
            }
            match op {
                Op::Data { sector, .. } => file.write_all_at(sector, off)?,
                Op::Zero { .. } => {
                    // Past the end of the file there is nothing to zero: growing the
                    // file (below) reads as zeros. So the bytes written are bounded by
                    // the file's length, not by a length the entry claims.
                    let end = (off + len).min(file.len()?);
                    let zeros = vec![0u8; MIB.min(end.saturating_sub(off)) as usize];
                    let mut at = off;
                    while at < end {
                        let n = (end - at).min(zeros.len() as u64);
                        file.write_all_at(&zeros[..n as usize], at)?;
                        at += n;
                    }
                }
            }
        }
        // Grow the file to what the entry says it was (zero-filled), rounded to the
        // 1 MiB every VHDX structure is aligned to; never shrink it. `last_file_offset`
        // is bounded above, so the rounding cannot overflow.
        let grown = e.last_file_offset.div_ceil(MIB) * MIB;
        if file.len()? < e.last_file_offset {
            file.set_len(grown)?;
        }
    }
    file.sync()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vhdx::le::{put_u32, put_u64};

    /// Build one log entry of `ops` at log offset `start` (tail = `tail`).
    pub(crate) fn build_entry(
        seq: u64,
        tail: u32,
        guid: Guid,
        ops: &[(u64, Option<[u8; 4096]>)],
        file_size: u64,
    ) -> Vec<u8> {
        let count = ops.len() as u64;
        let desc_sectors = (64 + 32 * count).div_ceil(LOG_SECTOR);
        let data = ops.iter().filter(|(_, d)| d.is_some()).count() as u64;
        let len = (desc_sectors + data) * LOG_SECTOR;
        let mut b = vec![0u8; len as usize];
        b[0..4].copy_from_slice(ENTRY_SIGNATURE);
        put_u32(&mut b, 8, len as u32);
        put_u32(&mut b, 12, tail);
        put_u64(&mut b, 16, seq);
        put_u32(&mut b, 24, count as u32);
        b[32..48].copy_from_slice(&guid.0);
        put_u64(&mut b, 48, file_size);
        put_u64(&mut b, 56, file_size);
        let mut ds = desc_sectors as usize;
        for (i, (off, d)) in ops.iter().enumerate() {
            let at = 64 + 32 * i;
            put_u64(&mut b, at + 16, *off);
            put_u64(&mut b, at + 24, seq);
            match d {
                Some(sector) => {
                    b[at..at + 4].copy_from_slice(DESC_SIGNATURE);
                    b[at + 4..at + 8].copy_from_slice(&sector[4092..]);
                    b[at + 8..at + 16].copy_from_slice(&sector[..8]);
                    let s = ds * 4096;
                    b[s..s + 4].copy_from_slice(DATA_SIGNATURE);
                    put_u32(&mut b, s + 4, (seq >> 32) as u32);
                    b[s + 8..s + 4092].copy_from_slice(&sector[8..4092]);
                    put_u32(&mut b, s + 4092, seq as u32);
                    ds += 1;
                }
                None => {
                    b[at..at + 4].copy_from_slice(ZERO_SIGNATURE);
                    put_u64(&mut b, at + 8, 4096);
                }
            }
        }
        let crc = crc32c_with_hole(&b, 4);
        put_u32(&mut b, 4, crc);
        b
    }

    fn parse(log: &[u8], start: u64, guid: Guid) -> Option<Entry> {
        let mut unlimited = u64::MAX;
        parse_entry(log, start, guid, &mut unlimited).expect("unbounded budget")
    }

    fn find(log: &[u8], guid: Guid) -> Option<Vec<u64>> {
        let sectors = log.len() as u64 / LOG_SECTOR;
        let entries: Vec<Option<Entry>> = (0..sectors).map(|s| parse(log, s * LOG_SECTOR, guid)).collect();
        entries.iter().flatten().next()?;
        Some(entries.iter().flatten().map(|e| e.sequence).collect())
    }

    #[test]
    fn entries_parse_and_torn_ones_do_not() {
        let guid = Guid::random().unwrap();
        let mut log = vec![0u8; MIB as usize];
        let mut sector = [7u8; 4096];
        sector[0] = 1;
        let e = build_entry(5, 0, guid, &[(3 * MIB, Some(sector)), (4 * MIB, None)], 8 * MIB);
        log[..e.len()].copy_from_slice(&e);
        let parsed = parse(&log, 0, guid).unwrap();
        assert_eq!(parsed.ops.len(), 2);
        assert_eq!(
            parsed.ops[0],
            Op::Data { file_offset: 3 * MIB, sector: sector.to_vec().into_boxed_slice() }
        );
        assert_eq!(find(&log, guid), Some(vec![5]));
        // Another GUID: not ours.
        assert!(parse(&log, 0, Guid::random().unwrap()).is_none());
        // A flipped data byte breaks the checksum.
        log[4096 + 100] ^= 1;
        assert!(parse(&log, 0, guid).is_none());
    }

    #[test]
    fn entry_wrapping_around_the_buffer_parses() {
        let guid = Guid::random().unwrap();
        let mut log = vec![0u8; MIB as usize];
        let e = build_entry(9, (MIB - 4096) as u32, guid, &[(3 * MIB, Some([3u8; 4096]))], 8 * MIB);
        assert_eq!(e.len(), 8192);
        log[(MIB - 4096) as usize..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        let parsed = parse(&log, MIB - 4096, guid).unwrap();
        assert_eq!(parsed.sequence, 9);
    }

    #[test]
    fn a_log_of_overlapping_entries_is_refused_instead_of_scanned_quadratically() {
        // Every sector claims an entry as long as the whole 64 MiB log: checksumming
        // each would cost 16384 x 64 MiB. The search gives up with an error instead.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = ImageFile::create_new(&path).unwrap();
        let guid = Guid::random().unwrap();
        file.set_len(MAX_LOG).unwrap();
        for s in 0..64u64 {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(ENTRY_SIGNATURE);
            put_u32(&mut h, 8, MAX_LOG as u32);
            put_u64(&mut h, 16, s + 1);
            h[32..48].copy_from_slice(&guid.0);
            file.write_all_at(&h, s * LOG_SECTOR).unwrap();
        }
        let e = find_active_sequence(&file, Region { offset: 0, length: MAX_LOG }, guid).unwrap_err();
        assert!(e.to_string().contains("overlap too much"), "{e}");
    }

    #[test]
    fn a_zero_descriptor_past_the_end_grows_the_file_without_writing_zeros() {
        // A zero descriptor of almost 64 GiB at 8 MiB in a 9 MiB file, the entry
        // saying the file is 64 GiB: the file grows (sparse), nothing is written past
        // its old end, and the one MiB that existed is zeroed.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let file = ImageFile::create_new(&path).unwrap();
        file.write_all_at(&vec![0xAB; 9 * MIB as usize], 0).unwrap();
        let guid = Guid::random().unwrap();
        let big = 64u64 << 30;
        let mut e = build_entry(3, 0, guid, &[(8 * MIB, None)], 9 * MIB);
        put_u64(&mut e, 56, big);
        put_u64(&mut e, 64 + 8, big - 8 * MIB);
        let crc = crc32c_with_hole(&e, 4);
        put_u32(&mut e, 4, crc);
        let mut log = vec![0u8; MIB as usize];
        log[..e.len()].copy_from_slice(&e);
        let entry = parse(&log, 0, guid).unwrap();
        let protected = [(Region { offset: 0, length: 4096 }, "headers")];
        replay(&file, &Sequence { entries: vec![entry] }, &protected).unwrap();
        assert_eq!(file.len().unwrap(), big);
        let mut b = vec![0u8; MIB as usize];
        file.read_exact_at(&mut b, 7 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 0xAB));
        file.read_exact_at(&mut b, 8 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(file.allocated_bytes().unwrap() < 64 * MIB, "the growth is sparse");

        // An entry claiming a file beyond any VHDX is corrupt.
        let mut e = build_entry(4, 0, guid, &[(8 * MIB, None)], 9 * MIB);
        put_u64(&mut e, 56, u64::MAX);
        let crc = crc32c_with_hole(&e, 4);
        put_u32(&mut e, 4, crc);
        log[..e.len()].copy_from_slice(&e);
        let entry = parse(&log, 0, guid).unwrap();
        let err = replay(&file, &Sequence { entries: vec![entry] }, &protected).unwrap_err();
        assert!(err.to_string().contains("beyond any VHDX file"), "{err}");
    }
}
