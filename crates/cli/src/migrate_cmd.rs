//! `tern migrate`: a recovery point -> disk images + VM definitions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Result;
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar};
use tern_engine::{MigrateEvent, MigrateFormat, MigrateOptions, PointSelector};

use crate::progress::bytes_bar;
use crate::{print_json, GlobalArgs, StoreOptions};

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// Sparse raw image.
    Raw,
    /// qcow2 v3 (KVM/QEMU).
    Qcow2,
    /// Dynamic VHD (Hyper-V gen 1).
    Vhd,
    /// Dynamic VHDX (Hyper-V).
    Vhdx,
    /// Fixed VHD sized to a whole MiB, ready to upload to an Azure managed disk.
    Azure,
}

#[derive(Args)]
pub struct MigrateArgs {
    /// The VM: its name (found through the store's manifests when this host does not
    /// know it, so a store URL and the key are enough on any machine) or its id.
    name: String,
    /// Recovery point id (see `tern points NAME`), or `latest`.
    #[arg(long, default_value = "latest", value_name = "ID|latest")]
    point: String,
    /// Output format of the disks.
    #[arg(long, value_enum)]
    format: FormatArg,
    /// Output folder, created if missing. Files: NAME-diskN.EXT, NAME.xml (libvirt
    /// domain), NAME-azure.json (ARM template). Existing files are never replaced.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Do not fsync the outputs before exiting (as `qemu-img convert` by default): faster,
    /// but a crash soon after may lose them. For scratch test migrations, not cutovers.
    #[arg(long)]
    no_sync: bool,
    /// Read every written image back through its format and check that its SHA-256 is
    /// the point's (recorded at replication) before exiting; costs one more read of the
    /// outputs. Without it, every chunk is still authenticated and checked against its
    /// address as it is written.
    #[arg(long)]
    verify: bool,
    /// Test migration: outputs are named NAME-test-...; replication is not touched.
    #[arg(long)]
    test: bool,
    /// Parallel fetch workers, 1 to 32.
    #[arg(long, default_value_t = tern_engine::DEFAULT_THREADS)]
    threads: usize,
    /// Do not show progress bars even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Print the result as JSON on stdout (no progress bars).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    globals: StoreOptions,
}

/// Every chunk is verified; on any error no image is left and the exit status is 1.
pub fn run(g: &GlobalArgs, a: MigrateArgs) -> Result<ExitCode> {
    let threads = tern_engine::check_threads(a.threads)?;
    let point = if a.point == "latest" {
        PointSelector::Latest
    } else {
        tern_engine::check_point_id(&a.point)?;
        PointSelector::Id(a.point.clone())
    };
    let format = match a.format {
        FormatArg::Raw => MigrateFormat::Raw,
        FormatArg::Qcow2 => MigrateFormat::Qcow2,
        FormatArg::Vhd => MigrateFormat::Vhd,
        FormatArg::Vhdx => MigrateFormat::Vhdx,
        FormatArg::Azure => MigrateFormat::Azure,
    };
    let engine = g.with_store(&a.globals).engine_read_only()?;
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<u32, ProgressBar>> = Mutex::new(HashMap::new());
    let observer = |ev: MigrateEvent| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            MigrateEvent::DiskStart { disk, total } => {
                bars.insert(
                    disk,
                    multi.add(bytes_bar(&format!("disk {disk}"), total, !a.no_progress && !a.json)),
                );
            }
            MigrateEvent::Progress { disk, bytes } => {
                if let Some(b) = bars.get(&disk) {
                    b.inc(bytes);
                }
            }
        }
    };
    let opts = MigrateOptions {
        point,
        format,
        out_dir: a.out.clone(),
        test: a.test,
        threads,
        sync: !a.no_sync,
        verify: a.verify,
    };
    let r = tern_engine::migrate(&engine, &a.name, &opts, &observer)?;
    for b in bars.lock().unwrap_or_else(|p| p.into_inner()).values() {
        b.finish();
    }
    if a.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    let kind = if a.test { "test migration" } else { "migration" };
    outln!("{kind} of VM {} at point {} ({}) from {}", r.vm, r.point_id, r.instant, r.store_url);
    for d in &r.disks {
        let checked = if d.verified { " (read back and verified)" } else { "" };
        outln!("disk {}: {}  sha256 {}{checked}", d.disk, d.path.display(), d.sha256);
    }
    outln!("libvirt domain: {}", r.libvirt_xml.display());
    outln!("Azure template: {}", r.arm_template.display());
    Ok(ExitCode::SUCCESS)
}
