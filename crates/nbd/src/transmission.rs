//! The transmission phase of one connection: requests are read, checked, executed
//! against the [`Export`] and answered, many at a time and answered in the order they
//! complete.
//!
//! Threads: each connection has a small pool of request threads (leader/followers).
//! One thread at a time holds the read side, reads one request (and a write's
//! payload), lets go of the read side, executes the request and sends its reply under
//! the write lock. A request never waits for a hand-off between threads, and at queue
//! depth N up to N threads work at once. `NBD_CMD_DISC` or the end of the stream stops
//! reading; requests in flight are still answered. A broken frame (bad magic, a
//! payload too large to skip) is a hard disconnect: the socket is shut down and every
//! thread ends.
//!
//! Memory: the payload bytes of requests in flight per connection are bounded by
//! [`Budget`], so a client cannot make the server hold more than that, whatever its
//! queue depth.

use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::export::{BlockSizes, Export, ExportError, ZeroOptions};
use crate::proto::*;
use crate::wire::{self, Request};

/// The largest write payload that is read and thrown away when the request is
/// refused; beyond this the client is disconnected instead (twice the largest
/// payload anyone sends, as nbdkit).
pub const MAX_SKIP: u32 = 2 * DEFAULT_MAX_PAYLOAD;
/// Most descriptors in one block status reply.
pub const MAX_EXTENTS: usize = 1 << 16;

/// What one connection negotiated, fixed for its transmission phase.
pub struct Session {
    pub(crate) export: Arc<dyn Export>,
    pub(crate) size: u64,
    pub(crate) structured: bool,
    pub(crate) base_allocation: Option<u32>,
    pub(crate) flags: u16,
    pub(crate) sizes: BlockSizes,
}

impl Session {
    pub fn new(export: Arc<dyn Export>, structured: bool, base_allocation: Option<u32>, flags: u16) -> Self {
        let size = export.size();
        let sizes = export.block_sizes();
        Session { export, size, structured, base_allocation, flags, sizes }
    }
}

/// A request read off the wire, with its payload.
#[derive(Debug)]
pub struct Job {
    pub req: Request,
    /// Bytes taken from the connection's [`Budget`], given back after the reply.
    pub taken: u64,
    /// Why the request is refused (errno, message), decided before executing it.
    pub refusal: Option<(u32, String)>,
}

/// Why a connection ends.
#[derive(Debug)]
pub enum End {
    /// `NBD_CMD_DISC`, or the client closed the connection between requests.
    Clean,
    /// The client broke the framing or vanished mid-message.
    Fatal(String),
}

/// The reply to one request, before it is written.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success without data.
    Done,
    /// Success of a read: the first `n` bytes of the buffer.
    Data(usize),
    /// Block status descriptors of `base:allocation`.
    Extents(u32, Vec<(u32, u32)>),
    /// An error value and a message.
    Error(u32, String),
}

/// Check a request against the negotiated session, in the order qemu-nbd does (so a
/// request with several faults gets the error qemu-nbd gives): command, read-only,
/// bounds, alignment, flags, size. `Err((errno, message))` refuses it.
pub fn validate(s: &Session, r: &Request) -> Result<(), (u32, String)> {
    let bad = |e: u32, m: String| Err((e, m));
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if !matches!(
        r.kind,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    ) {
        return bad(EINVAL, format!("unknown command {}", r.kind));
    }
    if writes && s.flags & FLAG_READ_ONLY != 0 {
        return bad(EPERM, "the export is read-only".into());
    }
    let len = u64::from(r.length);
    if r.kind == CMD_FLUSH {
        if r.offset != 0 || r.length != 0 {
            return bad(EINVAL, "a flush with a nonzero offset or length".into());
        }
    } else if r.offset.checked_add(len).is_none_or(|end| end > s.size) {
        let e = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return bad(
            e,
            format!("{len} bytes at offset {} run past the end of the export ({} bytes)", r.offset, s.size),
        );
    }
    let min = u64::from(s.sizes.minimum);
    if r.kind != CMD_FLUSH && min > 1 && (!r.offset.is_multiple_of(min) || !len.is_multiple_of(min)) {
        return bad(EINVAL, format!("{len} bytes at offset {} are not aligned to {min} bytes", r.offset));
    }
    let known = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;
    let allowed = CMD_FLAG_FUA
        | match r.kind {
            CMD_WRITE_ZEROES if s.flags & FLAG_SEND_FAST_ZERO != 0 => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE,
            CMD_READ if s.structured => CMD_FLAG_DF,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if r.flags & !known != 0 {
        return bad(EINVAL, format!("unknown command flags {:#x}", r.flags & !known));
    }
    if r.flags & !allowed != 0 {
        return bad(
            EINVAL,
            format!("command flags {:#x} are not valid for command {}", r.flags & !allowed, r.kind),
        );
    }
    if matches!(r.kind, CMD_READ | CMD_WRITE) && r.length > s.sizes.maximum {
        return bad(EINVAL, format!("{len} bytes is more than the largest payload, {}", s.sizes.maximum));
    }
    match r.kind {
        CMD_TRIM if s.flags & FLAG_SEND_TRIM == 0 => bad(EINVAL, "trim is not supported".into()),
        CMD_BLOCK_STATUS if s.base_allocation.is_none() => {
            bad(EINVAL, "block status without a negotiated metadata context".into())
        }
        CMD_BLOCK_STATUS if r.length == 0 => bad(EINVAL, "block status of 0 bytes".into()),
        _ => Ok(()),
    }
}

/// Read one request (and a write's payload into `buf`). `Ok(None)`: the connection
/// ends cleanly (DISC or end of stream between requests). With a budget, the payload
/// of an accepted read or write is taken from it before any buffer grows.
pub fn read_request<R: Read>(
    s: &Session,
    r: &mut BufReader<R>,
    buf: &mut Vec<u8>,
    budget: Option<&Budget>,
) -> Result<Option<Job>, End> {
    let mut h = [0u8; REQUEST_LEN];
    match read_full(r, &mut h) {
        Ok(0) => return Ok(None),
        Ok(n) if n < REQUEST_LEN => {
            return Err(End::Fatal("the client closed the connection mid-request".into()))
        }
        Ok(_) => {}
        Err(e) => return Err(End::Fatal(format!("reading a request: {e}"))),
    }
    let req = Request::decode(&h).map_err(|e| End::Fatal(e.to_string()))?;
    if req.kind == CMD_DISC {
        return Ok(None);
    }
    let refusal = validate(s, &req).err();
    let taken = match (budget, req.kind) {
        (Some(b), CMD_READ | CMD_WRITE) if refusal.is_none() => b.take(u64::from(req.length)),
        _ => 0,
    };
    if req.kind == CMD_WRITE {
        // A payload beyond the advertised maximum breaks the protocol (qemu-nbd hangs
        // up too); other refused writes are skipped, if not absurdly large.
        if req.length > s.sizes.maximum || (req.length > MAX_SKIP && refusal.is_some()) {
            return Err(End::Fatal(format!(
                "a write of {} bytes (the largest payload is {})",
                req.length, s.sizes.maximum
            )));
        }
        if refusal.is_some() {
            // Thrown away without growing any buffer.
            let n = u64::from(req.length);
            return match io::copy(&mut r.take(n), &mut io::sink()) {
                Ok(got) if got == n => Ok(Some(Job { req, taken, refusal })),
                Ok(_) => Err(End::Fatal("the client closed the connection mid-write".into())),
                Err(e) => Err(End::Fatal(format!("reading a write's payload: {e}"))),
            };
        }
        let n = req.length as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        // What the buffer already holds, then straight from the stream: a large
        // payload is copied once, not through the buffer.
        let k = r.buffer().len().min(n);
        buf[..k].copy_from_slice(&r.buffer()[..k]);
        r.consume(k);
        match read_full(r.get_mut(), &mut buf[k..n]).map(|got| got + k) {
            Ok(got) if got == n => {}
            Ok(_) => {
                if let Some(b) = budget {
                    b.give(taken);
                }
                return Err(End::Fatal("the client closed the connection mid-write".into()));
            }
            Err(e) => {
                if let Some(b) = budget {
                    b.give(taken);
                }
                return Err(End::Fatal(format!("reading a write's payload: {e}")));
            }
        }
    }
    Ok(Some(Job { req, taken, refusal }))
}

/// Execute a checked request. A write's payload, or a read's data, is in `buf`.
pub fn execute(s: &Session, job: &Job, buf: &mut Vec<u8>) -> Reply {
    if let Some((e, m)) = &job.refusal {
        return Reply::Error(*e, m.clone());
    }
    let r = &job.req;
    let e = &s.export;
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(r.length);
    let done = |res: Result<(), ExportError>| match res {
        Ok(()) => Reply::Done,
        Err(err) => Reply::Error(err.kind.errno(), err.message),
    };
    match r.kind {
        CMD_READ => {
            let n = r.length as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            match e.read_at(&mut buf[..n], r.offset) {
                Ok(()) => Reply::Data(n),
                Err(err) => Reply::Error(err.kind.errno(), err.message),
            }
        }
        CMD_WRITE => done(e.write_at(&buf[..r.length as usize], r.offset, fua)),
        CMD_FLUSH => done(e.flush()),
        CMD_TRIM => done(e.trim(r.offset, len, fua)),
        CMD_CACHE => done(e.cache(r.offset, len)),
        CMD_WRITE_ZEROES => done(e.write_zeroes(
            r.offset,
            len,
            ZeroOptions {
                may_trim: r.flags & CMD_FLAG_NO_HOLE == 0,
                fast: r.flags & CMD_FLAG_FAST_ZERO != 0,
                fua,
            },
        )),
        CMD_BLOCK_STATUS => match e.extents(r.offset, len) {
            Ok(ext) => {
                let mut out: Vec<(u32, u32)> = Vec::new();
                let mut left = len;
                for x in ext {
                    if left == 0 || out.len() >= MAX_EXTENTS {
                        break;
                    }
                    let l = x.length.min(left);
                    if l == 0 {
                        continue;
                    }
                    left -= l;
                    match out.last_mut() {
                        Some(last) if last.1 == x.flags => last.0 += l as u32,
                        _ => out.push((l as u32, x.flags)),
                    }
                }
                if out.is_empty() {
                    return Reply::Error(EIO, "the export reported no extent".into());
                }
                if r.flags & CMD_FLAG_REQ_ONE != 0 {
                    out.truncate(1);
                }
                Reply::Extents(s.base_allocation.unwrap_or(0), out)
            }
            Err(err) => Reply::Error(err.kind.errno(), err.message),
        },
        _ => Reply::Error(EINVAL, format!("unknown command {}", r.kind)),
    }
}

/// Send the reply to `req`: structured for reads and block status when structured
/// replies are on, simple otherwise.
pub fn write_reply<W: Write + ?Sized>(
    s: &Session,
    w: &mut W,
    req: &Request,
    reply: &Reply,
    buf: &[u8],
) -> io::Result<()> {
    let structured = s.structured && matches!(req.kind, CMD_READ | CMD_BLOCK_STATUS);
    let c = req.cookie;
    match reply {
        Reply::Error(errno, msg) if structured => {
            let p = wire::encode_error_payload(*errno, msg);
            let h = wire::encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, c, p.len() as u32);
            write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(&p)])
        }
        Reply::Error(errno, _) => w.write_all(&wire::encode_simple_reply(*errno, c)),
        Reply::Done if structured => {
            w.write_all(&wire::encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, c, 0))
        }
        Reply::Done => w.write_all(&wire::encode_simple_reply(0, c)),
        Reply::Data(n) if structured => {
            if *n == 0 {
                return w.write_all(&wire::encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, c, 0));
            }
            let h = wire::encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, c, *n as u32 + 8);
            let off = req.offset.to_be_bytes();
            write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(&off), IoSlice::new(&buf[..*n])])
        }
        Reply::Data(n) => {
            let h = wire::encode_simple_reply(0, c);
            write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(&buf[..*n])])
        }
        Reply::Extents(id, descs) => {
            let mut p = Vec::with_capacity(4 + 8 * descs.len());
            p.extend_from_slice(&id.to_be_bytes());
            for (l, f) in descs {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            let h =
                wire::encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, c, p.len() as u32);
            write_all_vectored(w, &mut [IoSlice::new(&h), IoSlice::new(&p)])
        }
    }
}

fn write_all_vectored<W: Write + ?Sized>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read until `buf` is full or the stream ends; the count read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Payload bytes in flight on one connection, bounded.
pub struct Budget {
    free: Mutex<Free>,
    freed: Condvar,
    total: u64,
}

/// The bytes free, and how many threads wait for some.
struct Free {
    bytes: u64,
    waiters: usize,
}

impl Budget {
    pub(crate) fn new(total: u64) -> Self {
        Budget { free: Mutex::new(Free { bytes: total, waiters: 0 }), freed: Condvar::new(), total }
    }

    /// Take `n` bytes (at most the whole budget, so that one request always fits),
    /// waiting for others to give some back. Returns what was taken.
    fn take(&self, n: u64) -> u64 {
        let n = n.min(self.total);
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while free.bytes < n {
            free.waiters += 1;
            free = self.freed.wait(free).unwrap_or_else(|e| e.into_inner());
            free.waiters -= 1;
        }
        free.bytes -= n;
        n
    }

    fn give(&self, n: u64) {
        if n == 0 {
            return;
        }
        let waiters = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            free.bytes += n;
            free.waiters
        };
        // A wake-up is a system call: only when someone waits (the common case at
        // queue depths whose payloads fit the budget is that no one does).
        if waiters > 0 {
            self.freed.notify_all();
        }
    }
}

/// The two directions of a connection and a way to cut it.
pub(crate) struct Halves {
    pub reader: Box<dyn Read + Send>,
    pub writer: Box<dyn Write + Send>,
    /// Shut the connection down in both directions (hard disconnect).
    pub kill: Arc<dyn Fn() + Send + Sync>,
    /// Whether bytes from the client are waiting to be read (false when unknown).
    pub pending: Arc<dyn Fn() -> bool + Send + Sync>,
}

struct Shared {
    session: Session,
    reader: Mutex<BufReader<Box<dyn Read + Send>>>,
    writer: Mutex<Box<dyn Write + Send>>,
    closing: AtomicBool,
    kill: Arc<dyn Fn() + Send + Sync>,
    pending: Arc<dyn Fn() -> bool + Send + Sync>,
    budget: Budget,
    /// Request threads at most, running now, and waiting for the read side.
    max_threads: usize,
    running: AtomicUsize,
    waiting: AtomicUsize,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Request buffers not in use, most recently freed last.
    buffers: Mutex<Vec<Vec<u8>>>,
    end: Mutex<Option<End>>,
}

/// Requests of at most this many bytes may be served by the thread that read them
/// while it keeps the read side (see `worker`).
const INLINE_MAX: u32 = 128 << 10;

/// Buffers larger than this are not kept between requests.
const KEEP_BUFFER: usize = 4 << 20;

/// Serve the transmission phase until the client leaves; `threads` request threads
/// (at least 1); at most `budget` payload bytes in flight. Returns how it ended.
pub(crate) fn run(session: Session, halves: Halves, threads: usize, budget: u64) -> End {
    let shared = Arc::new(Shared {
        max_threads: threads.max(1),
        running: AtomicUsize::new(1),
        waiting: AtomicUsize::new(0),
        threads: Mutex::new(Vec::new()),
        session,
        reader: Mutex::new(BufReader::with_capacity(128 << 10, halves.reader)),
        writer: Mutex::new(halves.writer),
        closing: AtomicBool::new(false),
        kill: halves.kill,
        pending: halves.pending,
        budget: Budget::new(budget.max(1)),
        buffers: Mutex::new(Vec::new()),
        end: Mutex::new(None),
    });
    worker(&shared);
    // Threads started by other threads: wait for all, however many came late.
    loop {
        let started: Vec<_> = std::mem::take(&mut *shared.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if started.is_empty() {
            break;
        }
        for h in started {
            let _ = h.join();
        }
    }
    let end = shared.end.lock().unwrap_or_else(|e| e.into_inner()).take();
    end.unwrap_or(End::Clean)
}

/// A request thread more, when the one reading hands the read side over and nobody
/// waits for it: threads grow with the client's queue depth, up to the maximum, so a
/// shallow queue is served by few threads whose buffers stay in the caches.
fn grow(sh: &Arc<Shared>) {
    if sh.waiting.load(Ordering::Acquire) > 0 || sh.running.load(Ordering::Acquire) >= sh.max_threads {
        return;
    }
    sh.running.fetch_add(1, Ordering::AcqRel);
    let s2 = sh.clone();
    match std::thread::Builder::new().name("tern-nbd-req".into()).spawn(move || worker(&s2)) {
        Ok(h) => sh.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h),
        // Fewer threads only means less parallelism.
        Err(_) => {
            sh.running.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn worker(sh: &Arc<Shared>) {
    // The read side, while this thread holds it.
    let mut held = None;
    loop {
        // The buffer freed last is the one reused first: it is still in the caches.
        let mut buf = sh.buffers.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let mut r = match held.take() {
            Some(r) => r,
            None => {
                sh.waiting.fetch_add(1, Ordering::AcqRel);
                let r = sh.reader.lock().unwrap_or_else(|e| e.into_inner());
                sh.waiting.fetch_sub(1, Ordering::AcqRel);
                r
            }
        };
        if sh.closing.load(Ordering::Acquire) {
            return;
        }
        let job = match read_request(&sh.session, &mut *r, &mut buf, Some(&sh.budget)) {
            Ok(Some(job)) => job,
            Ok(None) => {
                sh.closing.store(true, Ordering::Release);
                return;
            }
            Err(end) => {
                sh.closing.store(true, Ordering::Release);
                let mut e = sh.end.lock().unwrap_or_else(|e| e.into_inner());
                e.get_or_insert(end);
                (sh.kill)();
                return;
            }
        };
        // Another request already waiting, or a large or slow one (a flush waits for
        // the disk) to serve: let a follower read on while this one is served.
        // Otherwise (queue depth 1, small requests) keep the read side and serve this
        // one first: a hand-off between threads would cost more than the request.
        let slow = job.req.length > INLINE_MAX || job.req.kind == CMD_FLUSH;
        // (One request thread: it keeps the read side; nothing to ask the socket.)
        if sh.max_threads > 1 && (slow || !r.buffer().is_empty() || (sh.pending)()) {
            drop(r);
            grow(sh);
        } else {
            held = Some(r);
        }
        let reply = execute(&sh.session, &job, &mut buf);
        let sent = {
            let mut w = sh.writer.lock().unwrap_or_else(|e| e.into_inner());
            write_reply(&sh.session, &mut **w, &job.req, &reply, &buf)
        };
        sh.budget.give(job.taken);
        if let Err(e) = sent {
            sh.closing.store(true, Ordering::Release);
            sh.end
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(End::Fatal(format!("sending a reply: {e}")));
            (sh.kill)();
            return;
        }
        if buf.len() <= KEEP_BUFFER {
            sh.buffers.lock().unwrap_or_else(|e| e.into_inner()).push(buf);
        }
    }
}
