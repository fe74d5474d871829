//! Writer leases: how replication passes and garbage collection keep out of each
//! other's way (docs/continuous.md, "Garbage collection protocol").
//!
//! A writer (a full pass, a delta cycle, a resync, a compaction) creates
//! `leases/<id>` before it reads anything from the store or writes to it, then looks
//! for the collector's lock. If a collection runs, it marks its lease `waiting` (a
//! collection does not wait for such a lease, and a new collection does not start
//! while one exists: writers are not starved), waits for the lock to go, marks the
//! lease active again and looks again; otherwise it works, renewing the lease every
//! [`RENEW`], and deletes it when done. A killed writer's lease stops counting
//! [`TTL`] after its last renewal.
//!
//! Why this excludes the two: the writer writes its lease as active (a) before it
//! reads the lock (b); the collector creates the lock (c) before it lists leases (d), and
//! proceeds only when a listing shows none live. If a < d, the collector sees the
//! lease and waits until the writer is done or has backed off. If a > d, then
//! b > a > d > c, so the writer sees the lock and backs off. Stores are strongly
//! consistent for these operations (a local folder, Azure Blob, S3).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tern_store::Store;

use crate::{Error, ErrorKind, Result};

/// A lease no longer renewed counts for this long.
pub const TTL: Duration = Duration::from_secs(120);
/// How often a holder renews.
pub const RENEW: Duration = Duration::from_secs(30);
/// How long a writer waits for a running collection before giving up.
const WAIT_FOR_GC: Duration = Duration::from_secs(3600);

/// The body of a lease (plain JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct LeaseBody {
    /// What holds it (`cycle of VM web`...).
    pub what: String,
    /// The VM, when the writer is a VM's pass.
    pub vm: Option<String>,
    /// Milliseconds it counts for after its last write.
    pub ttl_ms: u64,
    /// The writer is waiting for a collection to end: it does nothing meanwhile, and
    /// a collection does not wait for it; a new collection waits for it to get in.
    #[serde(default)]
    pub waiting: bool,
}

/// Whether a lease body says its writer waits.
pub(crate) fn waiting(body: &[u8]) -> bool {
    serde_json::from_slice::<LeaseBody>(body).is_ok_and(|b| b.waiting)
}

/// Whether a lease modified at `modified` (store clock), with this body, still counts
/// at `now` (store clock).
pub(crate) fn live(modified: SystemTime, body: &[u8], now: SystemTime) -> bool {
    let ttl = serde_json::from_slice::<LeaseBody>(body).map(|b| b.ttl_ms).unwrap_or(TTL.as_millis() as u64);
    modified + Duration::from_millis(ttl) > now
}

/// A held lease; renewed by a thread, deleted when dropped.
pub struct Lease {
    id: String,
    store: Store,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.id)
    }
}

impl Lease {
    /// Take a lease for `what`, waiting while a garbage collection runs. Blocks on the
    /// runtime: call from a plain thread.
    pub fn acquire(
        store: &Store,
        rt: &tokio::runtime::Handle,
        vm: Option<&str>,
        what: &str,
    ) -> Result<Lease> {
        let mut r = [0u8; 8];
        crate::random_bytes(&mut r)?;
        let id = format!("{}-{}", vm.map_or("gc", |v| &v[..v.len().min(8)]), hex::encode(r));
        let encode = |waiting: bool| {
            serde_json::to_vec(&LeaseBody {
                what: what.to_string(),
                vm: vm.map(String::from),
                ttl_ms: TTL.as_millis() as u64,
                waiting,
            })
            .map(Bytes::from)
            .map_err(|e| Error::invalid(format!("encoding a lease: {e}")))
        };
        let body = encode(false)?;
        let started = Instant::now();
        rt.block_on(store.create_lease(&id, body.clone()))?;
        let mut waiting_since: Option<Instant> = None;
        loop {
            match rt.block_on(store.gc_lock())? {
                None if waiting_since.is_none() => break,
                None => {
                    // Active again, then look again (see the module's argument).
                    rt.block_on(store.renew_lease(&id, body.clone()))?;
                    waiting_since = None;
                    continue;
                }
                Some((modified, lock)) => {
                    if waiting_since.is_none() {
                        rt.block_on(store.renew_lease(&id, encode(true)?))?;
                        waiting_since = Some(Instant::now());
                    }
                    // A collector killed while holding the lock: its lock counts no
                    // longer than a lease.
                    if !live(modified, &lock, SystemTime::now()) {
                        break_stale_lock(store, rt, modified)?;
                        continue;
                    }
                    if started.elapsed() > WAIT_FOR_GC {
                        let _ = rt.block_on(store.delete_lease(&id));
                        return Err(Error::new(
                            ErrorKind::Busy,
                            "a garbage collection of the store has run for over an hour; try again later",
                        ));
                    }
                    if waiting_since.is_some_and(|w| w.elapsed() > RENEW) {
                        rt.block_on(store.renew_lease(&id, encode(true)?))?;
                        waiting_since = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (store, rt, stop, id, body) =
                (store.clone(), rt.clone(), stop.clone(), id.clone(), body.clone());
            std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= RENEW {
                        // A failed renewal is retried next time; a lease that lapses
                        // lets a collection start, which then waits for no one: the
                        // pass's own objects are found missing and it fails.
                        let _ = rt.block_on(store.renew_lease(&id, body.clone()));
                        last = Instant::now();
                    }
                }
            })
        };
        Ok(Lease { id, store: store.clone(), rt: rt.clone(), stop, renewer: Some(renewer) })
    }
}

/// Remove a collector's lock that stopped counting (its holder died), unless it was
/// renewed meanwhile.
fn break_stale_lock(store: &Store, rt: &tokio::runtime::Handle, seen: SystemTime) -> Result<()> {
    if let Some((modified, _)) = rt.block_on(store.gc_lock())? {
        if modified == seen {
            rt.block_on(store.delete_gc_lock())?;
        }
    }
    Ok(())
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.renewer.take() {
            let _ = r.join();
        }
        let _ = self.rt.block_on(self.store.delete_lease(&self.id));
    }
}
