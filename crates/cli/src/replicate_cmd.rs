//! `tern replicate`, `tern status`, `tern points`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Result;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar};
use tern_engine::{ReplicateEvent, ReplicateOptions};
use tern_types::ByteSize;

use crate::progress::bytes_bar;
use crate::GlobalArgs;

#[derive(Args)]
pub struct ReplicateArgs {
    /// The VM (see `tern vm list`).
    name: String,
    /// Upload workers per disk, 1 to 32. Memory use is about threads x chunk size
    /// (4 MiB by default).
    #[arg(long, default_value_t = tern_engine::DEFAULT_THREADS)]
    threads: usize,
    /// Read an image in place even though another process has it open for writing
    /// (only needed where the filesystem cannot make reflink snapshots). The replica
    /// may then not be consistent: prefer stopping the VM.
    #[arg(long)]
    force: bool,
    /// Do not show progress bars even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Print the result as JSON on stdout (no progress bars; warnings stay on stderr).
    #[arg(long)]
    json: bool,
}

/// Replicate: disks one after another, a progress bar per disk, a summary at the end.
/// Interrupted runs resume where they stopped when run again.
pub fn replicate(g: &GlobalArgs, a: ReplicateArgs) -> Result<ExitCode> {
    let threads = tern_engine::check_threads(a.threads)?;
    let engine = g.engine()?;
    let throttle = engine.throttle();
    let multi = MultiProgress::new();
    let bars: Mutex<HashMap<u32, ProgressBar>> = Mutex::new(HashMap::new());
    let observer = |ev: ReplicateEvent| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
        match ev {
            ReplicateEvent::Warning(w) => {
                let _ = multi.println(format!("tern: warning: {w}"));
                if multi.is_hidden() {
                    eprintln!("tern: warning: {w}");
                }
            }
            ReplicateEvent::Point { point_id, resumed } => {
                let verb = if resumed { "resuming" } else { "starting" };
                eprintln!("{verb} point {point_id} of VM {}", a.name);
            }
            ReplicateEvent::DiskStart { disk, total, done } => {
                let bar = multi.add(bytes_bar(&format!("disk {disk}"), total, !a.no_progress && !a.json));
                bar.set_position(done);
                bars.insert(disk, bar);
            }
            ReplicateEvent::Chunk { disk, guest_bytes } => {
                if let Some(b) = bars.get(&disk) {
                    b.inc(guest_bytes);
                }
            }
            ReplicateEvent::DiskDone { disk } => {
                if let Some(b) = bars.get(&disk) {
                    b.finish();
                }
            }
        }
    };
    let opts = ReplicateOptions { threads, force: a.force, ..Default::default() };
    let r = tern_engine::replicate(&engine, &a.name, &opts, &throttle, &observer)?;
    if a.json {
        let disks: Vec<_> = r
            .disks
            .iter()
            .map(|d| {
                serde_json::json!({
                    "disk": d.disk,
                    "virtual_size": d.virtual_size,
                    "chunks": d.chunks,
                    "resumed_chunks": d.resumed_chunks,
                    "zero_chunks": d.zero_chunks,
                    "dedup_chunks": d.dedup_chunks,
                    "uploaded_chunks": d.uploaded_chunks,
                    "uploaded_bytes": d.uploaded_bytes,
                    "read_bytes": d.read_bytes,
                    "snapshot": d.snapshot.name(),
                    "sha256": d.sha256,
                })
            })
            .collect();
        let v = serde_json::json!({
            "vm": r.vm,
            "point_id": r.point_id,
            "resumed": r.resumed,
            "store": engine.store_url(),
            "disks": disks,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for d in &r.disks {
        println!(
            "disk {}: {} in {} chunks: {} uploaded ({}), {} already in the store, {} zero{}",
            d.disk,
            ByteSize(d.virtual_size),
            d.chunks,
            d.uploaded_chunks,
            ByteSize(d.uploaded_bytes),
            d.dedup_chunks,
            d.zero_chunks,
            if d.resumed_chunks > 0 {
                format!(", {} done by an earlier run", d.resumed_chunks)
            } else {
                String::new()
            }
        );
    }
    println!("VM {}: recovery point {} committed to {}", r.vm, r.point_id, engine.store_url());
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct StatusArgs {
    /// Only this VM.
    name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

fn fmt_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// State per VM and disk from the state database (a running replication in another
/// process updates it at least every second).
pub fn status(g: &GlobalArgs, a: StatusArgs) -> Result<ExitCode> {
    let engine = g.engine()?;
    let vms = match &a.name {
        Some(n) => vec![engine.vm(n)?],
        None => engine.db().vm_list()?,
    };
    let now = time::OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for vm in vms {
        let repl = engine.db().last_replication(&vm.id)?;
        let Some(r) = repl else {
            out.push(serde_json::json!({ "vm": vm.name, "state": "not replicated", "disks": [] }));
            continue;
        };
        let disks = engine.db().replication_disks(&vm.id, &r.point_id)?;
        let done: u64 = disks.iter().map(|d| d.bytes_done).sum();
        let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
        let running = r.state == "running";
        // A running replication holds its VM's lock; one recorded as running without
        // it was stopped (failed, killed, machine restarted) and resumes with
        // `tern replicate`.
        let alive = running && tern_engine::replication_running(&engine, &vm.id)?;
        let elapsed = r.run_started.as_deref().and_then(parse_time).map(|t| (now - t).as_seconds_f64());
        // The rate over the last minute; the average since the run started until the
        // first minute's samples exist.
        let rate = match (alive, r.recent_rate, elapsed) {
            (true, Some(recent), _) => Some(recent as f64),
            (true, None, Some(e)) if e >= 1.0 => Some(done.saturating_sub(r.run_base_bytes) as f64 / e),
            _ => None,
        };
        let eta = rate.filter(|&r| r > 0.0).map(|rate| total.saturating_sub(done) as f64 / rate);
        let state = match (running, alive) {
            (true, true) => "replicating",
            (true, false) => "interrupted",
            (false, _) => "protected",
        };
        out.push(serde_json::json!({
            "vm": vm.name,
            "state": state,
            "point": r.point_id,
            "store": r.store_url,
            "instant": r.instant,
            "bytes_done": done,
            "bytes_total": total,
            "rate_bytes_per_sec": rate,
            "eta_seconds": eta,
            "disks": disks.iter().map(|d| serde_json::json!({
                "disk": d.disk,
                "source": d.source_path,
                "state": d.state,
                "bytes_done": d.bytes_done,
                "bytes_total": d.virtual_size,
                "bytes_uploaded": d.bytes_uploaded,
            })).collect::<Vec<_>>(),
        }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if out.is_empty() {
        println!("no VMs (add one with `tern vm add NAME --disk PATH`)");
    }
    for v in &out {
        let name = v["vm"].as_str().unwrap_or("");
        let state = v["state"].as_str().unwrap_or("");
        if v["disks"].as_array().is_none_or(|d| d.is_empty()) {
            println!("{name}: {state}");
            continue;
        }
        let (done, total) = (v["bytes_done"].as_u64().unwrap_or(0), v["bytes_total"].as_u64().unwrap_or(0));
        let mut line = format!(
            "{name}: {state}, point {}: {} / {}",
            v["point"].as_str().unwrap_or(""),
            ByteSize(done),
            ByteSize(total)
        );
        if let Some(rate) = v["rate_bytes_per_sec"].as_f64() {
            line += &format!(", {}/s", ByteSize(rate as u64));
        }
        if let Some(eta) = v["eta_seconds"].as_f64() {
            line += &format!(", ETA {}", fmt_duration(eta));
        }
        if state == "interrupted" {
            line += &format!(" (run `tern replicate {name}` to resume)");
        }
        println!("{line}");
        for d in v["disks"].as_array().into_iter().flatten() {
            println!(
                "  disk {}: {} {} / {} ({} uploaded)  {}",
                d["disk"],
                d["state"].as_str().unwrap_or(""),
                ByteSize(d["bytes_done"].as_u64().unwrap_or(0)),
                ByteSize(d["bytes_total"].as_u64().unwrap_or(0)),
                ByteSize(d["bytes_uploaded"].as_u64().unwrap_or(0)),
                d["source"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct PointsArgs {
    /// The VM: its name (found through the store's manifests if this host does not
    /// know it) or its id.
    name: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// List recovery points from the store (the truth), oldest first.
pub fn points(g: &GlobalArgs, a: PointsArgs) -> Result<ExitCode> {
    let engine = g.engine()?;
    let key = engine.load_key()?;
    let store = engine.open_store()?;
    let rt = engine.runtime()?;
    let points = rt.block_on(async {
        engine.check_store(&store, &key, false).await?;
        let id = tern_engine::find_vm(&engine, &store, &key, &a.name).await?;
        tern_engine::list_points(&engine, &store, &key, &id).await
    })?;
    if a.json {
        let v: Vec<_> = points.iter().map(|p| serde_json::to_value(&p.manifest)).collect::<Result<_, _>>()?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        println!("VM {} has no recovery points", a.name);
    }
    for p in &points {
        let m = &p.manifest;
        println!("{}  {}", m.point_id, m.instant);
        for d in &m.disks {
            // The content digest when the point has one (compare with `sha256sum` of
            // the source as of the point), else the index digest.
            let digest = match &d.sha256 {
                Some(sha) => format!("sha256 {sha}"),
                None => format!("index digest {}", &d.index_digest[..16.min(d.index_digest.len())]),
            };
            println!(
                "  disk {}: {} ({}), {} of {} chunks stored, {digest}",
                d.index,
                ByteSize(d.virtual_size),
                d.source_name,
                d.data_chunks,
                d.chunk_count,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
