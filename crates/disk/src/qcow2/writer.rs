//! Writing new qcow2 v3 images.
//!
//! File layout, in clusters: the header (0), the L1 table (1 ..= L), then L2 tables and
//! data clusters appended in the order writes need them, and at `finish` the refcount
//! blocks and table (see `refcount.rs`). Nothing is ever freed or shared, so every
//! cluster has refcount 1 and carries the "copied" flag in its L1/L2 entry.
//!
//! Memory is bounded: the L1 table (at most 32 MiB, qemu's limit) and a small cache of
//! L2 tables; evicted tables are written to their cluster and read back when needed.
//! Until `finish` the header carries the "corrupt" bit, so an image whose writer was
//! dropped half-way is refused by qemu and flagged by `tern disk info`.

use std::collections::HashMap;
use std::path::Path;

use super::geometry::{Geometry, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use super::header::{incompatible, Compression, Header, V3_WRITTEN_HEADER_LEN};
use super::l2::{COPIED, OFFSET_MASK};
use super::refcount::{RefcountLayout, REFCOUNT_ORDER};
use crate::io::ImageFile;
use crate::{block_pieces, check_range, is_zero, BlockPiece, Error, Result};

/// Memory for cached L2 tables, whatever the cluster size.
const TABLE_CACHE_BYTES: u64 = 16 << 20;

/// Writes a new qcow2 v3 image (compat 1.1, 16-bit refcounts, no backing file).
pub struct Qcow2Writer {
    file: ImageFile,
    size: u64,
    geometry: Geometry,
    /// L2 table host offsets (0: not allocated), without flags.
    l1: Vec<u64>,
    l1_offset: u64,
    tables: TableCache,
    /// Host offset of the first cluster not yet allocated.
    next_free: u64,
}

/// L2 tables being filled, keyed by L1 index.
struct TableCache {
    capacity: usize,
    clock: u64,
    tables: HashMap<u64, CachedTable>,
}

struct CachedTable {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

impl Qcow2Writer {
    /// Create a qcow2 v3 image of `size` guest bytes with `cluster_size`-byte clusters
    /// (a power of two, 512 B ..= 2 MiB) at `path`, which must not exist. The size is
    /// rounded up to whole 512-byte sectors.
    pub fn create(path: &Path, size: u64, cluster_size: u64) -> Result<Self> {
        let bits = cluster_size.trailing_zeros();
        if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::invalid(
                Some(path),
                format!("qcow2 cluster size {cluster_size} is invalid: it must be a power of two from 512 to 2 MiB"),
            ));
        }
        // QEMU reads a qcow2 size rounded down to whole sectors, so the size is rounded
        // up here (as VHD and VHDX do): a guest byte past the last whole sector would be lost.
        let size = size.checked_next_multiple_of(512).filter(|&s| s <= i64::MAX as u64).ok_or_else(|| {
            Error::invalid(Some(path), format!("virtual size {size} is too large for qcow2"))
        })?;
        let geometry = Geometry::new(bits, false);
        let l1_entries = geometry.l1_entries_for(size);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(
                Some(path),
                format!("virtual size {size} is too large for {cluster_size}-byte qcow2 clusters (the L1 table would exceed 32 MiB)"),
            ));
        }
        // An empty L1 table takes no cluster (qemu-img check would call it leaked).
        let l1_clusters = (l1_entries * 8).div_ceil(cluster_size);
        let file = ImageFile::create_new(path)?;
        let capacity = ((TABLE_CACHE_BYTES / cluster_size) as usize).clamp(4, 4096);
        let writer = Qcow2Writer {
            file,
            size,
            geometry,
            l1: vec![0; l1_entries as usize],
            l1_offset: cluster_size,
            tables: TableCache { capacity, clock: 0, tables: HashMap::new() },
            next_free: (1 + l1_clusters) * cluster_size,
        };
        writer.write_header(None)?;
        // The L1 table reads as zeros (nothing allocated) until `finish` writes it.
        writer.file.set_len(writer.next_free)?;
        Ok(writer)
    }

    /// Write the header; `refcounts` is `None` before `finish` (the image is then
    /// marked corrupt, as it is not usable yet).
    fn write_header(&self, refcounts: Option<&RefcountLayout>) -> Result<()> {
        let (rt_offset, rt_clusters, flags) = match refcounts {
            Some(r) => (r.table_offset(self.geometry), r.table_clusters_u32(&self.file)?, 0),
            None => (0, 0, incompatible::CORRUPT),
        };
        let h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: self.geometry.cluster_bits,
            size: self.size,
            l1_size: self.l1.len() as u32,
            l1_table_offset: self.l1_offset,
            refcount_table_offset: rt_offset,
            refcount_table_clusters: rt_clusters,
            nb_snapshots: 0,
            incompatible: flags,
            compatible: 0,
            autoclear: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: V3_WRITTEN_HEADER_LEN,
            compression: Compression::Deflate,
        };
        // The 8 zero bytes after the header are the end-of-extensions marker.
        let mut bytes = h.encode_v3().to_vec();
        bytes.extend_from_slice(&[0u8; 8]);
        self.file.write_all_at(&bytes, 0)
    }

    fn allocate(&mut self) -> u64 {
        let at = self.next_free;
        self.next_free += self.geometry.cluster_size();
        at
    }

    /// The L2 table for `l1_index`, loading or allocating it; `None` if it does not
    /// exist and `allocate` is false.
    fn table(&mut self, l1_index: u64, allocate: bool) -> Result<Option<&mut CachedTable>> {
        self.tables.clock += 1;
        let now = self.tables.clock;
        if !self.tables.tables.contains_key(&l1_index) {
            let at = self.l1[l1_index as usize];
            if at == 0 && !allocate {
                return Ok(None);
            }
            self.evict_if_full()?;
            let entries_per_table = 1usize << self.geometry.l2_bits();
            let table = if at == 0 {
                let host = self.allocate();
                self.l1[l1_index as usize] = host;
                CachedTable { entries: vec![0; entries_per_table], dirty: true, used: now }
            } else {
                let mut raw = vec![0u8; self.geometry.cluster_size() as usize];
                self.file.read_exact_at(&mut raw, at)?;
                let entries =
                    raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect();
                CachedTable { entries, dirty: false, used: now }
            };
            self.tables.tables.insert(l1_index, table);
        }
        let t = self.tables.tables.get_mut(&l1_index).expect("inserted above");
        t.used = now;
        Ok(Some(t))
    }

    fn evict_if_full(&mut self) -> Result<()> {
        if self.tables.tables.len() < self.tables.capacity {
            return Ok(());
        }
        let Some(oldest) = self.tables.tables.iter().min_by_key(|(_, t)| t.used).map(|(k, _)| *k) else {
            return Ok(());
        };
        let t = self.tables.tables.remove(&oldest).expect("key from the map");
        if t.dirty {
            self.write_table(oldest, &t.entries)?;
        }
        Ok(())
    }

    fn write_table(&self, l1_index: u64, entries: &[u64]) -> Result<()> {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&bytes, self.l1[l1_index as usize])
    }

    /// Host offset of the cluster holding guest `pos`, allocating it unless the write
    /// is all zeros (an unallocated cluster already reads as zeros): `None` then.
    fn cluster_for_write(&mut self, pos: u64, data_is_zero: impl FnOnce() -> bool) -> Result<Option<u64>> {
        let g = self.geometry;
        let l1_index = g.l1_index(pos);
        let index = g.l2_index(pos);
        let existing = match self.table(l1_index, false)? {
            Some(t) => t.entries[index] & OFFSET_MASK,
            None => 0,
        };
        if existing != 0 {
            return Ok(Some(existing));
        }
        if data_is_zero() {
            return Ok(None);
        }
        // Allocate the table first, so that a run of new data clusters stays contiguous.
        self.table(l1_index, true)?;
        let host = self.allocate();
        let t = self.table(l1_index, true)?.expect("allocated");
        t.entries[index] = host | COPIED;
        t.dirty = true;
        Ok(Some(host))
    }
}

impl crate::DiskWriter for Qcow2Writer {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.file.path(), offset, buf.len(), self.size)?;
        let cluster = self.geometry.cluster_size();
        // Pieces consecutive both in `buf` and on the host are written with one pwrite:
        // (host offset, start in buf, length). Both must hold: a skipped all-zero piece
        // leaves a gap in `buf` while the next new cluster is still host-adjacent.
        let mut pending: Option<(u64, usize, usize)> = None;
        for BlockPiece { within: in_cluster, buf: range, .. } in block_pieces(offset, buf.len(), cluster) {
            let (pos, done, n) = (offset + range.start as u64, range.start, range.len());
            let piece = &buf[range];
            if let Some(host) = self.cluster_for_write(pos, || is_zero(piece))? {
                let at = host + in_cluster;
                match &mut pending {
                    Some((h, s, len)) if *h + *len as u64 == at && *s + *len == done => *len += n,
                    _ => {
                        if let Some((h, s, len)) = pending.take() {
                            self.file.write_all_at(&buf[s..s + len], h)?;
                        }
                        pending = Some((at, done, n));
                    }
                }
            }
        }
        if let Some((h, s, len)) = pending {
            self.file.write_all_at(&buf[s..s + len], h)?;
        }
        Ok(())
    }

    fn skip_sync(&mut self) {
        self.file.set_sync(false);
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let tables = std::mem::take(&mut self.tables.tables);
        for (l1_index, t) in tables {
            if t.dirty {
                self.write_table(l1_index, &t.entries)?;
            }
        }
        let l1: Vec<u8> = self
            .l1
            .iter()
            .flat_map(|&off| if off == 0 { 0u64 } else { off | COPIED }.to_be_bytes())
            .collect();
        self.file.write_all_at(&l1, self.l1_offset)?;
        let g = self.geometry;
        let layout = RefcountLayout::new(g, self.next_free >> g.cluster_bits);
        layout.write(&self.file, g)?;
        // Metadata first, durable, then the header that makes the image valid.
        self.file.sync()?;
        self.write_header(Some(&layout))?;
        self.file.sync()
    }
}
