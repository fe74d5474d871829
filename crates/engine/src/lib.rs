//! tern's engine: everything between the `tern` command line and the store.
//!
//! - [`Engine`]: the data directory, key, state database and store of one host, opened
//!   once per command ([`EngineOptions`] carries `--data-dir`, `--key-file`, `--store`).
//! - [`replicate`]: snapshot -> read -> chunk -> dedup -> upload, N workers per disk,
//!   resumable at chunk granularity; indexes, then the manifest, last.
//! - [`migrate`]: point -> verified chunks -> a disk image in any format, plus a
//!   libvirt domain and an Azure ARM template.
//! - [`verify`]: every object every point references exists (and, optionally, opens).
//! - [`throttle`]: the per-host bandwidth schedule and its token bucket.
//!
//! Invariants:
//! - A point exists iff its manifest exists; the manifest is written after every index,
//!   and every index after every chunk it references.
//! - Every byte migration writes was authenticated and hashed to its address; on any
//!   error no output image is left under its final name.
//! - Memory is bounded by threads x chunk size plus one index per disk, never by disk
//!   size or content.
//! - The state database is a cache plus progress: a store and its key are enough to
//!   migrate from another machine.

pub mod agent;
mod catalog;
pub mod changelog;
mod cycle;
mod db;
mod engine;
mod error;
pub mod gc;
pub mod journal;
mod lease;
mod lifecycle;
mod lock;
mod manifest;
mod migrate;
mod paths;
pub mod point;
pub mod qemu;
mod replicate;
pub mod sample;
pub mod segment;
pub mod snapshot;
pub mod throttle;
pub mod track;
mod verify;
mod vm;
mod vmdef;

pub use catalog::{find_vm, list_points, PointInfo};
pub use cycle::{add_qemu_vm, compact_beside, log_bytes, QemuVmSpec, DEFAULT_LOG_BUDGET};
pub use db::{
    PointRow, ReplicationDiskRow, ReplicationRow, StateDb, TrackingRow, VmEvent, VmSettings, SCHEMA_VERSION,
};
pub use engine::{Engine, EngineOptions};
pub use error::{Error, ErrorKind, Result};
pub use lifecycle::{complete, enable, set_paused, set_tracking, SettingsChange};
pub use lock::{replication_running, RunLock};
pub use manifest::{
    check_point_id, new_point_id, next_point_id, Manifest, ManifestDisk, ManifestVm, PieceRef, SegmentRef,
    MANIFEST_FORMAT, MANIFEST_VERSION,
};
pub use migrate::{
    migrate, open_point, MigrateEvent, MigrateFormat, MigrateOptions, MigrateReport, MigratedDisk, OpenPoint,
    PointRuntime, PointSelector,
};
pub use paths::DataDir;
pub use replicate::{
    check_threads, remove_vm, replicate, set_vm_store, DiskReport, PointKind, ReplicateEvent,
    ReplicateOptions, ReplicateReport, DEFAULT_COMPACT_SEGMENTS,
};
pub use verify::{verify, Problem, VerifyOptions, VerifyReport};
pub use vm::{check_name, new_vm_id, parse_format, register_vm, Firmware, QemuSource, VmDef, VmDisk};
pub use vmdef::{arm_template, libvirt_xml};

/// Default upload / fetch workers per disk.
pub const DEFAULT_THREADS: usize = 4;
/// Most workers per disk.
pub const MAX_THREADS: usize = 32;

/// Fill `buf` from the operating system's secure random source.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<()> {
    use ring::rand::{SecureRandom, SystemRandom};
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::new(ErrorKind::Io, "the system has no randomness to offer"))
}

/// The current instant as RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// An instant as RFC 3339 UTC, whole seconds.
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// An instant as RFC 3339 UTC with milliseconds (a cut's instant).
pub(crate) fn rfc3339_ms(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// TEST ONLY: when the environment variable `TERN_TEST_STALL_AT` names `phase`, say so
/// on stderr (`tern-test: at PHASE`) and stall for a minute, so that a test can kill
/// the process at exactly that moment of a pass. Phases: `cut` (the disks are frozen,
/// nothing staged), `stage` (a disk's changes are in its log, the cut still held),
/// `upload` (a segment piece is stored, the point is not), `commit` (the manifest is
/// stored, the state database does not say so yet). Nothing else reads the variable.
#[doc(hidden)]
pub fn test_stall(phase: &str) {
    if std::env::var_os("TERN_TEST_STALL_AT").is_some_and(|v| v == phase) {
        eprintln!("tern-test: at {phase}");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}
