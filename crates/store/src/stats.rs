//! Traffic counters: bytes and objects moved through one opened store.
//!
//! The counters live behind an `Arc` shared by every clone of a [`crate::Store`], so
//! that upload workers holding clones add to one total. Relaxed ordering is enough:
//! each counter is independent and only read for reporting.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes and objects moved since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Objects written.
    pub objects_put: u64,
    /// Bytes written, counted as they go: a paced chunk
    /// ([`crate::Store::put_chunk_paced`]) adds each part when the backend has taken it
    /// (a local file write, or the HTTP connection taking that part of the body; a
    /// retried request counts its bytes again).
    pub bytes_put: u64,
    /// Objects read.
    pub objects_get: u64,
    /// Bytes read.
    pub bytes_get: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    objects_put: AtomicU64,
    bytes_put: AtomicU64,
    objects_get: AtomicU64,
    bytes_get: AtomicU64,
}

impl Counters {
    pub(crate) fn record_put(&self, bytes: usize) {
        self.objects_put.fetch_add(1, Ordering::Relaxed);
        self.bytes_put.fetch_add(widen(bytes), Ordering::Relaxed);
    }

    /// One part of a paced upload has landed.
    pub(crate) fn record_put_bytes(&self, bytes: usize) {
        self.bytes_put.fetch_add(widen(bytes), Ordering::Relaxed);
    }

    /// A paced upload whose parts were counted by [`Counters::record_put_bytes`] is done.
    pub(crate) fn record_put_object(&self) {
        self.objects_put.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_get(&self, bytes: usize) {
        self.objects_get.fetch_add(1, Ordering::Relaxed);
        self.bytes_get.fetch_add(widen(bytes), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        StoreStats {
            objects_put: self.objects_put.load(Ordering::Relaxed),
            bytes_put: self.bytes_put.load(Ordering::Relaxed),
            objects_get: self.objects_get.load(Ordering::Relaxed),
            bytes_get: self.bytes_get.load(Ordering::Relaxed),
        }
    }
}

fn widen(bytes: usize) -> u64 {
    // usize is at most 64 bits on every target tern builds for.
    u64::try_from(bytes).unwrap_or(u64::MAX)
}
