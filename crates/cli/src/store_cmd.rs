//! `tern key export`, `tern store verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use tern_engine::VerifyOptions;
use tern_types::ByteSize;

use crate::{print_json, DataDirArg, GlobalArgs, KeyFileArg, StoreOptions};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Print the store key (or write it to a new file). Keep a copy somewhere safe:
    /// without it the store cannot be read. Use it elsewhere with --key-file.
    Export {
        /// Write to this new file (mode 0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        data: DataDirArg,
        #[command(flatten)]
        key: KeyFileArg,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Check that every object every recovery point references is in the store:
    /// manifests, indexes, chunks. Each problem names the VM, point, disk and chunk.
    /// Without --store: every store this host's VMs replicate to, and the default store.
    /// Exit status 1 if anything is missing or corrupt.
    Verify {
        /// Also fetch every chunk and check it: decryption, authentication, address,
        /// length (reads the whole store).
        #[arg(long)]
        read_data: bool,
        /// Chunks fetched and checked at once with --read-data, 1 to 32.
        #[arg(long, default_value_t = tern_engine::DEFAULT_THREADS)]
        threads: usize,
        /// Print JSON instead of text: an array with one report per store.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        globals: StoreOptions,
    },
    /// Apply retention and remove what no retained point references.
    ///
    /// Without --store: every store this host's VMs replicate to, and the default
    /// store (as `store verify`).
    ///
    /// Points past a VM's retention (`tern replicate NAME --retention-age/--retention-count`;
    /// the newest point is always kept) lose their manifests; then every chunk, index
    /// and segment piece that no remaining point references is deleted. Replication
    /// passes of any host wait while it runs (it waits for running ones to finish
    /// first), so nothing a pass is writing is ever taken. `tern agent` runs this on
    /// its own (--gc-interval) when a VM has a retention setting.
    Gc {
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        globals: StoreOptions,
    },
}

pub fn key(g: &GlobalArgs, cmd: KeyCommand) -> Result<ExitCode> {
    match cmd {
        KeyCommand::Export { out, data, key } => {
            let engine = g.with(&data, Some(&key), None).engine_read_only()?;
            let key = engine.load_key()?;
            match out {
                Some(p) => {
                    key.save_new(&p)?;
                    eprintln!("key {} written to {}", key.id(), p.display());
                }
                None => {
                    use std::io::Write as _;
                    write!(std::io::stdout().lock(), "{}", key.to_file_text())?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The stores `tern store verify` checks without `--store`: those this host's VMs
/// replicate to, and the default store if it exists.
fn stores_to_verify(engine: &tern_engine::Engine) -> Result<Vec<String>> {
    if let Some(u) = engine.explicit_store() {
        return Ok(vec![u.to_string()]);
    }
    let mut urls: Vec<String> = engine.db().vm_list()?.into_iter().filter_map(|v| v.store_url).collect();
    let default = engine.store_url().to_string();
    if default.strip_prefix("file://").is_some_and(|p| std::path::Path::new(p).is_dir()) {
        urls.push(default.clone());
    }
    urls.sort();
    urls.dedup();
    if urls.is_empty() {
        anyhow::bail!("nothing to verify: no VM of this host has replicated, and there is no store at {default}; name one with --store URL");
    }
    Ok(urls)
}

pub fn store(g: &GlobalArgs, cmd: StoreCommand) -> Result<ExitCode> {
    match cmd {
        StoreCommand::Gc { dry_run, json, globals } => {
            let engine = g.with_store(&globals).engine()?;
            let mut reports = Vec::new();
            for url in stores_to_verify(&engine)? {
                let opts = tern_engine::gc::GcOptions { dry_run, store_url: Some(url), ..Default::default() };
                reports.push(tern_engine::gc::gc(&engine, &opts)?);
            }
            if json {
                print_json(&reports)?;
                return Ok(ExitCode::SUCCESS);
            }
            if reports.is_empty() {
                outln!("no store to collect: nothing has been replicated yet");
            }
            let verb = if dry_run { "would delete" } else { "deleted" };
            for r in &reports {
                for (vm, p) in &r.expired_points {
                    let what = if dry_run { "would expire" } else { "expired" };
                    outln!("{what} point {p} of VM {vm} (past its retention)");
                }
                outln!(
                    "store {}: {} point(s) kept, {} object(s) referenced; {verb} {} object(s) ({})",
                    r.store_url,
                    r.retained_points,
                    r.referenced_objects,
                    r.deleted_objects,
                    ByteSize(r.deleted_bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { read_data, threads, json, globals } => {
            let engine = g.with_store(&globals).engine_read_only()?;
            let threads = tern_engine::check_threads(threads)?;
            let mut reports = Vec::new();
            for url in stores_to_verify(&engine)? {
                let opts = VerifyOptions { read_data, threads, store_url: Some(url) };
                reports.push(tern_engine::verify(&engine, &opts)?);
            }
            if json {
                print_json(&reports)?;
            } else {
                for r in &reports {
                    for p in &r.problems {
                        outln!("problem: {p}");
                    }
                    outln!(
                        "store {}: {} VM(s), {} point(s), {} chunk reference(s) to {} distinct chunk(s), {} segment piece(s){}: {} problem(s)",
                        r.store_url,
                        r.vms,
                        r.points,
                        r.chunk_refs,
                        r.distinct_chunks,
                        r.segment_pieces,
                        if read_data { " read and verified" } else { " checked for presence" },
                        r.problems.len()
                    );
                }
            }
            let clean = reports.iter().all(|r| r.problems.is_empty());
            Ok(if clean { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
