//! An operator replicating a VM that runs in QEMU, through the `tern` binary, typing
//! the commands in the order a person types them: `vm add --qmp` (in pull mode told
//! what is missing when QEMU already runs an NBD server), `replicate` (the initial pass),
//! guest writes, `replicate` again (a delta cycle), `points`, `status`, `migrate`;
//! then QEMU is killed and restarted, and `replicate` resyncs and says so. A real
//! qemu-storage-daemon is the running VM; its NBD exports are the guest's write path.

mod support;

use support::qsd::Qsd;
use support::{fails, ok, tern};

#[test]
fn an_operator_replicates_a_running_qemu_vm_in_cycles() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let mut vm = Qsd::start(d.path());
    vm.write("disk0", "write -P 0x5a 0 6M");
    vm.write("disk1", "write -P 0x5b 1M 2M");

    // QEMU already serves the guest over NBD: in pull mode tern says what to add.
    let err = fails(tern(&data).args(["vm", "add", "web", "--mode", "pull", "--qmp"]).arg(&vm.qmp));
    assert!(err.contains("--nbd") && err.contains("push"), "{err}");
    let out = ok(tern(&data).args(["vm", "add", "web", "--qmp"]).arg(&vm.qmp).arg("--nbd").arg(&vm.nbd));
    assert!(out.contains("running in QEMU, 2 disk(s)"), "{out}");
    assert!(out.contains("node disk0 (qcow2)") && out.contains("node disk1 (raw)"), "{out}");
    // --disk and --qmp are two ways to say what a VM is, not both.
    let both =
        tern(&data).args(["vm", "add", "x", "--disk", "/dev/null", "--qmp"]).arg(&vm.qmp).output().unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));

    let first = ok(tern(&data).args(["replicate", "web", "--no-progress"]));
    assert!(first.contains("recovery point"), "{first}");
    vm.write("disk0", "write -P 0x61 3M 64k");
    vm.write("disk1", "write -z 1M 64k");
    let delta = ok(tern(&data).args(["replicate", "web"]));
    assert!(delta.contains("delta point"), "{delta}");

    let points = ok(tern(&data).args(["points", "web"]));
    let kinds: Vec<&str> = points
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(kinds, ["full", "delta,"], "{points}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["points", "web", "--json"]))).unwrap();
    let last = &json.as_array().unwrap()[1];
    assert_eq!(last["kind"], "delta");
    assert_eq!(last["delta_bytes"], 2 * 65536);
    let instant = last["instant"].as_str().unwrap();
    assert!(instant.len() == 24 && instant.ends_with('Z'), "RFC 3339 with milliseconds: {instant}");
    let st: serde_json::Value = serde_json::from_str(&ok(tern(&data).args(["status", "--json"]))).unwrap();
    assert_eq!(st[0]["tracking"]["state"], "delta");
    assert_eq!(st[0]["tracking"]["last_point"], last["id"]);

    let out = d.path().join("out");
    ok(tern(&data).args(["migrate", "web", "--format", "qcow2", "--verify", "--out"]).arg(&out));
    vm.same_as_guest(&out.join("web-disk0.qcow2"), "qcow2", "disk0");
    vm.same_as_guest(&out.join("web-disk1.qcow2"), "qcow2", "disk1");

    // QEMU killed and started again: the bitmaps are gone; tern notices, says so,
    // resyncs by comparison and the point is exact.
    vm.kill_and_restart();
    vm.write("disk1", "write -P 0x62 5M 64k");
    let c = tern(&data).args(["replicate", "web"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&c.stderr));
    assert!(c.status.success(), "{stderr}");
    assert!(stderr.contains("resyncing"), "{stderr}");
    assert!(stdout.contains("resync point") && stdout.contains("disk 1: 64.0 KiB changed"), "{stdout}");
    // Status keeps saying that a resync happened, and why, after it is done.
    let st: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["status", "web", "--json"]))).unwrap();
    let t = &st[0]["tracking"];
    assert_eq!(t["state"], "delta", "{st}");
    assert!(t["last_resync"]["message"].as_str().is_some_and(|m| m.contains("bitmap")), "{st}");
    let text = ok(tern(&data).args(["status", "web"]));
    assert!(text.contains("last resync:") && text.contains("(qemu, pull)"), "{text}");
    assert_eq!(t["mode"], "pull", "{st}");
    let out = d.path().join("out2");
    ok(tern(&data).args(["migrate", "web", "--format", "raw", "--out"]).arg(&out));
    vm.same_as_guest(&out.join("web-disk0.raw"), "raw", "disk0");
    vm.same_as_guest(&out.join("web-disk1.raw"), "raw", "disk1");
    let v = ok(tern(&data).args(["store", "verify", "--read-data"]));
    assert!(v.contains(": 0 problem(s)"), "{v}");
    // Every object is referenced by a point (no retention is set): nothing to collect.
    let gc = ok(tern(&data).args(["store", "gc", "--dry-run"]));
    assert!(gc.contains("3 point(s) kept") && gc.contains("would delete 0 object(s)"), "{gc}");
    // With a retention of 2 points, the two oldest go, and every kept point still reads.
    ok(tern(&data).args(["replicate", "web", "--retention-count", "2"]));
    let gc = ok(tern(&data).args(["store", "gc"]));
    assert!(gc.contains("expired point") && gc.contains("2 point(s) kept"), "{gc}");
    let v = ok(tern(&data).args(["store", "verify", "--read-data"]));
    assert!(v.contains("2 point(s)") && v.contains(": 0 problem(s)"), "{v}");
}

/// `tern replicate` killed in the middle of a QEMU VM's initial replication (upload
/// throttled, so it is mid-way): the next run resumes from the same frozen view, which
/// QEMU still holds, reads only the chunks not recorded, and its point is the guest
/// at the first run's cut (writes made in between go to the next cycle).
#[test]
fn a_killed_initial_replication_resumes_from_the_same_view() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let vm = Qsd::start(d.path());
    vm.write_random("disk0", 0, 16 << 20, 9);
    ok(tern(&data).args(["vm", "add", "web", "--qmp"]).arg(&vm.qmp).arg("--nbd").arg(&vm.nbd));
    ok(tern(&data).args(["throttle", "set", "--work-limit", "8Mbps", "--off-limit", "8Mbps"]));
    let mut child = tern(&data)
        .args(["replicate", "web", "--no-progress", "--threads", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Until a chunk is recorded (about 4 s per 4 MiB chunk at 1 MB/s), then kill -9.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&ok(tern(&data).args(["status", "--json"]))).unwrap();
        if st[0]["bytes_done"].as_u64().unwrap_or(0) >= 4 << 20 {
            break;
        }
        assert!(std::time::Instant::now() < until, "no chunk recorded in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = vm.tern_objects();
    assert!(before.iter().any(|o| o.starts_with("export")), "the view stays in QEMU: {before:?}");
    // The guest writes after the cut; they belong to the next point.
    vm.write("disk0", "write -P 0x77 20M 64k");
    ok(tern(&data).args(["throttle", "set", "--work-limit", "unlimited", "--off-limit", "unlimited"]));
    let r: serde_json::Value =
        serde_json::from_str(&ok(tern(&data).args(["replicate", "web", "--json"]))).unwrap();
    assert_eq!(r["resumed"], true, "{r}");
    assert!(r["disks"][0]["resumed_chunks"].as_u64().unwrap() >= 1, "{r}");
    // Only the tracking bitmaps are left in QEMU.
    assert!(vm.tern_objects().iter().all(|o| o.starts_with("bitmap")), "{:?}", vm.tern_objects());
    // The next cycle brings the write made in between.
    let out = ok(tern(&data).args(["replicate", "web"]));
    assert!(out.contains("delta point"), "{out}");
    let out_dir = d.path().join("out");
    ok(tern(&data).args(["migrate", "web", "--format", "raw", "--out"]).arg(&out_dir));
    vm.same_as_guest(&out_dir.join("web-disk0.raw"), "raw", "disk0");
    vm.same_as_guest(&out_dir.join("web-disk1.raw"), "raw", "disk1");
}
