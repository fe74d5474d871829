//! When a cycle's changes do not fit on the host (over the change-log budget, or the
//! log file system full), the guest never notices: its writes go on, the cycle ships
//! nothing, `tern status` says `backlog`, and QEMU keeps tracking the changes; once
//! they fit (the budget raised, space freed) the next cycle ships all of them and its
//! point is exactly the guest's disks. No resync happens.

mod support;

use std::path::Path;

use support::qsd::Qsd;
use support::{ok, tern, Tmpfs};

fn status(data: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok(tern(data).args(["status", "web", "--json"]))).unwrap();
    v[0].clone()
}

fn replicate_fails(data: &Path) -> String {
    let out = tern(data).args(["replicate", "web"]).output().unwrap();
    assert!(!out.status.success(), "the cycle should not have fitted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn migrated_is_guest(data: &Path, vm: &Qsd, out: &Path) {
    ok(tern(data).args(["migrate", "web", "--format", "raw", "--out"]).arg(out));
    vm.same_as_guest(&out.join("web-disk0.raw"), "raw", "disk0");
    vm.same_as_guest(&out.join("web-disk1.raw"), "raw", "disk1");
}

#[test]
fn over_budget_or_a_full_log_file_system_is_a_backlog_that_drains() {
    let fs = match Tmpfs::mount("6m") {
        Ok(t) => t,
        Err(why) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "cannot mount a tmpfs in CI: {why}");
            println!("SKIPPED: cannot mount a tmpfs: {why}");
            return;
        }
    };
    let d = tempfile::tempdir().unwrap();
    // The data directory (state database, change logs) on the small tmpfs; the store
    // and the VM's images elsewhere.
    let data = fs.path().join("data");
    let store = d.path().join("store");
    let vm = Qsd::start(d.path());
    vm.write_random("disk0", 0, 1 << 20, 1);
    ok(tern(&data)
        .args(["vm", "add", "web", "--qmp"])
        .arg(&vm.qmp)
        .arg("--nbd")
        .arg(&vm.nbd)
        .arg("--store")
        .arg(&store));
    ok(tern(&data).args(["replicate", "web", "--log-budget", "1M"]));

    // 3 MiB of changes over a 1 MiB budget.
    vm.write_random("disk0", 4 << 20, 3 << 20, 2);
    let err = replicate_fails(&data);
    assert!(err.contains("backlog") && err.contains("budget"), "{err}");
    let st = status(&data);
    assert_eq!(st["tracking"]["state"], "backlog", "{st}");
    assert_eq!(st["tracking"]["log_budget"], 1 << 20, "{st}");
    assert!(st["tracking"]["last_backlog"]["message"].as_str().is_some_and(|m| m.contains("budget")), "{st}");
    // The guest goes on writing; tern keeps tracking.
    vm.write_random("disk1", 2 << 20, 256 << 10, 3);
    let out = ok(tern(&data).args(["replicate", "web", "--log-budget", "64M"]));
    assert!(out.contains("delta point"), "drained by a delta, not a resync: {out}");
    assert_eq!(status(&data)["tracking"]["state"], "delta");
    migrated_is_guest(&data, &vm, &d.path().join("out-a"));

    // Changes larger than the log file system's free space: same.
    vm.write_random("disk0", 9 << 20, 10 << 20, 4);
    let err = replicate_fails(&data);
    assert!(err.contains("backlog") && err.contains("full"), "{err}");
    assert_eq!(status(&data)["tracking"]["state"], "backlog");
    vm.write_random("disk1", 8 << 20, 64 << 10, 5);
    fs.resize("64m");
    let out = ok(tern(&data).args(["replicate", "web"]));
    assert!(out.contains("delta point"), "{out}");
    migrated_is_guest(&data, &vm, &d.path().join("out-b"));
    // No change log is left behind.
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut files = Vec::new();
    walk(&data, &mut files);
    let logs: Vec<_> = files.into_iter().filter(|p| p.to_string_lossy().contains(".tlog")).collect();
    assert!(logs.is_empty(), "{logs:?}");
}
