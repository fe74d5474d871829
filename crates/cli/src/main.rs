//! The `tern` command. Thin: it turns flags into validated settings, calls the
//! library crates, and prints. Exit status: 0 success, 1 failure; `tern disk compare`
//! follows `qemu-img compare`: 0 identical, 1 different, 2 error.

mod disk_cmd;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tern replicates the disks of running virtual machines to object storage and
/// migrates them back as ready-to-boot disk images.
#[derive(Parser)]
#[command(name = "tern", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect, map, convert and compare disk images (raw, qcow2, VHD, VHDX).
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (result, error_code) = match cli.command {
        Command::Disk(cmd) => {
            let code = cmd.error_exit_code();
            (disk_cmd::run(cmd), code)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::from(error_code)
        }
    }
}
