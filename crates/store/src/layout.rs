//! Object names: where each kind of object lives under the store URL
//! (docs/formats/store-layout.md, "Layout").
//!
//! ```text
//! config.json                                  store config, plain JSON, written once
//! chunks/<first 2 hex>/<64 hex>                chunk envelopes, content-addressed
//! vms/<vm-id>/points/<point-id>/disk-<n>.index base index envelopes
//! vms/<vm-id>/points/<point-id>/manifest       manifest envelope, written LAST
//! ```
//!
//! Chunks are sharded by the first two hex digits of their address so that a local
//! folder never holds millions of entries in one directory (256 shards, ~4000 chunks
//! each per TiB of 4 MiB chunks) and listings can be split by shard.
//!
//! VM and point ids become path segments, so they are restricted to a portable set:
//! 1 to 128 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. That keeps them
//! identical on every backend (no percent-encoding, no `..`, no case-folding surprises
//! beyond the backend's own).

use std::fmt;

use object_store::path::Path;
use tern_chunk::ChunkAddress;

/// The store configuration object.
pub(crate) const CONFIG: &str = "config.json";
const CHUNKS: &str = "chunks";
const VMS: &str = "vms";
const POINTS: &str = "points";
const MANIFEST: &str = "manifest";
const MAX_ID_LEN: usize = 128;

pub(crate) fn config_path() -> Path {
    Path::from(CONFIG)
}

pub(crate) fn chunks_prefix() -> Path {
    Path::from(CHUNKS)
}

pub(crate) fn chunk_path(address: &ChunkAddress) -> Path {
    let hex = address.to_hex();
    Path::from(format!("{CHUNKS}/{}/{hex}", &hex[..2]))
}

pub(crate) fn vms_prefix() -> Path {
    Path::from(VMS)
}

pub(crate) fn points_prefix(vm: &VmId) -> Path {
    Path::from(format!("{VMS}/{}/{POINTS}", vm.0))
}

pub(crate) fn point_prefix(vm: &VmId, point: &PointId) -> Path {
    Path::from(format!("{VMS}/{}/{POINTS}/{}", vm.0, point.0))
}

pub(crate) fn index_path(vm: &VmId, point: &PointId, disk: u32) -> Path {
    Path::from(format!("{VMS}/{}/{POINTS}/{}/disk-{disk}.index", vm.0, point.0))
}

pub(crate) fn segment_path(vm: &VmId, point: &PointId, disk: u32, piece: u32) -> Path {
    Path::from(format!("{VMS}/{}/{POINTS}/{}/disk-{disk}.seg-{piece}", vm.0, point.0))
}

pub(crate) fn manifest_path(vm: &VmId, point: &PointId) -> Path {
    Path::from(format!("{VMS}/{}/{POINTS}/{}/{MANIFEST}", vm.0, point.0))
}

/// The chunk address named by a listed object, if it is a well-formed chunk object:
/// `chunks/<2 hex>/<64 hex>` with the shard matching the address. Anything else under
/// `chunks/` (a stranger's file, an editor's backup) is not a chunk.
pub(crate) fn parse_chunk_path(path: &Path) -> Option<ChunkAddress> {
    let mut parts = path.parts();
    if parts.next()?.as_ref() != CHUNKS {
        return None;
    }
    let shard = parts.next()?;
    let name = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let name = name.as_ref();
    // Only lowercase: the layout writes lowercase, and an uppercase twin would be a
    // second object for one address.
    if name.len() != 64 || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let address: ChunkAddress = name.parse().ok()?;
    (shard.as_ref() == &name[..2]).then_some(address)
}

/// The point id of a listed object under `vms/<vm>/points/` if it is that point's
/// manifest.
pub(crate) fn parse_manifest_path(vm: &VmId, path: &Path) -> Option<String> {
    let parts: Vec<_> = path.parts().collect();
    match parts.as_slice() {
        [v, vm_id, p, point, m]
            if v.as_ref() == VMS
                && vm_id.as_ref() == vm.0
                && p.as_ref() == POINTS
                && m.as_ref() == MANIFEST
                && check_id(point.as_ref()).is_ok() =>
        {
            Some(point.as_ref().to_string())
        }
        _ => None,
    }
}

/// A validated VM id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmId<'a>(&'a str);

/// A validated recovery point id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointId<'a>(&'a str);

impl<'a> VmId<'a> {
    pub(crate) fn new(id: &'a str) -> Result<Self, String> {
        check_id(id).map_err(|why| format!("VM id {id:?} {why}"))?;
        Ok(VmId(id))
    }
}

impl<'a> PointId<'a> {
    pub(crate) fn new(id: &'a str) -> Result<Self, String> {
        check_id(id).map_err(|why| format!("point id {id:?} {why}"))?;
        Ok(PointId(id))
    }
}

impl fmt::Display for VmId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Checks an id against the portable set; the error completes "id X ...".
pub(crate) fn check_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.len() > MAX_ID_LEN {
        return Err("is longer than 128 bytes");
    }
    if !id.as_bytes()[0].is_ascii_alphanumeric() {
        return Err("must start with a letter or digit");
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err("may only hold letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_paths_are_sharded_and_round_trip() {
        let address = ChunkAddress([0x1a; 32]);
        let path = chunk_path(&address);
        assert_eq!(path.as_ref(), format!("chunks/1a/{}", "1a".repeat(32)));
        assert_eq!(parse_chunk_path(&path), Some(address));
    }

    #[test]
    fn foreign_chunk_names_are_not_chunks() {
        let hex = "1a".repeat(32);
        for bad in [
            format!("chunks/1b/{hex}"),
            format!("chunks/{hex}"),
            format!("chunks/1a/{hex}/x"),
            format!("chunks/1a/{}", hex.to_uppercase()),
            "chunks/1a/notes.txt".to_string(),
            format!("other/1a/{hex}"),
        ] {
            assert_eq!(parse_chunk_path(&Path::from(bad.as_str())), None, "{bad}");
        }
    }

    #[test]
    fn point_paths() {
        let vm = VmId::new("web-01").unwrap();
        let point = PointId::new("20261101T120000Z").unwrap();
        assert_eq!(index_path(&vm, &point, 3).as_ref(), "vms/web-01/points/20261101T120000Z/disk-3.index");
        let manifest = manifest_path(&vm, &point);
        assert_eq!(parse_manifest_path(&vm, &manifest).as_deref(), Some("20261101T120000Z"));
        let index = index_path(&vm, &point, 0);
        assert_eq!(parse_manifest_path(&vm, &index), None);
    }

    #[test]
    fn ids_are_portable() {
        for good in ["a", "vm.1", "0_x-y", &"x".repeat(128)] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", "-x", &"x".repeat(129)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        let err = VmId::new("a/b").unwrap_err();
        assert!(err.contains("VM id \"a/b\""), "{err}");
    }
}
