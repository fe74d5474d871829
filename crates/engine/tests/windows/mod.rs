//! Rate measurement shared by the throttle tests: samples of (virtual seconds, bytes
//! landed by then), and the worst 10 s window of a run against the limit
//! (DESIGN.md, "Parallelism, bandwidth": within 5% over any 10 s window).
#![allow(dead_code)] // Each test binary uses a different subset.

use bytes::Bytes;
use tern_chunk::Key;

pub const WINDOW: f64 = 10.0;
pub const STEP: f64 = 0.25;

/// (virtual seconds, bytes landed at the store by then), in order.
pub type Samples = Vec<(f64, u64)>;

/// Bytes landed by time `t`: the last sample at or before it.
pub fn landed(samples: &[(f64, u64)], t: f64) -> u64 {
    samples.iter().take_while(|(x, _)| *x <= t).last().map_or(0, |s| s.1)
}

/// The worst relative deviation from `bps` of the 10 s windows starting in
/// `from..=to` seconds (sliding in 0.25 s steps), and the start of that window.
pub fn worst_window(samples: &[(f64, u64)], bps: u64, from: f64, to: f64) -> (f64, f64) {
    let want = bps as f64 / 8.0 * WINDOW;
    let mut worst = (0.0f64, from);
    let steps = ((to - from) / STEP).round() as u32;
    for i in 0..=steps {
        let start = from + f64::from(i) * STEP;
        let got = (landed(samples, start + WINDOW) - landed(samples, start)) as f64;
        let deviation = got / want - 1.0;
        if deviation.abs() > worst.0.abs() {
            worst = (deviation, start);
        }
    }
    worst
}

/// A default chunk, sealed: 4 MiB that zstd cannot shrink (xorshift).
pub fn incompressible_envelope() -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let plain: Vec<u8> = (0..4 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let (_, envelope) = tern_chunk::seal_chunk(&Key::from_bytes([3; 32]), &plain, 1).unwrap();
    assert!(envelope.len() > 4 << 20);
    Bytes::from(envelope)
}
