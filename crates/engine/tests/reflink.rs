//! The reflink (`FICLONE`) snapshot path on a real filesystem that has reflinks
//! (docs/replication.md, "Snapshots"): a sparse file formatted as XFS with
//! `reflink=1`, attached to a loop device and mounted in a temp folder, holds the data
//! directory and the VM's disk images.
//!
//! The replication's observer runs on the replicating thread, so the `Point` event
//! (sent after every disk's snapshot is taken and before any chunk is read) and the
//! first `Chunk` event are exact moments to look at the snapshot and to write to the
//! source images, with no timing involved. Restored images are compared with copies
//! of the sources taken before the run (qemu-img compare as the oracle).
//!
//! Mounting needs root and loop devices; without them each test prints SKIPPED and
//! passes. With them, a missing `mkfs.xfs` fails the test (scripts/deps installs it).

mod support;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use support::*;
use tern_engine::snapshot::SnapshotKind;
use tern_engine::throttle::Throttle;
use tern_engine::{replicate, Engine, EngineOptions, MigrateFormat, ReplicateEvent, ReplicateOptions};

const MIB: u64 = 1 << 20;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A loop-mounted XFS with reflinks. Dropping it unmounts the filesystem and detaches
/// the loop device, also when the test panics; whatever holds files on it (an
/// [`Engine`]) must be declared after it, so that it is dropped first.
struct ReflinkFs {
    /// Holds the backing file and the mount point, removed after the unmount.
    dir: tempfile::TempDir,
    device: String,
    mounted: bool,
}

impl ReflinkFs {
    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// Make and mount one, or `None` (having printed why) where mounting is not
    /// permitted here.
    fn new(test: &str) -> Option<ReflinkFs> {
        let skip = |why: String| {
            // CI runs as root with loop devices: there a missing one is a failure.
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: {why} (CI must be able to mount)");
            println!("SKIPPED {test}: {why}");
            None
        };
        let uid = text(&run("id", &["-u"]));
        if uid.trim() != "0" {
            return skip(format!("mounting a filesystem needs root (uid {})", uid.trim()));
        }
        if !Path::new("/dev/loop-control").exists() {
            return skip("no loop devices (/dev/loop-control is missing)".into());
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("xfs.img");
        std::fs::File::create(&image).unwrap().set_len(512 * MIB).unwrap();
        let image = image.to_str().unwrap();
        let mkfs = Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1", image]).output();
        match mkfs {
            Err(e) => panic!("running mkfs.xfs: {e} (scripts/deps installs xfsprogs)"),
            Ok(o) => assert!(o.status.success(), "mkfs.xfs: {}", text(&o)),
        }
        let lo = run("losetup", &["--find", "--show", image]);
        if !lo.status.success() {
            return skip(format!("cannot attach a loop device: {}", text(&lo).trim()));
        }
        let device = String::from_utf8_lossy(&lo.stdout).trim().to_string();
        // From here on the guard detaches the device whatever happens.
        let mut fs = ReflinkFs { dir, device, mounted: false };
        let mnt = fs.mount_point();
        std::fs::create_dir(&mnt).unwrap();
        let m = run("mount", &["-t", "xfs", &fs.device, mnt.to_str().unwrap()]);
        if !m.status.success() {
            return skip(format!("cannot mount {}: {}", fs.device, text(&m).trim()));
        }
        fs.mounted = true;
        Some(fs)
    }

    /// Bytes in use on the filesystem, after a sync so delayed allocations count.
    fn used_bytes(&self) -> u64 {
        let mnt = self.mount_point();
        let o = run("sync", &["-f", mnt.to_str().unwrap()]);
        assert!(o.status.success(), "sync: {}", text(&o));
        let o = run("df", &["--output=used", "-B1", mnt.to_str().unwrap()]);
        assert!(o.status.success(), "df: {}", text(&o));
        let t = text(&o);
        t.lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("df printed {t:?}"))
    }
}

impl Drop for ReflinkFs {
    fn drop(&mut self) {
        if self.mounted {
            let mnt = self.mount_point();
            let mnt = mnt.to_str().unwrap();
            // Bounded: a filesystem still busy after 5 s is detached lazily.
            let mut unmounted = false;
            for _ in 0..50 {
                if run("umount", &[mnt]).status.success() {
                    unmounted = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !unmounted {
                let o = run("umount", &["--lazy", mnt]);
                eprintln!("lazy unmount of {mnt}: {}", text(&o));
            }
        }
        let o = run("losetup", &["--detach", &self.device]);
        if !o.status.success() {
            eprintln!("detaching {}: {}", self.device, text(&o));
        }
    }
}

/// A child process killed when dropped, so that it keeps no file on the mount open
/// after a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `filefrag -v` shows an extent of `p` shared with another file.
fn has_shared_extents(p: &Path) -> bool {
    let o = run("filefrag", &["-v", p.to_str().unwrap()]);
    assert!(o.status.success(), "filefrag: {}", text(&o));
    text(&o).contains("shared")
}

/// Bytes the filesystem allocated to `p`.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Overwrite `len` bytes of raw image `p` at `offset` with `byte`.
fn scribble_raw(p: &Path, offset: u64, len: u64, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(&vec![byte; len as usize], offset).unwrap();
    f.sync_all().unwrap();
}

/// Write `len` bytes of `byte` at guest `offset` of qcow2 image `p`, through QEMU.
fn scribble_qcow2(p: &Path, offset: u64, len: u64, byte: u8) {
    let cmd = format!("write -P {byte} {offset} {len}");
    qemu("qemu-io", &["-f", "qcow2", "-c", &cmd, p.to_str().unwrap()]);
}

/// Whether two images have the same guest content.
fn same_content(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let o = run("qemu-img", &["compare", "-q", "-f", fa, "-F", fb, a.to_str().unwrap(), b.to_str().unwrap()]);
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a:?} {b:?}: {}", text(&o)),
    }
}

#[test]
fn a_reflink_snapshot_freezes_the_disks_across_writes_and_a_resume() {
    let Some(fs) = ReflinkFs::new("a_reflink_snapshot_freezes_the_disks_across_writes_and_a_resume") else {
        return;
    };
    let mnt = fs.mount_point();
    // The references and the migrated images live off the mount, on the temp folder's
    // own filesystem.
    let scratch = tempfile::tempdir().unwrap();

    let raw = mnt.join("vm-disk0.raw");
    tern_engine::sample::write_sample_disk(&raw, 64 * MIB, 21).unwrap();
    let qcow = mnt.join("vm-disk1.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", qcow.to_str().unwrap(), "48M"]);
    for (i, off) in [0u64, 9, 17, 30, 41].iter().enumerate() {
        scribble_qcow2(&qcow, off * MIB, 3 * MIB, 0x10 + i as u8);
    }
    let raw_ref = scratch.path().join("ref0.raw");
    let qcow_ref = scratch.path().join("ref1.qcow2");
    std::fs::copy(&raw, &raw_ref).unwrap();
    std::fs::copy(&qcow, &qcow_ref).unwrap();

    // Declared after `fs`, so dropped (closing the state database) before the unmount.
    let engine =
        Engine::open(&EngineOptions { data_dir: Some(mnt.join("data")), ..Default::default() }).unwrap();
    add_vm(&engine, "vm", &[raw.clone(), qcow.clone()]);
    let vm_id = engine.vm("vm").unwrap().id;
    let snapshots = engine.data_dir().snapshots_dir();

    // A process holding the raw image open read-write, as a running VM would: with a
    // reflink snapshot that needs no --force.
    let mut writer = KillOnDrop(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<>'{}'; exec sleep 60", raw.display()))
            .spawn()
            .unwrap(),
    );

    let used_before = fs.used_bytes();
    let images_allocated = allocated(&raw) + allocated(&qcow);
    let first_point = Mutex::new(None::<(String, Vec<PathBuf>)>);
    let chunks_seen = AtomicU32::new(0);
    let mid_run_write = Mutex::new(None::<bool>);
    let observe_first_run = |e: ReplicateEvent| match e {
        ReplicateEvent::Point { point_id, resumed } => {
            assert!(!resumed);
            let rows = engine.db().replication_disks(&vm_id, &point_id).unwrap();
            assert_eq!(rows.len(), 2);
            for r in &rows {
                assert_eq!(r.snapshot_kind, SnapshotKind::Reflink.name(), "disk {}", r.disk);
                assert!(r.read_path.starts_with(&snapshots), "{:?}", r.read_path);
                assert!(r.read_path.is_file(), "{:?}", r.read_path);
                assert!(has_shared_extents(&r.read_path), "{:?} shares no extent", r.read_path);
                // The copy is the owner's alone, as a VM's image usually is.
                let mode = std::fs::metadata(&r.read_path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{:?} has mode {mode:o}", r.read_path);
            }
            // The snapshots cost no copy: far less new space than the images hold.
            let grown = fs.used_bytes().saturating_sub(used_before);
            println!("snapshots of {images_allocated} allocated bytes took {grown} bytes");
            assert!(grown * 4 < images_allocated, "grew {grown} bytes for {images_allocated}");
            // The VM writes after the snapshot, before anything is read.
            scribble_raw(&raw, 0, 6 * MIB, 0xA1);
            scribble_raw(&raw, 33 * MIB, 5 * MIB, 0xA2);
            scribble_qcow2(&qcow, 0, 5 * MIB, 0xB1);
            scribble_qcow2(&qcow, 20 * MIB, 4 * MIB, 0xB2);
            *first_point.lock().unwrap() = Some((point_id, rows.into_iter().map(|r| r.read_path).collect()));
        }
        // ... and while chunks are being read. Chunk events come while upload workers
        // run, which a panic here would leave blocked: a failure is kept for later.
        ReplicateEvent::Chunk { .. } if chunks_seen.fetch_add(1, Ordering::SeqCst) == 0 => {
            let r = std::panic::catch_unwind(|| {
                scribble_raw(&raw, 60 * MIB, 4 * MIB, 0xA3);
                scribble_qcow2(&qcow, 44 * MIB, 4 * MIB, 0xB3);
            });
            *mid_run_write.lock().unwrap() = Some(r.is_ok());
        }
        _ => {}
    };
    let opts = ReplicateOptions { threads: 2, fail_after_uploads: Some(3), ..Default::default() };
    let err = replicate(&engine, "vm", &opts, &Throttle::unlimited(), &observe_first_run).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(*mid_run_write.lock().unwrap(), Some(true), "the write during the run failed or never came");
    let (point_id, snaps) = first_point.into_inner().unwrap().expect("the Point event came");
    assert!(!same_content(&raw, "raw", &raw_ref, "raw"), "the writes changed the raw source");
    assert!(!same_content(&qcow, "qcow2", &qcow_ref, "qcow2"), "the writes changed the qcow2 source");

    // The interrupted run left its snapshots; the VM keeps writing.
    for s in &snaps {
        assert!(s.is_file(), "{s:?} is gone after the failed run");
    }
    scribble_raw(&raw, 12 * MIB, 8 * MIB, 0xA4);
    scribble_qcow2(&qcow, 8 * MIB, 8 * MIB, 0xB4);

    let observe_resume = |e: ReplicateEvent| {
        if let ReplicateEvent::Point { point_id: p, resumed } = e {
            assert!(resumed);
            assert_eq!(p, point_id);
            let rows = engine.db().replication_disks(&vm_id, &p).unwrap();
            let paths: Vec<_> = rows.into_iter().map(|r| r.read_path).collect();
            assert_eq!(paths, snaps, "the resumed run reads the same snapshots");
        }
    };
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    let r = replicate(&engine, "vm", &opts, &Throttle::unlimited(), &observe_resume).unwrap();
    assert!(r.resumed);
    assert_eq!(r.point_id, point_id);
    assert_eq!(r.disks.len(), 2);
    for d in &r.disks {
        assert_eq!(d.snapshot, SnapshotKind::Reflink, "disk {}", d.disk);
    }
    assert!(r.disks.iter().any(|d| d.resumed_chunks > 0), "{:?}", r.disks);

    // The point is written: its snapshots are gone, and the folder with them.
    for s in &snaps {
        assert!(!s.exists(), "{s:?} outlived the point");
    }
    let left = if snapshots.exists() { walk(&snapshots) } else { Vec::new() };
    assert!(left.is_empty(), "left under the snapshots folder: {left:?}");
    assert!(!snapshots.join(&vm_id).exists());

    // What was replicated is the disks as they were when the snapshot was taken.
    let out = scratch.path().join("out");
    let m = run_migrate(&engine, "vm", MigrateFormat::Raw, &out).unwrap();
    assert_eq!(m.disks.len(), 2);
    qemu_compare(&m.disks[0].path, "raw", &raw_ref, "raw");
    qemu_compare(&m.disks[1].path, "raw", &qcow_ref, "qcow2");
    assert!(!same_content(&m.disks[0].path, "raw", &raw, "raw"));
    assert!(!same_content(&m.disks[1].path, "raw", &qcow, "qcow2"));

    writer.0.kill().unwrap();
    writer.0.wait().unwrap();
}

#[test]
fn a_data_dir_on_another_filesystem_reads_in_place() {
    // FICLONE works within one filesystem: a data directory elsewhere cannot clone an
    // image on the XFS, so the disk is read in place, which needs no writer.
    let Some(fs) = ReflinkFs::new("a_data_dir_on_another_filesystem_reads_in_place") else {
        return;
    };
    let raw = fs.mount_point().join("disk.raw");
    tern_engine::sample::write_sample_disk(&raw, 16 * MIB, 4).unwrap();
    let h = host();
    add_vm(&h.engine, "vm", std::slice::from_ref(&raw));
    let r = run_replicate(&h.engine, "vm", &ReplicateOptions::default()).unwrap();
    assert_eq!(r.disks[0].snapshot, SnapshotKind::InPlace);
    let m = run_migrate(&h.engine, "vm", MigrateFormat::Raw, &h.root.join("out")).unwrap();
    qemu_compare(&m.disks[0].path, "raw", &raw, "raw");
}

#[test]
fn an_abandoned_replication_leaves_no_snapshot_behind() {
    // One of an unfinished point's snapshots is gone (removed by hand, say): the run
    // starts a new point, and the snapshots the old one still had are not left to grow
    // apart from the images forever.
    let Some(fs) = ReflinkFs::new("an_abandoned_replication_leaves_no_snapshot_behind") else {
        return;
    };
    let mnt = fs.mount_point();
    let disks = [mnt.join("a.raw"), mnt.join("b.raw")];
    for (i, d) in disks.iter().enumerate() {
        tern_engine::sample::write_sample_disk(d, 16 * MIB, 30 + i as u64).unwrap();
    }
    let engine =
        Engine::open(&EngineOptions { data_dir: Some(mnt.join("data")), ..Default::default() }).unwrap();
    add_vm(&engine, "vm", &disks);
    let vm_id = engine.vm("vm").unwrap().id;
    let opts = ReplicateOptions { threads: 1, fail_after_uploads: Some(1), ..Default::default() };
    run_replicate(&engine, "vm", &opts).unwrap_err();
    let old = engine.db().running_replication(&vm_id, engine.store_url()).unwrap().unwrap();
    let rows = engine.db().replication_disks(&vm_id, &old.point_id).unwrap();
    assert!(rows.iter().all(|r| r.snapshot_kind == SnapshotKind::Reflink.name() && r.read_path.is_file()));
    std::fs::remove_file(&rows[1].read_path).unwrap();

    let warnings = Mutex::new(Vec::new());
    let observe = |e: ReplicateEvent| {
        if let ReplicateEvent::Warning(w) = e {
            warnings.lock().unwrap().push(w);
        }
    };
    let r = replicate(&engine, "vm", &ReplicateOptions::default(), &Throttle::unlimited(), &observe).unwrap();
    assert!(!r.resumed);
    assert_ne!(r.point_id, old.point_id);
    let warnings = warnings.into_inner().unwrap();
    assert!(warnings.iter().any(|w| w.contains(&old.point_id)), "{warnings:?}");
    let snapshots = engine.data_dir().snapshots_dir();
    let left = if snapshots.exists() { walk(&snapshots) } else { Vec::new() };
    assert!(left.is_empty(), "left under the snapshots folder: {left:?}");
}

#[test]
fn removing_a_vm_releases_the_snapshots_of_its_unfinished_replication() {
    let Some(fs) = ReflinkFs::new("removing_a_vm_releases_the_snapshots_of_its_unfinished_replication")
    else {
        return;
    };
    let mnt = fs.mount_point();
    let raw = mnt.join("disk.raw");
    tern_engine::sample::write_sample_disk(&raw, 32 * MIB, 8).unwrap();
    let before = std::fs::read(&raw).unwrap();
    let engine =
        Engine::open(&EngineOptions { data_dir: Some(mnt.join("data")), ..Default::default() }).unwrap();
    add_vm(&engine, "vm", std::slice::from_ref(&raw));
    let vm_id = engine.vm("vm").unwrap().id;
    let opts = ReplicateOptions { threads: 2, fail_after_uploads: Some(2), ..Default::default() };
    replicate(&engine, "vm", &opts, &Throttle::unlimited(), &|_| {}).unwrap_err();
    let snaps = walk(&engine.data_dir().snapshots_dir());
    assert_eq!(snaps.len(), 1, "{snaps:?}");

    // Not while a replication of it runs (its lock is held).
    let held = tern_engine::RunLock::acquire(&engine, &vm_id, "vm").unwrap();
    let e = tern_engine::remove_vm(&engine, "vm").unwrap_err();
    assert!(e.to_string().contains("being replicated"), "{e}");
    assert!(snaps[0].exists());
    drop(held);

    tern_engine::remove_vm(&engine, "vm").unwrap();
    assert!(!snaps[0].exists(), "the reflink copy outlived its VM");
    assert!(!engine.data_dir().snapshots_dir().join(&vm_id).exists());
    assert_eq!(std::fs::read(&raw).unwrap(), before, "the image itself is untouched");
    assert!(engine.vm("vm").is_err());
}
