//! The `tern` command. Thin: it turns flags into validated settings, calls the
//! library crates, and prints. Exit status: 0 success, 1 failure; `tern disk compare`
//! follows `qemu-img compare`: 0 identical, 1 different, 2 error.

mod demo_cmd;
mod disk_cmd;
mod migrate_cmd;
mod progress;
mod replicate_cmd;
mod store_cmd;
mod throttle_cmd;
mod vm_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tern_engine::{Engine, EngineOptions};

/// tern replicates the disks of virtual machines to object storage and migrates them
/// back as ready-to-boot disk images (raw, qcow2, VHD, VHDX, Azure).
///
/// Everything runs on this machine: state lives in a data directory, replicated data in
/// a store (a local folder by default; az:// and s3:// URLs work too). Typical use:
///
///   tern vm add web --disk /var/lib/libvirt/images/web.qcow2 --cpus 2 --memory 4G
///
///   tern replicate web
///
///   tern migrate web --format azure --out ./cutover
///
/// `tern demo` runs the whole flow on a sample disk.
#[derive(Parser)]
#[command(name = "tern", version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command accepts.
#[derive(Args, Clone)]
pub struct GlobalArgs {
    /// Data directory: state database, key, default store, snapshots.
    /// [default: $TERN_DATA_DIR, else $XDG_DATA_HOME/tern, else ~/.local/share/tern]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Key file of the store. Created on first replication; needed to read the store
    /// anywhere (copy it with `tern key export`). [default: <data-dir>/key]
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Store URL: file:///abs/path (or a plain path), az://container/prefix,
    /// s3://bucket/prefix. [default: file://<data-dir>/store]
    #[arg(long, global = true, value_name = "URL")]
    store: Option<String>,
}

impl GlobalArgs {
    /// Open the engine with these options.
    pub fn engine(&self) -> anyhow::Result<Engine> {
        Ok(Engine::open(&EngineOptions {
            data_dir: self.data_dir.clone(),
            key_file: self.key_file.clone(),
            store_url: self.store.clone(),
            local_offset: LOCAL_OFFSET.get().copied(),
        })?)
    }
}

static LOCAL_OFFSET: std::sync::OnceLock<time::UtcOffset> = std::sync::OnceLock::new();

#[derive(Subcommand)]
enum Command {
    /// Inspect, map, convert and compare disk images (raw, qcow2, VHD, VHDX).
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Register, list and remove the VMs this host replicates.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// Replicate a VM to the store and commit a recovery point.
    Replicate(replicate_cmd::ReplicateArgs),
    /// Replication state per VM and disk: bytes done / total, rate, ETA.
    ///
    /// States: `replicating` (a `tern replicate` of the VM is running now), `interrupted`
    /// (a replication was stopped before its point was committed: run `tern replicate
    /// NAME` to resume it), `protected` (the last point is committed), `not replicated`.
    /// The rate is guest bytes per second over the last minute of the running
    /// replication; the ETA assumes it holds.
    Status(replicate_cmd::StatusArgs),
    /// List a VM's recovery points (read from the store).
    Points(replicate_cmd::PointsArgs),
    /// Turn a recovery point into disk images plus VM definitions.
    Migrate(migrate_cmd::MigrateArgs),
    /// Bandwidth limit for uploads, with a work-hours schedule.
    #[command(subcommand)]
    Throttle(throttle_cmd::ThrottleCommand),
    /// The store key.
    #[command(subcommand)]
    Key(store_cmd::KeyCommand),
    /// Check the store.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Run the whole flow on a sample VM and say what happened.
    Demo(demo_cmd::DemoArgs),
}

fn main() -> ExitCode {
    // Only sound while the process has one thread: before anything else runs.
    if let Ok(off) = time::UtcOffset::current_local_offset() {
        let _ = LOCAL_OFFSET.set(off);
    }
    let cli = Cli::parse();
    let g = cli.global;
    let (result, error_code) = match cli.command {
        Command::Disk(cmd) => {
            let code = cmd.error_exit_code();
            (disk_cmd::run(cmd), code)
        }
        Command::Vm(cmd) => (vm_cmd::run(&g, cmd), 1),
        Command::Replicate(a) => (replicate_cmd::replicate(&g, a), 1),
        Command::Status(a) => (replicate_cmd::status(&g, a), 1),
        Command::Points(a) => (replicate_cmd::points(&g, a), 1),
        Command::Migrate(a) => (migrate_cmd::run(&g, a), 1),
        Command::Throttle(cmd) => (throttle_cmd::run(&g, cmd), 1),
        Command::Key(cmd) => (store_cmd::key(&g, cmd), 1),
        Command::Store(cmd) => (store_cmd::store(&g, cmd), 1),
        Command::Demo(a) => (demo_cmd::run(&g, a), 1),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}
