//! `tern agent`, `tern pause`, `tern resume`, `tern complete`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use tern_engine::agent::{AgentEvent, AgentOptions};
use tern_engine::{PointKind, ReplicateEvent, ReplicateOptions};
use tern_types::ByteSize;

use crate::{DataDirArg, GlobalArgs, StoreOptions};

/// Parse a duration like `30s`, `5m`, `15m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s, 5m, 1h or 7d: {e}"))
}

#[derive(Args)]
pub struct AgentArgs {
    /// Time between cycles of VMs that set none with `tern replicate --frequency`:
    /// 1s to 7d (30s, 5m, 15m...).
    #[arg(long, value_parser = parse_duration, default_value = "5m", value_name = "DURATION")]
    frequency: Duration,
    /// Upload workers per disk, 1 to 32.
    #[arg(long, default_value_t = tern_engine::DEFAULT_THREADS)]
    threads: usize,
    /// How often to apply retention and collect garbage in the store, when a VM has
    /// a retention setting (1s to 7d). A collection pauses passes while it runs.
    #[arg(long, value_parser = parse_duration, default_value = "1h", value_name = "DURATION")]
    gc_interval: Duration,
    /// CPU niceness of the agent, 0 to 19: the guests come first when they compete
    /// for the host's CPU (its disk I/O is best effort, lowest level, too).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
    #[command(flatten)]
    globals: StoreOptions,
}

/// The data mover: runs until SIGTERM or SIGINT.
pub fn agent(g: &GlobalArgs, a: AgentArgs) -> Result<ExitCode> {
    let threads = tern_engine::check_threads(a.threads)?;
    tern_engine::agent::check_frequency(a.frequency)?;
    let engine = g.with_store(&a.globals).engine()?;
    let stop = tern_engine::agent::stop_on_signals();
    tern_engine::agent::lower_priority(a.nice);
    let opts = AgentOptions {
        frequency: a.frequency,
        replicate: ReplicateOptions { threads, ..Default::default() },
        stop,
        max_passes: None,
        gc_interval: a.gc_interval,
    };
    let throttle = engine.throttle();
    let frequency = humantime::format_duration(a.frequency).to_string();
    let observer = |ev: AgentEvent<'_>| match ev {
        AgentEvent::Started => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "tern agent: replicating every VM with replication enabled (default frequency {frequency}); SIGTERM stops"
            );
            let _ = out.flush();
        }
        AgentEvent::PassStart { .. } => {}
        AgentEvent::PassDone { vm, report } => {
            let changed: u64 = report.disks.iter().map(|d| d.changed_bytes).sum();
            let stored: u64 = report.disks.iter().map(|d| d.uploaded_bytes).sum();
            let what = match report.kind {
                PointKind::Full => "full".to_string(),
                PointKind::Delta => format!("delta, {} changed", ByteSize(changed)),
                PointKind::Resync => format!("resync, {} differed", ByteSize(changed)),
            };
            // A log line; a closed stdout must not stop the agent.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stdout().lock(),
                "{vm}: point {} at {} ({what}, {} stored)",
                report.point_id,
                report.instant,
                ByteSize(stored)
            );
            let _ = std::io::stdout().flush();
        }
        AgentEvent::PassFailed { vm, error, retry } => {
            eprintln!("tern agent: {vm}: {error:#} (retrying in {})", humantime::format_duration(retry));
        }
        AgentEvent::Replicate(ReplicateEvent::Warning(w)) => eprintln!("tern agent: warning: {w}"),
        AgentEvent::Replicate(_) => {}
        AgentEvent::Gc(Ok(r)) => {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stdout().lock(),
                "gc: {} point(s) expired, {} object(s) deleted ({}), {} point(s) kept",
                r.expired_points.len(),
                r.deleted_objects,
                ByteSize(r.deleted_bytes),
                r.retained_points
            );
        }
        AgentEvent::Gc(Err(e)) => eprintln!("tern agent: garbage collection: {e:#}"),
        AgentEvent::Compacted { vm, result: Ok((point, disks)) } => {
            use std::io::Write as _;
            let disks: Vec<String> = disks.iter().map(u32::to_string).collect();
            let _ = writeln!(
                std::io::stdout().lock(),
                "{vm}: compacted point {point} beside the cycles (disk {}); the next cycle builds on it",
                disks.join(", ")
            );
        }
        AgentEvent::Compacted { vm, result: Err(e) } => {
            eprintln!("tern agent: {vm}: compaction beside the cycles failed (the chain goes on): {e:#}")
        }
    };
    let passes = tern_engine::agent::run_agent(&engine, &opts, &throttle, &observer)?;
    outln!("tern agent: stopped after {passes} pass(es)");
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct NameArgs {
    /// The VM.
    name: String,
    #[command(flatten)]
    data: DataDirArg,
}

/// `tern pause NAME` / `tern resume NAME`.
pub fn pause(g: &GlobalArgs, a: NameArgs, paused: bool) -> Result<ExitCode> {
    let engine = g.with(&a.data, None, None).engine()?;
    let vm = tern_engine::set_paused(&engine, &a.name, paused)?;
    if paused {
        outln!(
            "paused replication of VM {} (changes are still tracked; `tern resume {}` goes on)",
            vm.name,
            vm.name
        );
    } else {
        outln!("resumed replication of VM {}", vm.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern complete NAME`.
pub fn complete(g: &GlobalArgs, a: NameArgs) -> Result<ExitCode> {
    let engine = g.with(&a.data, None, None).engine()?;
    let removed = tern_engine::complete(&engine, &a.name)?;
    for r in &removed {
        outln!("removed {r}");
    }
    outln!(
        "replication of VM {} is complete: nothing of tern's is left on this host for it; its points stay in the store",
        a.name
    );
    Ok(ExitCode::SUCCESS)
}
