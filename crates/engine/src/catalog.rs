//! Finding VMs and points in the store. The store is the truth: the state database
//! only caches what is read here, so a store URL and its key are enough on any machine.

use tern_chunk::Key;
use tern_store::Store;

use crate::{Engine, Error, ErrorKind, Manifest, PointRow, Result};

/// A point as read from the store.
#[derive(Debug, Clone)]
pub struct PointInfo {
    /// Its manifest (authenticated and checked).
    pub manifest: Manifest,
}

async fn latest_manifest(store: &Store, key: &Key, vm_id: &str) -> Result<Option<Manifest>> {
    let points = store.list_points(vm_id).await?;
    let Some(last) = points.last() else { return Ok(None) };
    let env = store.get_manifest(vm_id, last).await?;
    Ok(Some(
        Manifest::open(key, &env, vm_id, last)
            .map_err(|e| e.context(format!("manifest of point {last} of VM {vm_id}")))?,
    ))
}

/// The store id of the VM named `name` (or whose id is `name`): the local
/// registration if the store has points for it, else the VM whose latest manifest
/// carries that name.
pub async fn find_vm(engine: &Engine, store: &Store, key: &Key, name: &str) -> Result<String> {
    if let Some(vm) = engine.db().vm_get(name)? {
        if !store.list_points(&vm.id).await?.is_empty() {
            return Ok(vm.id);
        }
    }
    let mut found = Vec::new();
    for id in store.list_vms().await? {
        if id == name {
            return Ok(id);
        }
        if let Some(m) = latest_manifest(store, key, &id).await? {
            if m.vm.name == name {
                found.push(id);
            }
        }
    }
    match found.len() {
        0 => Err(Error::new(
            ErrorKind::NotFound,
            format!("store {} has no recovery point of a VM named {name:?}", store.url()),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(Error::invalid(format!(
            "store {} has several VMs named {name:?} (ids {}): give the id instead of the name",
            store.url(),
            found.join(", ")
        ))),
    }
}

/// Every point of VM `vm_id`, oldest first, each manifest authenticated; cached
/// in the state database.
pub async fn list_points(engine: &Engine, store: &Store, key: &Key, vm_id: &str) -> Result<Vec<PointInfo>> {
    let mut out = Vec::new();
    for p in store.list_points(vm_id).await? {
        let env = store.get_manifest(vm_id, &p).await?;
        let manifest =
            Manifest::open(key, &env, vm_id, &p).map_err(|e| e.context(format!("manifest of point {p}")))?;
        let json = serde_json::to_string(&manifest).map_err(|e| Error::invalid(e.to_string()))?;
        engine.db().cache_point(&PointRow {
            vm_id: vm_id.to_string(),
            point_id: p.clone(),
            store_url: store.url().to_string(),
            instant: manifest.instant.clone(),
            manifest: json,
        })?;
        out.push(PointInfo { manifest });
    }
    Ok(out)
}
