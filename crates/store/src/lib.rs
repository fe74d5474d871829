//! tern's store: where replicated data lives, on any object store.
//!
//! This crate knows the *layout* (which object holds what, under which name) and the
//! backends (`file://`, `az://`, `s3://` through `object_store`); it never sees a
//! plaintext byte: objects arrive already sealed by `tern-chunk` and leave sealed.
//!
//! Layout under the store URL (see docs/formats/store-layout.md):
//! ```text
//! config.json                                  store config, plain JSON, written once
//! chunks/<first 2 hex>/<64 hex>                chunk envelopes, content-addressed
//! vms/<vm-id>/points/<point-id>/disk-<n>.index base index envelopes
//! vms/<vm-id>/points/<point-id>/manifest       manifest envelope, written LAST
//! ```
//! Invariants: objects are immutable once written; a recovery point exists iff its
//! manifest exists; every operation counts the bytes it moves ([`StoreStats`]).
//!
//! PLACEHOLDER: signatures only, being implemented; every body is `unimplemented!`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_chunk::ChunkAddress;

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
}

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
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The plain (unencrypted) store configuration, `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Always "tern-store".
    pub format: String,
    /// Layout version, 1.
    pub version: u32,
    /// Fingerprint of the key the store's objects are sealed with (hex).
    pub key_id: String,
    /// Chunk size in bytes used for new bases.
    pub chunk_size: u32,
}

/// Bytes and objects moved since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Objects written.
    pub objects_put: u64,
    /// Bytes written.
    pub bytes_put: u64,
    /// Objects read.
    pub objects_get: u64,
    /// Bytes read.
    pub bytes_get: u64,
}

/// An open store.
#[derive(Debug, Clone)]
pub struct Store {}

impl Store {
    /// Open the store at `url`: `file:///abs/path`, `az://container/prefix`,
    /// `s3://bucket/prefix`. Credentials and endpoints come from the environment.
    pub fn open(url: &str) -> Result<Store> {
        let _ = url;
        unimplemented!()
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        unimplemented!()
    }

    /// Bytes and objects moved so far.
    pub fn stats(&self) -> StoreStats {
        unimplemented!()
    }

    /// Read `config.json`, `None` if the store is new.
    pub async fn read_config(&self) -> Result<Option<StoreConfig>> {
        unimplemented!()
    }

    /// Write `config.json` if absent; return the config that is in the store afterwards.
    pub async fn init_config(&self, config: &StoreConfig) -> Result<StoreConfig> {
        let _ = config;
        unimplemented!()
    }

    /// Whether a chunk exists.
    pub async fn chunk_exists(&self, address: &ChunkAddress) -> Result<bool> {
        let _ = address;
        unimplemented!()
    }

    /// Store a chunk envelope.
    pub async fn put_chunk(&self, address: &ChunkAddress, envelope: Bytes) -> Result<()> {
        let _ = (address, envelope);
        unimplemented!()
    }

    /// Fetch a chunk envelope.
    pub async fn get_chunk(&self, address: &ChunkAddress) -> Result<Bytes> {
        let _ = address;
        unimplemented!()
    }

    /// Store the base index envelope of disk `disk` of point `point` of VM `vm`.
    pub async fn put_index(&self, vm: &str, point: &str, disk: u32, envelope: Bytes) -> Result<()> {
        let _ = (vm, point, disk, envelope);
        unimplemented!()
    }

    /// Fetch a base index envelope.
    pub async fn get_index(&self, vm: &str, point: &str, disk: u32) -> Result<Bytes> {
        let _ = (vm, point, disk);
        unimplemented!()
    }

    /// Store a manifest envelope: the commit point of a recovery point. Refuses to
    /// replace an existing manifest.
    pub async fn put_manifest(&self, vm: &str, point: &str, envelope: Bytes) -> Result<()> {
        let _ = (vm, point, envelope);
        unimplemented!()
    }

    /// Fetch a manifest envelope.
    pub async fn get_manifest(&self, vm: &str, point: &str) -> Result<Bytes> {
        let _ = (vm, point);
        unimplemented!()
    }

    /// VM ids that have at least one object.
    pub async fn list_vms(&self) -> Result<Vec<String>> {
        unimplemented!()
    }

    /// Point ids of `vm` that have a manifest, sorted.
    pub async fn list_points(&self, vm: &str) -> Result<Vec<String>> {
        let _ = vm;
        unimplemented!()
    }

    /// Every chunk with its stored size.
    pub async fn list_chunks(&self) -> Result<Vec<(ChunkAddress, u64)>> {
        unimplemented!()
    }
}
