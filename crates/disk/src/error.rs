//! Errors of the disk layer: what failed, on which file, and whether it is the
//! image's fault (corrupt), the caller's (invalid input), or the system's (I/O).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What kind of failure, so callers can decide what to do without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image's metadata is inconsistent, truncated, or fails a checksum.
    Corrupt,
    /// The image uses a feature tern does not implement.
    Unsupported,
    /// The request itself is wrong (out of range write, bad option).
    InvalidInput,
    /// A backing file or parent is missing, refused, or forms a loop.
    Backing,
    /// The file is not an image of the format its name says (`web.vhd` without a VHD
    /// footer, say), or not a disk at all (a raw file that is not whole sectors). Give
    /// the format explicitly if the content is right after all.
    NotADisk,
    /// The operating system refused an operation.
    Io,
}

/// An error from the disk layer. The message names the file and, where it helps,
/// the offset and the field at fault; it is written to be read by an operator.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    message: String,
    source: Option<io::Error>,
}

/// Result alias for the disk layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` about `path`.
    pub fn new(kind: ErrorKind, path: impl Into<Option<PathBuf>>, message: impl Into<String>) -> Self {
        Error { kind, path: path.into(), message: message.into(), source: None }
    }

    /// Corrupt or malformed image metadata.
    pub fn corrupt(path: &Path, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, path.to_path_buf(), message)
    }

    /// A feature tern does not implement.
    pub fn unsupported(path: &Path, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, path.to_path_buf(), message)
    }

    /// A wrong request by the caller.
    pub fn invalid(path: Option<&Path>, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, path.map(Path::to_path_buf), message)
    }

    /// A backing/parent problem.
    pub fn backing(path: &Path, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backing, path.to_path_buf(), message)
    }

    /// An I/O error during `operation` on `path`.
    pub fn io(path: &Path, operation: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            path: Some(path.to_path_buf()),
            message: operation.into(),
            source: Some(source),
        }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The message without the path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.path {
            write!(f, "{}: ", p.display())?;
        }
        f.write_str(&self.message)?;
        // The io::Error is part of the message here and deliberately not returned by
        // source(), so that anyhow's chain does not print it twice.
        if let Some(e) = &self.source {
            write!(f, ": {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}
