#![no_main]
//! Opens arbitrary bytes as vhd and reads them within budget: must never panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_fuzz::exercise(data, Some(tern_disk::Format::Vhd));
});
