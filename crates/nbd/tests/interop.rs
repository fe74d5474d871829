//! The server against the real clients: qemu-io, qemu-img, nbdcopy, nbdinfo.

mod support;

use std::sync::Arc;

use support::{ok, pattern, sparse_file, tool, Tern};
use tern_nbd::{Export, FileExport};

fn file_export(path: &std::path::Path, read_only: bool) -> Arc<dyn Export> {
    Arc::new(FileExport::open(path, read_only).unwrap())
}

#[test]
fn qemu_io_reads_writes_discards_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    sparse_file(&img, 16 << 20, &[(0, 1 << 20)]);
    let tern = Tern::start(dir.path(), vec![("disk".into(), file_export(&img, false))]);
    let uri = tern.uri("disk");
    let out = ok(tool("qemu-io")
        .args(["--image-opts"])
        .arg(format!("driver=nbd,server.type=unix,server.path={},export=disk", tern.socket.display()))
        .args([
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -P 0xcd 3 517",
            "-c",
            "write -z 4M 1M",
            "-c",
            "discard 8M 2M",
            "-c",
            "write -z -u 12M 64k",
            "-c",
            "read -P 0xab 1M 64k",
            "-c",
            "read -P 0xcd 3 517",
            "-c",
            "read -P 0 4M 1M",
            "-c",
            "flush",
        ]));
    assert!(!out.contains("fail") && !out.contains("error"), "{out}");
    let got = std::fs::read(&img).unwrap();
    assert!(got[1 << 20..(1 << 20) + (64 << 10)].iter().all(|&b| b == 0xab));
    assert!(got[3..520].iter().all(|&b| b == 0xcd));
    assert!(got[4 << 20..5 << 20].iter().all(|&b| b == 0));
    assert!(got[12 << 20..(12 << 20) + (64 << 10)].iter().all(|&b| b == 0));
    // qemu-io through the URI form as well (what `-blockdev driver=nbd` parses too).
    let out = ok(tool("qemu-io").args(["-r", "-f", "raw", &uri, "-c", "read -P 0xab 1M 4k"]));
    assert!(out.contains("read 4096/4096"), "{out}");
}

#[test]
fn qemu_img_converts_to_and_from_the_export() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, 8 << 20, &[(0, 100_000), (5 << 20, 1 << 20)]);
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst).unwrap().set_len(8 << 20).unwrap();
    let tern = Tern::start(
        dir.path(),
        vec![("src".into(), file_export(&src, true)), ("dst".into(), file_export(&dst, false))],
    );
    // From the export into a qcow2, and from that qcow2 into the writable export.
    let q = dir.path().join("copy.qcow2");
    ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(tern.uri("src")).arg(&q));
    ok(tool("qemu-img").args(["convert", "-n", "-f", "qcow2", "-O", "raw"]).arg(&q).arg(tern.uri("dst")));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(), "dst differs from src");
    ok(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(tern.uri("src"))
        .arg(tern.uri("dst")));
}

#[test]
fn nbdcopy_copies_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_file(&src, 32 << 20, &[(4096, 3 << 20), (20 << 20, 5 << 20)]);
    let dst = dir.path().join("dst.raw");
    std::fs::File::create(&dst).unwrap().set_len(32 << 20).unwrap();
    let tern = Tern::start(dir.path(), vec![("dst".into(), file_export(&dst, false))]);
    ok(tool("nbdcopy").arg(&src).arg(tern.uri("dst")));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
    let back = dir.path().join("back.raw");
    ok(tool("nbdcopy").arg(tern.uri("dst")).arg(&back));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
}

#[test]
fn nbdinfo_lists_exports_and_maps_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    sparse_file(&a, 64 << 20, &[(0, 65536), (1 << 20, 3 << 20), (40 << 20, 1), (63 << 20, 1 << 20)]);
    let b = dir.path().join("b.raw");
    sparse_file(&b, 1 << 20, &[]);
    let tern = Tern::start(
        dir.path(),
        vec![("a".into(), file_export(&a, true)), ("b".into(), file_export(&b, false))],
    );
    let list = ok(tool("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!("nbd+unix:///?socket={}", tern.socket.display())));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b"]);
    let e0 = &v["exports"][0];
    assert_eq!(e0["export-size"], 64 << 20);
    assert_eq!(e0["is_read_only"], true);
    assert_eq!(e0["block_size_preferred"], 4096);

    let map = ok(tool("nbdinfo").args(["--map", "--json"]).arg(tern.uri("a")));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    // nbdinfo: [{offset, length, type (flags)}]; qemu-img: [{start, length, data, zero}].
    let ours: Vec<(u64, u64, bool, bool)> = merge(map.as_array().unwrap().iter().map(|e| {
        let t = e["type"].as_u64().unwrap();
        (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), t & 1 == 0, t & 2 != 0)
    }));
    let qemu = ok(tool("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&a));
    let qemu: serde_json::Value = serde_json::from_str(&qemu).unwrap();
    let theirs = merge(qemu.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        )
    }));
    assert_eq!(ours, theirs);
    assert!(ours.len() >= 5, "{ours:?}");
}

/// Adjacent runs of the same kind joined.
fn merge(it: impl Iterator<Item = (u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for r in it {
        match out.last_mut() {
            Some(l) if l.2 == r.2 && l.3 == r.3 && l.0 + l.1 == r.0 => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn writes_through_the_export_land_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    sparse_file(&img, 4 << 20, &[]);
    let tern = Tern::start(dir.path(), vec![("d".into(), file_export(&img, false))]);
    let data = dir.path().join("data");
    std::fs::write(&data, pattern(4 << 20, 9)).unwrap();
    ok(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&data).arg(tern.uri("d")));
    assert!(std::fs::read(&img).unwrap() == pattern(4 << 20, 9));
}
