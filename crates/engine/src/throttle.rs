//! Upload bandwidth limit with a work-hours schedule (DESIGN.md, "Parallelism,
//! bandwidth"; docs/replication.md, "Bandwidth").
//!
//! Rates are bits per second with decimal prefixes, as network rates are:
//! `1 Kbps` = 1000 bit/s, `1 Mbps` = 10^6 bit/s. A limit is 512 Kbps ..= 1023 Mbps,
//! or `unlimited`.
//!
//! [`Throttle`] is a token bucket on upload bytes shared by every worker of a process.
//! Uploads ask it for parts ([`Throttle::grant`], the [`tern_store::Pacer`] handed to
//! [`tern_store::Store::put_chunk_paced`]) sized to the limit in force, at most
//! [`PART_TIME`]'s worth of bytes, so that the rate measured where bytes land at the
//! store holds over 10 s windows, not just on average over whole chunks.
//! It re-reads the schedule (through a caller-supplied source, normally the state
//! database) at most once per second of its [`Clock`], so a `tern throttle set` applies
//! to running replications within a second. Waits are taken in slices of at most one
//! second so that a changed limit also applies to an upload already waiting. Time comes
//! from a [`Clock`] so that tests run on a virtual clock and assert nothing about wall time.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset};

use crate::{Error, Result};

/// Lowest limit accepted, bits per second.
pub const MIN_LIMIT_BPS: u64 = 512_000;
/// Highest limit accepted, bits per second.
pub const MAX_LIMIT_BPS: u64 = 1_023_000_000;

/// A bandwidth limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Limit {
    /// No limit.
    Unlimited,
    /// Bits per second.
    Bps(u64),
}

impl Limit {
    /// Parse `50Mbps`, `512Kbps`, `1.5Mbps`, `800000bps`, `unlimited`; checks the range.
    pub fn parse(s: &str) -> Result<Limit> {
        let t = s.trim();
        let err = |why: &str| {
            Error::invalid(format!(
                "rate {s:?} {why}: give a number of bit/s with a unit (bps, Kbps, Mbps or Gbps; \
                 K = 1000) from 512Kbps to 1023Mbps, or `unlimited`"
            ))
        };
        if t.eq_ignore_ascii_case("unlimited") {
            return Ok(Limit::Unlimited);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "bps" | "bit/s" => 1,
            "kbps" | "kbit/s" => 1_000,
            "mbps" | "mbit/s" => 1_000_000,
            "gbps" | "gbit/s" => 1_000_000_000,
            "" => return Err(err("has no unit")),
            _ => return Err(err("has an unknown unit")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 6 {
            return Err(err("is not a number"));
        }
        let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err("is not a number"))? };
        let frac_val: u64 =
            if frac.is_empty() { 0 } else { frac.parse().map_err(|_| err("is not a number"))? };
        let scale = 10u64.pow(frac.len() as u32);
        let bps = int
            .checked_mul(mult)
            .and_then(|v| v.checked_add(frac_val.checked_mul(mult)? / scale))
            .ok_or_else(|| err("is too large"))?;
        if !(MIN_LIMIT_BPS..=MAX_LIMIT_BPS).contains(&bps) {
            return Err(err("is out of range"));
        }
        Ok(Limit::Bps(bps))
    }

    /// Bytes per second, `None` for unlimited.
    pub fn bytes_per_sec(self) -> Option<f64> {
        match self {
            Limit::Unlimited => None,
            Limit::Bps(b) => Some(b as f64 / 8.0),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Limit::Unlimited => f.write_str("unlimited"),
            Limit::Bps(b) if b % 1_000_000 == 0 => write!(f, "{}Mbps", b / 1_000_000),
            Limit::Bps(b) if b % 1_000 == 0 => write!(f, "{}Kbps", b / 1_000),
            Limit::Bps(b) => write!(f, "{b}bps"),
        }
    }
}

/// One limit for work hours, one for the rest. Hours are the host's local time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Limit during work hours.
    pub work_limit: Limit,
    /// Limit outside work hours.
    pub off_limit: Limit,
    /// Work days, Monday = 0 .. Sunday = 6.
    pub work_days: Vec<u8>,
    /// Work hours start, minutes after midnight (inclusive).
    pub work_start_min: u16,
    /// Work hours end, minutes after midnight (exclusive); may be below the start for
    /// hours that cross midnight.
    pub work_end_min: u16,
}

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

fn parse_day(s: &str) -> Result<u8> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(s.trim()))
        .map(|p| p as u8)
        .ok_or_else(|| Error::invalid(format!("{s:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")))
}

/// Parse `Mon-Fri`, `Mon,Wed,Fri`, `Sat-Sun`, `Fri-Mon` (wraps), `none`.
pub fn parse_days(s: &str) -> Result<Vec<u8>> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut days = [false; 7];
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_day(a)?, parse_day(b)?);
                let mut d = a;
                loop {
                    days[d as usize] = true;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[parse_day(part)? as usize] = true,
        }
    }
    Ok((0..7u8).filter(|&d| days[d as usize]).collect())
}

fn parse_hm(s: &str) -> Result<u16> {
    let err = || Error::invalid(format!("{s:?} is not a time of day (HH:MM, 00:00 to 24:00)"));
    let (h, m) = s.trim().split_once(':').ok_or_else(err)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(err());
    }
    Ok(h * 60 + m)
}

/// Parse `08:00-18:00` into (start, end) minutes.
pub fn parse_hours(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| Error::invalid(format!("work hours {s:?} must be HH:MM-HH:MM, like 08:00-18:00")))?;
    let (a, b) = (parse_hm(a)?, parse_hm(b)?);
    if a == b {
        return Err(Error::invalid(format!("work hours {s:?} are empty")));
    }
    Ok((a, b))
}

fn fmt_hm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

impl Schedule {
    /// No limit at any time.
    pub fn unlimited() -> Schedule {
        Schedule {
            work_limit: Limit::Unlimited,
            off_limit: Limit::Unlimited,
            work_days: vec![0, 1, 2, 3, 4],
            work_start_min: 8 * 60,
            work_end_min: 18 * 60,
        }
    }

    /// Whether `t` (already in local time) is in work hours.
    pub fn is_work_time(&self, t: OffsetDateTime) -> bool {
        let minute = t.hour() as u16 * 60 + t.minute() as u16;
        let day = t.weekday().number_days_from_monday();
        let (s, e) = (self.work_start_min, self.work_end_min);
        if s < e {
            self.work_days.contains(&day) && (s..e).contains(&minute)
        } else {
            // Crosses midnight: the part after midnight belongs to the previous day.
            let prev = (day + 6) % 7;
            (minute >= s && self.work_days.contains(&day)) || (minute < e && self.work_days.contains(&prev))
        }
    }

    /// The limit in force at `t` (local time).
    pub fn limit_at(&self, t: OffsetDateTime) -> Limit {
        if self.is_work_time(t) {
            self.work_limit
        } else {
            self.off_limit
        }
    }

    /// Days as text (`Mon,Tue,...`).
    pub fn days_text(&self) -> String {
        if self.work_days.is_empty() {
            return "none".into();
        }
        self.work_days.iter().filter_map(|&d| DAYS.get(d as usize).copied()).collect::<Vec<_>>().join(",")
    }

    /// Hours as text (`08:00-18:00`).
    pub fn hours_text(&self) -> String {
        format!("{}-{}", fmt_hm(self.work_start_min), fmt_hm(self.work_end_min))
    }
}

/// A source of time: the real one, or a virtual one in tests.
pub trait Clock: Send + Sync {
    /// Monotonic time since an arbitrary origin.
    fn elapsed(&self) -> Duration;
    /// The wall-clock instant, UTC.
    fn now_utc(&self) -> OffsetDateTime;
    /// Wait `d`.
    fn sleep(&self, d: Duration);
}

/// The system clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: std::time::Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock { origin: std::time::Instant::now() }
    }
}

impl Clock for SystemClock {
    fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }
    fn now_utc(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// A clock that moves only when someone sleeps on it: deterministic tests.
#[derive(Debug)]
pub struct VirtualClock {
    start: OffsetDateTime,
    elapsed: Mutex<Duration>,
}

impl VirtualClock {
    /// A clock whose wall time starts at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        VirtualClock { start, elapsed: Mutex::new(Duration::ZERO) }
    }

    /// Move time forward without sleeping (idle time between uploads).
    pub fn advance(&self, d: Duration) {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner()) += d;
    }
}

impl Clock for VirtualClock {
    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn now_utc(&self) -> OffsetDateTime {
        self.start + self.elapsed()
    }
    fn sleep(&self, d: Duration) {
        self.advance(d)
    }
}

/// Where the throttle reads the schedule from (normally the state database).
pub type ScheduleSource = Box<dyn Fn() -> Option<Schedule> + Send + Sync>;

struct Bucket {
    /// Clock time at which every byte admitted so far has been paid for at the limit.
    free_at: Duration,
    last_reload: Option<Duration>,
    schedule: Schedule,
    limit: Limit,
}

/// The shared throttle: a token bucket kept as "the link is busy until `free_at`"
/// (the generic cell rate algorithm), which needs no refill arithmetic and handles a
/// limit change by rescaling the time still owed.
pub struct Throttle {
    clock: Arc<dyn Clock>,
    source: ScheduleSource,
    local_offset: UtcOffset,
    /// Held for the whole of one `acquire` so that uploads are admitted in turn: the
    /// holder pays its bytes, others queue behind it.
    gate: Mutex<Bucket>,
}

/// Burst allowed after idle time: this much time's worth of bytes. Small, so that any
/// 10 s window stays within 1% of the limit on account of bursts.
const BURST: Duration = Duration::from_millis(50);
/// How often the schedule is re-read, and the longest single wait.
const RELOAD: Duration = Duration::from_secs(1);
/// The largest part [`Throttle::grant`] admits, in time at the limit: bytes land within
/// 0.5% of a 10 s window of when they are paid for. A whole default chunk (4 MiB) is
/// 0.67 s at 50 Mbps, 6.7% of a window.
pub const PART_TIME: Duration = Duration::from_millis(50);
/// The smallest part [`Throttle::grant`] admits (64 ms at the lowest limit), so that a
/// paced chunk is not sent in thousands of tiny writes or requests.
pub const MIN_PART: u64 = 4 << 10;

impl fmt::Debug for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Throttle").field("local_offset", &self.local_offset).finish()
    }
}

impl Throttle {
    /// A throttle reading its schedule from `source`; work hours are evaluated at
    /// `local_offset` from UTC.
    pub fn new(clock: Arc<dyn Clock>, local_offset: UtcOffset, source: ScheduleSource) -> Throttle {
        let now = clock.elapsed();
        Throttle {
            clock,
            source,
            local_offset,
            gate: Mutex::new(Bucket {
                free_at: now,
                last_reload: None,
                schedule: Schedule::unlimited(),
                limit: Limit::Unlimited,
            }),
        }
    }

    /// A throttle that never waits.
    pub fn unlimited() -> Throttle {
        Self::new(Arc::new(SystemClock::default()), UtcOffset::UTC, Box::new(|| None))
    }

    /// Re-read the schedule (at most once per [`RELOAD`]) and apply the limit in force.
    fn refresh(&self, b: &mut Bucket, now: Duration) {
        if b.last_reload.is_none_or(|t| now.saturating_sub(t) >= RELOAD) {
            if let Some(s) = (self.source)() {
                b.schedule = s;
            }
            b.last_reload = Some(now);
        }
        let limit = b.schedule.limit_at(self.clock.now_utc().to_offset(self.local_offset));
        if limit != b.limit {
            b.free_at = match (b.limit.bytes_per_sec(), limit.bytes_per_sec()) {
                // Bytes still owed at the old rate are owed at the new one.
                (Some(old), Some(new)) if b.free_at > now => {
                    now + Duration::from_secs_f64((b.free_at - now).as_secs_f64() * old / new)
                }
                _ => now,
            };
            b.limit = limit;
        }
    }

    /// The limit in force now.
    pub fn current_limit(&self) -> Limit {
        let mut b = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(&mut b, self.clock.elapsed());
        b.limit
    }

    /// Wait until `bytes` may be sent.
    pub fn acquire(&self, bytes: u64) {
        self.admit(|_| bytes);
    }

    /// Wait until part of an upload with `remaining` bytes left may be sent, and return
    /// the part's size: everything when there is no limit, else at most [`PART_TIME`]'s
    /// worth at the limit in force (and at least [`MIN_PART`]), so that a limit changed
    /// in the middle of a chunk applies from its next part.
    pub fn grant(&self, remaining: u64) -> u64 {
        self.admit(|rate| match rate {
            None => remaining,
            // Float to integer saturates; a part is at most a few MB at any valid limit.
            Some(rate) => ((rate * PART_TIME.as_secs_f64()) as u64).max(MIN_PART).min(remaining),
        })
    }

    /// Wait until `size(rate in force)` bytes may be sent; returns that size.
    fn admit(&self, size: impl FnOnce(Option<f64>) -> u64) -> u64 {
        let mut b = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.elapsed();
        self.refresh(&mut b, now);
        let bytes = size(b.limit.bytes_per_sec());
        let Some(rate) = b.limit.bytes_per_sec() else { return bytes };
        b.free_at = b.free_at.max(now.saturating_sub(BURST)) + Duration::from_secs_f64(bytes as f64 / rate);
        // Bounded: each pass sleeps up to a second towards `free_at`, which moves only
        // when the limit changes (and then by a finite rescale, or to now).
        for _ in 0..u32::MAX {
            let now = self.clock.elapsed();
            self.refresh(&mut b, now);
            if b.free_at <= now || b.limit == Limit::Unlimited {
                return bytes;
            }
            self.clock.sleep((b.free_at - now).min(RELOAD));
        }
        bytes
    }
}

/// Paced chunk uploads take their parts from the throttle.
impl tern_store::Pacer for Throttle {
    fn grant(&self, remaining: u64) -> u64 {
        Throttle::grant(self, remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn parses_rates_with_decimal_prefixes() {
        assert_eq!(Limit::parse("50Mbps").unwrap(), Limit::Bps(50_000_000));
        assert_eq!(Limit::parse("512Kbps").unwrap(), Limit::Bps(512_000));
        assert_eq!(Limit::parse("1.5 Mbps").unwrap(), Limit::Bps(1_500_000));
        assert_eq!(Limit::parse("1023mbps").unwrap(), Limit::Bps(1_023_000_000));
        assert_eq!(Limit::parse("Unlimited").unwrap(), Limit::Unlimited);
        assert_eq!(Limit::parse("1Gbps").unwrap(), Limit::Bps(1_000_000_000));
        for bad in
            ["511Kbps", "1024Mbps", "1.1Gbps", "50", "50MB", "x", "", "1.2.3Mbps", "99999999999999999999Mbps"]
        {
            assert!(Limit::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Limit::Bps(50_000_000).to_string(), "50Mbps");
        assert_eq!(Limit::Bps(1_500_000).to_string(), "1500Kbps");
    }

    #[test]
    fn days_and_hours() {
        assert_eq!(parse_days("Mon-Fri").unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(parse_days("Fri-Mon").unwrap(), vec![0, 4, 5, 6]);
        assert_eq!(parse_days("sat,sun").unwrap(), vec![5, 6]);
        assert!(parse_days("Mon-Funday").is_err());
        assert_eq!(parse_hours("08:00-18:00").unwrap(), (480, 1080));
        for bad in ["8-18", "25:00-26:00", "08:00-08:00", "08:60-09:00"] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
        let s = Schedule {
            work_limit: Limit::Bps(1_000_000),
            off_limit: Limit::Unlimited,
            work_days: vec![0, 1, 2, 3, 4],
            work_start_min: 22 * 60,
            work_end_min: 6 * 60,
        };
        // 2026-01-05 is a Monday.
        assert!(s.is_work_time(datetime!(2026-01-05 23:00 UTC)));
        assert!(s.is_work_time(datetime!(2026-01-06 05:59 UTC)));
        assert!(!s.is_work_time(datetime!(2026-01-05 05:00 UTC)), "Monday early = Sunday night");
        assert!(!s.is_work_time(datetime!(2026-01-05 12:00 UTC)));
    }

    /// Drive `acquire` with `piece`-byte requests for `secs` virtual seconds; returns
    /// (virtual time in seconds, cumulative bytes) after each request.
    fn drive(t: &Throttle, clock: &VirtualClock, piece: u64, secs: f64) -> Vec<(f64, u64)> {
        let mut log = vec![(clock.elapsed().as_secs_f64(), 0)];
        let mut total = 0;
        for _ in 0..10_000_000 {
            if clock.elapsed().as_secs_f64() >= secs {
                break;
            }
            t.acquire(piece);
            total += piece;
            log.push((clock.elapsed().as_secs_f64(), total));
        }
        log
    }

    /// Bytes admitted in [a, b) according to the log (requests admitted at their time).
    fn bytes_in(log: &[(f64, u64)], a: f64, b: f64) -> u64 {
        let at = |t: f64| log.iter().take_while(|(x, _)| *x <= t).last().map_or(0, |e| e.1);
        at(b) - at(a)
    }

    fn fixed(limit: Limit) -> ScheduleSource {
        Box::new(move || Some(Schedule { work_limit: limit, off_limit: limit, ..Schedule::unlimited() }))
    }

    #[test]
    fn rate_over_every_10s_window_is_within_5_percent() {
        for (limit, piece) in [(50_000_000u64, 256 << 10), (512_000, 16 << 10), (1_023_000_000, 1 << 20)] {
            let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
            let t = Throttle::new(clock.clone(), UtcOffset::UTC, fixed(Limit::Bps(limit)));
            let log = drive(&t, &clock, piece, 60.0);
            let want = limit as f64 / 8.0 * 10.0;
            for start in 0..50 {
                let got = bytes_in(&log, start as f64, start as f64 + 10.0) as f64;
                assert!(
                    (got / want - 1.0).abs() < 0.05,
                    "limit {limit}, window at {start}s: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn crossing_into_off_hours_switches_the_limit() {
        // Monday 17:59:00 local (UTC+2): work until 18:00, then the off limit.
        let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 15:59:00 UTC)));
        let sched = Schedule {
            work_limit: Limit::Bps(10_000_000),
            off_limit: Limit::Bps(80_000_000),
            work_days: vec![0, 1, 2, 3, 4],
            work_start_min: 8 * 60,
            work_end_min: 18 * 60,
        };
        let offset = UtcOffset::from_hms(2, 0, 0).unwrap();
        let t = Throttle::new(clock.clone(), offset, Box::new(move || Some(sched.clone())));
        let log = drive(&t, &clock, 64 << 10, 120.0);
        let work = bytes_in(&log, 10.0, 50.0) as f64 / 40.0;
        let off = bytes_in(&log, 70.0, 110.0) as f64 / 40.0;
        assert!((work / 1_250_000.0 - 1.0).abs() < 0.05, "work rate {work}");
        assert!((off / 10_000_000.0 - 1.0).abs() < 0.05, "off rate {off}");
    }

    #[test]
    fn a_changed_schedule_applies_within_a_second() {
        let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
        let limit = Arc::new(Mutex::new(Limit::Bps(8_000_000)));
        let l2 = limit.clone();
        let t = Throttle::new(
            clock.clone(),
            UtcOffset::UTC,
            Box::new(move || {
                let l = *l2.lock().unwrap();
                Some(Schedule { work_limit: l, off_limit: l, ..Schedule::unlimited() })
            }),
        );
        let _ = drive(&t, &clock, 64 << 10, 20.0);
        *limit.lock().unwrap() = Limit::Bps(16_000_000);
        let log = drive(&t, &clock, 64 << 10, 40.0);
        let rate = bytes_in(&log, 22.0, 38.0) as f64 / 16.0;
        assert!((rate / 2_000_000.0 - 1.0).abs() < 0.05, "{rate}");
        *limit.lock().unwrap() = Limit::Unlimited;
        let before = clock.elapsed();
        clock.advance(RELOAD);
        t.acquire(1 << 30);
        assert_eq!(clock.elapsed(), before + RELOAD, "unlimited never waits");
    }
}
