//! The QMP client against a real qemu-storage-daemon (the stand-in for a running VM:
//! a QEMU block layer with QMP and an NBD export that is the guest's write path), and
//! against peers that are not QMP.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tern_engine::qemu::{Qmp, QmpError};

use support::Qsd as Daemon;

fn start() -> Daemon {
    Daemon::start(&[("qcow2", "16M")])
}

fn guest_write(d: &Daemon, pattern: u8, offset: u64, len: u64) {
    d.guest("disk0", &[format!("write -P {pattern} {offset} {len}")]);
}

fn connect(p: &Path) -> Qmp {
    Qmp::connect(p, Duration::from_secs(10)).expect("connect to qemu-storage-daemon's QMP")
}

fn bitmap(qmp: &mut Qmp, node: &str, name: &str) -> Option<Value> {
    let nodes = qmp.execute("query-named-block-nodes", None).unwrap();
    let node = nodes.as_array().unwrap().iter().find(|n| n["node-name"] == node)?.clone();
    node["dirty-bitmaps"].as_array()?.iter().find(|b| b["name"] == name).cloned()
}

#[test]
fn connects_negotiates_and_reports_the_version() {
    let d = start();
    let mut qmp = connect(&d.qmp);
    assert!(qmp.version().major >= 7, "version {}", qmp.version());
    let nodes = qmp.execute("query-named-block-nodes", None).unwrap();
    let names: Vec<&str> = nodes.as_array().unwrap().iter().filter_map(|n| n["node-name"].as_str()).collect();
    assert!(names.contains(&"disk0") && names.contains(&"f0"), "{names:?}");
    // A QMP socket serves one client at a time: a second one is told so, clearly.
    let err = Qmp::connect(&d.qmp, Duration::from_millis(500)).unwrap_err();
    assert!(err.to_string().contains("another client probably holds this socket"), "{err}");
    qmp.execute("query-block-exports", None).unwrap();
    drop(qmp);
    let mut next = connect(&d.qmp);
    next.execute("query-block-exports", None).unwrap();
}

#[test]
fn a_bitmap_added_in_a_transaction_counts_the_guests_writes() {
    let d = start();
    let mut qmp = connect(&d.qmp);
    qmp.transaction(vec![json!({
        "type": "block-dirty-bitmap-add",
        "data": { "node": "disk0", "name": "tern-test-1", "granularity": 65536, "persistent": true }
    })])
    .unwrap();
    assert_eq!(bitmap(&mut qmp, "disk0", "tern-test-1").unwrap()["count"], 0);
    guest_write(&d, 0x5a, 1 << 20, 65536);
    guest_write(&d, 0x5b, (3 << 20) + 4096, 4096); // unaligned: dirties one whole granule
    let b = bitmap(&mut qmp, "disk0", "tern-test-1").unwrap();
    assert_eq!(b["count"], 2 * 65536, "{b}");
    assert_eq!(b["granularity"], 65536);
    // A transaction is all or nothing: the second action fails, the first is undone.
    let err = qmp
        .transaction(vec![
            json!({ "type": "block-dirty-bitmap-add", "data": { "node": "disk0", "name": "tern-test-2" } }),
            json!({ "type": "block-dirty-bitmap-add", "data": { "node": "no-such-node", "name": "tern-test-3" } }),
        ])
        .unwrap_err();
    assert!(matches!(err, QmpError::Command { .. }), "{err}");
    assert!(err.to_string().contains("transaction failed"), "{err}");
    assert!(bitmap(&mut qmp, "disk0", "tern-test-2").is_none());
    qmp.execute("block-dirty-bitmap-remove", Some(json!({ "node": "disk0", "name": "tern-test-1" })))
        .unwrap();
    assert!(bitmap(&mut qmp, "disk0", "tern-test-1").is_none());
}

#[test]
fn refusals_name_the_command_and_the_class() {
    let d = start();
    let mut qmp = connect(&d.qmp);
    let err = qmp.execute("tern-no-such-command", None).unwrap_err();
    assert_eq!(err.class(), Some("CommandNotFound"), "{err}");
    assert!(err.to_string().contains("tern-no-such-command failed"), "{err}");
    // The connection stays usable after a refusal.
    qmp.execute("query-block-exports", None).unwrap();
}

#[test]
fn qemu_exiting_is_a_closed_connection_not_a_hang() {
    let mut d = start();
    let mut qmp = connect(&d.qmp);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let err = qmp.execute("query-block-exports", None).unwrap_err();
    assert!(matches!(err, QmpError::Closed { .. } | QmpError::Io { .. }), "after QEMU was killed: {err}");
}

/// A peer on a UNIX socket that sends `greeting` then, for each message it receives,
/// `reply` (or nothing when `None`).
fn fake_peer(greeting: &'static [u8], reply: Option<&'static [u8]>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(greeting);
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(r) = reply {
                let _ = s.write_all(r);
            }
        }
    });
    (dir, path)
}

#[test]
fn peers_that_are_not_qmp_get_clear_errors() {
    let (_d, p) = fake_peer(b"220 smtp.example ESMTP\r\n", None);
    let err = Qmp::connect(&p, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, QmpError::Protocol { .. }) && err.to_string().contains("not QMP"), "{err}");

    let (_d, p) = fake_peer(b"{\"hello\": 1}\n", None);
    let err = Qmp::connect(&p, Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("not a QMP greeting"), "{err}");

    let greeting = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\n";
    let (_d, p) = fake_peer(greeting, None);
    let err = Qmp::connect(&p, Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout { command, .. } if command == "qmp_capabilities"),
        "a peer that never answers: {err}"
    );

    let (_d, p) = fake_peer(greeting, Some(b"[1, 2, 3]\n"));
    let err = Qmp::connect(&p, Duration::from_secs(5)).unwrap_err();
    assert!(err.to_string().contains("not QMP"), "{err}");

    let (_d, p) = fake_peer(greeting, Some(b"{\"return\": {}, \"id\": 1} {\"broken\": \n"));
    let mut qmp = Qmp::connect(&p, Duration::from_secs(5)).unwrap();
    let err = qmp.execute("query-version", None).unwrap_err();
    assert!(err.to_string().contains("malformed JSON"), "{err}");

    let err = Qmp::connect(Path::new("/nonexistent/tern-qmp.sock"), Duration::from_secs(1)).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tern-qmp.sock") && err.to_string().contains("connect"),
        "{err}"
    );
}

#[test]
fn the_schema_says_this_qemu_has_what_both_modes_need() {
    use tern_engine::qemu::caps::{missing, Schema};
    let d = start();
    let mut q = connect(&d.qmp);
    let schema = Schema::query(&mut q).unwrap();
    assert!(schema.has_command("blockdev-backup"));
    assert!(!schema.has_command("tern-no-such-command"));
    assert!(schema.has_argument("block-export-add", "bitmaps"), "the NBD export's bitmaps member");
    assert!(schema.has_argument("block-dirty-bitmap-merge", "node"));
    assert!(!schema.has_argument("block-export-add", "tern-no-such-member"));
    assert_eq!(missing(&schema, false), Vec::<String>::new(), "pull mode on {}", q.version());
    assert_eq!(missing(&schema, true), Vec::<String>::new(), "push mode on {}", q.version());
}
