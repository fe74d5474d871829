//! The cut: every disk of a VM frozen at one instant inside a running QEMU, by one
//! QMP `transaction` (docs/continuous.md, "Each cycle").
//!
//! Per disk, in that one transaction: `block-dirty-bitmap-add` of the next bitmap,
//! `block-dirty-bitmap-disable` of the current one (when tracking is on), and a
//! `blockdev-backup` with `sync: none` from the disk's node into a fleecing overlay (a
//! qcow2 whose backing is the disk's node): from that instant the guest's writes first
//! copy the old data into the overlay, so the overlay reads as the disk at the cut.
//! The overlay is then exported read-only over NBD with the frozen bitmap, and
//! [`FrozenCut::release`] takes everything down again.
//!
//! Everything created is named `tern-...` and removed by tern; nothing else in QEMU
//! is touched.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::qmp::{Qmp, QmpError};

/// One disk of the VM, as QEMU knows it.
#[derive(Debug, Clone)]
pub struct QemuDisk {
    /// The node the guest's writes reach (a device's root node, or an export's node).
    pub node: String,
    /// Whether its bitmaps can be persistent (qcow2 images; not raw).
    pub persistent_bitmaps: bool,
}

/// Where the NBD server tern's exports are added to listens.
#[derive(Debug, Clone)]
pub struct NbdEndpoint {
    /// Its UNIX socket.
    pub socket: PathBuf,
}

/// A disk frozen at the cut, exported read-only.
#[derive(Debug, Clone)]
pub struct FrozenDisk {
    /// The disk's node.
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The NBD export name that reads the disk as of the cut.
    pub export_name: String,
    /// The frozen bitmap (changes since the previous cut), exported with the view as
    /// `qemu:dirty-bitmap:NAME`; `None` for the first cut.
    pub bitmap: Option<String>,
    fleece_node: String,
    fleece_file: PathBuf,
    job: String,
    export_id: String,
}

/// All disks of a VM frozen at one instant.
#[derive(Debug)]
pub struct FrozenCut {
    /// The cut's sequence number: bitmap `tern-<vm>-<seq>` starts at it.
    pub seq: u64,
    /// When the transaction returned (the cut happened before this, after the request
    /// was sent).
    pub instant: SystemTime,
    /// One per disk, in the order given.
    pub disks: Vec<FrozenDisk>,
    /// The NBD server the views are exported on.
    pub nbd: NbdEndpoint,
}

/// The name of cycle `seq`'s bitmap for VM `vm` (a short id).
pub fn bitmap_name(vm: &str, seq: u64) -> String {
    format!("tern-{vm}-{seq}")
}

pub(crate) fn node_size(qmp: &mut Qmp, node: &str) -> Result<u64, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| QmpError::Protocol {
            path: qmp.path().to_path_buf(),
            message: format!("QEMU has no block node {node:?} (query-named-block-nodes)"),
        })
}

/// What tern tracks in one QEMU: a VM's disks and where their cuts go.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// A short id of the VM, in every name tern gives QEMU objects.
    pub vm: String,
    /// The disks, in the VM's order.
    pub disks: Vec<QemuDisk>,
    /// Bitmap granularity in bytes (a power of two, 512 B to 2 GiB).
    pub granularity: u64,
    /// Where fleecing overlays are created.
    pub workdir: PathBuf,
    /// The NBD server the views are exported on.
    pub nbd: NbdEndpoint,
    /// TEST ONLY: freeze the disks one at a time, with this pause between, instead of
    /// in one transaction. Such cuts are NOT consistent; this exists so that the
    /// consistency test can show it detects them. `None` everywhere else.
    #[doc(hidden)]
    pub test_stagger: Option<Duration>,
}

impl Tracker {
    /// Freeze every disk at one instant: start bitmap `seq`, stop bitmap `seq - 1`
    /// (unless `first`), and export a read-only view of each disk as of that instant.
    pub fn cut(&self, qmp: &mut Qmp, seq: u64, first: bool) -> Result<FrozenCut, QmpError> {
        cut(qmp, self, seq, &vec![first; self.disks.len()])
    }

    /// [`Tracker::cut`] with `first` per disk: a disk whose tracking was lost starts
    /// afresh (no bitmap to stop, its view has none) in the same transaction as the
    /// others.
    pub fn cut_disks(&self, qmp: &mut Qmp, seq: u64, first: &[bool]) -> Result<FrozenCut, QmpError> {
        cut(qmp, self, seq, first)
    }
}

fn cut(qmp: &mut Qmp, t: &Tracker, seq: u64, first: &[bool]) -> Result<FrozenCut, QmpError> {
    let (vm, disks, granularity, nbd) = (&t.vm, &t.disks, t.granularity, &t.nbd);
    // The cut exists from the first node tern adds, so that any failure below takes
    // down what was already added: nothing of tern's stays in QEMU.
    let mut cut = FrozenCut { seq, instant: SystemTime::now(), disks: Vec::new(), nbd: nbd.clone() };
    for (i, d) in disks.iter().enumerate() {
        if let Err(e) = add_fleece(qmp, t, &mut cut, i, d, first.get(i).copied().unwrap_or(true)) {
            let _ = cut.release_nodes(qmp);
            return Err(e);
        }
    }
    // One group of actions per disk; all groups in ONE transaction (one instant), unless
    // the test-only stagger asks for one transaction per disk with a pause between.
    let mut groups: Vec<Vec<Value>> = Vec::new();
    for (d, f) in disks.iter().zip(&cut.disks) {
        let mut actions: Vec<Value> = Vec::new();
        actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
            "node": d.node, "name": bitmap_name(vm, seq), "granularity": granularity,
            "persistent": d.persistent_bitmaps } }));
        if let Some(b) = &f.bitmap {
            actions
                .push(json!({ "type": "block-dirty-bitmap-disable", "data": { "node": d.node, "name": b } }));
        }
        actions.push(json!({ "type": "blockdev-backup", "data": {
            "job-id": f.job, "device": d.node, "target": f.fleece_node, "sync": "none",
            "auto-finalize": true, "auto-dismiss": true } }));
        groups.push(actions);
    }
    let done = match t.test_stagger {
        None => qmp.transaction(groups.concat()),
        Some(pause) => {
            let mut done = Ok(());
            for (i, g) in groups.into_iter().enumerate() {
                if i > 0 {
                    std::thread::sleep(pause);
                }
                done = qmp.transaction(g);
                if done.is_err() {
                    break;
                }
            }
            done
        }
    };
    cut.instant = SystemTime::now();
    if let Err(e) = done {
        let _ = cut.release_nodes(qmp);
        return Err(e);
    }
    for f in &cut.disks {
        let mut export = json!({ "type": "nbd", "id": f.export_id, "node-name": f.fleece_node,
            "name": f.export_name, "writable": false });
        if let Some(b) = &f.bitmap {
            export["bitmaps"] = json!([b]);
        }
        if let Err(e) = qmp.execute("block-export-add", Some(export)) {
            let _ = cut.release(qmp);
            return Err(e);
        }
    }
    Ok(cut)
}

/// Create disk `i`'s fleecing overlay (an empty qcow2 of the disk's size, written by
/// tern's own qcow2 writer) and add it as a node whose backing is the disk's node.
fn add_fleece(
    qmp: &mut Qmp,
    t: &Tracker,
    cut: &mut FrozenCut,
    i: usize,
    d: &QemuDisk,
    first: bool,
) -> Result<(), QmpError> {
    let (vm, seq) = (&t.vm, cut.seq);
    let size = node_size(qmp, &d.node)?;
    let fleece_file = t.workdir.join(format!("tern-fleece-{vm}-{seq}-{i}.qcow2"));
    let created = tern_disk::create_disk(
        &fleece_file,
        &tern_disk::CreateOptions {
            format: tern_disk::CreateFormat::Qcow2 { cluster_size: 64 << 10 },
            virtual_size: size,
        },
    )
    .and_then(|w| w.finish());
    if let Err(e) = created {
        let _ = std::fs::remove_file(&fleece_file);
        return Err(QmpError::Io {
            path: qmp.path().to_path_buf(),
            what: format!("create the fleecing overlay {}", fleece_file.display()),
            source: std::io::Error::other(e.to_string()),
        });
    }
    let fleece_node = format!("tern-fleece-{vm}-{i}");
    let added = qmp.execute(
        "blockdev-add",
        Some(json!({
            "driver": "qcow2", "node-name": fleece_node,
            "file": { "driver": "file", "filename": fleece_file },
            "backing": d.node,
        })),
    );
    if let Err(e) = added {
        let _ = std::fs::remove_file(&fleece_file);
        return Err(e);
    }
    cut.disks.push(FrozenDisk {
        node: d.node.clone(),
        size,
        export_name: format!("tern-view-{vm}-{i}"),
        bitmap: (!first).then(|| bitmap_name(vm, seq - 1)),
        fleece_node,
        fleece_file,
        job: format!("tern-backup-{vm}-{i}"),
        export_id: format!("tern-export-{vm}-{i}"),
    });
    Ok(())
}

impl FrozenCut {
    /// Take down the exports, jobs and overlays (the bitmaps stay: the frozen one is
    /// removed once its point is committed, see [`remove_bitmap`]). Best effort: each
    /// step is tried even when an earlier one failed; the first error is returned.
    pub fn release(&mut self, qmp: &mut Qmp) -> Result<(), QmpError> {
        let mut first: Option<QmpError> = None;
        for f in &self.disks {
            if let Err(e) =
                qmp.execute("block-export-del", Some(json!({ "id": f.export_id, "mode": "hard" })))
            {
                if e.class() != Some("GenericError") || !e.to_string().contains("not found") {
                    first.get_or_insert(e);
                }
            }
        }
        // The exports go away asynchronously; the overlay can be deleted only after.
        for f in &self.disks {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < until {
                let exports = qmp.execute("query-block-exports", None)?;
                if !exports.as_array().is_some_and(|a| a.iter().any(|x| x["id"] == f.export_id.as_str())) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Err(e) = self.release_nodes(qmp) {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Cancel the backup jobs and delete the overlay nodes and files.
    fn release_nodes(&mut self, qmp: &mut Qmp) -> Result<(), QmpError> {
        let mut first: Option<QmpError> = None;
        let jobs = qmp.execute("query-block-jobs", None)?;
        for f in &self.disks {
            let running = jobs.as_array().is_some_and(|a| a.iter().any(|j| j["device"] == f.job.as_str()));
            if running {
                match qmp.execute("block-job-cancel", Some(json!({ "device": f.job, "force": true }))) {
                    Ok(_) => {
                        let job = f.job.clone();
                        let _ = qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(30), &|e| {
                            e["data"]["device"] == job.as_str()
                        });
                    }
                    Err(e) => {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        for f in &self.disks {
            if let Err(e) = qmp.execute("blockdev-del", Some(json!({ "node-name": f.fleece_node }))) {
                if !e.to_string().contains("Failed to find node") && !e.to_string().contains("Cannot find") {
                    first.get_or_insert(e);
                }
            }
            let _ = std::fs::remove_file(&f.fleece_file);
        }
        first.map_or(Ok(()), Err)
    }
}

/// Remove bitmap `name` from `node` (after the point holding its changes is
/// committed).
pub fn remove_bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Result<(), QmpError> {
    qmp.execute("block-dirty-bitmap-remove", Some(json!({ "node": node, "name": name }))).map(|_| ())
}

/// Fold bitmap `from` into `into` and remove `from` (a cut that was not committed:
/// its changes go to the next cycle, nothing is lost).
pub fn merge_bitmap(qmp: &mut Qmp, node: &str, from: &str, into: &str) -> Result<(), QmpError> {
    qmp.transaction(vec![
        json!({ "type": "block-dirty-bitmap-merge", "data": { "node": node, "target": into, "bitmaps": [from] } }),
        json!({ "type": "block-dirty-bitmap-remove", "data": { "node": node, "name": from } }),
    ])
}

/// One dirty bitmap of a node, as `query-named-block-nodes` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Whether it is recording writes (enabled).
    pub recording: bool,
    /// Whether QEMU flags it inconsistent (a persistent bitmap QEMU did not close
    /// cleanly): its content cannot be trusted.
    pub inconsistent: bool,
}

/// The dirty bitmaps on `node`.
pub fn bitmaps(qmp: &mut Qmp, node: &str) -> Result<Vec<BitmapInfo>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    let n = nodes.as_array().and_then(|a| a.iter().find(|n| n["node-name"] == node)).ok_or_else(|| {
        QmpError::Protocol {
            path: qmp.path().to_path_buf(),
            message: format!("QEMU has no block node {node:?} (query-named-block-nodes)"),
        }
    })?;
    Ok(n["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(BitmapInfo {
                        name: b["name"].as_str()?.to_string(),
                        recording: b["recording"].as_bool().unwrap_or(false),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

impl Tracker {
    /// Take down what a killed run of tern left in QEMU for this VM (exports, backup
    /// jobs, overlay nodes) and the overlay files in the work folder. Bitmaps are not
    /// touched here: [`Tracker::reconcile`] decides about them. Only names tern gives
    /// are looked for; everything else in QEMU is left alone.
    pub fn clean_leftovers(&self, qmp: &mut Qmp) -> Result<(), QmpError> {
        let vm = &self.vm;
        let mut cut =
            FrozenCut { seq: 0, instant: SystemTime::now(), disks: Vec::new(), nbd: self.nbd.clone() };
        let exports = qmp.execute("query-block-exports", None)?;
        let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
        let has = |v: &Value, field: &str, name: &str| {
            v.as_array().is_some_and(|a| a.iter().any(|x| x[field] == name))
        };
        for (i, d) in self.disks.iter().enumerate() {
            let f = FrozenDisk {
                node: d.node.clone(),
                size: 0,
                export_name: format!("tern-view-{vm}-{i}"),
                bitmap: None,
                fleece_node: format!("tern-fleece-{vm}-{i}"),
                fleece_file: PathBuf::new(),
                job: format!("tern-backup-{vm}-{i}"),
                export_id: format!("tern-export-{vm}-{i}"),
            };
            if has(&exports, "id", &f.export_id) || has(&nodes, "node-name", &f.fleece_node) {
                cut.disks.push(f);
            }
        }
        let res = if cut.disks.is_empty() { Ok(()) } else { cut.release(qmp) };
        if let Ok(dir) = std::fs::read_dir(&self.workdir) {
            let prefix = format!("tern-fleece-{vm}-");
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        res
    }

    /// Bring the VM's bitmaps to the state "bitmap `seq` records every change since
    /// the last committed point" after a failed or killed cycle, disk by disk: on each
    /// disk whose bitmap `seq` is there and consistent, bitmaps older than `seq` (their
    /// points are committed) are removed and newer ones (a cut not committed) are
    /// merged into `seq`, which is enabled again, in one transaction, so no write falls
    /// between. On a disk where bitmap `seq` is missing or inconsistent (QEMU restarted
    /// without a clean close, a raw disk's bitmap, someone removed it) tracking is
    /// lost: every bitmap of tern's is removed from it, and it starts afresh at the
    /// next cut. Returns, per disk, whether its tracking is intact.
    pub fn reconcile(&self, qmp: &mut Qmp, seq: u64) -> Result<Vec<bool>, QmpError> {
        let prefix = format!("tern-{}-", self.vm);
        let want = bitmap_name(&self.vm, seq);
        let mut intact = Vec::new();
        for d in &self.disks {
            let ours: Vec<(u64, BitmapInfo)> = bitmaps(qmp, &d.node)?
                .into_iter()
                .filter_map(|b| Some((b.name.strip_prefix(&prefix)?.parse::<u64>().ok()?, b)))
                .collect();
            let Some(recording) =
                ours.iter().find(|(n, b)| *n == seq && !b.inconsistent).map(|(_, b)| b.recording)
            else {
                for (_, b) in &ours {
                    remove_bitmap(qmp, &d.node, &b.name)?;
                }
                intact.push(false);
                continue;
            };
            let mut actions = Vec::new();
            let newer: Vec<&str> =
                ours.iter().filter(|(n, _)| *n > seq).map(|(_, b)| b.name.as_str()).collect();
            if !newer.is_empty() {
                actions.push(json!({ "type": "block-dirty-bitmap-merge",
                    "data": { "node": d.node, "target": want, "bitmaps": newer } }));
            }
            if !recording {
                actions.push(
                    json!({ "type": "block-dirty-bitmap-enable", "data": { "node": d.node, "name": want } }),
                );
            }
            for (n, b) in &ours {
                if *n != seq {
                    actions.push(json!({ "type": "block-dirty-bitmap-remove",
                        "data": { "node": d.node, "name": b.name } }));
                }
            }
            if !actions.is_empty() {
                qmp.transaction(actions)?;
            }
            intact.push(true);
        }
        Ok(intact)
    }

    /// Remove every bitmap tern made for this VM (before a resync, and at `complete`).
    /// Returns the names removed, per disk node.
    pub fn remove_all_bitmaps(&self, qmp: &mut Qmp) -> Result<Vec<(String, String)>, QmpError> {
        let prefix = format!("tern-{}-", self.vm);
        let mut removed = Vec::new();
        for d in &self.disks {
            for b in bitmaps(qmp, &d.node)?.into_iter().filter(|b| b.name.starts_with(&prefix)) {
                remove_bitmap(qmp, &d.node, &b.name)?;
                removed.push((d.node.clone(), b.name));
            }
        }
        Ok(removed)
    }
}
