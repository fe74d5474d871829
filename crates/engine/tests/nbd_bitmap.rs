//! tern's NBD client reads what QEMU's dirty bitmaps say changed: a real
//! qemu-storage-daemon (the running VM), guest writes through its NBD export, a bitmap
//! frozen in a QMP transaction and exported read-only; and refuses servers that are
//! not NBD.

mod support;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tern_disk::nbd::{Extent, NbdClient, NbdDisk, STATE_DIRTY};
use tern_disk::Disk;
use tern_engine::qemu::Qmp;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

use support::Qsd as Daemon;

fn start(size: &str) -> Daemon {
    Daemon::start(&[("qcow2", size)])
}

/// Extents with the dirty flag, as (offset, length).
fn dirty(extents: &[Extent]) -> Vec<(u64, u64)> {
    extents.iter().filter(|e| e.flags & STATE_DIRTY != 0).map(|e| (e.offset, e.length)).collect()
}

#[test]
fn block_status_of_a_frozen_bitmap_lists_exactly_the_granules_written_before_the_cut() {
    let d = start("64M");
    let mut qmp = Qmp::connect(&d.qmp, T).unwrap();
    qmp.transaction(vec![json!({ "type": "block-dirty-bitmap-add",
        "data": { "node": "disk0", "name": "tern-1", "granularity": 65536 } })])
        .unwrap();
    // Before the cut: a 64 KiB write, an unaligned 4 KiB one (one whole granule), a
    // write-zeroes, and 40 granules every other one (many extents).
    let mut before = vec![
        format!("write -P 0x11 {} {}", MIB, 64 * KIB),
        format!("write -P 0x22 {} {}", 5 * MIB + 4 * KIB, 4 * KIB),
        format!("write -z {} {}", 9 * MIB, 128 * KIB),
    ];
    for i in 0..40 {
        before.push(format!("write -P 0x33 {} {}", 16 * MIB + i * 128 * KIB, 64 * KIB));
    }
    d.guest("disk0", &before);
    // The cut: bitmap 2 starts, bitmap 1 stops, at one instant.
    qmp.transaction(vec![
        json!({ "type": "block-dirty-bitmap-add", "data": { "node": "disk0", "name": "tern-2", "granularity": 65536 } }),
        json!({ "type": "block-dirty-bitmap-disable", "data": { "node": "disk0", "name": "tern-1" } }),
    ])
    .unwrap();
    d.guest("disk0", &[format!("write -P 0x44 {} {}", 40 * MIB, 64 * KIB)]); // after the cut
    qmp.execute(
        "block-export-add",
        Some(json!({ "type": "nbd", "id": "tern-export-0", "node-name": "disk0", "name": "tern-view",
            "writable": false, "bitmaps": ["tern-1"] })),
    )
    .unwrap();

    let mut c =
        NbdClient::connect_unix(&d.nbd, "tern-view", &["qemu:dirty-bitmap:tern-1", "base:allocation"], T)
            .unwrap();
    assert_eq!(c.size(), 64 * MIB);
    assert!(c.read_only());
    let ext = c.extents("qemu:dirty-bitmap:tern-1", 0, c.size()).unwrap();
    // The extents tile the disk exactly.
    assert_eq!(ext[0].offset, 0);
    for w in ext.windows(2) {
        assert_eq!(w[0].offset + w[0].length, w[1].offset);
    }
    assert_eq!(ext.last().map(|e| e.offset + e.length), Some(64 * MIB));
    let mut want = vec![(MIB, 64 * KIB), (5 * MIB, 64 * KIB), (9 * MIB, 128 * KIB)];
    want.extend((0..40).map(|i| (16 * MIB + i * 128 * KIB, 64 * KIB)));
    assert_eq!(dirty(&ext), want, "the write after the cut must not be in bitmap 1");
    // A smaller window is clipped to what was asked.
    let part = c.extents("qemu:dirty-bitmap:tern-1", MIB + 32 * KIB, MIB).unwrap();
    assert_eq!(dirty(&part), vec![(MIB + 32 * KIB, 32 * KIB)]);

    // Reads: the dirty data, and holes read as zeros.
    let mut buf = vec![0u8; (64 * KIB) as usize];
    c.read(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    c.read(&mut buf, 30 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Not negotiated, and out of range: clear errors, and the connection still works.
    let err = c.extents("qemu:dirty-bitmap:tern-2", 0, MIB).unwrap_err();
    assert!(err.to_string().contains("was not negotiated"), "{err}");
    let err = c.read(&mut buf, 64 * MIB - KIB).unwrap_err();
    assert!(err.to_string().contains("beyond the export"), "{err}");
    c.read(&mut buf, MIB).unwrap();
    c.disconnect();

    // An enabled bitmap cannot be asked for: QEMU does not export it.
    let err = NbdClient::connect_unix(&d.nbd, "tern-view", &["qemu:dirty-bitmap:tern-2"], T).unwrap_err();
    assert!(
        err.to_string().contains("does not offer the metadata context qemu:dirty-bitmap:tern-2"),
        "{err}"
    );
    qmp.execute("block-export-del", Some(json!({ "id": "tern-export-0" }))).unwrap();
}

#[test]
fn an_export_read_as_a_disk_equals_what_qemu_img_reads() {
    let d = start("48M");
    let cmds: Vec<String> = (0..24)
        .map(|i| format!("write -P {} {} {}", i + 1, i * 2 * MIB + (i % 3) * 4096, 300 * KIB + i * 512))
        .collect();
    d.guest("disk0", &cmds);
    let disk = NbdDisk::open_unix(&d.nbd, "disk0", T).unwrap();
    assert_eq!(disk.virtual_size(), 48 * MIB);
    // qemu-img, a real NBD client, dumps the same export.
    let dump = d.dir.path().join("dump.raw");
    let uri = format!("nbd+unix:///disk0?socket={}", d.nbd.display());
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = std::fs::read(&dump).unwrap();
    let mut got = vec![0u8; want.len()];
    disk.read_at(&mut got, 0).unwrap();
    assert!(got == want, "NBD reads differ from qemu-img's");
    // The mapping says data wherever there are non-zero bytes.
    let map = tern_disk::collect_map(&disk).unwrap();
    for m in &map {
        if m.kind.reads_as_zero() {
            let s = &want[m.start as usize..m.end() as usize];
            assert!(s.iter().all(|&b| b == 0), "run {m:?} mapped zero holds data");
        }
    }
    assert!(map.iter().any(|m| m.kind.reads_as_zero()), "a 48 MiB disk with 7 MiB written has holes");
}

fn fake_server(bytes: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(bytes);
        std::thread::sleep(Duration::from_millis(500));
    });
    (dir, path)
}

fn connect_err(p: &Path) -> String {
    NbdClient::connect_unix(p, "x", &[], Duration::from_secs(2)).unwrap_err().to_string()
}

#[test]
fn servers_that_are_not_nbd_get_clear_errors() {
    let (_d, p) = fake_server(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n");
    assert!(connect_err(&p).contains("not a newstyle NBD server"));
    let (_d, p) = fake_server(b"NBDMAGIC");
    let e = connect_err(&p);
    assert!(e.contains("closed the connection while sending its greeting"), "{e}");
    // Oldstyle-only flags (no fixed newstyle).
    let (_d, p) = fake_server(b"NBDMAGICIHAVEOPT\x00\x00");
    assert!(connect_err(&p).contains("fixed newstyle"));
}
