//! The `tern` command. Thin: it turns flags into validated settings, calls the
//! library crates, and prints. Exit status: 0 success, 1 failure; `tern disk compare`
//! follows `qemu-img compare`: 0 identical, 1 different, 2 error.

/// `println!` that returns the error of a closed standard output instead of panicking,
/// so that `tern points web | head -1` ends quietly.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*)?;
    }};
}

mod agent_cmd;
mod demo_cmd;
mod disk_cmd;
mod migrate_cmd;
mod progress;
mod replicate_cmd;
mod serve_cmd;
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
/// a store (a local folder by default; az:// and s3:// URLs work too). The global
/// options may be given before the command or after it; each command's --help lists
/// the ones it uses. Typical use:
///
///   tern vm add web --disk /var/lib/libvirt/images/web.qcow2 --cpus 2 --memory 4G
///
///   tern replicate web
///
///   tern migrate web --format azure --out ./cutover
///
/// A VM running in QEMU is replicated continuously, in delta cycles:
///
///   tern vm add db --qmp /run/db.qmp ; tern agent & tern replicate db --frequency 30s
///
/// `tern demo` runs the whole flow on a sample disk.
#[derive(Parser)]
#[command(name = "tern", version, about, long_about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    globals: StoreOptions,
    #[command(subcommand)]
    command: Command,
}

/// `--data-dir`: given before the command (`tern --data-dir DIR status`) or after it,
/// on the commands that use it.
#[derive(Args, Clone, Default)]
pub struct DataDirArg {
    /// Data directory: state database, key, default store, snapshots.
    /// [default: $TERN_DATA_DIR, else $XDG_DATA_HOME/tern, else ~/.local/share/tern]
    #[arg(long, value_name = "DIR", help_heading = "Global options")]
    data_dir: Option<PathBuf>,
}

/// `--key-file`, before the command or after it.
#[derive(Args, Clone, Default)]
pub struct KeyFileArg {
    /// Key file of the store. Created on first replication; needed to read the store
    /// anywhere (copy it with `tern key export`). [default: $TERN_KEY_FILE, else
    /// <data-dir>/key]
    #[arg(long, value_name = "FILE", help_heading = "Global options")]
    key_file: Option<PathBuf>,
}

/// `--store`, before the command or after it.
#[derive(Args, Clone, Default)]
pub struct StoreArg {
    /// Store URL: file:///abs/path (or a plain path), az://container/prefix,
    /// s3://bucket/prefix (credentials: docs/stores.md). Commands about a VM use the
    /// store it replicates to unless this is given. [default: file://<data-dir>/store]
    #[arg(long, value_name = "URL", help_heading = "Global options")]
    store: Option<String>,
}

/// All three global options, for the commands that read a store (replicate, points,
/// migrate, store verify).
#[derive(Args, Clone, Default)]
pub struct StoreOptions {
    #[command(flatten)]
    data: DataDirArg,
    #[command(flatten)]
    key: KeyFileArg,
    #[command(flatten)]
    store: StoreArg,
}

/// The global options in force for one command: those given after the command win
/// over those given before it.
#[derive(Clone, Default)]
pub struct GlobalArgs {
    data_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
    store: Option<String>,
}

impl GlobalArgs {
    /// These options with the ones a subcommand took itself laid over them.
    pub fn with(&self, data: &DataDirArg, key: Option<&KeyFileArg>, store: Option<&StoreArg>) -> GlobalArgs {
        GlobalArgs {
            data_dir: data.data_dir.clone().or_else(|| self.data_dir.clone()),
            key_file: key.and_then(|k| k.key_file.clone()).or_else(|| self.key_file.clone()),
            store: store.and_then(|s| s.store.clone()).or_else(|| self.store.clone()),
        }
    }

    /// These options with all three of a store command's laid over them.
    pub fn with_store(&self, o: &StoreOptions) -> GlobalArgs {
        self.with(&o.data, Some(&o.key), Some(&o.store))
    }

    /// Open the engine for a command that changes state (creates the data directory
    /// and the state database if needed).
    pub fn engine(&self) -> anyhow::Result<Engine> {
        self.open(false)
    }

    /// Open the engine for a command that only reads: it creates nothing.
    pub fn engine_read_only(&self) -> anyhow::Result<Engine> {
        self.open(true)
    }

    fn open(&self, read_only: bool) -> anyhow::Result<Engine> {
        Ok(Engine::open(&EngineOptions {
            data_dir: self.data_dir.clone(),
            key_file: self.key_file.clone(),
            store_url: self.store.clone(),
            local_offset: LOCAL_OFFSET.get().copied(),
            read_only,
        })?)
    }
}

static LOCAL_OFFSET: std::sync::OnceLock<time::UtcOffset> = std::sync::OnceLock::new();

/// Print `v` as the command's one JSON document on stdout: pretty-printed, the same
/// for every `--json` (docs/json.md describes each shape).
pub fn print_json<T: serde::Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    outln!("{text}");
    Ok(())
}

/// Whether `e` is a write to a closed pipe (the reader went away, as `head` does).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

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
    /// List a VM's recovery points (read from the store); `points serve` exports one over NBD.
    Points(replicate_cmd::PointsArgs),
    /// The long-running data mover: replicates every enabled VM at its frequency.
    ///
    /// Every VM with replication enabled (`tern replicate NAME --frequency ...`) is
    /// replicated at its frequency, one pass after another: the initial replication, then a delta cycle each time (VMs in
    /// QEMU: what the dirty bitmaps recorded; VMs of image files: what a comparison with the last point finds). Resumes what a stopped
    /// agent was doing; SIGTERM or SIGINT stops it cleanly. One per data directory;
    /// a systemd unit is in contrib/tern-agent.service.
    Agent(agent_cmd::AgentArgs),
    /// Pause replication of a VM: the agent skips it.
    ///
    /// QEMU keeps tracking its changes, so the first cycle after `tern resume` ships
    /// them (no resync).
    Pause(agent_cmd::NameArgs),
    /// Resume replication of a paused VM.
    Resume(agent_cmd::NameArgs),
    /// End replication of a VM after its migration, removing what tern made for it.
    ///
    /// Removes QEMU's dirty bitmaps and anything else tern made on this host for it
    /// (change logs, overlays, snapshots) and says what it removed. Waits for a running pass to end. Points stay in the
    /// store; the VM stays registered (`tern vm remove` forgets it).
    Complete(agent_cmd::NameArgs),
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
    let g = GlobalArgs::default().with_store(&cli.globals);
    let (result, error_code) = match cli.command {
        Command::Disk(cmd) => {
            let code = cmd.error_exit_code();
            (disk_cmd::run(cmd), code)
        }
        Command::Vm(cmd) => (vm_cmd::run(&g, cmd), 1),
        Command::Replicate(a) => (replicate_cmd::replicate(&g, a), 1),
        Command::Status(a) => (replicate_cmd::status(&g, a), 1),
        Command::Points(a) => (replicate_cmd::points(&g, a), 1),
        Command::Agent(a) => (agent_cmd::agent(&g, a), 1),
        Command::Pause(a) => (agent_cmd::pause(&g, a, true), 1),
        Command::Resume(a) => (agent_cmd::pause(&g, a, false), 1),
        Command::Complete(a) => (agent_cmd::complete(&g, a), 1),
        Command::Migrate(a) => (migrate_cmd::run(&g, a), 1),
        Command::Throttle(cmd) => (throttle_cmd::run(&g, cmd), 1),
        Command::Key(cmd) => (store_cmd::key(&g, cmd), 1),
        Command::Store(cmd) => (store_cmd::store(&g, cmd), 1),
        Command::Demo(a) => (demo_cmd::run(&g, a), 1),
    };
    let result = result.and_then(|code| {
        use std::io::Write as _;
        std::io::stdout().flush()?;
        Ok(code)
    });
    match result {
        Ok(code) => code,
        // The reader of our output has gone: nothing left to say, and nobody to say it
        // to. Ends quietly and successfully, as ripgrep does.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}
