//! Deduplication across VMs, counted at the store: VMs cloned from one base image
//! (qcow2 overlays on a shared backing file, and a full copy in another format), each
//! diverged a little, upload at most 5% of the first VM's bytes. The ratio is printed.

mod support;

use support::{add_vm, host, qemu, qemu_compare, run_migrate, run_replicate, tree_bytes};
use tern_engine::{MigrateFormat, ReplicateOptions};

#[test]
fn vms_cloned_from_one_base_upload_at_most_5_percent_of_the_first() {
    let h = host();
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let raw = h.root.join("base.raw");
    tern_engine::sample::write_sample_disk(&raw, 512 << 20, 21).unwrap();
    let base = h.root.join("base.qcow2");
    qemu("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&base)]);
    std::fs::remove_file(&raw).unwrap();
    // Two linked clones (overlays on the base) and one full copy as VHDX, each with
    // its own writes since.
    let clones = [
        ("first", "qcow2", vec!["write -P 0x11 5M 64k", "write -P 0x12 77M 4k"]),
        ("second", "qcow2", vec!["write -P 0x21 9M 256k", "write -P 0x22 300M 64k", "write -z 40M 4M"]),
        ("copy", "vhdx", vec!["write -P 0x31 1M 4k", "write -P 0x32 500M 512k"]),
    ];
    let mut disks = Vec::new();
    for (name, fmt, writes) in &clones {
        let p = h.root.join(format!("{name}.{fmt}"));
        if *fmt == "qcow2" {
            qemu("qemu-img", &["create", "-f", "qcow2", "-b", &s(&base), "-F", "qcow2", &s(&p)]);
        } else {
            qemu("qemu-img", &["convert", "-f", "qcow2", "-O", fmt, &s(&base), &s(&p)]);
        }
        let mut args = vec!["-f", fmt];
        for w in writes {
            args.extend(["-c", w]);
        }
        let path = s(&p);
        args.push(&path);
        qemu("qemu-io", &args);
        add_vm(&h.engine, name, std::slice::from_ref(&p));
        disks.push((name, fmt, p));
    }

    let store = h.root.join("data/store");
    let mut counted = Vec::new();
    for (name, _, _) in &disks {
        let before = tree_bytes(&store);
        let r = run_replicate(&h.engine, name, &ReplicateOptions::default()).unwrap();
        let at_store = tree_bytes(&store) - before;
        let d = &r.disks[0];
        println!(
            "VM {name}: {at_store} bytes added to the store ({} put), {} chunks uploaded, {} already there, {} zero",
            r.store_stats.bytes_put, d.uploaded_chunks, d.dedup_chunks, d.zero_chunks
        );
        counted.push(at_store);
    }
    let first = counted[0];
    assert!(first > 128 << 20, "the first VM stored only {first} bytes");
    for ((name, _, _), &bytes) in disks.iter().zip(&counted).skip(1) {
        let ratio = bytes as f64 / first as f64;
        println!("VM {name} uploaded {bytes} bytes = {:.3}% of the first VM's {first}", ratio * 100.0);
        assert!(
            bytes * 20 <= first,
            "VM {name}: {:.3}% of the first VM's bytes, more than 5%",
            ratio * 100.0
        );
    }
    // Deduplicated data still migrates to the right content.
    for (name, fmt, p) in &disks {
        let out = h.root.join(format!("out-{name}"));
        let m = run_migrate(&h.engine, name, MigrateFormat::Qcow2, &out).unwrap();
        qemu_compare(p, fmt, &m.disks[0].path, "qcow2");
    }
}
