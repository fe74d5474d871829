//! The NBD protocol (`doc/proto.md` of the NBD project) for tern: the wire format
//! shared with tern's client (`tern_disk::nbd`), and a server.
//!
//! - [`proto`]: the protocol's constants; [`wire`]: encoding and decoding of every
//!   message, without I/O (one parser for the server, the client and the fuzzers).
//! - [`Export`]: what a server serves (a disk image, the journal sink, a recovery
//!   point). [`FileExport`] serves a raw file or block device; [`MemoryExport`] bytes
//!   in memory. Adapters for image formats live with the formats (`tern-disk`).
//! - [`Server`]: fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//!   `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST`/`SET_META_CONTEXT` with
//!   `base:allocation`, `STARTTLS`), then READ, WRITE (FUA), FLUSH, TRIM,
//!   WRITE_ZEROES (NO_HOLE, FAST_ZERO), BLOCK_STATUS, CACHE and DISC, many requests in
//!   flight per connection, answered as they complete.
//!
//! Invariants: every request is checked (command, flags, bounds, alignment, size,
//! read-only) before an export sees it, and refused with the error value the protocol
//! names; a client that breaks the framing is disconnected, and nothing a client sends
//! can panic the server or stop other clients. Memory per connection is bounded by
//! [`ServerOptions::max_in_flight`] plus one request buffer per request thread.
//! Unix sockets are created 0600 and TCP is refused beyond loopback without TLS.

pub mod export;
pub mod file;
pub mod fuzzing;
pub mod handshake;
pub mod memory;
pub mod proto;
pub mod transmission;
pub mod wire;

mod error;
mod server;
mod socket;
mod tls;

pub use error::{Error, ErrorKind, Result};
pub use export::{
    BlockSizes, Capabilities, ErrorKind as ExportErrorKind, Export, ExportError, ExportResult, Extent,
    ZeroOptions,
};
pub use file::FileExport;
pub use memory::MemoryExport;
pub use server::{Log, Server, ServerOptions, StopHandle};
pub use socket::Listen;
pub use tls::server_config as tls_server_config;
