//! Round trip over every source format qemu-img makes: one VM whose disks are raw,
//! qcow2 (v3, v2 = compat 0.10, compressed with zlib and with zstd), VHD (dynamic and
//! fixed) and VHDX (dynamic and fixed), replicated once, then migrated to every output
//! format. QEMU is the oracle: each output compares equal to its source with
//! `qemu-img compare`, the SHA-256 migrate reports equals that of the source as
//! `qemu-img convert -O raw` reads it, and Azure outputs follow the fixed VHD rules.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use support::{
    add_vm, host, qemu, qemu_compare, qemu_guest_sha256, qemu_virtual_size, run_migrate, run_replicate,
};
use tern_engine::{verify, MigrateFormat, ReplicateOptions, VerifyOptions};

const MIB: u64 = 1 << 20;

/// A source disk: file name, QEMU driver, `qemu-img convert` options making it.
struct Source {
    name: &'static str,
    driver: &'static str,
    convert: &'static [&'static str],
}

const SOURCES: &[Source] = &[
    Source { name: "raw.img", driver: "raw", convert: &["-O", "raw"] },
    Source { name: "v3.qcow2", driver: "qcow2", convert: &["-O", "qcow2"] },
    Source { name: "v2.qcow2", driver: "qcow2", convert: &["-O", "qcow2", "-o", "compat=0.10"] },
    Source { name: "zlib.qcow2", driver: "qcow2", convert: &["-c", "-O", "qcow2"] },
    Source {
        name: "zstd.qcow2",
        driver: "qcow2",
        convert: &["-c", "-O", "qcow2", "-o", "compression_type=zstd"],
    },
    Source { name: "dynamic.vhd", driver: "vpc", convert: &["-O", "vpc"] },
    Source { name: "fixed.vhd", driver: "vpc", convert: &["-O", "vpc", "-o", "subformat=fixed"] },
    Source { name: "dynamic.vhdx", driver: "vhdx", convert: &["-O", "vhdx", "-o", "block_size=1M"] },
    Source { name: "fixed.vhdx", driver: "vhdx", convert: &["-O", "vhdx", "-o", "subformat=fixed"] },
];

/// A raw disk of `10 MiB + 1 MiB + 1536` bytes (a whole number of sectors, but not of
/// chunks or MiB): the sample layout, plus writes that straddle a chunk boundary, sit
/// at odd offsets, and end at the last byte.
fn base_image(path: &Path, seed: u64) {
    tern_engine::sample::write_sample_disk(path, 10 * MIB, seed).unwrap();
    let size = 11 * MIB + 1536;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let fill = |len: usize, tag: u64| -> Vec<u8> {
        (0..len).map(|i| (i as u64 * 31 + tag * 7 + seed) as u8).collect()
    };
    f.write_all_at(&fill(8192, 1), 4 * MIB - 4096).unwrap();
    f.write_all_at(&fill(1000, 2), 6 * MIB + 7).unwrap();
    f.write_all_at(&fill(3000, 3), size - 3000).unwrap();
}

/// The footer rules Azure sets for an uploaded VHD (VHD specification, "Hard Disk
/// Footer Format"): cookie `conectix`, version 1.0, no data offset, disk type 2
/// (fixed), a valid one's-complement checksum, a current size that is a whole MiB and
/// covers the source, and a file that is that size plus the 512-byte footer.
fn check_azure_rules(path: &Path, source_size: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    assert!(len >= 512, "{}: {len} bytes", path.display());
    let mut footer = [0u8; 512];
    std::fs::File::open(path).unwrap().read_exact_at(&mut footer, len - 512).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(footer[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(footer[o..o + 8].try_into().unwrap());
    let what = path.display();
    assert_eq!(&footer[0..8], b"conectix", "{what}: cookie");
    assert_eq!(be32(12), 0x0001_0000, "{what}: file format version");
    assert_eq!(be64(16), u64::MAX, "{what}: data offset of a fixed disk");
    assert_eq!(be32(60), 2, "{what}: disk type must be 2 (fixed)");
    let sum: u32 =
        footer.iter().enumerate().filter(|(i, _)| !(64..68).contains(i)).map(|(_, &b)| u32::from(b)).sum();
    assert_eq!(be32(64), !sum, "{what}: checksum");
    let current = be64(48);
    assert_eq!(current % MIB, 0, "{what}: current size {current} is not a whole MiB");
    assert!(
        current >= source_size && current - source_size < MIB,
        "{what}: size {current} for {source_size}"
    );
    assert_eq!(len, current + 512, "{what}: file size must be the virtual size plus the footer");
}

#[test]
fn every_source_format_to_every_output_format() {
    let h = host();
    let scratch = h.root.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut disks: Vec<PathBuf> = Vec::new();
    let mut expected = Vec::new();
    for (i, s) in SOURCES.iter().enumerate() {
        let base = scratch.join(format!("base{i}.raw"));
        base_image(&base, 100 + i as u64);
        let path = h.root.join(s.name);
        let mut args = vec!["convert", "-f", "raw"];
        args.extend_from_slice(s.convert);
        let (b, p) = (base.to_string_lossy().into_owned(), path.to_string_lossy().into_owned());
        args.extend([b.as_str(), p.as_str()]);
        qemu("qemu-img", &args);
        std::fs::remove_file(&base).unwrap();
        // What QEMU reads from the source: the oracle for every output.
        let size = qemu_virtual_size(&path, s.driver);
        let sha = qemu_guest_sha256(&path, s.driver, &scratch);
        println!("source {}: {} bytes as QEMU reads it, sha256 {sha}", s.name, size);
        expected.push((size, sha));
        disks.push(path);
    }
    add_vm(&h.engine, "multi", &disks);
    let r =
        run_replicate(&h.engine, "multi", &ReplicateOptions { threads: 3, ..Default::default() }).unwrap();
    assert_eq!(r.disks.len(), SOURCES.len());
    for (d, (size, _)) in r.disks.iter().zip(&expected) {
        assert_eq!(
            d.virtual_size, *size,
            "disk {} ({}): tern and QEMU disagree on the size",
            d.disk, SOURCES[d.disk as usize].name
        );
    }

    for fmt in MigrateFormat::ALL {
        let out = h.root.join(format!("out-{fmt:?}"));
        let m = run_migrate(&h.engine, "multi", fmt, &out).unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
        assert_eq!(m.point_id, r.point_id);
        assert_eq!(m.disks.len(), SOURCES.len());
        for ((d, s), (size, sha)) in m.disks.iter().zip(SOURCES).zip(&expected) {
            let ctx = format!("{} -> {fmt:?} ({})", s.name, d.path.display());
            qemu_compare(&disks[d.disk as usize], s.driver, &d.path, fmt.qemu_driver());
            assert_eq!(&d.sha256, sha, "{ctx}: reported SHA-256");
            assert_eq!(d.virtual_size, *size, "{ctx}");
            // QEMU must see every byte of the disk (it counts whole sectors).
            let seen = qemu_virtual_size(&d.path, fmt.qemu_driver());
            assert!(seen >= *size, "{ctx}: QEMU reads {seen} bytes of {size}");
            match fmt {
                MigrateFormat::Azure => check_azure_rules(&d.path, *size),
                MigrateFormat::Qcow2 | MigrateFormat::Vhdx => {
                    qemu("qemu-img", &["check", "-f", fmt.qemu_driver(), &d.path.to_string_lossy()]);
                }
                _ => {}
            }
        }
        // Outputs are not needed any more: keep the temp folder small.
        std::fs::remove_dir_all(&out).unwrap();
    }
    let v = verify(&h.engine, &VerifyOptions { read_data: true, ..Default::default() }).unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}
