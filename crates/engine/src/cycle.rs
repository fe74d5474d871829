//! Replication passes, the same for every tracking source (crate::track): the first
//! pass reads a frozen view of every disk whole (the initial replication); every later
//! pass is a cycle that stages what changed since the previous cut into change logs in
//! the VM's work folder, releases the cut, and commits the changes as segments of a
//! version 2 manifest on the previous point's base (docs/continuous.md).
//!
//! What changed comes from the source: the extents QEMU's dirty bitmap recorded (the
//! `qemu` source), a log the source wrote itself, or nothing, in which case the whole
//! disk is compared with the previous point by chunk digest and only what differs is
//! shipped (the `scan` source of image files, and the resync of a QEMU VM whose
//! bitmaps were lost).
//!
//! The tracking state (`tracking` table) says which tracking sequence holds the
//! changes since the last committed point; [`TrackingSource::restore`] brings the
//! source back to that after any failure or kill, and says when it cannot.
//!
//! Order of a cycle, each step durable before the next:
//! 1. clean what a killed run left; restore tracking `seq`;
//! 2. the cut: every disk frozen at one instant, tracking `seq+1` started, `seq` stopped;
//! 3. stage: each disk's changes into a sealed change log; release the cut;
//! 4. upload each log as segment pieces, then the manifest (the commit point);
//! 5. record `seq+1` and the point in the state database; drop tracking `seq`; delete
//!    the logs.
//!
//! A failure in 2-4 takes the cut down and folds `seq+1` back into `seq` (nothing is
//! lost, the next cycle ships the union). A kill between 4 and 5 leaves the point
//! committed and both: restore folds them, and the next cycle ships a superset of the
//! changes, which is still exact.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde_json::json;
use tern_chunk::{chunk_address, seal, Key, ObjectKind};
use tern_store::Store;

use crate::changelog::{LogHeader, LogReader};
use crate::manifest::{next_point_id, Manifest, ManifestDisk, PieceRef, SegmentRef};
use crate::qemu::source::{start_nbd, QemuSource};
use crate::qemu::{Qmp, QmpError};
use crate::replicate::{full_pass, PointKind};
use crate::snapshot::SnapshotKind;
use crate::throttle::Throttle;
use crate::track::{Changes, Cut, ScanSource, Tracked, TrackingSource};
use crate::{
    DiskReport, Engine, Error, ErrorKind, PointRow, ReplicateEvent, ReplicateOptions, ReplicateReport,
    ReplicationDiskRow, ReplicationRow, Result, TrackingRow, VmDef,
};

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Tracking granularity: 64 KiB, qcow2's default cluster (QEMU's bitmaps, and the
/// unit a comparison ships).
const GRANULARITY: u64 = 64 << 10;
/// Default per-disk change log budget.
pub const DEFAULT_LOG_BUDGET: u64 = 16 << 30;

pub(crate) fn qmp_err(e: QmpError) -> Error {
    let kind = match &e {
        QmpError::Io { .. } | QmpError::Closed { .. } | QmpError::Timeout { .. } => ErrorKind::Io,
        _ => ErrorKind::InvalidInput,
    };
    Error::new(kind, e.to_string())
}

/// The work folder of a VM: change logs; for a QEMU VM also fleecing overlays and the
/// private NBD socket.
pub(crate) fn workdir(engine: &Engine, vm: &VmDef) -> PathBuf {
    engine.data_dir().root().join("tracking").join(&vm.id)
}

/// Bytes of change logs VM `vm` has on this host now (staged by a cycle in progress,
/// or left by one that was killed and not yet cleaned), and of its journal's segments
/// (`--tracking journal`: what the agent received since the last mark).
pub fn log_bytes(engine: &Engine, vm: &VmDef) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    let dir = workdir(engine, vm);
    walk(&dir.join("logs")) + walk(&dir.join("journal"))
}

/// What this pass does.
enum Plan {
    /// Read every disk whole and store it: tracking `seq` starts with the cut.
    Full { seq: u64, why: Option<String> },
    /// Tracking was lost: read every disk whole and ship, as a delta on point `base`,
    /// what differs from it; tracking `seq` starts with the cut.
    Resync { seq: u64, base: String, why: String },
    /// The source keeps no tracking (scan): compare every disk with point `base` and
    /// ship what differs.
    Scan { seq: u64, base: String },
    /// Ship what tracking `seq` recorded since point `base`.
    Delta { seq: u64, base: String },
    /// Tracking `seq` holds on some disks only: the others are compared with point
    /// `base` in the same cycle.
    Partly { seq: u64, base: String, why: String },
}

/// One replication pass of a VM: the initial replication, a cycle or a resync,
/// whichever the tracking state calls for. A VM in a QEMU is tracked by QEMU's dirty
/// bitmaps; a VM of image files is scanned.
pub(crate) fn run(
    engine: &Engine,
    vm: &VmDef,
    opts: &ReplicateOptions,
    throttle: &Throttle,
    observer: &(dyn Fn(ReplicateEvent) + Sync),
) -> Result<ReplicateReport> {
    let url = engine.replication_store_url(vm)?;
    let store = engine.open_store_at(&url, true)?;
    let rt = engine.runtime()?;
    let (key, _cfg) = rt.block_on(engine.key_for_writing(&store))?;
    let db = engine.db();
    if vm.store_url.is_none() {
        // The first replication fixes the VM's store: later commands about the VM use it.
        db.vm_set_store(&vm.id, &url)?;
    }
    let dir = workdir(engine, vm);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    // Garbage collection stays out while this pass reads and writes the store.
    let _lease = crate::lease::Lease::acquire(
        &store,
        rt.handle(),
        Some(&vm.id),
        &format!("replication of VM {}", vm.name),
    )?;
    let ctx =
        Pass { engine, rt: &rt, vm, store: &store, key: &key, url: &url, dir, opts, throttle, observer };
    let snapshots = engine.data_dir().snapshots_dir().join(&vm.id);
    let res = match &vm.qemu {
        Some(q) => match QemuSource::open(vm, &ctx.dir, GRANULARITY, opts.test_stagger) {
            Ok(src) => match (&opts.journals, q.journal) {
                (Some(journals), true) => {
                    let budget = db.settings(&vm.id)?.log_budget.unwrap_or(DEFAULT_LOG_BUDGET);
                    let src =
                        crate::journal::source::JournalSource::open(src, journals, vm, &ctx.dir, budget)?;
                    ctx.run(src)
                }
                (_, journal) => {
                    if journal {
                        observer(ReplicateEvent::Warning(
                            "the journal runs in `tern agent`: this pass is a dirty-bitmap cycle".into(),
                        ));
                    }
                    // A journal's mirrors (a killed agent's, or those of a VM switched
                    // back to bitmaps) would keep QEMU from starting the cut's backup job.
                    let mut src = src;
                    crate::journal::source::stop_mirrors(&mut src)?;
                    ctx.run(src)
                }
            },
            // A VM that is shut off is scanned: its images are read (never with
            // --force: nothing may have them open for writing) and compared with the
            // last point. Its bitmaps, persisted at the clean close, started before
            // that point and go on recording when QEMU starts again, so the next
            // cycle with QEMU is a delta again.
            Err(e) if qemu_down(&q.qmp) => {
                let why = format!(
                    "QEMU at {} is not running ({e}): scanning the VM's images instead",
                    q.qmp.display()
                );
                observer(ReplicateEvent::Warning(why.clone()));
                db.add_event(&vm.id, "scan", &why)?;
                ctx.run(ScanSource::new(vm, snapshots, false, GRANULARITY))
            }
            Err(e) => Err(e),
        },
        None => ctx.run(ScanSource::new(vm, snapshots, opts.force, GRANULARITY)),
    };
    if let Err(e) = &res {
        if let Ok(Some(mut t)) = db.tracking(&vm.id) {
            t.last_error = Some(e.to_string());
            let _ = db.set_tracking(&t);
        }
    }
    res
}

/// Compaction beside the cycles (docs/formats/segment.md, "Compaction"; the agent runs
/// it in a thread of its own): every disk of VM `vm`'s newest point whose chain is due
/// gets a base index of its own under that point, recorded for the next cycle to
/// rebase onto. Returns the point and the disks compacted; `None`: nothing was due.
/// Stops at the next chunk when `opts.cancel` is set.
pub fn compact_beside(
    engine: &Engine,
    vm: &VmDef,
    opts: &ReplicateOptions,
    throttle: &Throttle,
) -> Result<Option<(String, Vec<u32>)>> {
    let db = engine.db();
    let url = engine.replication_store_url(vm)?;
    let Some(point) = db.tracking(&vm.id)?.filter(|t| t.store_url == url).and_then(|t| t.last_point) else {
        return Ok(None);
    };
    // Due, judged from the cached manifest (the store's is read and checked below).
    let Some(json) = db.point_manifest(&url, &vm.id, &point)? else { return Ok(None) };
    let cached: Manifest = serde_json::from_str(&json)
        .map_err(|e| Error::corrupt(format!("cached manifest of {point}: {e}")))?;
    let due = |d: &ManifestDisk| -> Result<bool> {
        Ok(!d.segments.is_empty()
            && compaction_due(d, opts.compact_after_segments)
            && db.compactions(&vm.id, d.index)?.is_empty())
    };
    if !cached.disks.iter().try_fold(false, |any, d| Ok::<bool, Error>(any || due(d)?))? {
        return Ok(None);
    }
    let store = engine.open_store_at(&url, true)?;
    let rt = engine.runtime()?;
    let (key, _cfg) = rt.block_on(engine.key_for_writing(&store))?;
    let _lease = crate::lease::Lease::acquire(
        &store,
        rt.handle(),
        Some(&vm.id),
        &format!("compaction of VM {} (point {point})", vm.name),
    )?;
    let quiet = |_: ReplicateEvent| {};
    let pass = Pass {
        engine,
        rt: &rt,
        vm,
        store: &store,
        key: &key,
        url: &url,
        dir: workdir(engine, vm),
        opts,
        throttle,
        observer: &quiet,
    };
    let m = pass.manifest(&point)?;
    let mut done = Vec::new();
    for d in &m.disks {
        if !due(d)? {
            continue;
        }
        let (nd, stored) = pass.compact_disk(&point, d, None, &point, d.index, true)?;
        db.add_compaction(&crate::db::CompactionRow {
            vm_id: vm.id.clone(),
            disk: d.index,
            point_id: point.clone(),
            chain_base: d.base_point(&point).to_string(),
            segments: d.segments.len() as u64,
            last_segment: d.segments.last().map(|s| s.point_id.clone()).unwrap_or_default(),
            index_digest: nd.index_digest,
            data_chunks: nd.data_chunks,
            stored_bytes: stored,
        })?;
        done.push(d.index);
    }
    Ok(Some((point, done)))
}

/// Whether no QEMU listens on QMP socket `qmp` (no socket, or nothing accepting on
/// it): the VM is shut off. A QEMU that is there but slow or busy is not.
fn qemu_down(qmp: &Path) -> bool {
    match std::os::unix::net::UnixStream::connect(qmp) {
        Ok(_) => false,
        Err(e) => matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused),
    }
}

fn plan<S: TrackingSource>(
    src: &mut S,
    tracking: Option<&TrackingRow>,
    url: &str,
    points: &[String],
) -> Result<Plan> {
    let Some(t) = tracking.filter(|t| t.store_url == url) else {
        let seq = tracking.map_or(1, |t| t.seq + 1);
        return Ok(Plan::Full { seq, why: None });
    };
    // The newest point, if tracking's last point (or a newer one) is still there.
    let newest = points.last().filter(|p| t.last_point.as_ref().is_some_and(|l| *p >= l)).cloned();
    let Some(base) = newest else {
        let why = t
            .last_point
            .as_ref()
            .map(|_| "the point tracking builds on is gone from the store: replicating in full".to_string());
        return Ok(Plan::Full { seq: t.seq + 1, why });
    };
    let seq = t.seq + 1;
    match t.state.as_str() {
        "initial" => return Ok(Plan::Full { seq, why: None }),
        // A resync that did not finish: tracking was dropped for it.
        "resync" => return Ok(Plan::Resync { seq, base, why: String::new() }),
        // "delta" and "backlog": tracking covers everything since the point.
        _ => {}
    }
    Ok(match src.restore(t.seq)? {
        Tracked::Intact => Plan::Delta { seq: t.seq, base },
        Tracked::Lost(why) => Plan::Resync { seq, base, why },
        // The sequence stays: a scan keeps nothing that it names, and a QEMU VM
        // scanned while shut off keeps the bitmap that goes on after it.
        Tracked::Never => Plan::Scan { seq: t.seq, base },
        Tracked::Partly(_, why) => Plan::Partly { seq: t.seq, base, why },
    })
}

struct Pass<'a> {
    engine: &'a Engine,
    rt: &'a tokio::runtime::Runtime,
    vm: &'a VmDef,
    store: &'a Store,
    key: &'a Key,
    url: &'a str,
    /// The VM's work folder (change logs).
    dir: PathBuf,
    opts: &'a ReplicateOptions,
    throttle: &'a Throttle,
    observer: &'a (dyn Fn(ReplicateEvent) + Sync),
}

fn instant_of(t: SystemTime) -> time::OffsetDateTime {
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl Pass<'_> {
    fn set_tracking(&self, seq: u64, state: &str, last_point: Option<String>) -> Result<()> {
        self.engine.db().set_tracking(&TrackingRow {
            vm_id: self.vm.id.clone(),
            store_url: self.url.to_string(),
            seq,
            state: state.into(),
            last_point,
            last_error: None,
            updated: String::new(),
        })
    }

    fn run<S: TrackingSource>(&self, mut src: S) -> Result<ReplicateReport> {
        let (db, vm) = (self.engine.db(), self.vm);
        let tracking = db.tracking(&vm.id)?;
        // An initial replication whose tern was killed resumes from the same frozen
        // view while it is still there (tracking started at that view): only the
        // chunks not recorded yet are read.
        let mut resumable = None;
        if let Some(t) = tracking.as_ref().filter(|t| t.state == "initial" && t.store_url == self.url) {
            if let Some(r) = db.running_replication(&vm.id, self.url)? {
                let disks = db.replication_disks(&vm.id, &r.point_id)?;
                if let Some(cut) = src.resume(t.seq, &disks)? {
                    resumable = Some((t.seq, r, disks, cut));
                }
            }
        }
        if let Some((seq, repl, disks, mut cut)) = resumable {
            crate::replicate::forget_collected(self.engine, self.rt, self.store, &repl, &disks)?;
            let res = full_pass(
                self.engine,
                self.rt,
                vm,
                self.store,
                self.key,
                repl,
                disks,
                true,
                self.opts,
                self.throttle,
                self.observer,
                &mut || src.verify(&cut),
            );
            let released = src.release(&mut cut);
            let report = res?;
            self.set_tracking(seq, "delta", Some(report.point_id.clone()))?;
            released?;
            return Ok(report);
        }
        src.clean_leftovers()?;
        let points = self.rt.block_on(self.store.list_points(&vm.id))?;
        let warn = |why: &str| {
            if !why.is_empty() {
                (self.observer)(ReplicateEvent::Warning(why.to_string()));
            }
        };
        match plan(&mut src, tracking.as_ref(), self.url, &points)? {
            Plan::Full { seq, why } => {
                warn(why.as_deref().unwrap_or_default());
                self.full(&mut src, seq, tracking.as_ref(), points.last().map(String::as_str))
            }
            Plan::Resync { seq, base, why } => {
                warn(&why);
                if !why.is_empty() {
                    db.add_event(&vm.id, "resync", &why)?;
                }
                self.cycle(&mut src, seq, None, &base, PointKind::Resync)
            }
            Plan::Scan { seq, base } => self.cycle(&mut src, seq, None, &base, PointKind::Delta),
            Plan::Delta { seq, base } => self.cycle(&mut src, seq + 1, Some(seq), &base, PointKind::Delta),
            Plan::Partly { seq, base, why } => {
                warn(&why);
                db.add_event(&vm.id, "resync", &why)?;
                self.cycle(&mut src, seq + 1, Some(seq), &base, PointKind::Resync)
            }
        }
    }

    /// The initial replication: a fresh cut that starts tracking `seq`, and every disk
    /// read whole from it.
    fn full<S: TrackingSource>(
        &self,
        src: &mut S,
        seq: u64,
        before: Option<&TrackingRow>,
        newest: Option<&str>,
    ) -> Result<ReplicateReport> {
        let (db, vm) = (self.engine.db(), self.vm);
        // An unfinished full pass of a killed run read a view that is gone.
        if let Some(r) = db.running_replication(&vm.id, self.url)? {
            (self.observer)(ReplicateEvent::Warning(format!(
                "the snapshot of unfinished point {} is gone; starting a new replication",
                r.point_id
            )));
            // Its other snapshots would otherwise stay, diverging from the images.
            let disks = db.replication_disks(&vm.id, &r.point_id)?;
            crate::replicate::release_snapshots(self.engine, vm, &disks);
            db.finish_abandoned(&vm.id, &r.point_id)?;
        }
        src.drop_tracking()?;
        // Recorded before the cut: a kill from here on leaves a state that says a full
        // pass is due, never "delta" with tracking that started too late.
        let last = before.and_then(|t| t.last_point.clone());
        self.set_tracking(seq, "initial", last)?;
        let mut cut = src.cut(seq, true)?;
        for w in cut.disks().iter().filter_map(|d| d.warning.as_ref()) {
            (self.observer)(ReplicateEvent::Warning(w.clone()));
        }
        let res = (|| {
            let instant = instant_of(cut.instant());
            let point_id = next_point_id(instant, newest)?;
            let cfg = self.rt.block_on(self.store.read_config())?.ok_or_else(|| {
                Error::new(ErrorKind::Store, format!("store {} has no config", self.store.url()))
            })?;
            let disks: Vec<ReplicationDiskRow> = cut
                .disks()
                .iter()
                .enumerate()
                .map(|(i, d)| ReplicationDiskRow {
                    disk: i as u32,
                    source_path: vm.disks[i].path.clone(),
                    read_path: d.read_path.clone(),
                    snapshot_kind: d.snapshot.name().into(),
                    source_format: d.format.clone(),
                    virtual_size: d.size,
                    bytes_done: 0,
                    bytes_uploaded: 0,
                    state: "pending".into(),
                })
                .collect();
            let row = ReplicationRow {
                vm_id: vm.id.clone(),
                point_id,
                store_url: self.url.to_string(),
                state: "running".into(),
                instant: crate::rfc3339_ms(instant),
                chunk_size: cfg.chunk_size,
                run_started: None,
                run_base_bytes: 0,
                finished: None,
                recent_rate: None,
                run_live_bytes: 0,
            };
            db.start_replication(&row, &disks)?;
            full_pass(
                self.engine,
                self.rt,
                vm,
                self.store,
                self.key,
                row,
                disks,
                false,
                self.opts,
                self.throttle,
                self.observer,
                &mut || src.verify(&cut),
            )
        })();
        if res.is_err() && src.keeps_failed_cut() {
            // Tracking stays "initial": the next pass resumes from this cut.
            return res;
        }
        let released = src.release(&mut cut);
        let report = res?;
        self.set_tracking(seq, "delta", Some(report.point_id.clone()))?;
        released?;
        Ok(report)
    }

    /// The manifest of this VM's point `point`, checked.
    fn manifest(&self, point: &str) -> Result<Manifest> {
        let env = self.rt.block_on(self.store.get_manifest(&self.vm.id, point))?;
        Manifest::open(self.key, &env, &self.vm.id, point).map_err(|e| e.context(format!("point {point}")))
    }

    /// A cycle on point `base`: cut `seq` starts tracking `seq`. With `prev`, tracking
    /// `prev` stops at the cut and says what changed since `base`; without, tracking
    /// starts afresh (a resync, or a scan), and every disk is read whole and compared
    /// with `base` chunk by chunk (a chunk the base's segments do not touch by its
    /// address, without fetching it; one they touch by content, at the tracking
    /// granularity). What differs is committed as a delta point of kind `kind`.
    fn cycle<S: TrackingSource>(
        &self,
        src: &mut S,
        seq: u64,
        prev: Option<u64>,
        base: &str,
        kind: PointKind,
    ) -> Result<ReplicateReport> {
        let vm = self.vm;
        let base_m = self.manifest(base)?;
        if base_m.disks.len() != vm.disks.len() {
            return Err(Error::invalid(format!(
                "point {base} has {} disks, the VM {}: register the VM again",
                base_m.disks.len(),
                vm.disks.len()
            )));
        }
        let budget = self.engine.db().settings(&vm.id)?.log_budget.unwrap_or(DEFAULT_LOG_BUDGET);
        if prev.is_none() && kind == PointKind::Resync {
            // Tracking is dropped for the resync: a failure from here on resyncs again.
            src.drop_tracking()?;
            self.set_tracking(seq, "resync", Some(base.to_string()))?;
        }
        let mut cut = src.cut(seq, prev.is_none())?;
        for w in cut.disks().iter().filter_map(|d| d.warning.as_ref()) {
            (self.observer)(ReplicateEvent::Warning(w.clone()));
        }
        crate::test_stall("cut");
        let instant = instant_of(cut.instant());
        let logs_dir = self.dir.join("logs");
        let mut reads = Vec::new();
        let staged = (|| {
            let point_id = next_point_id(instant, Some(base))?;
            let mut logs = Vec::new();
            for (i, cd) in cut.disks().iter().enumerate() {
                let bd = &base_m.disks[i];
                if cd.size != bd.virtual_size {
                    return Err(Error::invalid(format!(
                        "disk {i} changed size from {} to {} bytes: remove the VM and add it again",
                        bd.virtual_size, cd.size
                    )));
                }
                let header = log_header(&vm.id, i, seq, instant, cd.size, src.granularity());
                let dir = logs_dir.join(format!("disk-{i}"));
                crate::replicate::check_cancel(self.opts)?;
                let (log, read) = match src.changes(&cut, i, &dir, header)? {
                    Changes::Logged(log) => (log, 0),
                    Changes::Extents(extents) => {
                        let view = cd.open().map_err(|e| e.context(format!("disk {i}: opening the view")))?;
                        let log = crate::track::stage_extents(&*view, &extents, &dir, header, budget)
                            .map_err(|e| e.context(format!("disk {i}")))?;
                        let read = log.data_bytes;
                        (log, read)
                    }
                    Changes::Unknown => {
                        let view = cd.open().map_err(|e| e.context(format!("disk {i}: opening the view")))?;
                        let prev = self.rt.block_on(crate::point::PointReader::open(
                            self.key,
                            self.store,
                            self.rt.handle().clone(),
                            &vm.id,
                            base,
                            bd,
                        ))?;
                        (self.observer)(ReplicateEvent::DiskStart {
                            disk: i as u32,
                            total: cd.size,
                            done: 0,
                        });
                        let mut read = 0u64;
                        let log = compare_into_log(self.key, &*view, &prev, &dir, header, &mut read, &|n| {
                            (self.observer)(ReplicateEvent::Chunk { disk: i as u32, guest_bytes: n })
                        })
                        .map_err(|e| e.context(format!("disk {i}")))?;
                        (log, read)
                    }
                };
                logs.push(log);
                reads.push(read);
                crate::test_stall("stage");
            }
            src.verify(&cut)?;
            Ok((point_id, logs))
        })();
        // The view is needed no longer: the copy-before-write window ends here.
        let released = src.release(&mut cut);
        let staging_failed = staged.is_err();
        let snapshots: Vec<SnapshotKind> = cut.disks().iter().map(|d| d.snapshot).collect();
        let committed = staged.and_then(|(point_id, logs)| {
            released?;
            self.commit_delta(&base_m, base, &point_id, instant, &logs, &snapshots)
        });
        let _ = std::fs::remove_dir_all(&logs_dir);
        let mut report = match (committed, prev) {
            (Ok(r), _) => r,
            // A resync or scan: nothing was tracked that could be lost.
            (Err(e), None) => return Err(e),
            // Keep every change for the next cycle.
            (Err(e), Some(prev)) => {
                // Intact where it was: a disk found lost before this cycle is found
                // lost again, and compared again next time.
                let kept = |t: &Tracked| matches!(t, Tracked::Intact | Tracked::Partly(..));
                return match src.restore(prev) {
                    Ok(t) if kept(&t) && staging_failed && e.kind() == ErrorKind::Busy => {
                        let _ = self.set_tracking(prev, "backlog", Some(base.to_string()));
                        let _ = self.engine.db().add_event(&vm.id, "backlog", &e.to_string());
                        Err(Error::new(
                            ErrorKind::Busy,
                            format!(
                                "backlog: {e}; the changes stay tracked in QEMU and ship once they fit \
                                 (raise the budget with `tern replicate {} --log-budget SIZE`, or free space)",
                                vm.name
                            ),
                        ))
                    }
                    Ok(t) if kept(&t) => Err(e),
                    Ok(_) => {
                        let _ = self.set_tracking(prev, "resync", Some(base.to_string()));
                        Err(e.context("and the changes tracked could not be kept (a resync follows)"))
                    }
                    Err(re) => Err(e.context(format!("and keeping the changes tracked failed ({re})"))),
                };
            }
        };
        for (d, read) in report.disks.iter_mut().zip(&reads) {
            d.read_bytes = *read;
        }
        report.kind = kind;
        self.set_tracking(seq, "delta", Some(report.point_id.clone()))?;
        if let Some(prev) = prev {
            // A failure here leaves tracking that restore() drops next time.
            if let Err(e) = src.committed(prev) {
                (self.observer)(ReplicateEvent::Warning(e.to_string()));
            }
        }
        Ok(report)
    }

    /// Compaction: disk `i` of the new point `point_id` gets a base index of its own,
    /// the base of point `base` with every chunk that the base's segments or this
    /// cycle's log touch rewritten (read through the point reader, the log laid over
    /// it); untouched chunks keep their addresses. Returns the disk's manifest entry
    /// and the envelope bytes uploaded.
    fn compact_disk(
        &self,
        base: &str,
        bd: &ManifestDisk,
        log: Option<&LogReader>,
        point_id: &str,
        i: u32,
        beside: bool,
    ) -> Result<(ManifestDisk, u64)> {
        use tern_chunk::{BaseIndex, IndexEntry};
        let (vm, key, store) = (self.vm, self.key, self.store);
        let prev = self.rt.block_on(crate::point::PointReader::open(
            key,
            store,
            self.rt.handle().clone(),
            &vm.id,
            base,
            bd,
        ))?;
        let mut index = BaseIndex::new(bd.virtual_size, bd.chunk_size)?;
        let records = log.map_or(&[][..], |l| l.records());
        let mut buf = vec![0u8; bd.chunk_size as usize];
        let mut rec_buf = Vec::new();
        let mut stored = 0u64;
        let pacer = |remaining: u64| self.throttle.grant(remaining);
        for n in 0..prev.chunk_count() {
            let r = prev.chunk_range(n);
            let first = records.partition_point(|x| x.offset + x.length <= r.start);
            let over: Vec<_> = records[first..].iter().take_while(|x| x.offset < r.end).collect();
            if over.is_empty() && prev.untouched(r.clone()) {
                let e = prev.base_entry(n).unwrap_or(IndexEntry::Zero);
                index.set(n, e)?;
                continue;
            }
            crate::replicate::check_cancel(self.opts)?;
            let b = &mut buf[..(r.end - r.start) as usize];
            prev.read_chunk(n, b)?;
            for x in over {
                rec_buf.resize(x.length as usize, 0);
                log.expect("records come from the log").read(x, &mut rec_buf)?;
                let (a, z) = (x.offset.max(r.start), (x.offset + x.length).min(r.end));
                b[(a - r.start) as usize..(z - r.start) as usize]
                    .copy_from_slice(&rec_buf[(a - x.offset) as usize..(z - x.offset) as usize]);
            }
            if tern_disk::is_zero(b) {
                index.set(n, IndexEntry::Zero)?;
                continue;
            }
            let address = chunk_address(key, b);
            if !self.rt.block_on(store.chunk_exists(&address))? {
                let env = Bytes::from(seal(key, ObjectKind::Chunk, b, self.opts.compression_level)?);
                stored += env.len() as u64;
                self.rt
                    .block_on(store.put_chunk_paced(&address, env, &pacer))
                    .map_err(|e| Error::from(e).context(format!("storing chunk {n} of disk {i}")))?;
            }
            index.set(n, IndexEntry::Chunk(address))?;
        }
        let env = seal(key, ObjectKind::Index, &index.encode(), 3)?;
        stored += env.len() as u64;
        let digest = crate::manifest::index_digest(key, &index);
        let put = if beside {
            // Beside the cycles: added to the committed point, create-only. One there
            // already is a killed compaction's of the same state: the same digest.
            match self.rt.block_on(store.add_index(&vm.id, point_id, i, Bytes::from(env))) {
                Err(e) if e.kind() == tern_store::ErrorKind::AlreadyExists => {
                    let there = ManifestDisk { base_point: None, index_digest: digest.clone(), ..bd.clone() };
                    self.rt
                        .block_on(crate::point::fetch_index(key, store, &vm.id, point_id, &there))
                        .map(|_| ())
                }
                r => r.map_err(Error::from),
            }
        } else {
            self.rt.block_on(store.put_index(&vm.id, point_id, i, Bytes::from(env))).map_err(Error::from)
        };
        put.map_err(|e| e.context(format!("storing the compacted index of disk {i}")))?;
        let d = ManifestDisk {
            base_point: None,
            segments: Vec::new(),
            sha256: None,
            data_chunks: index.entries().iter().filter(|e| matches!(e, IndexEntry::Chunk(_))).count() as u64,
            index_digest: digest,
            ..bd.clone()
        };
        Ok((d, stored))
    }

    /// The chain `bd` (the base point's disk `i`) rebased onto a compaction done beside
    /// the cycles, if one folded a prefix of it and its index is in the store with the
    /// digest recorded (under this pass's lease: no collection runs until the new
    /// manifest references it). A record that no longer fits is dropped.
    /// Records used or found stale are added to `spent`, to be forgotten once the new
    /// point is committed.
    fn compacted_base(
        &self,
        bd: &ManifestDisk,
        i: u32,
        spent: &mut Vec<(u32, String)>,
    ) -> Result<Option<ManifestDisk>> {
        let db = self.engine.db();
        for row in db.compactions(&self.vm.id, i)? {
            spent.push((i, row.point_id.clone()));
            let n = row.segments as usize;
            let fits = bd.base_point.as_deref() == Some(row.chain_base.as_str())
                && n > 0
                && bd.segments.len() >= n
                && bd.segments[n - 1].point_id == row.last_segment;
            if !fits {
                continue;
            }
            let on = ManifestDisk {
                base_point: Some(row.point_id.clone()),
                segments: bd.segments[n..].to_vec(),
                index_digest: row.index_digest.clone(),
                data_chunks: row.data_chunks,
                sha256: None,
                ..bd.clone()
            };
            match self.rt.block_on(crate::point::fetch_index(
                self.key,
                self.store,
                &self.vm.id,
                &row.point_id,
                &on,
            )) {
                Ok(_) => return Ok(Some(on)),
                Err(e) => (self.observer)(ReplicateEvent::Warning(format!(
                    "disk {i}: the compaction of point {} is not usable ({e}); the chain goes on",
                    row.point_id
                ))),
            }
        }
        Ok(None)
    }

    /// Disk `i` of the new point `point_id` as a segment on point `base`'s chain: the
    /// log's records in pieces, uploaded. Returns the disk's manifest entry and the
    /// envelope bytes uploaded.
    fn segment_disk(
        &self,
        base: &str,
        bd: &ManifestDisk,
        log: &LogReader,
        changed_bytes: u64,
        point_id: &str,
        i: u32,
    ) -> Result<(ManifestDisk, u64)> {
        let (vm, key, store) = (self.vm, self.key, self.store);
        let mut stored = 0u64;
        let mut pieces = Vec::new();
        let pacer = |remaining: u64| self.throttle.grant(remaining);
        crate::segment::split(log, bd.chunk_size as usize, |k, piece| {
            crate::replicate::check_cancel(self.opts)?;
            let plain = piece.encode();
            let digest = chunk_address(key, &plain).to_hex();
            let env = Bytes::from(seal(key, ObjectKind::Segment, &plain, self.opts.compression_level)?);
            stored += env.len() as u64;
            self.rt
                .block_on(store.put_segment_paced(&vm.id, point_id, i, k, env, &pacer))
                .map_err(|e| Error::from(e).context(format!("storing segment piece {k} of disk {i}")))?;
            (self.observer)(ReplicateEvent::Chunk { disk: i, guest_bytes: piece.changed_bytes() });
            pieces.push(PieceRef { start: piece.start, end: piece.end, digest });
            crate::test_stall("upload");
            Ok(())
        })?;
        let mut d =
            ManifestDisk { base_point: Some(bd.base_point(base).to_string()), sha256: None, ..bd.clone() };
        if !pieces.is_empty() {
            d.segments.push(SegmentRef {
                point_id: point_id.to_string(),
                changed_bytes,
                stored_bytes: stored,
                pieces,
            });
        }
        Ok((d, stored))
    }

    fn commit_delta(
        &self,
        base_m: &Manifest,
        base: &str,
        point_id: &str,
        instant: time::OffsetDateTime,
        logs: &[crate::changelog::SealedLog],
        snapshots: &[SnapshotKind],
    ) -> Result<ReplicateReport> {
        let (vm, key, store) = (self.vm, self.key, self.store);
        (self.observer)(ReplicateEvent::Point { point_id: point_id.to_string(), resumed: false });
        let mut disks = Vec::new();
        let mut reports = Vec::new();
        // Background compactions used by this point, or found stale: (disk, point).
        let mut spent = Vec::new();
        for (i, (bd, log)) in base_m.disks.iter().zip(logs).enumerate() {
            let reader = LogReader::open(&log.path)?;
            (self.observer)(ReplicateEvent::DiskStart { disk: i as u32, total: log.changed_bytes, done: 0 });
            // A compaction done beside the cycles (the agent) that this chain still
            // starts with: rebase onto it.
            let rebased = if self.opts.background_compaction {
                self.compacted_base(bd, i as u32, &mut spent)?
            } else {
                None
            };
            let after = self.opts.compact_after_segments;
            let compacted = rebased.is_none()
                && if self.opts.background_compaction {
                    // Only a chain no background compaction kept up with.
                    bd.segments.len() + 1 >= 4 * after.max(1)
                } else {
                    compaction_due(bd, after)
                };
            let (d, stored) = if compacted {
                self.compact_disk(base, bd, Some(&reader), point_id, i as u32, false)?
            } else {
                let on = rebased.as_ref().unwrap_or(bd);
                self.segment_disk(base, on, &reader, log.changed_bytes, point_id, i as u32)?
            };
            (self.observer)(ReplicateEvent::DiskDone { disk: i as u32 });
            reports.push(DiskReport {
                disk: i as u32,
                virtual_size: bd.virtual_size,
                read_bytes: log.data_bytes,
                uploaded_bytes: stored,
                changed_bytes: log.changed_bytes,
                snapshot: snapshots.get(i).copied().unwrap_or_default(),
                compacted,
                ..Default::default()
            });
            disks.push(d);
        }
        let manifest = Manifest {
            format: crate::MANIFEST_FORMAT.into(),
            version: Manifest::needed_version(&disks),
            point_id: point_id.to_string(),
            instant: crate::rfc3339_ms(instant),
            vm: crate::ManifestVm {
                id: vm.id.clone(),
                name: vm.name.clone(),
                cpus: vm.cpus,
                memory_bytes: vm.memory_bytes,
                firmware: vm.firmware,
            },
            disks,
        };
        let env = manifest.seal(key)?;
        self.rt
            .block_on(store.put_manifest(&vm.id, point_id, Bytes::from(env)))
            .map_err(|e| Error::from(e).context("storing the manifest"))?;
        crate::test_stall("commit");
        for (disk, point) in &spent {
            self.engine.db().remove_compaction(&vm.id, *disk, point)?;
        }
        let json = serde_json::to_string(&manifest)
            .map_err(|e| Error::invalid(format!("encoding manifest: {e}")))?;
        self.engine.db().cache_point(&PointRow {
            vm_id: vm.id.clone(),
            point_id: point_id.to_string(),
            store_url: self.url.to_string(),
            instant: manifest.instant.clone(),
            manifest: json,
        })?;
        Ok(ReplicateReport {
            vm: vm.name.clone(),
            point_id: point_id.to_string(),
            kind: PointKind::Delta,
            instant: manifest.instant.clone(),
            store_url: self.url.to_string(),
            resumed: false,
            disks: reports,
            store_stats: store.stats(),
        })
    }
}

/// The header of disk `disk`'s change log for cycle `seq`, cut at `instant`.
fn log_header(
    vm_id: &str,
    disk: usize,
    seq: u64,
    instant: time::OffsetDateTime,
    size: u64,
    granularity: u64,
) -> LogHeader {
    LogHeader {
        vm_id: vm_id_bytes(vm_id),
        disk: disk as u32,
        seq,
        instant_ms: (instant.unix_timestamp_nanos() / 1_000_000) as u64,
        virtual_size: size,
        granularity,
    }
}

pub(crate) fn vm_id_bytes(id: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    if let Ok(v) = hex::decode(id) {
        let n = v.len().min(16);
        b[..n].copy_from_slice(&v[..n]);
    }
    b
}

/// What `tern vm add --qmp` asks for.
#[derive(Debug, Clone)]
pub struct QemuVmSpec {
    /// The VM's name.
    pub name: String,
    /// QEMU's QMP socket (one tern may use alone).
    pub qmp: PathBuf,
    /// The disks' block nodes; empty: discover them (the devices' root nodes, or on
    /// qemu-storage-daemon, which has no devices, the nodes its exports serve).
    pub nodes: Vec<String>,
    /// The socket of the NBD server already running in QEMU, if one is.
    pub nbd: Option<PathBuf>,
    /// Push mode (QEMU copies each cut into local files) when `Some(true)`, pull mode
    /// (tern reads NBD exports) when `Some(false)`; `None`: pull when an NBD server is
    /// usable (`nbd`, or one tern can start), else push.
    pub push: Option<bool>,
    /// Track by journal (`--tracking journal`): needs pull mode.
    pub journal: bool,
    /// vCPUs, memory and firmware when QEMU cannot tell (qemu-storage-daemon) or the
    /// user says otherwise.
    pub cpus: Option<u32>,
    /// See `cpus`.
    pub memory_bytes: Option<u64>,
    /// See `cpus`.
    pub firmware: Option<crate::Firmware>,
}

/// Register a VM running in QEMU: its disks discovered over QMP, with their image
/// files, formats and sizes; vCPUs and memory read over QMP where QEMU reports them,
/// firmware UEFI when QEMU has pflash drives. Checks that tern can cut the VM: the
/// NBD server (tern's own, or the one named by `nbd`) is usable.
pub fn add_qemu_vm(engine: &Engine, spec: &QemuVmSpec) -> Result<VmDef> {
    crate::check_name(&spec.name)?;
    let qmp_path = std::fs::canonicalize(&spec.qmp)
        .map_err(|e| Error::io(format!("QMP socket {}", spec.qmp.display()), e))?;
    let mut qmp = Qmp::connect(&qmp_path, QMP_TIMEOUT).map_err(qmp_err)?;
    let block = qmp.execute("query-block", None).map_err(qmp_err)?;
    let devices: Vec<&serde_json::Value> = block.as_array().map(|a| a.iter().collect()).unwrap_or_default();
    // A pflash drive given with -drive if=pflash is named pflash0; given as libvirt
    // does (-blockdev, -machine pflash0=NODE) it has no name and its qdev path says.
    let pflash = |d: &&serde_json::Value| {
        d["device"].as_str().is_some_and(|n| n.starts_with("pflash"))
            || d["qdev"].as_str().is_some_and(|q| q.starts_with("/machine/system.flash"))
    };
    let uefi = devices.iter().any(pflash);
    let mut nodes = spec.nodes.clone();
    // Disks found behind devices are remembered by device too: a node QEMU named
    // itself (`#block123`, for `-drive` without `node-name`) is named anew each time
    // QEMU starts, the device is not.
    let mut by_device = Vec::new();
    if nodes.is_empty() {
        for d in devices.iter().filter(|d| d["removable"] != true && !pflash(d)) {
            let Some(node) = d["inserted"]["node-name"].as_str() else { continue };
            nodes.push(node.to_string());
            by_device.push(crate::qemu::source::device_id(d).unwrap_or_default());
        }
    }
    if nodes.is_empty() {
        let exports = qmp.execute("query-block-exports", None).map_err(qmp_err)?;
        nodes = exports
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| !x["id"].as_str().is_some_and(|i| i.starts_with("tern-")))
                    .filter_map(|x| x["node-name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        // QEMU lists exports in no useful order: node-name order (--node to choose).
        nodes.sort();
        nodes.dedup();
    }
    if nodes.is_empty() {
        return Err(Error::invalid(format!(
            "QEMU at {} has no disks tern can find (no devices with media, no exports): name them with --node",
            qmp_path.display()
        )));
    }
    let all = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true }))).map_err(qmp_err)?;
    let mut disks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        if nodes[..i].contains(node) {
            return Err(Error::invalid(format!("node {node:?} is given twice: give each disk once")));
        }
        let n = all.as_array().and_then(|a| a.iter().find(|n| n["node-name"] == node.as_str())).ok_or_else(
            || {
                Error::new(
                    ErrorKind::NotFound,
                    format!("QEMU at {} has no block node {node:?}", qmp_path.display()),
                )
            },
        )?;
        let file = n["file"].as_str().unwrap_or_default();
        let format = match n["drv"].as_str() {
            Some("qcow2") => Some(tern_disk::Format::Qcow2),
            Some("raw") | Some("file") | Some("host_device") => Some(tern_disk::Format::Raw),
            _ => None,
        };
        if n["image"]["virtual-size"].as_u64().unwrap_or(0) == 0 {
            return Err(Error::invalid(format!("node {node:?} is empty (0 bytes)")));
        }
        disks.push(crate::VmDisk { path: PathBuf::from(file), format });
    }
    let cpus = match spec.cpus {
        Some(c) => c,
        None => qmp
            .execute("query-cpus-fast", None)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len() as u32))
            .filter(|&n| n > 0)
            .unwrap_or(2),
    };
    let memory_bytes = match spec.memory_bytes {
        Some(m) => m,
        None => qmp
            .execute("query-memory-size-summary", None)
            .ok()
            // The guest's memory: the boot memory and any DIMMs plugged in.
            .and_then(|v| v["base-memory"].as_u64()?.checked_add(v["plugged-memory"].as_u64().unwrap_or(0)))
            .unwrap_or(2 << 30),
    };
    let firmware = spec.firmware.unwrap_or(if uefi { crate::Firmware::Uefi } else { crate::Firmware::Bios });
    let mut vm = VmDef {
        id: crate::new_vm_id()?,
        name: spec.name.clone(),
        cpus,
        memory_bytes,
        firmware,
        disks,
        store_url: engine.explicit_store().map(String::from),
        qemu: Some(crate::QemuSource {
            qmp: qmp_path.clone(),
            nbd: spec.nbd.clone(),
            nodes: nodes.clone(),
            push: spec.push == Some(true),
            devices: by_device,
            journal: spec.journal,
        }),
    }
    .validate()?;
    for other in engine.db().vm_list()? {
        if let Some(o) = &other.qemu {
            if o.qmp == qmp_path && o.nodes.iter().any(|n| nodes.contains(n)) {
                return Err(Error::invalid(format!(
                    "a disk of this QEMU is already in VM {} (a node can belong to one VM only)",
                    other.name
                )));
            }
        }
    }
    if spec.push == Some(true) && spec.nbd.is_some() {
        return Err(Error::invalid(
            "push mode does not use an NBD server: give --nbd (pull mode) or push mode, not both",
        ));
    }
    // Pull mode's exports need an NBD server: tern's own, or the one the user named.
    match &spec.nbd {
        None if spec.push == Some(true) => {}
        None => {
            let dir = workdir(engine, &vm);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let sock = crate::paths::socket_path(&dir, "nbd.sock")?;
            if start_nbd(&mut qmp, &sock)? {
                let _ = qmp.execute("nbd-server-stop", None);
            } else if spec.push.is_none() {
                // QEMU's one NBD server is in use by someone else: QEMU pushes instead.
                vm.qemu.as_mut().expect("set above").push = true;
            } else {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "QEMU at {} already runs an NBD server (a QEMU has one): give its UNIX socket with --nbd \
                         so that tern adds its read-only exports there, or let QEMU push (--mode push)",
                        qmp_path.display()
                    ),
                ));
            }
        }
        Some(sock) => {
            vm.qemu.as_mut().expect("set above").nbd = Some(
                std::fs::canonicalize(sock)
                    .map_err(|e| Error::io(format!("NBD socket {}", sock.display()), e))?,
            );
        }
    }
    let schema = crate::qemu::caps::Schema::query(&mut qmp).map_err(qmp_err)?;
    let push = vm.qemu.as_ref().expect("set above").push;
    if spec.journal && push {
        return Err(Error::invalid(format!(
            "--tracking journal reads the live disks over QEMU's NBD server when it resyncs, and QEMU at {} \
             has one tern cannot use: give its socket with --nbd",
            qmp_path.display()
        )));
    }
    let missing = crate::qemu::caps::missing(&schema, push);
    if !missing.is_empty() {
        return Err(Error::invalid(format!(
            "QEMU at {} ({}) lacks what tern needs{}: {}",
            qmp_path.display(),
            qmp.version(),
            if push { " in push mode" } else { " in pull mode" },
            missing.join(", ")
        )));
    }
    engine.db().vm_add(&vm)?;
    Ok(vm)
}

/// Compare `view` (the disk now) with `prev` (the disk at the last point) chunk by
/// chunk and write what differs, at the log's granularity, into a change log; adds
/// the bytes read from `view` to `read`. Returns the sealed log.
fn compare_into_log(
    key: &Key,
    view: &dyn tern_disk::Disk,
    prev: &crate::point::PointReader,
    dir: &Path,
    header: LogHeader,
    read: &mut u64,
    progress: &dyn Fn(u64),
) -> Result<crate::changelog::SealedLog> {
    use tern_chunk::IndexEntry;
    let g = header.granularity.max(512) as usize;
    let mut log = crate::changelog::LogWriter::create(dir, header)?;
    let mut now = vec![0u8; prev.chunk_size() as usize];
    let mut then = vec![0u8; prev.chunk_size() as usize];
    for n in 0..prev.chunk_count() {
        let r = prev.chunk_range(n);
        let len = (r.end - r.start) as usize;
        let (now, then) = (&mut now[..len], &mut then[..len]);
        let zero_now = view_zero(view, r.clone())?;
        if zero_now {
            now.fill(0);
        } else {
            view.read_at(now, r.start)?;
            *read += len as u64;
        }
        let untouched = prev.untouched(r.clone());
        if untouched {
            // Compared by address first: an unchanged chunk is not fetched.
            let same = match prev.base_entry(n) {
                Some(IndexEntry::Chunk(a)) => !zero_now && chunk_address(key, now) == a,
                _ => tern_disk::is_zero(now),
            };
            if same {
                progress(len as u64);
                continue;
            }
        }
        // Different (or touched by segments): the old content, to ship only the
        // granules that differ.
        match prev.base_entry(n) {
            Some(IndexEntry::Chunk(_)) => {
                prev.read_chunk(n, then)?;
            }
            _ if untouched => then.fill(0),
            _ => {
                prev.read_chunk(n, then)?;
            }
        }
        let mut at = 0usize;
        while at < len {
            let e = (at + g).min(len);
            if now[at..e] != then[at..e] {
                write_run(&mut log, &now[at..e], r.start + at as u64)?;
            }
            at = e;
        }
        progress(len as u64);
    }
    log.seal()
}

/// Log `bytes` at `offset`: as zeros when they are.
fn write_run(log: &mut crate::changelog::LogWriter, bytes: &[u8], offset: u64) -> Result<()> {
    if tern_disk::is_zero(bytes) {
        log.zero(offset, bytes.len() as u64)
    } else {
        log.data(offset, bytes)
    }
}

/// Whether `view` maps all of `range` as zero.
fn view_zero(view: &dyn tern_disk::Disk, range: std::ops::Range<u64>) -> Result<bool> {
    let mut off = range.start;
    while off < range.end {
        let m = view.mapping(off, range.end - off)?;
        if m.length == 0 || m.start != off {
            return Err(Error::corrupt(format!("the view's mapping returned a malformed run at {off}")));
        }
        if m.kind == tern_disk::MapKind::Data {
            return Ok(false);
        }
        off = m.end();
    }
    Ok(true)
}

/// Whether a cycle should compact a disk with entry `d` in the previous point.
fn compaction_due(d: &ManifestDisk, after_segments: usize) -> bool {
    let changed: u64 = d.segments.iter().map(|s| s.changed_bytes).sum();
    d.segments.len() + 1 >= after_segments.max(1) || changed >= d.virtual_size / 4
}
