//! VHDX: images made by qemu-img read and map like qemu-img says; images tern writes
//! pass `qemu-img check` and compare equal; differencing images read through their
//! parent; a pending log is replayed; malformed images give clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_reads_like_qemu, qemu_img, qemu_info, qemu_io, tern_raw};
use proptest::prelude::*;
use tern_disk::vhdx::{DifferencingOptions, VhdxWriter};
use tern_disk::{open_disk, DiskWriter, ErrorKind, Format, MapKind, OpenOptions};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` exits 0 (no errors, no leaks).
fn assert_qemu_check_clean(path: &Path) {
    let out = Command::new("qemu-img").args(["check", "-f", "vhdx", s(path)]).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` says the two images have the same content.
fn assert_qemu_compare_equal(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = Command::new("qemu-img").args(["compare", "-f", fa, "-F", fb, s(a), s(b)]).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse raw file of `size` with `writes` (offset, length, pattern byte).
fn make_raw(path: &Path, size: u64, writes: &[(u64, u64, u8)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    for &(off, len, b) in writes {
        let data: Vec<u8> = (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect();
        f.write_all_at(&data, off).unwrap();
    }
}

// ---------------------------------------------------------------- qemu-made images

#[test]
fn qemu_created_images_read_and_map_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // (name, create options, size, qemu-io writes)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("empty-dyn-1m", "subformat=dynamic,block_size=1M", "10M", &[]),
        (
            "odd-dyn-1m",
            "subformat=dynamic,block_size=1M",
            "10486272",
            &["write -P 0x21 10M 512", "write -P 0x22 0 4k"],
        ),
        (
            "sparse-dyn-32m",
            "subformat=dynamic,block_size=32M",
            "100M",
            &["write -P 0x5a 3M 1M", "write -P 0x11 40M 64k", "write -P 0x12 99M 1M", "write -z 3M 4k"],
        ),
        ("fixed-1m", "subformat=fixed,block_size=1M", "9M", &["write -P 0x33 1M 3M", "write -P 0x34 8M 512"]),
        ("fixed-32m-odd", "subformat=fixed,block_size=32M", "33554944", &["write -P 0x44 32M 512"]),
    ];
    for (name, opts, size, writes) in cases {
        let img = d.join(format!("{name}.vhdx"));
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", opts, s(&img), size]);
        if !writes.is_empty() {
            qemu_io("vhdx", &img, writes);
        }
        assert_reads_like_qemu(&img, d);
        common::assert_map_like_qemu(&img);
        let info = open_disk(&img, &OpenOptions::read_only()).unwrap().info().unwrap();
        assert_eq!(info.format, Format::Vhdx);
        let want = if opts.contains("fixed") { "fixed" } else { "dynamic" };
        assert_eq!(info.subformat, want, "{name}");
        assert_eq!(info.cluster_size, Some(if opts.contains("32M") { 32 * MIB } else { MIB }));
        assert_eq!(info.logical_sector_size, 512);
        assert_eq!(info.virtual_size, qemu_info(&img)["virtual-size"].as_u64().unwrap(), "{name}");
    }
}

#[test]
fn qemu_converted_images_read_and_map_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sparse = d.join("sparse.raw");
    make_raw(&sparse, 70 * MIB + 1536, &[(0, 4096, 1), (5 * MIB + 512, 3 * MIB, 2), (70 * MIB, 1536, 3)]);
    let full = d.join("full.raw");
    let size = 6 * MIB + 512;
    make_raw(&full, size, &[(0, size, 9)]);
    for raw in [&sparse, &full] {
        for sub in ["dynamic", "fixed"] {
            for bs in ["1M", "32M"] {
                let img = d.join(format!("{}-{sub}-{bs}.vhdx", raw.file_stem().unwrap().to_string_lossy()));
                let o = format!("subformat={sub},block_size={bs}");
                qemu_img(&["convert", "-f", "raw", "-O", "vhdx", "-o", &o, s(raw), s(&img)]);
                assert_reads_like_qemu(&img, d);
                common::assert_map_like_qemu(&img);
                let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
                assert_eq!(tern_raw(disk.as_ref()), std::fs::read(raw).unwrap(), "{}", img.display());
            }
        }
    }
}

#[test]
fn qemu_image_above_4_gib_reads_data_past_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("big.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", "subformat=dynamic,block_size=32M", s(&img), "5G"]);
    qemu_io("vhdx", &img, &["write -P 0x79 4095M 2M", "write -P 0x77 4G 1M", "write -P 0x78 5119M 1M"]);
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, (4 << 30) + 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    disk.read_at(&mut buf, (5 << 30) - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x78));
    let mut buf = vec![0u8; 2048];
    disk.read_at(&mut buf, (4 << 30) - 2048).unwrap();
    assert!(buf.iter().all(|&b| b == 0x79));
    // Too large to hold in memory twice: the map must show data exactly at the three
    // written ranges' blocks (32 MiB), and the content is compared by qemu-img.
    let map = tern_disk::collect_map(disk.as_ref()).unwrap();
    let data: Vec<(u64, u64)> =
        map.iter().filter(|m| m.kind == MapKind::Data).map(|m| (m.start, m.end())).collect();
    assert_eq!(data, vec![(4064 * MIB, 4128 * MIB), (5088 * MIB, 5120 * MIB)], "{map:?}");
    assert_reads_like_qemu(&img, d);
}

// ---------------------------------------------------------------- writer

fn tern_convert_to_vhdx(src: &Path, dst: &Path, block_size: u64) {
    let disk = open_disk(src, &OpenOptions::read_only()).unwrap();
    let opts = tern_disk::ConvertOptions {
        format: tern_disk::CreateFormat::Vhdx { block_size },
        virtual_size: None,
        progress: None,
        sync: true,
    };
    tern_disk::convert(disk.as_ref(), dst, &opts).unwrap();
}

#[test]
fn written_images_pass_qemu_check_and_compare_equal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    /// (name, virtual size, writes (offset, length, pattern), block size)
    type Case<'a> = (&'a str, u64, &'a [(u64, u64, u8)], u64);
    let cases: &[Case] = &[
        ("odd", 10 * MIB + 512, &[(0, 512, 1), (3 * MIB - 100, 300, 2), (10 * MIB, 512, 3)], MIB),
        ("full", 5 * MIB, &[(0, 5 * MIB, 4)], MIB),
        ("empty", 64 * MIB, &[], 32 * MIB),
        ("big-blocks", 300 * MIB, &[(299 * MIB, MIB, 5), (17, 1000, 6)], 256 * MIB),
        (
            "past-4g",
            (4 << 30) + 3 * MIB + 1024,
            &[((4 << 30) + MIB, 2 * MIB + 1024, 7), (4095 * MIB, 2 * MIB, 8)],
            32 * MIB,
        ),
    ];
    for (name, size, writes, bs) in cases {
        let raw = d.join(format!("{name}.raw"));
        let img = d.join(format!("{name}.vhdx"));
        make_raw(&raw, *size, writes);
        tern_convert_to_vhdx(&raw, &img, *bs);
        assert_qemu_check_clean(&img);
        assert_qemu_compare_equal(&img, "vhdx", &raw, "raw");
        let info = qemu_info(&img);
        assert_eq!(info["format"], "vhdx", "{name}");
        assert_eq!(info["virtual-size"].as_u64(), Some(*size), "{name}");
        assert_eq!(info["cluster-size"].as_u64(), Some(*bs), "{name}");
        common::assert_map_like_qemu(&img);
        let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
        assert_eq!(disk.info().unwrap().subformat, "dynamic");
        // Only the blocks holding data were allocated.
        let blocks_with_data: std::collections::BTreeSet<u64> =
            writes.iter().flat_map(|&(o, l, _)| (o / bs)..=((o + l - 1) / bs)).collect();
        let file_len = std::fs::metadata(&img).unwrap().len();
        let bat = (size.div_ceil(*bs) * 8).div_ceil(MIB) * MIB;
        assert_eq!(file_len, 3 * MIB + bat + blocks_with_data.len() as u64 * bs, "{name}");
        if *size < (1 << 30) {
            assert_reads_like_qemu(&img, d);
        }
    }
}

#[test]
fn writer_refuses_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    for (size, bs) in [(MIB, 3 * MIB), (MIB, 512 * MIB), (MIB, 1 << 19), (0, MIB), (65 << 40, MIB)] {
        let p = dir.path().join(format!("{size}-{bs}.vhdx"));
        let err = VhdxWriter::create(&p, size, bs).err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(!p.exists(), "nothing created for a refused request");
    }
    let p = dir.path().join("a.vhdx");
    let mut w = VhdxWriter::create(&p, 4 * MIB, MIB).unwrap();
    let err = w.write_at(&[1; 512], 4 * MIB - 256).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn unfinished_writer_leaves_an_image_that_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.vhdx");
    let mut w = VhdxWriter::create(&p, 4 * MIB, MIB).unwrap();
    w.write_at(&[1; 4096], 0).unwrap();
    drop(w);
    let err = open_disk(&p, &OpenOptions::read_only()).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_read_back_through_tern_and_qemu(
        size_sectors in 1u64..(9 * 2048),
        block_shift in 20u32..22,
        writes in prop::collection::vec((0u64..(9 * MIB), 1usize..300_000, any::<u8>()), 0..12),
    ) {
        let size = size_sectors * 512;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.vhdx");
        let raw = dir.path().join("p.raw");
        let mut reference = vec![0u8; size as usize];
        let mut w = VhdxWriter::create(&img, size, 1 << block_shift).unwrap();
        for (off, len, b) in writes {
            let off = off % size;
            let len = len.min((size - off) as usize);
            let data: Vec<u8> = (0..len).map(|i| if b % 3 == 0 { 0 } else { b ^ (i as u8) }).collect();
            w.write_at(&data, off).unwrap();
            reference[off as usize..off as usize + len].copy_from_slice(&data);
        }
        Box::new(w).finish().unwrap();
        std::fs::write(&raw, &reference).unwrap();
        assert_qemu_check_clean(&img);
        assert_qemu_compare_equal(&img, "vhdx", &raw, "raw");
        let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
        prop_assert_eq!(tern_raw(disk.as_ref()), reference);
    }
}

// ---------------------------------------------------------------- differencing

/// A qemu-made parent with data, and a tern-made child with some sectors written.
/// Returns (parent, child, expected content through the parent).
fn make_differencing(d: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let parent = d.join("parent.vhdx");
    let child = d.join("child.avhdx");
    let size = 6 * MIB + 1024;
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", "block_size=1M", s(&parent), &size.to_string()]);
    qemu_io("vhdx", &parent, &["write -P 0x11 0 3M", "write -P 0x12 5M 4k", "write -P 0x13 6M 1024"]);
    let mut expected = common::qemu_raw(&parent, d);
    let opts = DifferencingOptions::for_parent(&child, &parent).unwrap();
    assert_eq!(opts.virtual_size, size);
    let mut w = VhdxWriter::create_differencing(&child, MIB, &opts).unwrap();
    // A partial block over parent data, a whole block, zeros hiding parent data, and a
    // write in a block the parent never allocated, and the odd-sized tail.
    let writes: &[(u64, usize, u8)] = &[
        (4096, 1024, 0xa1),
        (MIB, MIB as usize, 0xa2),
        (2 * MIB + 512, 512, 0),
        (4 * MIB, 8192, 0xa4),
        (6 * MIB + 512, 512, 0xa5),
    ];
    for &(off, len, b) in writes {
        let data = vec![b; len];
        w.write_at(&data, off).unwrap();
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    Box::new(w).finish().unwrap();
    (parent, child, expected)
}

#[test]
fn differencing_image_reads_through_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, child, expected) = make_differencing(dir.path());
    let opts = OpenOptions { allow_backing: true, ..OpenOptions::default() };
    let disk = open_disk(&child, &opts).unwrap();
    assert_eq!(tern_raw(disk.as_ref()), expected);
    let info = disk.info().unwrap();
    assert_eq!(info.subformat, "differencing");
    let backing = info.backing.unwrap();
    assert_eq!(backing.opened, Some(parent.canonicalize().unwrap()));
    assert!(backing.locators.iter().any(|l| l.starts_with("relative_path")), "{:?}", backing.locators);
    // The map: data wherever the child or the parent holds data, never data elsewhere.
    let map = tern_disk::collect_map(disk.as_ref()).unwrap();
    let at = |o: u64| map.iter().find(|m| m.start <= o && o < m.end()).unwrap().kind;
    for o in [0, 4096, MIB, 2 * MIB + 512, 4 * MIB, 5 * MIB, 6 * MIB, 6 * MIB + 512] {
        assert_eq!(at(o), MapKind::Data, "offset {o}: {map:?}");
    }
    assert_ne!(at(4 * MIB + 8192), MapKind::Data, "{map:?}");
    assert_ne!(at(3 * MIB), MapKind::Data, "{map:?}");
    for m in &map {
        if m.kind != MapKind::Data {
            let mut buf = vec![1u8; m.length as usize];
            disk.read_at(&mut buf, m.start).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "{m:?} maps as zero but is not");
        }
    }
    // Whole-content conversion through the chain equals the expected bytes.
    let out = dir.path().join("flat.raw");
    let c = tern_disk::ConvertOptions {
        format: tern_disk::CreateFormat::Raw,
        virtual_size: None,
        progress: None,
        sync: true,
    };
    tern_disk::convert(disk.as_ref(), &out, &c).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expected);

    // Without allow_backing: opens, names the parent, unwritten ranges are unallocated.
    let alone = open_disk(&child, &OpenOptions::read_only()).unwrap();
    let info = alone.info().unwrap();
    assert_eq!(info.backing.as_ref().unwrap().opened, None);
    let map = tern_disk::collect_map(alone.as_ref()).unwrap();
    assert_eq!(map.iter().find(|m| m.start == 0).unwrap().kind, MapKind::Unallocated);
    let mut buf = vec![0u8; 1024];
    alone.read_at(&mut buf, 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa1));
}

#[test]
fn differencing_parent_missing_or_changed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (parent, child, _) = make_differencing(dir.path());
    let opts = OpenOptions { allow_backing: true, ..OpenOptions::default() };

    let moved = dir.path().join("elsewhere.vhdx");
    std::fs::rename(&parent, &moved).unwrap();
    let err = open_disk(&child, &opts).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Backing, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("parent not found"), "{msg}");
    assert!(msg.contains("relative_path") && msg.contains("absolute_win32_path"), "{msg}");
    assert!(msg.contains("parent.vhdx"), "{msg}");

    // Another image at the parent's path: its DataWriteGuid is not the linkage.
    qemu_img(&["create", "-q", "-f", "vhdx", s(&parent), "6M"]);
    let err = open_disk(&child, &opts).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::Backing, "{err}");
    assert!(err.to_string().contains("DataWriteGuid"), "{err}");
}

// ---------------------------------------------------------------- log replay

/// CRC-32C with the 4 bytes at `at` taken as zero.
fn crc_with_hole(b: &[u8], at: usize) -> u32 {
    let mut c = b.to_vec();
    c[at..at + 4].fill(0);
    crc32c::crc32c(&c)
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact_at(&mut b, off).unwrap();
    b
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(data, off).unwrap();
}

/// Apply `f` to both headers and fix their checksums.
fn patch_headers(path: &Path, f: impl Fn(&mut [u8])) {
    for off in [64 << 10, 128 << 10] {
        let mut h = read_at(path, off, 4096);
        f(&mut h);
        let crc = crc_with_hole(&h, 4);
        h[4..8].copy_from_slice(&crc.to_le_bytes());
        write_at(path, off, &h);
    }
}

/// (BAT offset, metadata offset) from the first region table.
fn regions(path: &Path) -> (u64, u64) {
    let t = read_at(path, 192 << 10, 16 + 32 * 2);
    let mut out = (0, 0);
    for i in 0..2 {
        let e = &t[16 + 32 * i..48 + 32 * i];
        let off = u64::from_le_bytes(e[16..24].try_into().unwrap());
        if e[..4] == [0x66, 0x77, 0xc2, 0x2d] {
            out.0 = off;
        } else {
            out.1 = off;
        }
    }
    out
}

/// One log entry ([MS-VHDX] 2.3.1) at log offset 0 with data descriptors writing
/// whole 4 KiB `sectors` at their file offsets.
fn log_entry(seq: u64, guid: &[u8; 16], sectors: &[(u64, Vec<u8>)], file_size: u64) -> Vec<u8> {
    let n = sectors.len() as u64;
    let desc_sectors = (64 + 32 * n).div_ceil(4096);
    let len = (desc_sectors + n) * 4096;
    let mut b = vec![0u8; len as usize];
    b[0..4].copy_from_slice(b"loge");
    b[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    b[12..16].copy_from_slice(&0u32.to_le_bytes()); // tail: this entry
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    b[24..28].copy_from_slice(&(n as u32).to_le_bytes());
    b[32..48].copy_from_slice(guid);
    b[48..56].copy_from_slice(&file_size.to_le_bytes());
    b[56..64].copy_from_slice(&file_size.to_le_bytes());
    for (i, (off, data)) in sectors.iter().enumerate() {
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        b[d + 16..d + 24].copy_from_slice(&off.to_le_bytes());
        b[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        let s = ((desc_sectors + i as u64) * 4096) as usize;
        b[s..s + 4].copy_from_slice(b"data");
        b[s + 4..s + 8].copy_from_slice(&((seq >> 32) as u32).to_le_bytes());
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        b[s + 4092..s + 4096].copy_from_slice(&(seq as u32).to_le_bytes());
    }
    let crc = crc_with_hole(&b, 4);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A qemu-made image plus a pending log entry that (1) rewrites a data sector of block
/// 0 and (2) rewrites the BAT so that block 2 reads as zero. Returns the expected
/// guest content after replay and the byte offset of the entry's first data sector.
fn image_with_pending_log(img: &Path, d: &Path) -> Vec<u8> {
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", "block_size=1M", s(img), "4M"]);
    qemu_io("vhdx", img, &["write -P 0x11 0 1M", "write -P 0x22 2M 1M"]);
    let mut expected = common::qemu_raw(img, d);
    let (bat, _) = regions(img);
    let bat_sector = read_at(img, bat, 4096);
    let block0 = (u64::from_le_bytes(bat_sector[0..8].try_into().unwrap()) >> 20) << 20;
    // New content of guest bytes [8192, 12288).
    let sector: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    expected[8192..12288].copy_from_slice(&sector);
    // Block 2 becomes PAYLOAD_BLOCK_ZERO (state 2, offset 0).
    let mut new_bat = bat_sector.clone();
    new_bat[16..24].copy_from_slice(&2u64.to_le_bytes());
    expected[2 * MIB as usize..3 * MIB as usize].fill(0);
    let guid: [u8; 16] = *b"tern-log-guid-01";
    let size = std::fs::metadata(img).unwrap().len();
    let entry = log_entry(7, &guid, &[(block0 + 8192, sector), (bat, new_bat)], size);
    // The log sits where the header says (1 MiB for qemu images).
    let h = read_at(img, 64 << 10, 4096);
    let log_offset = u64::from_le_bytes(h[72..80].try_into().unwrap());
    write_at(img, log_offset, &entry);
    patch_headers(img, |h| h[48..64].copy_from_slice(&guid));
    expected
}

#[test]
fn pending_log_is_refused_read_only_and_replayed_writable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("log.vhdx");
    let expected = image_with_pending_log(&img, d);

    let err = open_disk(&img, &OpenOptions::read_only()).err().expect("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("has a pending log; open it writable to replay it"), "{err}");

    let disk = open_disk(&img, &OpenOptions { writable: true, ..OpenOptions::default() }).unwrap();
    assert_eq!(tern_raw(disk.as_ref()), expected);
    let info = disk.info().unwrap();
    assert!(info.details.iter().any(|(k, v)| k == "log" && v == "replayed 1 entries"), "{:?}", info.details);
    drop(disk);

    // The log is cleared: read-only opens work, and qemu agrees on the content.
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    assert_eq!(tern_raw(disk.as_ref()), expected);
    assert_qemu_check_clean(&img);
    assert_eq!(common::qemu_raw(&img, d), expected);
    common::assert_map_like_qemu(&img);
}

#[test]
fn corrupt_log_entry_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("log.vhdx");
    let before = {
        qemu_img(&["create", "-q", "-f", "vhdx", "-o", "block_size=1M", s(&img), "4M"]);
        qemu_io("vhdx", &img, &["write -P 0x11 0 1M", "write -P 0x22 2M 1M"]);
        let b = common::qemu_raw(&img, d);
        std::fs::remove_file(&img).unwrap();
        b
    };
    image_with_pending_log(&img, d);
    // Flip one byte of the entry's first data sector: its checksum no longer matches,
    // so the log holds no valid sequence and nothing is replayed ([MS-VHDX] 2.3.3).
    let h = read_at(&img, 64 << 10, 4096);
    let log_offset = u64::from_le_bytes(h[72..80].try_into().unwrap());
    let mut b = read_at(&img, log_offset + 4096 + 100, 1);
    b[0] ^= 0xff;
    write_at(&img, log_offset + 4096 + 100, &b);
    for writable in [false, true] {
        let disk = open_disk(&img, &OpenOptions { writable, ..OpenOptions::default() }).unwrap();
        assert_eq!(tern_raw(disk.as_ref()), before);
    }
}

// ---------------------------------------------------------------- malformed images

fn small_image(d: &Path, name: &str) -> PathBuf {
    let img = d.join(name);
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", "block_size=1M", s(&img), "8M"]);
    qemu_io("vhdx", &img, &["write -P 0x11 0 2M"]);
    img
}

fn open_vhdx(p: &Path) -> tern_disk::Result<Box<dyn tern_disk::Disk>> {
    open_disk(p, &OpenOptions { format: Some(Format::Vhdx), ..OpenOptions::default() })
}

fn assert_refused(p: &Path, kind: ErrorKind, words: &str) {
    let err = open_vhdx(p).err().unwrap_or_else(|| panic!("{} opened", p.display()));
    assert_eq!(err.kind(), kind, "{err}");
    assert!(err.to_string().contains(words), "{err} (wanted {words:?})");
}

/// Rewrite both region tables with `entries` (guid bytes, offset, length, flags).
fn write_region_tables(p: &Path, entries: &[([u8; 16], u64, u32, u32)]) {
    let mut t = vec![0u8; 64 << 10];
    t[0..4].copy_from_slice(b"regi");
    t[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
    for (i, (g, off, len, flags)) in entries.iter().enumerate() {
        let e = 16 + 32 * i;
        t[e..e + 16].copy_from_slice(g);
        t[e + 16..e + 24].copy_from_slice(&off.to_le_bytes());
        t[e + 24..e + 28].copy_from_slice(&len.to_le_bytes());
        t[e + 28..e + 32].copy_from_slice(&flags.to_le_bytes());
    }
    let crc = crc_with_hole(&t, 4);
    t[4..8].copy_from_slice(&crc.to_le_bytes());
    write_at(p, 192 << 10, &t);
    write_at(p, 256 << 10, &t);
}

/// Overwrite the metadata item `guid_prefix` (first 4 bytes of its GUID) with `value`.
fn patch_metadata_item(p: &Path, guid_prefix: [u8; 4], value: &[u8]) {
    let (_, md) = regions(p);
    let t = read_at(p, md, 64 << 10);
    let count = u16::from_le_bytes([t[10], t[11]]) as usize;
    for i in 0..count {
        let e = 32 + 32 * i;
        if t[e..e + 4] == guid_prefix {
            let off = u32::from_le_bytes(t[e + 16..e + 20].try_into().unwrap()) as u64;
            write_at(p, md + off, value);
            return;
        }
    }
    panic!("no such metadata item");
}

#[test]
fn malformed_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file_params = [0x37, 0x67, 0xa1, 0xca];
    let disk_size = [0x24, 0x42, 0xa5, 0x2f];

    let p = small_image(d, "trunc.vhdx");
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100 << 10).unwrap();
    assert_refused(&p, ErrorKind::Corrupt, "truncated");

    let p = small_image(d, "trunc2.vhdx");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - MIB).unwrap();
    assert_refused(&p, ErrorKind::Corrupt, "past the end of the file");

    let p = small_image(d, "sig.vhdx");
    write_at(&p, 0, b"vhdxfilX");
    assert_refused(&p, ErrorKind::Corrupt, "not a VHDX file");

    let p = small_image(d, "headers.vhdx");
    write_at(&p, (64 << 10) + 200, &[1]);
    assert!(open_vhdx(&p).is_ok(), "one bad header: the other one is used");
    write_at(&p, (128 << 10) + 200, &[1]);
    assert_refused(&p, ErrorKind::Corrupt, "both VHDX headers are invalid");

    let p = small_image(d, "regions.vhdx");
    write_at(&p, (192 << 10) + 1000, &[1]);
    assert!(open_vhdx(&p).is_ok(), "one bad region table: the other copy is used");
    write_at(&p, (256 << 10) + 1000, &[1]);
    assert_refused(&p, ErrorKind::Corrupt, "both region tables are invalid");

    let p = small_image(d, "nobat.vhdx");
    let (_, md) = regions(&p);
    let md_guid =
        [0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e];
    write_region_tables(&p, &[(md_guid, md, MIB as u32, 0)]);
    assert_refused(&p, ErrorKind::Corrupt, "no BAT region");
    write_region_tables(&p, &[(md_guid, md, MIB as u32, 0), ([9; 16], 40 * MIB, MIB as u32, 1)]);
    assert_refused(&p, ErrorKind::Unsupported, "required region");

    for (name, bs) in [("bs3m", 3 * MIB as u32), ("bs512m", 512 * MIB as u32), ("bs512k", 512 << 10)] {
        let p = small_image(d, &format!("{name}.vhdx"));
        let mut v = bs.to_le_bytes().to_vec();
        v.extend_from_slice(&0u32.to_le_bytes());
        patch_metadata_item(&p, file_params, &v);
        assert_refused(&p, ErrorKind::Corrupt, "BlockSize");
    }
    for (name, size) in [("size0", 0u64), ("size-absurd", 1 << 50), ("size-odd", 1000)] {
        let p = small_image(d, &format!("{name}.vhdx"));
        patch_metadata_item(&p, disk_size, &size.to_le_bytes());
        assert_refused(&p, ErrorKind::Corrupt, "VirtualDiskSize");
    }

    let p = small_image(d, "bat-eof.vhdx");
    let (bat, _) = regions(&p);
    write_at(&p, bat, &((1000u64 << 20) | 6).to_le_bytes());
    assert_refused(&p, ErrorKind::Corrupt, "past the end of the file");
    write_at(&p, bat, &6u64.to_le_bytes());
    assert_refused(&p, ErrorKind::Corrupt, "overlaps the header section");
    write_at(&p, bat, &((bat >> 20 << 20) | 6).to_le_bytes());
    assert_refused(&p, ErrorKind::Corrupt, "overlaps the BAT region");
    write_at(&p, bat, &5u64.to_le_bytes());
    assert_refused(&p, ErrorKind::Corrupt, "state 5");
    write_at(&p, bat, &7u64.to_le_bytes());
    assert_refused(&p, ErrorKind::Corrupt, "PARTIALLY_PRESENT");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random damage anywhere in the metadata never panics: every open, read and map
    /// either works or returns an error.
    #[test]
    fn random_damage_never_panics(flips in prop::collection::vec((0u64..(4 * MIB), any::<u8>()), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let p = small_image(dir.path(), "x.vhdx");
        for (off, b) in flips {
            // Keep the identifier so the VHDX parser (not raw) sees it.
            write_at(&p, off.max(8), &[b]);
        }
        for writable in [false, true] {
            if let Ok(disk) = open_disk(&p, &OpenOptions { writable, ..OpenOptions::default() }) {
                let _ = disk.info();
                // Damage may claim terabytes; reading the start is enough to exercise it.
                let size = disk.virtual_size().min(64 << 20);
                let mut buf = vec![0u8; 1 << 20];
                let mut off = 0;
                while off < size {
                    let n = (size - off).min(buf.len() as u64) as usize;
                    let _ = disk.read_at(&mut buf[..n], off);
                    off += n as u64;
                }
                let _ = tern_disk::collect_map(disk.as_ref());
            }
        }
    }
}

#[test]
fn logical_sector_size_4096_is_read() {
    // No Debian tool writes 4096-byte-sector VHDX; with fewer blocks than one chunk
    // the layout is the same, so patching the item gives a valid one.
    let dir = tempfile::tempdir().unwrap();
    let p = small_image(dir.path(), "4k.vhdx");
    let before = common::qemu_raw(&p, dir.path());
    patch_metadata_item(&p, [0x1d, 0xbf, 0x41, 0x81], &4096u32.to_le_bytes());
    let disk = open_vhdx(&p).unwrap();
    assert_eq!(disk.info().unwrap().logical_sector_size, 4096);
    assert_eq!(tern_raw(disk.as_ref()), before);
}

/// Conversion into a dynamic VHDX copies from several threads, which share only the
/// block allocation: writes racing into the same new block (2 MiB pieces over 1 MiB
/// blocks, data runs that start and end mid-block) still give an image qemu-img checks
/// clean and finds equal to the source, with no block allocated twice.
#[test]
fn concurrent_conversion_into_vhdx_allocates_each_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 96 * MIB;
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data_blocks = std::collections::BTreeSet::new();
    for i in 0..60u64 {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (state >> 20) % (size - 3 * MIB) / 512 * 512 + i % 3 * 17 * 512;
        let len = 4096 + (state >> 8) % (3 * MIB / 2);
        let len = len.min(size - off);
        let buf: Vec<u8> = (0..len).map(|b| (b as u8) ^ (i as u8) | 1).collect();
        f.write_all_at(&buf, off).unwrap();
        for b in off / MIB..=(off + len - 1) / MIB {
            data_blocks.insert(b);
        }
    }
    drop(f);
    let disk = open_disk(&src, &OpenOptions::read_only()).unwrap();
    let out = dir.path().join("out.vhdx");
    let options = tern_disk::ConvertOptions {
        format: tern_disk::CreateFormat::Vhdx { block_size: MIB },
        virtual_size: None,
        progress: None,
        sync: false,
    };
    tern_disk::convert(disk.as_ref(), &out, &options).unwrap();
    assert_qemu_check_clean(&out);
    assert_qemu_compare_equal(&src, "raw", &out, "vhdx");
    // Every data block once: the file holds the metadata (4 MiB: headers, log,
    // metadata, BAT) and one block per block the source has data in, no more.
    let len = std::fs::metadata(&out).unwrap().len();
    assert_eq!(len, 4 * MIB + data_blocks.len() as u64 * MIB, "blocks allocated twice or lost");
}
