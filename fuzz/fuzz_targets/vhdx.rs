#![no_main]
//! Opens arbitrary bytes as vhdx (header, region table and log entry checksums
//! repaired) writable, so that a pending log is replayed into the scratch file, and
//! reads them within budget: must never panic.

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{exercise_target, Target};

fuzz_target!(|data: &[u8]| {
    exercise_target(
        data,
        Target { format: Some(tern_disk::Format::Vhdx), repair_checksums: true, writable: true },
    );
});
