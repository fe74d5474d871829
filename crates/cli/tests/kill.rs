//! Resume after `kill -9`: `tern replicate` is killed at random moments while it
//! uploads (20 times), then run to completion. The migrated disk equals the source,
//! `tern store verify --read-data` passes, and the bytes uploaded again because of
//! the kills are at most threads x chunk object size per kill.
//!
//! Bytes are counted at the store (a local folder), run by run:
//! - chunk objects present before and after each run (name -> size);
//! - staging files left by a write the kill interrupted (`name#n`, one link): bytes
//!   that reached the store and must be sent again;
//! - the state database's per-disk `bytes_uploaded` (envelope bytes of the chunks each
//!   run uploaded and recorded). A run that re-sends a chunk the store already had
//!   records more uploaded bytes than the chunks it newly stored.
//!
//! Every run's uploads = chunks it newly stored + its interrupted writes + its
//! re-sends. Summed over all runs and compared with a clean run of the same disk into
//! an empty store, the difference is what the kills cost.
//!
//! On a local folder a chunk is written in about a millisecond, after the throttle
//! let it go, so kills nearly always land while workers wait for bandwidth. The second
//! test puts the store behind a slow link (an S3 server behind a proxy limited to
//! 2 MB/s) so that kills land in the middle of PUTs, and counts bytes where they enter
//! the store: at the proxy.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::proxy::{http_put, Proxy};
use support::{
    chunk_objects, moto, new_store_config, new_store_with_chunk_size, ok, qemu, random_image, s3_env, sha256,
    staging_files, status, tern, Rng,
};
use tern_engine::StateDb;

/// Chunk size of the store (written into its config): small chunks make many kill
/// points in a small disk.
const CHUNK: u64 = 1 << 20;
/// A stored chunk of incompressible data: the chunk plus the 44-byte envelope
/// (docs/formats/envelope.md).
const OBJECT: u64 = CHUNK + 44;
const THREADS: u64 = 2;
const DISK_MIB: u64 = 64;
const KILLS: usize = 20;
/// Upload rate while killing: 64 MiB take about 27 s at 20 Mbps, while the 20 kills
/// spend at most 20.5 s of it (16 s on average).
const LIMIT: &str = "20Mbps";
/// When to kill, in ms after the start: every other run early (often before a chunk
/// is recorded: progress is recorded about once a second), the others late (after
/// some progress was recorded).
const EARLY_MS: (u64, u64) = (40, 600);
const LATE_MS: (u64, u64) = (1100, 1450);

/// What the store and the state database hold between runs.
struct Seen {
    chunks: BTreeMap<String, u64>,
    staging: BTreeMap<PathBuf, (u64, u64)>,
    uploaded: u64,
    recorded: BTreeSet<String>,
    state: String,
}

fn observe(data: &Path, store: &Path, vm: &str) -> Seen {
    let db = StateDb::open(&data.join("tern.db")).unwrap();
    let vm = db.vm_get(vm).unwrap().unwrap();
    let (mut uploaded, mut recorded, mut state) = (0, BTreeSet::new(), "none".to_string());
    if let Some(r) = db.last_replication(&vm.id).unwrap() {
        for d in db.replication_disks(&vm.id, &r.point_id).unwrap() {
            uploaded += d.bytes_uploaded;
            for (_, addr) in db.recorded_chunks(&vm.id, &r.point_id, d.disk).unwrap() {
                recorded.insert(hex::encode(addr.expect("random data has no zero chunks")));
            }
        }
        state = r.state;
    }
    Seen { chunks: chunk_objects(store), staging: staging_files(store), uploaded, recorded, state }
}

/// The moment to kill run `run`, in ms after its start.
fn kill_after(rng: &mut Rng, run: usize) -> u64 {
    let (lo, hi) = if run.is_multiple_of(2) { EARLY_MS } else { LATE_MS };
    rng.range(lo, hi)
}

fn seeded_rng() -> Rng {
    let seed = std::env::var("TERN_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    println!("seed {seed} (set TERN_TEST_SEED to repeat)");
    Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

fn stored_bytes(s: &Seen) -> u64 {
    s.chunks.values().sum()
}

/// Bytes a run sent that did not add a chunk: its interrupted writes and re-sends of
/// chunks the store had when it started.
fn waste(before: &Seen, after: &Seen, run: usize) -> (u64, u64) {
    // A recorded chunk is always stored (docs/formats/state-db.md).
    for a in &after.recorded {
        assert!(after.chunks.contains_key(a), "run {run}: chunk {a} is recorded but not in the store");
    }
    let partial: u64 = after
        .staging
        .iter()
        .filter(|(p, (_, links))| *links == 1 && !before.staging.contains_key(*p))
        .map(|(_, (size, _))| size)
        .sum();
    // Chunks this run recorded that the store did not have before it: it sent them.
    let sent_new: u64 = after
        .recorded
        .iter()
        .filter(|a| !before.recorded.contains(*a) && !before.chunks.contains_key(*a))
        .map(|a| after.chunks[a])
        .sum();
    let recorded_upload = after.uploaded - before.uploaded;
    assert!(
        recorded_upload >= sent_new,
        "run {run}: recorded {recorded_upload} uploaded bytes but newly stored {sent_new} bytes of recorded chunks"
    );
    (partial, recorded_upload - sent_new)
}

#[test]
fn kill_9_at_random_moments_resumes_with_at_most_the_chunks_in_flight_sent_again() {
    let mut rng = seeded_rng();
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let store = data.join("store");
    new_store_with_chunk_size(&data.join("key"), &store, CHUNK as u32);
    let img = d.path().join("big.raw");
    random_image(&img, DISK_MIB, 7);
    ok(tern(&data).args(["vm", "add", "big", "--disk"]).arg(&img));
    ok(tern(&data).args(["throttle", "set", "--limit", LIMIT]));

    let mut prev = observe(&data, &store, "big");
    // Per kill: (delay ms, chunks newly stored by the killed run, its interrupted bytes);
    // per run: bytes re-sent of chunks the store already had.
    let mut kills: Vec<(u64, usize, u64)> = Vec::new();
    let mut resent: Vec<u64> = Vec::new();
    for run in 0..KILLS {
        let mut child = tern(&data)
            .args(["replicate", "big", "--no-progress", "--threads", &THREADS.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = kill_after(&mut rng, run);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let now = observe(&data, &store, "big");
        assert!(
            !status.success() && now.state != "done",
            "run {run} completed before its kill: {LIMIT} did not slow the upload down enough to kill it {KILLS} times"
        );
        let (partial, re) = waste(&prev, &now, run);
        kills.push((delay, now.chunks.len() - prev.chunks.len(), partial));
        resent.push(re);
        prev = now;
    }

    // Run to completion, unthrottled.
    ok(tern(&data).args(["throttle", "set", "--limit", "unlimited"]));
    let out = ok(tern(&data).args(["replicate", "big", "--no-progress", "--threads", &THREADS.to_string()]));
    assert!(out.contains("done by an earlier run"), "{out}");
    let fin = observe(&data, &store, "big");
    assert_eq!(fin.state, "done");
    // The final run recorded every chunk it stored; whatever it recorded beyond those
    // was sent again.
    let final_new = stored_bytes(&fin) - stored_bytes(&prev);
    let final_recorded = fin.uploaded - prev.uploaded;
    assert!(final_recorded >= final_new, "final run recorded {final_recorded} bytes, stored {final_new}");
    resent.push(final_recorded - final_new);

    // A clean run of the same disk into an empty store with the same chunk size.
    let clean_data = d.path().join("clean");
    let clean_store = clean_data.join("store");
    new_store_with_chunk_size(&clean_data.join("key"), &clean_store, CHUNK as u32);
    ok(tern(&clean_data).args(["vm", "add", "big", "--disk"]).arg(&img));
    ok(tern(&clean_data).args(["replicate", "big", "--no-progress", "--threads", &THREADS.to_string()]));
    let clean = stored_bytes(&observe(&clean_data, &clean_store, "big"));
    assert_eq!(clean, DISK_MIB * OBJECT, "every chunk of random data is stored whole");
    assert_eq!(stored_bytes(&fin), clean, "the killed store holds every chunk once");

    let bound = THREADS * OBJECT;
    let mut total_waste = 0;
    println!("kill  after_ms  chunks_stored_by_run  interrupted_bytes  resent_by_next_run");
    for (k, &(delay, stored, partial)) in kills.iter().enumerate() {
        let again = partial + resent[k + 1];
        println!("{k:4}  {delay:8}  {stored:20}  {partial:17}  {:18}", resent[k + 1]);
        assert!(again <= bound, "kill {k}: {again} bytes sent again, more than {THREADS} x {OBJECT}");
        total_waste += again;
    }
    assert_eq!(resent[0], 0, "the first run re-sent {} bytes into an empty store", resent[0]);
    let total = stored_bytes(&fin) + total_waste;
    let with_progress = kills.iter().filter(|k| k.1 > 0).count();
    println!(
        "{KILLS} kills ({with_progress} after the run stored chunks): uploaded {total} bytes in all, a clean run {clean}: \
         {} bytes sent again, bound {KILLS} x {THREADS} x {OBJECT} = {}",
        total - clean,
        KILLS as u64 * bound
    );
    assert!(total - clean <= KILLS as u64 * bound);
    assert!(with_progress > 0, "no kill landed after the upload had started");

    ok(tern(&data).args(["store", "verify", "--read-data"]));
    let outdir = d.path().join("out");
    let text = ok(tern(&data).args(["migrate", "big", "--format", "raw", "--out"]).arg(&outdir));
    let migrated = outdir.join("big-disk0.raw");
    assert!(text.contains(&sha256(&img)), "{text}");
    qemu(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &img.to_string_lossy(), &migrated.to_string_lossy()],
    );
}

/// Rate of the slow link to the S3 server while killing, bytes per second: 64 MiB
/// take about 34 s, the kills spend at most 20.5 s of it, and a 1 MiB PUT takes about
/// a second with two workers sharing the link.
const SLOW_LINK: u64 = 2_000_000;

/// HTTP request lines and headers a run sends besides chunk bodies (the config read,
/// a HEAD per chunk it looks at, PUT headers): about 600 bytes a request, measured by
/// the clean run below. Allowed per run on top of the chunk bound.
const HTTP_ALLOWANCE: u64 = 64 << 10;

/// `tern` talking to the S3 server at loopback `port`.
fn tern_s3(data: &Path, port: u16) -> std::process::Command {
    let mut c = tern(data);
    s3_env(&mut c, port);
    c
}

#[test]
fn kill_9_mid_put_to_a_slow_s3_store_resends_at_most_the_chunks_in_flight() {
    let Some(moto) = moto("tern") else { return };
    let proxy = Proxy::start(0, moto.port);
    let (port, meter) = (proxy.port, proxy.meter.clone());
    let sent = || meter.sent.load(std::sync::atomic::Ordering::SeqCst);
    let mut rng = seeded_rng();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("big.raw");
    random_image(&img, DISK_MIB, 8);
    let threads = THREADS.to_string();
    // A host replicating to s3://tern/<name> with 1 MiB chunks; the store's config is
    // put straight into the server.
    let setup = |name: &str| {
        let data = d.path().join(name);
        let cfg = new_store_config(&data.join("key"), CHUNK as u32);
        assert_eq!(http_put(moto.port, &format!("/tern/{name}/config.json"), cfg.as_bytes()).unwrap(), 200);
        ok(tern(&data).args(["vm", "add", "big", "--disk"]).arg(&img));
        (data, format!("s3://tern/{name}"))
    };
    let (data, url) = setup("killed");
    let replicate = |data: &Path, url: &str| {
        let mut c = tern_s3(data, port);
        c.args(["replicate", "big", "--no-progress", "--threads", &threads, "--store", url]);
        c
    };

    meter.rate.store(SLOW_LINK, std::sync::atomic::Ordering::SeqCst);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for run in 0..KILLS {
        let before = sent();
        let mut child = replicate(&data, &url).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let delay = kill_after(&mut rng, run);
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        let st = child.wait().unwrap();
        let s = status(&data, "big");
        assert!(!st.success() && s["state"] != "protected", "run {run} completed before its kill: {s}");
        // An early kill on a loaded machine can land before the run recorded anything
        // (the VM is then still "not replicated"); the later runs are killed mid-put.
        assert!(s["state"] == "interrupted" || s["state"] == "not replicated", "run {run}: {s}");
        runs.push((delay, sent() - before));
    }
    meter.rate.store(0, std::sync::atomic::Ordering::SeqCst);
    let before = sent();
    let out = ok(&mut replicate(&data, &url));
    let last = sent() - before;
    println!("{out}");

    let (clean_data, clean_url) = setup("clean");
    let before = sent();
    ok(&mut replicate(&clean_data, &clean_url));
    let clean = sent() - before;

    println!("kill  after_ms  bytes_sent_to_the_store");
    for (k, (delay, bytes)) in runs.iter().enumerate() {
        println!("{k:4}  {delay:8}  {bytes:23}");
    }
    let total = runs.iter().map(|r| r.1).sum::<u64>() + last;
    let again = total.saturating_sub(clean);
    let bound = KILLS as u64 * THREADS * OBJECT;
    println!(
        "{KILLS} kills: {total} bytes sent to the store in all (final run {last}), a clean run {clean} \
         ({} bytes of HTTP besides chunks): {again} bytes sent again ({:.2} chunks per kill), \
         bound {KILLS} x {THREADS} x {OBJECT} = {bound}",
        clean - DISK_MIB * OBJECT,
        again as f64 / KILLS as f64 / OBJECT as f64
    );
    assert!(
        clean >= DISK_MIB * OBJECT && clean - DISK_MIB * OBJECT <= HTTP_ALLOWANCE * 4,
        "clean run: {clean}"
    );
    assert!(
        again <= bound + (KILLS as u64 + 1) * HTTP_ALLOWANCE,
        "{again} bytes sent again after {KILLS} kills"
    );

    ok(tern_s3(&data, port).args(["store", "verify", "--read-data", "--store", &url]));
    let outdir = d.path().join("out");
    let text = ok(tern_s3(&data, port)
        .args(["migrate", "big", "--format", "raw", "--store", &url, "--out"])
        .arg(&outdir));
    assert!(text.contains(&sha256(&img)), "{text}");
    assert_eq!(sha256(&outdir.join("big-disk0.raw")), sha256(&img));
}
