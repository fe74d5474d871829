//! Turning replication of a VM on and off: `tern replicate --frequency ...` (enable,
//! with settings), `tern pause` / `tern resume`, and `tern complete`, which ends
//! replication after a migration and removes from the host everything tern made for
//! it (QEMU bitmaps and leftovers, change logs, fleecing overlays, snapshots).

use std::time::Duration;

use crate::cycle::{qmp_err, workdir};
use crate::qemu::{NbdEndpoint, QemuDisk, Qmp, Tracker};
use crate::{Engine, Error, ErrorKind, Result, RunLock, VmDef, VmSettings};

/// How long `complete` waits for a pass of the VM that is running (an agent's).
const COMPLETE_WAIT: Duration = Duration::from_secs(600);

/// What `tern replicate` sets; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default)]
pub struct SettingsChange {
    /// Time between cycles.
    pub frequency: Option<Duration>,
    /// Points older than this expire.
    pub retention_age: Option<Duration>,
    /// At most this many points are kept.
    pub retention_count: Option<u64>,
    /// Most bytes one disk's change log may take on the host.
    pub log_budget: Option<u64>,
}

/// Enable replication of VM `name` (the agent then replicates it), applying `change`.
pub fn enable(engine: &Engine, name: &str, change: &SettingsChange) -> Result<(VmDef, VmSettings)> {
    let vm = engine.vm(name)?;
    let mut s = engine.db().settings(&vm.id)?;
    s.enabled = true;
    if let Some(f) = change.frequency {
        crate::agent::check_frequency(f)?;
        s.frequency_ms = Some(f.as_millis() as u64);
    }
    if let Some(a) = change.retention_age {
        if a < Duration::from_secs(60) {
            return Err(Error::invalid("--retention-age is out of range: use 1m or more"));
        }
        s.retention_age_s = Some(a.as_secs());
    }
    if let Some(c) = change.retention_count {
        if c == 0 {
            return Err(Error::invalid("--retention-count 0 is out of range: keep at least 1 point"));
        }
        s.retention_count = Some(c);
    }
    if let Some(b) = change.log_budget {
        if b < (1 << 20) {
            return Err(Error::invalid("--log-budget is out of range: use 1M or more"));
        }
        s.log_budget = Some(b);
    }
    engine.db().set_settings(&vm.id, &s)?;
    Ok((vm, s))
}

/// Track VM `name` (in a QEMU) by journal (`true`: QEMU's write-blocking mirror into
/// `tern agent`, beside the dirty bitmaps) or by the bitmaps alone. The running
/// agent's next pass of the VM starts (or stops) the journal.
pub fn set_tracking(engine: &Engine, name: &str, journal: bool) -> Result<VmDef> {
    let mut vm = engine.vm(name)?;
    let q = vm.qemu.as_mut().ok_or_else(|| {
        Error::invalid(format!("VM {name} is not in a QEMU: only a VM added with --qmp is tracked by QEMU"))
    })?;
    if journal && q.push {
        return Err(Error::invalid(format!(
            "VM {name} is in push mode: the journal reads the live disks over QEMU's NBD server when it \
             resyncs; register the VM again with --nbd SOCKET"
        )));
    }
    q.journal = journal;
    engine.db().vm_set_qemu(&vm.id, q)?;
    Ok(vm)
}

/// Pause (`true`) or resume replication of VM `name`. Tracking goes on in QEMU while
/// paused (the bitmap keeps recording), so the first cycle after `resume` ships what
/// changed meanwhile: no resync.
pub fn set_paused(engine: &Engine, name: &str, paused: bool) -> Result<VmDef> {
    let vm = engine.vm(name)?;
    let mut s = engine.db().settings(&vm.id)?;
    if !s.enabled && paused {
        return Err(Error::invalid(format!(
            "replication of VM {name} is not enabled (enable it with `tern replicate {name} --frequency ...`)"
        )));
    }
    s.paused = paused;
    engine.db().set_settings(&vm.id, &s)?;
    Ok(vm)
}

/// End replication of VM `name` and remove from this host what tern made for it.
/// Waits for a running pass (an agent's) to end first. Its points in the store stay.
/// Returns what was removed, one line each.
pub fn complete(engine: &Engine, name: &str) -> Result<Vec<String>> {
    let vm = engine.vm(name)?;
    let _running = RunLock::acquire_within(engine, &vm.id, &vm.name, COMPLETE_WAIT)?;
    let mut removed = Vec::new();
    let db = engine.db();
    if let Some(q) = &vm.qemu {
        let mut qmp = Qmp::connect(&q.qmp, Duration::from_secs(30)).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!(
                    "{}: QEMU must run for tern to remove its dirty bitmaps from the VM's disks; \
                     start it and run `tern complete {name}` again",
                    qmp_err(e)
                ),
            )
        })?;
        let dir = workdir(engine, &vm);
        let t = Tracker {
            vm: vm.id[..8].to_string(),
            disks: crate::qemu::source::current_nodes(&mut qmp, q, &vm.name)?
                .into_iter()
                .map(|node| QemuDisk { node, persistent_bitmaps: false })
                .collect(),
            granularity: 64 << 10,
            workdir: dir.clone(),
            nbd: NbdEndpoint { socket: crate::paths::socket_path(&dir, "nbd.sock")? },
            test_stagger: None,
        };
        t.clean_leftovers(&mut qmp).map_err(qmp_err)?;
        if q.journal {
            crate::journal::source::take_down_mirrors(&mut qmp, &t.vm, t.disks.len())?;
            removed.push("the journal's mirrors".to_string());
        }
        for (node, bitmap) in t.remove_all_bitmaps(&mut qmp).map_err(qmp_err)? {
            removed.push(format!("dirty bitmap {bitmap} on node {node}"));
        }
    }
    let dir = workdir(engine, &vm);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))?;
        removed.push(format!("work folder {} (change logs, fleecing overlays)", dir.display()));
    }
    db.remove_tracking(&vm.id)?;
    for r in db.running_replications(&vm.id)? {
        let disks = db.replication_disks(&vm.id, &r.point_id)?;
        for d in disks.iter().filter(|d| d.snapshot_kind == crate::snapshot::SnapshotKind::Reflink.name()) {
            if d.read_path.exists() {
                removed.push(format!("snapshot {}", d.read_path.display()));
            }
        }
        crate::replicate::release_snapshots(engine, &vm, &disks);
        db.finish_abandoned(&vm.id, &r.point_id)?;
        removed.push(format!("unfinished replication of point {}", r.point_id));
    }
    db.set_settings(&vm.id, &VmSettings::default())?;
    Ok(removed)
}
