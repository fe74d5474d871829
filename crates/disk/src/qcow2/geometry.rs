//! Cluster arithmetic (QEMU docs/interop/qcow2.txt, "Cluster mapping" and "Extended L2
//! Entries"): how a guest offset splits into an L1 index, an L2 index and an offset
//! inside a cluster or subcluster.

use std::path::Path;

use crate::{Error, Result};

/// Smallest cluster: 512 bytes ("Must not be less than 9").
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster qemu (and tern) handles: 2 MiB.
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limit on the active L1 table: 32 MiB ("Header", note on `size`).
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
/// Subclusters per cluster with extended L2 entries.
pub(crate) const SUBCLUSTERS: u32 = 32;

/// The shape of an image's mapping tables, derived from `cluster_bits` and whether L2
/// entries are extended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether L2 entries are 128 bits with a subcluster bitmap.
    pub extended_l2: bool,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        Geometry { cluster_bits, extended_l2 }
    }

    /// Refuse cluster sizes outside 512 B ..= 2 MiB.
    pub fn check_cluster_bits(bits: u32, path: &Path) -> Result<()> {
        if bits < MIN_CLUSTER_BITS {
            return Err(Error::corrupt(
                path,
                format!("cluster_bits {bits} (offset 20) is below the minimum {MIN_CLUSTER_BITS} (512-byte clusters)"),
            ));
        }
        if bits > MAX_CLUSTER_BITS {
            return Err(Error::unsupported(
                path,
                format!("cluster_bits {bits} (offset 20) is above {MAX_CLUSTER_BITS}: clusters larger than 2 MiB are not supported"),
            ));
        }
        Ok(())
    }

    pub fn cluster_size(self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the number of entries in one L2 table (one cluster).
    pub fn l2_bits(self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// log2 of the guest bytes one L2 table maps.
    pub fn l2_span_bits(self) -> u32 {
        self.cluster_bits + self.l2_bits()
    }

    /// log2 of the allocation unit: a cluster, or a subcluster with extended entries.
    pub fn unit_bits(self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.cluster_bits
        }
    }

    /// L1 entries needed to map `size` guest bytes.
    pub fn l1_entries_for(self, size: u64) -> u64 {
        size.div_ceil(1u64 << self.l2_span_bits())
    }

    /// Check that an L1 table of `l1_size` entries can map `size` bytes and stays within
    /// qemu's 32 MiB limit.
    pub fn check_l1_size(self, size: u64, l1_size: u32, path: &Path) -> Result<()> {
        if size > i64::MAX as u64 {
            return Err(Error::corrupt(path, format!("virtual size {size} (offset 24) is above 2^63 - 1")));
        }
        let needed = self.l1_entries_for(size);
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(
                path,
                format!(
                    "virtual size {size} (offset 24) needs an L1 table of {needed} entries, above qemu's limit of {} for {}-byte clusters",
                    MAX_L1_BYTES / 8,
                    self.cluster_size()
                ),
            ));
        }
        if u64::from(l1_size) < needed {
            return Err(Error::corrupt(
                path,
                format!("l1_size {l1_size} (offset 36) is too small: the virtual size {size} needs {needed} L1 entries"),
            ));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(
                path,
                format!(
                    "l1_size {l1_size} (offset 36) is above qemu's limit of {} entries",
                    MAX_L1_BYTES / 8
                ),
            ));
        }
        Ok(())
    }

    /// L1 index of a guest offset.
    pub fn l1_index(self, guest: u64) -> u64 {
        guest >> self.l2_span_bits()
    }

    /// Index inside its L2 table of the cluster holding a guest offset.
    pub fn l2_index(self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1u64 << self.l2_bits()) - 1)) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_and_extended_shapes() {
        let g = Geometry::new(16, false);
        assert_eq!((g.l2_bits(), g.l2_span_bits(), g.unit_bits()), (13, 29, 16));
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.l1_entries_for((1 << 30) + 1), 3);
        let x = Geometry::new(16, true);
        assert_eq!((x.l2_bits(), x.l2_span_bits(), x.unit_bits()), (12, 28, 11));
        let guest = (5u64 << 28) + (7 << 16) + 123;
        assert_eq!((x.l1_index(guest), x.l2_index(guest), guest % x.cluster_size()), (5, 7, 123));
    }
}
