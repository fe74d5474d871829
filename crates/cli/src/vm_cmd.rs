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
    ///
    /// A VM running in QEMU (or qemu-storage-daemon) is added with --qmp instead of
    /// --disk: tern connects to that QMP socket (one of QEMU's monitors that nothing
    /// else uses: add `-qmp unix:PATH,server=on,wait=off` to QEMU's command line) and
    /// discovers the disks: the devices' root nodes, or on qemu-storage-daemon, which
    /// has no devices, the nodes its exports serve (in node-name order); --node names
    /// them instead. vCPUs and memory are read from QEMU when it reports them, and the
    /// firmware is uefi when QEMU has pflash drives. Its replication then tracks
    /// changes with QEMU's dirty bitmaps: nothing is installed in the guest and the VM
    /// is not restarted.
    Add {
        /// The VM's name (letters, digits, '-', '_', '.'); names the migrated files.
        name: String,
        /// A disk image (raw, qcow2, VHD, VHDX, or a block device). Repeat for every
        /// disk; the first one boots.
        #[arg(long = "disk", value_name = "PATH", required_unless_present = "qmp", conflicts_with = "qmp")]
        disks: Vec<PathBuf>,
        /// The disks' format instead of detecting it: once for every disk, or once per
        /// --disk, in the same order.
        #[arg(long = "format", value_enum, value_name = "FORMAT", conflicts_with = "qmp")]
        formats: Vec<DiskFormatArg>,
        /// The QMP socket of the running QEMU the VM is in.
        #[arg(long, value_name = "SOCKET")]
        qmp: Option<PathBuf>,
        /// With --qmp: a block node that is one of the VM's disks (repeat, boot disk
        /// first) instead of discovering them.
        #[arg(long = "node", value_name = "NODE", requires = "qmp")]
        nodes: Vec<String>,
        /// With --qmp: the UNIX socket of the NBD server already running in that QEMU
        /// (a QEMU has one; tern adds its read-only exports to it). Without it, tern
        /// starts a server of its own for each replication and stops it after.
        #[arg(long, value_name = "SOCKET", requires = "qmp")]
        nbd: Option<PathBuf>,
        /// With --qmp: how each cut's frozen data leaves QEMU. pull: tern reads it from
        /// read-only NBD exports (needs QEMU's one NBD server: tern's own, or --nbd);
        /// push: QEMU copies it into local files beside tern's data (blockdev-backup),
        /// for a QEMU whose NBD server tern cannot use; the initial replication then
        /// needs free space for the disks' data. auto: pull, unless QEMU's NBD server
        /// is already in use and --nbd is not given.
        #[arg(long, value_enum, value_name = "MODE", default_value = "auto", requires = "qmp")]
        mode: CutModeArg,
        /// With --qmp: how changes are tracked. qemu: QEMU's dirty bitmaps, one cut
        /// per cycle (an RPO of the cycle's length). journal: QEMU's write-blocking
        /// mirror also sends every guest write to `tern agent` as it happens, and
        /// every cycle is a mark (a point every 5 s by default; see docs/journal.md).
        /// Needs pull mode.
        #[arg(long, value_enum, value_name = "SOURCE", default_value = "qemu", requires = "qmp")]
        tracking: TrackingArg,
        /// Virtual CPUs, 1 to 1024 [default: 2, or what QEMU reports].
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory, 1M to 64T (binary units: 4G = 4 GiB) [default: 2G, or what QEMU
        /// reports].
        #[arg(long, value_name = "SIZE")]
        memory: Option<ByteSize>,
        /// Firmware the guest boots with (uefi = Azure generation 2) [default: bios,
        /// or uefi when QEMU has pflash drives].
        #[arg(long, value_enum)]
        firmware: Option<FirmwareArg>,
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

/// `vm add --tracking`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackingArg {
    /// QEMU's dirty bitmaps.
    Qemu,
    /// QEMU's write-blocking mirror into tern, beside the bitmaps.
    Journal,
}

/// `vm add --mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CutModeArg {
    /// Pull unless QEMU's NBD server is in use and --nbd is not given.
    Auto,
    /// tern reads NBD exports of QEMU's frozen views.
    Pull,
    /// QEMU copies each cut into local files.
    Push,
}

pub fn run(g: &GlobalArgs, cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Add {
            name,
            disks,
            formats,
            qmp,
            nodes,
            nbd,
            mode,
            tracking,
            cpus,
            memory,
            firmware,
            data,
            store,
        } => {
            let engine = g.with(&data, None, Some(&store)).engine()?;
            let firmware = firmware.map(|f| match f {
                FirmwareArg::Bios => Firmware::Bios,
                FirmwareArg::Uefi => Firmware::Uefi,
            });
            if let Some(qmp) = qmp {
                let spec = tern_engine::QemuVmSpec {
                    name,
                    qmp,
                    nodes,
                    nbd,
                    push: match mode {
                        CutModeArg::Auto => None,
                        CutModeArg::Pull => Some(false),
                        CutModeArg::Push => Some(true),
                    },
                    journal: tracking == TrackingArg::Journal,
                    cpus,
                    memory_bytes: memory.map(|m| m.bytes()),
                    firmware,
                };
                let vm = tern_engine::add_qemu_vm(&engine, &spec)?;
                outln!(
                    "added VM {} (running in QEMU, {} disk(s), {} vCPUs, {} memory, id {}), replicating to {}",
                    vm.name,
                    vm.disks.len(),
                    vm.cpus,
                    ByteSize(vm.memory_bytes),
                    vm.id,
                    engine.vm_store_url(&vm)
                );
                let q = vm.qemu.as_ref().expect("a QEMU VM");
                if q.push {
                    outln!(
                        "  cuts: push (QEMU copies each cut into local files{})",
                        if mode == CutModeArg::Auto { ": its NBD server is in use" } else { "" }
                    );
                } else {
                    outln!("  cuts: pull (tern reads NBD exports of QEMU's frozen views)");
                }
                if q.journal {
                    outln!(
                        "  tracking: journal (QEMU's write-blocking mirror into `tern agent`; a point every 5 s by default)"
                    );
                }
                for (i, (d, node)) in vm.disks.iter().zip(&q.nodes).enumerate() {
                    let fmt = d.format.map_or("?", |f| f.name());
                    outln!("  disk {i}: node {node} ({fmt}) {}", d.path.display());
                }
                return Ok(ExitCode::SUCCESS);
            }
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
                cpus: cpus.unwrap_or(2),
                memory_bytes: memory.map_or(2 << 30, |m| m.bytes()),
                firmware: firmware.unwrap_or(Firmware::Bios),
                disks: disks.into_iter().zip(formats).map(|(path, format)| VmDisk { path, format }).collect(),
                store_url: None,
                qemu: None,
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
