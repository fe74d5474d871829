//! `tern replicate`, `tern status`, `tern points`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::Result;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar};
use serde::Serialize;
use tern_engine::{ReplicateEvent, ReplicateOptions};
use tern_types::ByteSize;

use crate::progress::bytes_bar;
use crate::{print_json, DataDirArg, GlobalArgs, StoreOptions};

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
    /// Enable replication with this time between cycles (1s to 7d: 30s, 5m, 15m...):
    /// `tern agent` then replicates the VM on its own. Without an agent, this run
    /// does one pass in the foreground too (so cron works).
    #[arg(long, value_parser = crate::agent_cmd::parse_duration, value_name = "DURATION")]
    frequency: Option<std::time::Duration>,
    /// Enable replication keeping points no older than this (1m or more: 7d, 30d);
    /// the newest point is always kept.
    #[arg(long, value_parser = crate::agent_cmd::parse_duration, value_name = "DURATION")]
    retention_age: Option<std::time::Duration>,
    /// Enable replication keeping at most this many points (1 or more).
    #[arg(long, value_name = "N")]
    retention_count: Option<u64>,
    /// Most space one disk's change log may take on this host (1M or more; default
    /// 16G). A cycle whose changes do not fit ships nothing and keeps them tracked in
    /// QEMU (status: backlog); they ship once they fit. QEMU VMs only.
    #[arg(long, value_name = "SIZE")]
    log_budget: Option<ByteSize>,
    /// Switch how a QEMU VM's changes are tracked: journal (QEMU's write-blocking
    /// mirror sends every write to `tern agent`; a point every 5 s by default) or
    /// qemu (dirty bitmaps alone). See `tern vm add --tracking`.
    #[arg(long, value_enum, value_name = "SOURCE")]
    tracking: Option<crate::vm_cmd::TrackingArg>,
    /// With an agent running: hand the VM to it and return at once, instead of
    /// showing progress until its next point is committed.
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    globals: StoreOptions,
}

/// Replicate: disks one after another, a progress bar per disk, a summary at the end.
/// Interrupted runs resume where they stopped when run again.
pub fn replicate(g: &GlobalArgs, a: ReplicateArgs) -> Result<ExitCode> {
    let threads = tern_engine::check_threads(a.threads)?;
    let engine = g.with_store(&a.globals).engine()?;
    let agent = tern_engine::agent::agent_running(&engine)?;
    let settings = a.frequency.is_some()
        || a.retention_age.is_some()
        || a.retention_count.is_some()
        || a.log_budget.is_some()
        || a.tracking.is_some();
    if let Some(t) = a.tracking {
        let journal = t == crate::vm_cmd::TrackingArg::Journal;
        let vm = tern_engine::set_tracking(&engine, &a.name, journal)?;
        eprintln!(
            "VM {} is tracked by {}",
            vm.name,
            if journal {
                "journal (QEMU's write-blocking mirror into `tern agent`)"
            } else {
                "QEMU's dirty bitmaps"
            }
        );
    }
    if settings || agent || a.detach {
        let change = tern_engine::SettingsChange {
            frequency: a.frequency,
            retention_age: a.retention_age,
            retention_count: a.retention_count,
            log_budget: a.log_budget.map(|b| b.bytes()),
        };
        let before = {
            let vm = engine.vm(&a.name)?;
            engine.db().newest_point(&vm.id)?
        };
        let (vm, s) = tern_engine::enable(&engine, &a.name, &change)?;
        let every = s.frequency_ms.map_or("the agent's --frequency".to_string(), |ms| {
            humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
        });
        if agent {
            eprintln!("replication of VM {} enabled: the running agent replicates it every {every}", vm.name);
            if a.detach {
                return Ok(ExitCode::SUCCESS);
            }
            return wait_for_point(&engine, &vm, before.as_deref());
        }
        if a.detach {
            anyhow::bail!(
                "no agent runs for this data directory: start `tern agent` (replication of VM {} is enabled, every {every})",
                vm.name
            );
        }
        eprintln!(
            "replication of VM {} enabled (every {every}); no agent runs, so this run does one pass",
            vm.name
        );
    }
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
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    if r.kind != tern_engine::PointKind::Full {
        for d in &r.disks {
            outln!(
                "disk {}: {} changed, {} stored ({} read)",
                d.disk,
                ByteSize(d.changed_bytes),
                ByteSize(d.uploaded_bytes),
                ByteSize(d.read_bytes)
            );
        }
        let what = if r.kind == tern_engine::PointKind::Delta { "delta" } else { "resync" };
        outln!("VM {}: {what} point {} ({}) committed to {}", r.vm, r.point_id, r.instant, r.store_url);
        return Ok(ExitCode::SUCCESS);
    }
    for d in &r.disks {
        outln!(
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
    outln!("VM {}: recovery point {} committed to {}", r.vm, r.point_id, r.store_url);
    Ok(ExitCode::SUCCESS)
}

/// With an agent running: wait until it commits a point of `vm` newer than `before`,
/// showing what it is doing; an error it records ends the wait with that error.
fn wait_for_point(
    engine: &tern_engine::Engine,
    vm: &tern_engine::VmDef,
    before: Option<&str>,
) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let mut last_shown = String::new();
    loop {
        let newest = engine.db().newest_point(&vm.id)?;
        if newest.as_deref() > before {
            let p = newest.unwrap_or_default();
            outln!("VM {}: recovery point {p} committed by the agent", vm.name);
            return Ok(ExitCode::SUCCESS);
        }
        if let Some(t) = engine.db().tracking(&vm.id)? {
            if let Some(e) = t.last_error {
                if started.elapsed() > std::time::Duration::from_secs(2) && e != last_shown {
                    eprintln!(
                        "tern: the agent's last pass of {} failed: {e} (it retries; Ctrl-C stops waiting)",
                        vm.name
                    );
                    last_shown = e;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[derive(Args)]
pub struct StatusArgs {
    /// Only this VM.
    name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    data: DataDirArg,
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

/// One VM in `tern status` (docs/json.md).
#[derive(Serialize)]
struct VmStatus {
    vm: String,
    /// `replicating`, `interrupted`, `protected` or `not replicated`.
    state: &'static str,
    /// The store the VM replicates to.
    store: String,
    #[serde(flatten)]
    replication: Option<ReplicationStatus>,
    /// VMs replicated at least once: their change tracking.
    #[serde(skip_serializing_if = "Option::is_none")]
    tracking: Option<TrackingStatus>,
    /// VMs with replication enabled: how the agent replicates them.
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<ScheduleStatus>,
}

/// A VM's replication settings in `tern status`.
#[derive(Serialize)]
struct ScheduleStatus {
    paused: bool,
    /// Time between cycles; `null`: the agent's `--frequency`.
    frequency_seconds: Option<f64>,
    retention_age_seconds: Option<u64>,
    retention_count: Option<u64>,
    /// Whether an agent runs for this data directory.
    agent_running: bool,
    /// The newest point is older than twice the frequency: the RPO is missed.
    rpo_missed: bool,
    /// Seconds until the next cycle is due (0: due now), when the frequency and the
    /// newest point's age are known.
    next_cycle_in_seconds: Option<u64>,
}

/// A VM's change tracking in `tern status`.
#[derive(Serialize)]
struct TrackingStatus {
    /// `initial` (the first full pass is due or running), `delta` (cycles ship only
    /// changes), `resync` (tracking was lost: the next pass compares every chunk), or
    /// `error` (the last pass failed: see `last_error`).
    state: String,
    /// The tracking source: `qemu` (QEMU's dirty bitmaps) or `scan` (image files,
    /// compared with the last point every pass).
    source: &'static str,
    /// QEMU VMs: how a cut's data leaves QEMU, `pull` (NBD exports) or `push` (QEMU
    /// copies it into local files).
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    /// The newest point tracking committed, and its age in seconds (the achieved RPO).
    last_point: Option<String>,
    last_point_age_seconds: Option<u64>,
    /// The tracking sequence (QEMU: the dirty bitmap recording changes since that
    /// point; scan: the number of the last cut).
    bitmap_seq: u64,
    last_error: Option<String>,
    /// Change log bytes on this host now (staged by a cycle in progress), and the
    /// per-disk budget.
    log_bytes: u64,
    log_budget: u64,
    /// The last time tracking was lost and the disks were resynced, and why.
    last_resync: Option<tern_engine::VmEvent>,
    /// The last cycle whose changes did not fit (over the log budget or the log file
    /// system full).
    last_backlog: Option<tern_engine::VmEvent>,
}

/// Seconds since the time in a point id (`YYYYMMDDTHHMMSSZ-...`).
fn point_age(id: &str) -> Option<u64> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let t = time::PrimitiveDateTime::parse(id.get(..16)?, &fmt).ok()?.assume_utc();
    u64::try_from((time::OffsetDateTime::now_utc() - t).whole_seconds()).ok()
}

/// The latest replication of a VM.
#[derive(Serialize)]
struct ReplicationStatus {
    point: String,
    /// The store that replication writes to (the VM's, unless it was moved since).
    point_store: String,
    instant: String,
    bytes_done: u64,
    bytes_total: u64,
    rate_bytes_per_sec: Option<u64>,
    eta_seconds: Option<u64>,
    disks: Vec<DiskStatus>,
}

#[derive(Serialize)]
struct DiskStatus {
    disk: u32,
    source: std::path::PathBuf,
    state: String,
    bytes_done: u64,
    bytes_total: u64,
    bytes_uploaded: u64,
}

/// State per VM and disk from the state database (a running replication in another
/// process updates it about every second).
pub fn status(g: &GlobalArgs, a: StatusArgs) -> Result<ExitCode> {
    let engine = g.with(&a.data, None, None).engine_read_only()?;
    let vms = match &a.name {
        Some(n) => vec![engine.vm(n)?],
        None => engine.db().vm_list()?,
    };
    let mut out = Vec::new();
    for vm in vms {
        let store = engine.vm_store_url(&vm).to_string();
        let settings = engine.db().settings(&vm.id)?;
        let last_resync = engine.db().last_event(&vm.id, "resync")?;
        let last_backlog = engine.db().last_event(&vm.id, "backlog")?;
        let tracking = engine.db().tracking(&vm.id)?.map(|t| TrackingStatus {
            state: if t.state != "backlog" && t.last_error.is_some() {
                "error".into()
            } else {
                t.state.clone()
            },
            last_point_age_seconds: t.last_point.as_deref().and_then(point_age),
            last_point: t.last_point,
            source: match &vm.qemu {
                Some(q) if q.journal => "journal",
                Some(_) => "qemu",
                None => "scan",
            },
            mode: vm.qemu.as_ref().map(|q| if q.push { "push" } else { "pull" }),
            bitmap_seq: t.seq,
            last_error: t.last_error,
            log_bytes: tern_engine::log_bytes(&engine, &vm),
            log_budget: settings.log_budget.unwrap_or(tern_engine::DEFAULT_LOG_BUDGET),
            last_resync,
            last_backlog,
        });
        let schedule = if settings.enabled {
            let age = tracking.as_ref().and_then(|t| t.last_point_age_seconds);
            let freq = settings.frequency_ms.map(|ms| ms as f64 / 1000.0);
            Some(ScheduleStatus {
                paused: settings.paused,
                frequency_seconds: freq,
                retention_age_seconds: settings.retention_age_s,
                retention_count: settings.retention_count,
                agent_running: tern_engine::agent::agent_running(&engine)?,
                rpo_missed: matches!((age, freq), (Some(a), Some(f)) if a as f64 > 2.0 * f),
                next_cycle_in_seconds: match (age, freq) {
                    (Some(a), Some(f)) if !settings.paused => Some((f - a as f64).max(0.0).round() as u64),
                    _ => None,
                },
            })
        } else {
            None
        };
        let Some(r) = engine.db().last_replication(&vm.id)? else {
            let state = if settings.paused { "paused" } else { "not replicated" };
            out.push(VmStatus { vm: vm.name, state, store, replication: None, tracking, schedule });
            continue;
        };
        let disks = engine.db().replication_disks(&vm.id, &r.point_id)?;
        let recorded: u64 = disks.iter().map(|d| d.bytes_done).sum();
        let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
        let running = r.state == "running";
        // A running replication holds its VM's lock; one recorded as running without
        // it was stopped (failed, killed, machine restarted) and resumes with
        // `tern replicate`.
        let alive = running && tern_engine::replication_running(&engine, &vm.id)?;
        // What the run itself shows: chunks in flight count by the share of them sent.
        let done =
            if alive { recorded.max(r.run_base_bytes + r.run_live_bytes).min(total) } else { recorded };
        // The rate over the last minute of the run, as the run measures it (from its
        // first second on); none before the run has recorded one.
        let rate = if alive { r.recent_rate } else { None };
        let eta = rate.filter(|&r| r > 0).map(|rate| total.saturating_sub(done).div_ceil(rate));
        let state = match (running, alive) {
            (true, true) => "replicating",
            (_, false) if settings.paused => "paused",
            (true, false) => "interrupted",
            (false, _) => "protected",
        };
        out.push(VmStatus {
            vm: vm.name,
            state,
            store,
            tracking,
            schedule,
            replication: Some(ReplicationStatus {
                point: r.point_id,
                point_store: r.store_url,
                instant: r.instant,
                bytes_done: done,
                bytes_total: total,
                rate_bytes_per_sec: rate,
                eta_seconds: eta,
                disks: disks
                    .into_iter()
                    .map(|d| DiskStatus {
                        disk: d.disk,
                        source: d.source_path,
                        state: d.state,
                        bytes_done: d.bytes_done,
                        bytes_total: d.virtual_size,
                        bytes_uploaded: d.bytes_uploaded,
                    })
                    .collect(),
            }),
        });
    }
    if a.json {
        print_json(&out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if out.is_empty() {
        outln!("no VMs (add one with `tern vm add NAME --disk PATH`)");
    }
    for v in &out {
        let Some(r) = &v.replication else {
            outln!("{}: {} (store {})", v.vm, v.state, v.store);
            continue;
        };
        if let Some(t) = &v.tracking {
            let source = match t.mode {
                Some(m) => format!("{}, {m}", t.source),
                None => t.source.to_string(),
            };
            let mut line = format!("{}: {}, tracking {} ({source})", v.vm, v.state, t.state);
            if let (Some(p), Some(age)) = (&t.last_point, t.last_point_age_seconds) {
                line += &format!(", newest point {p} ({} ago)", fmt_duration(age as f64));
            }
            if let Some(s) = &v.schedule {
                match s.frequency_seconds {
                    Some(f) => line += &format!(", every {}", fmt_duration(f)),
                    None => line += ", at the agent's frequency",
                }
                if let Some(n) = s.next_cycle_in_seconds {
                    line += &format!(", next cycle in {}", fmt_duration(n as f64));
                }
                if s.rpo_missed {
                    line += " (RPO missed)";
                }
                if !s.agent_running {
                    line += " (no agent runs)";
                }
            }
            outln!("{line}");
            if let Some(e) = &t.last_error {
                outln!("  last error: {e}");
            }
            if t.log_bytes > 0 {
                outln!(
                    "  change logs: {} on this host (budget {} per disk)",
                    tern_types::ByteSize(t.log_bytes),
                    tern_types::ByteSize(t.log_budget)
                );
            }
            if let Some(e) = &t.last_resync {
                outln!("  last resync: {}: {}", e.at, e.message);
            }
            if let Some(e) = &t.last_backlog {
                outln!("  last backlog: {}: {}", e.at, e.message);
            }
            if v.state != "replicating" && v.state != "interrupted" {
                outln!("  store {}", v.store);
                continue;
            }
        }
        let mut line = format!(
            "{}: {}, point {}: {} / {}",
            v.vm,
            v.state,
            r.point,
            ByteSize(r.bytes_done),
            ByteSize(r.bytes_total)
        );
        if let Some(rate) = r.rate_bytes_per_sec {
            line += &format!(", {}", crate::progress::rate_text(rate as f64));
        }
        if let Some(eta) = r.eta_seconds {
            line += &format!(", ETA {}", fmt_duration(eta as f64));
        }
        if v.state == "interrupted" {
            line += &format!(" (run `tern replicate {}` to resume)", v.vm);
        }
        outln!("{line}");
        outln!("  store {}", r.point_store);
        for d in &r.disks {
            outln!(
                "  disk {}: {} {} / {} ({} uploaded)  {}",
                d.disk,
                d.state,
                ByteSize(d.bytes_done),
                ByteSize(d.bytes_total),
                ByteSize(d.bytes_uploaded),
                d.source.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PointsArgs {
    #[command(subcommand)]
    command: Option<PointsCommand>,
    /// The VM: its name (found through the store's manifests if this host does not
    /// know it) or its id.
    #[arg(required = true)]
    name: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    globals: StoreOptions,
}

/// `tern points serve`.
#[derive(clap::Subcommand)]
pub enum PointsCommand {
    /// Serve a recovery point over NBD straight from the store (instant test boot).
    Serve(crate::serve_cmd::PointsServeArgs),
}

/// List recovery points from the store (the truth), oldest first.
pub fn points(g: &GlobalArgs, a: PointsArgs) -> Result<ExitCode> {
    if let Some(PointsCommand::Serve(s)) = a.command {
        return crate::serve_cmd::points_serve(g, s);
    }
    let Some(name) = a.name.as_deref() else { anyhow::bail!("give the VM's name") };
    let engine = g.with_store(&a.globals).engine_read_only()?;
    let store = engine.open_store_at(&engine.store_url_for(name)?, false)?;
    let key = engine.load_key()?;
    let rt = engine.runtime()?;
    let points = rt.block_on(async {
        engine.check_store(&store, &key, false).await?;
        let id = tern_engine::find_vm(&engine, &store, &key, name).await?;
        tern_engine::list_points(&engine, &store, &key, &id).await
    })?;
    if a.json {
        let out: Vec<PointJson> = points.iter().map(|p| PointJson::of(&p.manifest)).collect();
        print_json(&out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        outln!("VM {} has no recovery points in {}", name, store.url());
    }
    for p in &points {
        let m = &p.manifest;
        let j = PointJson::of(m);
        match j.delta_bytes {
            Some(n) => outln!("{}  {}  {}, {} changed", m.point_id, m.instant, j.kind, ByteSize(n)),
            None => outln!("{}  {}  {}", m.point_id, m.instant, j.kind),
        }
        for d in &m.disks {
            // The content digest when the point has one (compare with `sha256sum` of
            // the source as of the point), else the index digest.
            let digest = match &d.sha256 {
                Some(sha) => format!("sha256 {sha}"),
                None => format!("index digest {}", &d.index_digest[..16.min(d.index_digest.len())]),
            };
            outln!(
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

/// One point in `tern points --json`: the manifest as stored, plus what it is.
#[derive(Serialize)]
struct PointJson<'a> {
    /// The point id (also the manifest's `point_id`).
    id: &'a str,
    /// `full` (every disk a base of its own) or `delta` (segments on a base).
    kind: &'static str,
    /// Delta points: guest bytes this point's own segments changed, all disks.
    delta_bytes: Option<u64>,
    #[serde(flatten)]
    manifest: &'a tern_engine::Manifest,
}

impl<'a> PointJson<'a> {
    fn of(m: &'a tern_engine::Manifest) -> PointJson<'a> {
        let own: Vec<u64> = m.disks.iter().filter_map(|d| d.delta_bytes(&m.point_id)).collect();
        let delta = m.disks.iter().any(|d| d.base_point.is_some());
        PointJson {
            id: &m.point_id,
            kind: if delta { "delta" } else { "full" },
            delta_bytes: delta.then(|| own.iter().sum()),
            manifest: m,
        }
    }
}
