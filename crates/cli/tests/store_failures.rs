//! `tern replicate` against a store that fails: unreachable at the start (S3 and
//! Azure URLs on a closed loopback port), cut off in the middle of a replication (an
//! S3 server behind a proxy that is cut and restored), and full (a small tmpfs). Each
//! time: one clear error line naming the store, no point and no damage, and the next
//! run resumes and completes with a disk equal to the source.

mod support;

use std::path::Path;
use std::time::Duration;

use support::proxy::Proxy;
use support::{
    chunk_objects, fails, free_port, moto, ok, one_error_line, random_image, run_bounded, s3_env, sha256,
    status, tern, Tmpfs,
};

/// No store call may take longer than this: a refused connection fails within about a
/// second (docs/formats/store-layout.md); a hang fails the test instead of blocking it.
const BOUND: Duration = Duration::from_secs(90);

/// Migrate the latest point of `vm` to raw in `out` and check it equals `src`.
fn migrate_equals(
    data: &Path,
    vm: &str,
    extra: &[&str],
    out: &Path,
    src: &Path,
    env: impl Fn(&mut std::process::Command),
) {
    let mut c = tern(data);
    c.args(["migrate", vm, "--format", "raw", "--out"]).arg(out).args(extra);
    env(&mut c);
    let text = ok(&mut c);
    let sha = sha256(src);
    assert!(text.contains(&sha), "migrate printed {text}");
    assert_eq!(sha256(&out.join(format!("{vm}-disk0.raw"))), sha);
}

#[test]
fn unreachable_store_fails_fast_with_no_point_and_the_next_run_completes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("web.raw");
    random_image(&img, 8, 1);
    ok(tern(&data).args(["vm", "add", "web", "--disk"]).arg(&img));
    let port = free_port();
    for url in ["s3://tern/site-a", "az://tern/site-a"] {
        let mut c = tern(&data);
        c.args(["replicate", "web", "--no-progress", "--store", url]);
        if url.starts_with("s3") {
            s3_env(&mut c, port).env("AWS_ACCESS_KEY_ID", "dummy").env("AWS_SECRET_ACCESS_KEY", "dummy");
        } else {
            c.env("AZURE_STORAGE_USE_EMULATOR", "true")
                .env("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{port}"));
        }
        let (st, stderr, took) = run_bounded(&mut c, BOUND);
        println!("{url} (closed port {port}): failed after {took:?}: {stderr}");
        assert_eq!(st.code(), Some(1), "{stderr}");
        let line = one_error_line(&stderr);
        assert!(line.contains(&format!("store {url}: ")), "the error names the store: {line}");
        assert_eq!(line.matches(url).count(), 1, "the store is named once: {line}");
        assert!(line.contains("Connection refused") || line.contains("connect"), "{line}");
        let st = status(&data, "web");
        assert_eq!(st["state"], "not replicated", "{st}");
    }
    assert!(
        !data.join("snapshots").exists() || std::fs::read_dir(data.join("snapshots")).unwrap().count() == 0
    );

    // The same S3 URL once a server answers there: the run completes.
    let Some(moto) = moto("tern") else { return };
    let _proxy = Proxy::start(port, moto.port);
    let url = "s3://tern/site-a";
    let mut c = tern(&data);
    s3_env(c.args(["replicate", "web", "--no-progress", "--store", url]), port);
    let out = ok(&mut c);
    assert!(out.contains("recovery point"), "{out}");
    migrate_equals(&data, "web", &["--store", url], &d.path().join("out"), &img, |c| {
        s3_env(c, port);
    });
}

#[test]
fn store_cut_off_mid_replication_then_restored_resumes() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let img = d.path().join("db.raw");
    random_image(&img, 24, 2);
    ok(tern(&data).args(["vm", "add", "db", "--disk"]).arg(&img));
    let Some(moto) = moto("tern") else { return };
    let proxy = Proxy::start(0, moto.port);
    let port = proxy.port;
    let url = "s3://tern/cut";
    // Slow enough to be cut part-way: 24 MiB at 40 Mbps take about 5 s, and progress
    // is recorded about every second.
    ok(tern(&data).args(["throttle", "set", "--limit", "40Mbps"]));
    let mut c = tern(&data);
    s3_env(c.args(["replicate", "db", "--no-progress", "--threads", "2", "--store", url]), port);
    let mut child =
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Wait until some chunks are recorded, then cut the store off. Bounded: the first
    // chunks are recorded within a few seconds.
    let mut done = 0;
    for _ in 0..600 {
        // Recorded chunks (the VM's bytes_done also counts chunks in flight).
        done = status(&data, "db")["disks"]
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
    assert!(done > 0, "no progress recorded before the cut");
    proxy.cut();
    let st = support::wait_bounded(&mut child, BOUND).expect("replicate ends once the store is cut off");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    println!("cut after {done} bytes recorded: {stderr}");
    assert_eq!(st.code(), Some(1), "{stderr}");
    let line = one_error_line(&stderr);
    assert!(line.contains(&format!("store {url}: ")), "{line}");
    let s = status(&data, "db");
    assert_eq!(s["state"], "interrupted", "no point was committed: {s}");
    let point = s["point"].as_str().unwrap().to_string();

    // Restored on the same address: the run resumes the same point.
    let _proxy = Proxy::start(port, moto.port);
    ok(tern(&data).args(["throttle", "set", "--limit", "unlimited"]));
    let mut c = tern(&data);
    let o = s3_env(c.args(["replicate", "db", "--no-progress", "--store", url]), port).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains(&format!("resuming point {point}")), "{err}");
    assert!(out.contains("done by an earlier run"), "{out}");
    let mut c = tern(&data);
    ok(s3_env(c.args(["store", "verify", "--read-data", "--store", url]), port));
    migrate_equals(&data, "db", &["--store", url], &d.path().join("out"), &img, |c| {
        s3_env(c, port);
    });
}

#[test]
fn full_store_fails_clearly_harms_nothing_and_resumes_after_growing() {
    let fs = match Tmpfs::mount("8m") {
        Ok(t) => t,
        Err(why) => {
            // CI runs as root: there a tmpfs that cannot be mounted is a failure.
            assert!(std::env::var("CI").as_deref() != Ok("true"), "cannot mount an 8 MiB tmpfs in CI: {why}");
            println!("SKIPPED full_store: cannot mount an 8 MiB tmpfs: {why}");
            return;
        }
    };
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let store = fs.path().to_string_lossy().into_owned();
    let (small, big) = (d.path().join("small.raw"), d.path().join("big.raw"));
    random_image(&small, 2, 3);
    random_image(&big, 24, 4);
    ok(tern(&data).args(["vm", "add", "small", "--disk"]).arg(&small));
    ok(tern(&data).args(["vm", "add", "big", "--disk"]).arg(&big));
    ok(tern(&data).args(["replicate", "small", "--no-progress", "--store", &store]));

    let line = fails(tern(&data).args(["replicate", "big", "--no-progress", "--store", &store]));
    println!("{line}");
    assert!(line.contains("no space left"), "{line}");
    assert!(line.contains(&format!("store file://{store}: ")), "{line}");
    assert!(line.contains("disk 0") && line.contains("chunk "), "{line}");
    let s = status(&data, "big");
    assert_eq!(s["state"], "interrupted", "{s}");
    // The point made before the store filled is intact.
    let v = ok(tern(&data).args(["store", "verify", "--read-data", "--store", &store]));
    assert!(v.contains("1 point(s)") && v.contains(" 0 problem(s)"), "{v}");
    let before = chunk_objects(fs.path()).len();

    fs.resize("64m");
    let o = tern(&data).args(["replicate", "big", "--no-progress", "--store", &store]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("resuming point"), "{err}");
    // Every chunk once: the small VM's one and the big VM's six.
    assert_eq!(chunk_objects(fs.path()).len(), 7, "{before} chunks before the rerun; {out}");
    let v = ok(tern(&data).args(["store", "verify", "--read-data", "--store", &store]));
    assert!(v.contains("2 point(s)") && v.contains(" 0 problem(s)"), "{v}");
    migrate_equals(&data, "big", &["--store", &store], &d.path().join("out"), &big, |_| {});
}
