//! Segments (docs/formats/segment.md): one cycle's changed extents of one disk, in
//! pieces of bounded size, each an envelope of kind `Segment`.
//!
//! [`split`] turns a sealed change log into pieces; [`Piece::encode`] and
//! [`Piece::decode`] are the plaintext format; [`Piece::apply`] overlays a piece on a
//! buffer holding a range of the disk, which is how the point reader reads.

use crate::changelog::{LogReader, RecordKind};
use crate::{Error, Result};

/// Magic and version of a piece's plaintext. NEVER CHANGE the magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TERNSEG\x01";
/// Fixed header bytes.
const HEADER: usize = 40;
/// Bytes per extent map entry.
const ENTRY: usize = 16;
/// Longest extent one map entry holds (the length field is 32 bits); longer runs are
/// split.
const MAX_EXTENT: u64 = u32::MAX as u64 & !511;

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes, stored in the piece.
    Data,
    /// Zeros (written zeros or discards), stored as nothing.
    Zero,
}

/// One run of a piece's extent map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Data or zero.
    pub kind: ExtentKind,
    /// Where its bytes start in the piece's data area (data extents).
    data_at: usize,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One piece of a segment, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Disk virtual size at the point.
    pub virtual_size: u64,
    /// The piece covers guest bytes `start..end`: its extents lie within, and the
    /// ranges of a segment's pieces do not overlap.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    extents: Vec<Extent>,
    data: Vec<u8>,
}

impl Piece {
    /// The extent map.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Guest bytes of data extents.
    pub fn data_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Guest bytes covered by extents (data and zero).
    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// The plaintext (docs/formats/segment.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + ENTRY * self.extents.len() + self.data.len());
        b.extend_from_slice(&SEGMENT_MAGIC);
        b.extend_from_slice(&self.virtual_size.to_le_bytes());
        b.extend_from_slice(&self.start.to_le_bytes());
        b.extend_from_slice(&self.end.to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for e in &self.extents {
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&(e.length as u32).to_le_bytes());
            b.push(match e.kind {
                ExtentKind::Data => 1,
                ExtentKind::Zero => 2,
            });
            b.extend_from_slice(&[0; 3]);
        }
        b.extend_from_slice(&self.data);
        b
    }

    /// Decode and check a plaintext; `what` names the object in errors.
    pub fn decode(b: &[u8], what: &str) -> Result<Piece> {
        let bad = |m: String| Error::corrupt(format!("{what}: {m}"));
        if b.len() < HEADER {
            return Err(bad(format!("{} bytes is shorter than a segment header", b.len())));
        }
        if b[..8] != SEGMENT_MAGIC {
            return Err(if b[..7] == SEGMENT_MAGIC[..7] {
                bad(format!("segment version {} is not supported (this tern reads version 1)", b[7]))
            } else {
                bad("not a segment (bad magic)".into())
            });
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let (virtual_size, start, end) = (u64_at(8), u64_at(16), u64_at(24));
        let count = u32_at(32) as usize;
        if u32_at(36) != 0 {
            return Err(bad("reserved header field is not zero".into()));
        }
        if start > end || end > virtual_size {
            return Err(bad(format!("range {start}..{end} is not within the disk's {virtual_size} bytes")));
        }
        let map_end = count
            .checked_mul(ENTRY)
            .and_then(|n| n.checked_add(HEADER))
            .filter(|&n| n <= b.len())
            .ok_or_else(|| bad(format!("{count} extents do not fit in {} bytes", b.len())))?;
        let mut extents = Vec::with_capacity(count);
        let mut data_at = 0usize;
        let mut prev_end = start;
        for i in 0..count {
            let o = HEADER + i * ENTRY;
            let (offset, length) = (u64_at(o), u64::from(u32_at(o + 8)));
            let kind = match b[o + 12] {
                1 => ExtentKind::Data,
                2 => ExtentKind::Zero,
                k => return Err(bad(format!("extent {i} has unknown kind {k}"))),
            };
            if b[o + 13..o + 16] != [0; 3] {
                return Err(bad(format!("extent {i}: reserved bytes are not zero")));
            }
            let e_end = offset.checked_add(length).filter(|&e| length > 0 && e <= end);
            if offset < prev_end || e_end.is_none() {
                return Err(bad(format!(
                    "extent {i} ({length} bytes at {offset}) is empty, out of order, overlapping or outside {start}..{end}"
                )));
            }
            prev_end = offset + length;
            extents.push(Extent { offset, length, kind, data_at });
            if kind == ExtentKind::Data {
                data_at += length as usize;
            }
        }
        if b.len() - map_end != data_at {
            return Err(bad(format!(
                "the map lists {data_at} data bytes, the piece holds {}",
                b.len() - map_end
            )));
        }
        Ok(Piece { virtual_size, start, end, extents, data: b[map_end..].to_vec() })
    }

    /// Overlay the piece on `buf`, which holds guest bytes `offset..offset + buf.len()`:
    /// every byte an extent covers takes the extent's content. Returns whether any data
    /// (non-zero-kind) byte was copied.
    pub fn apply(&self, buf: &mut [u8], offset: u64) -> bool {
        let end = offset + buf.len() as u64;
        if self.end <= offset || self.start >= end {
            return false;
        }
        let mut data = false;
        // The first extent that may overlap: extents are sorted and disjoint.
        let first = self.extents.partition_point(|e| e.end() <= offset);
        for e in self.extents[first..].iter().take_while(|e| e.offset < end) {
            let (a, z) = (e.offset.max(offset), e.end().min(end));
            let dst = &mut buf[(a - offset) as usize..(z - offset) as usize];
            match e.kind {
                ExtentKind::Zero => dst.fill(0),
                ExtentKind::Data => {
                    let from = e.data_at + (a - e.offset) as usize;
                    dst.copy_from_slice(&self.data[from..from + dst.len()]);
                    data = true;
                }
            }
        }
        data
    }
}

/// Builds pieces from extents in ascending order.
struct Builder {
    virtual_size: u64,
    max_data: usize,
    pieces: Vec<Piece>,
    current: Option<Piece>,
}

impl Builder {
    fn piece(&mut self, at: u64) -> &mut Piece {
        let vs = self.virtual_size;
        self.current.get_or_insert_with(|| Piece {
            virtual_size: vs,
            start: at,
            end: at,
            extents: Vec::new(),
            data: Vec::new(),
        })
    }

    fn close(&mut self) {
        if let Some(p) = self.current.take() {
            self.pieces.push(p);
        }
    }

    fn push(&mut self, offset: u64, length: u64, kind: ExtentKind, bytes: Option<&[u8]>) {
        // The map is bounded like the data: at most one entry per 16 data bytes allowed.
        if self.current.as_ref().is_some_and(|p| p.extents.len() >= self.max_data / ENTRY) {
            self.close();
        }
        let p = self.piece(offset);
        // Coalesce with the previous extent of the same kind when adjacent.
        match p.extents.last_mut() {
            Some(last) if last.end() == offset && last.kind == kind && last.length + length <= MAX_EXTENT => {
                last.length += length;
            }
            _ => {
                let data_at = p.data.len();
                p.extents.push(Extent { offset, length, kind, data_at });
            }
        }
        if let Some(b) = bytes {
            p.data.extend_from_slice(b);
        }
        p.end = offset + length;
    }

    fn zero(&mut self, mut offset: u64, end: u64) {
        while offset < end {
            let n = (end - offset).min(MAX_EXTENT);
            self.push(offset, n, ExtentKind::Zero, None);
            offset += n;
        }
    }

    /// Room for data in the current piece.
    fn room(&mut self, at: u64) -> usize {
        let max = self.max_data;
        let p = self.piece(at);
        if p.extents.len() >= max / ENTRY {
            return 0;
        }
        max - p.data.len().min(max)
    }
}

/// Split the records of a sealed change log into pieces of at most `max_data` data
/// bytes each (at least 512). Memory: one piece.
///
/// `each` receives every piece as it is completed, in ascending order; it returns an
/// error to stop.
pub fn split(
    log: &LogReader,
    max_data: usize,
    mut each: impl FnMut(u32, Piece) -> Result<()>,
) -> Result<u32> {
    let max_data = max_data.max(512);
    let mut b =
        Builder { virtual_size: log.header().virtual_size, max_data, pieces: Vec::new(), current: None };
    let mut count = 0u32;
    let mut emit = |b: &mut Builder| -> Result<()> {
        for p in b.pieces.drain(..) {
            each(count, p)?;
            count += 1;
        }
        Ok(())
    };
    let mut buf = Vec::new();
    for r in log.records() {
        match r.kind {
            RecordKind::Zero => b.zero(r.offset, r.offset + r.length),
            RecordKind::Data => {
                buf.resize(r.length as usize, 0);
                log.read(r, &mut buf)?;
                let mut done = 0usize;
                while done < buf.len() {
                    let at = r.offset + done as u64;
                    let room = b.room(at);
                    if room == 0 {
                        b.close();
                        continue;
                    }
                    let n = room.min(buf.len() - done).min(MAX_EXTENT as usize);
                    b.push(at, n as u64, ExtentKind::Data, Some(&buf[done..done + n]));
                    done += n;
                }
            }
        }
        emit(&mut b)?;
    }
    b.close();
    emit(&mut b)?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(extents: &[(u64, u64, ExtentKind)], fill: u8) -> Piece {
        let mut data = Vec::new();
        let mut out = Vec::new();
        for &(offset, length, kind) in extents {
            out.push(Extent { offset, length, kind, data_at: data.len() });
            if kind == ExtentKind::Data {
                data.extend((0..length).map(|i| fill.wrapping_add(i as u8)));
            }
        }
        Piece {
            virtual_size: 1 << 20,
            start: extents[0].0,
            end: extents.last().map(|e| e.0 + e.1).unwrap(),
            extents: out,
            data,
        }
    }

    #[test]
    fn pieces_round_trip_and_overlay() {
        let p = piece(
            &[(512, 1024, ExtentKind::Data), (4096, 512, ExtentKind::Zero), (8192, 100, ExtentKind::Data)],
            7,
        );
        let enc = p.encode();
        let q = Piece::decode(&enc, "t").unwrap();
        assert_eq!(p, q);
        assert_eq!(q.changed_bytes(), 1636);
        assert_eq!(q.data_bytes(), 1124);
        let mut buf = vec![0xeeu8; 8192];
        assert!(q.apply(&mut buf, 1024));
        // 1024..1536 from the first extent (its bytes 512..1024), then untouched, then
        // 4096..4608 zero.
        assert_eq!(buf[0], 7u8.wrapping_add(0));
        assert!(buf[..512].iter().enumerate().all(|(i, &b)| b == 7u8.wrapping_add((512 + i) as u8)));
        assert!(buf[512..3072].iter().all(|&b| b == 0xee));
        assert!(buf[3072..3584].iter().all(|&b| b == 0));
        assert!(buf[3584..7168].iter().all(|&b| b == 0xee));
        // The third extent (8192..8292): its own 100 bytes.
        assert!(buf[7168..7268].iter().enumerate().all(|(i, &b)| b == 7u8.wrapping_add(i as u8)));
        assert!(buf[7268..].iter().all(|&b| b == 0xee));
        let mut far = vec![1u8; 100];
        assert!(!q.apply(&mut far, 100_000));
        assert!(far.iter().all(|&b| b == 1));
    }

    #[test]
    fn malformed_pieces_are_refused() {
        let p = piece(&[(512, 1024, ExtentKind::Data), (4096, 512, ExtentKind::Zero)], 1);
        let enc = p.encode();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (enc[..20].to_vec(), "shorter"),
            (
                {
                    let mut b = enc.clone();
                    b[0] = b'X';
                    b
                },
                "magic",
            ),
            (
                {
                    let mut b = enc.clone();
                    b[7] = 9;
                    b
                },
                "version 9",
            ),
            (
                {
                    let mut b = enc.clone();
                    b[HEADER + 12] = 5;
                    b
                },
                "unknown kind",
            ),
            (
                {
                    let mut b = enc.clone();
                    b[HEADER + ENTRY..HEADER + ENTRY + 8].copy_from_slice(&600u64.to_le_bytes());
                    b
                },
                "overlapping",
            ),
            (
                {
                    let mut b = enc.clone();
                    b.pop();
                    b
                },
                "data bytes",
            ),
            (
                {
                    let mut b = enc.clone();
                    b[32] = 200;
                    b
                },
                "do not fit",
            ),
            (
                {
                    let mut b = enc.clone();
                    b[24..32].copy_from_slice(&(2u64 << 20).to_le_bytes());
                    b
                },
                "not within",
            ),
        ];
        for (bytes, want) in cases {
            let e = Piece::decode(&bytes, "piece 0").unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
            assert!(e.to_string().contains("piece 0"), "{e}");
        }
    }
}
