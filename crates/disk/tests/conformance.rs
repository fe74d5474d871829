//! The conformance suite over every format, with qemu-img as the oracle.
//!
//! One source pattern is turned by qemu-img into every format and subformat tern reads;
//! tern must read each byte-identically to `qemu-img convert -O raw` and map it like
//! `qemu-img map`. Then tern converts every source into every output format, and
//! qemu-img must find each output equal to its source, consistent (`qemu-img check`,
//! where qemu implements it for the format), and of the right format and size.
//! Random write patterns then go through every format pair (property test).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use proptest::prelude::*;
use tern_disk::{convert, create_disk, CompareOutcome, ConvertOptions, CreateFormat, CreateOptions};

/// 20 MiB + 1536 bytes: not a multiple of any cluster or block size.
const SIZE: u64 = (20 << 20) + 1536;

/// A raw file with data of several shapes: cluster-aligned, unaligned, a written run of
/// zeros, and the very last byte.
fn pattern(dir: &Path) -> PathBuf {
    let p = dir.join("pattern.raw");
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    qemu_io(
        "raw",
        &p,
        &[
            "write -P 0x11 0 64K",
            "write -P 0x22 100000 300000",
            "write -P 0x00 3M 1M",
            "write -P 0x33 5M 2M",
            "write -P 0x44 9437184 4096",
            "write -P 0x55 16777000 1000",
            &format!("write -P 0x66 {} 512", SIZE - 512),
        ],
    );
    p
}

/// (name, qemu-img convert options) of every source tern must read.
const SOURCES: &[(&str, &[&str])] = &[
    ("qcow2-v2", &["-O", "qcow2", "-o", "compat=0.10"]),
    ("qcow2-v3", &["-O", "qcow2"]),
    ("qcow2-4k", &["-O", "qcow2", "-o", "cluster_size=4096"]),
    ("qcow2-2m", &["-O", "qcow2", "-o", "cluster_size=2M"]),
    ("qcow2-deflate", &["-c", "-O", "qcow2"]),
    ("qcow2-zstd", &["-c", "-O", "qcow2", "-o", "compression_type=zstd"]),
    ("vpc-dynamic", &["-O", "vpc"]),
    ("vpc-fixed", &["-O", "vpc", "-o", "subformat=fixed,force_size=on"]),
    ("vhdx-dynamic-1m", &["-O", "vhdx", "-o", "block_size=1M"]),
    ("vhdx-dynamic-32m", &["-O", "vhdx", "-o", "block_size=32M"]),
    ("vhdx-fixed", &["-O", "vhdx", "-o", "subformat=fixed"]),
    ("raw", &["-O", "raw"]),
];

/// (name, format, qemu's name for it, whether `qemu-img check` supports it)
const OUTPUTS: &[(&str, CreateFormat, &str, bool)] = &[
    ("raw", CreateFormat::Raw, "raw", false),
    ("qcow2", CreateFormat::Qcow2 { cluster_size: 65536 }, "qcow2", true),
    ("qcow2-4k", CreateFormat::Qcow2 { cluster_size: 4096 }, "qcow2", true),
    ("vhd", CreateFormat::VhdDynamic, "vpc", false),
    ("vhd-fixed", CreateFormat::VhdFixed, "vpc", false),
    ("vhdx", CreateFormat::Vhdx { block_size: 1 << 20 }, "vhdx", true),
];

fn make_sources(dir: &Path) -> Vec<(String, PathBuf)> {
    let pat = pattern(dir);
    SOURCES
        .iter()
        .map(|(name, opts)| {
            let out = dir.join(format!("src-{name}"));
            let mut args = vec!["convert"];
            args.extend_from_slice(opts);
            args.push(pat.to_str().unwrap());
            args.push(out.to_str().unwrap());
            qemu_img(&args);
            (name.to_string(), out)
        })
        .collect()
}

#[test]
fn every_source_reads_and_maps_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (name, src) in make_sources(dir.path()) {
        eprintln!("source {name}");
        assert_reads_like_qemu(&src, dir.path());
        assert_map_like_qemu(&src);
    }
}

#[test]
fn every_source_converts_to_every_output_as_qemu_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    for (sname, src) in make_sources(dir.path()) {
        let disk = open(&src);
        for (oname, format, qemu_name, checkable) in OUTPUTS {
            eprintln!("{sname} -> {oname}");
            let out = dir.path().join(format!("out-{sname}-{oname}"));
            convert(
                disk.as_ref(),
                &out,
                &ConvertOptions { format: *format, virtual_size: None, progress: None, sync: true },
            )
            .unwrap_or_else(|e| panic!("{sname} -> {oname}: {e}"));
            qemu_compare(&src, &out);
            if *checkable {
                qemu_img(&["check", "-q", "-f", qemu_name, out.to_str().unwrap()]);
            }
            let info = qemu_info(&out);
            assert_eq!(info["format"], *qemu_name, "{sname} -> {oname}");
            assert_eq!(info["virtual-size"], disk.virtual_size(), "{sname} -> {oname}: virtual size");
            std::fs::remove_file(&out).unwrap();
        }
    }
}

#[test]
fn azure_output_is_a_fixed_vhd_of_whole_mebibytes() {
    let dir = tempfile::tempdir().unwrap();
    let pat = pattern(dir.path());
    let out = dir.path().join("azure.vhd");
    let disk = open(&pat);
    let size = SIZE.div_ceil(1 << 20) << 20;
    convert(
        disk.as_ref(),
        &out,
        &ConvertOptions {
            format: CreateFormat::VhdFixed,
            virtual_size: Some(size),
            progress: None,
            sync: true,
        },
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, size + 512, "fixed VHD: data then a 512-byte footer");
    let footer = &bytes[bytes.len() - 512..];
    assert_eq!(&footer[..8], b"conectix");
    assert_eq!(u32::from_be_bytes(footer[60..64].try_into().unwrap()), 2, "disk type fixed");
    assert_eq!(u64::from_be_bytes(footer[48..56].try_into().unwrap()), size, "current size");
    let stored = u32::from_be_bytes(footer[64..68].try_into().unwrap());
    let sum: u32 =
        footer.iter().enumerate().filter(|(i, _)| !(64..68).contains(i)).map(|(_, &b)| b as u32).sum();
    assert_eq!(stored, !sum, "footer checksum");
    let info = qemu_info(&out);
    assert_eq!(info["format"], "vpc");
    assert_eq!(info["virtual-size"], size);
    qemu_compare(&pat, &out);
}

#[test]
fn large_sparse_disks_above_4_gib_round_trip_through_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = (5 << 30) + (3 << 20);
    let raw = dir.path().join("big.raw");
    std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    qemu_io("raw", &raw, &["write -P 0x77 0 1M", "write -P 0x88 4294966784 1024", "write -P 0x99 5G 3M"]);
    let disk = open(&raw);
    for (oname, format, _, _) in OUTPUTS {
        let out = dir.path().join(format!("big-{oname}"));
        convert(
            disk.as_ref(),
            &out,
            &ConvertOptions { format: *format, virtual_size: None, progress: None, sync: true },
        )
        .unwrap_or_else(|e| panic!("-> {oname}: {e}"));
        qemu_compare(&raw, &out);
        let back = open(&out);
        assert_eq!(back.virtual_size(), size, "{oname}");
        assert_eq!(
            tern_disk::compare(disk.as_ref(), back.as_ref(), None).unwrap(),
            CompareOutcome::Identical
        );
        std::fs::remove_file(&out).unwrap();
    }
}

fn write_pattern(path: &Path, format: CreateFormat, size: u64, writes: &[(u64, usize, u8)]) {
    let mut w = create_disk(path, &CreateOptions { format, virtual_size: size }).unwrap();
    for &(off, len, byte) in writes {
        let off = off % size;
        let len = (len as u64).min(size - off) as usize;
        w.write_at(&vec![byte; len], off).unwrap();
    }
    w.finish().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Random writes into a raw reference, then through every format pair A -> B:
    /// every B reads exactly as the reference.
    #[test]
    fn random_patterns_survive_every_format_pair(
        size in (2048u64..24576).prop_map(|s| s * 512),
        writes in proptest::collection::vec((any::<u64>(), 1usize..300_000, any::<u8>()), 1..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("ref.raw");
        write_pattern(&reference, CreateFormat::Raw, size, &writes);
        let ref_disk = open(&reference);
        for (aname, afmt, _, _) in OUTPUTS {
            let a = dir.path().join(format!("a-{aname}"));
            convert(ref_disk.as_ref(), &a, &ConvertOptions { format: *afmt, virtual_size: None, progress: None, sync: true }).unwrap();
            let a_disk = open(&a);
            for (bname, bfmt, _, _) in OUTPUTS {
                let b = dir.path().join(format!("b-{aname}-{bname}"));
                convert(a_disk.as_ref(), &b, &ConvertOptions { format: *bfmt, virtual_size: None, progress: None, sync: true }).unwrap();
                let b_disk = open(&b);
                prop_assert_eq!(b_disk.virtual_size(), size);
                let outcome = tern_disk::compare(ref_disk.as_ref(), b_disk.as_ref(), None).unwrap();
                prop_assert_eq!(outcome, CompareOutcome::Identical, "{} -> {}", aname, bname);
                std::fs::remove_file(&b).unwrap();
            }
        }
    }

    /// Random writes straight into each writer read back as the same pattern applied to
    /// a raw file, through tern and through qemu-img.
    #[test]
    fn random_writes_into_every_writer_read_back(
        size in (2048u64..16384).prop_map(|s| s * 512),
        writes in proptest::collection::vec((any::<u64>(), 1usize..200_000, any::<u8>()), 1..16),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("ref.raw");
        write_pattern(&reference, CreateFormat::Raw, size, &writes);
        for (name, fmt, _, _) in OUTPUTS {
            let out = dir.path().join(format!("w-{name}"));
            write_pattern(&out, *fmt, size, &writes);
            let a = open(&reference);
            let b = open(&out);
            prop_assert_eq!(tern_disk::compare(a.as_ref(), b.as_ref(), None).unwrap(), CompareOutcome::Identical, "{}", name);
            qemu_compare(&reference, &out);
        }
    }
}
