//! A blocking NBD client (the protocol of `doc/proto.md` of the NBD project): fixed
//! newstyle negotiation, structured replies, metadata contexts, `NBD_CMD_READ` and
//! `NBD_CMD_BLOCK_STATUS`. It is how tern reads a frozen view of a running VM's disk
//! that QEMU exports, with the dirty bitmap that says what changed
//! (`qemu:dirty-bitmap:NAME`) or the allocation (`base:allocation`).
//!
//! One request at a time on one connection. Everything the server sends is checked
//! against the request it answers (cookie, offsets inside the request, lengths, the
//! negotiated context ids); anything else ends the connection with an error naming the
//! export and what was wrong. [`NbdDisk`] is the connection as a read-only
//! [`Disk`](crate::Disk).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Disk, Error, Format, ImageInfo, MapKind, Mapping, Result};

// The protocol's constants and message layouts are tern-nbd's, shared with the server.
use tern_nbd::proto::{
    CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, NBDMAGIC,
    OPTION_REPLY_HEADER_LEN, OPT_ABORT, OPT_GO, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REPLY_FLAG_DONE,
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE, REP_ACK, REP_ERR_BIT, REP_INFO, REP_META_CONTEXT, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};
use tern_nbd::wire::{self, Info, Request};

/// Status flag of `base:allocation`: the range reads as zero.
pub const STATE_ZERO: u32 = tern_nbd::proto::STATE_ZERO;
/// Status flag of `base:allocation`: the range is a hole.
pub const STATE_HOLE: u32 = tern_nbd::proto::STATE_HOLE;
/// Status flag of `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// The largest read or status request sent (QEMU's limit is 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;
/// The largest reply payload accepted that is not read data (QEMU caps a block status
/// reply far below; the protocol says 2^20 extents).
const MAX_META_REPLY: u32 = 4 + 8 * (1 << 20);

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// The context's status flags.
    pub flags: u32,
}

/// A connection to one export, in transmission phase.
pub struct NbdClient {
    stream: UnixStream,
    name: PathBuf,
    size: u64,
    transmission_flags: u16,
    contexts: Vec<(u32, String)>,
    cookie: u64,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("export", &self.name).field("size", &self.size).finish()
    }
}

impl NbdClient {
    /// Connect to the NBD server on the UNIX socket `socket`, select `export`, and ask
    /// for the metadata contexts `contexts` (e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:tern-1`); each must be granted, or this is an error naming it.
    /// Every read and write of the socket waits at most `timeout`.
    pub fn connect_unix(
        socket: &Path,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<NbdClient> {
        let name = PathBuf::from(format!("nbd+unix:///{export}?socket={}", socket.display()));
        let stream = UnixStream::connect(socket).map_err(|e| Error::io(&name, "connect", e))?;
        for r in [stream.set_read_timeout(Some(timeout)), stream.set_write_timeout(Some(timeout))] {
            r.map_err(|e| Error::io(&name, "set a socket timeout", e))?;
        }
        let mut c =
            NbdClient { stream, name, size: 0, transmission_flags: 0, contexts: Vec::new(), cookie: 0 };
        c.handshake(export, contexts)?;
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server said the export is read-only.
    pub fn read_only(&self) -> bool {
        self.transmission_flags & 2 != 0
    }

    fn bad(&self, message: impl Into<String>) -> Error {
        Error::corrupt(&self.name, format!("NBD server: {}", message.into()))
    }

    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.stream.read_exact(buf).map_err(|e| {
            let kind = e.kind();
            if kind == std::io::ErrorKind::UnexpectedEof {
                Error::corrupt(&self.name, format!("NBD server closed the connection while sending {what}"))
            } else {
                Error::io(&self.name, format!("read {what}"), e)
            }
        })
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b, what)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b, what)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b, what)?;
        Ok(u64::from_be_bytes(b))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let name = self.name.clone();
        self.stream.write_all(bytes).map_err(|e| Error::io(&name, "send to the NBD server", e))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        self.send(&wire::encode_option(option, data))
    }

    /// One option reply: (type, data). Errors (bit 31) are returned as errors.
    fn option_reply(&mut self, option: u32, what: &str) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.read_exact(&mut h, "an option reply")?;
        let (opt, kind, len) = wire::decode_option_reply_header(&h).map_err(|e| self.bad(e.to_string()))?;
        if opt != option {
            return Err(self.bad(format!("reply to option {opt} while option {option} was asked")));
        }
        if len > 1 << 20 {
            return Err(self.bad(format!("an option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data, "an option reply")?;
        if kind & REP_ERR_BIT != 0 {
            let msg = String::from_utf8_lossy(&data).into_owned();
            let code = kind & !REP_ERR_BIT;
            let reason = match code {
                1 => "not supported",
                2 => "refused by policy",
                3 => "invalid",
                5 => "TLS required",
                6 => "unknown export",
                8 => "too big",
                _ => "refused",
            };
            let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
            return Err(Error::unsupported(&self.name, format!("NBD server: {what}: {reason}{msg}")));
        }
        Ok((kind, data))
    }

    fn handshake(&mut self, export: &str, wanted: &[&str]) -> Result<()> {
        let magic = self.u64("its greeting")?;
        let opt = self.u64("its greeting")?;
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(self.bad("not a newstyle NBD server (wrong greeting magic)"));
        }
        let flags = self.u16("its greeting")?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.bad("does not speak fixed newstyle negotiation"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE) | u32::from(flags & FLAG_NO_ZEROES);
        self.send(&client_flags.to_be_bytes())?;

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY, "structured replies")?;
        if kind != REP_ACK {
            return Err(self.bad(format!("reply type {kind} to the structured reply option")));
        }

        if !wanted.is_empty() {
            let data = wire::encode_meta_request(export, wanted);
            self.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT, "metadata contexts")?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        let (id, name) =
                            wire::decode_rep_meta_context(&data).map_err(|e| self.bad(e.to_string()))?;
                        self.contexts.push((id, name));
                    }
                    _ => return Err(self.bad(format!("reply type {kind} to the metadata context option"))),
                }
            }
            for q in wanted {
                if !self.contexts.iter().any(|(_, n)| n == q) {
                    return Err(Error::unsupported(
                        &self.name,
                        format!("NBD server does not offer the metadata context {q} on export {export:?} (a dirty bitmap must exist, be disabled, and be named in the export's bitmaps)"),
                    ));
                }
            }
        }

        self.send_option(OPT_GO, &wire::encode_info_request(export, &[]))?;
        let mut got_export = false;
        loop {
            let (kind, data) = self.option_reply(OPT_GO, &format!("export {export:?}"))?;
            match kind {
                REP_ACK => break,
                REP_INFO => match wire::decode_info(&data) {
                    Ok(Info::Export { size, flags }) => {
                        self.size = size;
                        self.transmission_flags = flags;
                        got_export = true;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(self.bad(format!("export information: {e}"))),
                },
                _ => return Err(self.bad(format!("reply type {kind} to the go option"))),
            }
        }
        if !got_export {
            return Err(self.bad("selected the export without telling its size"));
        }
        Ok(())
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32) -> Result<u64> {
        self.cookie += 1;
        let m = Request { flags, kind, cookie: self.cookie, offset, length }.encode();
        self.send(&m)?;
        Ok(self.cookie)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(
                Some(&self.name),
                format!("range {offset}+{len} is beyond the export's {} bytes", self.size),
            ));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (split into requests of at most
    /// [`MAX_REQUEST`]).
    pub fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_REQUEST as usize);
            self.read_one(&mut buf[done..done + n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    fn read_one(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let cookie = self.request(CMD_READ, 0, offset, len as u32)?;
        // Every byte must be covered once by data or hole chunks.
        let mut covered = 0u64;
        loop {
            let (flags, kind, payload_len) = self.reply_header(cookie, "a read")?;
            match kind {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_OFFSET_DATA => {
                    if payload_len < 8 {
                        return Err(self.bad("a data chunk shorter than its offset"));
                    }
                    let at = self.u64("a data chunk")?;
                    let n = u64::from(payload_len - 8);
                    if at < offset || at + n > offset + len {
                        return Err(self.bad(format!("data at {at}+{n} outside the read of {offset}+{len}")));
                    }
                    let start = (at - offset) as usize;
                    let slice = &mut buf[start..start + n as usize];
                    self.read_exact(slice, "read data")?;
                    covered += n;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if payload_len != 12 {
                        return Err(self.bad("a hole chunk of the wrong size"));
                    }
                    let at = self.u64("a hole chunk")?;
                    let n = u64::from(self.u32("a hole chunk")?);
                    if at < offset || at + n > offset + len {
                        return Err(self.bad(format!("hole at {at}+{n} outside the read of {offset}+{len}")));
                    }
                    let start = (at - offset) as usize;
                    buf[start..start + n as usize].fill(0);
                    covered += n;
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => return Err(self.error_chunk(payload_len, "read")),
                k => return Err(self.bad(format!("reply chunk type {k} to a read"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if covered != len {
            return Err(self.bad(format!("a read of {len} bytes at {offset} answered with {covered}")));
        }
        Ok(())
    }

    /// The header of the next reply to `cookie`: (flags, type, payload length). A
    /// simple reply is accepted only as an error (structured replies were negotiated).
    fn reply_header(&mut self, cookie: u64, what: &str) -> Result<(u16, u16, u32)> {
        let magic = self.u32(what)?;
        if magic == SIMPLE_REPLY_MAGIC {
            let mut rest = [0u8; 12];
            self.read_exact(&mut rest, what)?;
            let (err, c) = wire::decode_simple_reply_rest(&rest);
            if c != cookie || err == 0 {
                return Err(
                    self.bad(format!("a simple reply to {what} after structured replies were negotiated"))
                );
            }
            return Err(Error::io(&self.name, what.to_string(), errno(err)));
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(self.bad(format!("reply magic {magic:#x} is wrong")));
        }
        let mut rest = [0u8; 16];
        self.read_exact(&mut rest, what)?;
        let (flags, kind, c, len) = wire::decode_structured_rest(&rest);
        if c != cookie {
            return Err(self.bad(format!("a reply for cookie {c} while waiting for {cookie}")));
        }
        if kind != REPLY_TYPE_OFFSET_DATA && len > MAX_META_REPLY {
            return Err(self.bad(format!("a reply chunk of {len} bytes")));
        }
        if kind == REPLY_TYPE_OFFSET_DATA && len > MAX_REQUEST + 8 {
            return Err(self.bad(format!("a data chunk of {len} bytes")));
        }
        Ok((flags, kind, len))
    }

    fn error_chunk(&mut self, len: u32, what: &str) -> Error {
        let mut payload = vec![0u8; len as usize];
        if let Err(e) = self.read_exact(&mut payload, "an error chunk") {
            return e;
        }
        let (err, msg) = match wire::decode_error_payload(&payload) {
            Ok(x) => x,
            Err(e) => return self.bad(e.to_string()),
        };
        let e = errno(err);
        let detail = if msg.is_empty() { what.to_string() } else { format!("{what} ({msg})") };
        Error::io(&self.name, detail, e)
    }

    /// The extents of `context` over `[offset, offset + len)`, in order and covering
    /// it exactly (the last one clipped), asking again after each reply: servers may
    /// answer for less than was asked (QEMU caps the extents of one reply).
    pub fn extents(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len)?;
        let Some(&(id, _)) = self.contexts.iter().find(|(_, n)| n == context) else {
            return Err(Error::invalid(
                Some(&self.name),
                format!("metadata context {context} was not negotiated"),
            ));
        };
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            let n = (end - at).min(u64::from(MAX_REQUEST)) as u32;
            let got = self.block_status(id, at, n)?;
            for (l, flags) in got {
                let l = u64::from(l).min(end - at);
                if l == 0 {
                    break;
                }
                match out.last_mut() {
                    Some(last) if last.flags == flags && last.offset + last.length == at => last.length += l,
                    _ => out.push(Extent { offset: at, length: l, flags }),
                }
                at += l;
            }
        }
        Ok(out)
    }

    /// One block status request: the descriptors of context `id` (at least one).
    fn block_status(&mut self, id: u32, offset: u64, len: u32) -> Result<Vec<(u32, u32)>> {
        let cookie = self.request(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut mine = None;
        loop {
            let (flags, kind, payload_len) = self.reply_header(cookie, "a block status")?;
            match kind {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_BLOCK_STATUS => {
                    let mut raw = vec![0u8; payload_len as usize];
                    self.read_exact(&mut raw, "a block status chunk")?;
                    let (ctx, descs) =
                        wire::decode_block_status(&raw).map_err(|e| self.bad(e.to_string()))?;
                    if descs.iter().any(|&(l, _)| l == 0) {
                        return Err(self.bad("a block status extent of length 0"));
                    }
                    // All but the last extent lie inside the request (proto.md).
                    let inner: u64 = descs[..descs.len() - 1].iter().map(|&(l, _)| u64::from(l)).sum();
                    if inner >= u64::from(len) {
                        return Err(self.bad("block status extents beyond the request"));
                    }
                    if ctx == id {
                        mine = Some(descs);
                    } else if !self.contexts.iter().any(|&(c, _)| c == ctx) {
                        return Err(self.bad(format!("block status for context id {ctx}, never negotiated")));
                    }
                }
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    return Err(self.error_chunk(payload_len, "block status"))
                }
                k => return Err(self.bad(format!("reply chunk type {k} to a block status"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        mine.ok_or_else(|| self.bad("block status reply without the asked context"))
    }

    /// End the connection politely.
    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0);
    }

    /// End negotiation without selecting an export (for probes).
    pub fn abort(mut self) {
        let _ = self.send_option(OPT_ABORT, &[]);
    }
}

fn errno(err: u32) -> std::io::Error {
    // NBD error values are the Linux errno values for the common ones.
    std::io::Error::from_raw_os_error(err as i32)
}

/// An NBD export as a read-only [`Disk`]: reads and `base:allocation` mapping.
#[derive(Debug)]
pub struct NbdDisk {
    client: Mutex<NbdClient>,
    size: u64,
}

impl NbdDisk {
    /// Open `export` on the server at `socket`; the server must offer `base:allocation`
    /// (QEMU and nbdkit do), which maps holes and zeros.
    pub fn open_unix(socket: &Path, export: &str, timeout: Duration) -> Result<NbdDisk> {
        let client = NbdClient::connect_unix(socket, export, &["base:allocation"], timeout)?;
        let size = client.size();
        Ok(NbdDisk { client: Mutex::new(client), size })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, NbdClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Disk for NbdDisk {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.client().read(buf, offset)
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        if offset >= self.size {
            return Err(Error::invalid(None, format!("map offset {offset} is beyond the end")));
        }
        let len = max_len.min(self.size - offset).clamp(1, u64::from(MAX_REQUEST));
        let mut c = self.client();
        let id =
            c.contexts.iter().find(|(_, n)| n == "base:allocation").map(|&(id, _)| id).expect("negotiated");
        let descs = c.block_status(id, offset, len as u32)?;
        let (l, flags) = descs[0];
        let kind = if flags & STATE_ZERO != 0 {
            if flags & STATE_HOLE != 0 {
                MapKind::Unallocated
            } else {
                MapKind::Zero
            }
        } else {
            MapKind::Data
        };
        Ok(Mapping { start: offset, length: u64::from(l).min(len), kind })
    }

    fn info(&self) -> Result<ImageInfo> {
        Ok(ImageInfo {
            format: Format::Raw,
            subformat: "nbd".to_string(),
            virtual_size: self.size,
            allocated_bytes: 0,
            file_size: self.size,
            cluster_size: None,
            logical_sector_size: 512,
            backing: None,
            details: Vec::new(),
        })
    }
}
