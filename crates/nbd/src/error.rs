//! Errors of the server itself (binding, configuration, TLS setup). What goes wrong
//! with one client ends that client's connection and is reported to the server's log
//! callback; it never becomes an error of the server.

/// What kind of failure, for callers that react differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A socket or file operation failed.
    Io,
    /// The configuration is not acceptable (TCP beyond loopback without TLS, a bad
    /// export name, block sizes that break the protocol's rules...).
    Invalid,
    /// TLS keys or certificates could not be loaded.
    Tls,
}

/// An error of [`crate::Server`] setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("TLS: {0}")]
    Tls(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Tls(_) => ErrorKind::Tls,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
