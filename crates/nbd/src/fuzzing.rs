//! Entry points for the fuzz targets (`fuzz/`) and the property tests: the server's
//! handshake and transmission code run over bytes in memory, exactly as over a socket
//! but one request at a time.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::export::{BlockSizes, Export};
use crate::handshake::{self, HandshakeEnd, HandshakeStream};
use crate::memory::MemoryExport;
use crate::transmission::{self, End, Session};

/// Bytes from a client, and what the server answered (kept short: only its length
/// matters here).
struct Mem<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HandshakeStream for Mem<'_> {
    fn start_tls(&mut self, _: &Arc<rustls::ServerConfig>) -> io::Result<()> {
        Err(io::Error::other("no TLS in memory"))
    }

    fn is_tls(&self) -> bool {
        false
    }
}

/// How a session over `bytes` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The client left (ABORT, DISC, end of input) after this many requests.
    Closed { requests: usize },
    /// The server disconnected it, saying why.
    Refused(String),
}

/// Feed `bytes` to a server exporting 1 MiB (two exports: `a` writable with minimum
/// block size 512, `b` read-only), as a client would send them: handshake, then
/// requests. Never panics; every way it can end is an [`Outcome`].
pub fn session(bytes: &[u8]) -> Outcome {
    let sizes = BlockSizes { minimum: 512, preferred: 4096, maximum: 1 << 20 };
    let exports: Vec<(String, Arc<dyn Export>)> = vec![
        ("a".into(), Arc::new(MemoryExport::new(1 << 20, false, sizes))),
        ("b".into(), Arc::new(MemoryExport::new(1 << 20, true, BlockSizes::default()))),
    ];
    let mut mem = Mem { input: bytes, written: 0 };
    let neg = match handshake::negotiate(&mut mem, &exports, None) {
        Ok(n) => n,
        Err(HandshakeEnd::Closed) => return Outcome::Closed { requests: 0 },
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let session = Session::new(exports[neg.export].1.clone(), neg.structured, neg.base_allocation, neg.flags);
    let mut buf = Vec::new();
    let mut requests = 0;
    let mut reader = io::BufReader::with_capacity(4096, mem);
    // Every request consumes at least its 28-byte header: the input bounds the loop.
    loop {
        match transmission::read_request(&session, &mut reader, &mut buf, None) {
            Ok(None) => return Outcome::Closed { requests },
            Ok(Some(job)) => {
                let reply = transmission::execute(&session, &job, &mut buf);
                if let Err(e) = transmission::write_reply(&session, reader.get_mut(), &job.req, &reply, &buf)
                {
                    return Outcome::Refused(e.to_string());
                }
                requests += 1;
            }
            Err(End::Fatal(why)) => return Outcome::Refused(why),
            Err(End::Clean) => return Outcome::Closed { requests },
        }
    }
}
