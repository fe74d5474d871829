//! A QMP client: one connection of tern's own to a running QEMU or
//! qemu-storage-daemon, shared with whatever else controls that process.
//!
//! The protocol (QEMU's `docs/interop/qmp-spec.rst`): the server greets with
//! `{"QMP": {"version": ..., "capabilities": [...]}}`; the client leaves negotiation
//! mode with `qmp_capabilities`; then every command `{"execute", "arguments", "id"}`
//! gets one reply with the same `id`, `{"return": ...}` or `{"error": {"class",
//! "desc"}}`, and asynchronous `{"event": ...}` messages may arrive between them.
//! Messages are JSON objects, one per line in practice; this client reads them as a
//! stream of JSON values, so it does not depend on the line breaks.
//!
//! A QMP socket serves one client at a time (QEMU accepts a second connection but
//! greets it only when the first leaves): tern needs a socket of its own, and a
//! greeting that does not come says so.
//!
//! Blocking, one command at a time, each with a deadline: a QEMU that stops answering
//! is an error naming the command, never a hang. Events received while waiting are
//! kept (bounded) for [`Qmp::take_events`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Largest message accepted from QEMU. Replies to `query-qmp-schema` are the largest
/// QEMU sends (about 200 KiB in QEMU 10); anything far beyond is not QMP.
const MAX_MESSAGE: usize = 16 << 20;
/// Events kept while nobody takes them; older ones are dropped first.
const MAX_EVENTS: usize = 1024;
/// Default deadline of one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking to QEMU. Every message names the socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened, read or written.
    #[error("QMP socket {path}: {what}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The peer sent something that is not QMP (malformed JSON, no greeting, a reply
    /// of the wrong shape, a message too large).
    #[error("QMP socket {path}: {message}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// QEMU refused a command.
    #[error("QMP socket {path}: {command} failed: {desc} ({class})")]
    Command {
        /// The socket.
        path: PathBuf,
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// QEMU closed the connection (it exited, or was killed).
    #[error("QMP socket {path}: QEMU closed the connection{during}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// ` while waiting for the reply to X`, or empty.
        during: String,
    },
    /// No reply before the deadline.
    #[error("QMP socket {path}: no reply to {command} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command.
        command: String,
        /// The deadline.
        timeout: Duration,
    },
}

impl QmpError {
    /// QEMU's error class when QEMU refused the command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// QEMU's version as its greeting reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QmpVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for QmpVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One QMP connection in command mode.
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    version: QmpVersion,
    package: String,
    next_id: u64,
    timeout: Duration,
    events: VecDeque<Value>,
    /// Bytes read but not yet parsed into a message.
    pending: Vec<u8>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp").field("path", &self.path).field("version", &self.version).finish()
    }
}

impl Qmp {
    /// Connect to the QMP socket at `path`, read the greeting and negotiate
    /// capabilities; waits at most `timeout` for each step.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let io = |what: &str| {
            let path = path.to_path_buf();
            let what = what.to_string();
            move |source| QmpError::Io { path, what, source }
        };
        let stream = UnixStream::connect(path).map_err(io("connect"))?;
        let writer = stream.try_clone().map_err(io("clone the socket"))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            version: QmpVersion { major: 0, minor: 0, micro: 0 },
            package: String::new(),
            next_id: 1,
            timeout,
            events: VecDeque::new(),
            pending: Vec::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message(deadline, "the greeting").map_err(|e| match e {
            // A QMP socket serves one client at a time: the next one is accepted but
            // greeted only when the first leaves.
            QmpError::Timeout { path, .. } => QmpError::Protocol {
                message: format!(
                    "no QMP greeting within {timeout:?}: another client probably holds this socket \
                     (a QMP socket serves one client at a time; give QEMU a QMP socket of tern's \
                     own, e.g. a second -qmp unix:PATH,server=on,wait=off)"
                ),
                path,
            },
            other => other,
        })?;
        let (version, package) = parse_greeting(&greeting).ok_or_else(|| QmpError::Protocol {
            path: path.to_path_buf(),
            message: format!("the first message is not a QMP greeting: {}", brief(&greeting)),
        })?;
        qmp.version = version;
        qmp.package = package;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> QmpVersion {
        self.version
    }

    /// QEMU's package string (distribution build), possibly empty.
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The socket this connection talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Set the deadline of each later command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Run `command` with `arguments` (an object) and return its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.into()));
        if let Some(a) = arguments {
            msg.insert("arguments".into(), a);
        }
        msg.insert("id".into(), json!(id));
        let mut line = serde_json::to_vec(&Value::Object(msg)).expect("a JSON value serialises");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|source| QmpError::Io {
            path: self.path.clone(),
            what: format!("send {command}"),
            source,
        })?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = self.read_message(deadline, command)?;
            if msg.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(msg);
                continue;
            }
            if msg.get("id") != Some(&json!(id)) {
                // A reply to a command sent before a reconnect, or to another id:
                // not ours. QEMU answers in order, so it cannot be for a later one.
                if msg.get("return").is_some() || msg.get("error").is_some() {
                    continue;
                }
                return Err(
                    self.protocol(format!("unexpected message while waiting for {command}: {}", brief(&msg)))
                );
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(
                self.protocol(format!("reply to {command} has neither return nor error: {}", brief(&msg)))
            );
        }
    }

    /// Run a `transaction` of `actions` (each `{"type", "data"}`): all happen at one
    /// instant, or none does.
    pub fn transaction(&mut self, actions: Vec<Value>) -> Result<(), QmpError> {
        self.execute("transaction", Some(json!({ "actions": actions }))).map(|_| ())
    }

    /// The events received so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Wait until an event named `name` for which `matches` holds arrives (or was
    /// already received), at most `timeout`; other events are kept.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: &dyn Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let is = |e: &Value| e.get("event").and_then(Value::as_str) == Some(name) && matches(e);
        if let Some(i) = self.events.iter().position(is) {
            return Ok(self.events.remove(i).expect("index found"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.read_message(deadline, &format!("event {name}")).map_err(|e| match e {
                QmpError::Timeout { path, timeout: _, command } => {
                    QmpError::Timeout { path, command, timeout }
                }
                other => other,
            })?;
            if is(&msg) {
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(msg);
            }
        }
    }

    fn protocol(&self, message: String) -> QmpError {
        QmpError::Protocol { path: self.path.clone(), message }
    }

    /// Read one JSON message, waiting until `deadline`.
    fn read_message(&mut self, deadline: Instant, waiting_for: &str) -> Result<Value, QmpError> {
        loop {
            if let Some(v) = self.parse_pending()? {
                return Ok(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout {
                    path: self.path.clone(),
                    command: waiting_for.to_string(),
                    timeout: self.timeout,
                });
            }
            let wait = deadline - now;
            self.reader.get_ref().set_read_timeout(Some(wait.max(Duration::from_millis(1)))).map_err(
                |source| QmpError::Io { path: self.path.clone(), what: "set a read timeout".into(), source },
            )?;
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(self.closed(waiting_for));
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        path: self.path.clone(),
                        what: format!("read while waiting for {waiting_for}"),
                        source,
                    })
                }
            };
            if buf.is_empty() {
                return Err(self.closed(waiting_for));
            }
            let n = buf.len();
            self.pending.extend_from_slice(buf);
            self.reader.consume(n);
            if self.pending.len() > MAX_MESSAGE {
                return Err(self.protocol(format!(
                    "a message longer than {} MiB while waiting for {waiting_for}: not QMP",
                    MAX_MESSAGE >> 20
                )));
            }
        }
    }

    fn closed(&self, waiting_for: &str) -> QmpError {
        QmpError::Closed { path: self.path.clone(), during: format!(" while waiting for {waiting_for}") }
    }

    /// Parse the first complete JSON value of `pending`, if there is one.
    fn parse_pending(&mut self) -> Result<Option<Value>, QmpError> {
        let start = self.pending.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.pending.clear();
            return Ok(None);
        };
        if self.pending[start] != b'{' {
            let end = self.pending.len().min(start + 60);
            return Err(self.protocol(format!(
                "not QMP: expected a JSON object, got {:?}",
                String::from_utf8_lossy(&self.pending[start..end])
            )));
        }
        let mut stream = serde_json::Deserializer::from_slice(&self.pending[start..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) => {
                let used = start + stream.byte_offset();
                self.pending.drain(..used);
                Ok(Some(v))
            }
            Some(Err(e)) if e.is_eof() => Ok(None),
            Some(Err(e)) => Err(self.protocol(format!("malformed JSON from QEMU: {e}"))),
            None => Ok(None),
        }
    }
}

fn parse_greeting(v: &Value) -> Option<(QmpVersion, String)> {
    let q = v.get("QMP")?;
    let ver = q.get("version")?;
    let n = ver.get("qemu")?;
    let num = |k: &str| n.get(k).and_then(Value::as_u64);
    let version = QmpVersion { major: num("major")?, minor: num("minor")?, micro: num("micro")? };
    let package = ver.get("package").and_then(Value::as_str).unwrap_or("").trim().to_string();
    Some((version, package))
}

/// A message shortened for an error line.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 200 {
        return s;
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}
