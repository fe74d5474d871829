//! Vocabulary shared by every tern crate.
//!
//! Only small value types live here: sizes with their parsing and display rules.
//! Anything that does I/O belongs in a crate further down the dependency order
//! (see DESIGN.md, "Crate layout").

mod size;

pub use size::{ByteSize, ParseSizeError};

/// 1 KiB.
pub const KIB: u64 = 1024;
/// 1 MiB.
pub const MIB: u64 = 1024 * KIB;
/// 1 GiB.
pub const GIB: u64 = 1024 * MIB;
/// 1 TiB.
pub const TIB: u64 = 1024 * GIB;
