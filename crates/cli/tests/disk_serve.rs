//! `tern disk serve`: images of every format served over NBD and read back by qemu's
//! and libnbd's tools; raw images written through it; clean stop on SIGTERM/SIGINT.

mod support;

use std::path::Path;
use std::process::Command;

use support::serve::{Serve, SIGINT, SIGTERM};
use support::{fails, qemu, tern};

fn serve(data: &Path, args: &[&str]) -> Serve {
    Serve::start(data, &["disk", "serve"], args)
}

fn run(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is needed (scripts/deps installs it): {e}"))
}

#[test]
fn every_format_is_served_and_reads_back_as_qemu_reads_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &p("a.qcow2"), "32M"]);
    qemu(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 64k",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 7 20M 3M",
            &p("a.qcow2"),
        ],
    );
    qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "vpc", &p("a.qcow2"), &p("b.vhd")]);
    qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "vhdx", &p("a.qcow2"), &p("c.vhdx")]);
    qemu("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &p("a.qcow2"), &p("d.raw")]);
    let mut s = serve(d, &[&p("a.qcow2"), &p("b.vhd"), &p("c.vhdx"), &p("d.raw")]);
    let names: Vec<&str> =
        s.report["exports"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a.qcow2", "b.vhd", "c.vhdx", "d.raw"]);
    let ro: Vec<bool> =
        s.report["exports"].as_array().unwrap().iter().map(|e| e["read_only"].as_bool().unwrap()).collect();
    assert_eq!(ro, [true, true, true, false]);
    let socket = s.report["socket"].as_str().unwrap().to_string();
    let list = run("nbdinfo", &["--list", "--json", &format!("nbd+unix:///?socket={socket}")]);
    assert!(list.status.success());
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["exports"].as_array().unwrap().len(), 4);

    for i in 0..4 {
        let out = p(&format!("out{i}.raw"));
        qemu("qemu-img", &["convert", "-f", "raw", "-O", "raw", &s.uri(i), &out]);
        qemu("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", &out, &p("a.qcow2")]);
    }
    // The qcow2 export's allocation, as nbdinfo sees it, is qemu-img map's of the file.
    let map = run("nbdinfo", &["--map", "--json", &s.uri(0)]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    let ours: Vec<(u64, u64, bool, bool)> = merge(map.as_array().unwrap().iter().map(|e| {
        let t = e["type"].as_u64().unwrap();
        (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), t & 1 == 0, t & 2 != 0)
    }));
    let qmap: serde_json::Value =
        serde_json::from_str(&qemu("qemu-img", &["map", "--output=json", &p("a.qcow2")])).unwrap();
    let theirs = merge(qmap.as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        )
    }));
    assert_eq!(ours, theirs);

    // Raw is writable; the others refuse writes.
    qemu("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 4M 128k", &s.uri(3)]);
    let bytes = std::fs::read(p("d.raw")).unwrap();
    assert!(bytes[4 << 20..(4 << 20) + (128 << 10)].iter().all(|&b| b == 0x5c));
    let w = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri(0)]);
    let msg = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(!w.status.success() || !msg.contains("wrote"), "a qcow2 export took a write: {msg}");
    assert!(
        msg.contains("Permission denied") || msg.contains("not permitted") || msg.contains("read-only"),
        "{msg}"
    );

    let status = s.signal(SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(!Path::new(&socket).exists(), "the socket is removed");
    assert!(!Path::new(&socket).parent().unwrap().exists(), "and its private folder");
}

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
fn a_chosen_socket_read_only_raw_and_sigint_with_a_client_connected() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.img");
    std::fs::write(&raw, vec![0x11u8; 1 << 20]).unwrap();
    let sock = dir.path().join("run").join("s.sock");
    let mut s =
        serve(dir.path(), &["--read-only", "--socket", sock.to_str().unwrap(), raw.to_str().unwrap()]);
    assert_eq!(s.report["socket"].as_str().unwrap(), sock.to_str().unwrap());
    assert_eq!(s.uri(0), format!("nbd+unix:///disk.img?socket={}", sock.display()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let w = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri(0)]);
    assert!(!String::from_utf8_lossy(&w.stdout).contains("wrote"), "a read-only raw export took a write");
    // A client that stays connected does not hold the server up.
    let mut idle = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut idle, &mut greeting).unwrap();
    let status = s.signal(SIGINT);
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists());
    assert!(std::fs::read(&raw).unwrap().iter().all(|&b| b == 0x11));
}

#[test]
fn bad_invocations_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("x").join("same.raw");
    let b = dir.path().join("y").join("same.raw");
    for f in [&a, &b] {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, vec![0u8; 65536]).unwrap();
    }
    let e = fails(tern(dir.path()).args(["disk", "serve"]).arg(&a).arg(&b));
    assert!(e.contains("two images are named \"same.raw\""), "{e}");
    let e = fails(tern(dir.path()).args(["disk", "serve", "--bind", "192.0.2.1:10809"]).arg(&a));
    assert!(e.contains("without TLS") && e.contains("loopback"), "{e}");
    let e = fails(tern(dir.path()).args(["disk", "serve", "--threads", "0"]).arg(&a));
    assert!(e.contains("--threads 0"), "{e}");
    let e = fails(tern(dir.path()).args(["disk", "serve"]).arg(dir.path().join("missing.qcow2")));
    assert!(e.contains("missing.qcow2"), "{e}");
}
