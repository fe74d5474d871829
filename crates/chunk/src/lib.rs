//! Chunks and the objects made of them, as they are stored: the envelope, the keyed
//! address, the key, and the base index.
//!
//! Order of operations is fixed and owned here (see [`envelope::seal`]):
//! address = keyed BLAKE3 of the plaintext; then zstd; then AES-256-GCM with a fresh
//! random nonce and the envelope header as associated data. Opening reverses it and,
//! for chunks, recomputes the address so that a swapped or tampered object can never
//! be returned as data.
//!
//! Main types: [`Key`] (the master key, with its derived subkeys and id),
//! [`ChunkAddress`], [`ObjectKind`], [`BaseIndex`].
//!
//! Invariants:
//! - The store never sees a plaintext byte or the key; addresses reveal nothing about
//!   content without the key.
//! - Every byte returned by [`open_envelope`] was authenticated by GCM; every chunk
//!   returned by [`open_chunk`] hashes to the address it was asked for.
//!
//! Formats are documented in `docs/formats/envelope.md` and `docs/formats/index.md`.

mod address;
mod envelope;
mod error;
mod index;
mod key;

pub use address::ChunkAddress;
pub use envelope::{
    chunk_address, open_chunk, open_chunk_into, open_envelope, seal, seal_chunk, ObjectKind,
    ENVELOPE_OVERHEAD,
};
pub use error::{Error, ErrorKind, Result};
pub use index::{BaseIndex, IndexEntry};
pub use key::{Key, KeyId};

/// Default chunk size: 4 MiB (DESIGN.md, "Store layout").
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
/// Smallest chunk size accepted: 64 KiB.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest chunk size accepted: 64 MiB (bounds memory per worker).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
