//! Paced uploads to Azure Blob (Azurite) and S3 (moto), seen on the wire: a paced
//! chunk is one create-only request whose body goes in parts, an unpaced put is one
//! ordinary request, the commit is conditional, and time spent waiting for the pacer
//! does not count against the request timeout. (The rate on the wire is measured in
//! the engine's tests/throttle_wire.rs.)

mod support;

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_chunk::ChunkAddress;
use tern_store::ErrorKind;

use support::Remote;
use support::{address, payload, runtime};

/// What one client connection has sent so far.
type Sent = Arc<Mutex<Vec<u8>>>;

/// A loopback TCP proxy to 127.0.0.1:`upstream` that keeps a copy of everything each
/// client connection sends. Stops accepting when dropped.
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn recorder(upstream: u16) -> Recorder {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let port = listener.local_addr().expect("local address").port();
    listener.set_nonblocking(true).expect("non-blocking listener");
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Vec::new())));
    let (stopped, connections) = (stop.clone(), sent.clone());
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        // Bounded by the stop flag and the deadline.
        while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
            let Ok((client, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            let _ = client.set_nonblocking(false);
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let copy = Arc::new(Mutex::new(Vec::new()));
            connections.lock().unwrap().push(copy.clone());
            let (mut from_client, mut to_client) = (client.try_clone().unwrap(), client);
            let (mut to_server, mut from_server) = (server.try_clone().unwrap(), server);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                // Bounded: ends when the client closes or the server fails.
                while let Ok(n @ 1..) = from_client.read(&mut buf) {
                    copy.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to_server.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
        }
    });
    Recorder { port, sent, stop, acceptor: Some(acceptor) }
}

/// One request as it went over the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    method: String,
    target: String,
    content_length: usize,
    headers: String,
}

impl Recorder {
    /// Every request sent so far, parsed (HTTP/1.1 with Content-Length framing; a
    /// chunked request fails the test, since tern always knows the length). Connections
    /// are parsed only as far as they are complete.
    fn requests(&self) -> Vec<Request> {
        let mut out = Vec::new();
        for connection in self.sent.lock().unwrap().iter() {
            let bytes = connection.lock().unwrap().clone();
            let mut at = 0;
            // Bounded: each pass consumes a head and its body.
            while let Some(end) = find(&bytes[at..], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&bytes[at..at + end]).into_owned();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or("").split(' ');
                let (method, target) =
                    (first.next().unwrap_or("").to_string(), first.next().unwrap_or("").to_string());
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                };
                assert!(header("transfer-encoding").is_none(), "a chunked request: {head}");
                let content_length = header("content-length").map_or(0, |v| v.parse().unwrap());
                at += end + 4 + content_length;
                if at > bytes.len() {
                    break;
                }
                out.push(Request { method, target, content_length, headers: head });
            }
        }
        out
    }

    fn puts(&self) -> Vec<Request> {
        self.requests().into_iter().filter(|r| r.method == "PUT").collect()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The hex of a chunk address as it appears in its object name.
fn hex(a: &ChunkAddress) -> String {
    a.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// A paced chunk is one PUT of the whole chunk (Content-Length as the chunk, no
/// chunked encoding, no blocks), conditional; an unpaced put is one PUT too.
fn one_request_per_chunk(backend: Remote) {
    let Some(emulator) = backend.start() else { return };
    let wire = recorder(emulator.port);
    let store = backend.open(wire.port, "p", &[]);
    const LEN: usize = 1 << 20;
    runtime().block_on(async {
        let plain = address(1);
        store.put_chunk(&plain, payload(1, LEN)).await.unwrap();
        let puts = wire.puts();
        assert_eq!(puts.len(), 1, "{}: {puts:#?}", backend.name());
        assert!(puts[0].target.contains(&hex(&plain)), "{puts:#?}");
        assert_eq!(puts[0].content_length, LEN);

        let paced = address(2);
        let grants = AtomicU32::new(0);
        let pacer = |_| {
            grants.fetch_add(1, Ordering::Relaxed);
            64 << 10
        };
        store.put_chunk_paced(&paced, payload(2, LEN), &pacer).await.unwrap();
        assert_eq!(grants.load(Ordering::Relaxed), 16);
        let puts = wire.puts();
        assert_eq!(puts.len(), 2, "{}: one more put: {puts:#?}", backend.name());
        let put = &puts[1];
        assert!(put.target.contains(&hex(&paced)) && !put.target.contains("comp=block"), "{put:#?}");
        assert_eq!(put.content_length, LEN);
        assert!(put.headers.to_ascii_lowercase().contains("if-none-match: *"), "create-only: {put:#?}");
        assert_eq!(store.get_chunk(&paced).await.unwrap(), payload(2, LEN));
        let stats = store.stats();
        assert_eq!((stats.objects_put, stats.bytes_put), (2, 2 * LEN as u64));
    });
    drop(wire);
    drop(emulator);
}

#[test]
fn azure_paced_chunk_is_one_conditional_request() {
    one_request_per_chunk(Remote::Azurite);
}

#[test]
fn s3_paced_chunk_is_one_conditional_request() {
    one_request_per_chunk(Remote::Moto);
}

/// Another client stores the chunk while a paced upload of it is midway: the paced
/// upload succeeds (the chunk is there) and does not replace the other copy.
fn chunk_stored_meanwhile_is_kept(backend: Remote) {
    let Some(emulator) = backend.start() else { return };
    let store = backend.open(emulator.port, "p", &[]);
    let a = address(3);
    let grants = AtomicU32::new(0);
    let pacer = |_| {
        if grants.fetch_add(1, Ordering::Relaxed) == 2 {
            // On its own thread and runtime: the pacer blocks this one.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let other = backend.open(emulator.port, "p", &[]);
                    runtime().block_on(other.put_chunk(&a, payload(30, 300 << 10))).unwrap();
                });
            });
        }
        64 << 10
    };
    runtime().block_on(async {
        store.put_chunk_paced(&a, payload(3, 512 << 10), &pacer).await.unwrap();
        assert_eq!(grants.load(Ordering::Relaxed), 8);
        assert_eq!(store.get_chunk(&a).await.unwrap(), payload(30, 300 << 10), "{}: kept", backend.name());
    });
}

#[test]
fn azure_commit_is_conditional() {
    chunk_stored_meanwhile_is_kept(Remote::Azurite);
}

#[test]
fn s3_commit_is_conditional() {
    chunk_stored_meanwhile_is_kept(Remote::Moto);
}

/// A paced request that waits for its grants far longer than the request timeout
/// (8 waits of 150 ms against a 400 ms timeout) still completes: the timeout counts only
/// the time the request is not waiting for the pacer.
fn waiting_for_the_pacer_is_not_a_timeout(backend: Remote) {
    let Some(emulator) = backend.start() else { return };
    let timeout = match backend {
        Remote::Azurite => "AZURE_TIMEOUT",
        Remote::Moto => "AWS_TIMEOUT",
    };
    let store = backend.open(emulator.port, "p", &[(timeout, "400ms")]);
    let pacer = |_| {
        std::thread::sleep(Duration::from_millis(150));
        64 << 10
    };
    runtime().block_on(async {
        let a = address(4);
        store.put_chunk_paced(&a, payload(4, 512 << 10), &pacer).await.unwrap();
        assert_eq!(store.get_chunk(&a).await.unwrap(), payload(4, 512 << 10));
    });
}

#[test]
fn azure_paced_put_waits_are_not_timeouts() {
    waiting_for_the_pacer_is_not_a_timeout(Remote::Azurite);
}

#[test]
fn s3_paced_put_waits_are_not_timeouts() {
    waiting_for_the_pacer_is_not_a_timeout(Remote::Moto);
}

/// Cancelling a paced put (dropping it midway) ends its request: nothing is stored,
/// and the next paced put of the chunk goes through.
#[test]
fn cancelled_paced_put_stores_nothing() {
    let Some(emulator) = Remote::Azurite.start() else { return };
    let store = Remote::Azurite.open(emulator.port, "p", &[]);
    let a = address(5);
    runtime().block_on(async {
        let grants = AtomicU32::new(0);
        let pacer = |_| {
            grants.fetch_add(1, Ordering::Relaxed);
            64 << 10
        };
        let mut put = Box::pin(store.put_chunk_paced(&a, payload(5, 512 << 10), &pacer));
        let stopped = || grants.load(Ordering::Relaxed) >= 3;
        // Bounded: the upload needs eight parts, and is stopped at the third.
        let finished = std::future::poll_fn(|cx| match put.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| true).unwrap()),
            Poll::Pending if stopped() => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        })
        .await;
        assert!(!finished, "stopped midway");
        drop(put);
        let e = store.get_chunk(&a).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        store.put_chunk_paced(&a, payload(6, 512 << 10), &|_| 64 << 10).await.unwrap();
        assert_eq!(store.get_chunk(&a).await.unwrap(), payload(6, 512 << 10));
    });
}
