//! The bandwidth limit measured where the bytes land (DESIGN.md, "Parallelism,
//! bandwidth": "the measured rate over any 10 s window stays within 5% of the limit").
//!
//! The real [`Throttle`] paces the real paced chunk put
//! ([`Store::put_chunk_paced`]) into a local store, with default-size chunks (4 MiB of
//! incompressible data, sealed), on a [`VirtualClock`]: time moves only when the
//! throttle waits, so the runs are deterministic and assert nothing about wall time.
//! Each time the store is about to take a part, and after each chunk, the test records
//! (virtual time, bytes the store has counted as written); those are the bytes that
//! have landed. Every 10 s window, sliding in 0.25 s steps, is then compared with the
//! limit. Run with `--no-capture` to see the worst window at each rate.

mod windows;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tern_chunk::ChunkAddress;
use tern_engine::throttle::{Clock, Limit, Schedule, Throttle, VirtualClock};
use tern_store::Store;
use time::macros::datetime;
use time::UtcOffset;

use windows::{incompressible_envelope, landed, worst_window, Samples, WINDOW};

struct Rig {
    _dir: tempfile::TempDir,
    store: Store,
    rt: tokio::runtime::Runtime,
    envelope: Bytes,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().expect("temporary folder");
        let store = Store::open(&format!("file://{}", dir.path().display())).expect("local store");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        Rig { _dir: dir, store, rt, envelope: incompressible_envelope() }
    }

    /// Upload chunks from `workers` threads until the clock reads `until` seconds;
    /// appends to `samples`. Each chunk is deleted once stored, so that disk use stays
    /// at a few chunks whatever the rate.
    fn upload(
        &self,
        throttle: &Throttle,
        clock: &VirtualClock,
        workers: usize,
        until: f64,
        samples: &Mutex<Samples>,
    ) {
        let sample = || {
            let mut s = samples.lock().unwrap();
            // Time and bytes read together, so that samples are ordered in both.
            s.push((clock.elapsed().as_secs_f64(), self.store.stats().bytes_put));
        };
        let next = Mutex::new(0u64);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    let pacer = |remaining: u64| {
                        sample();
                        throttle.grant(remaining)
                    };
                    // Bounded: the clock advances by every chunk's time at the limit.
                    while clock.elapsed().as_secs_f64() < until {
                        let n = {
                            let mut next = next.lock().unwrap();
                            *next += 1;
                            *next
                        };
                        let mut address = [0u8; 32];
                        address[..8].copy_from_slice(&n.to_be_bytes());
                        let address = ChunkAddress(address);
                        self.rt
                            .block_on(self.store.put_chunk_paced(&address, self.envelope.clone(), &pacer))
                            .unwrap();
                        sample();
                        self.rt.block_on(self.store.delete_chunk(&address)).unwrap();
                    }
                });
            }
        });
    }
}

fn fixed(limit: Limit) -> Box<dyn Fn() -> Option<Schedule> + Send + Sync> {
    Box::new(move || Some(Schedule { work_limit: limit, off_limit: limit, ..Schedule::unlimited() }))
}

/// Upload at a fixed `bps` for `secs` virtual seconds from `workers` threads; every
/// window must be within 5%.
fn steady(bps: u64, workers: usize, secs: f64) {
    let rig = Rig::new();
    let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
    let throttle = Throttle::new(clock.clone(), UtcOffset::UTC, fixed(Limit::Bps(bps)));
    let samples = Mutex::new(vec![(0.0, 0)]);
    rig.upload(&throttle, &clock, workers, secs, &samples);
    let samples = samples.into_inner().unwrap();
    let total = samples.last().unwrap().1;
    assert!(total > 2 * rig.envelope.len() as u64, "several chunks went: {total} bytes");
    let (deviation, at) = worst_window(&samples, bps, 0.0, secs - WINDOW);
    println!(
        "{}, {workers} worker(s), {} chunks: worst 10 s window {:+.3}% (at {at} s)",
        Limit::Bps(bps),
        total / rig.envelope.len() as u64,
        deviation * 100.0
    );
    assert!(deviation.abs() < 0.05, "{} window at {at} s off by {:.2}%", Limit::Bps(bps), deviation * 100.0);
}

#[test]
fn at_50_mbps_every_10s_window_is_within_5_percent() {
    steady(50_000_000, 1, 60.0);
}

/// Four workers, as replication uses by default. The worst window comes out near 1.9%
/// here, against 0.5% for one worker, and that is the virtual clock, not the throttle:
/// while one worker writes its part in real time, the others' waits pass instantly in
/// virtual time, so a part is recorded up to about three parts' time (150 ms) after it
/// was admitted. On a real clock the other workers' waits take real time too.
#[test]
fn at_50_mbps_with_four_workers_every_10s_window_is_within_5_percent() {
    steady(50_000_000, 4, 60.0);
}

#[test]
fn at_512_kbps_every_10s_window_is_within_5_percent() {
    // 4 MiB is 65.5 s at 512 Kbps: four chunks, windows across chunk boundaries.
    steady(512_000, 1, 270.0);
}

#[test]
fn at_1023_mbps_every_10s_window_is_within_5_percent() {
    steady(1_023_000_000, 1, 25.0);
}

#[test]
fn crossing_into_off_hours_switches_the_rate() {
    // Monday 17:59:00 local (UTC+2): work hours end at 18:00, 60 s into the run.
    let rig = Rig::new();
    let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 15:59:00 UTC)));
    let (work, off) = (10_000_000, 80_000_000);
    let schedule = Schedule {
        work_limit: Limit::Bps(work),
        off_limit: Limit::Bps(off),
        work_days: vec![0, 1, 2, 3, 4],
        work_start_min: 8 * 60,
        work_end_min: 18 * 60,
    };
    let offset = UtcOffset::from_hms(2, 0, 0).unwrap();
    let throttle = Throttle::new(clock.clone(), offset, Box::new(move || Some(schedule.clone())));
    let samples = Mutex::new(vec![(0.0, 0)]);
    rig.upload(&throttle, &clock, 1, 100.0, &samples);
    let samples = samples.into_inner().unwrap();
    let (before, at_b) = worst_window(&samples, work, 0.0, 50.0);
    // The schedule is re-read every second: allow that second for the switch.
    let (after, at_a) = worst_window(&samples, off, 61.0, 90.0);
    println!(
        "work {}: worst {:+.3}% (at {at_b} s); off {}: worst {:+.3}% (at {at_a} s)",
        Limit::Bps(work),
        before * 100.0,
        Limit::Bps(off),
        after * 100.0
    );
    assert!(before.abs() < 0.05, "work hours, window at {at_b} s: {:.2}%", before * 100.0);
    assert!(after.abs() < 0.05, "off hours, window at {at_a} s: {:.2}%", after * 100.0);
}

#[test]
fn a_limit_set_mid_chunk_applies_from_the_next_part() {
    // `tern throttle set 512Kbps` at 20.3 s, while a chunk (0.67 s at 50 Mbps) is
    // going: the throttle sees it at its next re-read, within a second.
    let rig = Rig::new();
    let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
    let (fast, slow) = (50_000_000, 512_000);
    let set_at = 20.3;
    let seen = clock.clone();
    let throttle = Throttle::new(
        clock.clone(),
        UtcOffset::UTC,
        Box::new(move || {
            let l = Limit::Bps(if seen.elapsed().as_secs_f64() < set_at { fast } else { slow });
            Some(Schedule { work_limit: l, off_limit: l, ..Schedule::unlimited() })
        }),
    );
    let samples = Mutex::new(vec![(0.0, 0)]);
    rig.upload(&throttle, &clock, 1, 90.0, &samples);
    let samples = samples.into_inner().unwrap();
    let at_set = landed(&samples, set_at);
    let mid_chunk = at_set % rig.envelope.len() as u64;
    assert!(mid_chunk != 0, "the limit changed between chunks; move `set_at`");
    let (before, at_b) = worst_window(&samples, fast, 0.0, set_at - WINDOW);
    let (after, at_a) = worst_window(&samples, slow, set_at + 1.0, 80.0);
    println!(
        "{}: worst {:+.3}% (at {at_b} s); set to {} mid-chunk: worst {:+.3}% (at {at_a} s)",
        Limit::Bps(fast),
        before * 100.0,
        Limit::Bps(slow),
        after * 100.0
    );
    assert!(before.abs() < 0.05, "before, window at {at_b} s: {:.2}%", before * 100.0);
    assert!(after.abs() < 0.05, "after, window at {at_a} s: {:.2}%", after * 100.0);
}
