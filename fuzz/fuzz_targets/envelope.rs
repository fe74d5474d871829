#![no_main]
//! Arbitrary bytes opened as an envelope of every kind: must never panic.

use libfuzzer_sys::fuzz_target;
use tern_chunk::{open_envelope, Key, ObjectKind};

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([7; 32]);
    for kind in [ObjectKind::Chunk, ObjectKind::Index, ObjectKind::Manifest, ObjectKind::Segment] {
        let _ = open_envelope(&key, kind, data);
    }
});
