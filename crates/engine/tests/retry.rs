//! One retry policy, in one place: the store's. A replication whose chunk uploads keep
//! failing with 503 sends each chunk at most as often as the store's policy says (one
//! attempt and three retries), not that many again for every retry of an engine loop
//! around it, and the error says that running the command again later may succeed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_engine::{Engine, EngineOptions, Firmware, ReplicateOptions, VmDef};

/// An S3 endpoint on loopback that keeps only the store's config.json (served back on
/// reads), lists nothing, finds nothing else (404), and fails every chunk upload with 503. Counts the
/// chunk uploads. Serves for at most a minute.
fn failing_s3() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let puts = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&puts);
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut config: Option<Vec<u8>> = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 && s.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            let text = String::from_utf8_lossy(&head).to_string();
            let line = text.lines().next().unwrap_or("").to_string();
            let length: usize = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; length.min(64 << 20)];
            let _ = s.read_exact(&mut body);
            let (status, reply): (&str, Vec<u8>) = if line.starts_with("PUT") && line.contains("/chunks/") {
                counter.fetch_add(1, Ordering::SeqCst);
                ("503 Service Unavailable", Vec::new())
            } else if line.starts_with("PUT") {
                if line.contains("config.json") {
                    config = Some(body);
                }
                ("200 OK", Vec::new())
            } else if line.starts_with("GET") && line.contains("list-type=2") {
                let empty = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>tern</Name>\
                             <KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>\
                             </ListBucketResult>";
                ("200 OK", empty.as_bytes().to_vec())
            } else if line.contains("config.json") && config.is_some() {
                let c = config.clone().unwrap_or_default();
                ("200 OK", if line.starts_with("HEAD") { Vec::new() } else { c })
            } else {
                ("404 Not Found", Vec::new())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nETag: \"e\"\r\nLast-Modified: Wed, 02 Dec 2026 00:00:00 GMT\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                reply.len()
            );
            let _ = s.write_all(&reply);
        }
    });
    (port, puts)
}

#[test]
fn a_failing_upload_is_retried_by_the_store_policy_only() {
    let dir = tempfile::tempdir().unwrap();
    let (port, puts) = failing_s3();
    // The test runs in its own process (nextest): the store reads credentials from it.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
    ] {
        std::env::set_var(k, v);
    }
    let engine = Engine::open(&EngineOptions {
        data_dir: Some(dir.path().join("data")),
        store_url: Some("s3://tern/x".into()),
        ..Default::default()
    })
    .unwrap();
    let src = dir.path().join("one.raw");
    tern_engine::sample::write_sample_disk(&src, 4 << 20, 9).unwrap();
    engine
        .db()
        .vm_add(&VmDef {
            id: tern_engine::new_vm_id().unwrap(),
            name: "one".into(),
            cpus: 1,
            memory_bytes: 1 << 30,
            firmware: Firmware::Bios,
            disks: vec![src.into()],
            store_url: None,
            qemu: None,
        })
        .unwrap();
    let opts = ReplicateOptions { threads: 1, ..Default::default() };
    let e =
        tern_engine::replicate(&engine, "one", &opts, &tern_engine::throttle::Throttle::unlimited(), &|_| {})
            .unwrap_err();
    let msg = e.to_string();
    println!("{msg}");
    assert_eq!(puts.load(Ordering::SeqCst), 4, "one attempt and three retries of the one chunk: {msg}");
    assert!(msg.contains("may succeed"), "the error says a retry could help: {msg}");
}
