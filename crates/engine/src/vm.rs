//! VM definitions: what tern needs to recreate a VM at migration (DESIGN.md, "VM").

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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

/// A VM as registered with `tern vm add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    pub disks: Vec<PathBuf>,
}

/// Limits on what `vm add` accepts.
pub const MAX_CPUS: u32 = 1024;
/// Largest memory accepted: 64 TiB.
pub const MAX_MEMORY: u64 = 64 << 40;
/// Most disks per VM (Azure allows 64 data disks plus the OS disk).
pub const MAX_DISKS: usize = 65;

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
            return Err(Error::invalid(format!("--cpus {} is out of range 1..={MAX_CPUS}", self.cpus)));
        }
        if self.memory_bytes < (1 << 20) || self.memory_bytes > MAX_MEMORY {
            return Err(Error::invalid(format!(
                "--memory {} bytes is out of range 1 MiB ..= 64 TiB",
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
