//! Replicate -> migrate through the engine's public API, on file:// stores in temp
//! folders, with qemu-img as the oracle for image equality.

use std::path::{Path, PathBuf};

mod support;

use support::{host, run_migrate, run_replicate, sha256_file, walk};
use tern_engine::MigrateReport;
use tern_engine::{
    verify, Engine, EngineOptions, ErrorKind, Firmware, MigrateFormat, ReplicateOptions, VerifyOptions,
};

/// `qemu-img compare` of a raw source with an output in `fmt`.
fn qemu_compare_fmt(a: &Path, b: &Path, fmt: MigrateFormat) {
    support::qemu_compare(a, "raw", b, fmt.qemu_driver());
}

fn qemu_compare(a: &Path, b: &Path) {
    qemu_compare_fmt(a, b, MigrateFormat::Raw)
}

#[test]
fn round_trip_to_every_format() {
    let h = host();
    let src = h.root.join("web.raw");
    tern_engine::sample::write_sample_disk(&src, 40 << 20, 7).unwrap();
    let src2 = h.root.join("data2.raw");
    // A size that is not a whole number of chunks or MiB (whole sectors, as raw disks are).
    std::fs::write(&src2, b"tail".repeat(300_032)).unwrap();
    // Sparse: a hole, 64 KiB of data at 20 MiB, a hole: mostly zero chunks, not read.
    let src3 = h.root.join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&src3).unwrap();
        f.set_len(33 << 20).unwrap();
        f.write_all_at(&[7; 65536], 20 << 20).unwrap();
    }
    support::add_vm_firmware(&h.engine, "web", &[src.clone(), src2.clone(), src3.clone()], Firmware::Uefi);
    let r = run_replicate(&h.engine, "web", &ReplicateOptions::default()).unwrap();
    assert_eq!(r.disks.len(), 3);
    assert!(r.disks[0].uploaded_chunks > 0);
    assert_eq!((r.disks[2].zero_chunks, r.disks[2].uploaded_chunks), (8, 1), "{:?}", r.disks[2]);
    assert_eq!(r.disks[2].read_bytes, 4 << 20, "zero/unallocated chunks are not read");

    for fmt in MigrateFormat::ALL {
        let out = h.root.join(format!("out-{fmt:?}"));
        let m = run_migrate(&h.engine, "web", fmt, &out).unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
        assert_eq!(m.point_id, r.point_id);
        qemu_compare_fmt(&src, &m.disks[0].path, fmt);
        qemu_compare_fmt(&src2, &m.disks[1].path, fmt);
        assert_eq!(m.disks[0].sha256, sha256_file(&src));
        assert_eq!(m.disks[1].sha256, sha256_file(&src2));
        qemu_compare_fmt(&src3, &m.disks[2].path, fmt);
        let xml = std::fs::read_to_string(&m.libvirt_xml).unwrap();
        assert!(xml.contains("<vcpu>2</vcpu>") && xml.contains("firmware='efi'"), "{xml}");
        let arm: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&m.arm_template).unwrap()).unwrap();
        assert_eq!(arm["resources"].as_array().unwrap().len(), 4);
    }
    let v = verify(&h.engine, &VerifyOptions { read_data: true, ..Default::default() }).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(v.points, 1);
}

#[test]
fn migrate_from_another_machine_with_only_store_and_key() {
    let h = host();
    let src = h.root.join("db.raw");
    tern_engine::sample::write_sample_disk(&src, 16 << 20, 3).unwrap();
    support::add_vm_firmware(&h.engine, "db", std::slice::from_ref(&src), Firmware::Uefi);
    run_replicate(&h.engine, "db", &ReplicateOptions::default()).unwrap();

    let other = tempfile::tempdir().unwrap();
    let opts = |key: Option<PathBuf>| EngineOptions {
        data_dir: Some(other.path().join("data")),
        key_file: key,
        store_url: Some(h.engine.store_url().to_string()),
        local_offset: None,
        // Migrating on another machine needs no data directory there, and makes none.
        read_only: true,
    };
    // No key at all: a clear error, nothing written.
    let e = Engine::open(&opts(None)).unwrap();
    let err = run_migrate(&e, "db", MigrateFormat::Raw, &other.path().join("out")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("--key-file"), "{err}");
    // A wrong key: named as a wrong key, not as corruption.
    let wrong = other.path().join("wrong.key");
    tern_chunk::Key::generate().unwrap().save_new(&wrong).unwrap();
    let e = Engine::open(&opts(Some(wrong))).unwrap();
    let err = run_migrate(&e, "db", MigrateFormat::Raw, &other.path().join("out")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("wrong key"), "{err}");
    assert!(!other.path().join("out").join("db-disk0.raw").exists());
    // The right key, copied: works by name through the manifests.
    let e = Engine::open(&opts(Some(h.engine.key_file().to_path_buf()))).unwrap();
    let m = run_migrate(&e, "db", MigrateFormat::Raw, &other.path().join("out")).unwrap();
    qemu_compare(&src, &m.disks[0].path);
    assert!(!other.path().join("data").exists(), "a read-only migration made a data directory");
}

#[test]
fn clones_deduplicate() {
    let h = host();
    let base = h.root.join("base.raw");
    tern_engine::sample::write_sample_disk(&base, 256 << 20, 11).unwrap();
    let clone = h.root.join("clone.raw");
    std::fs::copy(&base, &clone).unwrap();
    // The clone diverged a little: one 4 KiB write.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&clone).unwrap();
        f.write_all_at(&[0xAB; 4096], 5 << 20).unwrap();
    }
    support::add_vm_firmware(&h.engine, "a", std::slice::from_ref(&base), Firmware::Uefi);
    support::add_vm_firmware(&h.engine, "b", std::slice::from_ref(&clone), Firmware::Uefi);
    let a = run_replicate(&h.engine, "a", &ReplicateOptions::default()).unwrap();
    let b = run_replicate(&h.engine, "b", &ReplicateOptions::default()).unwrap();
    let (pa, pb) = (a.store_stats.bytes_put, b.store_stats.bytes_put);
    assert!(pb * 20 <= pa, "second VM uploaded {pb} bytes, first {pa}");
    assert!(b.disks[0].dedup_chunks > 0);
}

#[test]
fn resume_after_failure_reuploads_at_most_the_chunks_in_flight() {
    let h = host();
    let src = h.root.join("big.raw");
    tern_engine::sample::write_sample_disk(&src, 96 << 20, 5).unwrap();
    support::add_vm_firmware(&h.engine, "big", std::slice::from_ref(&src), Firmware::Uefi);
    let threads = 4;
    let mut opts = ReplicateOptions { threads, fail_after_uploads: Some(5), ..Default::default() };
    let err = run_replicate(&h.engine, "big", &opts).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(err.to_string().contains("disk 0"), "{err}");
    let first = tern_store::Store::open(h.engine.store_url()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let after_fail: u64 = rt.block_on(first.list_chunks()).unwrap().iter().map(|c| c.1).sum();
    opts.fail_after_uploads = None;
    let r = run_replicate(&h.engine, "big", &opts).unwrap();
    assert!(r.resumed);
    assert!(r.disks[0].resumed_chunks > 0 || r.disks[0].dedup_chunks > 0);

    // A clean replication of the same disk into a fresh store: the reference total.
    let h2 = host();
    support::add_vm_firmware(&h2.engine, "big", std::slice::from_ref(&src), Firmware::Uefi);
    let clean =
        run_replicate(&h2.engine, "big", &ReplicateOptions { threads, ..Default::default() }).unwrap();
    let clean_chunks = clean.disks[0].uploaded_bytes;
    let total = after_fail + r.disks[0].uploaded_bytes;
    let bound = threads as u64 * (4 << 20);
    assert!(total <= clean_chunks + bound, "uploaded {total} over two runs, clean run {clean_chunks}");
    let m = run_migrate(&h.engine, "big", MigrateFormat::Raw, &h.root.join("out")).unwrap();
    qemu_compare(&src, &m.disks[0].path);
    // The content hash spans both runs: the resumed run hashed the chunks the first
    // one had recorded by reading them again.
    assert_eq!(m.disks[0].sha256, sha256_file(&src));
}

fn chunk_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(store.join("chunks")).unwrap().flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

#[test]
fn damaged_objects_are_named_and_no_image_is_left() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("flip", |p| {
            let mut b = std::fs::read(p).unwrap();
            let i = b.len() / 2;
            b[i] ^= 1;
            std::fs::write(p, b).unwrap();
        }),
        ("truncate", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() - 100]).unwrap();
        }),
        ("delete", |p| std::fs::remove_file(p).unwrap()),
        ("index", |_| {}),
    ];
    for (what, damage) in cases {
        let h = host();
        let src = h.root.join("v.raw");
        tern_engine::sample::write_sample_disk(&src, 16 << 20, 9).unwrap();
        support::add_vm_firmware(&h.engine, "v", std::slice::from_ref(&src), Firmware::Uefi);
        run_replicate(&h.engine, "v", &ReplicateOptions::default()).unwrap();
        let store = h.root.join("data/store");
        if what == "index" {
            let idx = walk(&store).into_iter().find(|p| p.to_string_lossy().ends_with(".index")).unwrap();
            let mut b = std::fs::read(&idx).unwrap();
            let n = b.len();
            b[n - 20] ^= 0x40;
            std::fs::write(&idx, b).unwrap();
        } else {
            damage(&chunk_files(&store)[0]);
        }
        let v = verify(&h.engine, &VerifyOptions { read_data: true, ..Default::default() }).unwrap();
        assert!(!v.problems.is_empty(), "{what}: verify found nothing");
        let p = &v.problems[0];
        assert_eq!(p.disk, Some(0), "{what}: {p}");
        if what != "index" {
            assert!(p.chunk.is_some(), "{what}: {p}");
        }
        let out = h.root.join("out");
        let err = run_migrate(&h.engine, "v", MigrateFormat::Raw, &out).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("disk 0"), "{what}: {msg}");
        if what != "index" {
            assert!(msg.contains("chunk "), "{what}: {msg}");
        }
        let left: Vec<_> =
            std::fs::read_dir(&out).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "{what}: left {left:?}");
    }
}

#[test]
fn threads_out_of_range_are_refused() {
    let h = host();
    for t in [0, 33] {
        let e = run_replicate(&h.engine, "x", &ReplicateOptions { threads: t, ..Default::default() })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("1 to 32"), "{e}");
    }
}

/// The (only) manifest of a file:// store, and where it is.
fn read_manifest(h: &support::Host) -> (PathBuf, tern_engine::Manifest) {
    let path = walk(&h.root.join("data"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "manifest"))
        .expect("a manifest in the store");
    let key = h.engine.load_key().unwrap();
    // .../vms/<vm id>/points/<point id>/manifest: the place it is bound to.
    let name = |p: &std::path::Path| p.file_name().unwrap().to_str().unwrap().to_string();
    let point_dir = path.parent().unwrap();
    let (point, vm) = (name(point_dir), name(point_dir.parent().unwrap().parent().unwrap()));
    let m = tern_engine::Manifest::open(&key, &std::fs::read(&path).unwrap(), &vm, &point).unwrap();
    (path, m)
}

/// Rewrite the (only) manifest of a file:// store in place, sealed with the right key:
/// what a store holding a point made by another tern version, or a forged one, looks like.
fn rewrite_manifest(h: &support::Host, change: impl FnOnce(&mut tern_engine::Manifest)) {
    let key = h.engine.load_key().unwrap();
    let (path, mut m) = read_manifest(h);
    change(&mut m);
    std::fs::write(&path, m.seal(&key).unwrap()).unwrap();
}

fn migrate_with(
    h: &support::Host,
    fmt: MigrateFormat,
    out: &Path,
    verify: bool,
) -> tern_engine::Result<MigrateReport> {
    tern_engine::migrate(
        &h.engine,
        "app",
        &tern_engine::MigrateOptions {
            point: tern_engine::PointSelector::Latest,
            format: fmt,
            out_dir: out.into(),
            test: false,
            threads: 3,
            sync: false,
            verify,
        },
        &|_| {},
    )
}

#[test]
fn a_point_records_the_guest_sha256_and_verify_checks_the_output_against_it() {
    let h = host();
    let src = h.root.join("app.raw");
    tern_engine::sample::write_sample_disk(&src, 24 << 20, 5).unwrap();
    support::add_vm(&h.engine, "app", std::slice::from_ref(&src));
    run_replicate(&h.engine, "app", &ReplicateOptions::default()).unwrap();
    assert_eq!(read_manifest(&h).1.disks[0].sha256, Some(sha256_file(&src)));

    for fmt in [MigrateFormat::Raw, MigrateFormat::Vhdx] {
        let m = migrate_with(&h, fmt, &h.root.join(format!("ok-{fmt:?}")), true).unwrap();
        assert!(m.disks[0].verified);
        assert_eq!(m.disks[0].sha256, sha256_file(&src));
    }
    // A manifest whose digest does not match the chunks (forged with the key, or a bug):
    // without --verify the chunks still check out against their addresses; with it the
    // mismatch is found, named, and no image is left.
    rewrite_manifest(&h, |m| m.disks[0].sha256 = Some("0".repeat(64)));
    for fmt in [MigrateFormat::Raw, MigrateFormat::Qcow2] {
        let out = h.root.join(format!("bad-{fmt:?}"));
        let e = migrate_with(&h, fmt, &out, true).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("reads back with SHA-256"), "{e}");
        let left: Vec<_> = walk(&out).into_iter().filter(|p| !p.is_dir()).collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

#[test]
fn a_point_without_a_recorded_sha256_is_hashed_while_migrating() {
    let h = host();
    let src = h.root.join("app.raw");
    tern_engine::sample::write_sample_disk(&src, 20 << 20, 9).unwrap();
    support::add_vm(&h.engine, "app", std::slice::from_ref(&src));
    run_replicate(&h.engine, "app", &ReplicateOptions::default()).unwrap();
    rewrite_manifest(&h, |m| m.disks[0].sha256 = None);
    for fmt in [MigrateFormat::Raw, MigrateFormat::Azure, MigrateFormat::Qcow2] {
        let m = migrate_with(&h, fmt, &h.root.join(format!("out-{fmt:?}")), true).unwrap();
        assert_eq!(m.disks[0].sha256, sha256_file(&src), "{fmt:?}");
        assert!(m.disks[0].verified);
        qemu_compare_fmt(&src, &m.disks[0].path, fmt);
    }
}

#[test]
fn one_replication_per_vm_at_a_time_and_a_stopped_one_is_not_running() {
    let h = host();
    let src = h.root.join("app.raw");
    tern_engine::sample::write_sample_disk(&src, 8 << 20, 1).unwrap();
    support::add_vm(&h.engine, "app", std::slice::from_ref(&src));
    let vm = h.engine.vm("app").unwrap();
    assert!(!tern_engine::replication_running(&h.engine, &vm.id).unwrap());
    // What a running replication in another process holds.
    let held = tern_engine::RunLock::acquire(&h.engine, &vm.id, "app").unwrap();
    assert!(tern_engine::replication_running(&h.engine, &vm.id).unwrap());
    let e = run_replicate(&h.engine, "app", &ReplicateOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert!(e.to_string().contains("being replicated by another tern process"), "{e}");
    drop(held);
    assert!(!tern_engine::replication_running(&h.engine, &vm.id).unwrap());
    run_replicate(&h.engine, "app", &ReplicateOptions::default()).unwrap();
    assert!(!tern_engine::replication_running(&h.engine, &vm.id).unwrap());
}
