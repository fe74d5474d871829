//! The `qemu` tracking source: QEMU's persistent dirty bitmaps, reached over QMP, and
//! a copy-before-write view of every disk exported over NBD (docs/continuous.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::cut::{bitmap_name, FrozenCut};
use super::push::{PushCut, CHANGES_BITMAP};
use super::{NbdEndpoint, QemuDisk, Qmp, Tracker};
use crate::changelog::LogHeader;
use crate::cycle::qmp_err;
use crate::snapshot::SnapshotKind;
use crate::track::{Changes, Cut, CutDisk, Tracked, TrackingSource};
use crate::{Error, ErrorKind, ReplicationDiskRow, Result, VmDef};

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// The `qemu` source of one VM: a QMP connection and the NBD server the views are
/// exported on (tern's own, started for this source and stopped when it is dropped, or
/// the one the VM was registered with).
pub struct QemuSource {
    qmp: Qmp,
    tracker: Tracker,
    /// Per disk: the node's driver (`qcow2`, `raw`, ...).
    formats: Vec<String>,
    started_nbd: bool,
    /// Push mode (see [`super::push`]).
    push: bool,
    /// Per disk, whether the last [`TrackingSource::restore`] found its tracking
    /// lost: the next cut starts it afresh and the cycle compares it.
    lost: Vec<bool>,
}

/// A cut of a QEMU VM: its frozen views, or the views a killed initial replication
/// left, found again.
pub struct QemuCut {
    seq: u64,
    instant: SystemTime,
    disks: Vec<CutDisk>,
    /// Pull mode: the views QEMU holds.
    frozen: Option<FrozenCut>,
    /// Push mode: the files QEMU copied the cut into.
    pushed: Option<PushCut>,
}

impl Cut for QemuCut {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn instant(&self) -> SystemTime {
        self.instant
    }
    fn disks(&self) -> &[CutDisk] {
        &self.disks
    }
}

impl Drop for QemuSource {
    fn drop(&mut self) {
        if self.started_nbd {
            let _ = self.qmp.execute("nbd-server-stop", None);
        }
    }
}

/// Start an NBD server on `socket` in QEMU. `Ok(false)`: one is running already.
pub(crate) fn start_nbd(qmp: &mut Qmp, socket: &Path) -> Result<bool> {
    let _ = std::fs::remove_file(socket);
    let args = json!({ "addr": { "type": "unix", "data": { "path": socket } } });
    match qmp.execute("nbd-server-start", Some(args)) {
        Ok(_) => Ok(true),
        Err(e) if e.to_string().contains("already running") => Ok(false),
        Err(e) => Err(qmp_err(e)),
    }
}

/// How `query-block` names the device of entry `d`: its qdev path, else its name.
pub(crate) fn device_id(d: &serde_json::Value) -> Option<String> {
    [d["qdev"].as_str(), d["device"].as_str()].into_iter().flatten().find(|s| !s.is_empty()).map(String::from)
}

/// The block node of each disk of `q` in the QEMU behind `qmp` now: looked up by
/// device where the disks were found behind devices, else the nodes recorded.
pub(crate) fn current_nodes(qmp: &mut Qmp, q: &crate::QemuSource, vm: &str) -> Result<Vec<String>> {
    if q.devices.is_empty() {
        return Ok(q.nodes.clone());
    }
    let block = qmp.execute("query-block", None).map_err(qmp_err)?;
    let mut out = Vec::new();
    for (i, (dev, recorded)) in q.devices.iter().zip(&q.nodes).enumerate() {
        if dev.is_empty() {
            out.push(recorded.clone());
            continue;
        }
        let entry =
            block.as_array().and_then(|a| a.iter().find(|d| device_id(d).as_deref() == Some(dev.as_str())));
        let node = entry.and_then(|d| d["inserted"]["node-name"].as_str()).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "disk {i} of VM {vm}: QEMU at {} has no device {dev:?} with a disk any more",
                    q.qmp.display()
                ),
            )
        })?;
        out.push(node.to_string());
    }
    Ok(out)
}

impl QemuSource {
    /// Connect to `vm`'s QEMU, find its disks' nodes, and make sure an NBD server is
    /// there for the views. `dir` is the VM's work folder (overlays, tern's socket).
    pub fn open(
        vm: &VmDef,
        dir: &Path,
        granularity: u64,
        test_stagger: Option<Duration>,
    ) -> Result<QemuSource> {
        let q = vm.qemu.as_ref().ok_or_else(|| Error::invalid(format!("VM {} is not in a QEMU", vm.name)))?;
        let mut qmp = Qmp::connect(&q.qmp, QMP_TIMEOUT).map_err(qmp_err)?;
        let socket = match &q.nbd {
            Some(s) => s.clone(),
            None => crate::paths::socket_path(dir, "nbd.sock")?,
        };
        let current = current_nodes(&mut qmp, q, &vm.name)?;
        let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true }))).map_err(qmp_err)?;
        let mut disks = Vec::new();
        let mut formats = Vec::new();
        for (i, node) in current.iter().enumerate() {
            let n = nodes
                .as_array()
                .and_then(|a| a.iter().find(|n| n["node-name"] == node.as_str()))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "disk {i} of VM {}: QEMU at {} has no block node {node:?} any more",
                            vm.name,
                            q.qmp.display()
                        ),
                    )
                })?;
            let drv = n["drv"].as_str().unwrap_or("raw").to_string();
            disks.push(QemuDisk { node: node.clone(), persistent_bitmaps: drv == "qcow2" });
            formats.push(drv);
        }
        let tracker = Tracker {
            vm: vm.id[..8].to_string(),
            disks,
            granularity,
            workdir: dir.to_path_buf(),
            nbd: NbdEndpoint { socket: socket.clone() },
            test_stagger,
        };
        let lost = vec![false; tracker.disks.len()];
        let mut src = QemuSource { qmp, tracker, formats, started_nbd: false, push: q.push, lost };
        if q.nbd.is_none() && !q.push {
            // A server tern started for a pass that was killed is still there,
            // listening on tern's own socket: it is reused, and stopped at the end.
            if !start_nbd(&mut src.qmp, &socket)? && std::os::unix::net::UnixStream::connect(&socket).is_err()
            {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "QEMU at {} already runs an NBD server tern did not start: register the VM again \
                         with `tern vm add ... --nbd SOCKET` naming that server's socket",
                        q.qmp.display()
                    ),
                ));
            }
            src.started_nbd = true;
        }
        Ok(src)
    }

    /// The QMP connection (for the journal, which builds on this source).
    pub(crate) fn qmp(&mut self) -> &mut Qmp {
        &mut self.qmp
    }

    /// The disks' nodes, bitmaps' granularity, names and NBD endpoint.
    pub(crate) fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Whether views are pushed into files (no NBD server of QEMU's to read from).
    pub(crate) fn is_push(&self) -> bool {
        self.push
    }

    /// Whether the last restore found some disk's tracking lost.
    pub(crate) fn any_lost(&self) -> bool {
        self.lost.iter().any(|l| *l)
    }

    /// Per disk, whether a cut starts its tracking afresh: all of them for a first
    /// cut, else those whose tracking was found lost.
    fn first(&self, first: bool) -> Vec<bool> {
        self.lost.iter().map(|l| first || *l).collect()
    }

    fn cut_disks(&self, frozen: &FrozenCut) -> Vec<CutDisk> {
        frozen
            .disks
            .iter()
            .zip(&self.formats)
            .map(|(f, drv)| CutDisk {
                size: f.size,
                read_path: PathBuf::from(crate::replicate::nbd_view_url(&frozen.nbd.socket, &f.export_name)),
                snapshot: SnapshotKind::QemuView,
                format: if drv == "qcow2" { "qcow2" } else { "raw" }.into(),
                warning: None,
            })
            .collect()
    }
}

impl TrackingSource for QemuSource {
    type Cut = QemuCut;

    fn name(&self) -> &'static str {
        "qemu"
    }

    fn granularity(&self) -> u64 {
        self.tracker.granularity
    }

    fn clean_leftovers(&mut self) -> Result<()> {
        super::push::take_down(&mut self.qmp, &self.tracker.vm, self.tracker.disks.len()).map_err(qmp_err)?;
        if let Ok(dir) = std::fs::read_dir(&self.tracker.workdir) {
            let prefix = format!("tern-push-{}-", self.tracker.vm);
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.tracker.clean_leftovers(&mut self.qmp).map_err(qmp_err)
    }

    fn resume(&mut self, seq: u64, disks: &[ReplicationDiskRow]) -> Result<Option<QemuCut>> {
        if disks.len() != self.tracker.disks.len() {
            return Ok(None);
        }
        // Bitmap `seq` (started at the cut) must still track every disk, and the cut's
        // data must still be there: QEMU's views (pull), or the files QEMU pushed.
        let bitmap = bitmap_name(&self.tracker.vm, seq);
        for d in &self.tracker.disks {
            let bitmaps = super::bitmaps(&mut self.qmp, &d.node).map_err(qmp_err)?;
            if !bitmaps.iter().any(|b| b.name == bitmap && !b.inconsistent) {
                return Ok(None);
            }
        }
        let kind = if self.push { SnapshotKind::QemuPush } else { SnapshotKind::QemuView };
        if self.push {
            if !disks.iter().all(|d| d.snapshot_kind == kind.name() && d.read_path.is_file()) {
                return Ok(None);
            }
        } else {
            let exports = self.qmp.execute("query-block-exports", None).map_err(qmp_err)?;
            for i in 0..self.tracker.disks.len() {
                let id = format!("tern-export-{}-{i}", self.tracker.vm);
                if !exports.as_array().is_some_and(|a| a.iter().any(|x| x["id"] == id.as_str())) {
                    return Ok(None);
                }
            }
        }
        let disks = disks
            .iter()
            .map(|d| CutDisk {
                size: d.virtual_size,
                read_path: d.read_path.clone(),
                snapshot: kind,
                format: d.source_format.clone(),
                warning: None,
            })
            .collect();
        Ok(Some(QemuCut { seq, instant: SystemTime::now(), disks, frozen: None, pushed: None }))
    }

    fn restore(&mut self, seq: u64) -> Result<Tracked> {
        let intact = self.tracker.reconcile(&mut self.qmp, seq).map_err(qmp_err)?;
        let lost: Vec<bool> = intact.iter().map(|ok| !ok).collect();
        let why = |which: &str| {
            format!(
                "QEMU's dirty bitmap is missing or inconsistent on {which} (QEMU restarted or was killed; \
                 a raw disk's bitmap cannot persist): resyncing by comparing every chunk with the last point; \
                 only what differs is uploaded"
            )
        };
        if lost.iter().all(|l| !l) {
            self.lost = lost;
            return Ok(Tracked::Intact);
        }
        if lost.iter().all(|l| *l) {
            return Ok(Tracked::Lost(why("every disk")));
        }
        let disks: Vec<String> =
            lost.iter().enumerate().filter(|(_, l)| **l).map(|(i, _)| i.to_string()).collect();
        self.lost = lost.clone();
        Ok(Tracked::Partly(lost, why(&format!("disk {}", disks.join(", ")))))
    }

    fn drop_tracking(&mut self) -> Result<()> {
        self.tracker.remove_all_bitmaps(&mut self.qmp).map(|_| ()).map_err(qmp_err)
    }

    fn cut(&mut self, seq: u64, first: bool) -> Result<QemuCut> {
        if self.push {
            let first = self.first(first);
            let pushed = super::push::cut(&mut self.qmp, &self.tracker, seq, &first).map_err(qmp_err)?;
            let disks = pushed
                .disks
                .iter()
                .map(|d| CutDisk {
                    size: d.size,
                    read_path: d.file.clone(),
                    snapshot: SnapshotKind::QemuPush,
                    format: "qcow2".into(),
                    warning: None,
                })
                .collect();
            return Ok(QemuCut { seq, instant: pushed.instant, disks, frozen: None, pushed: Some(pushed) });
        }
        let first = self.first(first);
        let frozen = self.tracker.cut_disks(&mut self.qmp, seq, &first).map_err(qmp_err)?;
        let disks = self.cut_disks(&frozen);
        Ok(QemuCut { seq, instant: frozen.instant, disks, frozen: Some(frozen), pushed: None })
    }

    fn changes(&mut self, cut: &QemuCut, disk: usize, _dir: &Path, _header: LogHeader) -> Result<Changes> {
        if let Some(p) = &cut.pushed {
            let d = &p.disks[disk];
            if !d.changed {
                return Ok(Changes::Unknown);
            }
            let extents = tern_disk::qcow2_bitmap_extents(&d.file, CHANGES_BITMAP)
                .map_err(|e| Error::from(e).context(format!("disk {disk}: the bitmap QEMU pushed")))?;
            return Ok(Changes::Extents(extents));
        }
        let Some(f) = cut.frozen.as_ref().map(|c| &c.disks[disk]) else { return Ok(Changes::Unknown) };
        let Some(bitmap) = &f.bitmap else { return Ok(Changes::Unknown) };
        let socket = &cut.frozen.as_ref().expect("checked").nbd.socket;
        let extents = super::stage::dirty_extents(socket, f, bitmap, QMP_TIMEOUT)?;
        Ok(Changes::Extents(extents))
    }

    fn verify(&mut self, cut: &QemuCut) -> Result<()> {
        if cut.frozen.is_none() {
            // Pushed files (or a killed run's, found again): QEMU finished copying
            // before the cut returned; nothing of it can change since.
            return Ok(());
        }
        // A view holds while its copy-before-write job runs: a job that failed (its
        // overlay's file system full, say) or went away leaves a view that no longer
        // reads the disk as of the cut.
        let jobs = self.qmp.execute("query-block-jobs", None).map_err(qmp_err)?;
        let exports = self.qmp.execute("query-block-exports", None).map_err(qmp_err)?;
        for (i, _) in cut.disks.iter().enumerate() {
            let job = format!("tern-backup-{}-{i}", self.tracker.vm);
            let export = format!("tern-export-{}-{i}", self.tracker.vm);
            let j = jobs.as_array().and_then(|a| a.iter().find(|j| j["device"] == job.as_str()));
            let running = j.is_some_and(|j| {
                !matches!(j["status"].as_str(), Some("concluded" | "aborting" | "null"))
                    && j["io-status"].as_str().is_none_or(|s| s == "ok")
            });
            let exported = exports.as_array().is_some_and(|a| a.iter().any(|x| x["id"] == export.as_str()));
            if !running || !exported {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "disk {i}: QEMU's frozen view did not hold while tern read it (its backup job {}): \
                         nothing is committed, the changes stay tracked",
                        if j.is_none() { "is gone" } else { "failed" }
                    ),
                ));
            }
        }
        Ok(())
    }

    fn release(&mut self, cut: &mut QemuCut) -> Result<()> {
        if self.push {
            for d in &cut.disks {
                let _ = std::fs::remove_file(&d.read_path);
            }
            return Ok(());
        }
        match &mut cut.frozen {
            Some(f) => f.release(&mut self.qmp).map_err(qmp_err),
            // The views of a killed run, found again: taken down by name.
            None => self.tracker.clean_leftovers(&mut self.qmp).map_err(qmp_err),
        }
    }

    fn keeps_failed_cut(&self) -> bool {
        // Pushed files are local copies QEMU no longer holds; a view slows the guest.
        self.push
    }

    fn committed(&mut self, seq: u64) -> Result<()> {
        let frozen = bitmap_name(&self.tracker.vm, seq);
        let mut first = None;
        for (d, _) in self.tracker.disks.iter().zip(&self.lost).filter(|(_, lost)| !**lost) {
            // A failure here leaves a bitmap that restore() removes next time.
            if let Err(e) = super::cut::remove_bitmap(&mut self.qmp, &d.node, &frozen) {
                first.get_or_insert(Error::new(
                    ErrorKind::Io,
                    format!("removing bitmap {frozen} from {}: {e}", d.node),
                ));
            }
        }
        first.map_or(Ok(()), Err)
    }
}
