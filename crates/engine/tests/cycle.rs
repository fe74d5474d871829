//! Continuous replication of a VM in a running QEMU (a real qemu-storage-daemon with a
//! qcow2 and a raw disk, whose NBD exports are the guest's write path): `vm add --qmp`
//! discovers the disks, the first replicate is a full pass from a frozen view, every
//! later one a delta cycle that ships only what the dirty bitmaps say changed. Every
//! point migrates to exactly the guest's content at its cut; delta points store about
//! what changed, not whole chunks; killing QEMU loses the bitmaps and the next pass is
//! a resync that uploads only what differs; nothing of tern's is left in QEMU but the
//! one bitmap per disk that tracks the next cycle. A VM that is shut off is scanned,
//! and tracking goes on from its bitmaps when it boots again.

mod support;

use std::path::PathBuf;

use tern_engine::{add_qemu_vm, ErrorKind, PointKind, QemuVmSpec, ReplicateOptions};

const MIB: u64 = 1 << 20;

fn spec(vm: &support::Qsd, nbd: Option<PathBuf>) -> QemuVmSpec {
    QemuVmSpec {
        name: "web".into(),
        qmp: vm.qmp.clone(),
        nodes: Vec::new(),
        nbd,
        cpus: None,
        memory_bytes: None,
        firmware: None,
        push: None,
        journal: false,
    }
}

/// Names of tern's objects in QEMU: nodes, exports and bitmaps.
fn tern_objects(vm: &support::Qsd) -> Vec<String> {
    let mut q = tern_engine::qemu::Qmp::connect(&vm.qmp, std::time::Duration::from_secs(10)).unwrap();
    let mut out = Vec::new();
    let nodes = q.execute("query-named-block-nodes", None).unwrap();
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("tern-") {
            out.push(format!("node {name}"));
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if b["name"].as_str().is_some_and(|s| s.starts_with("tern-")) {
                out.push(format!("bitmap {} on {name}", b["name"].as_str().unwrap()));
            }
        }
    }
    for x in q.execute("query-block-exports", None).unwrap().as_array().unwrap() {
        if x["id"].as_str().is_some_and(|s| s.starts_with("tern-")) {
            out.push(format!("export {}", x["id"]));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn migrate_point(h: &support::Host, point: &str, out: &std::path::Path) -> Vec<String> {
    support::migrate_point(&h.engine, "web", point, out).iter().map(|p| support::sha256_file(p)).collect()
}

#[test]
fn delta_cycles_ship_only_changes_and_every_point_is_the_guest_at_its_cut() {
    let h = support::host();
    let mut vm = support::Qsd::start(&[("qcow2", "32M"), ("raw", "24M")]);
    // The guest's first content, on both disks.
    vm.guest("disk0", &["write -P 0x11 0 8M".into(), "write -P 0x12 20M 1M".into()]);
    vm.guest("disk1", &["write -P 0x21 1M 4M".into()]);

    // qemu-storage-daemon already runs an NBD server (the guest's write path): in pull
    // mode without --nbd tern says so and registers nothing.
    let e = add_qemu_vm(&h.engine, &QemuVmSpec { push: Some(false), ..spec(&vm, None) }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("--nbd"), "{e}");
    assert!(h.engine.db().vm_list().unwrap().is_empty());

    let def = add_qemu_vm(&h.engine, &spec(&vm, Some(vm.nbd.clone()))).unwrap();
    assert_eq!(def.disks.len(), 2);
    assert_eq!(def.disks[0].format, Some(tern_disk::Format::Qcow2));
    assert_eq!(def.disks[1].format, Some(tern_disk::Format::Raw));
    assert!(def.disks[0].path.ends_with("d0.qcow2"), "{:?}", def.disks[0].path);
    assert_eq!(def.qemu.as_ref().unwrap().nodes, ["disk0", "disk1"]);

    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    let first = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(first.kind, PointKind::Full);
    let mut expect = vec![(first.point_id.clone(), vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")])];

    // Five cycles of writes: overlapping, unaligned, write-zeroes, discards; random
    // data, so that sizes mean something after compression.
    for k in 0..5u64 {
        vm.guest_random("disk0", (k * 3 + 1) * MIB + 4096, 64 << 10, k * 10 + 1);
        vm.guest_random("disk0", 2 * MIB + 1000 + k * 700, 5000, k * 10 + 2);
        vm.guest("disk0", &[format!("write -z {} 128k", (6 + k) * MIB)]);
        vm.guest_random("disk1", (k + 1) * 2 * MIB, 64 << 10, k * 10 + 3);
        vm.guest("disk1", &[format!("discard {} 64k", 3 * MIB + k * 65536)]);
        let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
        assert_eq!(r.kind, PointKind::Delta, "cycle {k}");
        assert!(r.instant.contains('.') && r.instant.ends_with('Z'), "milliseconds: {}", r.instant);
        // About what changed (a 64 KiB granularity rounds each write up), never chunks.
        let changed: u64 = r.disks.iter().map(|d| d.changed_bytes).sum();
        let stored: u64 = r.disks.iter().map(|d| d.uploaded_bytes).sum();
        assert!(changed > 0 && changed <= 8 * 64 * 1024, "cycle {k}: changed {changed}");
        // Random data does not compress: stored is about the data written (a 64 KiB
        // granule per write, the zeroes and discards cost nothing), plus envelopes.
        assert!(stored <= changed + 4096, "cycle {k}: stored {stored} for {changed} changed");
        let written = 2 * 65536 + 5000;
        assert!(
            stored >= written && stored * 10 <= written * 12,
            "cycle {k}: stored {stored} for {written} written"
        );
        expect.push((r.point_id.clone(), vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]));
    }
    // A cycle with no writes is a point too, and stores nothing.
    let idle = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(idle.kind, PointKind::Delta);
    assert_eq!(idle.disks.iter().map(|d| d.uploaded_bytes).sum::<u64>(), 0);
    expect.push((idle.point_id.clone(), vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]));

    // Only the bitmap that tracks the next cycle is left in QEMU.
    let left = tern_objects(&vm);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|o| o.starts_with("bitmap tern-")), "{left:?}");

    // Every point, migrated, is the guest at its cut.
    for (i, (point, shas)) in expect.iter().enumerate() {
        let out = h.root.join(format!("out-{i}"));
        assert_eq!(&migrate_point(&h, point, &out), shas, "point {i} ({point})");
    }
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert!(v.segment_pieces >= 10, "{}", v.segment_pieces);

    // QEMU killed: its bitmaps are gone. The next pass notices, resyncs by digest
    // comparison (uploads only what differs) and is exact.
    vm.restart(true);
    vm.guest_random("disk0", 12 * MIB, 64 << 10, 99);
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Resync);
    // Read whole, compared with the last point: only the 64 KiB that differs is sent.
    let read: u64 = r.disks.iter().map(|d| d.read_bytes).sum();
    let uploaded: u64 = r.disks.iter().map(|d| d.uploaded_bytes).sum();
    assert_eq!(r.disks.iter().map(|d| d.changed_bytes).sum::<u64>(), 64 << 10);
    assert!(uploaded < (64 << 10) + 4096, "resync uploaded {uploaded}");
    assert!(read >= 64 << 10, "{read}");
    let shas = vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")];
    assert_eq!(migrate_point(&h, &r.point_id, &h.root.join("out-resync")), shas);
    // And tracking goes on with deltas.
    vm.guest("disk1", &["write -P 0x78 0 64k".into()]);
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    let shas = vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")];
    assert_eq!(migrate_point(&h, &r.point_id, &h.root.join("out-after")), shas);
}

#[test]
fn compaction_folds_segments_into_a_new_base_and_every_point_still_reads() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "16M"), ("raw", "8M")]);
    vm.guest_random("disk0", 0, 3 << 20, 7);
    add_qemu_vm(&h.engine, &spec(&vm, Some(vm.nbd.clone()))).unwrap();
    let opts = ReplicateOptions { threads: 2, compact_after_segments: 3, ..Default::default() };
    let mut expect = Vec::new();
    let first = support::run_replicate(&h.engine, "web", &opts).unwrap();
    expect.push((first.point_id, vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]));
    let mut compacted = 0;
    for k in 0..7u64 {
        vm.guest_random("disk0", (k % 4) * 3 * MIB + 1000, 100_000, 50 + k);
        vm.guest_random("disk1", (k % 3) * 2 * MIB, 65536, 60 + k);
        let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
        assert_eq!(r.kind, PointKind::Delta);
        compacted += r.disks.iter().filter(|d| d.compacted).count();
        expect.push((r.point_id, vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]));
    }
    assert!(compacted >= 4, "{compacted} disk compactions in 7 cycles");
    // No point's chain is longer than the policy allows.
    let key = h.engine.load_key().unwrap();
    let store = h.engine.open_store_at(h.engine.store_url(), false).unwrap();
    let rt = h.engine.runtime().unwrap();
    let vm_id = h.engine.vm("web").unwrap().id;
    for (point, _) in &expect {
        let env = rt.block_on(store.get_manifest(&vm_id, point)).unwrap();
        let m = tern_engine::Manifest::open(&key, &env, &vm_id, point).unwrap();
        assert!(m.disks.iter().all(|d| d.segments.len() <= 2), "{point}: {:?}", m.disks);
    }
    for (i, (point, shas)) in expect.iter().enumerate() {
        assert_eq!(&migrate_point(&h, point, &h.root.join(format!("c-{i}"))), shas, "point {i}");
    }
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// QEMU shut down cleanly and started again on the same images: a qcow2 disk's
/// persistent bitmap survives, so tracking goes on with a delta (no resync), and the
/// point is exact.
#[test]
fn a_clean_qemu_restart_keeps_tracking_on_qcow2() {
    let h = support::host();
    let mut vm = support::Qsd::start(&[("qcow2", "16M")]);
    vm.guest_random("disk0", 0, 2 << 20, 3);
    add_qemu_vm(&h.engine, &spec(&vm, Some(vm.nbd.clone()))).unwrap();
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    support::run_replicate(&h.engine, "web", &opts).unwrap();
    vm.guest_random("disk0", 5 * MIB, 65536, 4);
    vm.restart(false);
    vm.guest_random("disk0", 9 * MIB, 65536, 5);
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta, "a clean restart must not cost a resync");
    assert_eq!(r.disks[0].changed_bytes, 2 * 65536);
    assert_eq!(migrate_point(&h, &r.point_id, &h.root.join("o")), vec![vm.guest_sha256("disk0")]);
}

#[test]
fn a_shut_off_vm_is_scanned_and_tracking_goes_on_when_it_boots() {
    let h = support::host();
    let mut vm = support::Qsd::start(&[("qcow2", "24M"), ("qcow2", "16M")]);
    vm.guest_random("disk0", 0, 3 << 20, 11);
    vm.guest_random("disk1", 4 * MIB, 1 << 20, 12);
    add_qemu_vm(&h.engine, &spec(&vm, Some(vm.nbd.clone()))).unwrap();
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    assert_eq!(support::run_replicate(&h.engine, "web", &opts).unwrap().kind, PointKind::Full);
    vm.guest_random("disk0", 7 * MIB, 65536, 13);
    let sums = [vm.guest_sha256("disk0"), vm.guest_sha256("disk1")];

    // Shut off: the pass scans the images and says so; the changes since the last
    // point are found by comparison.
    vm.shut_off();
    let warnings = std::sync::Mutex::new(Vec::new());
    let observe = |e: tern_engine::ReplicateEvent| {
        if let tern_engine::ReplicateEvent::Warning(w) = e {
            warnings.lock().unwrap().push(w);
        }
    };
    let off = tern_engine::replicate(
        &h.engine,
        "web",
        &opts,
        &tern_engine::throttle::Throttle::unlimited(),
        &observe,
    )
    .unwrap();
    let warnings = warnings.into_inner().unwrap();
    assert!(warnings.iter().any(|w| w.contains("not running") && w.contains("scanning")), "{warnings:?}");
    assert_eq!(off.kind, PointKind::Delta);
    assert_eq!(off.disks[0].changed_bytes, 65536, "the scan found exactly the one write");
    assert_eq!(off.disks[1].changed_bytes, 0);
    assert_eq!(migrate_point(&h, &off.point_id, &h.root.join("o1")), sums);

    // Booted again: the bitmap persisted at the clean close goes on, so the next pass
    // is a delta from it, not a resync.
    vm.boot();
    vm.guest_random("disk1", 9 * MIB, 65536, 14);
    let on = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(on.kind, PointKind::Delta, "booting again must not cost a resync");
    // The bitmap started before the scanned point: it holds the write the scan
    // shipped too (a superset, which is still exact), and the new one.
    assert_eq!(on.disks[0].changed_bytes, 65536);
    assert_eq!(on.disks[1].changed_bytes, 65536);
    assert!(on.disks.iter().all(|d| d.read_bytes <= 2 * 65536), "{:?}", on.disks);
    assert_eq!(
        migrate_point(&h, &on.point_id, &h.root.join("o2")),
        [vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]
    );
}

#[test]
fn a_vm_started_while_its_images_are_scanned_commits_nothing() {
    // A scan that reads the images in place (where the file system makes no
    // reflinks): a QEMU that opens them for writing before the pass commits makes it
    // fail, and nothing is committed.
    let h = support::host();
    let mut vm = support::Qsd::start(&[("qcow2", "16M")]);
    vm.guest_random("disk0", 0, 2 << 20, 21);
    add_qemu_vm(&h.engine, &spec(&vm, Some(vm.nbd.clone()))).unwrap();
    let opts = ReplicateOptions { threads: 1, ..Default::default() };
    support::run_replicate(&h.engine, "web", &opts).unwrap();
    vm.shut_off();
    let booted = std::sync::atomic::AtomicBool::new(false);
    let vm = std::sync::Mutex::new(vm);
    let observe = |e: tern_engine::ReplicateEvent| {
        if matches!(e, tern_engine::ReplicateEvent::DiskStart { .. })
            && !booted.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            vm.lock().unwrap().boot();
        }
    };
    let before = h.engine.db().newest_point(&h.engine.vm("web").unwrap().id).unwrap();
    let res = tern_engine::replicate(
        &h.engine,
        "web",
        &opts,
        &tern_engine::throttle::Throttle::unlimited(),
        &observe,
    );
    assert!(booted.load(std::sync::atomic::Ordering::SeqCst));
    let err = match res {
        // A file system that makes reflinks: the scan read a copy, which no boot
        // can change.
        Ok(r) => {
            assert_eq!(r.disks[0].snapshot, tern_engine::snapshot::SnapshotKind::Reflink);
            return;
        }
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(err.to_string().contains("opened for writing"), "{err}");
    assert_eq!(h.engine.db().newest_point(&h.engine.vm("web").unwrap().id).unwrap(), before);
    // With QEMU up, the next pass goes on with the bitmap.
    let vm = vm.into_inner().unwrap();
    vm.guest_random("disk0", 5 * MIB, 65536, 22);
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    assert_eq!(migrate_point(&h, &r.point_id, &h.root.join("o")), vec![vm.guest_sha256("disk0")]);
}

#[test]
fn in_push_mode_qemu_copies_each_cut_out_and_every_point_is_the_guest_at_its_cut() {
    // qemu-storage-daemon's NBD server serves the guest: without --nbd, tern lets
    // QEMU push each cut into local files (blockdev-backup) instead of reading exports.
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "24M"), ("raw", "16M")]);
    vm.guest("disk0", &["write -P 0x11 0 6M".into(), "write -P 0x12 20M 1M".into()]);
    vm.guest("disk1", &["write -P 0x21 1M 4M".into()]);
    let def = add_qemu_vm(&h.engine, &spec(&vm, None)).unwrap();
    assert!(def.qemu.as_ref().unwrap().push, "an NBD server in use: push mode");
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    let first = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(first.kind, PointKind::Full);
    assert_eq!(first.disks[0].snapshot, tern_engine::snapshot::SnapshotKind::QemuPush);
    let sums = |vm: &support::Qsd| vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")];
    assert_eq!(migrate_point(&h, &first.point_id, &h.root.join("o0")), sums(&vm));

    // Data, zeros over data, a discard, an unaligned write: each cycle ships exactly
    // the clusters the bitmap recorded (64 KiB granules).
    let rounds: [(&[&str], &[&str]); 3] = [
        (&["write -P 0x31 3M 64k", "write -z 20M 64k"], &["discard 1M 64k"]),
        (&["write -P 0x32 100k 5k"], &[]),
        (&[], &["write -P 0x41 15M 1M"]),
    ];
    for (n, (a, b)) in rounds.iter().enumerate() {
        if !a.is_empty() {
            vm.guest("disk0", &a.iter().map(|c| c.to_string()).collect::<Vec<_>>());
        }
        if !b.is_empty() {
            vm.guest("disk1", &b.iter().map(|c| c.to_string()).collect::<Vec<_>>());
        }
        let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
        assert_eq!(r.kind, PointKind::Delta, "round {n}");
        println!("round {n}: changed {:?}", r.disks.iter().map(|d| d.changed_bytes).collect::<Vec<_>>());
        assert_eq!(
            migrate_point(&h, &r.point_id, &h.root.join(format!("o{}", n + 1))),
            sums(&vm),
            "round {n}"
        );
    }
    // Nothing of tern's stays in QEMU but the bitmap of the next cycle, and no pushed
    // file stays on the host.
    let left = tern_objects(&vm);
    assert!(left.iter().all(|o| o.starts_with("bitmap tern-")), "{left:?}");
    let work = h.root.join("data/tracking");
    let files: Vec<_> =
        support::walk(&work).into_iter().filter(|p| p.to_string_lossy().contains("tern-push")).collect();
    assert!(files.is_empty(), "{files:?}");
}

#[test]
fn in_push_mode_a_failed_initial_replication_resumes_from_the_files_qemu_pushed() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "24M"), ("raw", "16M")]);
    vm.guest_random("disk0", 0, 9 << 20, 41);
    vm.guest_random("disk1", 2 << 20, 5 << 20, 42);
    let at_cut = [vm.guest_sha256("disk0"), vm.guest_sha256("disk1")];
    let def = add_qemu_vm(&h.engine, &QemuVmSpec { push: Some(true), ..spec(&vm, None) }).unwrap();
    assert!(def.qemu.as_ref().unwrap().push);
    let failing = ReplicateOptions { threads: 1, fail_after_uploads: Some(2), ..Default::default() };
    let e = support::run_replicate(&h.engine, "web", &failing).unwrap_err();
    assert!(e.to_string().contains("injected failure"), "{e}");
    // The guest writes on; the resumed pass still makes the point of the first cut,
    // read from the files QEMU pushed then.
    vm.guest_random("disk0", 3 << 20, 65536, 43);
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert!(r.resumed, "the pass did not resume");
    assert_eq!(r.kind, PointKind::Full);
    assert_eq!(migrate_point(&h, &r.point_id, &h.root.join("o1")), at_cut);
    // Tracking started at that cut: the next cycle ships the write made since.
    let d = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(d.kind, PointKind::Delta);
    assert_eq!(d.disks[0].changed_bytes, 65536);
    assert_eq!(
        migrate_point(&h, &d.point_id, &h.root.join("o2")),
        [vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]
    );
    let files: Vec<_> = support::walk(&h.root.join("data/tracking"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("tern-push"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
}
