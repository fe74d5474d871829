#![no_main]
//! Arbitrary bytes opened as an envelope of every kind: must never panic. Without the
//! key only the header checks and the authentication are reachable, so the same bytes
//! are also sealed as a plaintext and opened back, which drives compression (or its
//! skipping) and decompression with fuzzer-chosen content.

use libfuzzer_sys::fuzz_target;
use tern_chunk::{open_chunk, open_envelope, seal_chunk, Key, ObjectKind};

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([7; 32]);
    for kind in [ObjectKind::Chunk, ObjectKind::Index, ObjectKind::Manifest, ObjectKind::Segment] {
        let _ = open_envelope(&key, kind, data);
    }
    let (address, envelope) = seal_chunk(&key, data, 1).expect("seal");
    assert_eq!(open_chunk(&key, &address, &envelope).expect("open what was sealed"), data);
});
