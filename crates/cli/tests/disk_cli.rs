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

#[test]
fn files_that_are_not_disks_are_refused_unless_said_raw() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"this is not a disk :-)\n").unwrap();
    let o = tern(&["disk", "info", text.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("23 bytes"), "{}", stderr(&o));
    // A fixed VHD that lost its footer: refused by its name, read with -f raw.
    let vhd = dir.path().join("cut.vhd");
    qemu(&["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", vhd.to_str().unwrap(), "4M"]);
    let len = std::fs::metadata(&vhd).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&vhd).unwrap().set_len(len - 512).unwrap();
    let o = tern(&["disk", "info", vhd.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("the name says vhd"), "{}", stderr(&o));
    let dst = dir.path().join("out.qcow2");
    let o = tern(&["disk", "convert", vhd.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!dst.exists());
    let o = tern(&["disk", "info", "-f", "raw", "--json", vhd.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Through `vm add` too, with the flag to give.
    let data = dir.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--data-dir")
        .arg(&data)
        .args(["vm", "add", "web", "--disk", vhd.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("(--format raw)"), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("--data-dir")
        .arg(&data)
        .args(["vm", "add", "web", "--format", "raw", "--disk", vhd.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn map_says_when_a_backing_file_was_not_opened() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"]);
    qemu(&["qemu-io", "-c", "write -P 0x22 0 1M", base.to_str().unwrap()]);
    qemu(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    for json in [false, true] {
        let mut args = vec!["disk", "map", top.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let o = tern(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("base.qcow2") && err.contains("not opened") && err.contains("--allow-backing"),
            "{err}"
        );
        args.push("--allow-backing");
        let o = tern(&args);
        assert!(o.status.success() && stderr(&o).is_empty(), "{}", stderr(&o));
    }
}

#[test]
fn convert_takes_the_output_format_from_azure_or_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    raw_with_data(&src, "3M", &["write -P 0x33 1M 64K"]);
    let info = |p: &Path| -> serde_json::Value {
        let o = tern(&["disk", "info", "--json", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap()
    };
    let az = dir.path().join("azure.vhd");
    let o = tern(&["disk", "convert", src.to_str().unwrap(), az.to_str().unwrap(), "--azure"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(info(&az)["subformat"], "fixed");
    for (name, format, sub) in [
        ("a.qcow2", "qcow2", None),
        ("a.vhd", "vhd", Some("dynamic")),
        ("a.vhdx", "vhdx", None),
        ("a.img", "raw", None),
    ] {
        let dst = dir.path().join(name);
        let o = tern(&["disk", "convert", src.to_str().unwrap(), dst.to_str().unwrap()]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let i = info(&dst);
        assert_eq!(i["format"], format, "{name}");
        if let Some(sub) = sub {
            assert_eq!(i["subformat"], sub, "{name}");
        }
    }
    let o = tern(&["disk", "convert", src.to_str().unwrap(), dir.path().join("noext").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("give -O"), "{}", stderr(&o));
}
