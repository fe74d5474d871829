//! `tern points serve`: a recovery point served over NBD straight from the store reads
//! byte for byte as the image `tern migrate` makes of it (an older point and the
//! newest, a full and a delta point); with --writable the client's writes land in a
//! temporary overlay and the store is untouched (served again, the point still equals
//! its migrated image, and `store verify --read-data` finds nothing).

mod support;

use std::path::Path;

use support::serve::{Serve, SIGTERM};
use support::{ok, qemu, tern};

fn serve(data: &Path, args: &[&str]) -> Serve {
    Serve::start(data, &["points", "serve"], args)
}

fn stop(s: &mut Serve) {
    let status = s.signal(SIGTERM);
    assert!(status.success(), "{status}");
}

/// `qemu-img compare` of an NBD export with a raw image.
fn same(uri: &str, image: &Path) {
    qemu("qemu-img", &["compare", "-f", "raw", "-F", "raw", uri, &image.to_string_lossy()]);
}

#[test]
fn a_point_served_from_the_store_reads_as_its_migrated_image_and_an_overlay_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let (a, b) = (d.join("a.qcow2"), d.join("b.raw"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &s(&a), "24M"]);
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 0 5M", "-c", "write -P 0x12 17M 1M", &s(&a)]);
    std::fs::write(&b, vec![0x21u8; 3 << 20]).unwrap();
    ok(tern(&data).args(["vm", "add", "web", "--disk"]).arg(&a).arg("--disk").arg(&b));
    ok(tern(&data).args(["replicate", "web", "--no-progress"]));
    qemu("qemu-io", &["-f", "qcow2", "-c", "write -P 0x13 2M 64k", "-c", "write -z 17M 4k", &s(&a)]);
    ok(tern(&data).args(["replicate", "web", "--no-progress"]));
    let points: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["points", "web", "--json"]))).unwrap();
    let ids: Vec<String> =
        points.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(points[1]["kind"], "delta");

    for (n, id) in ids.iter().enumerate() {
        let out = d.join(format!("out-{n}"));
        ok(tern(&data).args(["migrate", "web", "--format", "raw", "--point", id, "--out"]).arg(&out));
        // The newest point is the default.
        let mut srv = if n == 1 { serve(&data, &["web"]) } else { serve(&data, &["web", "--point", id]) };
        assert_eq!(srv.report["exports"][0]["name"], "web-disk0");
        assert_eq!(srv.report["exports"][0]["read_only"], true);
        same(&srv.uri(0), &out.join("web-disk0.raw"));
        same(&srv.uri(1), &out.join("web-disk1.raw"));
        // Read-only means read-only.
        let w = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x99 0 4k", &srv.uri(0)])
            .output()
            .unwrap();
        assert!(!w.status.success() || !String::from_utf8_lossy(&w.stdout).contains("wrote"), "{w:?}");
        stop(&mut srv);
    }

    // Writable: the client's writes read back, and vanish with the server.
    let newest = d.join("out-1").join("web-disk0.raw");
    let mut writable = serve(&data, &["web", "--writable"]);
    assert_eq!(writable.report["exports"][0]["read_only"], false);
    let uri = writable.uri(0);
    qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x77 1000 70000", "-c", "write -z 4M 64k", &uri]);
    let r = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x77 1000 70000",
            "-c",
            "read -P 0 4M 64k",
            "-c",
            "read -P 0x11 71000 4096",
            &uri,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success() && !text.contains("Pattern verification failed"), "{text}");
    stop(&mut writable);
    let mut again = serve(&data, &["web"]);
    same(&again.uri(0), &newest);
    stop(&mut again);
    let v = ok(tern(&data).args(["store", "verify", "--read-data"]));
    assert!(v.contains(": 0 problem(s)"), "{v}");
}
