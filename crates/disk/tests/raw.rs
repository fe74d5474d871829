//! Raw images: sparse mapping and round trips, checked against qemu-img.

use std::process::Command;

use tern_disk::{open_disk, MapKind, OpenOptions};

fn qemu_io(path: &std::path::Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().expect("qemu-io runs");
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sparse_raw_maps_holes_as_zero_and_data_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    qemu_io(&img, &["write -P 0x5a 8M 1M", "write -P 0x01 40M 64K"]);
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    let map = tern_disk::collect_map(disk.as_ref()).unwrap();
    let data: Vec<(u64, u64)> =
        map.iter().filter(|m| m.kind == MapKind::Data).map(|m| (m.start, m.length)).collect();
    // Filesystems may allocate a little more than written, never less.
    assert!(data.iter().any(|&(s, l)| s <= 8 << 20 && s + l >= 9 << 20), "{map:?}");
    assert!(data.iter().any(|&(s, l)| s <= 40 << 20 && s + l >= (40 << 20) + (64 << 10)), "{map:?}");
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 8 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[test]
fn read_past_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 512];
    let err = disk.read_at(&mut buf, 4000).unwrap_err();
    assert_eq!(err.kind(), tern_disk::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("beyond the virtual size"), "{err}");
}
