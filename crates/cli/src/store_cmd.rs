//! `tern key export`, `tern store verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use tern_engine::VerifyOptions;

use crate::GlobalArgs;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Print the store key (or write it to a new file). Keep a copy somewhere safe:
    /// without it the store cannot be read. Use it elsewhere with --key-file.
    Export {
        /// Write to this new file (mode 0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Check that every object every recovery point references is in the store:
    /// manifests, indexes, chunks. Each problem names the VM, point, disk and chunk.
    /// Exit status 1 if anything is missing or corrupt.
    Verify {
        /// Also fetch every chunk and check it: decryption, authentication, address,
        /// length (reads the whole store).
        #[arg(long)]
        read_data: bool,
        /// Chunks fetched and checked at once with --read-data, 1 to 32.
        #[arg(long, default_value_t = tern_engine::DEFAULT_THREADS)]
        threads: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn key(g: &GlobalArgs, cmd: KeyCommand) -> Result<ExitCode> {
    let engine = g.engine()?;
    match cmd {
        KeyCommand::Export { out } => {
            let key = engine.load_key()?;
            match out {
                Some(p) => {
                    key.save_new(&p)?;
                    eprintln!("key {} written to {}", key.id(), p.display());
                }
                None => print!("{}", key.to_file_text()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn store(g: &GlobalArgs, cmd: StoreCommand) -> Result<ExitCode> {
    let engine = g.engine()?;
    match cmd {
        StoreCommand::Verify { read_data, threads, json } => {
            let r = tern_engine::verify(&engine, &VerifyOptions { read_data, threads })?;
            if json {
                let problems: Vec<_> = r
                    .problems
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "vm": p.vm, "point": p.point, "disk": p.disk, "chunk": p.chunk, "message": p.message,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({
                        "vms": r.vms, "points": r.points, "chunk_refs": r.chunk_refs,
                        "distinct_chunks": r.distinct_chunks, "problems": problems,
                    })
                );
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{} VM(s), {} point(s), {} chunk reference(s) to {} distinct chunk(s){}: {} problem(s)",
                    r.vms,
                    r.points,
                    r.chunk_refs,
                    r.distinct_chunks,
                    if read_data { " read and verified" } else { " checked for presence" },
                    r.problems.len()
                );
            }
            Ok(if r.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
