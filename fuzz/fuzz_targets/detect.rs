#![no_main]
//! Arbitrary bytes through format detection and whichever format it picks.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_fuzz::exercise(data, None);
});
