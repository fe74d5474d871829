//! The `scan` tracking source: a VM of image files is replicated in full once; every
//! later pass compares the images with the previous point and commits only what
//! differs as a delta point (segments on the first point's base). Every point
//! migrates to exactly the images as they were when it was made (checked with
//! `qemu-img compare` against copies kept at each point), and compaction folds the
//! chain into a new base without changing what any point reads.

mod support;

use std::path::{Path, PathBuf};

use support::{add_vm, host, qemu, qemu_compare, run_replicate};
use tern_engine::{PointKind, ReplicateOptions};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn migrate_point(h: &support::Host, point: &str, out: &Path) -> Vec<PathBuf> {
    support::migrate_point(&h.engine, "vm", point, out)
}

#[test]
fn scans_ship_only_what_changed_and_every_point_migrates_exactly() {
    let h = host();
    let raw = h.root.join("a.raw");
    tern_engine::sample::write_sample_disk(&raw, 48 * MIB, 3).unwrap();
    let qcow = h.root.join("b.qcow2");
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &s(&qcow), "40M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 0x61 0 9M", "-c", "write -P 0x62 30M 3M", &s(&qcow)]);
    add_vm(&h.engine, "vm", &[raw.clone(), qcow.clone()]);

    // (point, copies of the images as they were at the point)
    let mut points: Vec<(String, PathBuf, PathBuf)> = Vec::new();
    let keep = |points: &mut Vec<(String, PathBuf, PathBuf)>, id: String| {
        let n = points.len();
        let (a, b) = (h.root.join(format!("a-{n}.raw")), h.root.join(format!("b-{n}.qcow2")));
        std::fs::copy(&raw, &a).unwrap();
        std::fs::copy(&qcow, &b).unwrap();
        points.push((id, a, b));
    };
    let opts = ReplicateOptions { compact_after_segments: 3, ..Default::default() };
    let first = run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(first.kind, PointKind::Full);
    keep(&mut points, first.point_id);

    // Small writes in both disks, a discard, and a write of zeros over data.
    let rounds: [(&[&str], &[&str]); 4] = [
        (&["write -P 0x11 5M 64k", "write -P 0x12 47M 4k"], &["write -P 0x21 1M 4k"]),
        (&["write -z 5M 64k"], &["write -P 0x22 39M 512k", "discard 30M 1M"]),
        (&[], &[]),
        (&["write -P 0x13 0 4k", "write -P 0x14 20M 128k"], &["write -z 2M 64k"]),
    ];
    let mut compactions = 0;
    for (i, (on_raw, on_qcow)) in rounds.iter().enumerate() {
        for (img, fmt, cmds) in [(&raw, "raw", on_raw), (&qcow, "qcow2", on_qcow)] {
            if cmds.is_empty() {
                continue;
            }
            let mut args = vec!["-f", fmt];
            for c in cmds.iter() {
                args.extend(["-c", c]);
            }
            let p = s(img);
            args.push(&p);
            qemu("qemu-io", &args);
        }
        let r = run_replicate(&h.engine, "vm", &opts).unwrap();
        println!(
            "round {i}: {:?}, read {:?}, changed {:?}, uploaded {:?}, compacted {:?}",
            r.kind,
            r.disks.iter().map(|d| d.read_bytes).collect::<Vec<_>>(),
            r.disks.iter().map(|d| d.changed_bytes).collect::<Vec<_>>(),
            r.disks.iter().map(|d| d.uploaded_bytes).collect::<Vec<_>>(),
            r.disks.iter().map(|d| d.compacted).collect::<Vec<_>>(),
        );
        assert_eq!(r.kind, PointKind::Delta, "round {i}");
        // Every disk was read whole (but for what maps as zero): a scan knows nothing
        // in advance.
        let read: u64 = r.disks.iter().map(|d| d.read_bytes).sum();
        assert!(read > 24 * MIB, "round {i}: read only {read} bytes");
        let changed: u64 = r.disks.iter().map(|d| d.changed_bytes).sum();
        let uploaded: u64 = r.disks.iter().map(|d| d.uploaded_bytes).sum();
        if on_raw.is_empty() && on_qcow.is_empty() {
            assert_eq!(changed, 0, "round {i}: nothing changed");
            // A compacted disk gets a new base index; nothing else is uploaded.
            let data: u64 = r.disks.iter().filter(|d| !d.compacted).map(|d| d.uploaded_bytes).sum();
            assert_eq!(data, 0, "round {i}: nothing changed");
        } else {
            assert!(changed > 0, "round {i}: the changes were not found");
            // What changed is at most a few MiB: far less than the disks' 88 MiB.
            if !r.disks.iter().any(|d| d.compacted) {
                assert!(uploaded < 2 * MIB, "round {i}: uploaded {uploaded} bytes");
            }
        }
        compactions += r.disks.iter().filter(|d| d.compacted).count();
        keep(&mut points, r.point_id);
    }
    assert!(compactions > 0, "the chain was never compacted");

    for (n, (id, a, b)) in points.iter().enumerate() {
        let out = h.root.join(format!("out-{n}"));
        let disks = migrate_point(&h, id, &out);
        qemu_compare(a, "raw", &disks[0], "raw");
        qemu_compare(b, "qcow2", &disks[1], "raw");
        std::fs::remove_dir_all(&out).unwrap();
    }
    // Nothing of the scans stays on the host: no snapshots, no logs.
    let snapshots = h.engine.data_dir().snapshots_dir();
    let left = if snapshots.exists() { support::walk(&snapshots) } else { Vec::new() };
    assert!(left.is_empty(), "left under the snapshots folder: {left:?}");
    let logs = h.root.join("data/tracking");
    let left = if logs.exists() { support::walk(&logs) } else { Vec::new() };
    assert!(left.is_empty(), "left under the tracking folder: {left:?}");
}
