//! The cut freezes every disk of a VM at one instant inside a running QEMU: a real
//! qemu-storage-daemon with two disks (qcow2 and raw) whose NBD exports are the
//! guest's write path. What the guest writes after the cut is not in the views;
//! what it wrote before is, on both disks; the frozen bitmap lists exactly what
//! changed between two cuts; release leaves nothing of tern's in QEMU.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tern_disk::nbd::{NbdClient, STATE_DIRTY};
use tern_engine::qemu::{NbdEndpoint, QemuDisk, Qmp, Tracker};

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

use support::Qsd as Vm;

fn start_vm() -> Vm {
    Vm::start(&[("qcow2", "32M"), ("raw", "32M")])
}

fn tracker(vm: &Vm) -> Tracker {
    Tracker {
        vm: "0a1b2c3d".into(),
        disks: vec![
            QemuDisk { node: "disk0".into(), persistent_bitmaps: true },
            QemuDisk { node: "disk1".into(), persistent_bitmaps: false },
        ],
        granularity: 64 * KIB,
        workdir: vm.dir.path().to_path_buf(),
        nbd: NbdEndpoint { socket: vm.nbd.clone() },
        test_stagger: None,
    }
}

fn read_all(c: &mut NbdClient) -> Vec<u8> {
    let mut buf = vec![0u8; c.size() as usize];
    c.read(&mut buf, 0).unwrap();
    buf
}

fn tern_names(qmp: &mut Qmp) -> Vec<String> {
    let mut names = Vec::new();
    let nodes = qmp.execute("query-named-block-nodes", None).unwrap();
    for n in nodes.as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("tern-") {
            names.push(format!("node {name}"));
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if b["name"].as_str().is_some_and(|s| s.starts_with("tern-")) {
                names.push(format!("bitmap {} on {name}", b["name"]));
            }
        }
    }
    for (cmd, key) in [("query-block-exports", "id"), ("query-block-jobs", "device")] {
        let v: Value = qmp.execute(cmd, None).unwrap();
        for x in v.as_array().unwrap() {
            if x[key].as_str().is_some_and(|s| s.starts_with("tern-")) {
                names.push(format!("{cmd} {}", x[key]));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn one_cut_freezes_both_disks_and_the_next_bitmap_lists_what_changed_between_cuts() {
    let vm = start_vm();
    let mut qmp = Qmp::connect(&vm.qmp, T).unwrap();
    let t = tracker(&vm);
    vm.guest("disk0", &[format!("write -P 0xa1 0 {}", 4 * MIB)]);
    vm.guest("disk1", &[format!("write -P 0xb1 {} {}", 8 * MIB, 2 * MIB)]);

    // Cut 1 (tracking starts): views of both disks as of now.
    let mut c1 = t.cut(&mut qmp, 1, true).unwrap();
    let before0 = {
        let mut c = NbdClient::connect_unix(&vm.nbd, "disk0", &[], T).unwrap();
        read_all(&mut c)
    };
    // The guest writes after the cut, on both disks, over what the views hold.
    vm.guest(
        "disk0",
        &[format!("write -P 0xa2 {} {}", MIB, 64 * KIB), format!("write -z {} {}", 2 * MIB, MIB)],
    );
    vm.guest("disk1", &[format!("write -P 0xb2 {} {}", 8 * MIB + 4 * KIB, 8 * KIB)]);
    for (i, want) in [(0usize, before0), (1, Vec::new())] {
        let mut c = NbdClient::connect_unix(&vm.nbd, &c1.disks[i].export_name, &[], T).unwrap();
        assert!(c.read_only());
        let got = read_all(&mut c);
        if i == 0 {
            assert!(got == want, "disk0's view changed after the cut");
        } else {
            assert!(got[8 << 20..10 << 20].iter().all(|&b| b == 0xb1), "disk1's view changed after the cut");
            assert!(got[..8 << 20].iter().all(|&b| b == 0));
        }
    }
    c1.release(&mut qmp).unwrap();

    // Cut 2: bitmap 1 (frozen now) holds exactly the writes between the cuts.
    let mut c2 = t.cut(&mut qmp, 2, false).unwrap();
    vm.guest("disk0", &[format!("write -P 0xa3 {} {}", 20 * MIB, 64 * KIB)]); // after cut 2
    let ctx = format!("qemu:dirty-bitmap:{}", c2.disks[0].bitmap.as_ref().unwrap());
    let mut c = NbdClient::connect_unix(&vm.nbd, &c2.disks[0].export_name, &[&ctx], T).unwrap();
    let dirty: Vec<(u64, u64)> = c
        .extents(&ctx, 0, c.size())
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, vec![(MIB, 64 * KIB), (2 * MIB, MIB)]);
    let view = read_all(&mut c);
    assert!(view[MIB as usize..(MIB + 64 * KIB) as usize].iter().all(|&b| b == 0xa2));
    assert!(view[(2 * MIB) as usize..(3 * MIB) as usize].iter().all(|&b| b == 0));
    assert!(
        view[(20 * MIB) as usize..(20 * MIB + 64 * KIB) as usize].iter().all(|&b| b == 0),
        "cut 2's view has a later write"
    );
    let ctx1 = format!("qemu:dirty-bitmap:{}", c2.disks[1].bitmap.as_ref().unwrap());
    let mut c = NbdClient::connect_unix(&vm.nbd, &c2.disks[1].export_name, &[&ctx1], T).unwrap();
    let dirty1: Vec<(u64, u64)> = c
        .extents(&ctx1, 0, c.size())
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty1, vec![(8 * MIB, 64 * KIB)]);
    c2.release(&mut qmp).unwrap();

    // Commit cut 2's data: bitmap 1 goes; bitmap 2 keeps tracking. Then nothing of
    // tern's is left but that one bitmap per disk.
    for d in &c2.disks {
        tern_engine::qemu::cut::remove_bitmap(&mut qmp, &d.node, d.bitmap.as_ref().unwrap()).unwrap();
    }
    assert_eq!(
        tern_names(&mut qmp),
        vec![
            "bitmap \"tern-0a1b2c3d-2\" on disk0".to_string(),
            "bitmap \"tern-0a1b2c3d-2\" on disk1".to_string()
        ]
    );
    // The guest's own exports are untouched and still writable.
    vm.guest("disk0", &[format!("write -P 0xa4 0 {}", 64 * KIB)]);
    assert!(std::fs::read_dir(vm.dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("tern-fleece")));
}

/// Minimal deterministic generator for the writers' offsets.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// qemu-io commands for `n` random writes (patterns, unaligned offsets and lengths,
/// write-zeroes) and what they do to the model `m`.
fn random_writes(rng: &mut Lcg, m: &mut [u8], n: usize, tag: u8) -> Vec<String> {
    let size = m.len() as u64;
    let mut cmds = Vec::new();
    for i in 0..n {
        let len = 1 + rng.next(200 * KIB);
        let off = rng.next(size - len);
        if rng.next(5) == 0 {
            cmds.push(format!("write -z {off} {len}"));
            m[off as usize..(off + len) as usize].fill(0);
        } else {
            let p = tag.wrapping_add(i as u8) | 1;
            cmds.push(format!("write -P {p} {off} {len}"));
            m[off as usize..(off + len) as usize].fill(p);
        }
    }
    cmds
}

fn apply_log(replica: &mut [u8], path: &std::path::Path) {
    let log = tern_engine::changelog::LogReader::open(path).unwrap();
    for r in log.records() {
        let s = &mut replica[r.offset as usize..(r.offset + r.length) as usize];
        log.read(r, s).unwrap();
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // disks are indexed in several arrays at once
fn five_staged_cycles_rebuild_both_disks_exactly_at_each_cut_while_the_guest_keeps_writing() {
    let vm = start_vm();
    let mut qmp = Qmp::connect(&vm.qmp, T).unwrap();
    let t = tracker(&vm);
    let size = 32 * MIB as usize;
    let mut model = [vec![0u8; size], vec![0u8; size]];
    let mut rng = Lcg(2026);
    for (d, m) in model.iter_mut().enumerate() {
        let cmds = random_writes(&mut rng, m, 30, 0x10);
        vm.guest(&format!("disk{d}"), &cmds);
    }
    let mut c = t.cut(&mut qmp, 1, true).unwrap();
    // The initial copy reads the first cut's views: here, the replicas.
    let mut replica = [Vec::new(), Vec::new()];
    for d in 0..2 {
        let mut cl = NbdClient::connect_unix(&vm.nbd, &c.disks[d].export_name, &[], T).unwrap();
        replica[d] = read_all(&mut cl);
        assert!(replica[d] == model[d], "disk{d}: the first cut's view is not the guest's content");
    }
    c.release(&mut qmp).unwrap();
    let logs = vm.dir.path().join("logs");
    let mut staged_bytes = 0u64;
    for seq in 2..=6u64 {
        for (d, m) in model.iter_mut().enumerate() {
            let cmds = random_writes(&mut rng, m, 12, (seq * 16) as u8);
            vm.guest(&format!("disk{d}"), &cmds);
        }
        let at_cut = model.clone();
        let mut c = t.cut(&mut qmp, seq, false).unwrap();
        // The guest goes on writing on both disks while the cut is staged.
        let mut later = model.clone();
        let later_cmds: Vec<Vec<String>> =
            later.iter_mut().map(|m| random_writes(&mut rng, m, 20, (seq * 16 + 8) as u8)).collect();
        let nbd = vm.nbd.clone();
        let writer = std::thread::spawn(move || {
            for (d, cmds) in later_cmds.iter().enumerate() {
                let uri = format!("nbd+unix:///disk{d}?socket={}", nbd.display());
                let mut cmd = Command::new("qemu-io");
                cmd.args(["-f", "raw", &uri]);
                for x in cmds {
                    cmd.args(["-c", x]);
                }
                assert!(cmd.output().unwrap().status.success());
            }
        });
        for d in 0..2 {
            let header = tern_engine::changelog::LogHeader {
                vm_id: [7; 16],
                disk: d as u32,
                seq,
                instant_ms: 0,
                virtual_size: size as u64,
                granularity: 64 * KIB,
            };
            let sealed = tern_engine::qemu::stage::stage_disk(
                &vm.nbd,
                &c.disks[d],
                &logs.join(format!("disk{d}")),
                header,
                u64::MAX,
                T,
            )
            .unwrap();
            staged_bytes += sealed.changed_bytes;
            apply_log(&mut replica[d], &sealed.path);
        }
        c.release(&mut qmp).unwrap();
        writer.join().unwrap();
        model = later;
        for d in 0..2 {
            assert!(
                replica[d] == at_cut[d],
                "cycle {seq}, disk{d}: the staged log does not rebuild the disk at the cut"
            );
            tern_engine::qemu::cut::remove_bitmap(
                &mut qmp,
                &t.disks[d].node,
                &format!("tern-0a1b2c3d-{}", seq - 1),
            )
            .unwrap();
        }
    }
    // Only what changed was staged: 5 cycles x 2 disks x (12 + 20) writes of at most
    // 200 KiB, each dirtying at most 5 granules of 64 KiB, far below 5 x 64 MiB.
    assert!(staged_bytes <= 5 * 2 * 32 * 5 * 64 * KIB, "staged {staged_bytes} bytes");
}

#[test]
fn over_the_log_budget_nothing_is_sealed_and_merging_the_bitmap_loses_nothing() {
    let vm = start_vm();
    let mut qmp = Qmp::connect(&vm.qmp, T).unwrap();
    let t = tracker(&vm);
    let size = 32 * MIB;
    let mut c = t.cut(&mut qmp, 1, true).unwrap();
    c.release(&mut qmp).unwrap();
    vm.guest("disk0", &[format!("write -P 0x61 {} {}", MIB, 2 * MIB)]);
    let logs = vm.dir.path().join("logs");
    let header = |seq| tern_engine::changelog::LogHeader {
        vm_id: [7; 16],
        disk: 0,
        seq,
        instant_ms: 0,
        virtual_size: size,
        granularity: 64 * KIB,
    };
    let mut c = t.cut(&mut qmp, 2, false).unwrap();
    let err =
        tern_engine::qemu::stage::stage_disk(&vm.nbd, &c.disks[0], &logs, header(2), MIB, T).unwrap_err();
    assert_eq!(err.kind(), tern_engine::ErrorKind::Busy);
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(std::fs::read_dir(&logs).unwrap().count(), 0, "nothing staged over the budget is left");
    c.release(&mut qmp).unwrap();
    // Not committed: bitmap 1 folds into bitmap 2, which goes on tracking.
    for d in &t.disks {
        tern_engine::qemu::cut::merge_bitmap(&mut qmp, &d.node, "tern-0a1b2c3d-1", "tern-0a1b2c3d-2")
            .unwrap();
    }
    vm.guest("disk0", &[format!("write -P 0x62 {} {}", 10 * MIB, 64 * KIB)]);
    let mut c = t.cut(&mut qmp, 3, false).unwrap();
    let sealed =
        tern_engine::qemu::stage::stage_disk(&vm.nbd, &c.disks[0], &logs, header(3), u64::MAX, T).unwrap();
    c.release(&mut qmp).unwrap();
    let log = tern_engine::changelog::LogReader::open(&sealed.path).unwrap();
    let got: Vec<(u64, u64)> = log.records().iter().map(|r| (r.offset, r.length)).collect();
    // Each record is at most one 4 MiB piece; the 2 MiB write and the later one.
    assert_eq!(got, vec![(MIB, 2 * MIB), (10 * MIB, 64 * KIB)], "the deferred changes are in the next log");
}

/// A writer that writes sequence number k to disk 0, then (once acknowledged) k to disk
/// 1, then k + 1 to disk 0, and so on, each time into the first 512 bytes; it stops
/// when `stop` is set and returns the last number written.
fn sequence_writer(
    nbd: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut k = 0u64;
        // Bounded: at most 2000 numbers, whatever `stop` does.
        while k < 2000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
            k += 1;
            for d in 0..2 {
                let uri = format!("nbd+unix:///disk{d}?socket={}", nbd.display());
                // The number as a pattern byte in each of the first 4 sectors, little-endian.
                let cmds: Vec<String> =
                    (0..4).map(|b| format!("write -P {} {} 512", (k >> (8 * b)) & 0xff, b * 512)).collect();
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw", &uri]);
                for x in &cmds {
                    c.args(["-c", x]);
                }
                assert!(c.output().unwrap().status.success());
            }
        }
        k
    })
}

fn sequence_at(view: &[u8]) -> u64 {
    (0..4).map(|b| u64::from(view[b * 512]) << (8 * b)).sum()
}

/// Cut while the sequence writer runs; the views' numbers (disk0, disk1).
fn cut_during_writes(vm: &Vm, qmp: &mut Qmp, t: &Tracker, seq: u64) -> (u64, u64) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = sequence_writer(vm.nbd.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let mut c = t.cut(qmp, seq, seq == 1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = writer.join().unwrap();
    let mut got = [0u64; 2];
    for (g, disk) in got.iter_mut().zip(&c.disks) {
        let mut cl = NbdClient::connect_unix(&vm.nbd, &disk.export_name, &[], T).unwrap();
        let mut buf = vec![0u8; 2048];
        cl.read(&mut buf, 0).unwrap();
        *g = sequence_at(&buf);
    }
    c.release(qmp).unwrap();
    assert!(got[0] >= 1 && got[0] < last, "the cut fell inside the writes: {got:?}, last {last}");
    (got[0], got[1])
}

/// The consistency property of one cut over two disks: a writer that acknowledges k on
/// disk 0 before writing k on disk 1 can only be seen at one instant with disk 1 at k or
/// k - 1. The test-only stagger (the disks frozen 400 ms apart) must break it, which
/// shows the check can fail.
#[test]
fn one_cut_sees_both_disks_at_one_instant_and_a_staggered_freeze_is_caught() {
    let vm = start_vm();
    let mut qmp = Qmp::connect(&vm.qmp, T).unwrap();
    let mut t = tracker(&vm);
    for seq in 1..=3 {
        let (d0, d1) = cut_during_writes(&vm, &mut qmp, &t, seq);
        assert!(d1 == d0 || d1 + 1 == d0, "cut {seq}: disk0 at {d0}, disk1 at {d1}: not one instant");
    }
    t.test_stagger = Some(Duration::from_millis(400));
    let (d0, d1) = cut_during_writes(&vm, &mut qmp, &t, 4);
    assert!(
        !(d1 == d0 || d1 + 1 == d0),
        "a freeze 400 ms apart must be caught, yet disk0 at {d0} and disk1 at {d1} look like one instant"
    );
}
