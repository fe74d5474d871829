//! Push mode of the cut (docs/continuous.md, "Push mode"): for a QEMU whose NBD server
//! tern cannot use, QEMU itself copies the frozen data out. In the cut's one
//! transaction, per disk, next to the bitmap switch: a `blockdev-backup` into a local
//! qcow2 file tern created (`sync: bitmap` with the frozen bitmap, `bitmap-mode:
//! never`; `sync: full` for the first cut), and a persistent bitmap on that file's node
//! into which the frozen bitmap is merged. When the jobs have completed, the file
//! nodes are deleted, which makes QEMU write the merged bitmap into each file and
//! close it: tern then reads, with its own qcow2 reader, the dirty extents from the
//! file's bitmap and their data from the file. Nothing stays in QEMU once the cut
//! returns; the copy-before-write window lasts as long as QEMU's local copy.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use super::cut::{bitmap_name, node_size, Tracker};
use super::qmp::{Qmp, QmpError};

/// The bitmap in each pushed file that says which extents changed.
pub const CHANGES_BITMAP: &str = "tern-changes";

/// A job that makes no progress this long is taken for stuck.
const STALL: Duration = Duration::from_secs(120);

/// One disk's frozen data, pushed by QEMU into a local qcow2 file.
#[derive(Debug, Clone)]
pub struct PushedDisk {
    /// The disk's node.
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// The file QEMU copied into: the disk as of the cut where `changed` (or
    /// everywhere, for a first cut), with bitmap [`CHANGES_BITMAP`] saying what changed.
    pub file: PathBuf,
    /// Whether the file holds only the changes since the previous cut (else all of
    /// the disk).
    pub changed: bool,
    target_node: String,
    job: String,
}

/// All disks of a VM frozen at one instant and pushed into local files.
#[derive(Debug)]
pub struct PushCut {
    /// The cut's sequence number: bitmap `tern-<vm>-<seq>` starts at it.
    pub seq: u64,
    /// When the transaction returned.
    pub instant: SystemTime,
    /// One per disk, in the VM's order.
    pub disks: Vec<PushedDisk>,
}

fn target_node(vm: &str, i: usize) -> String {
    format!("tern-push-{vm}-{i}")
}

fn job_id(vm: &str, i: usize) -> String {
    format!("tern-push-job-{vm}-{i}")
}

/// The file disk `i` of cut `seq` is pushed into.
pub fn push_file(t: &Tracker, seq: u64, i: usize) -> PathBuf {
    t.workdir.join(format!("tern-push-{}-{seq}-{i}.qcow2", t.vm))
}

/// Freeze every disk at one instant and have QEMU copy the frozen data out: start
/// bitmap `seq`, stop bitmap `seq - 1` and push what it recorded; on a disk whose
/// `first` is set, push everything instead (a first cut, or tracking lost). Returns once every copy is complete and closed.
pub fn cut(qmp: &mut Qmp, t: &Tracker, seq: u64, first: &[bool]) -> Result<PushCut, QmpError> {
    let mut cut = PushCut { seq, instant: SystemTime::now(), disks: Vec::new() };
    let res = (|| {
        for (i, d) in t.disks.iter().enumerate() {
            let size = node_size(qmp, &d.node)?;
            let file = push_file(t, seq, i);
            let created = tern_disk::create_disk(
                &file,
                &tern_disk::CreateOptions {
                    format: tern_disk::CreateFormat::Qcow2 { cluster_size: 64 << 10 },
                    virtual_size: size,
                },
            )
            .and_then(|w| w.finish());
            if let Err(e) = created {
                let _ = std::fs::remove_file(&file);
                return Err(QmpError::Io {
                    path: qmp.path().to_path_buf(),
                    what: format!("create the push target {}", file.display()),
                    source: std::io::Error::other(e.to_string()),
                });
            }
            let pd = PushedDisk {
                node: d.node.clone(),
                size,
                file: file.clone(),
                changed: !first.get(i).copied().unwrap_or(true),
                target_node: target_node(&t.vm, i),
                job: job_id(&t.vm, i),
            };
            cut.disks.push(pd);
            qmp.execute(
                "blockdev-add",
                Some(json!({
                    "driver": "qcow2", "node-name": target_node(&t.vm, i),
                    "file": { "driver": "file", "filename": file },
                })),
            )?;
        }
        let mut actions: Vec<Value> = Vec::new();
        for (d, p) in t.disks.iter().zip(&cut.disks) {
            actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
                "node": d.node, "name": bitmap_name(&t.vm, seq), "granularity": t.granularity,
                "persistent": d.persistent_bitmaps } }));
            let mut backup = json!({ "job-id": p.job, "device": d.node, "target": p.target_node,
                "sync": "full", "auto-finalize": true, "auto-dismiss": true });
            if p.changed {
                let frozen = bitmap_name(&t.vm, seq - 1);
                actions.push(
                    json!({ "type": "block-dirty-bitmap-disable", "data": { "node": d.node, "name": frozen } }),
                );
                actions.push(json!({ "type": "block-dirty-bitmap-add", "data": {
                    "node": p.target_node, "name": CHANGES_BITMAP, "granularity": t.granularity,
                    "persistent": true, "disabled": true } }));
                actions.push(json!({ "type": "block-dirty-bitmap-merge", "data": {
                    "node": p.target_node, "target": CHANGES_BITMAP,
                    "bitmaps": [{ "node": d.node, "name": frozen }] } }));
                backup["sync"] = json!("bitmap");
                backup["bitmap"] = json!(frozen);
                backup["bitmap-mode"] = json!("never");
            }
            actions.push(json!({ "type": "blockdev-backup", "data": backup }));
        }
        qmp.transaction(actions)?;
        cut.instant = SystemTime::now();
        wait_jobs(qmp, &cut)?;
        // Closing the files writes the merged bitmaps into them.
        for p in &cut.disks {
            qmp.execute("blockdev-del", Some(json!({ "node-name": p.target_node })))?;
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(cut),
        Err(e) => {
            let _ = take_down(qmp, &t.vm, t.disks.len());
            cut.remove_files();
            Err(e)
        }
    }
}

/// Wait until every job of `cut` has completed; an error when one fails, is
/// cancelled, or makes no progress for [`STALL`].
fn wait_jobs(qmp: &mut Qmp, cut: &PushCut) -> Result<(), QmpError> {
    let mut remaining: Vec<String> = cut.disks.iter().map(|d| d.job.clone()).collect();
    let mut progress: Vec<(u64, Instant)> = vec![(0, Instant::now()); remaining.len()];
    while !remaining.is_empty() {
        let pending = remaining.clone();
        let ended = |e: &Value| pending.iter().any(|j| e["data"]["device"] == j.as_str());
        let got = qmp.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(2), &ended);
        match got {
            Ok(ev) => {
                let job = ev["data"]["device"].as_str().unwrap_or_default().to_string();
                if let Some(err) = ev["data"]["error"].as_str() {
                    return Err(QmpError::Protocol {
                        path: qmp.path().to_path_buf(),
                        message: format!("QEMU's copy of the cut ({job}) failed: {err}"),
                    });
                }
                remaining.retain(|j| *j != job);
            }
            Err(QmpError::Timeout { .. }) => {}
            Err(e) => return Err(e),
        }
        let cancelled = |e: &Value| remaining.iter().any(|j| e["data"]["device"] == j.as_str());
        if let Ok(ev) = qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::ZERO, &cancelled) {
            return Err(QmpError::Protocol {
                path: qmp.path().to_path_buf(),
                message: format!("QEMU's copy of the cut ({}) was cancelled", ev["data"]["device"]),
            });
        }
        let jobs = qmp.execute("query-block-jobs", None)?;
        for (k, j) in cut.disks.iter().enumerate() {
            if !remaining.contains(&j.job) {
                continue;
            }
            let Some(info) = jobs.as_array().and_then(|a| a.iter().find(|x| x["device"] == j.job.as_str()))
            else {
                continue;
            };
            let offset = info["offset"].as_u64().unwrap_or(0);
            if offset != progress[k].0 {
                progress[k] = (offset, Instant::now());
            } else if progress[k].1.elapsed() > STALL {
                return Err(QmpError::Protocol {
                    path: qmp.path().to_path_buf(),
                    message: format!("QEMU's copy of the cut ({}) made no progress for {STALL:?}", j.job),
                });
            }
        }
    }
    Ok(())
}

/// Cancel tern's push jobs of VM `vm` and delete their target nodes, whatever a failed
/// or killed cut left. Best effort; the first error is returned.
pub fn take_down(qmp: &mut Qmp, vm: &str, disks: usize) -> Result<(), QmpError> {
    let mut first: Option<QmpError> = None;
    let jobs = qmp.execute("query-block-jobs", None)?;
    for i in 0..disks {
        let job = job_id(vm, i);
        if jobs.as_array().is_some_and(|a| a.iter().any(|j| j["device"] == job.as_str())) {
            match qmp.execute("block-job-cancel", Some(json!({ "device": job, "force": true }))) {
                Ok(_) => {
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
    let nodes = qmp.execute("query-named-block-nodes", Some(json!({ "flat": true })))?;
    for i in 0..disks {
        let node = target_node(vm, i);
        if nodes.as_array().is_some_and(|a| a.iter().any(|n| n["node-name"] == node.as_str())) {
            if let Err(e) = qmp.execute("blockdev-del", Some(json!({ "node-name": node }))) {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

impl PushCut {
    /// Delete the pushed files.
    pub fn remove_files(&self) {
        for d in &self.disks {
            let _ = std::fs::remove_file(&d.file);
        }
    }
}
