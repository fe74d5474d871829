//! `tern agent` with a VM in a real qemu-storage-daemon: `tern replicate --frequency`
//! hands the VM to the running agent and returns once its first point is committed;
//! the agent cycles on its own; pause and resume; 20 kill -9 of the agent at random
//! moments of its cycles (with the upload throttled, so kills land while it reads,
//! logs, uploads and commits), and one kill at each of those phases, lose no change
//! and never make it resync; SIGTERM stops
//! it cleanly; `complete` while it runs leaves nothing of tern's in QEMU.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::qsd::Qsd;
use support::{ok, tern, wait_bounded, Rng};

/// An agent cycling every second, its output appended to `log`, with `env` set.
fn spawn_agent(data: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    tern(data)
        .args(["agent", "--frequency", "1s", "--threads", "2"])
        .envs(env.iter().copied())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// Start an agent and wait (bounded) until it says it runs (it holds its lock then).
fn start_agent(data: &Path, log: &Path) -> Child {
    let starts = |t: &str| t.matches("tern agent: replicating").count();
    let before = std::fs::read_to_string(log).map(|t| starts(&t)).unwrap_or(0);
    let child = spawn_agent(data, log, &[]);
    let until = Instant::now() + Duration::from_secs(30);
    while starts(&std::fs::read_to_string(log).unwrap_or_default()) == before {
        assert!(Instant::now() < until, "the agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn points(data: &Path) -> Vec<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(tern(data).args(["points", "web", "--json"]))).unwrap();
    v.as_array().unwrap().clone()
}

/// Wait (bounded) for a point whose instant is after `after` (RFC 3339 ms, UTC).
fn point_after(data: &Path, after: &str) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = points(data).into_iter().rev().find(|p| p["instant"].as_str().unwrap() > after) {
            return p;
        }
        assert!(Instant::now() < until, "no point after {after} within 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn now_rfc3339_ms() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn migrate_and_compare(data: &Path, vm: &Qsd, point: &str, out: &Path) {
    ok(tern(data).args(["migrate", "web", "--format", "raw", "--point", point, "--out"]).arg(out));
    vm.same_as_guest(&out.join("web-disk0.raw"), "raw", "disk0");
    vm.same_as_guest(&out.join("web-disk1.raw"), "raw", "disk1");
}

#[test]
fn the_agent_cycles_rides_out_kill_9_and_completes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let log = d.path().join("agent.log");
    let vm = Qsd::start(d.path());
    vm.write_random("disk0", 0, 3 << 20, 1);
    ok(tern(&data).args(["vm", "add", "web", "--qmp"]).arg(&vm.qmp).arg("--nbd").arg(&vm.nbd));

    let mut agent = start_agent(&data, &log);
    // Handed to the agent: returns once the agent committed the first point.
    let out = ok(tern(&data).args(["replicate", "web", "--frequency", "1s"]));
    assert!(out.contains("committed by the agent"), "{out}");
    assert_eq!(points(&data).len(), 1);

    // The agent cycles on its own: a write shows up in a later point.
    vm.write("disk1", "write -P 0x33 1M 64k");
    let t = now_rfc3339_ms();
    let p = point_after(&data, &t);
    assert_eq!(p["kind"], "delta");
    migrate_and_compare(&data, &vm, p["id"].as_str().unwrap(), &d.path().join("out-a"));

    // Paused: no new points; resumed: cycles again.
    ok(tern(&data).args(["pause", "web"]));
    let st: serde_json::Value = serde_json::from_str(&ok(tern(&data).args(["status", "--json"]))).unwrap();
    assert_eq!(st[0]["state"], "paused");
    std::thread::sleep(Duration::from_millis(1500));
    let n = points(&data).len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(points(&data).len(), n, "the agent made a point of a paused VM");
    ok(tern(&data).args(["resume", "web"]));
    point_after(&data, &now_rfc3339_ms());

    // 20 kill -9 at random moments; uploads throttled so that a cycle takes a while.
    ok(tern(&data).args(["throttle", "set", "--work-limit", "16Mbps", "--off-limit", "16Mbps"]));
    let mut rng = Rng(0x7e57);
    for trial in 0..20u64 {
        vm.write_random("disk0", rng.range(0, 20) << 20, 1 << 20, 100 + trial);
        vm.write_random("disk1", rng.range(0, 20) << 20 | 4096, 300 << 10, 200 + trial);
        std::thread::sleep(Duration::from_millis(rng.range(0, 1500)));
        agent.kill().unwrap();
        agent.wait().unwrap();
        agent = start_agent(&data, &log);
    }
    ok(tern(&data).args(["throttle", "set", "--work-limit", "unlimited", "--off-limit", "unlimited"]));
    let t = now_rfc3339_ms();
    let last = point_after(&data, &t);
    // Every change made it: the point after the last write is the guest.
    migrate_and_compare(&data, &vm, last["id"].as_str().unwrap(), &d.path().join("out-b"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("resync"), "a kill of the agent made it resync:\n{text}");
    // Every point is full (the first) or delta.
    let kinds: Vec<String> = points(&data).iter().map(|p| p["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "full").count(), 1, "{kinds:?}");

    // complete while the agent runs: nothing of tern's stays in QEMU.
    let out = ok(tern(&data).args(["complete", "web"]));
    assert!(out.contains("removed dirty bitmap"), "{out}");
    assert_eq!(vm.tern_objects(), Vec::<String>::new());
    let n = points(&data).len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(points(&data).len(), n, "the agent went on after complete");

    // SIGTERM: a clean stop.
    let rc = unsafe { libc_kill(agent.id() as i32, 15) };
    assert_eq!(rc, 0);
    let status =
        wait_bounded(&mut agent, Duration::from_secs(30)).expect("the agent did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("tern agent: stopped"));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// kill -9 of the agent at each moment of a cycle, not at random: after the cut,
/// with a disk's changes staged (the view still held), after a segment piece is
/// stored, and after the manifest is stored but before the state database says so.
/// Each time the restarted agent cleans up, loses no change and does not resync: its
/// next point is exactly the guest, and every point is full (the first) or delta.
#[test]
fn a_kill_9_at_each_phase_of_a_cycle_loses_nothing_and_costs_no_resync() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let log = d.path().join("agent.log");
    let vm = Qsd::start(d.path());
    vm.write_random("disk0", 0, 3 << 20, 1);
    ok(tern(&data).args(["vm", "add", "web", "--qmp"]).arg(&vm.qmp).arg("--nbd").arg(&vm.nbd));
    ok(tern(&data).args(["replicate", "web", "--frequency", "1s"]));
    for (n, phase) in ["cut", "stage", "upload", "commit"].into_iter().enumerate() {
        let n = n as u64;
        vm.write_random("disk0", (n + 4) << 20, 256 << 10, 10 + n);
        vm.write_random("disk1", (n + 1) << 20 | 4096, 100 << 10, 20 + n);
        let mut agent = spawn_agent(&data, &log, &[("TERN_TEST_STALL_AT", phase)]);
        let marker = format!("tern-test: at {phase}");
        let until = Instant::now() + Duration::from_secs(60);
        while std::fs::read_to_string(&log).unwrap_or_default().matches(&marker).count() == 0 {
            assert!(Instant::now() < until, "the agent did not reach {phase} within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.kill().unwrap();
        agent.wait().unwrap();
        // The guest goes on writing; a new agent picks up.
        vm.write_random("disk1", 12 << 20, 64 << 10, 30 + n);
        let mut agent = start_agent(&data, &log);
        let p = point_after(&data, &now_rfc3339_ms());
        agent.kill().unwrap();
        agent.wait().unwrap();
        assert_eq!(p["kind"], "delta", "after a kill at {phase}");
        migrate_and_compare(&data, &vm, p["id"].as_str().unwrap(), &d.path().join(format!("out-{phase}")));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("resync"), "a kill of the agent made it resync:\n{text}");
    let kinds: Vec<String> = points(&data).iter().map(|p| p["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "full").count(), 1, "{kinds:?}");
    // Nothing of the killed cycles is left in QEMU but the next cycle's bitmaps.
    let left = vm.tern_objects();
    assert!(left.iter().all(|o| o.starts_with("bitmap ")), "{left:?}");
}

/// `--tracking journal` as an operator runs it: `vm add --tracking journal`, an
/// agent, `replicate --frequency`; fio (random 4 KiB writes) and qemu-io write both
/// disks while the agent makes a point every second from the journal; kill -9 of the
/// agent in the middle of the writes: no guest write fails (the daemon stays up, its
/// exports keep serving), the restarted agent falls back to the bitmap, and the
/// point after the writes is exactly the guest. `complete` takes the mirrors down.
#[test]
fn the_journal_rides_out_kill_9_of_the_agent_during_writes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let log = d.path().join("agent.log");
    let vm = Qsd::start(d.path());
    vm.write_random("disk0", 0, 2 << 20, 1);
    ok(tern(&data)
        .args(["vm", "add", "web", "--qmp"])
        .arg(&vm.qmp)
        .arg("--nbd")
        .arg(&vm.nbd)
        .args(["--tracking", "journal"]));
    let mut agent = start_agent(&data, &log);
    let out = ok(tern(&data).args(["replicate", "web", "--frequency", "1s"]));
    assert!(out.contains("committed by the agent"), "{out}");
    let st = support::status(&data, "web");
    assert_eq!(st["tracking"]["source"], "journal", "{st}");
    let started = now_rfc3339_ms();
    std::thread::scope(|s| {
        let fio = s.spawn(|| {
            let out = Command::new("fio")
                .args([
                    "--name=guest",
                    "--ioengine=nbd",
                    &format!("--uri={}", vm.uri("disk0")),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=4",
                    "--size=24M",
                    "--time_based",
                    "--runtime=8",
                    "--randrepeat=0",
                ])
                .output()
                .expect("fio is needed (Debian package fio; scripts/deps installs it)");
            assert!(out.status.success(), "a guest write failed: {}", String::from_utf8_lossy(&out.stderr));
        });
        let io = s.spawn(|| {
            let mut rng = Rng(0x10a);
            for k in 0..120u64 {
                vm.write("disk1", &format!("write -P {} {} 8k", k % 251 + 1, rng.range(0, 2900) * 8192));
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        // Points from the journal while the writes run, then kill -9 of the agent.
        point_after(&data, &now_rfc3339_ms());
        agent.kill().unwrap();
        agent.wait().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        agent = start_agent(&data, &log);
        fio.join().unwrap();
        io.join().unwrap();
    });
    let p = point_after(&data, &now_rfc3339_ms());
    migrate_and_compare(&data, &vm, p["id"].as_str().unwrap(), &d.path().join("out"));
    let during = points(&data).iter().filter(|p| p["instant"].as_str().unwrap() > started.as_str()).count();
    assert!(during >= 3, "only {during} points during and after the writes");
    let kinds: Vec<String> = points(&data).iter().map(|p| p["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "full").count(), 1, "{kinds:?}");
    // The mirrors run (the restarted agent's), and `complete` takes them down.
    assert!(vm.tern_objects().iter().any(|o| o.contains("tern-jnl-")), "{:?}", vm.tern_objects());
    let out = ok(tern(&data).args(["complete", "web"]));
    assert!(out.contains("journal"), "{out}");
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert_eq!(vm.tern_objects(), Vec::<String>::new());
}
