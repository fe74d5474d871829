//! `tern vm ...`: the VMs this host replicates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use tern_engine::{Firmware, VmDef};
use tern_types::ByteSize;

use crate::GlobalArgs;

#[derive(Subcommand)]
pub enum VmCommand {
    /// Register a VM: a name, its disk images in boot order, and the hardware facts
    /// needed to recreate it at migration.
    Add {
        /// The VM's name (letters, digits, '-', '_', '.'); names the migrated files.
        name: String,
        /// A disk image (raw, qcow2, VHD, VHDX, or a block device). Repeat for every
        /// disk; the first one boots.
        #[arg(long = "disk", value_name = "PATH", required = true)]
        disks: Vec<PathBuf>,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Memory (binary units: 4G = 4 GiB).
        #[arg(long, default_value = "2G", value_name = "SIZE")]
        memory: ByteSize,
        /// Firmware the guest boots with (uefi = Azure generation 2).
        #[arg(long, value_enum, default_value_t = FirmwareArg::Bios)]
        firmware: FirmwareArg,
    },
    /// List registered VMs.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Forget a VM and its local replication progress, and delete the snapshots (reflink
    /// copies) an unfinished replication of it holds; its images are never touched.
    /// Refused while a replication of it runs. Recovery points already in the store stay
    /// there and can still be migrated.
    Remove {
        /// The VM's name.
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FirmwareArg {
    Bios,
    Uefi,
}

fn vm_json(v: &VmDef) -> serde_json::Value {
    serde_json::json!({
        "name": v.name, "id": v.id, "cpus": v.cpus, "memory_bytes": v.memory_bytes,
        "firmware": v.firmware.name(), "disks": v.disks,
    })
}

pub fn run(g: &GlobalArgs, cmd: VmCommand) -> Result<ExitCode> {
    let engine = g.engine()?;
    match cmd {
        VmCommand::Add { name, disks, cpus, memory, firmware } => {
            let mut paths = Vec::new();
            for d in disks {
                let p = std::fs::canonicalize(&d).with_context(|| format!("disk {}", d.display()))?;
                let o = tern_disk::OpenOptions { allow_backing: true, ..Default::default() };
                let disk = tern_disk::open_disk(&p, &o).with_context(|| format!("disk {}", p.display()))?;
                if disk.virtual_size() == 0 {
                    bail!("disk {} is empty (0 bytes)", p.display());
                }
                paths.push(p);
            }
            let vm = VmDef {
                id: tern_engine::new_vm_id()?,
                name,
                cpus,
                memory_bytes: memory.bytes(),
                firmware: match firmware {
                    FirmwareArg::Bios => Firmware::Bios,
                    FirmwareArg::Uefi => Firmware::Uefi,
                },
                disks: paths,
            }
            .validate()?;
            engine.db().vm_add(&vm)?;
            println!("added VM {} ({} disk(s), id {})", vm.name, vm.disks.len(), vm.id);
        }
        VmCommand::List { json } => {
            let vms = engine.db().vm_list()?;
            if json {
                println!("{}", serde_json::Value::Array(vms.iter().map(vm_json).collect()));
            } else if vms.is_empty() {
                println!("no VMs (add one with `tern vm add NAME --disk PATH`)");
            } else {
                for v in vms {
                    println!(
                        "{}  {} vCPU  {}  {}",
                        v.name,
                        v.cpus,
                        ByteSize(v.memory_bytes),
                        v.firmware.name()
                    );
                    for (i, d) in v.disks.iter().enumerate() {
                        println!("  disk {i}: {}", d.display());
                    }
                }
            }
        }
        VmCommand::Remove { name } => {
            let vm = tern_engine::remove_vm(&engine, &name)?;
            println!("removed VM {} (its points in the store are kept)", vm.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
