//! Errors of the chunk layer.

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object fails authentication, its address, or its format: tampered,
    /// truncated, or written with another key.
    Corrupt,
    /// The key file is missing, malformed, or not the store's key.
    Key,
    /// An argument is out of range.
    InvalidInput,
    /// The operating system refused an operation (key file I/O).
    Io,
}

/// An error from the chunk layer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}
