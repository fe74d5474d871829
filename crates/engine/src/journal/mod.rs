//! The `journal` tracking source (docs/journal.md): QEMU's write-blocking mirror sends
//! every guest write to tern before the guest's write completes; tern appends it to
//! the disk's journal segment, and every pass closes the segments of all the VM's
//! disks at one mark, which is the recovery point's instant.
//!
//! - [`Journal`]: what runs between passes, in the agent: the NBD server the mirrors
//!   write to, one sink per disk ([`sink::DiskSink`]), the open segments. One lock
//!   covers every disk's appends: a mark taken under it is one instant of the VM.
//! - [`source::JournalSource`]: the tracking source of one pass, built on the `qemu`
//!   source (whose persistent dirty bitmaps run beside the journal as its fallback).
//! - [`segment`]: the segment file format and the compiler to change logs.

pub mod segment;
pub mod sink;
pub mod source;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use segment::{SegmentHeader, SegmentWriter};

use crate::{Error, ErrorKind, Result, VmDef};

/// Request threads per sink connection.
const THREADS_PER_SINK: usize = 1;

/// The running journals of this process, by VM id: kept by the agent across passes.
#[derive(Default)]
pub struct Journals {
    inner: Mutex<HashMap<String, Arc<Journal>>>,
}

impl std::fmt::Debug for Journals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.inner.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("Journals").field("running", &n).finish()
    }
}

impl Journals {
    /// A new, empty registry.
    pub fn new() -> Arc<Journals> {
        Arc::new(Journals::default())
    }

    /// VM `vm`'s journal, started (its sink listening in `dir`) when not running.
    pub fn get_or_start(&self, vm: &VmDef, dir: &Path, sizes: &[u64], budget: u64) -> Result<Arc<Journal>> {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = m.get(&vm.id) {
            if j.sizes == sizes {
                j.set_budget(budget);
                return Ok(j.clone());
            }
        }
        m.remove(&vm.id);
        let j = Arc::new(Journal::start(vm, dir, sizes, budget)?);
        m.insert(vm.id.clone(), j.clone());
        Ok(j)
    }

    /// Stop VM `vm_id`'s journal, if one runs (its mirrors then fail on their next
    /// write, which the guest never sees; a pass takes them down).
    pub fn stop(&self, vm_id: &str) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).remove(vm_id);
    }

    /// The VM ids with a running journal.
    pub fn running(&self) -> Vec<String> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

/// State every sink of a VM shares.
pub(crate) struct Shared {
    /// The open segments, one per disk, and the VM-wide append sequence: a mark takes
    /// this lock, so every write before it is in the closed segments, none after.
    pub(crate) sinks: Mutex<Sinks>,
    /// Why the journal stopped being complete (a write refused, a client gone), if it
    /// did: the next pass resyncs from the bitmap instead of trusting the segments.
    pub(crate) broken: Mutex<Option<String>>,
    /// Most bytes an open segment of one disk may hold.
    pub(crate) budget: std::sync::atomic::AtomicU64,
}

pub(crate) struct Sinks {
    pub(crate) writers: Vec<SegmentWriter>,
    pub(crate) seq: u64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Sinks> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Record why the journal is incomplete (the first reason is kept).
    pub(crate) fn set_broken(&self, why: String) {
        let mut b = self.broken.lock().unwrap_or_else(|e| e.into_inner());
        if b.is_none() {
            *b = Some(why);
        }
    }
}

/// Between-pass state of a journal.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The cut whose mark opened the current segments, once its point is committed:
    /// the next pass can then ship the segments alone.
    pub(crate) base: Option<u64>,
    /// Counts segments opened by this process (their file names).
    pub(crate) opened: u64,
    /// Whether this process started the mirrors (they may have failed since).
    pub(crate) mirroring: bool,
}

/// The sinks of one run of the mirrors, and the server they are exported on: each
/// (re)start of the mirrors gets a generation of its own, so that the end of an old
/// mirror's connection never marks the new journal incomplete.
struct Generation {
    shared: Arc<Shared>,
    stop: tern_nbd::StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One VM's journal: its sinks, served over NBD on a Unix socket in the VM's work
/// folder, from [`Journal::start`] until dropped.
pub struct Journal {
    vm_id: [u8; 16],
    pub(crate) sizes: Vec<u64>,
    dir: PathBuf,
    socket: PathBuf,
    budget: std::sync::atomic::AtomicU64,
    generation: Mutex<Option<Generation>>,
    pub(crate) state: Mutex<State>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Journal {
    /// Start VM `vm`'s journal: remove what an earlier tern left in `dir/journal`,
    /// open a segment per disk, and serve a sink per disk (`disk-<i>`) on
    /// `dir/journal.sock`.
    pub fn start(vm: &VmDef, dir: &Path, sizes: &[u64], budget: u64) -> Result<Journal> {
        let jdir = dir.join("journal");
        // What a killed tern journaled is not trusted: QEMU's bitmaps hold it.
        let _ = std::fs::remove_dir_all(&jdir);
        for i in 0..sizes.len() {
            let d = jdir.join(format!("disk-{i}"));
            std::fs::create_dir_all(&d).map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
        }
        let j = Journal {
            vm_id: crate::cycle::vm_id_bytes(&vm.id),
            sizes: sizes.to_vec(),
            dir: jdir,
            socket: crate::paths::socket_path(dir, "journal.sock")?,
            budget: std::sync::atomic::AtomicU64::new(budget),
            generation: Mutex::new(None),
            state: Mutex::new(State::default()),
        };
        j.reset()?;
        Ok(j)
    }

    fn shared(&self) -> Result<Arc<Shared>> {
        let g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref()
            .map(|g| g.shared.clone())
            .ok_or_else(|| Error::new(ErrorKind::Io, "the journal's sink is not running"))
    }

    /// Start over: a new generation of sinks with fresh empty segments, the journal
    /// complete again (the mirrors are about to be started anew). The old sinks stop
    /// first, and their segments are removed.
    pub(crate) fn reset(&self) -> Result<()> {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = g.take() {
            let files: Vec<PathBuf> =
                old.shared.lock().writers.iter().map(|w| w.path().to_path_buf()).collect();
            drop(old);
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
        let mut st = self.state();
        st.base = None;
        let writers = open_segments(&self.vm_id, &self.dir, &self.sizes, &mut st)?;
        let shared = Arc::new(Shared {
            sinks: Mutex::new(Sinks { writers, seq: 0 }),
            broken: Mutex::new(None),
            budget: std::sync::atomic::AtomicU64::new(self.budget.load(std::sync::atomic::Ordering::Relaxed)),
        });
        let exports: Vec<(String, Arc<dyn tern_nbd::Export>)> = self
            .sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let e: Arc<dyn tern_nbd::Export> = Arc::new(sink::DiskSink::new(shared.clone(), i, size));
                (format!("disk-{i}"), e)
            })
            .collect();
        let _ = std::fs::remove_file(&self.socket);
        let mut options = tern_nbd::ServerOptions::new(exports);
        // One connection per disk, from QEMU; a few more for tools that look.
        options.max_connections = self.sizes.len() + 4;
        // A sink's request is a local append of microseconds: one thread per
        // connection answers them in turn with no hand-off between threads, which
        // on a busy host cost the guest more than the append itself (measured:
        // docs/BENCHMARKS.md, "The journal").
        options.threads_per_connection = THREADS_PER_SINK;
        let server = tern_nbd::Server::bind(&tern_nbd::Listen::Unix(self.socket.clone()), options)
            .map_err(|e| Error::new(ErrorKind::Io, format!("starting the journal's sink: {e}")))?;
        let stop = server.stop_handle();
        let thread = std::thread::Builder::new()
            .name("tern-journal".into())
            .spawn(move || {
                // The sinks answer the guest's writes: not at the agent's low priority.
                crate::agent::guest_path_priority();
                let _ = server.serve();
            })
            .map_err(|e| Error::io("starting the journal's thread", e))?;
        *g = Some(Generation { shared, stop, thread: Some(thread) });
        Ok(())
    }

    /// The budget of one disk's open segment (and of a resync's reads).
    pub(crate) fn budget(&self) -> u64 {
        self.budget.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Set the budget of an open segment (now, and for later generations).
    pub(crate) fn set_budget(&self, budget: u64) {
        self.budget.store(budget, std::sync::atomic::Ordering::Relaxed);
        if let Ok(s) = self.shared() {
            s.budget.store(budget, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The socket the sinks listen on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Why the journal is incomplete, if it is.
    pub fn broken(&self) -> Option<String> {
        match self.shared() {
            Ok(s) => s.broken(),
            Err(e) => Some(e.to_string()),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mark of cut `seq`: close every disk's segment at one instant (under the
    /// sinks' lock) and open the next. Returns the closed segments, fsynced, renamed
    /// `<seq>.tjnl`, and the mark's instant. Fails, closing nothing, when the journal
    /// is incomplete. `stagger` (TEST ONLY) closes the disks one at a time with that
    /// pause between: a mark that is NOT one instant, for the test that shows it is
    /// caught.
    pub(crate) fn mark(
        &self,
        seq: u64,
        stagger: Option<std::time::Duration>,
    ) -> Result<(Vec<PathBuf>, SystemTime)> {
        let shared = self.shared()?;
        let mut st = self.state();
        let fresh = open_segments(&self.vm_id, &self.dir, &self.sizes, &mut st)?;
        let (old, instant) = {
            let mut s = shared.lock();
            if let Some(why) = shared.broken() {
                drop(s);
                for w in fresh {
                    let _ = std::fs::remove_file(w.path());
                }
                return Err(Error::new(ErrorKind::Io, format!("the journal is incomplete: {why}")));
            }
            let instant = SystemTime::now();
            match stagger {
                None => (std::mem::replace(&mut s.writers, fresh), instant),
                Some(pause) => {
                    drop(s);
                    let mut old = Vec::new();
                    for (i, w) in fresh.into_iter().enumerate() {
                        if i > 0 {
                            std::thread::sleep(pause);
                        }
                        old.push(std::mem::replace(&mut shared.lock().writers[i], w));
                    }
                    (old, instant)
                }
            }
        };
        let mut closed = Vec::new();
        for (i, w) in old.into_iter().enumerate() {
            w.sync()?;
            let to = self.dir.join(format!("disk-{i}")).join(format!("{seq:020}.tjnl"));
            std::fs::rename(w.path(), &to)
                .map_err(|e| Error::io(format!("renaming {} to {}", w.path().display(), to.display()), e))?;
            closed.push(to);
        }
        Ok((closed, instant))
    }

    /// A new segment file of disk `disk` for a resync's reads (`base-<seq>.tjnl`).
    pub(crate) fn base_segment(&self, disk: usize, seq: u64) -> Result<SegmentWriter> {
        let path = self.dir.join(format!("disk-{disk}")).join(format!("base-{seq:020}.tjnl"));
        SegmentWriter::create(
            &path,
            SegmentHeader {
                vm_id: self.vm_id,
                disk: disk as u32,
                virtual_size: self.sizes[disk],
                opened_ms: now_ms(),
            },
        )
    }
}

fn open_segments(vm_id: &[u8; 16], dir: &Path, sizes: &[u64], st: &mut State) -> Result<Vec<SegmentWriter>> {
    st.opened += 1;
    sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let path = dir.join(format!("disk-{i}")).join(format!("open-{:08}.tjnl", st.opened));
            SegmentWriter::create(
                &path,
                SegmentHeader { vm_id: *vm_id, disk: i as u32, virtual_size: size, opened_ms: now_ms() },
            )
        })
        .collect()
}
