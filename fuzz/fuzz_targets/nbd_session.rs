//! An untrusted NBD client: option haggling, then transmission requests, through the
//! server's own handshake and request code (`tern_nbd::fuzzing::session`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tern_nbd::fuzzing::session(data);
});
