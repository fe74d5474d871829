//! A raw NBD client on tern-nbd's wire functions, for sending what no well-behaved
//! client sends (unknown commands, broken frames, half requests).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use tern_nbd::proto::*;
use tern_nbd::wire::{self, Request};

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connect and read the greeting; send client flags.
    pub fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        r.s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
        r
    }

    /// Send an option; the replies up to ACK or an error: (type, data).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.s.write_all(&wire::encode_option(option, data)).unwrap();
        let mut out = Vec::new();
        // Bounded: a server sends at most a few replies per option here.
        for _ in 0..64 {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            self.s.read_exact(&mut h).unwrap();
            let (opt, kind, len) = wire::decode_option_reply_header(&h).unwrap();
            assert_eq!(opt, option);
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            out.push((kind, d));
            if kind == REP_ACK || kind & REP_ERR_BIT != 0 {
                return out;
            }
        }
        panic!("no end to the replies of option {option}");
    }

    /// Handshake to `export` with simple replies; (size, flags).
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        let replies = self.option(OPT_GO, &wire::encode_info_request(export, &[]));
        let (kind, _) = replies.last().unwrap();
        assert_eq!(*kind, REP_ACK, "{replies:?}");
        for (_, d) in &replies {
            if let Ok(wire::Info::Export { size, flags }) = wire::decode_info(d) {
                return (size, flags);
            }
        }
        panic!("no NBD_INFO_EXPORT");
    }

    pub fn send(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        let r = Request { flags, kind, cookie, offset, length };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// One simple reply: (error, cookie); `data_len` bytes of data follow a successful
    /// read and are returned too.
    pub fn reply(&mut self, data_len: usize) -> Option<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).ok()?;
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let (err, cookie) = wire::decode_simple_reply_rest(h[4..].try_into().unwrap());
        let mut d = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d).ok()?;
        Some((err, cookie, d))
    }

    /// Whether the server has closed the connection (reads end of stream).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}
