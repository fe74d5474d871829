//! `tern disk ...` through the binary: exit statuses, JSON output, refusals.

use std::path::Path;
use std::process::{Command, Output};

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern")).args(args).output().expect("tern runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qemu(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().expect("qemu tool runs");
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn raw_with_data(path: &Path, size: &str, writes: &[&str]) {
    qemu(&["qemu-img", "create", "-q", "-f", "raw", path.to_str().unwrap(), size]);
    let mut args = vec!["qemu-io", "-f", "raw"];
    for w in writes {
        args.push("-c");
        args.push(w);
    }
    args.push(path.to_str().unwrap());
    qemu(&args);
}

#[test]
fn compare_exit_status_follows_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    raw_with_data(&a, "8M", &["write -P 0x11 1M 64K"]);
    raw_with_data(&b, "8M", &["write -P 0x11 1M 64K"]);
    let same = tern(&["disk", "compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(same.status.code(), Some(0), "{}", stderr(&same));
    assert!(stdout(&same).contains("identical"));

    qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x22 3000000 1", b.to_str().unwrap()]);
    let diff = tern(&["disk", "compare", "--json", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(diff.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&diff)).unwrap();
    assert_eq!(v["identical"], false);
    assert_eq!(v["first_difference"], 3000000);

    let missing = tern(&["disk", "compare", a.to_str().unwrap(), "/nonexistent/x.raw"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("/nonexistent/x.raw"), "{}", stderr(&missing));
}

#[test]
fn compare_treats_a_zero_tail_as_equal_and_a_data_tail_as_different() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    raw_with_data(&a, "4M", &["write -P 0x33 0 4K"]);
    raw_with_data(&b, "6M", &["write -P 0x33 0 4K"]);
    assert_eq!(tern(&["disk", "compare", a.to_str().unwrap(), b.to_str().unwrap()]).status.code(), Some(0));
    qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x01 5M 1", b.to_str().unwrap()]);
    let o = tern(&["disk", "compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(&format!("offset {}", 5 << 20)), "{}", stdout(&o));
}

#[test]
fn info_json_reports_format_and_size() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_with_data(&a, "3M", &["write -P 0x11 0 4K"]);
    let o = tern(&["disk", "info", "--json", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 3 << 20);
}

#[test]
fn map_json_lists_data_and_zero_runs_covering_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_with_data(&a, "16M", &["write -P 0x11 4M 1M"]);
    let o = tern(&["disk", "map", "--json", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let runs = v.as_array().unwrap();
    let mut off = 0;
    for r in runs {
        assert_eq!(r["start"], off);
        off += r["length"].as_u64().unwrap();
    }
    assert_eq!(off, 16 << 20);
    assert!(runs.iter().any(|r| r["data"] == true
        && r["start"].as_u64().unwrap() <= 4 << 20
        && r["start"].as_u64().unwrap() + r["length"].as_u64().unwrap() >= 5 << 20));
}

#[test]
fn convert_refuses_to_overwrite_and_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_with_data(&a, "1M", &["write -P 0x11 0 4K"]);
    let b = dir.path().join("b.raw");
    std::fs::write(&b, b"precious").unwrap();
    let o = tern(&["disk", "convert", a.to_str().unwrap(), b.to_str().unwrap(), "-O", "raw"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&b).unwrap(), b"precious", "existing file untouched");

    let c = dir.path().join("c.qcow2");
    let o = tern(&[
        "disk",
        "convert",
        a.to_str().unwrap(),
        c.to_str().unwrap(),
        "-O",
        "qcow2",
        "--cluster-size",
        "3K",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--cluster-size"), "{}", stderr(&o));
    assert!(!c.exists());

    let o = tern(&["disk", "convert", a.to_str().unwrap(), c.to_str().unwrap(), "-O", "nonsense"]);
    assert_eq!(o.status.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn convert_raw_to_raw_is_sparse_and_equal() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_with_data(&a, "64M", &["write -P 0x11 0 1M", "write -P 0x22 40M 2M"]);
    let b = dir.path().join("b.raw");
    let o = tern(&["disk", "convert", a.to_str().unwrap(), b.to_str().unwrap(), "-O", "raw"]);
    assert!(o.status.success(), "{}", stderr(&o));
    qemu(&["qemu-img", "compare", "-q", a.to_str().unwrap(), b.to_str().unwrap()]);
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&b).unwrap().blocks() * 512;
    assert!(blocks <= 4 << 20, "output allocates {blocks} bytes for 3 MiB of data");
}

#[test]
fn convert_no_sync_writes_the_same_image_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    raw_with_data(&a, "24M", &["write -P 0x11 0 1M", "write -P 0x22 17M 3M"]);
    for (fmt, qemu_fmt) in
        [("raw", "raw"), ("qcow2", "qcow2"), ("vhd", "vpc"), ("vhd-fixed", "vpc"), ("vhdx", "vhdx")]
    {
        let b = dir.path().join(format!("b.{fmt}"));
        let o = tern(&["disk", "convert", "--no-sync", a.to_str().unwrap(), b.to_str().unwrap(), "-O", fmt]);
        assert!(o.status.success(), "{fmt}: {}", stderr(&o));
        qemu(&[
            "qemu-img",
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            qemu_fmt,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ]);
    }
}
