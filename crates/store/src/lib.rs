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
//! Main types: [`Store`] (open with a URL, then put/get/list), [`Error`] with an
//! [`ErrorKind`] that says whether a retry can help, [`StoreConfig`], [`StoreStats`],
//! [`Pacer`] (admits the parts of a bandwidth-limited chunk upload).
//!
//! # URLs and environment
//! - `file:///abs/path`: a local folder, created if missing.
//! - `az://container/prefix`: Azure Blob Storage. Account: `AZURE_STORAGE_ACCOUNT_NAME`
//!   with `AZURE_STORAGE_ACCOUNT_KEY`, or `AZURE_STORAGE_SAS_TOKEN`, or a service
//!   principal (`AZURE_STORAGE_CLIENT_ID`, `AZURE_STORAGE_CLIENT_SECRET`,
//!   `AZURE_STORAGE_TENANT_ID`), else managed identity. `AZURE_STORAGE_ENDPOINT` points
//!   at another endpoint (for Azurite: `http://127.0.0.1:10000/devstoreaccount1`);
//!   `AZURE_STORAGE_USE_EMULATOR=true` selects Azurite's well-known account at
//!   `AZURITE_BLOB_STORAGE_URL` (default `http://127.0.0.1:10000`).
//! - `s3://bucket/prefix`: S3 or an S3-compatible server. `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (default us-east-1),
//!   `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) for another server; requests are path-style
//!   unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`.
//!
//! Plain `http://` endpoints are accepted on loopback (emulators); elsewhere they need
//! `AWS_ALLOW_HTTP=true` / `AZURE_ALLOW_HTTP=true`. Every other `AWS_*` / `AZURE_*`
//! variable object_store knows is honoured too, e.g. `AWS_TIMEOUT` / `AZURE_TIMEOUT`
//! (whole request, default 120 s; a paced put's time waiting for its pacer is not
//! counted) and `AWS_CONNECT_TIMEOUT` (default 3 s). Remote requests are sent by the
//! crate's own HTTP client, built from those client settings (`http.rs` lists which).
//! [`Store::open_with_env`] takes the variables from a list instead of the process.
//!
//! Remote requests are retried on transient failures (5xx, 429, connection errors,
//! timeouts) 3 times with a short backoff, so an unreachable endpoint fails in seconds
//! with [`ErrorKind::Transient`].

mod backend;
mod config;
mod error;
mod http;
mod layout;
mod paced;
mod stats;
mod store;

pub use config::{StoreConfig, LAYOUT_VERSION, STORE_FORMAT};
pub use error::{Error, ErrorKind, Result};
pub use paced::Pacer;
pub use stats::StoreStats;
pub use store::{Listed, ListedKind, Store};
