//! Recovery point manifests (docs/formats/manifest.md): JSON, sealed in an envelope
//! of kind `Manifest`, written last so that a point exists iff its manifest does.

use serde::{Deserialize, Serialize};
use tern_chunk::{chunk_address, open_envelope, seal, BaseIndex, Key, ObjectKind};

use crate::vm::Firmware;
use crate::{Error, Result};

/// The `format` field. NEVER CHANGE.
pub const MANIFEST_FORMAT: &str = "tern-manifest";
/// The newest version this build reads and writes; readers refuse versions they do not
/// know. A point with no segments whose base is its own is written as version 1 (what
/// older tern reads); any other as version 2 ([`Manifest::needed_version`]).
pub const MANIFEST_VERSION: u32 = 2;

/// The VM as recorded in a point: enough to recreate it elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVm {
    /// VM id (names the store prefix).
    pub id: String,
    /// VM name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Firmware.
    pub firmware: Firmware,
}

/// One disk of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// Disk number in the VM (0 boots); names the index object.
    pub index: u32,
    /// File name of the source image (no directories), for naming outputs.
    pub source_name: String,
    /// Format of the source image (`raw`, `qcow2`, `vhd`, `vhdx`).
    pub source_format: String,
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Number of chunks (= ceil(virtual_size / chunk_size)).
    pub chunk_count: u64,
    /// Chunks that are not zero (have an object).
    pub data_chunks: u64,
    /// Keyed BLAKE3 (the store key's address subkey) of the encoded base index, hex.
    pub index_digest: String,
    /// SHA-256 of the guest content (`virtual_size` bytes) as of the point's instant,
    /// 64 lowercase hex digits; computed while replicating. Optional so that a point
    /// made without it (by a future delta cycle, say) still reads; migrate then hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Version 2: the point whose base index this disk reads (`index_digest` is that
    /// index's); absent: this point's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_point: Option<String>,
    /// Version 2: the segments since the base, oldest first; a byte reads from the
    /// newest segment that covers it, else from the base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentRef>,
}

/// One cycle's segment of a disk, as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// The point (cycle) that wrote it: its pieces are under that point's name.
    pub point_id: String,
    /// Guest bytes its extents cover (data and zero).
    pub changed_bytes: u64,
    /// Envelope bytes stored.
    pub stored_bytes: u64,
    /// Its pieces, in ascending and disjoint guest ranges.
    pub pieces: Vec<PieceRef>,
}

/// One piece of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRef {
    /// First guest byte the piece covers.
    pub start: u64,
    /// One past its last.
    pub end: u64,
    /// Keyed BLAKE3 (the address function) of the piece's plaintext, hex.
    pub digest: String,
}

impl ManifestDisk {
    /// The point whose base index this disk reads.
    pub fn base_point<'a>(&'a self, point_id: &'a str) -> &'a str {
        self.base_point.as_deref().unwrap_or(point_id)
    }

    /// Guest bytes the newest segment changed, if this point has one of its own.
    pub fn delta_bytes(&self, point_id: &str) -> Option<u64> {
        self.segments.last().filter(|s| s.point_id == point_id).map(|s| s.changed_bytes)
    }
}

/// A recovery point manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// The point id: sortable, `YYYYMMDDTHHMMSSZ-` and 8 random hex digits.
    pub point_id: String,
    /// The instant the disks are as of (RFC 3339, UTC).
    pub instant: String,
    /// The VM.
    pub vm: ManifestVm,
    /// Every disk, in order.
    pub disks: Vec<ManifestDisk>,
}

/// A new sortable point id for `instant`.
pub fn new_point_id(instant: time::OffsetDateTime) -> Result<String> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let ts = instant
        .to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .map_err(|e| Error::invalid(format!("formatting a point id: {e}")))?;
    let mut r = [0u8; 4];
    crate::random_bytes(&mut r)?;
    Ok(format!("{ts}-{}", hex::encode(r)))
}

/// A new point id for `instant` that sorts after `after` (the VM's newest point), so
/// that points made within one second, or after the clock stepped back, still sort
/// in the order they were made: within `after`'s second (or before it), the id takes
/// `after`'s time and its random part plus one.
pub fn next_point_id(instant: time::OffsetDateTime, after: Option<&str>) -> Result<String> {
    let id = new_point_id(instant)?;
    let Some(prev) = after else { return Ok(id) };
    check_point_id(prev)?;
    if id.as_str() > prev && id[..16] != prev[..16] {
        return Ok(id);
    }
    let n = u32::from_str_radix(&prev[17..], 16).map_err(|_| Error::invalid(format!("point id {prev}")))?;
    let n = n.checked_add(1).ok_or_else(|| {
        Error::new(crate::ErrorKind::Busy, format!("no point id sorts after {prev} within its second: retry"))
    })?;
    Ok(format!("{}{n:08x}", &prev[..17]))
}

/// Check a point id's shape (it becomes part of object names).
pub fn check_point_id(id: &str) -> Result<()> {
    let ok = id.len() == 25
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            16 => b == b'-',
            17..=24 => b.is_ascii_hexdigit() && !b.is_ascii_uppercase(),
            _ => b.is_ascii_digit(),
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!("{id:?} is not a point id (like 20260101T120000Z-0a1b2c3d)")))
    }
}

/// The digest recorded for an encoded index.
pub fn index_digest(key: &Key, index: &BaseIndex) -> String {
    chunk_address(key, &index.encode()).to_hex()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// The version a manifest with these disks is written as: 1 when every disk is a
    /// base of its own with no segments, else 2.
    pub fn needed_version(disks: &[ManifestDisk]) -> u32 {
        if disks.iter().all(|d| d.base_point.is_none() && d.segments.is_empty()) {
            1
        } else {
            2
        }
    }

    /// Whether any disk has segments (a delta point).
    pub fn is_delta(&self) -> bool {
        self.disks.iter().any(|d| !d.segments.is_empty())
    }

    /// Seal into an envelope.
    pub fn seal(&self, key: &Key) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(self).map_err(|e| Error::invalid(format!("encoding manifest: {e}")))?;
        Ok(seal(key, ObjectKind::Manifest, &json, 3)?)
    }

    /// Open an envelope and check every field that later code relies on.
    ///
    /// `vm_id` and `point_id` name the place it was read from: a manifest is bound to
    /// it. A valid manifest copied or moved under another point's or VM's name (a
    /// rollback dressed as the latest point, another VM's disks under this VM's name)
    /// authenticates, so the ids it carries are checked against the place, and a
    /// mismatch is `Corrupt`, naming both. Every reader goes through here.
    pub fn open(key: &Key, envelope: &[u8], vm_id: &str, point_id: &str) -> Result<Manifest> {
        let json = open_envelope(key, ObjectKind::Manifest, envelope)?;
        let m: Manifest = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupt(format!("manifest is not valid: {e}")))?;
        m.check()?;
        if m.vm.id != vm_id || m.point_id != point_id {
            return Err(Error::corrupt(format!(
                "the manifest stored as point {point_id} of VM {vm_id} describes point {} of VM {} ({}): \
                 it was copied or moved there, and is refused",
                m.point_id, m.vm.id, m.vm.name
            )));
        }
        Ok(m)
    }

    /// Structural checks: format, version, disk numbering, sizes.
    pub fn check(&self) -> Result<()> {
        if self.format != MANIFEST_FORMAT {
            return Err(Error::corrupt(format!(
                "manifest format is {:?}, expected {MANIFEST_FORMAT:?}",
                self.format
            )));
        }
        if !(1..=MANIFEST_VERSION).contains(&self.version) {
            return Err(Error::corrupt(format!(
                "manifest version {} is not supported (this tern reads versions 1 to {MANIFEST_VERSION})",
                self.version
            )));
        }
        if self.version < Self::needed_version(&self.disks) {
            return Err(Error::corrupt(format!(
                "manifest version {} lists segments or another point's base, which need version 2",
                self.version
            )));
        }
        check_point_id(&self.point_id).map_err(|e| Error::corrupt(format!("manifest: {e}")))?;
        crate::vm::check_name(&self.vm.name).map_err(|e| Error::corrupt(format!("manifest: {e}")))?;
        if self.disks.is_empty() {
            return Err(Error::corrupt(format!("manifest of point {} lists no disks", self.point_id)));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.index as usize != i {
                return Err(Error::corrupt(format!("manifest disk {i} says it is disk {}", d.index)));
            }
            if d.chunk_size == 0 || d.chunk_count != d.virtual_size.div_ceil(d.chunk_size as u64) {
                return Err(Error::corrupt(format!(
                    "manifest disk {i}: {} chunks of {} bytes do not cover {} bytes",
                    d.chunk_count, d.chunk_size, d.virtual_size
                )));
            }
            if let Some(base) = &d.base_point {
                check_point_id(base).map_err(|e| Error::corrupt(format!("manifest disk {i}: base: {e}")))?;
                if base.as_str() >= self.point_id.as_str() {
                    return Err(Error::corrupt(format!(
                        "manifest disk {i}: base point {base} is not older than the point"
                    )));
                }
            }
            if !d.segments.is_empty() && d.base_point.is_none() {
                return Err(Error::corrupt(format!(
                    "manifest disk {i} has segments but names no base point"
                )));
            }
            let mut prev = d.base_point(&self.point_id).to_string();
            for (k, seg) in d.segments.iter().enumerate() {
                let bad = |m: String| Error::corrupt(format!("manifest disk {i} segment {k}: {m}"));
                check_point_id(&seg.point_id).map_err(|e| bad(e.to_string()))?;
                if seg.point_id <= prev {
                    return Err(bad(format!(
                        "point {} is not newer than the base and the segments before it",
                        seg.point_id
                    )));
                }
                if seg.point_id.as_str() > self.point_id.as_str() {
                    return Err(bad(format!("point {} is newer than the point itself", seg.point_id)));
                }
                prev = seg.point_id.clone();
                let mut end = 0u64;
                for (j, p) in seg.pieces.iter().enumerate() {
                    if p.start < end || p.start > p.end || p.end > d.virtual_size || !is_hex64(&p.digest) {
                        return Err(bad(format!(
                            "piece {j} ({}..{}) is out of order, outside the disk or has a malformed digest",
                            p.start, p.end
                        )));
                    }
                    end = p.end;
                }
            }
            if let Some(sha) = &d.sha256 {
                if !is_hex64(sha) {
                    return Err(Error::corrupt(format!(
                        "manifest disk {i}: sha256 {sha:?} is not 64 hex digits"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "ab";
    const POINT: &str = "20260102T030405Z-0a1b2c3d";

    #[test]
    fn point_ids_sort_by_time_and_check() {
        let t1 = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        let t2 = time::macros::datetime!(2026-01-02 03:04:06 UTC);
        let a = new_point_id(t1).unwrap();
        let b = new_point_id(t2).unwrap();
        assert!(a.starts_with("20260102T030405Z-"));
        assert!(a < b);
        check_point_id(&a).unwrap();
        // Within one second, or with the clock stepped back, ids still sort in order.
        let c = next_point_id(t1, Some(&b)).unwrap();
        assert!(c > b && c.starts_with("20260102T030406Z-"), "{c}");
        let d = next_point_id(t2, Some(&c)).unwrap();
        assert!(d > c, "{d}");
        let later = time::macros::datetime!(2026-01-02 03:04:07 UTC);
        assert!(next_point_id(later, Some(&d)).unwrap().starts_with("20260102T030407Z-"));
        for bad in ["", "../x", "20260102T030405Z-0A1B2C3D", "20260102T030405Z_0a1b2c3d"] {
            assert!(check_point_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seal_open_and_refusals() {
        let key = Key::from_bytes([3; 32]);
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: 1,
            point_id: POINT.into(),
            instant: "2026-01-02T03:04:05Z".into(),
            vm: ManifestVm {
                id: VM.into(),
                name: "web".into(),
                cpus: 2,
                memory_bytes: 1 << 30,
                firmware: Firmware::Bios,
            },
            disks: vec![ManifestDisk {
                index: 0,
                source_name: "web.qcow2".into(),
                source_format: "qcow2".into(),
                virtual_size: 10 << 20,
                chunk_size: 4 << 20,
                chunk_count: 3,
                data_chunks: 1,
                index_digest: "00".into(),
                sha256: Some("ab".repeat(32)),
                base_point: None,
                segments: Vec::new(),
            }],
        };
        let env = m.seal(&key).unwrap();
        assert_eq!(Manifest::open(&key, &env, VM, POINT).unwrap(), m);
        assert!(Manifest::open(&Key::from_bytes([4; 32]), &env, VM, POINT).is_err());
        // Bound to its place: read under another point's or VM's name, it is refused.
        for (vm, point) in [(VM, "20260102T030405Z-ffffffff"), ("cd", POINT)] {
            let e = Manifest::open(&key, &env, vm, point).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
            assert!(e.to_string().contains("copied or moved"), "{e}");
        }
        let mut bad = m.clone();
        bad.version = 3;
        assert!(Manifest::open(&key, &bad.seal(&key).unwrap(), VM, POINT)
            .unwrap_err()
            .to_string()
            .contains("version 3"));
        let mut bad = m.clone();
        bad.disks[0].chunk_count = 2;
        assert!(Manifest::open(&key, &bad.seal(&key).unwrap(), VM, POINT).is_err());
        let mut bad = m.clone();
        bad.disks[0].sha256 = Some("AB".repeat(32));
        assert!(Manifest::open(&key, &bad.seal(&key).unwrap(), VM, POINT)
            .unwrap_err()
            .to_string()
            .contains("sha256"));
        // Version 2: segments on another point's base.
        let seg = |id: &str| SegmentRef {
            point_id: id.into(),
            changed_bytes: 512,
            stored_bytes: 600,
            pieces: vec![PieceRef { start: 0, end: 512, digest: "cd".repeat(32) }],
        };
        let mut v2 = m.clone();
        v2.version = 2;
        v2.disks[0].base_point = Some("20260102T030403Z-00000000".into());
        v2.disks[0].segments = vec![seg("20260102T030404Z-00000000"), seg(POINT)];
        assert_eq!(Manifest::needed_version(&v2.disks), 2);
        assert_eq!(Manifest::open(&key, &v2.seal(&key).unwrap(), VM, POINT).unwrap(), v2);
        assert_eq!(v2.disks[0].delta_bytes(POINT), Some(512));
        let refused = |m: &Manifest, want: &str| {
            let e = Manifest::open(&key, &m.seal(&key).unwrap(), VM, POINT).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        };
        let mut bad = v2.clone();
        bad.version = 1;
        refused(&bad, "need version 2");
        let mut bad = v2.clone();
        bad.disks[0].segments.swap(0, 1);
        refused(&bad, "not newer");
        let mut bad = v2.clone();
        bad.disks[0].segments[1].pieces[0].end = 11 << 20;
        refused(&bad, "outside the disk");
        let mut bad = v2.clone();
        bad.disks[0].base_point = Some(POINT.into());
        refused(&bad, "not older");
        let mut bad = v2.clone();
        bad.disks[0].base_point = None;
        refused(&bad, "names no base point");
        // Written before the field existed: still reads, as None.
        let mut old = m;
        old.disks[0].sha256 = None;
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("sha256"));
        assert_eq!(Manifest::open(&key, &old.seal(&key).unwrap(), VM, POINT).unwrap(), old);
    }
}
