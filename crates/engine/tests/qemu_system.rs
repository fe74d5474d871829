//! Continuous replication of a real QEMU system emulator (qemu-system-x86_64, q35
//! under TCG, no OS: the guest sits in its firmware), not qemu-storage-daemon: `vm add
//! --qmp` with no `--node` finds the disks from the guest's devices (a qcow2 and a raw
//! disk behind virtio-blk-pci devices; a CD-ROM drive with no medium is no disk),
//! reads vCPUs and memory over QMP, and starts its own NBD server in QEMU. The guest's
//! writes go through the devices' own block backends (HMP `qemu-io`). A full pass,
//! delta cycles while the guest runs and while it is paused (QMP `stop`: the pass must
//! neither fail nor resume the guest), and a clean restart of QEMU, after which the raw
//! disk, whose bitmap cannot persist, costs a resync of that disk alone. Every point migrates to exactly
//! the guest's content, which QEMU's images confirm at the end.
//!
//! It runs the emulator `support::qemu_system_bin` finds: the installed qemu-utils'
//! version (10), which scripts/deps unpacks when the host has none, and in the second
//! run of scripts/test Debian 12's 7.2.

mod support;

use tern_engine::{add_qemu_vm, Firmware, PointKind, ReplicateOptions};

const MIB: u64 = 1 << 20;

/// What the guest wrote, byte for byte: the oracle every point is compared with (and
/// that QEMU's images are compared with at the end).
struct Model {
    disks: Vec<Vec<u8>>,
}

impl Model {
    fn new(sizes: &[u64]) -> Model {
        Model { disks: sizes.iter().map(|&s| vec![0u8; s as usize]).collect() }
    }

    /// `write -P pattern` of `len` bytes at `off` of disk `i`, in the guest and here.
    fn write(&mut self, vm: &support::QemuSystem, i: usize, pattern: u8, off: u64, len: u64) {
        vm.guest(i, &format!("write -P 0x{pattern:02x} {off} {len}"));
        self.disks[i][off as usize..(off + len) as usize].fill(pattern);
    }

    /// `write -z` (write-zeroes) of `len` bytes at `off` of disk `i`.
    fn zero(&mut self, vm: &support::QemuSystem, i: usize, off: u64, len: u64) {
        vm.guest(i, &format!("write -z {off} {len}"));
        self.disks[i][off as usize..(off + len) as usize].fill(0);
    }

    fn shas(&self) -> Vec<String> {
        use sha2::Digest;
        self.disks.iter().map(|d| hex::encode(sha2::Sha256::digest(d))).collect()
    }
}

/// Point `point` of VM "vm" migrated to raw images in `out`: their paths.
fn migrate_point(h: &support::Host, point: &str, out: &std::path::Path) -> Vec<std::path::PathBuf> {
    support::migrate_point(&h.engine, "vm", point, out)
}

/// Names of tern's objects in QEMU: nodes, bitmaps, exports, jobs.
fn tern_objects(vm: &support::QemuSystem) -> Vec<String> {
    let mut out = Vec::new();
    for n in vm.qmp("query-named-block-nodes", None).as_array().unwrap() {
        let name = n["node-name"].as_str().unwrap_or("");
        if name.starts_with("tern-") {
            out.push(format!("node {name}"));
        }
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            if b["name"].as_str().is_some_and(|s| s.starts_with("tern-")) {
                out.push(format!("bitmap {} on {name}", b["name"].as_str().unwrap()));
            }
        }
    }
    for x in vm.qmp("query-block-exports", None).as_array().unwrap() {
        out.push(format!("export {}", x["id"]));
    }
    for j in vm.qmp("query-block-jobs", None).as_array().unwrap() {
        out.push(format!("job {}", j["device"]));
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn a_real_qemu_vm_replicates_running_paused_and_across_a_clean_restart() {
    let h = support::host();
    let sizes = [32 * MIB, 24 * MIB];
    let mut vm = support::QemuSystem::start(
        &[("qcow2", "32M"), ("raw", "24M")],
        &["-device".into(), "ide-cd,id=cd0".into()],
    );
    let version = vm.qmp("query-version", None);
    eprintln!("QEMU {}", version["qemu"]);
    let mut guest = Model::new(&sizes);
    guest.write(&vm, 0, 0x11, 0, 8 * MIB);
    guest.write(&vm, 0, 0x12, 20 * MIB, MIB);
    guest.write(&vm, 1, 0x21, MIB, 4 * MIB);

    // Discovered from the guest's devices, in device order; the empty CD-ROM drive
    // is not a disk. vCPUs and memory are QEMU's; no pflash, so BIOS.
    let def = add_qemu_vm(&h.engine, &vm.spec("vm")).unwrap();
    assert_eq!(def.qemu.as_ref().unwrap().nodes, ["disk0", "disk1"]);
    assert_eq!(def.disks.len(), 2);
    assert_eq!(def.disks[0].format, Some(tern_disk::Format::Qcow2));
    assert_eq!(def.disks[1].format, Some(tern_disk::Format::Raw));
    assert!(def.disks[0].path.ends_with("d0.qcow2"), "{:?}", def.disks[0].path);
    assert!(def.disks[1].path.ends_with("d1.raw"), "{:?}", def.disks[1].path);
    assert_eq!(def.cpus, 2);
    assert_eq!(def.memory_bytes, 256 * MIB);
    assert_eq!(def.firmware, Firmware::Bios);

    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    let mut points = Vec::new();
    let full = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(full.kind, PointKind::Full);
    points.push(("full", full.point_id, guest.shas()));

    // Running: overlapping, unaligned and write-zeroes writes on both disks.
    guest.write(&vm, 0, 0x13, 4 * MIB + 1000, 70_000);
    guest.zero(&vm, 0, 6 * MIB, 128 << 10);
    guest.write(&vm, 1, 0x22, 3 * MIB, 64 << 10);
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    let changed: u64 = r.disks.iter().map(|d| d.changed_bytes).sum();
    assert!(changed > 0 && changed <= 6 * 64 * 1024, "changed {changed}");
    points.push(("running", r.point_id, guest.shas()));

    // Paused: the guest cannot write, but QEMU's block layer still can (HMP qemu-io);
    // the pass is a delta, and the guest stays paused.
    vm.qmp("stop", None);
    assert_eq!(vm.status(), "paused");
    guest.write(&vm, 1, 0x23, 10 * MIB + 512, 4096);
    guest.write(&vm, 0, 0x14, 30 * MIB, 64 << 10);
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta, "a cycle must work while the guest is paused");
    assert!(r.disks.iter().all(|d| d.changed_bytes > 0 && d.changed_bytes <= 2 * 65536), "{:?}", r.disks);
    assert_eq!(vm.status(), "paused", "tern must not resume a paused guest");
    points.push(("paused", r.point_id, guest.shas()));
    // A paused pass with nothing written is a point too.
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    assert_eq!(r.disks.iter().map(|d| d.changed_bytes).sum::<u64>(), 0);
    points.push(("paused, idle", r.point_id, guest.shas()));

    vm.qmp("cont", None);
    assert_eq!(vm.status(), "running");
    guest.write(&vm, 0, 0x15, 12 * MIB, 3 * MIB);
    guest.write(&vm, 1, 0x24, 0, 4096);
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    points.push(("resumed", r.point_id, guest.shas()));

    // Only the bitmap that tracks the next cycle is left in QEMU, one per disk.
    let left = tern_objects(&vm);
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|o| o.starts_with("bitmap tern-")), "{left:?}");

    // A clean quit and a new QEMU on the same images: the qcow2's bitmap persisted,
    // the raw disk's could not, so tracking is lost on one disk: that disk is resynced
    // by comparison, which finds exactly the granules written meanwhile (the patterns
    // compress to almost nothing), and the qcow2 ships what its bitmap recorded.
    vm.quit();
    vm.boot();
    guest.write(&vm, 0, 0x16, 16 * MIB, 64 << 10);
    guest.write(&vm, 1, 0x25, 20 * MIB, 64 << 10);
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Resync, "the raw disk's bitmap cannot survive a restart");
    assert_eq!(r.disks.iter().map(|d| d.changed_bytes).collect::<Vec<_>>(), [64 << 10, 64 << 10]);
    // Only the raw disk is read whole; the qcow2's bitmap survived, so only what it
    // recorded is read.
    assert_eq!(r.disks[0].read_bytes, 64 << 10, "{:?}", r.disks);
    assert!(r.disks[1].read_bytes >= 4 * MIB, "{:?}", r.disks);
    let uploaded: u64 = r.disks.iter().map(|d| d.uploaded_bytes).sum();
    assert!(uploaded < 2 * (64 << 10) + 8192, "resync uploaded {uploaded}");
    points.push(("resync after restart", r.point_id, guest.shas()));
    // And tracking goes on, on both disks.
    guest.write(&vm, 1, 0x26, 5 * MIB, 8192);
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta);
    assert_eq!(r.disks.iter().map(|d| d.changed_bytes).collect::<Vec<_>>(), [0, 64 << 10]);
    points.push(("delta after restart", r.point_id.clone(), guest.shas()));

    // Every point, migrated, is what the guest had written at its cut.
    let mut last = Vec::new();
    for (i, (what, point, shas)) in points.iter().enumerate() {
        last = migrate_point(&h, point, &h.root.join(format!("out-{i}")));
        let got: Vec<String> = last.iter().map(|p| support::sha256_file(p)).collect();
        assert_eq!(&got, shas, "point {i} ({what}, {point})");
    }
    let v =
        tern_engine::verify(&h.engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })
            .unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);

    // The oracle is QEMU's: its images, once it has quit, hold what the model says,
    // and so equal the last point.
    vm.quit();
    for (i, fmt) in ["qcow2", "raw"].iter().enumerate() {
        let raw = h.root.join(format!("guest-{i}.raw"));
        support::qemu(
            "qemu-img",
            &["convert", "-f", fmt, "-O", "raw", &vm.image(i).to_string_lossy(), &raw.to_string_lossy()],
        );
        assert!(
            std::fs::read(&raw).unwrap() == guest.disks[i],
            "disk {i}: QEMU's image differs from the model"
        );
        support::qemu_compare(&raw, "raw", &last[i], "raw");
    }
}

/// Firmware from the pflash drives, both ways QEMU is given them: `-drive
/// if=pflash` (device names `pflash0`, `pflash1`) and libvirt's `-blockdev` with
/// `-machine pflash0=...` (no device name; the qdev path says `system.flash0`). The
/// flash images are firmware and variables, never disks.
#[test]
fn pflash_drives_mean_uefi_and_are_not_disks() {
    for style in ["drive", "blockdev"] {
        let scratch = tempfile::tempdir().unwrap();
        // Each flash image holds HLT instructions: the vCPU stops at its reset vector.
        let code = scratch.path().join("code.fd");
        let vars = scratch.path().join("vars.fd");
        std::fs::write(&code, vec![0xf4u8; 2 << 20]).unwrap();
        std::fs::write(&vars, vec![0u8; 2 << 20]).unwrap();
        let flash: Vec<String> = match style {
            "drive" => vec![
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ],
            _ => vec![
                "-blockdev".into(),
                format!("driver=file,filename={},node-name=code-file,read-only=on", code.display()),
                "-blockdev".into(),
                "driver=raw,file=code-file,node-name=code,read-only=on".into(),
                "-blockdev".into(),
                format!("driver=file,filename={},node-name=vars-file", vars.display()),
                "-blockdev".into(),
                "driver=raw,file=vars-file,node-name=vars".into(),
                "-machine".into(),
                "pflash0=code,pflash1=vars".into(),
            ],
        };
        let vm = support::QemuSystem::start(&[("qcow2", "16M")], &flash);
        let h = support::host();
        let def = add_qemu_vm(&h.engine, &vm.spec("vm")).unwrap();
        let block = vm.qmp("query-block", None);
        let seen: Vec<_> = block.as_array().unwrap().iter().map(|d| (&d["device"], &d["qdev"])).collect();
        assert_eq!(def.qemu.as_ref().unwrap().nodes, ["disk0"], "-{style}: query-block {seen:?}");
        assert_eq!(def.firmware, Firmware::Uefi, "-{style}: query-block {seen:?}");
    }
}

/// The guest's memory is its boot memory and the DIMMs plugged into it.
#[test]
fn plugged_memory_counts() {
    let dimm: Vec<String> = ["-m", "256,slots=2,maxmem=1G", "-object", "memory-backend-ram,id=m1,size=128M"]
        .iter()
        .map(|s| s.to_string())
        .chain(["-device".into(), "pc-dimm,memdev=m1".into()])
        .collect();
    let vm = support::QemuSystem::start(&[("qcow2", "16M")], &dimm);
    let h = support::host();
    let def = add_qemu_vm(&h.engine, &vm.spec("vm")).unwrap();
    assert_eq!(def.memory_bytes, 384 * MIB, "{}", vm.qmp("query-memory-size-summary", None));
    assert_eq!(def.cpus, 2);
}

/// A disk given the old way (`-drive file=...,if=virtio`, no node name): QEMU names
/// its node itself (`#block...`), anew each time it starts. tern remembers the disk
/// by its device, so after a clean restart the next pass finds it again and, the
/// qcow2's bitmap having persisted, is a delta.
#[test]
fn a_disk_whose_node_qemu_named_is_found_again_by_its_device_after_a_restart() {
    let scratch = tempfile::tempdir().unwrap();
    let img = scratch.path().join("old.qcow2");
    support::qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img.to_string_lossy(), "16M"]);
    let drive = vec!["-drive".into(), format!("file={},if=virtio,format=qcow2,id=old0", img.display())];
    let mut vm = support::QemuSystem::start(&[], &drive);
    let write = |vm: &support::QemuSystem, cmd: &str| {
        let out = vm.hmp(&format!("qemu-io old0 \"{cmd}\""));
        assert!(out.trim().is_empty(), "HMP qemu-io ({cmd}): {out}");
    };
    write(&vm, "write -P 0x31 0 2M");
    let h = support::host();
    let def = add_qemu_vm(&h.engine, &vm.spec("vm")).unwrap();
    let q = def.qemu.as_ref().unwrap();
    assert!(q.nodes[0].starts_with('#'), "QEMU named the node itself: {:?}", q.nodes);
    assert_eq!(q.devices.len(), 1, "{q:?}");
    let opts = ReplicateOptions { threads: 2, ..Default::default() };
    assert_eq!(support::run_replicate(&h.engine, "vm", &opts).unwrap().kind, PointKind::Full);
    write(&vm, "write -P 0x32 5M 64k");
    assert_eq!(support::run_replicate(&h.engine, "vm", &opts).unwrap().kind, PointKind::Delta);

    // A few other drives first, so that the restarted QEMU's own names differ.
    vm.quit();
    let mut extra = Vec::new();
    for i in 0..3 {
        let other = scratch.path().join(format!("other{i}.raw"));
        std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
        extra.push("-drive".to_string());
        extra.push(format!("file={},if=none,format=raw,id=other{i}", other.display()));
    }
    vm.boot_with(&extra);
    write(&vm, "write -P 0x33 9M 64k");
    let block = vm.qmp("query-block", None);
    let old0 = block.as_array().unwrap().iter().find(|d| d["device"] == "old0").unwrap();
    let now = old0["inserted"]["node-name"].as_str().unwrap();
    assert_ne!(now, q.nodes[0], "the test needs QEMU to name the node differently");
    let r = support::run_replicate(&h.engine, "vm", &opts).unwrap();
    assert_eq!(r.kind, PointKind::Delta, "found again by device; its bitmap persisted");
    assert_eq!(r.disks[0].changed_bytes, 65536);
}
