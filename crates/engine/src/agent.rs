//! `tern agent`: the long-running data mover of this host. Every VM with replication
//! enabled (`tern replicate NAME --frequency ...` enables it) and not paused is
//! replicated at its frequency: the initial replication first, then one pass (a delta
//! cycle for a VM in QEMU) whenever its frequency has passed since the last pass
//! started. A pass that fails is retried after `min(frequency, 30 s)`; its error is
//! in `tern status`. Passes run one at a time, the VM whose turn is oldest first.
//!
//! One agent per data directory: it holds `locks/agent.lock` while it runs, which is
//! also how `tern replicate` and `tern status` know an agent is there. It stops at the
//! next chunk or piece when told to ([`AgentOptions::stop`], set by SIGTERM and
//! SIGINT), and everything it was doing resumes or is retried when it starts again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::throttle::Throttle;
use crate::{Engine, Error, ErrorKind, ReplicateEvent, ReplicateOptions, ReplicateReport, Result};

/// The agent's frequency when none is given: every 5 minutes.
pub const DEFAULT_FREQUENCY: Duration = Duration::from_secs(300);
/// The frequency of a `--tracking journal` VM that sets none: a point every 5 s.
pub const JOURNAL_FREQUENCY: Duration = Duration::from_secs(5);
/// Shortest frequency accepted.
pub const MIN_FREQUENCY: Duration = Duration::from_secs(1);
/// Longest frequency accepted: a week.
pub const MAX_FREQUENCY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest wait before a failed pass is retried.
const RETRY: Duration = Duration::from_secs(30);

/// Check a frequency.
pub fn check_frequency(f: Duration) -> Result<Duration> {
    if (MIN_FREQUENCY..=MAX_FREQUENCY).contains(&f) {
        Ok(f)
    } else {
        Err(Error::invalid(format!("frequency {f:?} is out of range: use 1s to 7d (e.g. 30s, 5m, 15m)")))
    }
}

/// Options of the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Frequency of VMs that set none.
    pub frequency: Duration,
    /// Options of each pass (workers, compression).
    pub replicate: ReplicateOptions,
    /// Set to stop: the agent returns after the current chunk or piece.
    pub stop: &'static AtomicBool,
    /// Tests: return after this many passes (successful or not).
    #[doc(hidden)]
    pub max_passes: Option<u64>,
    /// How often the agent applies retention and collects garbage when a VM it
    /// replicates has a retention setting. Default [`DEFAULT_GC_INTERVAL`].
    pub gc_interval: Duration,
}

/// Default time between the agent's garbage collections.
pub const DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(3600);

/// What the agent tells its caller.
#[derive(Debug)]
pub enum AgentEvent<'a> {
    /// The agent holds its lock and starts working.
    Started,
    /// A pass of VM `vm` starts.
    PassStart {
        /// The VM.
        vm: &'a str,
    },
    /// A pass committed a point.
    PassDone {
        /// The VM.
        vm: &'a str,
        /// What it committed.
        report: &'a ReplicateReport,
    },
    /// A pass failed; it is retried after `retry`.
    PassFailed {
        /// The VM.
        vm: &'a str,
        /// Why.
        error: &'a Error,
        /// When it is tried again.
        retry: Duration,
    },
    /// Something inside a pass.
    Replicate(ReplicateEvent),
    /// A garbage collection ran.
    Gc(Result<&'a crate::gc::GcReport, &'a Error>),
    /// A compaction beside the cycles ended: VM `vm`'s point and the disks compacted.
    Compacted {
        /// The VM.
        vm: &'a str,
        /// The point and disks, or why it failed (the next pass's chain goes on).
        result: Result<(&'a str, &'a [u32]), &'a Error>,
    },
}

/// Held while an agent runs.
#[derive(Debug)]
pub struct AgentLock {
    _file: File,
}

fn agent_lock_path(engine: &Engine) -> std::path::PathBuf {
    engine.data_dir().locks_dir().join("agent.lock")
}

impl AgentLock {
    /// Take the agent lock, or say that an agent already runs.
    pub fn acquire(engine: &Engine) -> Result<AgentLock> {
        let dir = engine.data_dir().locks_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = agent_lock_path(engine);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match file.try_lock() {
            Ok(()) => Ok(AgentLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(Error::new(
                ErrorKind::Busy,
                "an agent already runs for this data directory (one per host)",
            )),
            Err(TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
        }
    }
}

/// Whether an agent runs for this data directory now.
pub fn agent_running(engine: &Engine) -> Result<bool> {
    crate::lock::lock_held(&agent_lock_path(engine))
}

/// The frequency VM settings ask for, or `default`.
pub fn frequency_of(s: &crate::VmSettings, default: Duration) -> Duration {
    s.frequency_ms.map_or(default, Duration::from_millis)
}

/// Run the agent until `opts.stop` is set. Returns the number of passes run.
pub fn run_agent(
    engine: &Engine,
    opts: &AgentOptions,
    throttle: &Throttle,
    observer: &(dyn Fn(AgentEvent<'_>) + Sync),
) -> Result<u64> {
    check_frequency(opts.frequency)?;
    let _lock = AgentLock::acquire(engine)?;
    observer(AgentEvent::Started);
    let mut replicate = opts.replicate.clone();
    replicate.cancel = Some(opts.stop);
    // The journals of `--tracking journal` VMs run between passes, in this process.
    let journals = crate::journal::Journals::new();
    replicate.journals = Some(journals.clone());
    // Compaction runs beside the cycles, one at a time, in a thread of its own.
    replicate.background_compaction = true;
    let replicate = replicate;
    std::thread::scope(|scope| agent_loop(engine, opts, &replicate, &journals, throttle, observer, scope))
}

/// What a compaction beside the cycles ends with: the point and the disks compacted.
type Compacted = Result<Option<(String, Vec<u32>)>>;
/// A compaction running beside the cycles: its VM and thread.
type Compaction<'scope> = (String, std::thread::ScopedJoinHandle<'scope, Compacted>);

fn agent_loop<'scope, 'env>(
    engine: &'env Engine,
    opts: &'env AgentOptions,
    replicate: &'env ReplicateOptions,
    journals: &crate::journal::Journals,
    throttle: &'env Throttle,
    observer: &(dyn Fn(AgentEvent<'_>) + Sync),
    scope: &'scope std::thread::Scope<'scope, 'env>,
) -> Result<u64> {
    let mut compaction: Option<Compaction<'scope>> = None;
    // When each VM is due next; a VM not in it is due now (also after a restart: what
    // an earlier agent was doing resumes at once).
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut passes = 0u64;
    let mut last_gc = Instant::now();
    while !opts.stop.load(Ordering::Relaxed) {
        // A collection waits for every writer's lease: not while a compaction runs
        // beside the cycles (this loop, and so the cycles, would wait with it).
        let compacting = compaction.as_ref().is_some_and(|(_, t)| !t.is_finished());
        if last_gc.elapsed() >= opts.gc_interval && !compacting {
            last_gc = Instant::now();
            let retention = engine.db().vm_list()?.iter().try_fold(false, |any, vm| {
                let s = engine.db().settings(&vm.id)?;
                Ok::<bool, Error>(
                    any || (s.enabled && (s.retention_age_s.is_some() || s.retention_count.is_some())),
                )
            })?;
            if retention {
                match crate::gc::gc(engine, &crate::gc::GcOptions::default()) {
                    Ok(r) => observer(AgentEvent::Gc(Ok(&r))),
                    Err(e) => observer(AgentEvent::Gc(Err(&e))),
                }
            }
        }
        if opts.max_passes.is_some_and(|m| passes >= m) {
            break;
        }
        let now = Instant::now();
        let mut next: Option<(Instant, crate::VmDef, Duration)> = None;
        let vms = engine.db().vm_list()?;
        for id in journals.running() {
            // A journal of a VM removed, paused, disabled or switched to bitmaps stops
            // (its mirror fails on the next write; the guest never sees it).
            let keep = vms.iter().find(|v| v.id == id).is_some_and(|v| {
                v.qemu.as_ref().is_some_and(|q| q.journal)
                    && engine.db().settings(&v.id).is_ok_and(|s| s.enabled && !s.paused)
            });
            if !keep {
                journals.stop(&id);
            }
        }
        for vm in vms {
            let s = engine.db().settings(&vm.id)?;
            if !s.enabled || s.paused {
                due.remove(&vm.id);
                continue;
            }
            let at = *due.get(&vm.id).unwrap_or(&now);
            if next.as_ref().is_none_or(|(t, _, _)| at < *t) {
                let journal = vm.qemu.as_ref().is_some_and(|q| q.journal);
                let f = frequency_of(&s, if journal { JOURNAL_FREQUENCY } else { opts.frequency });
                next = Some((at, vm, f));
            }
        }
        let Some((at, vm, freq)) = next else {
            sleep_until(opts.stop, now + Duration::from_secs(1));
            continue;
        };
        if at > now {
            // Wake at least every second: settings may change (a new VM, a pause).
            sleep_until(opts.stop, at.min(now + Duration::from_secs(1)));
            continue;
        }
        let started = Instant::now();
        observer(AgentEvent::PassStart { vm: &vm.name });
        let res = crate::replicate(engine, &vm.name, replicate, throttle, &|ev| {
            observer(AgentEvent::Replicate(ev))
        });
        passes += 1;
        match res {
            Ok(report) => {
                due.insert(vm.id.clone(), started + freq);
                observer(AgentEvent::PassDone { vm: &vm.name, report: &report });
                if compaction.as_ref().is_none_or(|(_, t)| t.is_finished()) {
                    if let Some((name, t)) = compaction.take() {
                        report_compaction(&name, t, observer);
                    }
                    let vm = vm.clone();
                    let name = vm.name.clone();
                    let t = scope.spawn(move || crate::compact_beside(engine, &vm, replicate, throttle));
                    compaction = Some((name, t));
                }
            }
            Err(e) => {
                if opts.stop.load(Ordering::Relaxed) {
                    break;
                }
                let retry = freq.min(RETRY);
                due.insert(vm.id.clone(), Instant::now() + retry);
                observer(AgentEvent::PassFailed { vm: &vm.name, error: &e, retry });
            }
        }
    }
    // A compaction stops at its next chunk once told to (the stop flag); its record is
    // kept only when it finished.
    if let Some((name, t)) = compaction.take() {
        report_compaction(&name, t, observer);
    }
    Ok(passes)
}

fn report_compaction(
    vm: &str,
    t: std::thread::ScopedJoinHandle<'_, Compacted>,
    observer: &(dyn Fn(AgentEvent<'_>) + Sync),
) {
    match t.join() {
        Ok(Ok(Some((point, disks)))) if !disks.is_empty() => {
            observer(AgentEvent::Compacted { vm, result: Ok((&point, &disks)) })
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => observer(AgentEvent::Compacted { vm, result: Err(&e) }),
        Err(_) => {
            let e = Error::new(ErrorKind::Io, "the compaction thread panicked");
            observer(AgentEvent::Compacted { vm, result: Err(&e) })
        }
    }
}

fn sleep_until(stop: &AtomicBool, until: Instant) {
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// A flag SIGTERM and SIGINT set, for [`AgentOptions::stop`] and
/// [`ReplicateOptions::cancel`]. The first signal asks for a clean stop.
pub fn stop_on_signals() -> &'static AtomicBool {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    &STOP
}

/// Undo [`lower_priority`] for the calling thread and the threads it starts (Linux
/// priorities are per thread): the journal's sinks are on the guest's write path, and
/// must not wait behind the guests' own CPU and disk use. Best effort: lowering a
/// nice value needs privilege (an agent run as root, as for QMP, has it).
pub(crate) fn guest_path_priority() {
    // SAFETY: plain system calls on this thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 0);
        // ioprio_set(IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 4)).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 4);
    }
}

/// Lower this process's CPU priority to `nice` (0 to 19) and its I/O priority to the
/// best-effort class's lowest level, so that the guests on this host come first when
/// the agent competes with them for CPU and disk. Best effort: a failure is ignored.
pub fn lower_priority(nice: i32) {
    // SAFETY: plain system calls on this process.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice.clamp(0, 19));
        // ioprio_set(IOPRIO_WHO_PROCESS, 0, IOPRIO_PRIO_VALUE(IOPRIO_CLASS_BE, 7)).
        libc::syscall(libc::SYS_ioprio_set, 1, 0, (2 << 13) | 7);
    }
}
