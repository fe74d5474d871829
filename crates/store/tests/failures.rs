//! Failures a store must report with the right kind and a message naming the store and
//! the object: unreachable endpoints, server errors, stalled servers, refused
//! credentials, a full local folder. Bounded: no test waits longer than the store's own
//! retry and timeout limits.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_store::{ErrorKind, Store};

use support::emulator::{self, free_port};
use support::{address, azurite_env, payload, runtime, s3_env, skipped};

async fn expect_transient(store: &Store) {
    let start = Instant::now();
    let e = store.chunk_exists(&address(1)).await.unwrap_err();
    println!("{}: failed after {:?}: {e}", store.url(), start.elapsed());
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(e.to_string().starts_with(&format!("store {}: chunk ", store.url())), "{e}");
    let e = store.put_chunk(&address(1), payload(1, 10)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
}

#[test]
fn unreachable_s3_endpoint_is_transient() {
    let store = Store::open_with_env("s3://tern/x", s3_env(free_port())).unwrap();
    runtime().block_on(expect_transient(&store));
}

#[test]
fn unreachable_azure_endpoint_is_transient() {
    let store = Store::open_with_env("az://tern/x", azurite_env(free_port())).unwrap();
    runtime().block_on(expect_transient(&store));
}

/// A loopback HTTP server that answers every request with `response`, or holds the
/// connection open without answering when `response` is `None`; it counts requests.
/// Bounded: it serves at most 64 connections and stops after 60 s.
struct FakeServer {
    port: u16,
    requests: Arc<AtomicUsize>,
}

fn fake_server(response: Option<&'static str>) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let port = listener.local_addr().expect("local address").port();
    listener.set_nonblocking(true).expect("non-blocking listener");
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut held: Vec<TcpStream> = Vec::new();
        let mut served = 0;
        while served < 64 && Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            };
            served += 1;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            if read_head(&mut stream) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            match response {
                Some(text) => {
                    let _ = stream.write_all(text.as_bytes());
                }
                None => held.push(stream),
            }
        }
    });
    FakeServer { port, requests }
}

/// Reads a request's head (up to the blank line), at most 64 KiB.
fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while head.len() < 64 << 10 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
        if head.ends_with(b"\r\n\r\n") {
            return true;
        }
    }
    false
}

const UNAVAILABLE: &str =
    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const INSUFFICIENT: &str =
    "HTTP/1.1 507 Insufficient Storage\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

#[test]
fn server_errors_are_transient_after_bounded_retries() {
    for (name, url, env) in [
        ("s3", "s3://tern/x", s3_env as fn(u16) -> Vec<(String, String)>),
        ("azure", "az://tern/x", azurite_env),
    ] {
        let server = fake_server(Some(UNAVAILABLE));
        let store = Store::open_with_env(url, env(server.port)).unwrap();
        let e = runtime().block_on(store.get_chunk(&address(1))).unwrap_err();
        println!("{name}: {e}");
        assert_eq!(e.kind(), ErrorKind::Transient, "{name}: {e}");
        // One attempt and three retries, then the error: bounded, never a hang.
        assert_eq!(server.requests.load(Ordering::SeqCst), 4, "{name}");
    }
}

#[test]
fn insufficient_storage_is_full() {
    let server = fake_server(Some(INSUFFICIENT));
    let store = Store::open_with_env("s3://tern/x", s3_env(server.port)).unwrap();
    let e = runtime().block_on(store.put_chunk(&address(1), payload(1, 100))).unwrap_err();
    println!("{e}");
    assert_eq!(e.kind(), ErrorKind::Full, "{e}");
    assert!(e.to_string().contains("no space"), "{e}");
}

#[test]
fn stalled_server_times_out_as_transient() {
    let server = fake_server(None);
    let mut env = s3_env(server.port);
    env.push(("AWS_TIMEOUT".into(), "300ms".into()));
    let store = Store::open_with_env("s3://tern/x", env).unwrap();
    let start = Instant::now();
    let e = runtime().block_on(store.chunk_exists(&address(1))).unwrap_err();
    println!("failed after {:?}: {e}", start.elapsed());
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    // A read is idempotent: retried after each timeout.
    assert_eq!(server.requests.load(Ordering::SeqCst), 4);
}

/// A paced put to a server that takes the request and never answers still times out:
/// only the time spent waiting for the pacer is left out of the timeout. Not retried:
/// a create-only put is not idempotent.
#[test]
fn stalled_server_times_out_a_paced_put() {
    let server = fake_server(None);
    let mut env = s3_env(server.port);
    env.push(("AWS_TIMEOUT".into(), "300ms".into()));
    let store = Store::open_with_env("s3://tern/x", env).unwrap();
    let start = Instant::now();
    let e = runtime()
        .block_on(store.put_chunk_paced(&address(1), payload(1, 64 << 10), &|_| 16 << 10))
        .unwrap_err();
    println!("failed after {:?}: {e}", start.elapsed());
    assert_eq!(e.kind(), ErrorKind::Transient, "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn wrong_credentials_are_auth() {
    let azurite = match emulator::azurite() {
        Ok(azurite) => azurite,
        Err(skip) => return skipped("wrong_credentials_are_auth", skip),
    };
    support::azure::create_container(azurite.port, "auth");
    let mut env = azurite_env(azurite.port);
    env[1].1 =
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==".into();
    let store = Store::open_with_env("az://auth/p", env).unwrap();
    runtime().block_on(async {
        let e = store.get_chunk(&address(1)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Auth, "{e}");
    });
}

/// Unmounts the tmpfs when the test ends, also on panic.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_local_store_is_full() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tern-store-test"])
        .arg(dir.path())
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr);
            println!("SKIPPED full_local_store_is_full: cannot mount a 2 MiB tmpfs: {}", why.trim());
            return;
        }
        Err(e) => {
            println!("SKIPPED full_local_store_is_full: cannot run mount: {e}");
            return;
        }
    }
    let _mount = Mount(dir.path().to_path_buf());
    let url = format!("file://{}", dir.path().join("store").display());
    let store = Store::open(&url).unwrap();
    runtime().block_on(async {
        // 2 MiB hold at most four 512 KiB objects; sixteen cannot fit.
        for n in 0..16u8 {
            match store.put_chunk(&address(n), payload(n, 512 << 10)).await {
                Ok(()) => continue,
                Err(e) => {
                    println!("store full after {n} chunks: {e}");
                    assert_eq!(e.kind(), ErrorKind::Full, "{e}");
                    assert!(e.to_string().contains("no space"), "{e}");
                    assert!(e.to_string().starts_with(&format!("store {url}: chunk ")), "{e}");
                    return;
                }
            }
        }
        panic!("a 2 MiB tmpfs took 8 MiB of chunks");
    });
}

#[test]
fn local_store_that_cannot_be_created_names_the_folder() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let url = format!("file://{}/store", file.display());
    let e = Store::open(&url).unwrap_err();
    println!("{e}");
    let expected = format!("store {url}: creating {}/store: ", file.display());
    assert!(e.to_string().starts_with(&expected), "{e}");
}
