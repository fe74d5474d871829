//! `config.json`: the one plain object of a store (docs/formats/store-layout.md,
//! "config.json"). It says that the folder or bucket is a tern store, which layout
//! version it uses, and which key seals its objects, so that a wrong key is reported
//! as a wrong key before anything is uploaded.

use serde::{Deserialize, Serialize};

/// The value of [`StoreConfig::format`].
pub const STORE_FORMAT: &str = "tern-store";
/// The layout version this crate reads and writes.
pub const LAYOUT_VERSION: u32 = 1;

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

impl StoreConfig {
    /// A config for a new store of the current layout version.
    pub fn new(key_id: impl Into<String>, chunk_size: u32) -> StoreConfig {
        StoreConfig {
            format: STORE_FORMAT.to_string(),
            version: LAYOUT_VERSION,
            key_id: key_id.into(),
            chunk_size,
        }
    }

    /// Why this config cannot be used by this version of tern, if it cannot.
    pub(crate) fn problem(&self) -> Option<String> {
        if self.format != STORE_FORMAT {
            return Some(format!("format is {:?}, not {STORE_FORMAT:?}: not a tern store", self.format));
        }
        if self.version != LAYOUT_VERSION {
            return Some(format!(
                "layout version {} is not supported (this tern reads version {LAYOUT_VERSION})",
                self.version
            ));
        }
        None
    }
}
