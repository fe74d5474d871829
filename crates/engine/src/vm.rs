//! VM definitions: what tern needs to recreate a VM at migration (DESIGN.md, "VM").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tern_disk::Format;

use crate::{Error, Result};

/// Firmware the guest boots with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (Azure generation 1).
    Bios,
    /// UEFI (Azure generation 2).
    Uefi,
}

impl Firmware {
    /// `bios` or `uefi`.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    /// Parse `bios` / `uefi`.
    pub fn parse(s: &str) -> Result<Firmware> {
        match s.to_ascii_lowercase().as_str() {
            "bios" => Ok(Firmware::Bios),
            "uefi" | "efi" => Ok(Firmware::Uefi),
            _ => Err(Error::invalid(format!("firmware {s:?} is not one of bios, uefi"))),
        }
    }
}

/// One disk of a VM: its image and, when the user said it, the format to read it as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmDisk {
    /// The image (absolute, canonical).
    pub path: PathBuf,
    /// The format given with `tern vm add --format`; `None` detects it (and refuses an
    /// image whose name and content disagree).
    pub format: Option<Format>,
}

impl From<PathBuf> for VmDisk {
    fn from(path: PathBuf) -> VmDisk {
        VmDisk { path, format: None }
    }
}

/// A VM as registered with `tern vm add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmDef {
    /// Random 128-bit id in hex; names objects in the store so that renaming a VM or
    /// reusing a name never mixes two VMs' points.
    pub id: String,
    /// The name users type.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Firmware.
    pub firmware: Firmware,
    /// Source disk images, in order (disk 0 boots).
    pub disks: Vec<VmDisk>,
    /// The store the VM replicates to. `None` until its first replication (or `vm add
    /// --store`) fixes it: the data directory's default store, or the `--store` given
    /// then. Every command about the VM uses it unless `--store` says otherwise.
    pub store_url: Option<String>,
    /// A VM in a running QEMU (`vm add --qmp`): where to reach it and which node is
    /// each disk. `None`: image files, read with a snapshot at each replication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuSource>,
}

/// How tern reaches a running QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuSource {
    /// Its QMP socket (one tern uses alone).
    pub qmp: PathBuf,
    /// The UNIX socket of the NBD server that runs in that QEMU, when one was already
    /// running (`--nbd`); `None`: tern starts one of its own for each cycle.
    pub nbd: Option<PathBuf>,
    /// The block node of each disk, in disk order.
    pub nodes: Vec<String>,
    /// Push mode: QEMU copies each cut's frozen data into local files
    /// (`blockdev-backup`) instead of tern reading it from an NBD export; for a QEMU
    /// whose NBD server tern cannot use.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub push: bool,
    /// Per disk, the guest device it was found behind (its qdev path, else its
    /// name), when the disks were discovered from devices: the node is looked up
    /// again by device on every connection, since QEMU renames nodes it named itself
    /// when it starts again. Empty when the nodes were named (`--node`) or found as
    /// exports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Tracking by journal (`--tracking journal`, docs/journal.md): QEMU's
    /// write-blocking mirror sends every write to the agent, beside the dirty bitmaps.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub journal: bool,
}

/// Limits on what `vm add` accepts.
pub const MAX_CPUS: u32 = 1024;
/// Largest memory accepted: 64 TiB.
pub const MAX_MEMORY: u64 = 64 << 40;
/// Most disks per VM (Azure allows 64 data disks plus the OS disk).
pub const MAX_DISKS: usize = 65;

/// Parse a disk format name (`raw`, `qcow2`, `vhd`, `vhdx`).
pub fn parse_format(s: &str) -> Result<Format> {
    [Format::Raw, Format::Qcow2, Format::Vhd, Format::Vhdx]
        .into_iter()
        .find(|f| f.name() == s)
        .ok_or_else(|| Error::invalid(format!("disk format {s:?} is not one of raw, qcow2, vhd, vhdx")))
}

/// A new random VM id (128 bits, hex).
pub fn new_vm_id() -> Result<String> {
    let mut b = [0u8; 16];
    crate::random_bytes(&mut b)?;
    Ok(hex::encode(b))
}

/// Check a VM name: it becomes part of file names at migration.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "VM name {name:?} is invalid: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

impl VmDef {
    /// Validate every field; returns the definition unchanged.
    pub fn validate(self) -> Result<VmDef> {
        check_name(&self.name)?;
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::invalid(format!("--cpus {} is out of range: use 1 to {MAX_CPUS}", self.cpus)));
        }
        if self.memory_bytes < (1 << 20) || self.memory_bytes > MAX_MEMORY {
            return Err(Error::invalid(format!(
                "--memory {} bytes is out of range: use 1 MiB to 64 TiB",
                self.memory_bytes
            )));
        }
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return Err(Error::invalid(format!(
                "a VM needs 1 to {MAX_DISKS} disks, {} given",
                self.disks.len()
            )));
        }
        Ok(self)
    }
}

/// Register `vm` on this host after checking it: every field ([`VmDef::validate`]),
/// every disk opens as an image of its format (detected, or the one given) and is not
/// empty, and no image is given twice or already belongs to another VM (compared by
/// file identity, so another path to the same file is caught too): two replications
/// of one disk would be a mistake, never a feature.
pub fn register_vm(engine: &crate::Engine, vm: VmDef) -> Result<VmDef> {
    use std::os::unix::fs::MetadataExt;
    let mut vm = vm.validate()?;
    let identity = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let mut seen: Vec<((u64, u64), usize)> = Vec::new();
    for (i, d) in vm.disks.iter_mut().enumerate() {
        d.path =
            std::fs::canonicalize(&d.path).map_err(|e| Error::io(format!("disk {}", d.path.display()), e))?;
        let o = tern_disk::OpenOptions { allow_backing: true, format: d.format, ..Default::default() };
        let format = d.format;
        let disk = tern_disk::open_disk(&d.path, &o).map_err(|e| {
            let hint = if format.is_none() && e.kind() == tern_disk::ErrorKind::NotADisk {
                " (--format raw)"
            } else {
                ""
            };
            Error::from(e).context(format!("disk {}", d.path.display())).with_suffix(hint)
        })?;
        if disk.virtual_size() == 0 {
            return Err(Error::invalid(format!("disk {} is empty (0 bytes)", d.path.display())));
        }
        let Some(id) = identity(&d.path) else { continue };
        if let Some((_, j)) = seen.iter().find(|(s, _)| *s == id) {
            return Err(Error::invalid(format!(
                "disk {i} ({}) is the same image as disk {j}: give each image once",
                d.path.display()
            )));
        }
        seen.push((id, i));
    }
    for other in engine.db().vm_list()? {
        for (j, od) in other.disks.iter().enumerate() {
            let same = |d: &VmDisk| {
                d.path == od.path || identity(&od.path).is_some_and(|o| identity(&d.path) == Some(o))
            };
            if let Some(d) = vm.disks.iter().find(|d| same(d)) {
                return Err(Error::invalid(format!(
                    "{} is already disk {j} of VM {}: an image can belong to one VM only \
                     (remove it there first with `tern vm remove {}`)",
                    d.path.display(),
                    other.name,
                    other.name
                )));
            }
        }
    }
    if let Some(url) = engine.explicit_store() {
        vm.store_url = Some(url.to_string());
    }
    engine.db().vm_add(&vm)?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["web1", "db_01", "a.b-c"] {
            check_name(good).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(new_vm_id().unwrap().len(), 32);
    }
}
