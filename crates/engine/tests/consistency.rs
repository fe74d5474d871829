//! The property tern exists for, end to end: every recovery point of a running VM,
//! migrated, is the guest's two disks at ONE instant. A writer (qemu-io through the
//! qemu-storage-daemon's NBD exports, the guest's write path) runs through the
//! initial replication and the delta cycles after it, doing numbered steps in a fixed
//! order: on disk 0 a counter sector then an operation (overlapping, unaligned data
//! writes, write-zeroes, write-zeroes with unmap), then the same on disk 1, then the
//! next number. Each request is acknowledged before the next is sent. A point is
//! consistent iff each disk equals the replayed model after some prefix of its own
//! steps, and one moment of the global order fits both prefixes. The test-only
//! stagger (disks frozen 400 ms apart) must break that, which shows the check can fail.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tern_engine::{add_qemu_vm, ReplicateOptions};

const STEPS: support::steps::Steps = support::steps::Steps { size: 8 << 20, last: 250, aligned: false };
const LAST: u64 = STEPS.last;

#[test]
fn every_point_is_both_disks_at_one_instant_and_a_staggered_cut_is_caught() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "8M"), ("raw", "8M")]);
    let spec = vm.spec("web");
    add_qemu_vm(&h.engine, &spec).unwrap();
    let opts = ReplicateOptions { threads: 2, compact_after_segments: 4, ..Default::default() };
    let progress = AtomicU64::new(0);
    // Points made while the writer runs: the initial replication and cycles.
    let (points, staggered) = std::thread::scope(|s| {
        let w = s.spawn(|| STEPS.writer(&vm.nbd, &progress));
        while progress.load(Ordering::Relaxed) < 5 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut points = Vec::new();
        while progress.load(Ordering::Relaxed) < LAST * 2 / 3 {
            let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
            points.push((r.point_id, progress.load(Ordering::Relaxed)));
            std::thread::sleep(Duration::from_millis(150));
        }
        // Then cuts that freeze the disks 400 ms apart.
        let stagger = ReplicateOptions { test_stagger: Some(Duration::from_millis(400)), ..opts.clone() };
        let mut staggered = Vec::new();
        while progress.load(Ordering::Relaxed) < LAST - 10 && staggered.len() < 4 {
            let r = support::run_replicate(&h.engine, "web", &stagger).unwrap();
            staggered.push(r.point_id);
        }
        w.join().unwrap();
        (points, staggered)
    });
    assert!(points.len() >= 6, "only {} points during the writes", points.len());
    let mut moving = 0;
    for (i, (p, _)) in points.iter().enumerate() {
        let disks = support::migrate_raw(&h, p, i);
        let (ok, states) = STEPS.consistent(&disks);
        assert!(ok, "point {i} ({p}) is not one instant: {states}");
        if u64::from(disks[0][STEPS.counter()]) < LAST {
            moving += 1;
        }
    }
    assert!(moving >= 6, "the points must fall inside the writes ({moving} did)");
    let caught = staggered
        .iter()
        .enumerate()
        .filter(|(i, p)| !STEPS.consistent(&support::migrate_raw(&h, p, 100 + i)).0)
        .count();
    println!(
        "{} points during the writes, all consistent; {caught} of {} staggered cuts caught",
        points.len(),
        staggered.len()
    );
    assert!(caught > 0, "no staggered cut of {} was caught: the check cannot fail", staggered.len());
    // Quiet: the next point is the model's end state.
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    let disks = support::migrate_raw(&h, &r.point_id, 999);
    assert!(
        disks[0] == STEPS.model(0, LAST, true) && disks[1] == STEPS.model(1, LAST, true),
        "the last point is not the end state"
    );
}

/// fio's nbd engine (random 4 KiB writes, 4 in flight) and nbdcopy (a bulk copy) as
/// the guest while cycles run: every point reads back and verifies, and once the
/// writers stop, the next point is exactly the guest's disks.
#[test]
fn fio_and_nbdcopy_as_the_guest_through_cycles() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "32M"), ("raw", "32M")]);
    let spec = vm.spec("web");
    add_qemu_vm(&h.engine, &spec).unwrap();
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    support::run_replicate(&h.engine, "web", &opts).unwrap();
    let uri = |d: u32| format!("nbd+unix:///disk{d}?socket={}", vm.nbd.display());
    let src = h.root.join("bulk.bin");
    let mut x = 0x1234_5678_9abc_def1u64;
    let bulk: Vec<u8> = (0..12 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&src, &bulk).unwrap();
    let mut points = Vec::new();
    std::thread::scope(|s| {
        let fio = s.spawn(|| {
            let out = Command::new("fio")
                .args([
                    "--name=guest",
                    "--ioengine=nbd",
                    &format!("--uri={}", uri(0)),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=4",
                    "--size=32M",
                    "--time_based",
                    "--runtime=5",
                    "--randrepeat=0",
                ])
                .output()
                .expect("fio is needed (Debian package fio; scripts/deps installs it)");
            assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
        });
        let copy = s.spawn(|| {
            let out = Command::new("nbdcopy")
                .arg(&src)
                .arg(uri(1))
                .output()
                .expect("nbdcopy is needed (Debian package libnbd-bin; scripts/deps installs it)");
            assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
        });
        while !fio.is_finished() {
            points.push(support::run_replicate(&h.engine, "web", &opts).unwrap().point_id);
            std::thread::sleep(Duration::from_millis(200));
        }
        fio.join().unwrap();
        copy.join().unwrap();
    });
    assert!(points.len() >= 2, "only {} cycles while fio ran", points.len());
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    let disks = support::migrate_raw(&h, &r.point_id, 500);
    let sha = |b: &[u8]| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b))
    };
    assert_eq!(sha(&disks[0]), vm.guest_sha256("disk0"));
    assert_eq!(sha(&disks[1]), vm.guest_sha256("disk1"));
    assert_eq!(&disks[1][..bulk.len()], &bulk[..]);
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
