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
//! A crash loses at most the chunks in flight: recorded chunks are skipped on resume,
//! and unrecorded ones are re-read and found in the store before any upload.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_chunk::{chunk_address, seal, BaseIndex, ChunkAddress, IndexEntry, Key, ObjectKind};
use tern_disk::{Disk, MapKind, OpenOptions};
use tern_store::{Store, StoreStats};

use crate::manifest::{index_digest, new_point_id, Manifest, ManifestDisk, ManifestVm};
use crate::snapshot::{self, SnapshotKind};
use crate::throttle::Throttle;
use crate::{
    Engine, Error, ErrorKind, PointRow, ReplicationDiskRow, ReplicationRow, Result, VmDef, MANIFEST_FORMAT,
    MANIFEST_VERSION, MAX_THREADS,
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
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            threads: crate::DEFAULT_THREADS,
            force: false,
            compression_level: 1,
            fail_after_uploads: None,
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// The result of a replication.
#[derive(Debug, Clone)]
pub struct ReplicateReport {
    /// The VM.
    pub vm: String,
    /// The committed point.
    pub point_id: String,
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
    let (key, _) = engine.load_or_create_key()?;
    let store = engine.open_store()?;
    let rt = engine.runtime()?;
    let cfg = rt.block_on(engine.check_store(&store, &key, true))?;
    let db = engine.db();
    let url = engine.store_url();

    let mut resumed = false;
    let mut repl = None;
    if let Some(r) = db.running_replication(&vm.id, url)? {
        let disks = db.replication_disks(&vm.id, &r.point_id)?;
        let intact = disks.len() == vm.disks.len() && disks.iter().all(|d| d.read_path.exists());
        if intact {
            resumed = true;
            repl = Some((r, disks));
        } else {
            observer(ReplicateEvent::Warning(format!(
                "the snapshot of unfinished point {} is gone; starting a new replication",
                r.point_id
            )));
            db.finish_abandoned(&vm.id, &r.point_id)?;
        }
    }
    let (repl, disks) = match repl {
        Some(x) => x,
        None => start(engine, &vm, &cfg, opts, observer)?,
    };
    observer(ReplicateEvent::Point { point_id: repl.point_id.clone(), resumed });
    db.mark_run_started(&vm.id, &repl.point_id)?;

    let uploads = AtomicU64::new(0);
    let ctx = Ctx { key: &key, store: &store, rt: rt.handle(), throttle, opts, uploads: &uploads };
    let mut indexes = Vec::new();
    let mut reports = Vec::new();
    for d in &disks {
        let (index, report) = replicate_disk(&ctx, engine, &vm, &repl, d, observer)?;
        indexes.push(index);
        reports.push(report);
    }

    // A run that crashed after writing the manifest finds it there: the point exists
    // and its indexes may not be rewritten.
    let committed = rt
        .block_on(store.manifest_exists(&vm.id, &repl.point_id))
        .map_err(|e| Error::from(e).context("checking for the manifest"))?;
    let manifest = if committed {
        let env = rt.block_on(store.get_manifest(&vm.id, &repl.point_id))?;
        Manifest::open(&key, &env).map_err(|e| e.context(format!("manifest of point {}", repl.point_id)))?
    } else {
        // Indexes, then the manifest: the commit point.
        let mut mdisks = Vec::new();
        for (d, index) in disks.iter().zip(&indexes) {
            let env = seal(&key, ObjectKind::Index, &index.encode(), 3)?;
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
                index_digest: index_digest(&key, index),
            });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
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
        let env = manifest.seal(&key)?;
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
    release_snapshots(engine, &vm, &repl.point_id, &disks);
    Ok(ReplicateReport {
        vm: vm.name.clone(),
        point_id: repl.point_id,
        resumed,
        disks: reports,
        store_stats: store.stats(),
    })
}

fn snapshot_dir(engine: &Engine, vm: &VmDef, point: &str) -> std::path::PathBuf {
    engine.data_dir().snapshots_dir().join(&vm.id).join(point)
}

fn release_snapshots(engine: &Engine, vm: &VmDef, point: &str, disks: &[ReplicationDiskRow]) {
    for d in disks.iter().filter(|d| d.snapshot_kind == SnapshotKind::Reflink.name()) {
        let _ = std::fs::remove_file(&d.read_path);
    }
    let _ = std::fs::remove_dir(snapshot_dir(engine, vm, point));
    let _ = std::fs::remove_dir(engine.data_dir().snapshots_dir().join(&vm.id));
}

fn open_source(path: &Path) -> Result<Box<dyn Disk>> {
    // The VM's own disk: a backing file it names is part of its content.
    let o = OpenOptions { allow_backing: true, ..OpenOptions::read_only() };
    Ok(tern_disk::open_disk(path, &o)?)
}

fn start(
    engine: &Engine,
    vm: &VmDef,
    cfg: &tern_store::StoreConfig,
    opts: &ReplicateOptions,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
) -> Result<(ReplicationRow, Vec<ReplicationDiskRow>)> {
    let instant = time::OffsetDateTime::now_utc();
    let point_id = new_point_id(instant)?;
    let dir = snapshot_dir(engine, vm, &point_id);
    let mut disks = Vec::new();
    for (i, src) in vm.disks.iter().enumerate() {
        let disk = open_source(src).map_err(|e| e.context(format!("disk {i} of VM {}", vm.name)))?;
        let info = disk.info()?;
        // A relative backing file name would not resolve from the snapshot folder, so
        // images with a backing file are read in place.
        let snap = if info.backing.is_some() {
            let w = snapshot::writers_of(src)?;
            if !w.is_empty() && !opts.force {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "{} has a backing file and is open for writing: stop the VM or pass --force",
                        src.display()
                    ),
                ));
            }
            snapshot::Snapshot { path: src.clone(), kind: SnapshotKind::InPlace, warning: None }
        } else {
            snapshot::take(src, &dir, &format!("disk-{i}"), opts.force)?
        };
        if let Some(w) = &snap.warning {
            observer(ReplicateEvent::Warning(w.clone()));
        }
        disks.push(ReplicationDiskRow {
            disk: i as u32,
            source_path: src.clone(),
            read_path: snap.path,
            snapshot_kind: snap.kind.name().into(),
            source_format: info.format.name().into(),
            virtual_size: disk.virtual_size(),
            bytes_done: 0,
            bytes_uploaded: 0,
            state: "pending".into(),
        });
    }
    let row = ReplicationRow {
        vm_id: vm.id.clone(),
        point_id,
        store_url: engine.store_url().to_string(),
        state: "running".into(),
        instant: crate::rfc3339(instant),
        chunk_size: cfg.chunk_size,
        run_started: None,
        run_base_bytes: 0,
        finished: None,
    };
    engine.db().start_replication(&row, &disks)?;
    Ok((row, disks))
}

struct Ctx<'a> {
    key: &'a Key,
    store: &'a Store,
    rt: &'a tokio::runtime::Handle,
    throttle: &'a Throttle,
    opts: &'a ReplicateOptions,
    uploads: &'a AtomicU64,
}

/// What a worker reports for one chunk.
struct ChunkDone {
    n: usize,
    address: Option<ChunkAddress>,
    guest: u64,
    read: u64,
    uploaded: u64,
    dedup: bool,
}

fn replicate_disk(
    ctx: &Ctx<'_>,
    engine: &Engine,
    vm: &VmDef,
    repl: &ReplicationRow,
    d: &ReplicationDiskRow,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
) -> Result<(BaseIndex, DiskReport)> {
    let db = engine.db();
    let label = format!("disk {} ({})", d.disk, d.source_path.display());
    let disk = open_source(&d.read_path).map_err(|e| e.context(&label))?;
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
    let mut report =
        DiskReport { disk: d.disk, virtual_size: d.virtual_size, chunks: count as u64, ..Default::default() };
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
    let mut first_error: Option<Error> = None;
    let mut updates = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..ctx.opts.threads {
            let tx = tx.clone();
            let (next, abort, done, disk, label) = (&next, &abort, &done, disk.as_ref(), &label);
            let (size, csize) = (d.virtual_size, repl.chunk_size as u64);
            s.spawn(move || {
                let mut buf = vec![0u8; repl.chunk_size as usize];
                while !abort.load(Ordering::Relaxed) {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    if done[n] {
                        continue;
                    }
                    let start = n as u64 * csize;
                    let range = start..(start + csize).min(size);
                    let res = process_chunk(ctx, disk, &mut buf, n, range.clone())
                        .map_err(|e| e.context(format!("{label}: chunk {n} at offset {}", range.start)));
                    let failed = res.is_err();
                    if tx.send(res).is_err() || failed {
                        abort.store(true, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut batch: Vec<(u64, Option<[u8; 32]>, u64, u64)> = Vec::new();
        let mut last_flush = Instant::now();
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
                    observer(ReplicateEvent::Chunk { disk: d.disk, guest_bytes: c.guest });
                }
                Ok(Err(e)) => {
                    abort.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if batch.len() >= 256 || (!batch.is_empty() && last_flush.elapsed() >= Duration::from_secs(1)) {
                flush(&mut batch, &mut first_error);
                last_flush = Instant::now();
            }
        }
        flush(&mut batch, &mut first_error);
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    for (n, e) in updates {
        index.set(n, e)?;
    }
    db.set_disk_state(&vm.id, &repl.point_id, d.disk, "done")?;
    observer(ReplicateEvent::DiskDone { disk: d.disk });
    Ok((index, report))
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
    let mut out = ChunkDone { n, address: None, guest: len as u64, read: 0, uploaded: 0, dedup: false };
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
    ctx.throttle.acquire(env.len() as u64);
    out.uploaded = env.len() as u64;
    let mut attempt = 0;
    // Bounded retries of transient failures, with a growing pause.
    loop {
        match ctx.rt.block_on(ctx.store.put_chunk(&address, env.clone())) {
            Ok(()) => return Ok(out),
            Err(e) if e.kind() == tern_store::ErrorKind::Transient && attempt < 4 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(250 << attempt));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
