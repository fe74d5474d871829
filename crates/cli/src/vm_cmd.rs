//! `tern vm ...`: the VMs this host replicates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Subcommand, ValueEnum};
use tern_engine::{Firmware, VmDef, VmDisk};
use tern_types::ByteSize;

use crate::{print_json, DataDirArg, GlobalArgs, StoreArg};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Register a VM: a name, its disk images in boot order, and the hardware facts
    /// needed to recreate it at migration.
    ///
    /// Each image's format is detected from its content; a name that says .qcow2,
    /// .vhd or .vhdx on a file that is not one is refused (give --format raw if it is a
    /// raw disk after all). An image can belong to one VM only.
    Add {
        /// The VM's name (letters, digits, '-', '_', '.'); names the migrated files.
        name: String,
        /// A disk image (raw, qcow2, VHD, VHDX, or a block device). Repeat for every
        /// disk; the first one boots.
        #[arg(long = "disk", value_name = "PATH", required = true)]
        disks: Vec<PathBuf>,
        /// The disks' format instead of detecting it: once for every disk, or once per
        /// --disk, in the same order.
        #[arg(long = "format", value_enum, value_name = "FORMAT")]
        formats: Vec<DiskFormatArg>,
        /// Virtual CPUs, 1 to 1024.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Memory, 1M to 64T (binary units: 4G = 4 GiB).
        #[arg(long, default_value = "2G", value_name = "SIZE")]
        memory: ByteSize,
        /// Firmware the guest boots with (uefi = Azure generation 2).
        #[arg(long, value_enum, default_value_t = FirmwareArg::Bios)]
        firmware: FirmwareArg,
        #[command(flatten)]
        data: DataDirArg,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List registered VMs, each with its disks and the store it replicates to.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Move a VM to another store: its next replication goes there (a full one: the new
    /// store has none of its data), and `points` / `migrate` read from there. Its points
    /// in the old store stay there; migrate them with `--store OLD`. Refused while a
    /// replication of it runs.
    SetStore {
        /// The VM's name.
        name: String,
        /// The new store: file:///abs/path (or a plain path), az://container/prefix,
        /// s3://bucket/prefix.
        url: String,
        #[command(flatten)]
        data: DataDirArg,
    },
    /// Forget a VM and its local replication progress, and delete the snapshots (reflink
    /// copies) an unfinished replication of it holds; its images are never touched.
    /// Refused while a replication of it runs. Recovery points already in the store stay
    /// there and can still be migrated.
    Remove {
        /// The VM's name.
        name: String,
        #[command(flatten)]
        data: DataDirArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FirmwareArg {
    Bios,
    Uefi,
}

/// A source disk's format.
#[derive(Clone, Copy, ValueEnum)]
pub enum DiskFormatArg {
    Raw,
    Qcow2,
    Vhd,
    Vhdx,
}

impl DiskFormatArg {
    fn format(self) -> tern_disk::Format {
        match self {
            DiskFormatArg::Raw => tern_disk::Format::Raw,
            DiskFormatArg::Qcow2 => tern_disk::Format::Qcow2,
            DiskFormatArg::Vhd => tern_disk::Format::Vhd,
            DiskFormatArg::Vhdx => tern_disk::Format::Vhdx,
        }
    }
}

pub fn run(g: &GlobalArgs, cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Add { name, disks, formats, cpus, memory, firmware, data, store } => {
            let engine = g.with(&data, None, Some(&store)).engine()?;
            let formats: Vec<Option<tern_disk::Format>> = match formats.len() {
                0 => vec![None; disks.len()],
                1 => vec![Some(formats[0].format()); disks.len()],
                n if n == disks.len() => formats.iter().map(|f| Some(f.format())).collect(),
                n => bail!(
                    "{n} --format values for {} --disk images: give one for all, or one per disk",
                    disks.len()
                ),
            };
            let vm = VmDef {
                id: tern_engine::new_vm_id()?,
                name,
                cpus,
                memory_bytes: memory.bytes(),
                firmware: match firmware {
                    FirmwareArg::Bios => Firmware::Bios,
                    FirmwareArg::Uefi => Firmware::Uefi,
                },
                disks: disks.into_iter().zip(formats).map(|(path, format)| VmDisk { path, format }).collect(),
                store_url: None,
            };
            let vm = tern_engine::register_vm(&engine, vm)?;
            outln!(
                "added VM {} ({} disk(s), id {}), replicating to {}",
                vm.name,
                vm.disks.len(),
                vm.id,
                engine.vm_store_url(&vm)
            );
        }
        VmCommand::List { json, data } => {
            let engine = g.with(&data, None, None).engine_read_only()?;
            let mut vms = engine.db().vm_list()?;
            for v in &mut vms {
                // Show the store each VM uses, fixed or not yet.
                v.store_url = Some(engine.vm_store_url(v).to_string());
            }
            if json {
                print_json(&vms)?;
            } else if vms.is_empty() {
                outln!("no VMs (add one with `tern vm add NAME --disk PATH`)");
            } else {
                for v in vms {
                    outln!(
                        "{}  {} vCPU  {}  {}  store {}",
                        v.name,
                        v.cpus,
                        ByteSize(v.memory_bytes),
                        v.firmware.name(),
                        v.store_url.as_deref().unwrap_or("")
                    );
                    for (i, d) in v.disks.iter().enumerate() {
                        let format = d.format.map(|f| format!(" (as {f})")).unwrap_or_default();
                        outln!("  disk {i}: {}{format}", d.path.display());
                    }
                }
            }
        }
        VmCommand::SetStore { name, url, data } => {
            let engine = g.with(&data, None, None).engine()?;
            let (vm, old) = tern_engine::set_vm_store(&engine, &name, &url)?;
            outln!(
                "VM {} now replicates to {} (was {old}; its points there stay and can be migrated with --store)",
                vm.name,
                vm.store_url.as_deref().unwrap_or("")
            );
        }
        VmCommand::Remove { name, data } => {
            let engine = g.with(&data, None, None).engine()?;
            let vm = tern_engine::remove_vm(&engine, &name)?;
            outln!("removed VM {} (its points in the store are kept)", vm.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
