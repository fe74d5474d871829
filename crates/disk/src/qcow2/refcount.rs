//! Refcount structures for images tern writes (QEMU docs/interop/qcow2.txt, "Host
//! cluster management").
//!
//! The writer never frees or shares a cluster, so every cluster below its allocation
//! end has refcount exactly 1 and nothing above it is used. The refcount blocks and
//! the refcount table are then appended after the last cluster, and they count
//! themselves: with `n` clusters in use, `b` blocks and `t` table clusters, the blocks
//! must cover `n + b + t` clusters. Entries are 16 bits (refcount_order 4).

use super::geometry::Geometry;
use crate::io::ImageFile;
use crate::{Error, Result};

/// refcount_order written by tern: 16-bit refcounts, qemu's default.
pub(crate) const REFCOUNT_ORDER: u32 = 4;
/// Bytes per refcount entry at that order.
const ENTRY_BYTES: u64 = 2;
/// Bytes per refcount table entry.
const TABLE_ENTRY_BYTES: u64 = 8;
/// Largest buffer used to stream the structures out.
const WRITE_CHUNK: u64 = 1 << 20;

/// Where the refcount structures go, in clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefcountLayout {
    /// Clusters in use before the refcount structures.
    pub used: u64,
    /// Refcount blocks, at clusters `used .. used + blocks`.
    pub blocks: u64,
    /// Refcount table clusters, right after the blocks.
    pub table_clusters: u64,
}

impl RefcountLayout {
    /// The smallest layout that counts `used` clusters plus itself.
    pub fn new(g: Geometry, used: u64) -> Self {
        let per_block = g.cluster_size() / ENTRY_BYTES;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        // Both counts only grow and are bounded by the fixed point; each round adds at
        // most a few clusters, so a handful of rounds suffice. 64 is a safe bound.
        for _ in 0..64 {
            let total = used + blocks + table_clusters;
            let b = total.div_ceil(per_block);
            let t = (b * TABLE_ENTRY_BYTES).div_ceil(g.cluster_size());
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        RefcountLayout { used, blocks, table_clusters }
    }

    /// Clusters counted (and in the image) once the structures are written.
    pub fn total(&self) -> u64 {
        self.used + self.blocks + self.table_clusters
    }

    /// Host offset of the refcount table.
    pub fn table_offset(&self, g: Geometry) -> u64 {
        (self.used + self.blocks) << g.cluster_bits
    }

    /// Write the blocks (every cluster of the image at refcount 1) and the table.
    pub fn write(&self, file: &ImageFile, g: Geometry) -> Result<()> {
        let cluster = g.cluster_size();
        // Blocks: `total` entries of 1, then zeros to the end of the last block.
        let blocks_start = self.used * cluster;
        let blocks_len = self.blocks * cluster;
        let counted_len = self.total() * ENTRY_BYTES;
        stream(file, blocks_start, blocks_len, |pos, buf| {
            for (i, pair) in buf.chunks_exact_mut(2).enumerate() {
                let at = pos + (i as u64) * ENTRY_BYTES;
                let value: u16 = if at < counted_len { 1 } else { 0 };
                pair.copy_from_slice(&value.to_be_bytes());
            }
        })?;
        // Table: the offset of each block in turn, then zeros.
        let table_start = self.table_offset(g);
        let block_offset = |i: u64| (self.used + i) * cluster;
        stream(file, table_start, self.table_clusters * cluster, |pos, buf| {
            for (i, entry) in buf.chunks_exact_mut(8).enumerate() {
                let index = pos / TABLE_ENTRY_BYTES + i as u64;
                let value = if index < self.blocks { block_offset(index) } else { 0 };
                entry.copy_from_slice(&value.to_be_bytes());
            }
        })
    }

    /// `refcount_table_clusters` for the header.
    pub fn table_clusters_u32(&self, file: &ImageFile) -> Result<u32> {
        u32::try_from(self.table_clusters).map_err(|_| {
            Error::invalid(
                Some(file.path()),
                format!(
                    "the refcount table would need {} clusters, more than a qcow2 header can name",
                    self.table_clusters
                ),
            )
        })
    }
}

/// Write `len` bytes at `start` in chunks, each filled by `fill(offset_in_region, buf)`.
fn stream(file: &ImageFile, start: u64, len: u64, mut fill: impl FnMut(u64, &mut [u8])) -> Result<()> {
    let mut buf = vec![0u8; len.min(WRITE_CHUNK) as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(WRITE_CHUNK) as usize;
        fill(pos, &mut buf[..n]);
        file.write_all_at(&buf[..n], start + pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_itself() {
        for bits in [9u32, 12, 16, 21] {
            let g = Geometry::new(bits, false);
            let per_block = g.cluster_size() / ENTRY_BYTES;
            for used in [1u64, 3, per_block - 2, per_block - 1, per_block, per_block * 7 + 5, 1 << 20] {
                let l = RefcountLayout::new(g, used);
                assert!(l.blocks * per_block >= l.total(), "{bits} {used} {l:?}");
                assert!(l.table_clusters * g.cluster_size() >= l.blocks * 8, "{bits} {used} {l:?}");
                // Minimal: one block fewer could not count everything.
                assert!((l.blocks - 1) * per_block < l.total(), "{bits} {used} {l:?}");
            }
        }
    }
}
