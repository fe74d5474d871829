//! Store errors: one message naming the store and the object, and a kind callers can
//! match to decide whether to retry.
//!
//! The message carries the backend's cause once, as text; [`Error`] has no `source()`
//! so that error chains (`{:#}` in anyhow) never print the cause twice.

use std::fmt;

/// What kind of failure, so callers can decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// Network trouble, timeouts, throttling: a retry may help.
    Transient,
    /// The store has no space left.
    Full,
    /// Credentials refused.
    Auth,
    /// The URL or an argument is wrong.
    InvalidInput,
    /// Something else the backend reported.
    Other,
    /// The object already exists and may not be replaced (a manifest written twice).
    AlreadyExists,
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A store error naming the object and the store.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }

    /// An error about `object` in the store at `url`: `store URL: OBJECT: PROBLEM`.
    pub(crate) fn at(
        kind: ErrorKind,
        url: &str,
        object: &dyn fmt::Display,
        problem: impl fmt::Display,
    ) -> Error {
        Error::new(kind, format!("store {url}: {object}: {problem}"))
    }

    /// Translate a backend error about `object` met while doing `operation`.
    pub(crate) fn from_backend(
        err: object_store::Error,
        url: &str,
        object: &dyn fmt::Display,
        operation: &str,
    ) -> Error {
        let kind = classify(&err);
        let err = describe(&err);
        let problem = match kind {
            // The backend's text repeats the path we already name; nothing else in it helps.
            ErrorKind::NotFound => "not found".to_string(),
            ErrorKind::AlreadyExists => "already exists; objects are never replaced".to_string(),
            ErrorKind::Full => format!("{operation} failed: no space left in the store: {err}"),
            ErrorKind::Transient => format!(
                "{operation} failed after {} retries: {err} (a transient failure: running the command \
                 again later may succeed)",
                crate::backend::retry_config().max_retries
            ),
            ErrorKind::Auth => {
                format!("{operation} failed: access refused: {err} (retrying will not help: check the credentials)")
            }
            ErrorKind::InvalidInput | ErrorKind::Other => format!("{operation} failed: {err}"),
        };
        Error::at(kind, url, object, problem)
    }

    /// Translate a local I/O error (a local folder store's own file work).
    pub(crate) fn from_io(err: &std::io::Error, url: &str, what: &dyn fmt::Display) -> Error {
        let kind = io_kind(err).unwrap_or(ErrorKind::Other);
        match kind {
            ErrorKind::Full => Error::at(kind, url, what, format_args!("no space left in the store: {err}")),
            _ => Error::at(kind, url, what, err),
        }
    }
}

/// The backend error's text, with its root cause added when object_store's own text
/// leaves it out (it stops at "error sending request"; the root says "Connection
/// refused" or "operation timed out"). Each cause appears once.
fn describe(err: &object_store::Error) -> String {
    let text = err.to_string();
    let mut root: Option<&(dyn std::error::Error + 'static)> = None;
    let mut current = std::error::Error::source(err);
    for _ in 0..32 {
        let Some(e) = current else { break };
        root = Some(e);
        current = e.source();
    }
    match root.map(|r| r.to_string()) {
        Some(cause) if !cause.is_empty() && !text.contains(&cause) => format!("{text}: {cause}"),
        _ => text,
    }
}

/// Which [`ErrorKind`] an `object_store` error is.
///
/// object_store already maps HTTP 404/409/412/401/403 to its own variants. Everything
/// else arrives as `Generic` with a chain of sources: I/O errors from the local
/// backend, and for HTTP backends a retry error (a type private to object_store) whose
/// transport kind or HTTP status is only visible in its text.
fn classify(err: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match err {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::AlreadyExists { .. } | E::Precondition { .. } => ErrorKind::AlreadyExists,
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Auth,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::InvalidInput,
        E::Generic { source, .. } => classify_chain(source.as_ref()),
        _ => ErrorKind::Other,
    }
}

fn classify_chain(top: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(top);
    // Bounded: error chains are short, but a cyclic `source()` must not hang us.
    for _ in 0..32 {
        let Some(err) = current else { break };
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(kind) = io_kind(io) {
                return kind;
            }
        }
        if let Some(kind) = transport_kind(&format!("{err:?}")) {
            return kind;
        }
        if let Some(kind) = status_kind(&err.to_string()) {
            return kind;
        }
        current = err.source();
    }
    ErrorKind::Other
}

/// Transport failures. object_store's `HttpError` carries an `HttpErrorKind`, but it sits
/// behind a `#[error(transparent)]` variant of a private type, so it never appears in
/// the `source()` chain and cannot be downcast; its kind is visible only in the Debug
/// text of the enclosing error (`Http(HttpError { kind: Timeout, ... })`). The
/// conformance tests pin this for refused connections and stalled servers.
fn transport_kind(debug: &str) -> Option<ErrorKind> {
    const MARKER: &str = "HttpError { kind: ";
    let at = debug.find(MARKER)? + MARKER.len();
    let kind = debug[at..].split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    match kind {
        "Connect" | "Request" | "Timeout" | "Interrupted" => Some(ErrorKind::Transient),
        _ => None,
    }
}

/// Kinds from the HTTP status in object_store's retry error text
/// ("Server returned non-2xx status code: 503 Service Unavailable: ...").
fn status_kind(text: &str) -> Option<ErrorKind> {
    const MARKER: &str = "status code: ";
    let at = text.find(MARKER)? + MARKER.len();
    let code: u16 = text.get(at..at + 3)?.parse().ok()?;
    match code {
        // 507 Insufficient Storage; quota errors are refusals to store, not retryable.
        507 => Some(ErrorKind::Full),
        408 | 429 | 500..=599 => Some(ErrorKind::Transient),
        401 | 403 => Some(ErrorKind::Auth),
        404 => Some(ErrorKind::NotFound),
        400 => Some(ErrorKind::InvalidInput),
        _ if text.contains("QuotaExceeded") => Some(ErrorKind::Full),
        _ => None,
    }
}

/// ENOSPC (28) and EDQUOT (122 on Linux) are a full store whatever the platform calls
/// them; other kinds that say something useful are mapped, the rest is left to the caller.
fn io_kind(err: &std::io::Error) -> Option<ErrorKind> {
    use std::io::ErrorKind as K;
    if matches!(err.raw_os_error(), Some(28) | Some(122)) {
        return Some(ErrorKind::Full);
    }
    match err.kind() {
        K::StorageFull | K::QuotaExceeded => Some(ErrorKind::Full),
        K::NotFound => Some(ErrorKind::NotFound),
        K::PermissionDenied => Some(ErrorKind::Auth),
        K::AlreadyExists => Some(ErrorKind::AlreadyExists),
        K::TimedOut
        | K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::BrokenPipe
        | K::Interrupted => Some(ErrorKind::Transient),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_in_retry_text() {
        let t = "Error performing PUT http://x in 1s - Server returned non-2xx status code: 503 Service Unavailable: busy";
        assert_eq!(status_kind(t), Some(ErrorKind::Transient));
        let t = "Server returned non-2xx status code: 507 Insufficient Storage: ";
        assert_eq!(status_kind(t), Some(ErrorKind::Full));
        assert_eq!(status_kind("no status here"), None);
        assert_eq!(status_kind("status code: 5"), None);
    }

    #[test]
    fn transport_kinds_in_debug_text() {
        let d = "Http(HttpError { kind: Timeout, source: reqwest::Error { kind: Request } })";
        assert_eq!(transport_kind(d), Some(ErrorKind::Transient));
        let d = "Http(HttpError { kind: Decode, source: x })";
        assert_eq!(transport_kind(d), None);
        assert_eq!(transport_kind("Status { status: 404 }"), None);
    }

    #[test]
    fn enospc_is_full() {
        let e = std::io::Error::from_raw_os_error(28);
        assert_eq!(io_kind(&e), Some(ErrorKind::Full));
    }

    #[test]
    fn message_names_store_and_object() {
        let e = Error::at(ErrorKind::NotFound, "file:///x", &"chunk ab", "not found");
        assert_eq!(e.to_string(), "store file:///x: chunk ab: not found");
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
