//! One replication of a VM at a time, and a way to tell a running one from a stopped
//! one: a replication holds an exclusive lock (`flock`) on `locks/<vm-id>.lock` in the
//! data directory for as long as it runs. The kernel releases it when the process
//! ends, however it ends (kill -9 included), so `tern status` can say "interrupted"
//! the moment a run dies, and a second `tern replicate` of the same VM is refused
//! instead of racing the first over the same point.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{Engine, Error, ErrorKind, Result};

/// Held by a running replication; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

fn lock_path(engine: &Engine, vm_id: &str) -> PathBuf {
    engine.data_dir().locks_dir().join(format!("{vm_id}.lock"))
}

impl RunLock {
    /// Take the lock of VM `vm_id` (named `name` in messages). Waits up to a second
    /// (a `tern status` holds it for an instant while it looks), then refuses.
    pub fn acquire(engine: &Engine, vm_id: &str, name: &str) -> Result<RunLock> {
        Self::acquire_within(engine, vm_id, name, Duration::from_secs(1))
    }

    /// Take the lock of VM `vm_id`, waiting up to `wait` for a running replication
    /// (an agent's pass) to end.
    pub fn acquire_within(engine: &Engine, vm_id: &str, name: &str, wait: Duration) -> Result<RunLock> {
        let dir = engine.data_dir().locks_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let path = lock_path(engine, vm_id);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(RunLock { _file: file }),
                Err(TryLockError::WouldBlock) if start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        ErrorKind::Busy,
                        format!(
                            "VM {name} is being replicated by another tern process; wait for it or stop it"
                        ),
                    ))
                }
                Err(TryLockError::Error(e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e))
                }
            }
        }
    }
}

/// Whether a replication of VM `vm_id` is running now (in any process on this host
/// using this data directory).
pub fn replication_running(engine: &Engine, vm_id: &str) -> Result<bool> {
    lock_held(&lock_path(engine, vm_id))
}

/// Whether a process holds the exclusive `flock` on the lock file at `path`.
pub(crate) fn lock_held(path: &std::path::Path) -> Result<bool> {
    // Read-only is enough for flock, and works on a data directory this user cannot
    // write (status needs no more).
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    // A shared lock is refused only while someone holds the exclusive one.
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(TryLockError::WouldBlock) => Ok(true),
        Err(TryLockError::Error(e)) => Err(Error::io(format!("locking {}", path.display()), e)),
    }
}
