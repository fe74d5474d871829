//! The point reader: one disk of a recovery point as of its instant, over its base
//! index and the segments since (docs/formats/segment.md, "How a manifest refers to
//! segments"). Migrate and verify read points only through it; it is also a
//! [`tern_disk::Disk`], for the NBD export.
//!
//! A byte reads from the newest segment whose extents cover it, else from the base
//! chunk. Every object is verified as it is read: the index against the manifest's
//! digest, chunks against their addresses, pieces against the manifest's digests and
//! ranges. Pieces are kept in a small cache (a sequential reader fetches each piece of
//! a segment once); memory is the cache plus the caller's chunk buffers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tern_chunk::{chunk_address, open_chunk_into, open_envelope, BaseIndex, IndexEntry, Key, ObjectKind};
use tern_disk::{MapKind, Mapping};
use tern_store::Store;

use crate::manifest::index_digest;
use crate::segment::Piece;
use crate::{Error, ErrorKind, ManifestDisk, Result};

/// Pieces kept decoded. A piece holds at most a chunk's worth of data, so this is at
/// most that many chunks of memory.
const PIECE_CACHE: usize = 8;

/// Decoded pieces by (segment, piece), oldest first.
type PieceCache = VecDeque<((usize, usize), Arc<Piece>)>;

/// One disk of a point, readable.
pub struct PointReader {
    key: Key,
    store: Store,
    rt: tokio::runtime::Handle,
    vm_id: String,
    point_id: String,
    disk: ManifestDisk,
    index: BaseIndex,
    cache: Mutex<PieceCache>,
}

impl std::fmt::Debug for PointReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PointReader({} point {} disk {})", self.vm_id, self.point_id, self.disk.index)
    }
}

/// Fetch and check the base index disk `d` of point `point_id` reads.
pub(crate) async fn fetch_index(
    key: &Key,
    store: &Store,
    vm_id: &str,
    point_id: &str,
    d: &ManifestDisk,
) -> Result<BaseIndex> {
    let base = d.base_point(point_id);
    let what = if base == point_id {
        format!("index of disk {}", d.index)
    } else {
        format!("index of disk {} (base point {base})", d.index)
    };
    let env = store
        .get_index(vm_id, base, d.index)
        .await
        .map_err(|e| Error::from(e).context(&what))
        .map_err(|e| if e.kind() == ErrorKind::NotFound { Error::corrupt(e.to_string()) } else { e })?;
    let plain = open_envelope(key, ObjectKind::Index, &env).map_err(|e| Error::from(e).context(&what))?;
    let index = BaseIndex::decode(&plain).map_err(|e| Error::from(e).context(&what))?;
    if index_digest(key, &index) != d.index_digest {
        return Err(Error::corrupt(format!(
            "{what} does not match the digest in the manifest: it was replaced or altered"
        )));
    }
    if index.disk_size() != d.virtual_size || index.chunk_size() != d.chunk_size {
        return Err(Error::corrupt(format!("{what} disagrees with the manifest on sizes")));
    }
    Ok(index)
}

/// Fetch and verify one chunk into `out`, which is exactly the chunk's guest length:
/// authenticated, decompressed and hashed back to `address`, or an error naming it.
pub(crate) async fn fetch_chunk_into(
    key: &Key,
    store: &Store,
    address: &tern_chunk::ChunkAddress,
    out: &mut [u8],
) -> Result<()> {
    let env = store.get_chunk(address).await.map_err(|e| {
        if e.kind() == tern_store::ErrorKind::NotFound {
            Error::corrupt(format!("chunk object {address} is missing from the store"))
        } else {
            Error::from(e)
        }
    })?;
    // Usually the only reference, so this takes the buffer over without copying.
    let mut env = Vec::from(env);
    open_chunk_into(key, address, &mut env, out)?;
    Ok(())
}

/// Fetch, verify and decode piece `piece` of segment `seg` of disk `d`.
pub(crate) async fn fetch_piece(
    key: &Key,
    store: &Store,
    vm_id: &str,
    d: &ManifestDisk,
    seg: usize,
    piece: usize,
) -> Result<Piece> {
    let s = &d.segments[seg];
    let r = &s.pieces[piece];
    let what = format!("segment piece {piece} of disk {} from point {}", d.index, s.point_id);
    let env = store
        .get_segment(vm_id, &s.point_id, d.index, piece as u32)
        .await
        .map_err(|e| Error::from(e).context(&what))
        .map_err(|e| if e.kind() == ErrorKind::NotFound { Error::corrupt(e.to_string()) } else { e })?;
    let plain = open_envelope(key, ObjectKind::Segment, &env).map_err(|e| Error::from(e).context(&what))?;
    if chunk_address(key, &plain).to_hex() != r.digest {
        return Err(Error::corrupt(format!(
            "{what} does not match the digest in the manifest: it was replaced or altered"
        )));
    }
    let p = Piece::decode(&plain, &what)?;
    if p.start != r.start || p.end != r.end || p.virtual_size != d.virtual_size {
        return Err(Error::corrupt(format!(
            "{what} disagrees with the manifest on its range or the disk size"
        )));
    }
    Ok(p)
}

impl PointReader {
    /// Open disk `d` of point `point_id` of VM `vm_id`: fetches and checks its base
    /// index (pieces are fetched as reads need them).
    pub async fn open(
        key: &Key,
        store: &Store,
        rt: tokio::runtime::Handle,
        vm_id: &str,
        point_id: &str,
        d: &ManifestDisk,
    ) -> Result<PointReader> {
        let index = fetch_index(key, store, vm_id, point_id, d).await?;
        Ok(PointReader {
            key: key.clone(),
            store: store.clone(),
            rt,
            vm_id: vm_id.to_string(),
            point_id: point_id.to_string(),
            disk: d.clone(),
            index,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The manifest's entry for the disk.
    pub fn disk(&self) -> &ManifestDisk {
        &self.disk
    }

    /// Chunks in the base grid.
    pub fn chunk_count(&self) -> usize {
        self.index.len()
    }

    /// Chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.index.chunk_size()
    }

    /// Guest range of chunk `n`.
    pub fn chunk_range(&self, n: usize) -> std::ops::Range<u64> {
        self.index.chunk_range(n)
    }

    /// Whether `range` reads as zero without fetching anything: zero in the base and
    /// covered by no piece.
    pub fn known_zero(&self, range: std::ops::Range<u64>) -> bool {
        let cs = u64::from(self.index.chunk_size());
        let (first, last) = (range.start / cs, range.end.saturating_sub(1) / cs);
        let base_zero =
            (first..=last).all(|n| !matches!(self.index.get(n as usize), Some(IndexEntry::Chunk(_))));
        base_zero && self.untouched(range)
    }

    /// Whether no segment of the point touches `range` (it reads from the base only).
    pub fn untouched(&self, range: std::ops::Range<u64>) -> bool {
        self.pieces_over(range).next().is_none()
    }

    /// The base index's entry for chunk `n`.
    pub fn base_entry(&self, n: usize) -> Option<IndexEntry> {
        self.index.get(n)
    }

    fn pieces_over(&self, range: std::ops::Range<u64>) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.disk.segments.iter().enumerate().flat_map(move |(s, seg)| {
            let r = range.clone();
            seg.pieces
                .iter()
                .enumerate()
                .filter(move |(_, p)| p.start < r.end && p.end > r.start)
                .map(move |(k, _)| (s, k))
        })
    }

    fn piece(&self, seg: usize, piece: usize) -> Result<Arc<Piece>> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, p)) = cache.iter().find(|(k, _)| *k == (seg, piece)) {
                return Ok(p.clone());
            }
        }
        let p = Arc::new(self.rt.block_on(fetch_piece(
            &self.key,
            &self.store,
            &self.vm_id,
            &self.disk,
            seg,
            piece,
        ))?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= PIECE_CACHE {
            cache.pop_front();
        }
        cache.push_back(((seg, piece), p.clone()));
        Ok(p)
    }

    /// Read chunk `n` as of the point into `buf` (exactly the chunk's length). Returns
    /// `false` when it is known to be all zeros without looking (nothing was fetched
    /// and `buf` is zeroed). Blocks on the runtime: call from a plain thread.
    pub fn read_chunk(&self, n: usize, buf: &mut [u8]) -> Result<bool> {
        let range = self.index.chunk_range(n);
        if buf.len() as u64 != range.end - range.start {
            return Err(Error::invalid(format!(
                "chunk {n} is {} bytes, the buffer {}",
                range.end - range.start,
                buf.len()
            )));
        }
        let mut data = match self.index.get(n) {
            Some(IndexEntry::Chunk(a)) => {
                self.rt.block_on(fetch_chunk_into(&self.key, &self.store, &a, buf))?;
                true
            }
            _ => {
                buf.fill(0);
                false
            }
        };
        for (s, k) in self.pieces_over(range.clone()).collect::<Vec<_>>() {
            data |= self.piece(s, k)?.apply(buf, range.start);
        }
        Ok(data)
    }

    /// SHA-256 of the disk's content at the point, hex: the manifest's when it has one,
    /// else read and hashed here, chunk by chunk.
    pub fn sha256(&self) -> Result<String> {
        if let Some(sha) = &self.disk.sha256 {
            return Ok(sha.clone());
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; self.index.chunk_size() as usize];
        for n in 0..self.index.len() {
            let r = self.index.chunk_range(n);
            let b = &mut buf[..(r.end - r.start) as usize];
            self.read_chunk(n, b)?;
            hasher.update(&*b);
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

fn disk_err(e: Error) -> tern_disk::Error {
    let kind = match e.kind() {
        ErrorKind::Io | ErrorKind::Store => tern_disk::ErrorKind::Io,
        ErrorKind::InvalidInput => tern_disk::ErrorKind::InvalidInput,
        _ => tern_disk::ErrorKind::Corrupt,
    };
    tern_disk::Error::new(kind, None, e.to_string())
}

impl tern_disk::Disk for PointReader {
    fn virtual_size(&self) -> u64 {
        self.disk.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> tern_disk::Result<()> {
        let size = self.disk.virtual_size;
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            return Err(tern_disk::Error::invalid(
                None,
                format!("read of {} bytes at {offset} is past the point's {size} bytes", buf.len()),
            ));
        }
        let cs = u64::from(self.index.chunk_size());
        let mut chunk = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = (at / cs) as usize;
            let r = self.index.chunk_range(n);
            let take = ((r.end - at) as usize).min(buf.len() - done);
            if self.known_zero(at..at + take as u64) {
                buf[done..done + take].fill(0);
            } else {
                chunk.resize((r.end - r.start) as usize, 0);
                self.read_chunk(n, &mut chunk).map_err(disk_err)?;
                let from = (at - r.start) as usize;
                buf[done..done + take].copy_from_slice(&chunk[from..from + take]);
            }
            done += take;
        }
        Ok(())
    }

    fn mapping(&self, offset: u64, max_len: u64) -> tern_disk::Result<Mapping> {
        let size = self.disk.virtual_size;
        if offset >= size || max_len == 0 {
            return Err(tern_disk::Error::invalid(None, format!("no mapping at {offset} of {size} bytes")));
        }
        let end = offset.saturating_add(max_len).min(size);
        let cs = u64::from(self.index.chunk_size());
        // Whole chunks at a time: a chunk is data if its base chunk exists or a piece
        // covers any of it.
        let zero_at = |at: u64| {
            let r = self.index.chunk_range((at / cs) as usize);
            self.known_zero(r)
        };
        let first = zero_at(offset);
        let mut at = offset;
        while at < end && zero_at(at) == first {
            at = ((at / cs) + 1) * cs;
        }
        let kind = if first { MapKind::Zero } else { MapKind::Data };
        Ok(Mapping { start: offset, length: at.min(end) - offset, kind })
    }

    fn info(&self) -> tern_disk::Result<tern_disk::ImageInfo> {
        Ok(tern_disk::ImageInfo {
            format: tern_disk::Format::Raw,
            subformat: "tern-point".into(),
            virtual_size: self.disk.virtual_size,
            allocated_bytes: 0,
            file_size: self.disk.virtual_size,
            cluster_size: Some(u64::from(self.index.chunk_size())),
            logical_sector_size: 512,
            backing: None,
            details: vec![
                ("point".into(), self.point_id.clone()),
                ("segments".into(), self.disk.segments.len().to_string()),
            ],
        })
    }
}
