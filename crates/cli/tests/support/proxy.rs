//! A loopback TCP proxy in front of a store server, so that a test can cut the store
//! off (connections reset, new ones refused) and bring it back on the same port with
//! its data intact, or slow the link down and count what is sent to the store; and a
//! one-shot HTTP request for emulator setup.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes sent towards the store, and an optional rate limit on them.
#[derive(Default)]
pub struct Meter {
    /// Bytes forwarded from clients to the store.
    pub sent: AtomicU64,
    /// Limit in bytes per second; 0 for none.
    pub rate: AtomicU64,
    /// When the link is next free (the limit's schedule).
    next: Mutex<Option<Instant>>,
}

impl Meter {
    /// Count `n` bytes about to be forwarded, and wait for their turn under the limit.
    fn pass(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::SeqCst);
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 {
            return;
        }
        let wait = {
            let mut next = self.next.lock().unwrap();
            let now = Instant::now();
            let start = next.filter(|t| *t > now).unwrap_or(now);
            let end = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *next = Some(end);
            end - now
        };
        std::thread::sleep(wait);
    }
}

/// Forwards 127.0.0.1:`port` to 127.0.0.1:`target` until dropped or cut.
pub struct Proxy {
    pub port: u16,
    pub meter: Arc<Meter>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listen on `port` (0 for any free port).
    pub fn start(port: u16, target: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("binding the proxy port");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let meter: Arc<Meter> = Arc::default();
        let (s, c, m) = (stop.clone(), conns.clone(), meter.clone());
        let acceptor = std::thread::spawn(move || {
            // Bounded: ends when cut or dropped, which every test does.
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                        let mut list = c.lock().unwrap();
                        list.push(client.try_clone().unwrap());
                        list.push(server.try_clone().unwrap());
                        pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), Some(m.clone()));
                        pipe(server, client, None);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { port, meter, stop, conns, acceptor: Some(acceptor) }
    }

    /// Stop listening and reset every open connection: the store is unreachable.
    pub fn cut(mut self) -> u16 {
        self.shutdown();
        self.port
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Copy `from` to `to` on a thread until either side closes, through `meter` if any.
fn pipe(mut from: TcpStream, mut to: TcpStream, meter: Option<Arc<Meter>>) {
    std::thread::spawn(move || {
        // Small pieces, so that a limited link is paced finely.
        let mut buf = vec![0u8; 16 << 10];
        // Bounded: ends when a side closes or the proxy resets the sockets.
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Some(m) = &meter {
                        m.pass(n);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// An unsigned `PUT path` to 127.0.0.1:`port` with `body` (moto creates a bucket or
/// an object so); the status.
pub fn http_put(port: u16, path: &str, body: &[u8]) -> std::io::Result<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    // Bounded by the read timeout and the server closing the connection.
    s.take(1 << 16).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:.200}")))
}
