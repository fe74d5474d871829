//! A disk must not change while its base is read (docs/replication.md, "Snapshots").
//!
//! Where the filesystem supports it, the image is cloned with the `FICLONE` ioctl
//! (XFS, Btrfs, bcachefs, OCFS2...): an instant, copy-on-write copy that the VM's later
//! writes do not touch. Elsewhere the image is read in place, which is only consistent
//! when nothing writes it: every process's open files are checked through
//! `/proc/<pid>/fd` and the access mode in `/proc/<pid>/fdinfo/<fd>`, and an image
//! open for writing is refused unless the caller forces it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, ErrorKind, Result};

/// How a disk is being read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// A reflink copy under the data directory, deleted when the point is committed.
    Reflink,
    /// The image itself (nothing had it open for writing, or the user forced it). The
    /// default: no copy was made.
    #[default]
    InPlace,
    /// A running QEMU's frozen view of the disk, read over NBD (a `tern vm add --qmp`
    /// VM); taken down when the pass ends.
    QemuView,
    /// A running QEMU's frozen data, copied by QEMU into a local qcow2 file (push
    /// mode); deleted when the pass ends.
    QemuPush,
    /// The writes QEMU's write-blocking mirror sent to tern's journal sink, closed at
    /// a mark (the `journal` source); deleted once compiled.
    Journal,
}

impl SnapshotKind {
    /// Name stored in the state database.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotKind::Reflink => "reflink",
            SnapshotKind::InPlace => "in-place",
            SnapshotKind::QemuView => "qemu-view",
            SnapshotKind::QemuPush => "qemu-push",
            SnapshotKind::Journal => "journal",
        }
    }

    /// The kind a name from the state database stands for, if any.
    pub fn from_name(name: &str) -> Option<SnapshotKind> {
        [
            SnapshotKind::Reflink,
            SnapshotKind::InPlace,
            SnapshotKind::QemuView,
            SnapshotKind::QemuPush,
            SnapshotKind::Journal,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// A snapshot of one disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// What to read.
    pub path: PathBuf,
    /// How it was taken.
    pub kind: SnapshotKind,
    /// A warning to show the user (in-place read of an image open for writing).
    pub warning: Option<String>,
}

/// A process that has a file open for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// Process id.
    pub pid: u32,
    /// Its command name (`/proc/<pid>/comm`).
    pub command: String,
}

// `FICLONE` = _IOW(0x94, 9, int) (linux/fs.h).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Try to clone `src` into the new file `dst`. `Ok(false)` when the filesystem cannot
/// (the caller falls back); `dst` is removed in that case.
pub fn reflink(src: &Path, dst: &Path) -> Result<bool> {
    let s = File::open(src).map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
    // Owner-only: the copy holds the guest's data, which its image may keep from
    // other users; the data directory itself is made with the default umask.
    let d = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| Error::io(format!("creating snapshot {}", dst.display()), e))?;
    // SAFETY: both descriptors are open files owned by this function for the whole
    // call; FICLONE takes the source descriptor as its integer argument and touches no
    // memory of ours.
    let rc = unsafe { libc::ioctl(d.as_raw_fd(), FICLONE as _, s.as_raw_fd()) };
    if rc == 0 {
        d.sync_all().map_err(|e| Error::io(format!("syncing snapshot {}", dst.display()), e))?;
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    drop(d);
    let _ = std::fs::remove_file(dst);
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EPERM) => {
            Ok(false)
        }
        _ => Err(Error::io(format!("cloning {} to {}", src.display(), dst.display()), err)),
    }
}

/// Processes that have `path` open for writing (read-write or write-only).
/// Processes whose `/proc` entries cannot be read (other users, exited) are skipped.
pub fn writers_of(path: &Path) -> Result<Vec<Writer>> {
    let target =
        std::fs::canonicalize(path).map_err(|e| Error::io(format!("resolving {}", path.display()), e))?;
    let me = std::process::id();
    let mut out = Vec::new();
    let procs = std::fs::read_dir("/proc").map_err(|e| Error::io("listing /proc", e))?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            if link != target {
                continue;
            }
            let info =
                std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name())).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            // O_ACCMODE = 3; O_WRONLY = 1, O_RDWR = 2.
            if flags & 3 != 0 {
                let command = std::fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                out.push(Writer { pid, command });
                break;
            }
        }
    }
    Ok(out)
}

/// Take a snapshot of `src` for disk `disk`, cloning into `dir` when possible.
pub fn take(src: &Path, dir: &Path, name: &str, force: bool) -> Result<Snapshot> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let dst = dir.join(name);
    if dst.exists() {
        std::fs::remove_file(&dst).map_err(|e| Error::io(format!("removing stale {}", dst.display()), e))?;
    }
    let is_file = std::fs::metadata(src)
        .map_err(|e| Error::io(format!("disk {}", src.display()), e))?
        .file_type()
        .is_file();
    if is_file && reflink(src, &dst)? {
        return Ok(Snapshot { path: dst, kind: SnapshotKind::Reflink, warning: None });
    }
    let writers = writers_of(src)?;
    if writers.is_empty() {
        return Ok(Snapshot { path: src.to_path_buf(), kind: SnapshotKind::InPlace, warning: None });
    }
    let who = writers.iter().map(|w| format!("{} (pid {})", w.command, w.pid)).collect::<Vec<_>>().join(", ");
    if !force {
        return Err(Error::new(
            ErrorKind::Busy,
            format!(
                "{} is open for writing by {who} and its filesystem cannot make a reflink snapshot: \
                 stop the VM, or pass --force to read it anyway (the copy may then be inconsistent)",
                src.display()
            ),
        ));
    }
    Ok(Snapshot {
        path: src.to_path_buf(),
        kind: SnapshotKind::InPlace,
        warning: Some(format!(
            "{} is open for writing by {who}; reading it in place because of --force: the replica may not be consistent",
            src.display()
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_is_found_and_refused_unless_forced() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        std::fs::write(&img, vec![1u8; 4096]).unwrap();
        // A child process holding the file open read-write (this process is skipped).
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3<>'{}'; exec sleep 30", img.display()))
            .spawn()
            .unwrap();
        let mut found = Vec::new();
        for _ in 0..200 {
            found = writers_of(&img).unwrap();
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(found.iter().any(|w| w.pid == child.id()), "{found:?}");
        let snaps = d.path().join("snaps");
        match take(&img, &snaps, "x", false) {
            // A filesystem with reflinks makes the writer irrelevant.
            Ok(s) => assert_eq!(s.kind, SnapshotKind::Reflink),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Busy);
                assert!(e.to_string().contains("--force"));
                let s = take(&img, &snaps, "x", true).unwrap();
                assert_eq!(s.kind, SnapshotKind::InPlace);
                assert!(s.warning.is_some());
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(writers_of(&img).unwrap().is_empty());
    }
}
