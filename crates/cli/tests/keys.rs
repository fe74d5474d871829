//! A missing, wrong or malformed key: every command that reads or writes the store
//! says so in one line naming the key file, before any upload; no key is invented for
//! a store that has one; nothing in the store changes; and once the right key is back
//! an interrupted replication resumes and completes.

mod support;

use std::path::Path;
use std::time::Duration;

use support::{chunk_objects, fails, ok, random_image, sha256, status, tern};

/// Replicate `vm` throttled, and kill it once some progress is recorded.
fn interrupted_replication(data: &Path, vm: &str) {
    ok(tern(data).args(["throttle", "set", "--limit", "40Mbps"]));
    let mut child = tern(data)
        .args(["replicate", vm, "--no-progress"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Bounded: progress is recorded about every second.
    let mut done = 0;
    for _ in 0..600 {
        // Recorded chunks (the VM's bytes_done also counts chunks in flight).
        done = status(data, vm)["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["bytes_done"].as_u64().unwrap_or(0))
            .sum();
        if done > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done > 0, "no progress recorded before the kill");
    ok(tern(data).args(["throttle", "set", "--limit", "unlimited"]));
}

#[test]
fn wrong_or_missing_key_is_refused_before_any_upload_and_the_next_run_resumes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let store = data.join("store");
    let (a, b) = (d.path().join("a.raw"), d.path().join("b.raw"));
    random_image(&a, 8, 5);
    random_image(&b, 24, 6);
    ok(tern(&data).args(["vm", "add", "a", "--disk"]).arg(&a));
    ok(tern(&data).args(["vm", "add", "b", "--disk"]).arg(&b));
    ok(tern(&data).args(["replicate", "a", "--no-progress"]));
    interrupted_replication(&data, "b");
    let point = status(&data, "b")["point"].as_str().unwrap().to_string();
    let chunks = chunk_objects(&store);

    // The store's key, moved away from where tern looks for it.
    let key = data.join("key");
    let saved = d.path().join("saved.key");
    std::fs::rename(&key, &saved).unwrap();
    let wrong = d.path().join("wrong.key");
    tern_chunk::Key::generate().unwrap().save_new(&wrong).unwrap();
    let malformed = d.path().join("malformed.key");
    std::fs::write(&malformed, "not a key\n").unwrap();
    let truncated = d.path().join("truncated.key");
    let text = std::fs::read_to_string(&saved).unwrap();
    std::fs::write(&truncated, &text[..text.len() / 2]).unwrap();
    let missing = d.path().join("missing.key");

    type Case<'a> = (&'a str, Vec<String>, &'a str);
    let arg = |p: &Path| vec!["--key-file".to_string(), p.to_string_lossy().into_owned()];
    let cases: Vec<Case> = vec![
        ("default key file gone", vec![], "no key file at"),
        ("--key-file missing", arg(&missing), "no key file at"),
        ("--key-file of another store", arg(&wrong), "wrong key"),
        ("--key-file malformed", arg(&malformed), "not a tern key file"),
        ("--key-file truncated", arg(&truncated), "key file"),
    ];
    let commands: [&[&str]; 4] = [
        &["replicate", "b", "--no-progress"],
        &["store", "verify"],
        &["points", "a"],
        &["migrate", "a", "--format", "raw", "--out"],
    ];
    for (what, flags, expect) in &cases {
        for cmd in commands {
            let mut c = tern(&data);
            c.args(cmd);
            if cmd[0] == "migrate" {
                c.arg(d.path().join("out-wrong"));
            }
            let line = fails(c.args(flags));
            println!("{what}: {cmd:?}: {line}");
            assert!(line.contains(expect), "{what}: {cmd:?}: {line}");
            let named = flags.get(1).cloned().unwrap_or_else(|| key.to_string_lossy().into_owned());
            assert!(line.contains(&named), "{what}: {cmd:?}: the key file is named: {line}");
        }
        assert!(!key.exists() && !missing.exists(), "{what}: a key was invented for a store that has one");
        assert_eq!(chunk_objects(&store), chunks, "{what}: the store changed");
        let s = status(&data, "b");
        assert_eq!(
            (s["state"].as_str(), s["point"].as_str()),
            (Some("interrupted"), Some(point.as_str())),
            "{what}"
        );
        assert!(!d.path().join("out-wrong").join("a-disk0.raw").exists(), "{what}: migrate wrote an image");
    }
    // TERN_KEY_FILE is read like --key-file.
    let line = fails(tern(&data).args(["replicate", "b", "--no-progress"]).env("TERN_KEY_FILE", &wrong));
    assert!(line.contains("wrong key"), "{line}");

    // The right key back: nothing was damaged, and the replication resumes.
    std::fs::rename(&saved, &key).unwrap();
    let v = ok(tern(&data).args(["store", "verify", "--read-data"]));
    assert!(v.contains("1 point(s)") && v.contains(" 0 problem(s)"), "{v}");
    let o = tern(&data).args(["replicate", "b", "--no-progress"]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains(&format!("resuming point {point}")), "{err}");
    assert!(out.contains("done by an earlier run"), "{out}");
    let v = ok(tern(&data).args(["store", "verify", "--read-data"]));
    assert!(v.contains("2 point(s)") && v.contains(" 0 problem(s)"), "{v}");
    let outdir = d.path().join("out");
    let text = ok(tern(&data).args(["migrate", "b", "--format", "raw", "--out"]).arg(&outdir));
    assert!(text.contains(&sha256(&b)), "{text}");
    assert_eq!(sha256(&outdir.join("b-disk0.raw")), sha256(&b));
}
