//! Byte sizes as users type them (`4G`, `512MiB`, `1048576`) and as we print them.
//!
//! Suffixes are binary: `K`, `KiB` and `k` all mean 1024. This follows qemu-img, which
//! our users already script against; decimal units are not accepted for sizes so that
//! `8G` never silently means two different numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 512K, 20G, 1.5TiB)")]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

impl ByteSize {
    /// The number of bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseSizeError { input: s.to_string(), reason };
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(err("no number"));
        }
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            "p" | "pb" | "pib" => 50,
            _ => return Err(err("unknown unit")),
        };
        let mult = 1u64 << shift;
        if let Some((int, frac)) = num.split_once('.') {
            if frac.contains('.') {
                return Err(err("more than one decimal point"));
            }
            let int: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| err("not a number"))? };
            let frac_digits = frac.len().min(9);
            let frac_val: u64 = if frac_digits == 0 {
                0
            } else {
                frac[..frac_digits].parse().map_err(|_| err("not a number"))?
            };
            let denom = 10u64.pow(frac_digits as u32);
            let whole = int.checked_mul(mult).ok_or_else(|| err("too large"))?;
            let scaled = frac_val as u128 * mult as u128;
            if !scaled.is_multiple_of(denom as u128) {
                return Err(err("not a whole number of bytes"));
            }
            let part = (scaled / denom as u128) as u64;
            whole.checked_add(part).map(ByteSize).ok_or_else(|| err("too large"))
        } else {
            let n: u64 = num.parse().map_err(|_| err("not a number"))?;
            n.checked_mul(mult).map(ByteSize).ok_or_else(|| err("too large"))
        }
    }
}

impl fmt::Display for ByteSize {
    /// Largest binary unit that keeps one decimal: `1.5 GiB`, `512 B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        let mut v = self.0 as f64;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{:.1} {}", v, UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_suffixes() {
        assert_eq!("4096".parse::<ByteSize>().unwrap().bytes(), 4096);
        assert_eq!("512K".parse::<ByteSize>().unwrap().bytes(), 512 * 1024);
        assert_eq!("20G".parse::<ByteSize>().unwrap().bytes(), 20 << 30);
        assert_eq!("1.5TiB".parse::<ByteSize>().unwrap().bytes(), 3 << 39);
        assert_eq!("64 MiB".parse::<ByteSize>().unwrap().bytes(), 64 << 20);
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "G", "12Q", "1.2.3G", "99999999999999999999", "16384P"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert!("0.3B".parse::<ByteSize>().is_err());
    }

    #[test]
    fn displays() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.5 GiB");
    }
}
