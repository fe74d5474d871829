//! Paced chunk uploads (docs/replication.md, "Bandwidth"): a chunk reaches the store in
//! parts, each admitted by a [`Pacer`] just before it is sent, so that a bandwidth limit
//! holds at the size of a part rather than of a whole chunk. A default 4 MiB chunk is
//! 6.7% of a 10 s window at 50 Mbps and six windows' worth at 512 Kbps; the pacer sizes
//! parts to the limit in force.
//!
//! How each backend takes parts ([`crate::backend::Parts`]):
//! - local folder: parts are appended to a staging file `<chunk>#<n>` next to the chunk
//!   (the name object_store uses for its own staged writes, which its listings skip and
//!   which is no valid object name), synced, then hard-linked under the chunk's name
//!   and the folder synced: the link fails if the chunk exists, so the write is
//!   create-only. The staging file is removed afterwards, and on any error or
//!   cancellation. A crash leaves at most a hidden staging file, never a partial chunk.
//!   Unpaced writes of every object to a local folder take the same path in one part
//!   (`Store::put_local`), so an object the store reports written survives a power loss.
//! - Azure Blob and S3: the chunk is ONE create-only put (Put Blob / PutObject with
//!   `If-None-Match: *`; on an S3 without conditional puts, the check then put of
//!   [`crate::Store::put_chunk`]) whose request *body* is paced ([`body`]): tern's own
//!   HTTP client (`crate::http`) hands the body to the connection a part at a time, each
//!   part admitted just before the connection takes it, with `Content-Length` as
//!   object_store set it. The server makes the object visible only when the whole body
//!   has arrived, so a cancelled or crashed upload leaves nothing; on Azure the commit
//!   is conditional, so an upload never replaces a chunk that exists. A request that
//!   object_store retries (a dropped connection, a 5xx) sends its body again through the
//!   pacer and pays for it again, as bytes on the wire do.
//!
//! The pacer may block its thread. The local path calls it between file writes on the
//! caller's thread. The remote path asks for grants from the body, which the connection
//! polls on a runtime worker that must not block: [`body::paced`] answers those asks
//! on the task that awaits the put (the caller's thread, driving the runtime with
//! `block_on`), through a channel.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub(crate) mod body;

/// Admits the parts of a paced upload ([`crate::Store::put_chunk_paced`]).
///
/// Implemented for closures `Fn(u64) -> u64`; tern's bandwidth throttle implements it
/// in the engine.
pub trait Pacer: Sync {
    /// Wait until some of the `remaining` bytes (never 0) may be sent, and return how
    /// many: the size of the next part. Answers outside `1..=remaining` are clamped into
    /// it. May block the calling thread, which is the one polling
    /// [`crate::Store::put_chunk_paced`].
    fn grant(&self, remaining: u64) -> u64;
}

impl<F: Fn(u64) -> u64 + Sync> Pacer for F {
    fn grant(&self, remaining: u64) -> u64 {
        self(remaining)
    }
}

/// The size of the next part of `remaining` bytes, once `pacer` has admitted it:
/// clamped into `1..=remaining`, so that every loop over parts ends. 0 only when nothing
/// remains (and then the pacer is not asked).
pub(crate) fn grant(pacer: &dyn Pacer, remaining: u64) -> u64 {
    if remaining == 0 {
        return 0;
    }
    pacer.grant(remaining).clamp(1, remaining)
}

/// [`grant`] in `usize`, for slicing a buffer.
pub(crate) fn next_part(pacer: &dyn Pacer, remaining: usize) -> usize {
    // usize is at most 64 bits on every target tern builds for, and a grant is at most
    // `remaining`, so both conversions are exact.
    let wide = u64::try_from(remaining).unwrap_or(u64::MAX);
    usize::try_from(grant(pacer, wide)).unwrap_or(remaining)
}

/// Most staging names tried next to one chunk: each is taken by a concurrent upload of
/// the same chunk or left by a crash, so reaching this means something is badly wrong.
const MAX_STAGING_NAMES: u32 = 1024;

/// A chunk being written to a local folder: a hidden staging file that becomes the
/// chunk on [`Staged::commit`] and disappears when dropped uncommitted.
#[derive(Debug)]
pub(crate) struct Staged {
    file: File,
    path: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Staged {
    /// Create a new staging file next to `dest`, and `dest`'s folder if missing.
    pub(crate) fn create(dest: PathBuf) -> io::Result<Staged> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        for n in 1..=MAX_STAGING_NAMES {
            let path = staging_path(&dest, n);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok(Staged { file, path, dest, done: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "{MAX_STAGING_NAMES} staging files {}#<n> exist already",
            dest.display()
        )))
    }

    /// The staging file, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Append one part.
    pub(crate) fn append(&mut self, part: &[u8]) -> io::Result<()> {
        self.file.write_all(part)
    }

    /// Make the staged bytes the object, create-only: synced first, so that a crash
    /// after the link cannot leave an object whose bytes never reached the disk, and the
    /// folder synced after, so that the new name survives a power loss too. `Ok(false)`
    /// when the object existed already (and was kept).
    pub(crate) fn commit(mut self) -> io::Result<bool> {
        self.file.sync_data()?;
        let created = match std::fs::hard_link(&self.path, &self.dest) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        self.done = true;
        // The object is in place; a staging file left by a failed removal is hidden and
        // holds the same bytes.
        let _ = std::fs::remove_file(&self.path);
        if created {
            sync_parent(&self.dest)?;
        }
        Ok(created)
    }

    /// Make the staged bytes the object, replacing any (rename), durably like
    /// [`Staged::commit`]. Only for objects that may be rewritten (indexes of a point
    /// not yet committed).
    pub(crate) fn replace(mut self) -> io::Result<()> {
        self.file.sync_data()?;
        std::fs::rename(&self.path, &self.dest)?;
        self.done = true;
        sync_parent(&self.dest)
    }
}

/// fsync the folder holding `path`, which makes a name created or renamed in it durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned (error, cancellation): the partial chunk goes. Failing that, it
            // stays hidden under its staging name.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `<dest>#<n>`: object_store's LocalFileSystem neither lists nor serves such names.
fn staging_path(dest: &Path, n: u32) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(format!("#{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_clamped_to_what_remains() {
        assert_eq!(next_part(&|_| 0, 10), 1, "a pacer answering 0 still makes progress");
        assert_eq!(next_part(&|_| 99, 10), 10);
        assert_eq!(next_part(&|r: u64| r / 2, 10), 5);
        let never = |_: u64| -> u64 { panic!("not asked") };
        assert_eq!(next_part(&never, 0), 0);
        assert_eq!(grant(&never, 0), 0);
        assert_eq!(grant(&|_| u64::MAX, 7), 7);
    }

    #[test]
    fn staged_file_is_removed_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ab").join("chunk");
        let mut s = Staged::create(dest.clone()).unwrap();
        s.append(b"half").unwrap();
        let staging = s.path().to_path_buf();
        assert!(staging.exists() && !dest.exists());
        drop(s);
        assert!(!staging.exists(), "abandoned staging file removed");

        let mut s = Staged::create(dest.clone()).unwrap();
        s.append(b"whole").unwrap();
        assert!(s.commit().unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        let mut s = Staged::create(dest.clone()).unwrap();
        s.append(b"other").unwrap();
        assert!(!s.commit().unwrap(), "create-only");
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        let left: Vec<_> = std::fs::read_dir(dest.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the chunk remains: {left:?}");
    }

    #[test]
    fn replace_overwrites_and_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("idx");
        for content in [&b"first"[..], b"second, longer"] {
            let mut s = Staged::create(dest.clone()).unwrap();
            s.append(content).unwrap();
            s.replace().unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), content);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }
}
