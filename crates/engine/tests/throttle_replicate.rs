//! A replication under a bandwidth limit, through the engine's public API: the upload
//! workers send chunks through the throttle's paced put, on a virtual clock (so the run
//! takes no wall time and nothing about wall time is asserted), and the point restores
//! byte for byte (qemu-img compare as the oracle).

mod support;

use std::process::Command;
use std::sync::Arc;
use support::walk;

use tern_engine::throttle::{Clock, Limit, Schedule, Throttle, VirtualClock};
use tern_engine::{
    migrate, replicate, Engine, EngineOptions, Firmware, MigrateFormat, MigrateOptions, PointSelector,
    ReplicateOptions, VmDef,
};
use time::macros::datetime;
use time::UtcOffset;

#[test]
fn a_limited_replication_takes_its_bytes_time_at_the_limit_and_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let engine =
        Engine::open(&EngineOptions { data_dir: Some(root.join("data")), ..Default::default() }).unwrap();
    let src = root.join("db.raw");
    tern_engine::sample::write_sample_disk(&src, 48 << 20, 11).unwrap();
    engine
        .db()
        .vm_add(&VmDef {
            id: tern_engine::new_vm_id().unwrap(),
            name: "db".into(),
            cpus: 1,
            memory_bytes: 1 << 30,
            firmware: Firmware::Bios,
            disks: vec![src.clone().into()],
            store_url: None,
            qemu: None,
        })
        .unwrap();

    let bps = 20_000_000u64;
    let clock = Arc::new(VirtualClock::new(datetime!(2026-01-05 12:00 UTC)));
    let limit = Limit::Bps(bps);
    let throttle = Throttle::new(
        clock.clone(),
        UtcOffset::UTC,
        Box::new(move || Some(Schedule { work_limit: limit, off_limit: limit, ..Schedule::unlimited() })),
    );
    let opts = ReplicateOptions { threads: 4, ..Default::default() };
    let report = replicate(&engine, "db", &opts, &throttle, &|_| {}).unwrap();
    let uploaded: u64 = report.disks.iter().map(|d| d.uploaded_bytes).sum();
    assert!(uploaded > 8 << 20, "enough to measure: {uploaded} bytes");
    assert!(report.store_stats.bytes_put >= uploaded, "{:?}", report.store_stats);

    // Virtual time passes only while the throttle waits: the upload took its bytes'
    // time at the limit (less the first 50 ms burst).
    let expected = uploaded as f64 * 8.0 / bps as f64;
    let took = clock.elapsed().as_secs_f64();
    println!("{uploaded} bytes at {limit}: {took:.3} s of virtual time, {expected:.3} s expected");
    assert!((took / expected - 1.0).abs() < 0.05, "took {took} s, expected {expected} s");

    // No staging file is left in the store.
    let store = root.join("data");
    let staged: Vec<_> = walk(&store).into_iter().filter(|p| p.to_string_lossy().contains('#')).collect();
    assert!(staged.is_empty(), "{staged:?}");

    let out = root.join("out");
    let m = migrate(
        &engine,
        "db",
        &MigrateOptions {
            point: PointSelector::Latest,
            format: MigrateFormat::Raw,
            out_dir: out.clone(),
            test: false,
            threads: 2,
            sync: true,
            verify: false,
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!(m.disks.len(), 1);
    let restored = walk(&out).into_iter().find(|p| p.extension().is_some_and(|e| e == "raw")).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&restored)
        .output()
        .expect("qemu-img is installed");
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stdout));
}
