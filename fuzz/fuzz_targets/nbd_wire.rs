//! Every NBD wire decoder (server and client side) on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_nbd::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_info_request(data);
    let _ = wire::decode_meta_request(data);
    let _ = wire::decode_info(data);
    let _ = wire::decode_rep_meta_context(data);
    let _ = wire::decode_error_payload(data);
    let _ = wire::decode_block_status(data);
    if data.len() >= 28 {
        let _ = wire::Request::decode(data[..28].try_into().unwrap());
        let _ = wire::decode_option_header(data[..16].try_into().unwrap());
        let _ = wire::decode_option_reply_header(data[..20].try_into().unwrap());
    }
});
