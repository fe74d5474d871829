//! Retention and garbage collection with a VM in a real qemu-storage-daemon: expired
//! points lose their manifests, and exactly the objects no retained point references
//! go (segments of expired cycles, bases replaced by compaction, a failed cycle's
//! pieces); every retained point still migrates to the guest's content at its cut.
//! The race: collections in a loop while cycles (with compaction) run on another
//! thread; afterwards every retained point is exact and a final collection leaves
//! nothing unreferenced.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_engine::gc::{gc, GcOptions};
use tern_engine::{add_qemu_vm, ReplicateOptions, VmSettings};

const MIB: u64 = 1 << 20;

fn add(h: &support::Host, vm: &support::Qsd) -> String {
    let spec = vm.spec("web");
    add_qemu_vm(&h.engine, &spec).unwrap().id
}

/// The SHA-256 of each disk of VM "web"'s point `point`, migrated.
fn migrate_shas(h: &support::Host, point: &str) -> Vec<String> {
    use sha2::Digest;
    support::migrate_raw(h, point, 0).iter().map(|d| hex::encode(sha2::Sha256::digest(d))).collect()
}

fn points(h: &support::Host, vm_id: &str) -> Vec<String> {
    let store = h.engine.open_store_at(h.engine.store_url(), false).unwrap();
    h.engine.runtime().unwrap().block_on(store.list_points(vm_id)).unwrap()
}

fn guest(vm: &support::Qsd) -> Vec<String> {
    vec![vm.guest_sha256("disk0"), vm.guest_sha256("disk1")]
}

#[test]
fn retention_expires_points_and_gc_removes_exactly_what_nothing_references() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "16M"), ("raw", "8M")]);
    vm.guest_random("disk0", 0, 4 << 20, 1);
    let vm_id = add(&h, &vm);
    let opts = ReplicateOptions { threads: 2, compact_after_segments: 3, ..Default::default() };
    let mut expect: HashMap<String, Vec<String>> = HashMap::new();
    for k in 0..8u64 {
        if k > 0 {
            vm.guest_random("disk0", (k % 4) * 3 * MIB + 512, 200_000, 10 + k);
            vm.guest_random("disk1", (k % 3) * 2 * MIB, 70_000, 20 + k);
        }
        let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
        expect.insert(r.point_id, guest(&vm));
    }
    // Nothing expires without a retention setting; nothing is garbage yet.
    let r = gc(&h.engine, &GcOptions::default()).unwrap();
    assert!(r.expired_points.is_empty());
    assert_eq!(r.deleted_objects, 0, "{r:?}");

    // Keep 3: the five oldest expire; a dry run says so and deletes nothing.
    let s = VmSettings { enabled: true, retention_count: Some(3), ..Default::default() };
    h.engine.db().set_settings(&vm_id, &s).unwrap();
    let dry = gc(&h.engine, &GcOptions { dry_run: true, ..Default::default() }).unwrap();
    assert_eq!(dry.expired_points.len(), 5);
    assert!(dry.deleted_objects > 0);
    assert_eq!(points(&h, &vm_id).len(), 8);
    let r = gc(&h.engine, &GcOptions::default()).unwrap();
    assert_eq!(r.expired_points.len(), 5);
    assert_eq!(r.deleted_objects, dry.deleted_objects, "the dry run counted what the real run deleted");
    let kept = points(&h, &vm_id);
    assert_eq!(kept.len(), 3);
    for p in &kept {
        assert_eq!(&migrate_shas(&h, p), &expect[p], "retained point {p}");
    }
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    // A second collection finds nothing more.
    let again = gc(&h.engine, &GcOptions::default()).unwrap();
    assert_eq!((again.expired_points.len(), again.deleted_objects), (0, 0), "{again:?}");
    // And cycles go on from the retained newest point.
    vm.guest_random("disk1", 5 * MIB, 65536, 99);
    let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
    assert_eq!(migrate_shas(&h, &r.point_id), guest(&vm));
}

#[test]
fn gc_in_a_loop_while_cycles_run_never_takes_what_a_retained_point_needs() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "16M"), ("raw", "8M")]);
    vm.guest_random("disk0", 0, 4 << 20, 1);
    let vm_id = add(&h, &vm);
    let s = VmSettings { enabled: true, retention_count: Some(4), ..Default::default() };
    h.engine.db().set_settings(&vm_id, &s).unwrap();
    let opts = ReplicateOptions { threads: 2, compact_after_segments: 3, ..Default::default() };
    // The store exists from the first point on.
    support::run_replicate(&h.engine, "web", &opts).unwrap();
    let done = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (expect, collections) = std::thread::scope(|sc| {
        let cycles = sc.spawn(|| {
            let mut expect: HashMap<String, Vec<String>> = HashMap::new();
            for k in 0..20u64 {
                if Instant::now() > deadline {
                    break;
                }
                vm.guest_random("disk0", (k % 5) * 3 * MIB + 4096, 150_000, 100 + k);
                vm.guest_random("disk1", (k % 4) * 2 * MIB, 65536, 200 + k);
                let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
                expect.insert(r.point_id, guest(&vm));
            }
            done.store(true, Ordering::Relaxed);
            expect
        });
        let collector = sc.spawn(|| {
            let mut n = 0;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                gc(&h.engine, &GcOptions::default()).unwrap();
                n += 1;
            }
            n
        });
        (cycles.join().unwrap(), collector.join().unwrap())
    });
    println!("{} cycles and {collections} collections ran side by side", expect.len());
    assert!(collections >= 3, "only {collections} collections ran beside the cycles");
    assert!(expect.len() >= 10, "only {} cycles ran beside the collections", expect.len());
    let last = gc(&h.engine, &GcOptions::default()).unwrap();
    let kept = points(&h, &vm_id);
    assert_eq!(kept.len(), 4, "{last:?}");
    for p in &kept {
        assert_eq!(&migrate_shas(&h, p), &expect[p], "retained point {p}");
    }
    // Nothing unreferenced is left.
    let dry = gc(&h.engine, &GcOptions { dry_run: true, ..Default::default() }).unwrap();
    assert_eq!((dry.expired_points.len(), dry.deleted_objects), (0, 0), "{dry:?}");
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// Disk `disk`'s base point in VM `vm_id`'s point `point` (cached manifest).
fn base_point(h: &support::Host, vm_id: &str, point: &str, disk: usize) -> Option<String> {
    let json = h.engine.db().point_manifest(h.engine.store_url(), vm_id, point).unwrap().unwrap();
    let m: serde_json::Value = serde_json::from_str(&json).unwrap();
    m["disks"][disk]["base_point"].as_str().map(String::from)
}

/// Compaction beside the cycles (the agent's way): the compaction of a point is
/// recorded, cycles go on meanwhile, and the next cycle rebases onto it (its disks'
/// base is the compacted point, their segments those since). A collection that runs
/// between a compaction and the next cycle sweeps the index nothing references yet:
/// that cycle ignores the record and the chain goes on. Every point stays exact, and
/// `store verify --read-data` is clean.
#[test]
fn compaction_beside_the_cycles_is_built_on_by_the_next_cycle_and_survives_a_collection() {
    let h = support::host();
    let vm = support::Qsd::start(&[("qcow2", "16M"), ("raw", "8M")]);
    vm.guest_random("disk0", 0, 6 << 20, 1);
    let id = add(&h, &vm);
    let opts = ReplicateOptions {
        threads: 2,
        compact_after_segments: 3,
        background_compaction: true,
        ..Default::default()
    };
    let throttle = tern_engine::throttle::Throttle::unlimited();
    let mut expect: Vec<(String, Vec<String>)> = Vec::new();
    let mut cycle = |seed: u64| {
        vm.guest_random("disk0", (seed % 12) * MIB, 512 << 10, seed);
        vm.guest_random("disk1", (seed % 6) * MIB + 4096, 64 << 10, seed + 100);
        let r = support::run_replicate(&h.engine, "web", &opts).unwrap();
        expect.push((r.point_id.clone(), guest(&vm)));
        r.point_id
    };
    support::run_replicate(&h.engine, "web", &opts).unwrap();
    cycle(2);
    cycle(3);
    // Due (3 segments with this one): compacted beside, while a cycle goes on.
    let (p, disks) = tern_engine::compact_beside(&h.engine, &h.engine.vm("web").unwrap(), &opts, &throttle)
        .unwrap()
        .expect("a chain was due");
    assert_eq!(disks, vec![0, 1]);
    // The next cycle rebases onto it, and the chain goes on from there.
    let next = cycle(4);
    assert_eq!(base_point(&h, &id, &next, 0).as_deref(), Some(p.as_str()));
    assert_eq!(base_point(&h, &id, &next, 1).as_deref(), Some(p.as_str()));
    let then = cycle(5);
    assert_eq!(base_point(&h, &id, &then, 0).as_deref(), Some(p.as_str()));
    // Again, with a collection in between that sweeps the unreferenced index.
    cycle(6);
    let (p2, _) = tern_engine::compact_beside(&h.engine, &h.engine.vm("web").unwrap(), &opts, &throttle)
        .unwrap()
        .expect("due again");
    gc(&h.engine, &GcOptions::default()).unwrap();
    let after = cycle(7);
    assert_ne!(base_point(&h, &id, &after, 0).as_deref(), Some(p2.as_str()), "built on a swept index");
    for (point, shas) in &expect {
        assert_eq!(&migrate_shas(&h, point), shas, "point {point}");
    }
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
