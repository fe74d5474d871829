//! Errors of the engine: what failed, on which VM / disk / chunk, and a kind callers
//! can match to decide what to tell the user or whether a retry can help.

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A VM, point or object that was asked for does not exist.
    NotFound,
    /// A flag, name or setting is wrong; nothing was done.
    InvalidInput,
    /// Stored data fails verification: tampered, truncated, missing or inconsistent.
    Corrupt,
    /// The key file is missing, malformed, or not the store's key.
    Key,
    /// The store refused or failed an operation (network, space, credentials).
    Store,
    /// A source image is in use by another process, so a consistent read is not possible.
    Busy,
    /// The operating system refused an operation (files, the state database).
    Io,
}

/// An engine error. The message is complete and meant for an operator: it names the
/// VM, disk, chunk, file or setting at fault, once.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The same error with `context` prepended (`context: message`).
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Error { kind: self.kind, message: format!("{context}: {}", self.message) }
    }

    /// The same error with `suffix` appended (a hint on what to do).
    pub(crate) fn with_suffix(self, suffix: &str) -> Self {
        Error { kind: self.kind, message: format!("{}{suffix}", self.message) }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    pub(crate) fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    pub(crate) fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{what}: {e}"))
    }
}

impl From<tern_disk::Error> for Error {
    fn from(e: tern_disk::Error) -> Self {
        let kind = match e.kind() {
            tern_disk::ErrorKind::Io => ErrorKind::Io,
            tern_disk::ErrorKind::InvalidInput
            | tern_disk::ErrorKind::Unsupported
            | tern_disk::ErrorKind::NotADisk => ErrorKind::InvalidInput,
            _ => ErrorKind::Corrupt,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<tern_chunk::Error> for Error {
    fn from(e: tern_chunk::Error) -> Self {
        let kind = match e.kind() {
            tern_chunk::ErrorKind::Corrupt => ErrorKind::Corrupt,
            tern_chunk::ErrorKind::Key => ErrorKind::Key,
            tern_chunk::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            tern_chunk::ErrorKind::Io => ErrorKind::Io,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<tern_store::Error> for Error {
    fn from(e: tern_store::Error) -> Self {
        let kind = match e.kind() {
            tern_store::ErrorKind::NotFound => ErrorKind::NotFound,
            tern_store::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ => ErrorKind::Store,
        };
        Error::new(kind, e.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::new(ErrorKind::Io, format!("state database: {e}"))
    }
}
