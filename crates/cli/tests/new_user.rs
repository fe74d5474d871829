//! What a new user hits first, through the `tern` binary: a VM keeps its store, an
//! image belongs to one VM, a closed pipe ends a command quietly, status agrees with
//! the run, migrated definitions name absolute paths, every `--json` is one pretty
//! document, read-only commands create nothing, and help lists only the options a
//! command uses.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{fails, ok, random_image, sha256, tern};

fn json(c: &mut Command) -> serde_json::Value {
    let out = ok(c);
    // One document, pretty-printed like every other `--json`.
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // Pretty-printed, as every `--json` is, and no key twice in an object (a parser
    // would keep only one of them): the key lines printed are the keys parsed.
    assert!(out.starts_with("[\n") || out.starts_with("{\n"), "not pretty JSON: {out}");
    fn keys(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(m) => m.len() + m.values().map(keys).sum::<usize>(),
            serde_json::Value::Array(a) => a.iter().map(keys).sum(),
            _ => 0,
        }
    }
    let key_lines = out.lines().filter(|l| l.trim_start().starts_with('"') && l.contains("\": ")).count();
    assert_eq!(key_lines, keys(&v), "a key printed twice in: {out}");
    v
}

fn file_url(p: &Path) -> String {
    format!("file://{}", p.display())
}

#[test]
fn a_vm_keeps_the_store_it_replicates_to() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("web.raw");
    random_image(&img, 9, 1);
    ok(tern(&data).args(["vm", "add", "web", "--disk"]).arg(&img));
    let elsewhere = d.path().join("elsewhere");
    let rep = json(tern(&data).args(["replicate", "web", "--json", "--store"]).arg(&elsewhere));
    assert_eq!(rep["store_url"], file_url(&elsewhere));
    // No --store from here on: every command about the VM uses its store.
    let pts = json(tern(&data).args(["points", "web", "--json"]));
    assert_eq!(pts.as_array().unwrap().len(), 1);
    let out = d.path().join("out");
    let m = json(tern(&data).args(["migrate", "web", "--format", "raw", "--json", "--out"]).arg(&out));
    assert_eq!(m["store_url"], file_url(&elsewhere));
    assert_eq!(sha256(Path::new(m["disks"][0]["path"].as_str().unwrap())), sha256(&img));
    let v = json(tern(&data).args(["store", "verify", "--json"]));
    assert_eq!(v[0]["store_url"], file_url(&elsewhere));
    assert_eq!(v[0]["points"], 1);
    let st = json(tern(&data).args(["status", "web", "--json"]));
    assert_eq!(st[0]["store"], file_url(&elsewhere));
    assert_eq!(st[0]["point_store"], file_url(&elsewhere));
    json(tern(&data).args(["vm", "list", "--json"]));
    json(tern(&data).args(["throttle", "show", "--json"]));
    assert!(!data.join("store").exists(), "the default store was made though nothing went there");

    // Another store is refused for replication, naming both and the way to move.
    let third = d.path().join("third");
    let e = fails(tern(&data).args(["replicate", "web", "--store"]).arg(&third));
    assert!(e.contains(&file_url(&elsewhere)) && e.contains(&file_url(&third)), "{e}");
    assert!(e.contains("tern vm set-store web"), "{e}");
    assert!(!third.exists());
    // Moving is explicit; the next replication goes to the new store, and the old
    // store's points stay readable with --store.
    ok(tern(&data).args(["vm", "set-store", "web"]).arg(&third));
    let rep = json(tern(&data).args(["replicate", "web", "--json"]));
    assert_eq!(rep["store_url"], file_url(&third));
    let old = json(tern(&data).args(["points", "web", "--json", "--store"]).arg(&elsewhere));
    assert_eq!(old.as_array().unwrap().len(), 1);
    let v = json(tern(&data).args(["store", "verify", "--json"]));
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["store_url"], file_url(&third));
}

#[test]
fn an_image_belongs_to_one_vm_once() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("a.raw");
    random_image(&img, 1, 2);
    let e = fails(tern(&data).args(["vm", "add", "a", "--disk"]).arg(&img).arg("--disk").arg(&img));
    assert!(e.contains("same image as disk 0"), "{e}");
    ok(tern(&data).args(["vm", "add", "a", "--disk"]).arg(&img));
    // Another path to the same file: a hard link, and a relative path.
    let link = d.path().join("link.raw");
    std::fs::hard_link(&img, &link).unwrap();
    let e = fails(tern(&data).args(["vm", "add", "b", "--disk"]).arg(&link));
    assert!(e.contains("already disk 0 of VM a"), "{e}");
    let e = fails(tern(&data).current_dir(d.path()).args(["vm", "add", "c", "--disk", "./a.raw"]));
    assert!(e.contains("already disk 0 of VM a"), "{e}");
    let vms = json(tern(&data).args(["vm", "list", "--json"]));
    assert_eq!(vms.as_array().unwrap().len(), 1);
}

/// Run `c` with standard output a pipe nobody reads (closed before the command starts):
/// its first write fails with EPIPE.
fn run_into_closed_pipe(c: &mut Command) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    c.stdout(writer).stderr(Stdio::piped()).output().unwrap()
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("web.raw");
    random_image(&img, 5, 3);
    ok(tern(&data).args(["vm", "add", "web", "--disk"]).arg(&img));
    ok(tern(&data).args(["replicate", "web"]));
    let cmds: &[&[&str]] = &[
        &["points", "web"],
        &["points", "web", "--json"],
        &["vm", "list"],
        &["status"],
        &["store", "verify"],
        &["throttle", "show"],
        &["key", "export"],
    ];
    let img = img.to_str().unwrap();
    let disk_cmds: &[&[&str]] =
        &[&["disk", "map", img], &["disk", "info", img], &["disk", "map", "--json", img]];
    let cmds = cmds.iter().chain(disk_cmds);
    for args in cmds {
        let o = run_into_closed_pipe(tern(&data).args(*args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "tern {args:?}: {err}");
        assert!(err.is_empty(), "tern {args:?} printed: {err}");
    }
}

#[test]
fn status_agrees_with_the_run_from_its_first_seconds() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("big.raw");
    random_image(&img, 48, 4);
    ok(tern(&data).args(["vm", "add", "big", "--disk"]).arg(&img));
    // 16 Mbps: four workers share 2 MB/s, so no 4 MiB chunk is done in the first
    // seconds while bytes flow from the first moment.
    ok(tern(&data).args(["throttle", "set", "--limit", "16Mbps"]));
    let mut run =
        tern(&data).args(["replicate", "big"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut first_rate, mut partial) = (None, false);
    let total = 48u64 << 20;
    while Instant::now() < deadline && run.try_wait().unwrap().is_none() {
        let st = support::status(&data, "big");
        if st["state"] == "replicating" {
            let done = st["bytes_done"].as_u64().unwrap();
            assert!(done <= total);
            if let (None, Some(rate)) = (first_rate, st["rate_bytes_per_sec"].as_u64()) {
                first_rate = Some((rate, done, st["eta_seconds"].as_u64()));
            }
            // Progress inside chunks in flight, as the progress bar shows it.
            partial |= done > 0 && !done.is_multiple_of(4 << 20);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = support::wait_bounded(&mut run, Duration::from_secs(60)).expect("replicate ended");
    assert!(status.success());
    let (rate, done, eta) = first_rate.expect("status never showed a rate during the run");
    assert!(rate > 0, "the first rate status showed was 0 (bytes done {done})");
    // The ETA is what is left at that rate.
    assert_eq!(eta, Some((total - done).div_ceil(rate)));
    assert!(partial, "bytes done only ever moved by whole chunks");
    let st = support::status(&data, "big");
    assert_eq!((st["state"].as_str(), st["bytes_done"].as_u64()), (Some("protected"), Some(total)));
    assert!(st["rate_bytes_per_sec"].is_null());
}

#[test]
fn migrated_definitions_name_absolute_paths() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("web.raw");
    random_image(&img, 2, 5);
    ok(tern(&data).args(["vm", "add", "web", "--disk"]).arg(&img));
    ok(tern(&data).args(["replicate", "web"]));
    let m = json(
        tern(&data)
            .current_dir(d.path())
            .args(["migrate", "web", "--format", "qcow2", "--json", "--out", "rel"]),
    );
    let disk = d.path().canonicalize().unwrap().join("rel/web-disk0.qcow2");
    assert_eq!(m["disks"][0]["path"], disk.display().to_string());
    let xml = std::fs::read_to_string(d.path().join("rel/web.xml")).unwrap();
    assert!(xml.contains(&format!("<source file='{}'/>", disk.display())), "{xml}");
    // True values: the qcow2 file is not its virtual size.
    let len = std::fs::metadata(&disk).unwrap().len();
    assert_eq!(m["disks"][0]["file_size"], len);
    assert_eq!(m["disks"][0]["output_virtual_size"], 2u64 << 20);
    assert_ne!(len, 2u64 << 20);
}

#[test]
fn read_only_commands_create_nothing() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let missing = d.path().join("missing");
    ok(tern(&empty).args(["status"]));
    ok(tern(&missing).args(["status", "--json"]));
    ok(tern(&empty).args(["vm", "list"]));
    ok(tern(&empty).args(["throttle", "show"]));
    let e = fails(tern(&empty).args(["store", "verify", "--store"]).arg(d.path().join("nonexistent")));
    assert!(e.contains("does not exist"), "{e}");
    let e = fails(tern(&empty).args(["store", "verify"]));
    assert!(e.contains("nothing to verify"), "{e}");
    let e = fails(tern(&empty).args(["points", "web"]));
    assert!(e.contains("does not exist"), "{e}");
    assert!(!d.path().join("nonexistent").exists());
    assert!(!missing.exists(), "a read-only command made the data directory");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "a read-only command wrote into the data directory"
    );
}

fn help(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_tern")).args(args).arg("--help").output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn help_lists_global_options_last_and_only_where_they_apply() {
    for cmd in [&["replicate"][..], &["migrate"], &["points"], &["store", "verify"]] {
        let h = help(cmd);
        let (own, global) = h.split_once("Global options:").unwrap_or_else(|| panic!("{cmd:?}: {h}"));
        let own = own.split_once("Options:").map_or(own, |(_, o)| o);
        for flag in ["--data-dir", "--key-file", "--store"] {
            assert!(
                global.contains(flag) && !own.contains(flag),
                "{cmd:?}: {flag} not under Global options:\n{h}"
            );
        }
    }
    for cmd in
        [&["disk", "info"][..], &["disk", "convert"], &["throttle", "set"], &["status"], &["vm", "list"]]
    {
        let h = help(cmd);
        for flag in ["--key-file", "--store"] {
            assert!(!h.contains(flag), "{cmd:?} lists {flag}, which it does not use:\n{h}");
        }
    }
    // Ranges read the same everywhere; the rate units named are the ones accepted.
    let d = tempfile::tempdir().unwrap();
    let e = fails(tern(d.path()).args(["replicate", "x", "--threads", "33"]));
    assert!(e.contains("1 to 32"), "{e}");
    let img = d.path().join("a.raw");
    random_image(&img, 1, 6);
    let e = fails(tern(d.path()).args(["vm", "add", "a", "--cpus", "2000", "--disk"]).arg(&img));
    assert!(e.contains("1 to 1024"), "{e}");
    let e = fails(tern(d.path()).args(["throttle", "set", "--limit", "5MB"]));
    assert!(e.contains("Gbps"), "{e}");
    ok(tern(d.path()).args(["throttle", "set", "--limit", "1Gbps"]));
}
