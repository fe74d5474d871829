//! Property tests of the parsers of untrusted bytes: the option and request parsing of
//! the server (the same entry point as the fuzz target in `fuzz/`) and the wire
//! decoders. Random and mutated input must end in a clean outcome, never a panic.

use proptest::prelude::*;
use tern_nbd::fuzzing::{session, Outcome};
use tern_nbd::proto::*;
use tern_nbd::wire::{self, Request};

/// A well-formed client session: structured replies, base:allocation, GO, then
/// `requests` requests and DISC.
fn valid_session(export: &str, requests: &[(u16, u16, u64, u32)]) -> Vec<u8> {
    let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    b.extend(wire::encode_option(OPT_LIST, &[]));
    b.extend(wire::encode_option(OPT_STRUCTURED_REPLY, &[]));
    b.extend(wire::encode_option(
        OPT_SET_META_CONTEXT,
        &wire::encode_meta_request(export, &[BASE_ALLOCATION]),
    ));
    b.extend(wire::encode_option(OPT_GO, &wire::encode_info_request(export, &[INFO_BLOCK_SIZE])));
    for (i, &(kind, flags, offset, length)) in requests.iter().enumerate() {
        b.extend(Request { flags, kind, cookie: i as u64, offset, length }.encode());
        if kind == CMD_WRITE {
            b.extend(std::iter::repeat_n(0x5a, length as usize));
        }
    }
    b.extend(Request { flags: 0, kind: CMD_DISC, cookie: 0, offset: 0, length: 0 }.encode());
    b
}

fn request() -> impl Strategy<Value = (u16, u16, u64, u32)> {
    (
        prop_oneof![0u16..9, any::<u16>()],
        prop_oneof![0u16..32, any::<u16>()],
        prop_oneof![(0u64..(1 << 20)).prop_map(|o| o & !511), any::<u64>()],
        prop_oneof![(0u32..8192).prop_map(|l| l & !511), 0u32..70000],
    )
}

#[test]
fn a_valid_session_is_served_to_the_end() {
    let reqs =
        [(CMD_WRITE, CMD_FLAG_FUA, 0, 4096), (CMD_READ, 0, 0, 4096), (CMD_BLOCK_STATUS, 0, 0, 1 << 20)];
    assert_eq!(session(&valid_session("a", &reqs)), Outcome::Closed { requests: 3 });
    // Requests the server refuses are still answered, and the session goes on.
    let bad = [(CMD_READ, 0, 3, 512), (99, 0, 0, 0), (CMD_WRITE, 0, 1 << 20, 512), (CMD_READ, 0, 0, 512)];
    assert_eq!(session(&valid_session("a", &bad)), Outcome::Closed { requests: 4 });
    // Writing to the read-only export is refused, not a disconnect.
    assert_eq!(session(&valid_session("b", &[(CMD_WRITE, 0, 0, 512)])), Outcome::Closed { requests: 1 });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_end_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = session(&bytes);
    }

    #[test]
    fn mutated_sessions_end_cleanly(
        reqs in proptest::collection::vec(request(), 0..12),
        export in prop_oneof![Just("a"), Just("b"), Just(""), Just("zz")],
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        // Keep payloads small enough for a quick test.
        let reqs: Vec<_> = reqs.into_iter().map(|(k, f, o, l)| if k == CMD_WRITE { (k, f, o, l.min(8192)) } else { (k, f, o, l) }).collect();
        let mut b = valid_session(export, &reqs);
        for (at, x) in flips {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        if truncate {
            b.truncate(cut.index(b.len() + 1));
        }
        match session(&b) {
            Outcome::Closed { requests } => prop_assert!(requests <= reqs.len() + 64),
            Outcome::Refused(why) => prop_assert!(!why.is_empty()),
        }
    }

    #[test]
    fn wire_decoders_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = wire::decode_info_request(&bytes);
        let _ = wire::decode_meta_request(&bytes);
        let _ = wire::decode_info(&bytes);
        let _ = wire::decode_rep_meta_context(&bytes);
        let _ = wire::decode_error_payload(&bytes);
        let _ = wire::decode_block_status(&bytes);
        if bytes.len() >= 28 {
            let _ = Request::decode(bytes[..28].try_into().unwrap());
            let _ = wire::decode_option_header(bytes[..16].try_into().unwrap());
            let _ = wire::decode_option_reply_header(bytes[..20].try_into().unwrap());
        }
    }

    #[test]
    fn meta_requests_round_trip(export in "[a-z]{0,8}", queries in proptest::collection::vec("[a-z:]{0,12}", 0..5)) {
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        let d = wire::decode_meta_request(&wire::encode_meta_request(&export, &q)).unwrap();
        prop_assert_eq!(d.export, export);
        prop_assert_eq!(d.queries, queries);
    }
}
