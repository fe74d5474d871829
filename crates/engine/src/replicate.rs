//! Initial replication of one VM (docs/replication.md, "Replication of one VM").
//!
//! Order, each step durable before the next:
//! 1. the store's config is checked against the key (a wrong key fails before any upload);
//! 2. the VM's unfinished replication to this store is resumed (same point id, same
//!    snapshot), or a new one starts with a new point id and a snapshot of every disk;
//! 3. disks one after another; per disk N workers take chunk numbers in order. A chunk
//!    mapped entirely zero/unallocated is not read, one that reads as zeros is not
//!    stored, one whose address the store has is not uploaded. Workers report to this
//!    thread, which records progress in the state database in batches;
//! 4. every disk's index, then the manifest. The point exists from that moment;
//!    snapshots are released.
//!
//! Beside the workers, one thread per disk hashes the guest content in order (SHA-256,
//! recorded in the manifest; `tern migrate` prints it). Workers hand it the chunks they
//! read, from a bounded pool of buffers; it reads chunks recorded by an earlier run
//! itself, and hashes mapped-zero chunks as zeros. The pool bounds memory and lets the
//! hash lag the workers by a few chunks at most.
//!
//! A crash loses at most the chunks in flight: recorded chunks are skipped on resume,
//! and unrecorded ones are re-read and found in the store before any upload.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tern_chunk::{chunk_address, seal, BaseIndex, ChunkAddress, IndexEntry, Key, ObjectKind};
use tern_disk::{Disk, MapKind};
use tern_store::{Store, StoreStats};

use crate::manifest::{index_digest, Manifest, ManifestDisk, ManifestVm};
use crate::snapshot::SnapshotKind;
use crate::throttle::Throttle;
use crate::RunLock;
use crate::{
    Engine, Error, ErrorKind, PointRow, ReplicationDiskRow, ReplicationRow, Result, VmDef, MANIFEST_FORMAT,
    MAX_THREADS,
};

/// Options of one replication run.
#[derive(Debug, Clone)]
pub struct ReplicateOptions {
    /// Upload workers per disk, 1..=32.
    pub threads: usize,
    /// Read in place even if another process has an image open for writing.
    pub force: bool,
    /// zstd level for chunks.
    pub compression_level: i32,
    /// Fault injection for tests: fail after this many chunk uploads in this run.
    #[doc(hidden)]
    pub fail_after_uploads: Option<u64>,
    /// Set (by a signal handler, say) to stop the run at the next chunk or piece: it
    /// ends with an error of kind `Busy` and resumes (or is retried) next time.
    pub cancel: Option<&'static AtomicBool>,
    /// Delta cycles: fold a disk's base and segments into a new base (compaction)
    /// once this many segments are on the base, or once they changed a quarter of
    /// the disk; 1 compacts at every cycle. Default [`DEFAULT_COMPACT_SEGMENTS`].
    pub compact_after_segments: usize,
    /// TEST ONLY: cut a QEMU VM's disks one at a time with this pause between (an
    /// inconsistent cut), so that the consistency test shows it can fail.
    #[doc(hidden)]
    pub test_stagger: Option<std::time::Duration>,
    /// The running journals of this process (`tern agent` keeps them across passes):
    /// a `--tracking journal` VM's pass uses its journal. Without it, such a VM's
    /// pass is a dirty-bitmap cycle.
    pub journals: Option<std::sync::Arc<crate::journal::Journals>>,
    /// Compaction runs beside the cycles ([`crate::compact_beside`], the agent): a
    /// cycle rebases onto a compaction done meanwhile and compacts inside itself only
    /// a chain 4x `compact_after_segments` long.
    pub background_compaction: bool,
}

/// Segments on a base before a cycle compacts it.
pub const DEFAULT_COMPACT_SEGMENTS: usize = 32;

/// The error a run stopped through [`ReplicateOptions::cancel`] ends with.
pub(crate) fn check_cancel(opts: &ReplicateOptions) -> Result<()> {
    match opts.cancel {
        Some(c) if c.load(Ordering::Relaxed) => {
            Err(Error::new(ErrorKind::Busy, "replication stopped on request; it goes on next time"))
        }
        _ => Ok(()),
    }
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            threads: crate::DEFAULT_THREADS,
            force: false,
            compression_level: 1,
            fail_after_uploads: None,
            cancel: None,
            compact_after_segments: DEFAULT_COMPACT_SEGMENTS,
            test_stagger: None,
            journals: None,
            background_compaction: false,
        }
    }
}

/// Check a worker count.
pub fn check_threads(n: usize) -> Result<usize> {
    if (1..=MAX_THREADS).contains(&n) {
        Ok(n)
    } else {
        Err(Error::invalid(format!("--threads {n} is out of range: use 1 to {MAX_THREADS} (default 4)")))
    }
}

/// What happens, for progress display.
#[derive(Debug, Clone)]
pub enum ReplicateEvent {
    /// Something the user should know (forced in-place read, abandoned snapshot).
    Warning(String),
    /// A new replication started (`resumed` false) or an unfinished one resumed.
    Point {
        /// The point being made.
        point_id: String,
        /// Whether this run resumes an earlier one.
        resumed: bool,
    },
    /// A disk starts; `done` guest bytes were already recorded.
    DiskStart {
        /// Disk number.
        disk: u32,
        /// Guest size.
        total: u64,
        /// Guest bytes already done.
        done: u64,
    },
    /// A chunk finished.
    Chunk {
        /// Disk number.
        disk: u32,
        /// Guest bytes it covers.
        guest_bytes: u64,
    },
    /// A disk finished.
    DiskDone {
        /// Disk number.
        disk: u32,
    },
}

/// Per disk numbers of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskReport {
    /// Disk number.
    pub disk: u32,
    /// Guest size.
    pub virtual_size: u64,
    /// Chunks in the disk.
    pub chunks: u64,
    /// Chunks recorded by an earlier, interrupted run.
    pub resumed_chunks: u64,
    /// Chunks found zero (by mapping or by reading).
    pub zero_chunks: u64,
    /// Chunks whose address the store already had.
    pub dedup_chunks: u64,
    /// Chunks uploaded.
    pub uploaded_chunks: u64,
    /// Envelope bytes uploaded.
    pub uploaded_bytes: u64,
    /// Guest bytes read from the image.
    pub read_bytes: u64,
    /// Delta cycles: guest bytes the disk's changes cover (data and zeros).
    pub changed_bytes: u64,
    /// Delta cycles: the disk was compacted (a new base, no segments).
    pub compacted: bool,
    /// How the disk was read: a reflink copy, or the image in place.
    pub snapshot: SnapshotKind,
    /// SHA-256 of the guest content, hex (as recorded in the manifest); empty (and
    /// absent from JSON) for a delta point, which does not read the whole disk.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

/// The result of a replication.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicateReport {
    /// The VM.
    pub vm: String,
    /// The committed point.
    pub point_id: String,
    /// What kind of point it is.
    pub kind: PointKind,
    /// The point's instant (RFC 3339, UTC).
    pub instant: String,
    /// The store it was committed to.
    pub store_url: String,
    /// Whether this run resumed an earlier one.
    pub resumed: bool,
    /// Per disk.
    pub disks: Vec<DiskReport>,
    /// What the store counted during this run.
    pub store_stats: StoreStats,
}

/// Replicate VM `name` to the engine's store and commit a recovery point.
pub fn replicate(
    engine: &Engine,
    name: &str,
    opts: &ReplicateOptions,
    throttle: &Throttle,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
) -> Result<ReplicateReport> {
    check_threads(opts.threads)?;
    let vm = engine.vm(name)?;
    let _running = RunLock::acquire(engine, &vm.id, &vm.name)?;
    crate::cycle::run(engine, &vm, opts, throttle, observer)
}

/// A resumed replication's recorded chunks are referenced by no manifest yet: a
/// garbage collection that ran while the replication was stopped removed them. Its
/// own lease keeps collections out from here on; those gone are read again.
pub(crate) fn forget_collected(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    store: &Store,
    repl: &ReplicationRow,
    disks: &[ReplicationDiskRow],
) -> Result<()> {
    let present: std::collections::HashSet<ChunkAddress> =
        rt.block_on(store.list_chunks())?.into_iter().map(|(a, _)| a).collect();
    for d in disks {
        let gone: Vec<u64> = engine
            .db()
            .recorded_chunks(&repl.vm_id, &repl.point_id, d.disk)?
            .into_iter()
            .filter(|(_, a)| a.is_some_and(|a| !present.contains(&ChunkAddress(a))))
            .map(|(n, _)| n)
            .collect();
        engine.db().forget_chunks(&repl.vm_id, &repl.point_id, d.disk, &gone)?;
    }
    Ok(())
}

/// The kind of a point a run committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Every disk read whole (the initial replication, or a VM of image files).
    Full,
    /// Only what changed since the previous point, from QEMU's dirty bitmaps.
    Delta,
    /// Tracking was lost: every disk read whole and compared with the store by chunk
    /// digest; only chunks that differ are uploaded.
    Resync,
}

/// Read every disk of `repl` whole, store what the store does not have, and commit
/// the point: the initial replication of any VM. `views_held` is called once every
/// disk is read: an error there (the views did not hold) commits nothing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn full_pass(
    engine: &Engine,
    rt: &tokio::runtime::Runtime,
    vm: &VmDef,
    store: &Store,
    key: &Key,
    repl: ReplicationRow,
    disks: Vec<ReplicationDiskRow>,
    resumed: bool,
    opts: &ReplicateOptions,
    throttle: &Throttle,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
    views_held: &mut dyn FnMut() -> Result<()>,
) -> Result<ReplicateReport> {
    let db = engine.db();
    let url = &repl.store_url;
    observer(ReplicateEvent::Point { point_id: repl.point_id.clone(), resumed });
    db.mark_run_started(&vm.id, &repl.point_id)?;
    db.record_rate(&vm.id, &repl.point_id, None, 0)?;
    let mut window = RateWindow::starting(Instant::now());

    let uploads = AtomicU64::new(0);
    let live = AtomicU64::new(0);
    let ctx = Ctx { key, store, rt: rt.handle(), throttle, opts, uploads: &uploads, live: &live };
    let mut indexes = Vec::new();
    let mut reports = Vec::new();
    for d in &disks {
        let label = format!("disk {} ({})", d.disk, d.source_path.display());
        let view = open_view(d).map_err(|e| e.context(&label))?;
        let (index, report) =
            replicate_disk(&ctx, engine, vm, &repl, d, view.as_ref(), &mut window, observer)?;
        indexes.push(index);
        reports.push(report);
    }
    // What was read is the disks at the point's instant only if the views held all
    // along: checked before anything commits.
    views_held()?;

    // A run that crashed after writing the manifest finds it there: the point exists
    // and its indexes may not be rewritten.
    let committed = rt
        .block_on(store.manifest_exists(&vm.id, &repl.point_id))
        .map_err(|e| Error::from(e).context("checking for the manifest"))?;
    let manifest = if committed {
        let env = rt.block_on(store.get_manifest(&vm.id, &repl.point_id))?;
        Manifest::open(key, &env, &vm.id, &repl.point_id)
            .map_err(|e| e.context(format!("manifest of point {}", repl.point_id)))?
    } else {
        // Indexes, then the manifest: the commit point.
        let mut mdisks = Vec::new();
        for ((d, index), report) in disks.iter().zip(&indexes).zip(&reports) {
            let env = seal(key, ObjectKind::Index, &index.encode(), 3)?;
            rt.block_on(store.put_index(&vm.id, &repl.point_id, d.disk, Bytes::from(env)))
                .map_err(|e| Error::from(e).context(format!("storing the index of disk {}", d.disk)))?;
            mdisks.push(ManifestDisk {
                index: d.disk,
                source_name: d
                    .source_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("disk{}", d.disk)),
                source_format: d.source_format.clone(),
                virtual_size: d.virtual_size,
                chunk_size: repl.chunk_size,
                chunk_count: index.len() as u64,
                data_chunks: index.entries().iter().filter(|e| matches!(e, IndexEntry::Chunk(_))).count()
                    as u64,
                index_digest: index_digest(key, index),
                sha256: Some(report.sha256.clone()),
                base_point: None,
                segments: Vec::new(),
            });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: Manifest::needed_version(&mdisks),
            point_id: repl.point_id.clone(),
            instant: repl.instant.clone(),
            vm: ManifestVm {
                id: vm.id.clone(),
                name: vm.name.clone(),
                cpus: vm.cpus,
                memory_bytes: vm.memory_bytes,
                firmware: vm.firmware,
            },
            disks: mdisks,
        };
        let env = manifest.seal(key)?;
        rt.block_on(store.put_manifest(&vm.id, &repl.point_id, Bytes::from(env)))
            .map_err(|e| Error::from(e).context("storing the manifest"))?;
        manifest
    };
    let json =
        serde_json::to_string(&manifest).map_err(|e| Error::invalid(format!("encoding manifest: {e}")))?;
    db.finish_replication(&PointRow {
        vm_id: vm.id.clone(),
        point_id: repl.point_id.clone(),
        store_url: url.to_string(),
        instant: repl.instant.clone(),
        manifest: json,
    })?;
    // The snapshots are the tracking source's: it releases them (crate::track).
    Ok(ReplicateReport {
        vm: vm.name.clone(),
        point_id: repl.point_id,
        store_url: url.clone(),
        kind: PointKind::Full,
        instant: repl.instant.clone(),
        resumed,
        disks: reports,
        store_stats: store.stats(),
    })
}

/// Unregister VM `name`: refused while a replication of it runs; the snapshots of its
/// unfinished replications are released (reflink copies are deleted; images read in
/// place are never touched). Its points in the store are kept.
pub fn remove_vm(engine: &Engine, name: &str) -> Result<VmDef> {
    let vm = engine.vm(name)?;
    let _running = RunLock::acquire(engine, &vm.id, &vm.name)?;
    for r in engine.db().running_replications(&vm.id)? {
        let disks = engine.db().replication_disks(&vm.id, &r.point_id)?;
        release_snapshots(engine, &vm, &disks);
    }
    engine.db().vm_remove(&vm.name)
}

/// Move VM `name` to the store at `url` (a URL or a local path): its next replication
/// goes there, and commands about it read from there. Its points in the old store stay
/// there (migrate them with `--store OLD`); an unfinished replication to the old store
/// is abandoned and its snapshots released, since it can never be resumed into the new
/// one. Refused while a replication of the VM runs.
pub fn set_vm_store(engine: &Engine, name: &str, url: &str) -> Result<(VmDef, String)> {
    let vm = engine.vm(name)?;
    let url = crate::engine::normalize_store_url(url)?;
    tern_store::Store::open(&url).map_err(Error::from)?;
    let _running = RunLock::acquire(engine, &vm.id, &vm.name)?;
    for r in engine.db().running_replications(&vm.id)?.into_iter().filter(|r| r.store_url != url) {
        let disks = engine.db().replication_disks(&vm.id, &r.point_id)?;
        release_snapshots(engine, &vm, &disks);
        engine.db().finish_abandoned(&vm.id, &r.point_id)?;
    }
    engine.db().vm_set_store(&vm.id, &url)?;
    let old = engine.vm_store_url(&vm).to_string();
    Ok((VmDef { store_url: Some(url), ..vm }, old))
}

/// Remove the reflink snapshots a replication read (its disks `disks`), their folders
/// and the VM's snapshot folder when they are empty.
pub(crate) fn release_snapshots(engine: &Engine, vm: &VmDef, disks: &[ReplicationDiskRow]) {
    for d in disks.iter().filter(|d| d.snapshot_kind == SnapshotKind::Reflink.name()) {
        let _ = std::fs::remove_file(&d.read_path);
        if let Some(parent) = d.read_path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    let _ = std::fs::remove_dir(engine.data_dir().snapshots_dir().join(&vm.id));
}

/// The URL of a QEMU view read over NBD, as `replication_disks.read_path` holds it.
pub(crate) fn nbd_view_url(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Open what disk `d` of a replication reads: its snapshot, the image in place, or a
/// QEMU view over NBD.
fn open_view(d: &ReplicationDiskRow) -> Result<Box<dyn Disk>> {
    let kind = SnapshotKind::from_name(&d.snapshot_kind).ok_or_else(|| {
        Error::corrupt(format!("state database: disk {} has unknown view kind {:?}", d.disk, d.snapshot_kind))
    })?;
    crate::track::open_view(&d.read_path, kind, &d.source_format)
        .map_err(|e| e.context(format!("disk {}", d.disk)))
}

struct Ctx<'a> {
    key: &'a Key,
    store: &'a Store,
    rt: &'a tokio::runtime::Handle,
    throttle: &'a Throttle,
    opts: &'a ReplicateOptions,
    uploads: &'a AtomicU64,
    /// Guest bytes this run has processed, counting a chunk in flight by the share of
    /// its envelope already sent: what the progress bar and `tern status` show, so they
    /// move while a throttled chunk is uploading instead of jumping once it is done.
    live: &'a AtomicU64,
}

/// What a worker reports for one chunk.
struct ChunkDone {
    n: usize,
    address: Option<ChunkAddress>,
    guest: u64,
    /// Guest bytes of it already added to [`Ctx::live`] while it was uploading.
    credited: u64,
    read: u64,
    uploaded: u64,
    dedup: bool,
}

#[allow(clippy::too_many_arguments)]
fn replicate_disk(
    ctx: &Ctx<'_>,
    engine: &Engine,
    vm: &VmDef,
    repl: &ReplicationRow,
    d: &ReplicationDiskRow,
    disk: &dyn Disk,
    window: &mut RateWindow,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
) -> Result<(BaseIndex, DiskReport)> {
    let db = engine.db();
    let label = format!("disk {} ({})", d.disk, d.source_path.display());
    if disk.virtual_size() != d.virtual_size {
        return Err(Error::invalid(format!(
            "{label}: size changed from {} to {} bytes during replication; remove the VM's unfinished replication with `tern vm remove` and add it again",
            d.virtual_size,
            disk.virtual_size()
        )));
    }
    let mut index = BaseIndex::new(d.virtual_size, repl.chunk_size)?;
    let count = index.len();
    let mut done = vec![false; count];
    let snapshot = SnapshotKind::from_name(&d.snapshot_kind).ok_or_else(|| {
        Error::corrupt(format!("state database: {label} has unknown snapshot kind {:?}", d.snapshot_kind))
    })?;
    let mut report = DiskReport {
        disk: d.disk,
        virtual_size: d.virtual_size,
        chunks: count as u64,
        snapshot,
        ..Default::default()
    };
    let mut done_bytes = 0u64;
    for (n, addr) in db.recorded_chunks(&vm.id, &repl.point_id, d.disk)? {
        let n = usize::try_from(n).ok().filter(|&n| n < count).ok_or_else(|| {
            Error::corrupt(format!("state database: {label} records chunk {n}, past its {count} chunks"))
        })?;
        index.set(n, addr.map_or(IndexEntry::Zero, |a| IndexEntry::Chunk(ChunkAddress(a))))?;
        done[n] = true;
        report.resumed_chunks += 1;
        let r = index.chunk_range(n);
        done_bytes += r.end - r.start;
    }
    observer(ReplicateEvent::DiskStart { disk: d.disk, total: d.virtual_size, done: done_bytes });
    db.set_disk_state(&vm.id, &repl.point_id, d.disk, "copying")?;

    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<Result<ChunkDone>>(ctx.opts.threads * 4);
    // Chunks for the hashing thread: Some(buffer) holds the chunk's bytes, None = zeros.
    let (hash_tx, hash_rx) = mpsc::channel::<(usize, Option<Vec<u8>>)>();
    let pool = BufferPool::new(ctx.opts.threads * 2 + 1, repl.chunk_size as usize);
    let mut first_error: Option<Error> = None;
    let mut updates = Vec::new();
    let digest = std::thread::scope(|s| {
        let hashing = {
            let (abort, done, index, disk, pool, label) = (&abort, &done, &index, disk, &pool, &label);
            s.spawn(move || {
                let res = hash_disk(disk, index, done, hash_rx, pool);
                if res.is_err() {
                    abort.store(true, Ordering::Relaxed);
                    pool.wake_all();
                }
                res.map_err(|e| e.context(label))
            })
        };
        for _ in 0..ctx.opts.threads {
            let (tx, hash_tx) = (tx.clone(), hash_tx.clone());
            let (next, abort, done, label, pool) = (&next, &abort, &done, &label, &pool);
            let (size, csize) = (d.virtual_size, repl.chunk_size as u64);
            s.spawn(move || {
                // A buffer is taken before a chunk number, so the chunk the hashing
                // thread waits for always has one: the pool cannot deadlock.
                while let Some(mut buf) = pool.take(abort) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        pool.put(buf);
                        break;
                    }
                    if done[n] {
                        pool.put(buf);
                        continue;
                    }
                    let start = n as u64 * csize;
                    let range = start..(start + csize).min(size);
                    let res = process_chunk(ctx, disk, &mut buf, n, range.clone())
                        .map_err(|e| e.context(format!("{label}: chunk {n} at offset {}", range.start)));
                    let data = match &res {
                        Ok(c) if c.address.is_some() => Some(buf),
                        _ => {
                            pool.put(buf);
                            None
                        }
                    };
                    let failed = res.is_err();
                    if !failed && hash_tx.send((n, data)).is_err() {
                        abort.store(true, Ordering::Relaxed);
                        break;
                    }
                    if tx.send(res).is_err() || failed {
                        abort.store(true, Ordering::Relaxed);
                        pool.wake_all();
                        break;
                    }
                }
            });
        }
        drop(tx);
        drop(hash_tx);
        let mut batch: Vec<(u64, Option<[u8; 32]>, u64, u64)> = Vec::new();
        // The first finished chunks are recorded at once (a run killed early then has
        // progress to resume from); later ones in batches of up to a second.
        let mut last_flush = Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now);
        let mut last_rate = Instant::now();
        // Live progress already shown for this disk.
        let mut shown = ctx.live.load(Ordering::Relaxed);
        let flush = |batch: &mut Vec<_>, first_error: &mut Option<Error>| {
            if let Err(e) = db.record_chunks(&vm.id, &repl.point_id, d.disk, batch) {
                abort.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
            batch.clear();
        };
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(Ok(c)) => {
                    updates.push((c.n, c.address.map_or(IndexEntry::Zero, IndexEntry::Chunk)));
                    match (c.address, c.dedup) {
                        (None, _) => report.zero_chunks += 1,
                        (Some(_), true) => report.dedup_chunks += 1,
                        (Some(_), false) => report.uploaded_chunks += 1,
                    }
                    report.uploaded_bytes += c.uploaded;
                    report.read_bytes += c.read;
                    batch.push((c.n as u64, c.address.map(|a| a.0), c.guest, c.uploaded));
                    ctx.live.fetch_add(c.guest - c.credited.min(c.guest), Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    abort.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            let live = ctx.live.load(Ordering::Relaxed);
            if live > shown {
                observer(ReplicateEvent::Chunk { disk: d.disk, guest_bytes: live - shown });
                shown = live;
            }
            if batch.len() >= 256 || (!batch.is_empty() && last_flush.elapsed() >= Duration::from_secs(1)) {
                flush(&mut batch, &mut first_error);
                last_flush = Instant::now();
            }
            if last_rate.elapsed() >= Duration::from_secs(1) {
                last_rate = Instant::now();
                // Advisory (for `tern status`): a failure here is not the run's failure.
                let live = ctx.live.load(Ordering::Relaxed);
                let _ = db.record_rate(&vm.id, &repl.point_id, window.rate(last_rate, live), live);
            }
        }
        flush(&mut batch, &mut first_error);
        hashing.join().expect("hashing thread")
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let digest =
        digest?.ok_or_else(|| Error::corrupt(format!("{label}: chunks missing from the content hash")))?;
    for (n, e) in updates {
        index.set(n, e)?;
    }
    db.set_disk_state(&vm.id, &repl.point_id, d.disk, "done")?;
    observer(ReplicateEvent::DiskDone { disk: d.disk });
    report.sha256 = hex::encode(digest);
    Ok((index, report))
}

/// Guest bytes done over the last minute of a run, sampled about every second: the
/// rate `tern status` shows (an average since the start would hide a limit changed an
/// hour in, or a slow disk after a fast one).
struct RateWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(60);

    /// A window whose first sample is 0 bytes at `start` (the run's start), so that
    /// the rate is known from the first second on.
    fn starting(start: Instant) -> RateWindow {
        RateWindow { samples: [(start, 0)].into() }
    }

    /// Record that `total` bytes were done at `now`; bytes per second over the window,
    /// once it spans a second.
    fn rate(&mut self, now: Instant, total: u64) -> Option<u64> {
        self.samples.push_back((now, total));
        // Keep the newest sample at or before the window's start as its left edge.
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= Self::SPAN {
            self.samples.pop_front();
        }
        let &(t0, b0) = self.samples.front()?;
        let span = now.duration_since(t0).as_secs_f64();
        (span >= 1.0).then(|| (total.saturating_sub(b0) as f64 / span) as u64)
    }
}

/// Chunk-sized buffers shared by a disk's workers and its hashing thread.
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    moved: Condvar,
}

impl BufferPool {
    fn new(count: usize, size: usize) -> BufferPool {
        BufferPool { free: Mutex::new((0..count).map(|_| vec![0u8; size]).collect()), moved: Condvar::new() }
    }

    /// A free buffer; `None` once `abort` is set.
    fn take(&self, abort: &AtomicBool) -> Option<Vec<u8>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if abort.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(b) = free.pop() {
                return Some(b);
            }
            // The timeout only guards against a missed wake-up; put and wake_all notify.
            free = self
                .moved
                .wait_timeout(free, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn put(&self, buf: Vec<u8>) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        self.moved.notify_one();
    }

    fn wake_all(&self) {
        let _guard = self.free.lock().unwrap_or_else(|p| p.into_inner());
        self.moved.notify_all();
    }
}

/// SHA-256 of the guest content of `disk`, chunk by chunk in order: chunks recorded by
/// an earlier run (`done`) are read here (or are zero per `index`), the others arrive
/// from the workers. `None` when the workers stopped before every chunk arrived.
fn hash_disk(
    disk: &dyn Disk,
    index: &BaseIndex,
    done: &[bool],
    rx: mpsc::Receiver<(usize, Option<Vec<u8>>)>,
    pool: &BufferPool,
) -> Result<Option<[u8; 32]>> {
    let zeros = vec![0u8; index.chunk_size() as usize];
    let mut own = Vec::new();
    let mut pending: BTreeMap<usize, Option<Vec<u8>>> = BTreeMap::new();
    let mut hasher = Sha256::new();
    for (n, &recorded) in done.iter().enumerate().take(index.len()) {
        let range = index.chunk_range(n);
        let len = (range.end - range.start) as usize;
        if recorded {
            if let Some(IndexEntry::Chunk(_)) = index.get(n) {
                own.resize(len, 0);
                disk.read_at(&mut own[..len], range.start)
                    .map_err(|e| Error::from(e).context(format!("hashing chunk {n}")))?;
                hasher.update(&own[..len]);
            } else {
                hasher.update(&zeros[..len]);
            }
            continue;
        }
        let data = loop {
            if let Some(data) = pending.remove(&n) {
                break data;
            }
            match rx.recv() {
                Ok((m, data)) => {
                    pending.insert(m, data);
                }
                Err(_) => return Ok(None),
            }
        };
        match data {
            Some(buf) => {
                hasher.update(&buf[..len]);
                pool.put(buf);
            }
            None => hasher.update(&zeros[..len]),
        }
    }
    Ok(Some(hasher.finalize().into()))
}

/// Whether `disk` maps every byte of `range` as zero or unallocated.
fn mapped_zero(disk: &dyn Disk, range: &std::ops::Range<u64>) -> Result<bool> {
    let mut off = range.start;
    // Bounded: every pass advances by at least one byte or returns.
    while off < range.end {
        let m = disk.mapping(off, range.end - off)?;
        if m.length == 0 || m.start != off {
            return Err(Error::corrupt(format!("disk mapping returned a malformed run at offset {off}")));
        }
        if m.kind == MapKind::Data {
            return Ok(false);
        }
        off = m.end();
    }
    Ok(true)
}

fn process_chunk(
    ctx: &Ctx<'_>,
    disk: &dyn Disk,
    buf: &mut [u8],
    n: usize,
    range: std::ops::Range<u64>,
) -> Result<ChunkDone> {
    let len = (range.end - range.start) as usize;
    check_cancel(ctx.opts)?;
    let mut out =
        ChunkDone { n, address: None, guest: len as u64, credited: 0, read: 0, uploaded: 0, dedup: false };
    if mapped_zero(disk, &range)? {
        return Ok(out);
    }
    let buf = &mut buf[..len];
    disk.read_at(buf, range.start)?;
    out.read = len as u64;
    if tern_disk::is_zero(buf) {
        return Ok(out);
    }
    let address = chunk_address(ctx.key, buf);
    out.address = Some(address);
    if ctx.rt.block_on(ctx.store.chunk_exists(&address))? {
        out.dedup = true;
        return Ok(out);
    }
    if let Some(limit) = ctx.opts.fail_after_uploads {
        if ctx.uploads.fetch_add(1, Ordering::SeqCst) >= limit {
            return Err(Error::new(ErrorKind::Store, "injected failure (test)"));
        }
    }
    let env = Bytes::from(seal(ctx.key, ObjectKind::Chunk, buf, ctx.opts.compression_level)?);
    out.uploaded = env.len() as u64;
    // Each part the throttle admits credits its share of the chunk's guest bytes to the
    // live progress (never more than the chunk, even if a retry sends parts again).
    let credited = AtomicU64::new(0);
    let total = env.len() as u64;
    let sent = AtomicU64::new(0);
    let pacer = |remaining: u64| {
        let part = ctx.throttle.grant(remaining);
        let now = (sent.fetch_add(part, Ordering::Relaxed) + part).min(total);
        let share = (u128::from(out.guest) * u128::from(now) / u128::from(total.max(1))) as u64;
        let before = credited.fetch_max(share, Ordering::Relaxed);
        if share > before {
            ctx.live.fetch_add(share - before, Ordering::Relaxed);
        }
        part
    };
    // Retries are the store's (one policy, in crates/store/src/backend.rs): a failure
    // that reaches here has had them, and ends the run; its chunks in flight are sent
    // again when the run is resumed.
    match ctx.rt.block_on(ctx.store.put_chunk_paced(&address, env, &pacer)) {
        Ok(()) => {
            out.credited = credited.load(Ordering::Relaxed);
            Ok(out)
        }
        Err(e) => {
            // The chunk is not done: take its credit back from the live progress.
            ctx.live.fetch_sub(credited.load(Ordering::Relaxed), Ordering::Relaxed);
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_covers_the_last_minute_only() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = RateWindow::starting(t0);
        // Known from the first second on, counted from the run's start.
        assert_eq!(w.rate(at(1), 10_000_000), Some(10_000_000));
        // 10 MB/s for two minutes, then 1 MB/s.
        let mut total = 10_000_000;
        for s in 2..=120 {
            total += 10_000_000;
            w.rate(at(s), total);
        }
        assert_eq!(w.rate(at(120), total), Some(10_000_000));
        for s in 121..=180 {
            total += 1_000_000;
            w.rate(at(s), total);
        }
        assert_eq!(w.rate(at(180), total), Some(1_000_000));
        // Nothing for 30 s: the window still holds 30 s of 1 MB/s.
        assert_eq!(w.rate(at(210), total), Some(500_000));
        assert!(w.samples.len() <= 64, "{}", w.samples.len());
    }
}
