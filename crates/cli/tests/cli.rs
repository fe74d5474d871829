//! The `tern` binary end to end: flags, errors, replicate -> migrate on another
//! "machine" (another data directory with only the store URL and the key), and the
//! SHA-256 migrate prints. Resume after kill -9 is in `kill.rs`, failing stores in
//! `store_failures.rs`, keys in `keys.rs`.

mod support;

use std::path::Path;

use support::{fails, ok, qemu, sha256, tern};

/// A sample disk: scattered random and text MiBs with holes.
fn sample(path: &Path, mib: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..mib {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 4 {
            0 | 1 => {
                for c in buf.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                f.write_all_at(&buf, i << 20).unwrap();
            }
            2 => f.write_all_at(&b"some text in a file ".repeat(52429)[..1 << 20], i << 20).unwrap(),
            _ => {}
        }
    }
}

#[test]
fn flags_are_validated_with_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    for t in ["0", "33"] {
        let o = tern(&data).args(["replicate", "x", "--threads", t]).output().unwrap();
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.starts_with("tern: error: ") && e.contains("1 to 32"), "{e}");
        assert_eq!(e.lines().count(), 1, "the whole of stderr is one line: {e}");
    }
    for bad in ["100Kbps", "2Gbps", "50", "fast"] {
        let e = fails(tern(&data).args(["throttle", "set", "--work-limit", bad]));
        assert!(e.contains("512Kbps to 1023Mbps"), "{e}");
    }
    ok(tern(&data).args([
        "throttle",
        "set",
        "--work-limit",
        "50Mbps",
        "--off-limit",
        "unlimited",
        "--work-days",
        "Mon-Fri",
        "--work-hours",
        "08:00-18:00",
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["throttle", "show", "--json"]))).unwrap();
    assert_eq!(v["work_limit"], "50Mbps");
    assert_eq!(v["off_limit"], "unlimited");
    assert_eq!(v["work_days"], "Mon,Tue,Wed,Thu,Fri");
    let e = fails(tern(&data).args(["replicate", "nosuchvm"]));
    assert!(e.contains("no VM named"), "{e}");
    let e = fails(tern(&data).args(["vm", "add", "bad/name", "--disk", "/nonexistent"]));
    assert!(e.contains("\"bad/name\" is invalid"), "{e}");
    let e = fails(tern(&data).args(["vm", "add", "good", "--disk", "/nonexistent"]));
    assert!(e.contains("/nonexistent"), "{e}");
}

#[test]
fn replicate_then_migrate_elsewhere_with_only_store_and_key() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("web.raw");
    sample(&img, 24);
    ok(tern(&data)
        .args(["vm", "add", "web", "--cpus", "4", "--memory", "8G", "--firmware", "uefi", "--disk"])
        .arg(&img));
    let out = ok(tern(&data).args(["replicate", "web", "--threads", "3", "--json"]));
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["disks"][0]["sha256"], sha256(&img));
    assert_eq!(rep["disks"][0]["chunks"], 6);
    let st: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["status", "web", "--json"]))).unwrap();
    assert_eq!(st[0]["state"], "protected");
    assert_eq!(st[0]["bytes_done"], 24u64 << 20);
    let pts: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["points", "web", "--json"]))).unwrap();
    assert_eq!(pts.as_array().unwrap().len(), 1);
    let point = pts[0]["point_id"].as_str().unwrap().to_string();
    assert_eq!(pts[0]["disks"][0]["sha256"], sha256(&img));
    let listed = ok(tern(&data).args(["points", "web"]));
    assert!(listed.contains(&format!("sha256 {}", sha256(&img))), "{listed}");

    // Another machine: its own data directory, the store URL and an exported key.
    let key = d.path().join("exported.key");
    ok(tern(&data).args(["key", "export", "--out"]).arg(&key));
    let other = d.path().join("other");
    let store = format!("file://{}", data.join("store").display());
    let e = fails(
        tern(&other)
            .args(["migrate", "web", "--format", "raw", "--store", &store, "--out"])
            .arg(d.path().join("o0")),
    );
    assert!(e.contains("key"), "{e}");
    let outdir = d.path().join("o1");
    let text = ok(tern(&other)
        .args(["migrate", "web", "--format", "raw", "--point", &point, "--store", &store, "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(&outdir));
    let migrated = outdir.join("web-disk0.raw");
    assert!(text.contains(&sha256(&img)), "{text}");
    assert_eq!(sha256(&migrated), sha256(&img));
    let verified = ok(tern(&other)
        .args(["migrate", "web", "--format", "vhdx", "--verify", "--store", &store, "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(d.path().join("o2")));
    assert!(verified.contains(&format!("sha256 {} (read back and verified)", sha256(&img))), "{verified}");
    let j: serde_json::Value = serde_json::from_str(&ok(tern(&other)
        .args(["migrate", "web", "--format", "azure", "--json", "--store", &store, "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(d.path().join("o3"))))
    .unwrap();
    assert_eq!(
        (j["format"].as_str(), j["disks"][0]["sha256"].as_str()),
        (Some("azure"), Some(&*sha256(&img)))
    );
    assert_eq!(j["disks"][0]["output_virtual_size"], 24u64 << 20);
    // A fixed VHD is its data and a 512-byte footer.
    assert_eq!(j["disks"][0]["file_size"], (24u64 << 20) + 512);
    assert!(std::path::Path::new(j["libvirt_xml"].as_str().unwrap()).exists());
    let xml = std::fs::read_to_string(outdir.join("web.xml")).unwrap();
    assert!(xml.contains("<vcpu>4</vcpu>") && xml.contains("<memory unit='KiB'>8388608</memory>"), "{xml}");
    let test_out = ok(tern(&other)
        .args(["migrate", "web", "--format", "azure", "--test", "--store", &store, "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(&outdir));
    assert!(test_out.contains("web-test-disk0.vhd"), "{test_out}");
    ok(tern(&other)
        .args(["store", "verify", "--read-data", "--threads", "8", "--store", &store, "--key-file"])
        .arg(&key));
    let e = fails(
        tern(&other).args(["store", "verify", "--threads", "33", "--store", &store, "--key-file"]).arg(&key),
    );
    assert!(e.contains("--threads 33 is out of range"), "{e}");
}

#[test]
fn migrate_prints_the_sha256_qemu_reads_from_each_source() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let base = d.path().join("base.raw");
    sample(&base, 20);
    let s = |p: &Path| p.to_string_lossy().into_owned();
    // Source formats QEMU makes, and how QEMU names them.
    let sources = [
        ("zlib.qcow2", "qcow2", vec!["-c", "-O", "qcow2"]),
        ("fixed.vhd", "vpc", vec!["-O", "vpc", "-o", "subformat=fixed"]),
        ("dynamic.vhdx", "vhdx", vec!["-O", "vhdx"]),
    ];
    let mut add = tern(&data);
    add.args(["vm", "add", "multi"]);
    let mut expected = Vec::new();
    for (name, driver, convert) in &sources {
        let p = d.path().join(name);
        let mut args = vec!["convert", "-f", "raw"];
        args.extend(convert.iter().copied());
        let (b, t) = (s(&base), s(&p));
        args.extend([b.as_str(), t.as_str()]);
        qemu("qemu-img", &args);
        // The guest content as QEMU reads it.
        let raw = d.path().join(format!("{name}.raw"));
        qemu("qemu-img", &["convert", "-f", driver, "-O", "raw", &s(&p), &s(&raw)]);
        expected.push((p.clone(), *driver, sha256(&raw)));
        add.arg("--disk").arg(&p);
    }
    ok(&mut add);
    ok(tern(&data).args(["replicate", "multi", "--no-progress"]));
    let outdir = d.path().join("out");
    let text = ok(tern(&data).args(["migrate", "multi", "--format", "vhdx", "--out"]).arg(&outdir));
    for (i, (src, driver, sha)) in expected.iter().enumerate() {
        let out = outdir.join(format!("multi-disk{i}.vhdx"));
        let line = format!("disk {i}: {}  sha256 {sha}", out.display());
        assert!(text.lines().any(|l| l == line), "expected {line:?} in:\n{text}");
        qemu("qemu-img", &["compare", "-f", driver, "-F", "vhdx", &s(src), &s(&out)]);
    }
}
