//! GUIDs as VHDX stores them ([MS-VHDX] 2.1, which refers to [MS-DTYP] 2.3.4.2):
//! `Data1` u32, `Data2` u16 and `Data3` u16 little-endian, then `Data4` as 8 bytes.
//! The text form `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}` (parent locator
//! `parent_linkage`) prints the three integers as numbers, so it is not the byte order.

use std::fmt;
use std::io::Read;

/// A GUID in its on-disk byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID (an empty `LogGuid` means "no log").
    pub const ZERO: Guid = Guid([0; 16]);

    /// Build a GUID from its text fields, for the constants the spec lists.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6],
            d4[7],
        ])
    }

    /// Read 16 bytes of on-disk GUID.
    pub fn from_slice(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    /// Whether every byte is zero.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random (version 4) GUID from the operating system's generator. Only the
    /// uniqueness matters (it tells writers apart), not secrecy.
    pub fn random() -> std::io::Result<Guid> {
        let mut g = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut g)?;
        // Version 4, variant 1 ([RFC 4122] 4.4); Data3's high nibble is byte 7 on disk.
        g[7] = (g[7] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Ok(Guid(g))
    }

    /// Parse the text form, with or without braces, any case.
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')).unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let tail = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(tail.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    /// `{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`, upper case, as Hyper-V writes
    /// `parent_linkage`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        let d1 = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
        let d2 = u16::from_le_bytes([g[4], g[5]]);
        let d3 = u16::from_le_bytes([g[6], g[7]]);
        write!(f, "{{{d1:08X}-{d2:04X}-{d3:04X}-{:02X}{:02X}-", g[8], g[9])?;
        for b in &g[10..] {
            write!(f, "{b:02X}")?;
        }
        f.write_str("}")
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_byte_order() {
        // The BAT region GUID as the spec prints it, and as it sits in a file.
        let g = Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}").unwrap();
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xc2, 0x2d]);
        assert_eq!(g.to_string(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}");
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(g));
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A0}"), None);
        assert_eq!(Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A0Z}"), None);
        assert_eq!(Guid::parse("é"), None);
        let r = Guid::random().unwrap();
        assert_eq!(Guid::parse(&r.to_string()), Some(r));
    }
}
