#![no_main]
//! Arbitrary bytes decoded as a base index: must never panic, and what decodes must
//! encode back to the same bytes.

use libfuzzer_sys::fuzz_target;
use tern_chunk::BaseIndex;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = BaseIndex::decode(data) {
        assert_eq!(index.encode(), data);
    }
});
