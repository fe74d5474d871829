//! The `journal` tracking source of one pass (docs/journal.md).
//!
//! It is the `qemu` source plus the journal: the dirty bitmaps go on exactly as for
//! `qemu` (one per cut, the frozen one removed once its point is committed), and
//! when the journal holds every write since the last committed point's mark, a cut
//! is only a bitmap rotation and a mark, with no copy-before-write view at all.
//!
//! - **Journal cut** (the mirrors ran and the sinks took every write since the mark
//!   of the last committed point): one QMP `transaction` starts bitmap `seq` and stops
//!   `seq - 1`, then the mark closes every disk's segment at one instant. The segment
//!   is the delta. The transaction drains every disk, and every write completes at
//!   the sink before its guest write does, so a write not in the closed segments
//!   completed after the transaction: bitmap `seq` holds it.
//! - **Resync cut** (the journal is not complete: the mirrors are new, failed, or a
//!   pass failed): the mirrors are (re)started first, then the same transaction, then
//!   the extents bitmap `seq - 1` marks (every change since the last committed point)
//!   are read from the *live* disks, then the mark. The delta is those reads with
//!   every journaled write since the mirrors started laid over them: a read that
//!   raced a guest write is overwritten by that write, and every byte ends as of the
//!   mark.
//! - The first cut, and a cut after tracking was lost on a disk, stop the mirrors
//!   and are the `qemu` source's own (a copy-before-write view; QEMU refuses a
//!   backup job beside a mirror on one node).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::Journal;
use crate::changelog::LogHeader;
use crate::cycle::qmp_err;
use crate::qemu::cut::bitmap_name;
use crate::qemu::source::{QemuCut, QemuSource};
use crate::snapshot::SnapshotKind;
use crate::track::{Changes, Cut, CutDisk, Tracked, TrackingSource};
use crate::{Error, ErrorKind, ReplicationDiskRow, Result};

/// How long a mirror may take to go away once cancelled.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// Largest piece read from a live disk at once.
const READ_PIECE: u64 = 4 << 20;

/// A journal VM's source for one pass.
pub struct JournalSource {
    qemu: QemuSource,
    journal: Arc<Journal>,
    /// The last journal cut made (its seq): [`TrackingSource::committed`] then makes
    /// its mark the base of the next.
    journal_cut: Option<u64>,
}

/// A cut: the `qemu` source's, or a mark.
pub enum JournalCut {
    /// A copy-before-write view (first cut, lost tracking).
    Qemu(QemuCut),
    /// A mark.
    Mark {
        /// The cut's sequence number.
        seq: u64,
        /// The mark's instant.
        instant: SystemTime,
        /// Per disk, what the pass reads.
        disks: Vec<CutDisk>,
        /// Per disk, the segments to compile, in order (a resync's reads first).
        segments: Vec<Vec<PathBuf>>,
    },
}

impl Cut for JournalCut {
    fn seq(&self) -> u64 {
        match self {
            JournalCut::Qemu(c) => c.seq(),
            JournalCut::Mark { seq, .. } => *seq,
        }
    }
    fn instant(&self) -> SystemTime {
        match self {
            JournalCut::Qemu(c) => c.instant(),
            JournalCut::Mark { instant, .. } => *instant,
        }
    }
    fn disks(&self) -> &[CutDisk] {
        match self {
            JournalCut::Qemu(c) => c.disks(),
            JournalCut::Mark { disks, .. } => disks,
        }
    }
}

fn mirror_name(vm: &str, i: usize) -> String {
    format!("tern-jnl-{vm}-{i}")
}

/// Take every tern journal mirror of `qemu`'s VM and its NBD node down (best effort;
/// the first error is returned once all were tried). Also for a pass of a journal VM
/// outside the agent: a mirror whose sink is gone must not block its backup job.
pub(crate) fn stop_mirrors(qemu: &mut QemuSource) -> Result<()> {
    let vm = qemu.tracker().vm.clone();
    let n = qemu.tracker().disks.len();
    take_down_mirrors(qemu.qmp(), &vm, n)
}

/// [`stop_mirrors`] of VM `vm` (its short id) with `n` disks, on a QMP connection.
pub(crate) fn take_down_mirrors(qmp: &mut crate::qemu::Qmp, vm: &str, n: usize) -> Result<()> {
    let mut first = None;
    for i in 0..n {
        let id = mirror_name(vm, i);
        if let Err(e) = qmp.execute("block-job-cancel", Some(json!({ "device": id, "force": true }))) {
            if e.class() != Some("DeviceNotActive") && !e.to_string().contains("not found") {
                first.get_or_insert(qmp_err(e));
            }
        }
    }
    let deadline = std::time::Instant::now() + CANCEL_WAIT;
    loop {
        let jobs = qmp.execute("query-block-jobs", None).map_err(qmp_err)?;
        let left = (0..n).any(|i| {
            let id = mirror_name(vm, i);
            jobs.as_array().is_some_and(|a| a.iter().any(|j| j["device"] == id.as_str()))
        });
        if !left {
            break;
        }
        if std::time::Instant::now() > deadline {
            first.get_or_insert(Error::new(ErrorKind::Io, "a journal mirror did not end when cancelled"));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..n {
        if let Err(e) = qmp.execute("blockdev-del", Some(json!({ "node-name": mirror_name(vm, i) }))) {
            if !e.to_string().contains("not found") && !e.to_string().contains("find node") {
                first.get_or_insert(qmp_err(e));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

impl JournalSource {
    /// The journal source of a pass: `qemu` (this pass's QMP connection) and the VM's
    /// running journal.
    pub fn new(qemu: QemuSource, journal: Arc<Journal>) -> Result<JournalSource> {
        if qemu.is_push() {
            return Err(Error::invalid(
                "the journal reads the live disks over QEMU's NBD server when it resyncs; this VM is in push \
                 mode (no NBD server tern can use): register it with `--nbd SOCKET` or use `--tracking qemu`",
            ));
        }
        Ok(JournalSource { qemu, journal, journal_cut: None })
    }

    /// The journal source of a pass of `vm`: its journal in `journals`, started if
    /// not running (its sinks in `dir`; an open segment of a disk at most `budget`
    /// bytes).
    pub fn open(
        mut qemu: QemuSource,
        journals: &super::Journals,
        vm: &crate::VmDef,
        dir: &Path,
        budget: u64,
    ) -> Result<JournalSource> {
        let nodes: Vec<String> = qemu.tracker().disks.iter().map(|d| d.node.clone()).collect();
        let mut sizes = Vec::new();
        for n in &nodes {
            sizes.push(crate::qemu::cut::node_size(qemu.qmp(), n).map_err(qmp_err)?);
        }
        let journal = journals.get_or_start(vm, dir, &sizes, budget)?;
        JournalSource::new(qemu, journal)
    }

    fn vm(&self) -> String {
        self.qemu.tracker().vm.clone()
    }

    /// Whether every disk's mirror runs (exists, not failed).
    fn mirrors_running(&mut self) -> Result<bool> {
        let vm = self.vm();
        let n = self.qemu.tracker().disks.len();
        let jobs = self.qemu.qmp().execute("query-block-jobs", None).map_err(qmp_err)?;
        Ok((0..n).all(|i| {
            let id = mirror_name(&vm, i);
            jobs.as_array().and_then(|a| a.iter().find(|j| j["device"] == id.as_str())).is_some_and(|j| {
                matches!(j["status"].as_str(), Some("ready" | "running"))
                    && j["io-status"].as_str().is_none_or(|s| s == "ok")
            })
        }))
    }

    fn stop_mirrors(&mut self) -> Result<()> {
        let r = stop_mirrors(&mut self.qemu);
        self.journal.state().mirroring = false;
        r
    }

    /// Start a write-blocking mirror of every disk into its sink.
    fn start_mirrors(&mut self) -> Result<()> {
        let vm = self.vm();
        let socket = self.journal.socket().to_path_buf();
        let nodes: Vec<String> = self.qemu.tracker().disks.iter().map(|d| d.node.clone()).collect();
        for (i, node) in nodes.iter().enumerate() {
            let name = mirror_name(&vm, i);
            let qmp = self.qemu.qmp();
            let started = qmp
                .execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "nbd", "node-name": name,
                        "server": { "type": "unix", "path": socket },
                        "export": format!("disk-{i}"),
                        // Never wait for a sink that is gone: fail the mirror at once.
                        "reconnect-delay": 0,
                    })),
                )
                .and_then(|_| {
                    qmp.execute(
                        "blockdev-mirror",
                        Some(json!({
                            "job-id": name, "device": node, "target": name, "sync": "none",
                            "copy-mode": "write-blocking",
                            // A failed target write ends the mirror; the guest's write
                            // completes (it reached the disk), see docs/journal.md.
                            "on-target-error": "report", "on-source-error": "report",
                            "auto-finalize": true, "auto-dismiss": true,
                        })),
                    )
                });
            if let Err(e) = started {
                let _ = self.stop_mirrors();
                return Err(qmp_err(e).context(format!("disk {i}: starting the journal's mirror")));
            }
        }
        self.journal.state().mirroring = true;
        Ok(())
    }

    /// One transaction: bitmap `seq` starts on every disk, `seq - 1` stops.
    fn rotate(&mut self, seq: u64) -> Result<()> {
        let t = self.qemu.tracker();
        let mut actions = Vec::new();
        for d in &t.disks {
            actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
                "node": d.node, "name": bitmap_name(&t.vm, seq), "granularity": t.granularity,
                "persistent": d.persistent_bitmaps } }));
            actions.push(json!({ "type": "block-dirty-bitmap-disable", "data": {
                "node": d.node, "name": bitmap_name(&t.vm, seq - 1) } }));
        }
        self.qemu.qmp().transaction(actions).map_err(qmp_err)
    }

    /// Read what bitmap `seq - 1` marks from every live disk into a base segment.
    fn read_live(&mut self, seq: u64) -> Result<Vec<PathBuf>> {
        let t = self.qemu.tracker().clone();
        let bitmap = bitmap_name(&t.vm, seq - 1);
        let ctx = format!("qemu:dirty-bitmap:{bitmap}");
        let mut out = Vec::new();
        for (i, d) in t.disks.iter().enumerate() {
            let id = format!("tern-jlive-{}-{i}", t.vm);
            self.qemu
                .qmp()
                .execute(
                    "block-export-add",
                    Some(json!({ "type": "nbd", "id": id, "node-name": d.node, "name": id,
                        "writable": false, "bitmaps": [bitmap] })),
                )
                .map_err(|e| qmp_err(e).context(format!("disk {i}: exporting the live disk")))?;
            let read = (|| -> Result<PathBuf> {
                let mut w = self.journal.base_segment(i, seq)?;
                let nbd_err = |e: tern_disk::Error| {
                    Error::new(ErrorKind::Io, format!("disk {i}: reading the live disk: {e}"))
                };
                let mut c = tern_disk::nbd::NbdClient::connect_unix(
                    &t.nbd.socket,
                    &id,
                    &[&ctx],
                    Duration::from_secs(30),
                )
                .map_err(nbd_err)?;
                let extents = c.extents(&ctx, 0, c.size()).map_err(nbd_err)?;
                let dirty: u64 = extents
                    .iter()
                    .filter(|e| e.flags & tern_disk::nbd::STATE_DIRTY != 0)
                    .map(|e| e.length)
                    .sum();
                let budget = self.journal.budget();
                if dirty > budget {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!("disk {i}: {dirty} changed bytes to resync are over the log budget of {budget} bytes"),
                    ));
                }
                let mut buf = Vec::new();
                let mut n = 0u64;
                for e in extents.iter().filter(|e| e.flags & tern_disk::nbd::STATE_DIRTY != 0) {
                    let mut o = e.offset;
                    while o < e.offset + e.length {
                        let len = (e.offset + e.length - o).min(READ_PIECE);
                        buf.resize(len as usize, 0);
                        c.read(&mut buf, o).map_err(nbd_err)?;
                        n += 1;
                        w.append(o, len, Some(&buf), n)?;
                        o += len;
                    }
                }
                c.disconnect();
                w.sync()?;
                Ok(w.path().to_path_buf())
            })();
            let del = self.qemu.qmp().execute("block-export-del", Some(json!({ "id": id, "mode": "hard" })));
            let path = read?;
            del.map_err(qmp_err)?;
            out.push(path);
        }
        Ok(out)
    }

    fn mark_cut(&self, seq: u64, base: Option<Vec<PathBuf>>) -> Result<JournalCut> {
        let (closed, instant) = self.journal.mark(seq, self.qemu.tracker().test_stagger)?;
        let t = self.qemu.tracker();
        let disks = closed
            .iter()
            .zip(&self.journal.sizes)
            .map(|(p, &size)| CutDisk {
                size,
                read_path: p.clone(),
                snapshot: SnapshotKind::Journal,
                format: "raw".into(),
                warning: None,
            })
            .collect();
        let segments = closed
            .into_iter()
            .enumerate()
            .map(|(i, seg)| match &base {
                Some(b) => vec![b[i].clone(), seg],
                None => vec![seg],
            })
            .collect();
        debug_assert_eq!(t.disks.len(), self.journal.sizes.len());
        Ok(JournalCut::Mark { seq, instant, disks, segments })
    }
}

impl TrackingSource for JournalSource {
    type Cut = JournalCut;

    fn name(&self) -> &'static str {
        "journal"
    }

    fn granularity(&self) -> u64 {
        self.qemu.granularity()
    }

    fn clean_leftovers(&mut self) -> Result<()> {
        self.qemu.clean_leftovers()?;
        let vm = self.vm();
        for i in 0..self.qemu.tracker().disks.len() {
            let id = format!("tern-jlive-{vm}-{i}");
            let _ = self.qemu.qmp().execute("block-export-del", Some(json!({ "id": id, "mode": "hard" })));
        }
        // Mirrors this process did not start were a killed tern's: their sink is gone.
        if !self.journal.state().mirroring {
            self.stop_mirrors()?;
        }
        Ok(())
    }

    fn resume(&mut self, seq: u64, disks: &[ReplicationDiskRow]) -> Result<Option<JournalCut>> {
        Ok(self.qemu.resume(seq, disks)?.map(JournalCut::Qemu))
    }

    fn restore(&mut self, seq: u64) -> Result<Tracked> {
        self.qemu.restore(seq)
    }

    fn drop_tracking(&mut self) -> Result<()> {
        self.stop_mirrors()?;
        self.qemu.drop_tracking()
    }

    fn cut(&mut self, seq: u64, first: bool) -> Result<JournalCut> {
        let base = self.journal.state().base.take();
        if first || self.qemu.any_lost() {
            // A view of QEMU's own: no mirror may run beside its backup job.
            self.stop_mirrors()?;
            self.journal.reset()?;
            return Ok(JournalCut::Qemu(self.qemu.cut(seq, first)?));
        }
        let complete = base == Some(seq - 1)
            && self.journal.state().mirroring
            && self.journal.broken().is_none()
            && self.mirrors_running()?;
        if complete {
            self.rotate(seq)?;
            let cut = self.mark_cut(seq, None)?;
            self.journal_cut = Some(seq);
            return Ok(cut);
        }
        // A resync: the journal from a fresh start, the bitmap's changes read live.
        if !(self.journal.state().mirroring && self.journal.broken().is_none() && self.mirrors_running()?) {
            self.stop_mirrors()?;
            self.journal.reset()?;
            self.start_mirrors()?;
        }
        self.rotate(seq)?;
        let reads = self.read_live(seq)?;
        let cut = self.mark_cut(seq, Some(reads))?;
        self.journal_cut = Some(seq);
        Ok(cut)
    }

    fn changes(&mut self, cut: &JournalCut, disk: usize, dir: &Path, header: LogHeader) -> Result<Changes> {
        match cut {
            JournalCut::Qemu(c) => self.qemu.changes(c, disk, dir, header),
            JournalCut::Mark { segments, .. } => {
                let log = super::segment::compile(&segments[disk], dir, header)
                    .map_err(|e| e.context(format!("disk {disk}: compiling the journal")))?;
                for s in &segments[disk] {
                    let _ = std::fs::remove_file(s);
                }
                Ok(Changes::Logged(log))
            }
        }
    }

    fn verify(&mut self, cut: &JournalCut) -> Result<()> {
        match cut {
            JournalCut::Qemu(c) => self.qemu.verify(c),
            // The mark succeeded only with the journal complete; the mirrors must also
            // still run (one that failed before the mark may not have told a sink).
            JournalCut::Mark { .. } => {
                if self.mirrors_running()? {
                    Ok(())
                } else {
                    Err(Error::new(
                        ErrorKind::Io,
                        "a journal mirror is not running: nothing is committed, the changes stay tracked",
                    ))
                }
            }
        }
    }

    fn release(&mut self, cut: &mut JournalCut) -> Result<()> {
        match cut {
            JournalCut::Qemu(c) => self.qemu.release(c),
            JournalCut::Mark { segments, .. } => {
                for s in segments.iter().flatten() {
                    let _ = std::fs::remove_file(s);
                }
                Ok(())
            }
        }
    }

    fn keeps_failed_cut(&self) -> bool {
        self.qemu.keeps_failed_cut()
    }

    fn committed(&mut self, seq: u64) -> Result<()> {
        if self.journal_cut == Some(seq + 1) {
            self.journal.state().base = Some(seq + 1);
        }
        self.qemu.committed(seq)
    }
}
