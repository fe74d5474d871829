//! The server: a listener, an accept loop, and one thread per connection that runs
//! the handshake and then the transmission phase with its own request threads.
//!
//! [`Server::serve`] runs until [`StopHandle::stop`] (any thread, or a signal handler
//! through an atomic flag polled by the accept loop). Stopping refuses new clients,
//! ends every connection's reading (as if each client had sent `NBD_CMD_DISC`: requests
//! in flight are still answered), waits for the connection threads, and removes the
//! Unix socket.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::export::Export;
use crate::handshake::{self, HandshakeEnd, HandshakeStream};
use crate::socket::{self, Listen, Listener, Socket};
use crate::tls::Stream;
use crate::transmission::{self, End, Halves, Session};

/// A message from the server about one client (connected, refused, disconnected and
/// why). Clients misbehaving never stop the server; this is where they are reported.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// How a [`Server`] behaves.
#[derive(Clone)]
pub struct ServerOptions {
    /// The exports, by name, in the order `NBD_OPT_LIST` gives them; the first one is
    /// also the default export (the empty name).
    pub exports: Vec<(String, Arc<dyn Export>)>,
    /// Request threads per connection: how many requests of one client run at once.
    pub threads_per_connection: usize,
    /// Payload bytes in flight per connection, at most.
    pub max_in_flight: u64,
    /// Most connections at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// A client that has not finished its handshake in this time is disconnected.
    pub handshake_timeout: Duration,
    /// TLS: when set, clients must use `NBD_OPT_STARTTLS` (FORCEDTLS mode).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Where reports about clients go (none: dropped).
    pub log: Option<Log>,
}

impl ServerOptions {
    /// Defaults for these exports: 16 request threads and 128 MiB in flight per
    /// connection, 64 connections, 30 s to finish a handshake, no TLS.
    pub fn new(exports: Vec<(String, Arc<dyn Export>)>) -> Self {
        ServerOptions {
            exports,
            threads_per_connection: 16,
            max_in_flight: 128 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
            log: None,
        }
    }
}

/// Stops a running [`Server`] from any thread.
#[derive(Clone)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// Ask the server to stop; [`Server::serve`] returns once every connection ended.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A bound NBD server.
pub struct Server {
    listener: Listener,
    options: ServerOptions,
    stop: Arc<AtomicBool>,
    /// Extra flag checked beside the stop handle (e.g. set by a signal handler).
    external_stop: Option<&'static AtomicBool>,
}

/// What the accept loop knows of a live connection: a way to end its reading.
struct Live {
    id: u64,
    socket: Socket,
}

impl Server {
    /// Bind to `listen`. TCP is refused on a non-loopback address unless TLS is
    /// configured; export names must be unique, valid UTF-8 of at most 4096 bytes;
    /// block sizes must follow the protocol's rules.
    pub fn bind(listen: &Listen, options: ServerOptions) -> Result<Server> {
        if options.exports.is_empty() {
            return Err(Error::invalid("a server needs at least one export"));
        }
        for (i, (name, export)) in options.exports.iter().enumerate() {
            if name.len() > 4096 {
                return Err(Error::invalid(format!("export name {name:?} is longer than 4096 bytes")));
            }
            if options.exports[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::invalid(format!("two exports are named {name:?}")));
            }
            if !export.block_sizes().valid() {
                return Err(Error::invalid(format!(
                    "export {name:?}: block sizes {:?} break the protocol's rules",
                    export.block_sizes()
                )));
            }
        }
        if let Listen::Tcp(addr) = listen {
            if options.tls.is_none() && !addr.ip().is_loopback() {
                return Err(Error::invalid(format!(
                    "refusing to serve NBD without TLS on {addr}, which is not a loopback address (configure TLS, or use a Unix socket)"
                )));
            }
        }
        let listener = Listener::bind(listen)?;
        listener.set_nonblocking().map_err(|e| Error::io("make the listener non-blocking", e))?;
        Ok(Server { listener, options, stop: Arc::new(AtomicBool::new(false)), external_stop: None })
    }

    /// Where the server listens (with the port chosen, for TCP port 0).
    pub fn local(&self) -> Listen {
        self.listener.local()
    }

    /// A handle to stop the server.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Also stop when `flag` becomes true (a flag set by a signal handler).
    pub fn stop_on(&mut self, flag: &'static AtomicBool) {
        self.external_stop = Some(flag);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || self.external_stop.is_some_and(|f| f.load(Ordering::Acquire))
    }

    fn log(&self, msg: &str) {
        if let Some(l) = &self.options.log {
            l(msg);
        }
    }

    /// Accept and serve clients until stopped. Returns after every connection ended
    /// and the Unix socket (if any) was removed.
    pub fn serve(self) -> Result<()> {
        let live: Arc<Mutex<Vec<Live>>> = Arc::new(Mutex::new(Vec::new()));
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        let options = Arc::new(self.options.clone());
        while !self.stopping() {
            threads.retain(|t| !t.is_finished());
            match socket::wait_readable(self.listener.fd(), Duration::from_millis(100)) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(e) => return Err(Error::io("wait for clients", e)),
            }
            let (sock, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                    continue
                }
                // Out of descriptors or a client that vanished: the next one may work.
                Err(e) => {
                    self.log(&format!("accept failed: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let count = live.lock().unwrap_or_else(|e| e.into_inner()).len();
            if count >= options.max_connections {
                self.log(&format!("client {peer} refused: already {count} connections"));
                continue;
            }
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let Ok(handle) = sock.try_clone() else { continue };
            live.lock().unwrap_or_else(|e| e.into_inner()).push(Live { id, socket: handle });
            let (opts, live2, who) = (options.clone(), live.clone(), peer.clone());
            let spawned = std::thread::Builder::new().name("tern-nbd-conn".into()).spawn(move || {
                let what = connection(sock, &opts);
                if let Some(l) = &opts.log {
                    l(&format!("client {who} (connection {id}): {what}"));
                }
                live2.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.id != id);
            });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.log(&format!("client {peer} refused: cannot start a thread: {e}"));
                    live.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.id != id);
                }
            }
        }
        // Stop reading every connection: each then answers what is in flight and ends.
        for c in live.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            c.socket.shutdown(Shutdown::Read);
        }
        for t in threads {
            let _ = t.join();
        }
        drop(self.listener);
        Ok(())
    }
}

/// Serve one client from greeting to disconnect; a sentence saying how it ended.
fn connection(sock: Socket, o: &ServerOptions) -> String {
    if sock.set_read_timeout(Some(o.handshake_timeout)).is_err()
        || sock.set_write_timeout(Some(o.handshake_timeout)).is_err()
    {
        return "could not set socket timeouts".into();
    }
    let mut stream = Stream::Plain(sock);
    let neg = match handshake::negotiate(&mut stream, &o.exports, o.tls.as_ref()) {
        Ok(n) => n,
        Err(HandshakeEnd::Closed) => return "left during the handshake".into(),
        Err(e) => {
            stream.shutdown();
            return format!("disconnected during the handshake: {e}");
        }
    };
    let (name, export) = &o.exports[neg.export];
    let session = Session::new(export.clone(), neg.structured, neg.base_allocation, neg.flags);
    // A TLS session has one state for both directions: one request at a time.
    let threads = if stream.is_tls() { 1 } else { o.threads_per_connection };
    let halves = match stream.into_halves() {
        Ok(h) => h,
        Err(e) => return format!("could not split the connection: {e}"),
    };
    let why = match transmission::run(session, halves, threads, o.max_in_flight) {
        End::Clean => format!("export {name:?}: disconnected"),
        End::Fatal(why) => format!("export {name:?}: disconnected: {why}"),
    };
    export.closed(&why);
    why
}

impl Stream {
    fn shutdown(&self) {
        self.socket().shutdown(Shutdown::Both);
    }

    /// The two directions for the transmission phase, with no timeouts left: an idle
    /// client is no fault, and replies block only while the client reads them.
    fn into_halves(self) -> io::Result<Halves> {
        let sock = self.socket();
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        let killer = sock.try_clone()?;
        let kill: Arc<dyn Fn() + Send + Sync> = Arc::new(move || killer.shutdown(Shutdown::Both));
        let none: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(|| false);
        match self {
            Stream::Plain(s) => {
                let w = s.try_clone()?;
                let probe = s.try_clone()?;
                let pending: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || probe.pending());
                Ok(Halves { reader: Box::new(s), writer: Box::new(w), kill, pending })
            }
            Stream::Tls(t) => {
                let shared = Arc::new(Mutex::new(*t));
                Ok(Halves {
                    reader: Box::new(crate::tls::Locked(shared.clone())),
                    writer: Box::new(crate::tls::Locked(shared)),
                    kill,
                    pending: none,
                })
            }
        }
    }
}
