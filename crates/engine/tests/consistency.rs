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

use tern_engine::{add_qemu_vm, migrate, MigrateFormat, MigrateOptions, PointSelector, ReplicateOptions};

const SIZE: usize = 8 << 20;
const COUNTER: usize = SIZE - 512;
const LAST: u64 = 250;

/// Operation of step k on disk d: (kind, offset, length, byte). Kinds: 0 data, 1
/// write-zeroes, 2 write-zeroes with unmap.
fn op(d: u64, k: u64) -> (u8, usize, usize, u8) {
    let off = ((k * 7919 + d * 13) % 2000) as usize * 4096 + (k % 8) as usize * 512 + (k % 3) as usize * 100;
    let len = 3000 + (k % 5) as usize * 4096;
    let kind = if k.is_multiple_of(9) {
        1
    } else if k.is_multiple_of(13) {
        2
    } else {
        0
    };
    (kind, off, len, (k * 31 + d) as u8 | 1)
}

fn qemu_io_cmd(d: u64, k: u64) -> String {
    let (kind, off, len, b) = op(d, k);
    match kind {
        0 => format!("write -P {b} {off} {len}"),
        1 => format!("write -z {off} {len}"),
        _ => format!("write -z -u {off} {len}"),
    }
}

/// Disk d after its steps up to `k` (the counter of k written) and, if `with_op`, the
/// operation of k too.
fn model(d: u64, k: u64, with_op: bool) -> Vec<u8> {
    let mut m = vec![0u8; SIZE];
    for j in 1..=k {
        m[COUNTER..].fill(j as u8);
        if j < k || with_op {
            let (kind, off, len, b) = op(d, j);
            m[off..off + len].fill(if kind == 0 { b } else { 0 });
        }
    }
    m
}

/// The global position of a disk's state: steps are numbered 4k-3 (disk 0 counter),
/// 4k-2 (disk 0 op), 4k-1 (disk 1 counter), 4k (disk 1 op). Returns the range of
/// global moments (last step applied) that leave the disk in this state.
fn moments(d: u64, k: u64, with_op: bool) -> (u64, u64) {
    if k == 0 {
        return (0, if d == 0 { 0 } else { 2 });
    }
    let step = 4 * k - 3 + 2 * d + u64::from(with_op);
    // Until the disk's next step.
    let next = if with_op { 4 * (k + 1) - 3 + 2 * d } else { step + 1 };
    (step, next - 1)
}

/// Which states of disk `d` the bytes are (there is at most one): (k, with_op).
fn state_of(d: u64, bytes: &[u8]) -> Option<(u64, bool)> {
    let k = u64::from(bytes[COUNTER]);
    [(k, true), (k, false)].into_iter().find(|&(k, w)| model(d, k, w) == bytes)
}

fn migrate_raw(h: &support::Host, point: &str, i: usize) -> Vec<Vec<u8>> {
    let out = h.root.join(format!("p{i}"));
    let r = migrate(
        &h.engine,
        "web",
        &MigrateOptions {
            point: PointSelector::Id(point.into()),
            format: MigrateFormat::Raw,
            out_dir: out,
            test: false,
            threads: 2,
            sync: false,
            verify: false,
        },
        &|_| {},
    )
    .unwrap();
    r.disks.iter().map(|d| std::fs::read(&d.path).unwrap()).collect()
}

/// Whether a point's two disks are the guest at one instant; the states found.
fn consistent(disks: &[Vec<u8>]) -> (bool, String) {
    let (Some(s0), Some(s1)) = (state_of(0, &disks[0]), state_of(1, &disks[1])) else {
        return (false, "a disk is not any prefix of its writes".into());
    };
    let (a0, b0) = moments(0, s0.0, s0.1);
    let (a1, b1) = moments(1, s1.0, s1.1);
    (a0.max(a1) <= b0.min(b1), format!("disk0 at {s0:?}, disk1 at {s1:?}"))
}

fn writer(vm: &support::Qsd, progress: &AtomicU64) {
    for k in 1..=LAST {
        for d in 0..2u64 {
            let uri = format!("nbd+unix:///disk{d}?socket={}", vm.nbd.display());
            let out = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    &uri,
                    "-c",
                    &format!("write -P {k} {COUNTER} 512"),
                    "-c",
                    &qemu_io_cmd(d, k),
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
        }
        progress.store(k, Ordering::Relaxed);
    }
}

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
        let w = s.spawn(|| writer(&vm, &progress));
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
        let disks = migrate_raw(&h, p, i);
        let (ok, states) = consistent(&disks);
        assert!(ok, "point {i} ({p}) is not one instant: {states}");
        if u64::from(disks[0][COUNTER]) < LAST {
            moving += 1;
        }
    }
    assert!(moving >= 6, "the points must fall inside the writes ({moving} did)");
    let caught =
        staggered.iter().enumerate().filter(|(i, p)| !consistent(&migrate_raw(&h, p, 100 + i)).0).count();
    println!(
        "{} points during the writes, all consistent; {caught} of {} staggered cuts caught",
        points.len(),
        staggered.len()
    );
    assert!(caught > 0, "no staggered cut of {} was caught: the check cannot fail", staggered.len());
    // Quiet: the next point is the model's end state.
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    let disks = migrate_raw(&h, &r.point_id, 999);
    assert!(
        disks[0] == model(0, LAST, true) && disks[1] == model(1, LAST, true),
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
    let disks = migrate_raw(&h, &r.point_id, 500);
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
