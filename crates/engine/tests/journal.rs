//! The journal source against a real qemu-storage-daemon: QEMU's write-blocking mirror
//! into tern's sinks while the guest writes two disks. Every point is both disks at
//! one instant (the cut test's model), points after the first resync are marks (no
//! copy-before-write view), the guest's writes never fail, and when the sink goes
//! away or refuses a write, tern falls back to the dirty bitmap and the next point is
//! exact.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tern_engine::journal::Journals;
use tern_engine::snapshot::SnapshotKind;
use tern_engine::{add_qemu_vm, ReplicateOptions};

const STEPS: support::steps::Steps = support::steps::Steps { size: 8 << 20, last: 200, aligned: true };

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn journal_vm(h: &support::Host, vm: &support::Qsd) {
    let spec = tern_engine::QemuVmSpec { journal: true, ..vm.spec("web") };
    add_qemu_vm(&h.engine, &spec).unwrap();
}

fn opts(journals: &Arc<Journals>) -> ReplicateOptions {
    ReplicateOptions {
        threads: 2,
        compact_after_segments: 4,
        journals: Some(journals.clone()),
        ..Default::default()
    }
}

/// Names of tern's block jobs in the daemon now.
fn jobs(vm: &support::Qsd) -> Vec<String> {
    let mut q = tern_engine::qemu::Qmp::connect(&vm.qmp, Duration::from_secs(10)).unwrap();
    let j = q.execute("query-block-jobs", None).unwrap();
    j.as_array().unwrap().iter().filter_map(|j| j["device"].as_str().map(String::from)).collect()
}

fn assert_exact(h: &support::Host, vm: &support::Qsd, point: &str, i: usize) {
    let disks = support::migrate_raw(h, point, i);
    assert_eq!(sha(&disks[0]), vm.guest_sha256("disk0"), "point {point}: disk 0 differs from the guest");
    assert_eq!(sha(&disks[1]), vm.guest_sha256("disk1"), "point {point}: disk 1 differs from the guest");
}

#[test]
fn journal_points_are_both_disks_at_one_instant_and_need_no_view() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("raw", "8M")]);
    journal_vm(&h, &vm);
    let journals = Journals::new();
    let o = opts(&journals);
    // The initial replication (a view of QEMU's own; no mirror yet).
    let first = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert!(first.disks.iter().all(|d| d.snapshot == SnapshotKind::QemuView));
    let progress = AtomicU64::new(0);
    let points = std::thread::scope(|s| {
        let w = s.spawn(|| STEPS.writer(&vm.nbd, &progress));
        let mut points = Vec::new();
        while progress.load(Ordering::Relaxed) < STEPS.last - 10 {
            let r = support::run_replicate(&h.engine, "web", &o).unwrap();
            points.push(r);
            std::thread::sleep(Duration::from_millis(100));
        }
        w.join().unwrap();
        points
    });
    assert!(points.len() >= 6, "only {} points during the writes", points.len());
    // Every cycle is a mark: the mirrors run, and no backup job ever froze a view.
    for r in &points {
        assert!(r.disks.iter().all(|d| d.snapshot == SnapshotKind::Journal), "{:?}", r.disks);
    }
    let names = jobs(&vm);
    assert!(names.iter().all(|n| n.starts_with("tern-jnl-")) && names.len() == 2, "jobs: {names:?}");
    let mut moving = 0;
    for (i, r) in points.iter().enumerate() {
        let disks = support::migrate_raw(&h, &r.point_id, i);
        let (ok, states) = STEPS.consistent(&disks);
        assert!(ok, "point {i} ({}) is not one instant: {states}", r.point_id);
        if u64::from(disks[0][STEPS.counter()]) < STEPS.last {
            moving += 1;
        }
    }
    assert!(moving >= 6, "the points must fall inside the writes ({moving} did)");
    // Quiet: the next point is the model's end state, and the guest's disks.
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    let disks = support::migrate_raw(&h, &r.point_id, 999);
    assert!(disks[0] == STEPS.model(0, STEPS.last, true) && disks[1] == STEPS.model(1, STEPS.last, true));
    assert_exact(&h, &vm, &r.point_id, 1000);
    println!("{} journal points during the writes, all one instant", points.len());
}

/// Random writes through the guest's path, `n` of them of 4 KiB on both disks.
fn scribble(vm: &support::Qsd, seed: u64, n: u64) {
    for i in 0..n {
        let x = seed.wrapping_mul(6364136223846793005).wrapping_add(i.wrapping_mul(1442695040888963407));
        let off = (x >> 16) % ((8 << 20) / 4096) * 4096;
        vm.guest_random(if i % 2 == 0 { "disk0" } else { "disk1" }, off, 4096, x);
    }
}

#[test]
fn when_the_sink_goes_or_refuses_a_write_tern_falls_back_to_the_bitmap_and_the_next_point_is_exact() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("qcow2", "8M")]);
    journal_vm(&h, &vm);
    let journals = Journals::new();
    let o = opts(&journals);
    support::run_replicate(&h.engine, "web", &o).unwrap();
    scribble(&vm, 1, 8);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 1);
    scribble(&vm, 2, 8);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 2);

    // The sink goes (the agent stops, or is killed): the mirrors fail on the next
    // write, which the guest never sees.
    drop(o);
    drop(journals);
    scribble(&vm, 3, 16);
    // The mirrors end (the first write after the sink went failed at its target).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !jobs(&vm).is_empty() {
        assert!(std::time::Instant::now() < until, "the failed mirrors must end: {:?}", jobs(&vm));
        std::thread::sleep(Duration::from_millis(50));
    }
    let journals = Journals::new();
    let o = opts(&journals);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 3);
    scribble(&vm, 4, 8);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 4);

    // A write that is not whole sectors makes QEMU read the sink to pad it, which the
    // sink refuses: the mirror ends, the guest's write succeeds.
    vm.guest("disk1", &["write -P 0x5a 1000 77".into()]);
    scribble(&vm, 5, 4);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 5);
    scribble(&vm, 6, 4);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 6);
    assert!(r.disks.iter().all(|d| d.snapshot == SnapshotKind::Journal));
}

/// The check above can fail: marks that close the two disks' segments 300 ms apart
/// (test only) are caught as not one instant.
#[test]
fn a_staggered_mark_is_caught() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("raw", "8M")]);
    journal_vm(&h, &vm);
    let journals = Journals::new();
    let o = ReplicateOptions { test_stagger: Some(Duration::from_millis(300)), ..opts(&journals) };
    support::run_replicate(&h.engine, "web", &opts(&journals)).unwrap();
    support::run_replicate(&h.engine, "web", &opts(&journals)).unwrap();
    let progress = AtomicU64::new(0);
    let points = std::thread::scope(|s| {
        let w = s.spawn(|| STEPS.writer(&vm.nbd, &progress));
        let mut points = Vec::new();
        while progress.load(Ordering::Relaxed) < STEPS.last - 10 && points.len() < 6 {
            points.push(support::run_replicate(&h.engine, "web", &o).unwrap().point_id);
        }
        w.join().unwrap();
        points
    });
    let caught = points
        .iter()
        .enumerate()
        .filter(|(i, p)| !STEPS.consistent(&support::migrate_raw(&h, p, *i)).0)
        .count();
    println!("{caught} of {} staggered marks caught", points.len());
    assert!(caught > 0, "no staggered mark of {} was caught: the check cannot fail", points.len());
}

/// A data directory deep enough that its work folder cannot hold a Unix socket (108
/// bytes with the NUL): the sink listens in a private short folder instead, and the
/// journal works as anywhere else.
#[test]
fn a_deep_data_directory_still_gets_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let deep =
        dir.path().join("a-rather-long-folder-name-for-a-data-directory/and-one-more-level-of-it/data");
    let engine = tern_engine::Engine::open(&tern_engine::EngineOptions {
        data_dir: Some(deep.clone()),
        ..Default::default()
    })
    .unwrap();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("raw", "8M")]);
    let spec = tern_engine::QemuVmSpec { journal: true, ..vm.spec("web") };
    add_qemu_vm(&engine, &spec).unwrap();
    let journals = Journals::new();
    support::run_replicate(&engine, "web", &opts(&journals)).unwrap();
    scribble(&vm, 9, 6);
    let r = support::run_replicate(&engine, "web", &opts(&journals)).unwrap();
    assert!(r.disks.iter().all(|d| d.snapshot == SnapshotKind::Journal), "{:?}", r.disks);
    scribble(&vm, 10, 6);
    let r = support::run_replicate(&engine, "web", &opts(&journals)).unwrap();
    assert!(r.disks.iter().all(|d| d.snapshot == SnapshotKind::Journal), "{:?}", r.disks);
    let h = support::Host::wrap(engine, dir);
    assert_exact(&h, &vm, &r.point_id, 0);
}

/// Over the log budget: the sink refuses the write that would pass it (the mirror
/// ends, the guest's write succeeds), the resync that follows finds more to read
/// than the budget and stages nothing (a backlog, as for bitmap cycles); with the
/// budget raised, the next point is exact.
#[test]
fn over_the_log_budget_the_journal_backs_off_and_catches_up() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("raw", "8M")]);
    journal_vm(&h, &vm);
    let change = |b: u64| tern_engine::SettingsChange {
        frequency: None,
        retention_age: None,
        retention_count: None,
        log_budget: Some(b),
    };
    tern_engine::enable(&h.engine, "web", &change(1 << 20)).unwrap();
    let journals = Journals::new();
    let o = opts(&journals);
    support::run_replicate(&h.engine, "web", &o).unwrap();
    support::run_replicate(&h.engine, "web", &o).unwrap();
    // 2 MiB through the journal: past its 1 MiB budget.
    vm.guest_random("disk0", 0, 2 << 20, 41);
    let e = support::run_replicate(&h.engine, "web", &o).unwrap_err();
    assert!(e.to_string().contains("budget"), "{e}");
    tern_engine::enable(&h.engine, "web", &change(64 << 20)).unwrap();
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 0);
    scribble(&vm, 42, 4);
    let r = support::run_replicate(&h.engine, "web", &o).unwrap();
    assert_exact(&h, &vm, &r.point_id, 1);
    assert!(r.disks.iter().all(|d| d.snapshot == SnapshotKind::Journal));
}
