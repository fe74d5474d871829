//! A bounded cache of L2 tables for the reader, shared by every thread reading the
//! image. Tables are immutable once loaded (`Arc<[u64]>`), so the lock is held only to
//! look up or insert, never while reading the file.

use std::collections::HashMap;
use std::sync::Arc;

use super::l2::HostOffset;

/// Memory the cache may hold, whatever the cluster size.
const CACHE_BYTES: u64 = 32 << 20;
/// At least this many tables, so that reads striding across tables do not thrash.
const MIN_TABLES: usize = 8;
/// At most this many, so that eviction's scan stays short with tiny clusters.
const MAX_TABLES: usize = 4096;

/// One L2 table, decoded to host-endian entries.
pub(crate) type L2Table = Arc<[u64]>;

/// Least-recently-used L2 tables keyed by their host offset.
#[derive(Debug)]
pub(crate) struct L2Cache {
    capacity: usize,
    clock: u64,
    tables: HashMap<HostOffset, (L2Table, u64)>,
}

impl L2Cache {
    /// A cache sized for tables of `cluster_size` bytes.
    pub fn new(cluster_size: u64) -> Self {
        let capacity = ((CACHE_BYTES / cluster_size) as usize).clamp(MIN_TABLES, MAX_TABLES);
        L2Cache { capacity, clock: 0, tables: HashMap::new() }
    }

    pub fn get(&mut self, at: HostOffset) -> Option<L2Table> {
        self.clock += 1;
        let now = self.clock;
        self.tables.get_mut(&at).map(|(t, used)| {
            *used = now;
            t.clone()
        })
    }

    pub fn insert(&mut self, at: HostOffset, table: L2Table) {
        if self.tables.len() >= self.capacity && !self.tables.contains_key(&at) {
            // A linear scan: it runs once per table read from the file, which costs far
            // more than looking at a few thousand counters.
            if let Some(oldest) = self.tables.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) {
                self.tables.remove(&oldest);
            }
        }
        self.clock += 1;
        self.tables.insert(at, (table, self.clock));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = L2Cache::new(CACHE_BYTES); // capacity clamps to MIN_TABLES
        for i in 0..MIN_TABLES as u64 {
            c.insert(HostOffset(i), Arc::from(vec![i]));
        }
        assert!(c.get(HostOffset(0)).is_some());
        c.insert(HostOffset(100), Arc::from(vec![0]));
        assert!(c.get(HostOffset(0)).is_some(), "recently used survives");
        assert!(c.get(HostOffset(1)).is_none(), "least recently used is evicted");
        assert_eq!(c.tables.len(), MIN_TABLES);
    }
}
