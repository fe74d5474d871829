//! What garbage collection and its writers need from a store (docs/continuous.md,
//! "Garbage collection protocol"): leases, the collector's lock, listings with the
//! store's own modification times, refreshing an object that is reused, deleting a
//! manifest alone, and deleting what a listing named.
//!
//! Leases and the lock are small plain JSON objects (`leases/<op-id>`, `gc/lock`):
//! they carry no data and are advisory to tern's own writers; whoever can write the
//! store can delete it anyway.

use std::time::SystemTime;

use bytes::Bytes;
use object_store::path::Path;
use object_store::PutMode;
use tern_chunk::ChunkAddress;

use super::{Object, Store};
use crate::error::{ErrorKind, Result};
use crate::layout;
use crate::paced::Pacer;

const LEASES: &str = "leases";
const GC_LOCK: &str = "gc/lock";

/// What a listed object is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedKind {
    /// A chunk, by address.
    Chunk(ChunkAddress),
    /// A base index: VM, point, disk.
    Index(String, String, u32),
    /// A segment piece: VM, point, disk, piece.
    Segment(String, String, u32, u32),
    /// A manifest: VM, point.
    Manifest(String, String),
    /// Anything else under `vms/` (not tern's, or a staging leftover).
    Other,
}

/// One listed object with the store's modification time.
#[derive(Debug, Clone)]
pub struct Listed {
    /// Its name in the store.
    pub path: String,
    /// What it is.
    pub kind: ListedKind,
    /// Bytes.
    pub size: u64,
    /// When the store last wrote it (the store's clock).
    pub modified: SystemTime,
}

fn lease_path(id: &str) -> Path {
    Path::from(format!("{LEASES}/{id}"))
}

fn check_op_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{id:?} is not an operation id"))
    }
}

/// Parse `vms/<vm>/points/<point>/<name>` into what it is.
fn classify_vm_object(path: &Path) -> ListedKind {
    let parts: Vec<String> = path.parts().map(|p| p.as_ref().to_string()).collect();
    let [vms, vm, points, point, name] = parts.as_slice() else { return ListedKind::Other };
    if vms != "vms" || points != "points" {
        return ListedKind::Other;
    }
    if name == "manifest" {
        return ListedKind::Manifest(vm.clone(), point.clone());
    }
    let Some(rest) = name.strip_prefix("disk-") else { return ListedKind::Other };
    if let Some(n) = rest.strip_suffix(".index") {
        if let Ok(d) = n.parse() {
            return ListedKind::Index(vm.clone(), point.clone(), d);
        }
    }
    if let Some((d, k)) = rest.split_once(".seg-") {
        if let (Ok(d), Ok(k)) = (d.parse(), k.parse()) {
            return ListedKind::Segment(vm.clone(), point.clone(), d, k);
        }
    }
    ListedKind::Other
}

impl Store {
    /// Create lease `id` (create-only): [`ErrorKind::AlreadyExists`] if it exists.
    pub async fn create_lease(&self, id: &str, body: Bytes) -> Result<()> {
        check_op_id(id).map_err(|e| self.invalid(e))?;
        let path = lease_path(id);
        self.put(&path, body, PutMode::Create, &Object::Other(&path)).await
    }

    /// Rewrite lease `id` (renewal).
    pub async fn renew_lease(&self, id: &str, body: Bytes) -> Result<()> {
        check_op_id(id).map_err(|e| self.invalid(e))?;
        let path = lease_path(id);
        self.put(&path, body, PutMode::Overwrite, &Object::Other(&path)).await
    }

    /// Remove lease `id` (missing is success).
    pub async fn delete_lease(&self, id: &str) -> Result<()> {
        check_op_id(id).map_err(|e| self.invalid(e))?;
        let path = lease_path(id);
        self.delete(&path, &Object::Other(&path)).await
    }

    /// Every lease: id, modification time, body.
    pub async fn list_leases(&self) -> Result<Vec<(String, SystemTime, Bytes)>> {
        let mut out = Vec::new();
        for meta in self.list(&Path::from(LEASES)).await? {
            let Some(id) = meta.location.filename().map(str::to_string) else { continue };
            match self.get(&meta.location, &Object::Other(&meta.location)).await {
                Ok(body) => out.push((id, meta.last_modified.into(), body)),
                // Deleted since the listing: its writer is done.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Take the collector's lock (create-only): [`ErrorKind::AlreadyExists`] if held.
    pub async fn create_gc_lock(&self, body: Bytes) -> Result<()> {
        let path = Path::from(GC_LOCK);
        self.put(&path, body, PutMode::Create, &Object::Other(&path)).await
    }

    /// Rewrite the collector's lock (renewal while it runs).
    pub async fn renew_gc_lock(&self, body: Bytes) -> Result<()> {
        let path = Path::from(GC_LOCK);
        self.put(&path, body, PutMode::Overwrite, &Object::Other(&path)).await
    }

    /// The collector's lock, if held: modification time and body.
    pub async fn gc_lock(&self) -> Result<Option<(SystemTime, Bytes)>> {
        let path = Path::from(GC_LOCK);
        match self.inner.head(&path).await {
            Ok(meta) => match self.get(&path, &Object::Other(&path)).await {
                Ok(body) => Ok(Some((meta.last_modified.into(), body))),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.backend_error(e, &Object::Other(&path), "head")),
        }
    }

    /// Release the collector's lock.
    pub async fn delete_gc_lock(&self) -> Result<()> {
        let path = Path::from(GC_LOCK);
        self.delete(&path, &Object::Other(&path)).await
    }

    /// Every chunk, with sizes and modification times.
    pub async fn list_chunks_meta(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for meta in self.list(&layout::chunks_prefix()).await? {
            if let Some(a) = layout::parse_chunk_path(&meta.location) {
                out.push(Listed {
                    path: meta.location.to_string(),
                    kind: ListedKind::Chunk(a),
                    size: meta.size,
                    modified: meta.last_modified.into(),
                });
            }
        }
        Ok(out)
    }

    /// Every object under `vms/`, classified, with sizes and modification times.
    pub async fn list_vm_objects(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for meta in self.list(&layout::vms_prefix()).await? {
            out.push(Listed {
                path: meta.location.to_string(),
                kind: classify_vm_object(&meta.location),
                size: meta.size,
                modified: meta.last_modified.into(),
            });
        }
        Ok(out)
    }

    /// Delete a listed chunk, index or segment piece (manifests go by
    /// [`Store::delete_manifest`]; anything else is refused).
    pub async fn delete_listed(&self, l: &Listed) -> Result<()> {
        let path = Path::from(l.path.as_str());
        match &l.kind {
            ListedKind::Chunk(a) => self.delete_chunk(a).await,
            ListedKind::Index(..) | ListedKind::Segment(..) => {
                self.delete(&path, &Object::Other(&path)).await
            }
            _ => Err(self.invalid(format!("{} is not an object garbage collection deletes", l.path))),
        }
    }

    /// Delete a point's manifest alone: the point stops existing; what it referenced
    /// stays until garbage collection finds nothing else references it.
    pub async fn delete_manifest(&self, vm: &str, point: &str) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::manifest_path(&vm, &point);
        self.delete(&path, &Object::Manifest(&path)).await
    }

    /// Store a chunk envelope even if the chunk exists, so that its modification time
    /// is now: how a writer reuses a chunk no point it pins references (the GC
    /// protocol's rule 3), paced like [`Store::put_chunk_paced`].
    pub async fn refresh_chunk_paced(
        &self,
        address: &ChunkAddress,
        envelope: Bytes,
        pacer: &dyn Pacer,
    ) -> Result<()> {
        let path = layout::chunk_path(address);
        self.put_paced(&path, envelope, PutMode::Overwrite, &Object::Chunk(address), pacer).await
    }
}
