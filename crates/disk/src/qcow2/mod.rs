//! qcow2 v2 and v3 (QEMU's docs/interop/qcow2.txt): reading, and writing new images.
//!
//! Reading ([`Qcow2Disk`]) walks the two-level mapping: the L1 table (loaded at open)
//! points to L2 tables (one cluster each, kept in a bounded cache shared by all
//! readers), whose entries say what each guest cluster is: data at a host offset, a
//! compressed cluster (deflate or zstd), zeros, or unallocated (the backing file's
//! bytes, or zeros). Extended L2 entries (32 subclusters per cluster) are supported.
//! Runs of clusters that are contiguous in the file are read with one `pread`, and
//! runs of one kind are reported as one [`crate::Mapping`].
//!
//! Writing ([`Qcow2Writer`]) produces a v3 image (compat 1.1, 16-bit refcounts) whose
//! clusters are appended as writes need them; refcounts are written at `finish`.
//!
//! Everything read from an image is untrusted: header fields, extension lengths, table
//! offsets and sizes, and every L1/L2 entry are checked before use, and a failed check
//! is a `Corrupt` (or `Unsupported`) error naming the field and offset. Not supported:
//! encryption, external data files, writing to existing images, internal snapshots
//! other than the active state (they are ignored, as qemu-img convert does).
//!
//! Persistent dirty bitmaps (the bitmaps extension) are read by [`qcow2_bitmaps`] and
//! [`qcow2_bitmap_extents`], straight from the file: they need no open [`Qcow2Disk`].
//!
//! Files: `header.rs` (header fields), `extension.rs` (header extensions), `bitmaps.rs`
//! (persistent dirty bitmaps),
//! `geometry.rs` (cluster arithmetic), `l2.rs` (entry decoding), `cache.rs` (L2 cache),
//! `compress.rs` (compressed clusters), `reader.rs`, `writer.rs`, `refcount.rs`.

mod bitmaps;
mod cache;
mod compress;
mod extension;
mod geometry;
mod header;
mod l2;
mod reader;
mod refcount;
mod writer;

pub use bitmaps::{qcow2_bitmap_extents, qcow2_bitmaps, StoredBitmap};
pub use header::MAGIC;
pub use reader::Qcow2Disk;
pub use writer::Qcow2Writer;
