#![no_main]
//! Opens arbitrary bytes as vhd (footer and dynamic header checksums repaired) and
//! reads them within budget: must never panic.

use libfuzzer_sys::fuzz_target;
use tern_fuzz::{exercise_target, Target};

fuzz_target!(|data: &[u8]| {
    exercise_target(
        data,
        Target { format: Some(tern_disk::Format::Vhd), repair_checksums: true, writable: false },
    );
});
