//! `tern store gc`: retention and garbage collection (docs/continuous.md, "Garbage
//! collection protocol").
//!
//! 1. Take the collector's lock `gc/lock` (create-only); a lock whose holder stopped
//!    renewing it for [`lease::TTL`] is broken.
//! 2. Wait until no writer lease is live (writers that start meanwhile see the lock
//!    and back off; see `lease.rs` for why the two then never overlap).
//! 3. Retention: for each VM this host knows with a retention setting, choose the
//!    points past it (by age and count; never the newest) and delete their manifests.
//! 4. Mark: every object the remaining manifests reference (each disk's base index,
//!    the chunks in it, its segment pieces).
//! 5. Sweep: delete every chunk, index and segment piece that is not marked.
//! 6. Release the lock.
//!
//! With `dry_run`, steps 3 and 5 only report what they would delete. Memory: the
//! marked set (32 bytes per distinct chunk) and one index at a time.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tern_chunk::{ChunkAddress, IndexEntry};
use tern_store::{Listed, ListedKind, Store};

use crate::lease::{self, live};
use crate::{Engine, Error, ErrorKind, Manifest, Result};

/// Options of a collection.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be deleted; delete nothing.
    pub dry_run: bool,
    /// How long to wait for running writers to finish before giving up.
    pub wait: Duration,
    /// The store; `None`: the engine's.
    pub store_url: Option<String>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { dry_run: false, wait: lease::TTL + Duration::from_secs(30), store_url: None }
    }
}

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// The store.
    pub store_url: String,
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Points whose manifests retention deleted: (VM name, point id).
    pub expired_points: Vec<(String, String)>,
    /// Points kept.
    pub retained_points: u64,
    /// Objects referenced by a retained point.
    pub referenced_objects: u64,
    /// Objects deleted (chunks, indexes, segment pieces).
    pub deleted_objects: u64,
    /// Their bytes.
    pub deleted_bytes: u64,
    /// Seconds spent waiting for writers to finish.
    pub waited_seconds: f64,
}

/// Run retention and garbage collection on the engine's store.
pub fn gc(engine: &Engine, opts: &GcOptions) -> Result<GcReport> {
    let url = opts.store_url.clone().unwrap_or_else(|| engine.store_url().to_string());
    let store = engine.open_store_at(&url, false)?;
    let key = engine.load_key()?;
    let rt = engine.runtime()?;
    rt.block_on(engine.check_store(&store, &key, false))?;
    let mut report =
        GcReport { store_url: store.url().to_string(), dry_run: opts.dry_run, ..Default::default() };
    let started = Instant::now();
    // Writers that waited for the last collection get in first.
    while started.elapsed() < opts.wait {
        let leases = rt.block_on(store.list_leases())?;
        let now = SystemTime::now();
        if !leases.iter().any(|(_, m, b)| live(*m, b, now) && lease::waiting(b)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _lock = GcLock::take(&store, rt.handle())?;
    loop {
        let now = rt.block_on(store.gc_lock())?.map(|(m, _)| m).unwrap_or_else(SystemTime::now);
        let leases = rt.block_on(store.list_leases())?;
        let busy = leases.iter().filter(|(_, m, b)| live(*m, b, now) && !lease::waiting(b)).count();
        if busy == 0 {
            break;
        }
        if started.elapsed() > opts.wait {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("{busy} replication pass(es) still write to the store; garbage collection gave up waiting"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.waited_seconds = started.elapsed().as_secs_f64();

    // Retention, then the roots: every manifest that remains.
    let mut roots: Vec<Manifest> = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    for vm_id in rt.block_on(store.list_vms())? {
        let mut manifests = Vec::new();
        for point in rt.block_on(store.list_points(&vm_id))? {
            let env = rt.block_on(store.get_manifest(&vm_id, &point))?;
            let m = Manifest::open(&key, &env, &vm_id, &point).map_err(|e| {
                e.context(format!("point {point} of VM {vm_id}: refusing to collect garbage"))
            })?;
            manifests.push(m);
        }
        let settings = engine.db().settings(&vm_id)?;
        let n = manifests.len();
        for (i, m) in manifests.into_iter().enumerate() {
            let newest = i + 1 == n;
            let too_many = settings.retention_count.is_some_and(|c| (n - i) as u64 > c);
            let too_old = settings.retention_age_s.is_some_and(|age| {
                time::OffsetDateTime::parse(&m.instant, &time::format_description::well_known::Rfc3339)
                    .is_ok_and(|t| (now - t).whole_seconds() > age as i64)
            });
            if !newest && (too_many || too_old) {
                if !opts.dry_run {
                    rt.block_on(store.delete_manifest(&vm_id, &m.point_id))?;
                }
                report.expired_points.push((m.vm.name.clone(), m.point_id.clone()));
            } else {
                roots.push(m);
            }
        }
    }
    report.retained_points = roots.len() as u64;

    // Mark.
    let mut chunks: HashSet<ChunkAddress> = HashSet::new();
    let mut objects: HashSet<String> = HashSet::new();
    let mut indexes_seen: HashSet<(String, String, u32)> = HashSet::new();
    for m in &roots {
        objects.insert(format!("vms/{}/points/{}/manifest", m.vm.id, m.point_id));
        for d in &m.disks {
            let base = d.base_point(&m.point_id).to_string();
            objects.insert(format!("vms/{}/points/{base}/disk-{}.index", m.vm.id, d.index));
            for s in &d.segments {
                for k in 0..s.pieces.len() {
                    objects.insert(format!("vms/{}/points/{}/disk-{}.seg-{k}", m.vm.id, s.point_id, d.index));
                }
            }
            if indexes_seen.insert((m.vm.id.clone(), base.clone(), d.index)) {
                let index = rt.block_on(crate::point::fetch_index(&key, &store, &m.vm.id, &m.point_id, d))?;
                for e in index.entries() {
                    if let IndexEntry::Chunk(a) = e {
                        chunks.insert(*a);
                    }
                }
            }
        }
    }
    report.referenced_objects = (chunks.len() + objects.len()) as u64;

    // Sweep.
    let mut listed: Vec<Listed> = rt.block_on(store.list_chunks_meta())?;
    listed.extend(rt.block_on(store.list_vm_objects())?);
    for l in listed {
        let garbage = match &l.kind {
            ListedKind::Chunk(a) => !chunks.contains(a),
            ListedKind::Index(..) | ListedKind::Segment(..) => !objects.contains(&l.path),
            // Manifests are roots (or were expired above); others are not tern's.
            ListedKind::Manifest(..) | ListedKind::Other => false,
        };
        if garbage {
            if !opts.dry_run {
                rt.block_on(store.delete_listed(&l))?;
            }
            report.deleted_objects += 1;
            report.deleted_bytes += l.size;
        }
    }
    Ok(report)
}

/// The collector's lock, renewed while held, released when dropped.
struct GcLock {
    store: Store,
    rt: tokio::runtime::Handle,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl GcLock {
    fn take(store: &Store, rt: &tokio::runtime::Handle) -> Result<GcLock> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let body = Bytes::from(
            serde_json::to_vec(&lease::LeaseBody {
                what: "garbage collection".into(),
                vm: None,
                ttl_ms: lease::TTL.as_millis() as u64,
                waiting: false,
            })
            .map_err(|e| Error::invalid(format!("encoding the lock: {e}")))?,
        );
        for _ in 0..2 {
            match rt.block_on(store.create_gc_lock(body.clone())) {
                Ok(_) => {
                    let stop = std::sync::Arc::new(AtomicBool::new(false));
                    let renewer = {
                        let (store, rt, stop, body) = (store.clone(), rt.clone(), stop.clone(), body.clone());
                        std::thread::spawn(move || {
                            let mut last = Instant::now();
                            while !stop.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(100));
                                if last.elapsed() >= lease::RENEW {
                                    let _ = rt.block_on(store.renew_gc_lock(body.clone()));
                                    last = Instant::now();
                                }
                            }
                        })
                    };
                    return Ok(GcLock { store: store.clone(), rt: rt.clone(), stop, renewer: Some(renewer) });
                }
                Err(e) if e.kind() == tern_store::ErrorKind::AlreadyExists => {
                    match rt.block_on(store.gc_lock())? {
                        Some((m, b)) if !live(m, &b, SystemTime::now()) => {
                            rt.block_on(store.delete_gc_lock())?;
                        }
                        Some(_) => {
                            return Err(Error::new(
                                ErrorKind::Busy,
                                "another garbage collection of this store is running",
                            ))
                        }
                        None => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::new(ErrorKind::Busy, "could not take the garbage collection lock"))
    }
}

impl Drop for GcLock {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(r) = self.renewer.take() {
            let _ = r.join();
        }
        let _ = self.rt.block_on(self.store.delete_gc_lock());
    }
}
