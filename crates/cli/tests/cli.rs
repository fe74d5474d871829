//! The `tern` binary end to end: flags, errors, replicate -> migrate on another
//! "machine" (another data directory with only the store URL and the key), and
//! kill -9 during replication followed by a resume.

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn tern(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.arg("--data-dir").arg(data);
    c.env_remove("TERN_DATA_DIR").env_remove("TERN_KEY_FILE");
    c
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(c: &mut Command) -> String {
    let o: Output = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{c:?} should fail: {}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.starts_with("tern: error: "), "{err}");
    err
}

fn sample(path: &Path, mib: u64) {
    tern_engine_sample(path, mib);
}

/// The sample disk through the binary's own demo code is not exposed; write a simple
/// one here: scattered random and text MiBs with holes.
fn tern_engine_sample(path: &Path, mib: u64) {
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

fn sha256(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn flags_are_validated_with_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    for t in ["0", "33"] {
        let e = fails(tern(&data).args(["replicate", "x", "--threads", t]));
        assert!(e.contains("1 to 32"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
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
    let out = ok(tern(&data).args(["replicate", "web", "--threads", "3"]));
    assert!(out.contains("recovery point"), "{out}");
    let st: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["status", "web", "--json"]))).unwrap();
    assert_eq!(st[0]["state"], "protected");
    assert_eq!(st[0]["bytes_done"], 24u64 << 20);
    let pts: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["points", "web", "--json"]))).unwrap();
    assert_eq!(pts.as_array().unwrap().len(), 1);
    let point = pts[0]["point_id"].as_str().unwrap().to_string();

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
    let xml = std::fs::read_to_string(outdir.join("web.xml")).unwrap();
    assert!(xml.contains("<vcpu>4</vcpu>") && xml.contains("<memory unit='KiB'>8388608</memory>"), "{xml}");
    let test_out = ok(tern(&other)
        .args(["migrate", "web", "--format", "azure", "--test", "--store", &store, "--key-file"])
        .arg(&key)
        .arg("--out")
        .arg(&outdir));
    assert!(test_out.contains("web-test-disk0.vhd"), "{test_out}");
    ok(tern(&other).args(["store", "verify", "--read-data", "--store", &store, "--key-file"]).arg(&key));
}

#[test]
fn kill_9_during_replication_then_resume_gives_the_same_disk() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("big.raw");
    sample(&img, 96);
    ok(tern(&data).args(["vm", "add", "big", "--disk"]).arg(&img));
    // Slow enough that kills land mid-copy; the limit is re-read while running.
    ok(tern(&data).args(["throttle", "set", "--limit", "160Mbps"]));
    let mut seed = 12345u64;
    let mut finished_early = false;
    for _trial in 0..6 {
        let mut child = tern(&data)
            .args(["replicate", "big", "--no-progress"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(std::time::Duration::from_millis(150 + (seed >> 33) % 900));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.success() {
            finished_early = true;
            break;
        }
    }
    ok(tern(&data).args(["throttle", "set", "--limit", "unlimited"]));
    if !finished_early {
        let st: serde_json::Value =
            serde_json::from_str(&ok(tern(&data).args(["status", "big", "--json"]))).unwrap();
        assert_eq!(st[0]["state"], "replicating", "the kills left an unfinished replication to resume");
        ok(tern(&data).args(["replicate", "big"]));
    }
    ok(tern(&data).args(["store", "verify", "--read-data"]));
    let outdir = d.path().join("out");
    ok(tern(&data).args(["migrate", "big", "--format", "raw", "--out"]).arg(&outdir));
    assert_eq!(sha256(&outdir.join("big-disk0.raw")), sha256(&img));
}
