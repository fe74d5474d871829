//! Objects copied or moved inside a store (docs/formats/manifest.md, "Bound to its
//! place"): a manifest copied over another point's, or another VM's, and an index copied
//! over another disk's or another point's. Every such object is a valid envelope under
//! the store's key, so only binding it to the place it is read from finds it. Migrate
//! and verify must refuse it, naming both places, and leave no image behind; the points
//! nobody touched still migrate.
//!
//! The copies are chosen so that nothing else gives them away: the points and VMs hold
//! identical disks, so their indexes are identical and every chunk checks out.

mod support;

use std::path::{Path, PathBuf};

use support::{host, run_migrate, run_replicate, walk, Host};
use tern_engine::{
    migrate, verify, ErrorKind, MigrateFormat, MigrateOptions, PointSelector, ReplicateOptions, VerifyOptions,
};

fn vm_id(h: &Host, name: &str) -> String {
    h.engine.db().vm_get(name).unwrap().expect("the VM is registered").id
}

fn points_dir(h: &Host, vm: &str) -> PathBuf {
    h.root.join("data/store/vms").join(vm).join("points")
}

/// The point ids of `vm` in the local store, sorted as the store lists them.
fn points(h: &Host, vm: &str) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(points_dir(h, vm))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("manifest").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

fn manifest_path(h: &Host, vm: &str, point: &str) -> PathBuf {
    points_dir(h, vm).join(point).join("manifest")
}

fn copy_over(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    if dir.exists() {
        walk(dir)
    } else {
        Vec::new()
    }
}

/// Migrate `name` at `point` into `out`: must fail as corrupt with a message holding
/// every one of `names`, and leave no file in `out`.
fn migrate_refuses(h: &Host, name: &str, point: PointSelector, out: &Path, names: &[&str]) -> String {
    let opts = MigrateOptions {
        point,
        format: MigrateFormat::Raw,
        out_dir: out.into(),
        test: false,
        threads: 2,
        sync: false,
        verify: false,
    };
    let e = migrate(&h.engine, name, &opts, &|_| {}).unwrap_err();
    let msg = e.to_string();
    println!("migrate {name}: {msg}");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{msg}");
    for n in names {
        assert!(msg.contains(n), "the error names {n}: {msg}");
    }
    assert!(files_in(out).is_empty(), "left {:?}", files_in(out));
    msg
}

/// Verify the store: exactly one problem, at `vm` / `point`, whose message holds every
/// one of `names`.
fn verify_finds_one(h: &Host, vm: &str, point: &str, disk: Option<u32>, names: &[&str]) {
    let v = verify(&h.engine, &VerifyOptions { read_data: true, ..Default::default() }).unwrap();
    for p in &v.problems {
        println!("verify: {p}");
    }
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    let p = &v.problems[0];
    assert!(p.vm == vm || p.vm == "web", "{p}");
    assert_eq!((p.point.as_str(), p.disk), (point, disk), "{p}");
    for n in names {
        assert!(p.message.contains(n), "the problem names {n}: {p}");
    }
}

#[test]
fn a_manifest_copied_over_another_points_is_refused_naming_both_points() {
    let h = host();
    let src = h.root.join("web.raw");
    tern_engine::sample::write_sample_disk(&src, 12 << 20, 3).unwrap();
    support::add_vm(&h.engine, "web", std::slice::from_ref(&src));
    run_replicate(&h.engine, "web", &ReplicateOptions::default()).unwrap();
    run_replicate(&h.engine, "web", &ReplicateOptions::default()).unwrap();
    let vm = vm_id(&h, "web");
    let ids = points(&h, &vm);
    let [old, latest] = ids.as_slice() else { panic!("two points expected: {ids:?}") };

    // The old point's manifest under the latest point's name: a rollback dressed as
    // the latest point.
    copy_over(&manifest_path(&h, &vm, old), &manifest_path(&h, &vm, latest));
    let both = [old.as_str(), latest.as_str(), vm.as_str()];
    migrate_refuses(&h, "web", PointSelector::Latest, &h.root.join("out-latest"), &both);
    migrate_refuses(&h, "web", PointSelector::Id(latest.clone()), &h.root.join("out-id"), &both);
    verify_finds_one(&h, &vm, latest, None, &both);

    // The point whose manifest was copied is intact and still migrates.
    let opts = MigrateOptions {
        point: PointSelector::Id(old.clone()),
        format: MigrateFormat::Raw,
        out_dir: h.root.join("out-old"),
        test: false,
        threads: 2,
        sync: false,
        verify: true,
    };
    let m = migrate(&h.engine, "web", &opts, &|_| {}).unwrap();
    assert_eq!(&m.point_id, old);
    assert_eq!(m.disks[0].sha256, support::sha256_file(&src));
}

#[test]
fn a_manifest_copied_over_another_vms_is_refused_naming_both_vms() {
    let h = host();
    let src = h.root.join("web.raw");
    tern_engine::sample::write_sample_disk(&src, 12 << 20, 4).unwrap();
    let twin_src = h.root.join("twin.raw");
    std::fs::copy(&src, &twin_src).unwrap();
    support::add_vm(&h.engine, "web", std::slice::from_ref(&src));
    support::add_vm(&h.engine, "twin", std::slice::from_ref(&twin_src));
    run_replicate(&h.engine, "web", &ReplicateOptions::default()).unwrap();
    run_replicate(&h.engine, "twin", &ReplicateOptions::default()).unwrap();
    let (web, twin) = (vm_id(&h, "web"), vm_id(&h, "twin"));
    let web_point = points(&h, &web).pop().unwrap();
    let twin_point = points(&h, &twin).pop().unwrap();

    // twin's manifest under web's point: web would be restored with twin's name and
    // hardware, at twin's instant.
    copy_over(&manifest_path(&h, &twin, &twin_point), &manifest_path(&h, &web, &web_point));
    let names = [web.as_str(), twin.as_str(), web_point.as_str(), twin_point.as_str()];
    migrate_refuses(&h, "web", PointSelector::Latest, &h.root.join("out-web"), &names);
    verify_finds_one(&h, &web, &web_point, None, &names);

    let m = run_migrate(&h.engine, "twin", MigrateFormat::Raw, &h.root.join("out-twin")).unwrap();
    assert_eq!(m.vm, "twin");
    assert_eq!(m.disks[0].sha256, support::sha256_file(&twin_src));
}

#[test]
fn an_index_copied_over_another_disks_or_points_is_refused() {
    let h = host();
    let (a, b) = (h.root.join("a.raw"), h.root.join("b.raw"));
    tern_engine::sample::write_sample_disk(&a, 8 << 20, 5).unwrap();
    tern_engine::sample::write_sample_disk(&b, 8 << 20, 6).unwrap();
    support::add_vm(&h.engine, "web", &[a.clone(), b.clone()]);
    run_replicate(&h.engine, "web", &ReplicateOptions::default()).unwrap();
    // A second point where disk 0 changed.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
    }
    // Compacted, so that the second point has base indexes of its own.
    run_replicate(&h.engine, "web", &ReplicateOptions { compact_after_segments: 1, ..Default::default() })
        .unwrap();
    let vm = vm_id(&h, "web");
    let ids = points(&h, &vm);
    let [first, second] = ids.as_slice() else { panic!("two points expected: {ids:?}") };
    let index = |point: &str, disk: u32| points_dir(&h, &vm).join(point).join(format!("disk-{disk}.index"));
    let (first, second) = (first.as_str(), second.as_str());
    // Which point is listed last depends on the random part of the ids when both were
    // made in the same second; the two points differ in disk 0 either way.
    let target = index(second, 0);
    let original = std::fs::read(&target).unwrap();

    for (what, from) in [("another disk's", index(second, 1)), ("another point's", index(first, 0))] {
        copy_over(&from, &target);
        println!("{what} index over disk 0 of point {second}");
        let out = h.root.join(format!("out-{}", what.replace(' ', "-").replace('\'', "")));
        let msg = migrate_refuses(&h, "web", PointSelector::Id(second.into()), &out, &["disk 0", second]);
        assert!(msg.contains("does not match the digest in the manifest"), "{msg}");
        verify_finds_one(&h, "web", second, Some(0), &["index of disk 0", "digest"]);
        std::fs::write(&target, &original).unwrap();
    }
    let v = verify(&h.engine, &VerifyOptions { read_data: true, ..Default::default() }).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
