//! Where tern keeps its state on this machine (docs/replication.md, "Data directory").

use std::path::{Path, PathBuf};

use crate::{Error, ErrorKind, Result};

/// The data directory and the files in it.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// `explicit` (from `--data-dir`), else `TERN_DATA_DIR`, else `$XDG_DATA_HOME/tern`,
    /// else `~/.local/share/tern`. Relative paths are made absolute against the
    /// current directory so that store URLs derived from them stay valid.
    pub fn resolve(explicit: Option<&Path>) -> Result<DataDir> {
        let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = if let Some(p) = explicit {
            p.to_path_buf()
        } else if let Some(p) = env("TERN_DATA_DIR") {
            p
        } else if let Some(p) = env("XDG_DATA_HOME") {
            p.join("tern")
        } else if let Some(home) = env("HOME") {
            home.join(".local/share/tern")
        } else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "no data directory: pass --data-dir or set TERN_DATA_DIR (HOME is not set)",
            ));
        };
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir().map_err(|e| Error::io("current directory", e))?.join(root)
        };
        Ok(DataDir { root })
    }

    /// Create the directory if needed.
    pub fn ensure(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| Error::io(format!("creating data directory {}", self.root.display()), e))
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `tern.db`, the state database.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("tern.db")
    }

    /// `key`, the default key file.
    pub fn key_path(&self) -> PathBuf {
        self.root.join("key")
    }

    /// `snapshots/`, reflink copies for replications in progress.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// `locks/`, one lock file per VM, held while a replication of it runs.
    pub fn locks_dir(&self) -> PathBuf {
        self.root.join("locks")
    }

    /// `file://<data-dir>/store`, the default store.
    pub fn default_store_url(&self) -> String {
        format!("file://{}", self.root.join("store").display())
    }
}

/// Longest Unix socket path tern uses as is (`sun_path` holds 108 bytes with its NUL;
/// the NBD server binds in a fresh folder beside the path first, which adds 12).
const MAX_SOCKET_PATH: usize = 90;

/// Where a Unix socket named `name` of the work folder `dir` lives: in `dir` when the
/// path fits a socket address, else in a private short folder for it,
/// `<temp>/tern-<uid>-<digest of dir>/` (created 0700; refused unless it is a folder
/// of this user's that no one else can enter).
pub fn socket_path(dir: &Path, name: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let p = dir.join(name);
    if p.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(p);
    }
    let digest = blake3::hash(dir.as_os_str().as_encoded_bytes()).to_hex();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let short = std::env::temp_dir().join(format!("tern-{uid}-{}", &digest[..16]));
    match std::fs::DirBuilder::new().mode(0o700).create(&short) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("creating the socket folder {}", short.display()), e)),
    }
    let m = std::fs::symlink_metadata(&short)
        .map_err(|e| Error::io(format!("socket folder {}", short.display()), e))?;
    if !m.is_dir() || m.uid() != uid || m.permissions().mode() & 0o077 != 0 {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "socket folder {} is not a private folder of this user (mode 0700): remove it",
                short.display()
            ),
        ));
    }
    let p = short.join(name);
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::invalid(format!(
            "no socket path short enough for {} (set TMPDIR to a short folder)",
            dir.join(name).display()
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_wins_and_relative_becomes_absolute() {
        let d = DataDir::resolve(Some(Path::new("rel/dir"))).unwrap();
        assert!(d.root().is_absolute());
        assert!(d.root().ends_with("rel/dir"));
        assert!(d.default_store_url().starts_with("file:///"));
        assert!(d.default_store_url().ends_with("rel/dir/store"));
    }
}
