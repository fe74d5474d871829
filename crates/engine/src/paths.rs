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
