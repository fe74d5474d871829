//! The bandwidth limit measured on the wire to Azure Blob (Azurite) and S3 (moto's
//! server) (DESIGN.md, "Parallelism, bandwidth": "the measured rate over any 10 s
//! window stays within 5% of the limit").
//!
//! The real [`Throttle`] paces real paced chunk puts ([`Store::put_chunk_paced`]: one
//! create-only request each, its body sent as the throttle admits it) of default-size
//! incompressible chunks, on a [`VirtualClock`] as in `throttle_pacing.rs`. The store
//! talks to the emulator through a loopback TCP proxy in this test, which reads what
//! the client sends as soon as it arrives and stamps each read with the virtual time
//! and the bytes received so far (HTTP headers included, a few hundred bytes per
//! request): those are the bytes as they reach the server. Before each grant the test
//! waits (in real time, bounded) until the proxy has received every byte the store has
//! handed to its connections: see [`catch_up`]. Every 10 s window, sliding in 0.25 s
//! steps, is compared with the limit. Run with `--no-capture` to see the worst windows.
//!
//! Sending each chunk whole after paying for it (what S3 did before its request bodies
//! were paced) fails here: about -6.0% with one worker, +7.4% with four.
//!
//! The emulators start themselves (see the store's tests/support); without them the
//! tests fail and say to run scripts/deps, or print SKIPPED with TERN_SKIP_EMULATORS=1.

#[path = "../../store/tests/support/mod.rs"]
mod store_support;
mod windows;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_chunk::ChunkAddress;
use tern_engine::throttle::{Clock, Limit, Schedule, Throttle, VirtualClock};
use tern_store::Store;
use time::macros::datetime;
use time::UtcOffset;

use store_support::Remote;
use windows::{incompressible_envelope, worst_window, Samples, WINDOW};

/// Virtual seconds uploaded per run: 17 windows, some 45 chunks at 50 Mbps.
const RUN: f64 = 30.0;
/// The proxy stops accepting after this long, whatever happens.
const PROXY_LIFETIME: Duration = Duration::from_secs(600);

/// A loopback TCP proxy to 127.0.0.1:`upstream` that stamps the client's bytes as it
/// reads them. Stops accepting when dropped; its connections end when either side
/// closes.
struct Proxy {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// `stamp(n)` is called with every read's byte count, before the bytes go on.
fn proxy(upstream: u16, stamp: Arc<dyn Fn(usize) + Send + Sync>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let port = listener.local_addr().expect("local address").port();
    listener.set_nonblocking(true).expect("non-blocking listener");
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let acceptor = std::thread::spawn(move || {
        let deadline = Instant::now() + PROXY_LIFETIME;
        // Bounded by the stop flag and the deadline.
        while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
            match listener.accept() {
                Ok((client, _)) => relay(client, upstream, stamp.clone()),
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    Proxy { port, stop, acceptor: Some(acceptor) }
}

/// Relay one connection. The client's bytes are read by one thread, which stamps them
/// and queues them for a second thread that writes them upstream: a slow server never
/// delays the stamps (the queue holds at most what the client sends before the server
/// answers: one chunk). Responses are copied back by a third.
fn relay(client: TcpStream, upstream: u16, stamp: Arc<dyn Fn(usize) + Send + Sync>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (mut from_client, mut to_client) = (client.try_clone().expect("clone"), client);
    let (mut to_server, mut from_server) = (server.try_clone().expect("clone"), server);
    let (queue, queued) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        // Bounded: ends when the client closes or the connection fails.
        while let Ok(n @ 1..) = from_client.read(&mut buf) {
            stamp(n);
            if queue.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        // Bounded: ends when the reader above ends (the queue closes) or the server fails.
        for bytes in queued {
            if to_server.write_all(&bytes).is_err() {
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

/// Upload chunks at a fixed `bps` from `workers` threads for [`RUN`] virtual seconds
/// to `backend` through the stamping proxy; every 10 s window of what reached the
/// server must be within 5% of the limit. Returns the worst deviation.
fn steady(backend: Remote, bps: u64, workers: usize) -> Option<f64> {
    let emulator = backend.start()?;
    let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
    let samples = Arc::new(Mutex::new(vec![(0.0, 0u64)]));
    let received = Arc::new(AtomicU64::new(0));
    let stamp: Arc<dyn Fn(usize) + Send + Sync> = {
        let (clock, samples, received) = (clock.clone(), samples.clone(), received.clone());
        Arc::new(move |n| {
            let mut s = samples.lock().unwrap();
            let total = s.last().map_or(0, |x| x.1) + n as u64;
            // Time and bytes taken together, so that samples are ordered in both.
            s.push((clock.elapsed().as_secs_f64(), total));
            received.store(total, Ordering::SeqCst);
        })
    };
    let relay = proxy(emulator.port, stamp);
    let store = backend.open(relay.port, "wire", &[]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let envelope = incompressible_envelope();
    let limit = Limit::Bps(bps);
    let throttle = Throttle::new(
        clock.clone(),
        UtcOffset::UTC,
        Box::new(move || Some(Schedule { work_limit: limit, off_limit: limit, ..Schedule::unlimited() })),
    );
    // The wire catches up before every grant (see `upload`).
    let pacer = |remaining: u64| {
        catch_up(&store, &received);
        throttle.grant(remaining)
    };
    let next = Mutex::new(0u64);
    let chunks = upload(&store, &rt, &pacer, &clock, workers, &next, &envelope);
    drop(relay);
    drop(emulator);

    let samples: Samples = samples.lock().unwrap().clone();
    let total = samples.last().unwrap().1;
    assert!(total > 2 * envelope.len() as u64, "several chunks went: {total} bytes");
    let (deviation, at) = worst_window(&samples, bps, 0.0, RUN - WINDOW);
    println!(
        "{}: {limit}, {workers} worker(s), {chunks} chunks, {total} bytes on the wire: worst 10 s window {:+.3}% (at {at} s)",
        backend.name(),
        deviation * 100.0
    );
    assert!(deviation.abs() < 0.05, "{}: window at {at} s off by {:.2}%", backend.name(), deviation * 100.0);
    Some(deviation)
}

/// Wait (bounded) until every byte the store has handed to its connections has reached
/// the proxy. On a real clock a part travels loopback in microseconds while the throttle
/// waits 50 ms between parts; on the virtual clock those waits take no real time, so
/// without this the clock would run ahead of the wire by whatever the kernel's socket
/// buffers hold (megabytes on loopback), and the stamps would measure the proxy's
/// scheduling instead of the pacing. Bytes sent before the throttle admitted them would
/// still show: they reach the proxy at an earlier virtual time than their grant.
/// (The proxy's count includes request headers, so it may run a few hundred bytes per
/// request ahead of the body bytes it is compared with.)
fn catch_up(store: &Store, received: &AtomicU64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Bounded by the deadline; past it the windows show the lag.
    while received.load(Ordering::SeqCst) < store.stats().bytes_put && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Upload chunks from `workers` threads until the clock reads [`RUN`] seconds; each is
/// deleted once stored, so that the emulator holds a few chunks whatever the rate.
/// Returns how many went.
fn upload(
    store: &Store,
    rt: &tokio::runtime::Runtime,
    pacer: &(dyn Fn(u64) -> u64 + Sync),
    clock: &VirtualClock,
    workers: usize,
    next: &Mutex<u64>,
    envelope: &Bytes,
) -> u64 {
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                // Bounded: the clock advances by every chunk's time at the limit.
                while clock.elapsed().as_secs_f64() < RUN {
                    let n = {
                        let mut next = next.lock().unwrap();
                        *next += 1;
                        *next
                    };
                    let mut address = [0u8; 32];
                    address[..8].copy_from_slice(&n.to_be_bytes());
                    let address = ChunkAddress(address);
                    rt.block_on(store.put_chunk_paced(&address, envelope.clone(), &pacer)).unwrap();
                    rt.block_on(store.delete_chunk(&address)).unwrap();
                }
            });
        }
    });
    *next.lock().unwrap()
}

#[test]
fn throttled_upload_to_s3_one_worker_is_within_5_percent_on_the_wire() {
    steady(Remote::Moto, 50_000_000, 1);
}

#[test]
fn throttled_upload_to_s3_four_workers_is_within_5_percent_on_the_wire() {
    steady(Remote::Moto, 50_000_000, 4);
}

#[test]
fn throttled_upload_to_azure_one_worker_is_within_5_percent_on_the_wire() {
    steady(Remote::Azurite, 50_000_000, 1);
}

#[test]
fn throttled_upload_to_azure_four_workers_is_within_5_percent_on_the_wire() {
    steady(Remote::Azurite, 50_000_000, 4);
}
