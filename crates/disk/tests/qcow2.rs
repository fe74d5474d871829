//! qcow2 reading and writing, with qemu-img and qemu-io as the oracle.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_map_like_qemu, assert_reads_like_qemu, qemu_img, qemu_info, qemu_io, qemu_map, tern_raw,
};
use proptest::prelude::*;
use tern_disk::{
    collect_map, create_disk, open_disk, CreateFormat, CreateOptions, Disk, ErrorKind, Format, MapKind,
    OpenOptions,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f qcow2 -o OPTS PATH SIZE`
fn create(dir: &Path, name: &str, opts: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let size = size.to_string();
    args.extend([s(&p), size.as_str()]);
    qemu_img(&args);
    p
}

fn with_backing() -> OpenOptions {
    OpenOptions { allow_backing: true, ..OpenOptions::default() }
}

/// A pattern of writes that touches the first and last cluster, a run crossing an L2
/// table boundary for small clusters, isolated clusters, and a partial last cluster.
fn write_patterns(img: &Path, size: u64, cluster: u64) {
    let last = size - 1000;
    qemu_io(
        "qcow2",
        img,
        &[
            "write -P 0x11 0 4k",
            &format!("write -P 0x22 {} 300k", cluster * 3 + 512),
            &format!("write -P 0x33 {} 3k", size / 2),
            &format!("write -P 0x44 {last} 1000"),
            &format!("write -P 0x55 {} {}", 2 * MIB, 2 * MIB + 512),
        ],
    );
}

#[test]
fn qemu_images_v2_and_v3_all_cluster_sizes_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        for cluster in [4 * KIB, 64 * KIB, 2 * MIB] {
            // Not a multiple of the cluster size (qemu rounds to 512 bytes).
            let size = 9 * MIB + 3 * 512;
            let name = format!("c{compat}-{cluster}.qcow2");
            let img = create(dir.path(), &name, &format!("compat={compat},cluster_size={cluster}"), size);
            write_patterns(&img, size, cluster);
            // Zeroing: v3 writes zero clusters, v2 deallocates or writes zeros.
            qemu_io("qcow2", &img, &[&format!("write -z {} {}", 2 * MIB + 64 * KIB, (4 * cluster).min(MIB))]);
            assert_reads_like_qemu(&img, dir.path());
            assert_map_like_qemu(&img);
            let info = common::open(&img).info().unwrap();
            assert_eq!(info.subformat, if compat == "1.1" { "v3" } else { "v2" });
            assert_eq!(info.cluster_size, Some(cluster));
            assert_eq!(info.virtual_size, size);
            assert!(info.details.contains(&("compat".to_string(), compat.to_string())), "{:?}", info.details);
        }
    }
}

#[test]
fn zero_clusters_map_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "z.qcow2", "cluster_size=65536", 16 * MIB);
    qemu_io("qcow2", &img, &["write -P 0x7e 0 8M", "write -z 1M 2M", "write -z -u 5M 1M"]);
    assert_reads_like_qemu(&img, dir.path());
    assert_map_like_qemu(&img);
    let disk = common::open(&img);
    let m = disk.mapping(MIB, 8 * MIB).unwrap();
    assert_eq!((m.start, m.length, m.kind), (MIB, 2 * MIB, MapKind::Zero), "one run for the zero range");
    let m = disk.mapping(5 * MIB, 8 * MIB).unwrap();
    assert_eq!((m.length, m.kind), (MIB, MapKind::Zero), "zero with unmap");
    let m = disk.mapping(8 * MIB, 8 * MIB).unwrap();
    assert_eq!((m.length, m.kind), (8 * MIB, MapKind::Unallocated));
}

#[test]
fn compressed_images_deflate_and_zstd_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    std::fs::File::create(&raw).unwrap().set_len(6 * MIB + 512).unwrap();
    // Compressible patterns, incompressible bytes (stored uncompressed by qemu), holes.
    let mut noise = vec![0u8; 300 * KIB as usize];
    let mut x = 0x1234_5678u32;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut content = std::fs::read(&raw).unwrap();
    content[..noise.len()].copy_from_slice(&noise);
    for (i, b) in content[MIB as usize..3 * MIB as usize].iter_mut().enumerate() {
        *b = (i / 100) as u8;
    }
    let tail = content.len() - 700;
    content[tail..].fill(0x99);
    std::fs::write(&raw, &content).unwrap();
    for (name, opts) in [
        ("deflate", "cluster_size=65536"),
        ("zstd", "compression_type=zstd,cluster_size=4096"),
        ("v2", "compat=0.10"),
    ] {
        let img = dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", opts, s(&raw), s(&img)]);
        assert_reads_like_qemu(&img, dir.path());
        assert_map_like_qemu(&img);
        assert_eq!(tern_raw(common::open(&img).as_ref()), content, "{name}");
        let info = common::open(&img).info().unwrap();
        let want = if name == "zstd" { "zstd" } else { "zlib" };
        assert!(info.details.contains(&("compression type".into(), want.into())), "{:?}", info.details);
    }
}

#[test]
fn empty_sparse_and_full_images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let zero = create(dir.path(), "zero.qcow2", "", 0);
    let d = common::open(&zero);
    assert_eq!(d.virtual_size(), 0);
    assert!(collect_map(d.as_ref()).unwrap().is_empty());
    d.read_at(&mut [], 0).unwrap();

    let empty = create(dir.path(), "empty.qcow2", "", 16 * MIB);
    assert_reads_like_qemu(&empty, dir.path());
    assert_map_like_qemu(&empty);
    let m = common::open(&empty).mapping(0, u64::MAX).unwrap();
    assert_eq!((m.length, m.kind), (16 * MIB, MapKind::Unallocated), "one run for a whole empty disk");

    let sparse = create(dir.path(), "sparse.qcow2", "cluster_size=4096", 16 * MIB);
    let cmds: Vec<String> = (0..40).map(|i| format!("write -P {} {} 4k", i + 1, i * 400_384)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", &sparse, &cmds);
    assert_reads_like_qemu(&sparse, dir.path());
    assert_map_like_qemu(&sparse);

    let full = create(dir.path(), "full.qcow2", "cluster_size=65536", 8 * MIB + 512);
    qemu_io("qcow2", &full, &["write -P 0xa5 0 8M", "write -P 0x5a 8M 512"]);
    assert_reads_like_qemu(&full, dir.path());
    assert_map_like_qemu(&full);
    let m = common::open(&full).mapping(0, u64::MAX).unwrap();
    assert_eq!((m.length, m.kind), (8 * MIB + 512, MapKind::Data));
}

/// Compare a large image with qemu-img's raw conversion piece by piece, so that
/// neither copy has to fit in memory.
fn assert_large_reads_like_qemu(img: &Path, disk: &dyn Disk, dir: &Path) {
    let raw = dir.join("large.oracle.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&raw)]);
    let oracle = tern_disk::open_disk(&raw, &OpenOptions::read_only()).unwrap();
    assert_eq!(oracle.virtual_size(), disk.virtual_size());
    let (mut a, mut b) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut off = 0;
    while off < disk.virtual_size() {
        let n = (disk.virtual_size() - off).min(a.len() as u64) as usize;
        disk.read_at(&mut a[..n], off).unwrap();
        oracle.read_at(&mut b[..n], off).unwrap();
        // Slice comparison is a memcmp even in debug builds; find the byte only on failure.
        if a[..n] != b[..n] {
            let i = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap();
            panic!("{}: differs from qemu-img at offset {}", img.display(), off + i as u64);
        }
        off += n as u64;
    }
    std::fs::remove_file(raw).unwrap();
}

#[test]
fn virtual_size_above_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "big.qcow2", "", 5 * GIB + 512);
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x41 4095M 2M", "write -P 0x42 4608M 64k", &format!("write -P 0x43 {} 512", 5 * GIB)],
    );
    let disk = common::open(&img);
    assert_large_reads_like_qemu(&img, disk.as_ref(), dir.path());
    assert_map_like_qemu(&img);
    let mut buf = [0u8; 512];
    disk.read_at(&mut buf, 5 * GIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x43));
}

/// `collect_map` of `disk` agrees with `qemu-img map` of `img` (which follows backing
/// files) on what is data.
fn assert_map_matches(disk: &dyn Disk, img: &Path) {
    let ours = collect_map(disk).unwrap();
    let theirs = qemu_map(img);
    let data_of =
        |off: u64| ours.iter().find(|m| m.start <= off && off < m.end()).unwrap().kind == MapKind::Data;
    for (start, len, data, _) in theirs {
        // Boundaries may differ; check both ends of every qemu run.
        for off in [start, start + len - 1] {
            assert_eq!(
                data_of(off),
                data,
                "{}: at {off} qemu says data={data}; tern map {ours:?}",
                img.display()
            );
        }
    }
}

#[test]
fn backing_chain_reads_like_qemu_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "cluster_size=65536", 8 * MIB);
    qemu_io("qcow2", &base, &["write -P 0xb0 0 8M"]);
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&mid), "12M"]);
    qemu_io("qcow2", &mid, &["write -P 0xc1 1M 1M", "write -z 3M 1M"]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", s(&mid), "-F", "qcow2", s(&top), "16M"]);
    qemu_io("qcow2", &top, &["write -P 0xd2 1536K 64k", "write -P 0xd3 10M 64k", "write -P 0xd4 14M 64k"]);

    let disk = open_disk(&top, &with_backing()).unwrap();
    let ours = tern_raw(disk.as_ref());
    assert_eq!(ours, common::qemu_raw(&top, dir.path()));
    assert_map_matches(disk.as_ref(), &top);
    // Past the base's 8 MiB and the middle's 12 MiB the guest reads zeros.
    let m = disk.mapping(12 * MIB, 2 * MIB).unwrap();
    assert!(m.kind.reads_as_zero(), "{m:?}");
    let info = disk.info().unwrap();
    let b = info.backing.unwrap();
    assert_eq!((b.name.as_str(), b.format.as_deref()), (s(&mid), Some("qcow2")));
    assert!(b.opened.is_some());

    // Not allowed: the image still opens and names its backing file, and unallocated
    // ranges are unallocated.
    let alone = common::open(&top);
    let b = alone.info().unwrap().backing.unwrap();
    assert_eq!(b.opened, None);
    assert_eq!(b.name, s(&mid));
    assert_eq!(alone.mapping(0, 16 * MIB).unwrap().kind, MapKind::Unallocated);
    let mut buf = vec![1u8; 4096];
    alone.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let err = tern_disk::convert(
        alone.as_ref(),
        &dir.path().join("out.raw"),
        &tern_disk::ConvertOptions {
            format: CreateFormat::Raw,
            virtual_size: None,
            progress: None,
            sync: true,
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backing);
}

#[test]
fn extended_l2_subclusters_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = create(dir.path(), "base.qcow2", "", 4 * MIB);
    qemu_io("qcow2", &base, &["write -P 0x0b 0 4M"]);
    let img = dir.path().join("x.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=65536",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&img),
        "4M",
    ]);
    qemu_io("qcow2", &img, &["write -P 0x1e 2k 3k", "write -z 64k 4k", "write -P 0x2e 1M 130k"]);
    let disk = open_disk(&img, &with_backing()).unwrap();
    assert_eq!(tern_raw(disk.as_ref()), common::qemu_raw(&img, dir.path()));
    assert_map_matches(disk.as_ref(), &img);
    let alone = common::open(&img);
    assert_eq!(
        alone.mapping(0, MIB).unwrap(),
        tern_disk::Mapping { start: 0, length: 2 * KIB, kind: MapKind::Unallocated }
    );
    assert_eq!(alone.mapping(2 * KIB, MIB).unwrap().kind, MapKind::Data);
    assert_eq!(alone.mapping(64 * KIB, MIB).unwrap().kind, MapKind::Zero);
}

#[test]
fn dfvfs_fixtures_read_like_qemu() {
    let src = common::testdata("dfvfs");
    let dir = tempfile::tempdir().unwrap();
    for name in ["ext2.qcow2", "windows_volume.qcow2"] {
        let img = dir.path().join(name);
        std::fs::copy(src.join(name), &img).unwrap();
        assert_reads_like_qemu(&img, dir.path());
        assert_map_like_qemu(&img);
    }
}

// ---------------------------------------------------------------- writer

fn write_qcow2(path: &Path, size: u64, cluster: u64, writes: &[(u64, Vec<u8>)]) {
    let mut w = create_disk(
        path,
        &CreateOptions { format: CreateFormat::Qcow2 { cluster_size: cluster }, virtual_size: size },
    )
    .unwrap();
    for (off, data) in writes {
        w.write_at(data, *off).unwrap();
    }
    w.finish().unwrap();
}

/// qemu-img check finds nothing, compare against the reference is equal, and info
/// says what we wrote.
fn assert_qemu_accepts(img: &Path, reference: &[u8], size: u64, cluster: u64, dir: &Path) {
    let check =
        std::process::Command::new("qemu-img").args(["check", "--output=json", s(img)]).output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "qemu-img check {}: {out}\n{}",
        img.display(),
        String::from_utf8_lossy(&check.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v.get(key).and_then(|x| x.as_u64()).unwrap_or(0), 0, "{key} in {out}");
    }
    let raw = dir.join("reference.raw");
    std::fs::write(&raw, reference).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(img)]);
    let info = qemu_info(img);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(info["format-specific"]["data"]["corrupt"], false);
    assert_eq!(info["virtual-size"].as_u64(), Some(size));
    assert_eq!(info["cluster-size"].as_u64(), Some(cluster));
    // And tern reads back what it wrote.
    assert_eq!(tern_raw(common::open(img).as_ref()), reference);
}

fn apply(reference: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (off, data) in writes {
        reference[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

#[test]
fn writer_patterns_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [(512, 3 * MIB + 512), (65536, 10 * MIB + 1536), (2 * MIB, 13 * MIB + 512)] {
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![0x11; 4096]),
            (cluster / 2 + 7, vec![0x22; (3 * cluster) as usize]),
            (2 * MIB - 100, vec![0x33; 300]),
            (size - 777, vec![0x44; 777]),
            (MIB, vec![0; 2 * cluster as usize]), // zeros into unallocated: stays a hole
            (10, vec![0; 20]),                    // zeros over data
            (size / 2, (0..200_000u32).map(|i| (i % 253) as u8).collect()),
        ];
        let img = dir.path().join(format!("w{cluster}.qcow2"));
        write_qcow2(&img, size, cluster, &writes);
        let mut reference = vec![0u8; size as usize];
        apply(&mut reference, &writes);
        assert_qemu_accepts(&img, &reference, size, cluster, dir.path());
        assert_map_like_qemu(&img);
    }
}

#[test]
fn writer_with_many_l2_tables_evicts_and_reloads() {
    // 512-byte clusters: one L2 table maps 32 KiB, so writes every 48 KiB over 256 MiB
    // touch more tables than the cache holds (16 MiB of tables, 4096 at most), and the
    // second pass reloads them.
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let img = dir.path().join("many.qcow2");
    let mut writes = Vec::new();
    let mut off = 0;
    while off + 2048 <= size {
        writes.push((off, vec![(off >> 15) as u8 | 1; 1000]));
        off += 48 * KIB;
    }
    let mut off = 24 * KIB;
    while off + 2048 <= size {
        writes.push((off, vec![0xee; 700]));
        off += 3 * 48 * KIB + 512;
    }
    writes.push((5, vec![0x77; 10])); // back to the first table, long evicted
    write_qcow2(&img, size, 512, &writes);
    let mut reference = vec![0u8; size as usize];
    apply(&mut reference, &writes);
    assert_qemu_accepts(&img, &reference, size, 512, dir.path());
}

#[test]
fn writer_refuses_bad_cluster_sizes_and_out_of_range_writes() {
    let dir = tempfile::tempdir().unwrap();
    for bad in [0u64, 256, 3000, 4 * MIB] {
        let e = create_disk(
            &dir.path().join(format!("b{bad}")),
            &CreateOptions { format: CreateFormat::Qcow2 { cluster_size: bad }, virtual_size: MIB },
        )
        .err()
        .unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    }
    let mut w = create_disk(
        &dir.path().join("ok.qcow2"),
        &CreateOptions { format: CreateFormat::Qcow2 { cluster_size: 65536 }, virtual_size: MIB },
    )
    .unwrap();
    assert_eq!(w.write_at(&[1; 10], MIB - 5).unwrap_err().kind(), ErrorKind::InvalidInput);
    // An unfinished image is flagged, not silently valid: qemu refuses it (no refcount
    // table yet) and tern reports the corrupt bit.
    drop(w);
    let unfinished = dir.path().join("ok.qcow2");
    let out = std::process::Command::new("qemu-img").args(["info", s(&unfinished)]).output().unwrap();
    assert!(!out.status.success());
    let info = common::open(&unfinished).info().unwrap();
    assert!(info.details.contains(&("corrupt".into(), "true".into())), "{:?}", info.details);
}

#[test]
fn tern_converts_qcow2_to_qcow2_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = create(dir.path(), "src.qcow2", "cluster_size=4096", 20 * MIB);
    write_patterns(&src, 20 * MIB, 4096);
    let out = dir.path().join("out.qcow2");
    let disk = common::open(&src);
    tern_disk::convert(
        disk.as_ref(),
        &out,
        &tern_disk::ConvertOptions {
            format: CreateFormat::Qcow2 { cluster_size: 65536 },
            virtual_size: None,
            progress: None,
            sync: true,
        },
    )
    .unwrap();
    qemu_img(&["compare", s(&src), s(&out)]);
    qemu_img(&["check", s(&out)]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn writer_random_writes_read_back_through_tern_and_qemu(
        cluster_bits in prop_oneof![Just(9u32), Just(12), Just(16)],
        sectors in 1u64..3000,
        writes in proptest::collection::vec((0u64..1_600_000, 1usize..70_000, any::<u8>()), 0..24),
    ) {
        let cluster = 1u64 << cluster_bits;
        let size = sectors * 512;
        let writes: Vec<(u64, Vec<u8>)> = writes
            .into_iter()
            .filter_map(|(off, len, v)| {
                let off = off % size;
                let len = (len as u64).min(size - off) as usize;
                (len > 0).then(|| (off, vec![v; len]))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.qcow2");
        write_qcow2(&img, size, cluster, &writes);
        let mut reference = vec![0u8; size as usize];
        apply(&mut reference, &writes);
        assert_qemu_accepts(&img, &reference, size, cluster, dir.path());
    }
}

// ---------------------------------------------------------------- malformed images

/// A small v3 image with data, made by qemu-img, as bytes to patch.
fn sample(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = create(dir, "sample.qcow2", "cluster_size=65536", 4 * MIB);
    qemu_io("qcow2", &img, &["write -P 0x61 0 256k", "write -P 0x62 3M 64k"]);
    let bytes = std::fs::read(&img).unwrap();
    (img, bytes)
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Write `bytes` patched by `f` to a new file and open it as qcow2 (forced, so a bad
/// magic is not taken for raw), reading and mapping everything if it opens.
fn open_patched(dir: &Path, name: &str, bytes: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> tern_disk::Error {
    let mut b = bytes.to_vec();
    f(&mut b);
    let p = dir.join(name);
    std::fs::write(&p, &b).unwrap();
    let opts = OpenOptions { format: Some(Format::Qcow2), ..OpenOptions::default() };
    let disk = match open_disk(&p, &opts) {
        Err(e) => return e,
        Ok(d) => d,
    };
    if let Err(e) = collect_map(disk.as_ref()) {
        return e;
    }
    let mut buf = vec![0u8; disk.virtual_size() as usize];
    disk.read_at(&mut buf, 0).expect_err(&format!("{name}: expected an error"))
}

fn expect(e: tern_disk::Error, kind: ErrorKind, words: &[&str]) {
    assert_eq!(e.kind(), kind, "{e}");
    let text = e.to_string();
    for w in words {
        assert!(text.contains(w), "{text:?} should mention {w:?}");
    }
}

#[test]
fn malformed_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, img) = sample(d);
    let cluster = 65536u64;
    let l1_offset = be64(&img, 40) as usize;
    let l2_offset = (be64(&img, l1_offset) & 0x00ff_ffff_ffff_fe00) as usize;
    let past_eof = (img.len() as u64).next_multiple_of(cluster) + 16 * cluster;

    expect(open_patched(d, "trunc", &img, |b| b.truncate(50)), ErrorKind::Corrupt, &["truncated"]);
    expect(
        open_patched(d, "trunc2", &img, |b| b.truncate(l2_offset + 100)),
        ErrorKind::Corrupt,
        &["past the end"],
    );
    expect(open_patched(d, "magic", &img, |b| b[0] = b'X'), ErrorKind::Corrupt, &["magic"]);
    expect(
        open_patched(d, "v1", &img, |b| b[4..8].copy_from_slice(&1u32.to_be_bytes())),
        ErrorKind::Unsupported,
        &["version 1"],
    );
    expect(
        open_patched(d, "v4", &img, |b| b[4..8].copy_from_slice(&4u32.to_be_bytes())),
        ErrorKind::Unsupported,
        &["version 4"],
    );
    expect(
        open_patched(d, "cb8", &img, |b| b[20..24].copy_from_slice(&8u32.to_be_bytes())),
        ErrorKind::Corrupt,
        &["cluster_bits 8"],
    );
    expect(
        open_patched(d, "cb22", &img, |b| b[20..24].copy_from_slice(&22u32.to_be_bytes())),
        ErrorKind::Unsupported,
        &["cluster_bits 22"],
    );
    expect(
        open_patched(d, "size", &img, |b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
        ErrorKind::Corrupt,
        &["virtual size"],
    );
    expect(
        open_patched(d, "size2", &img, |b| b[24..32].copy_from_slice(&(1u64 << 60).to_be_bytes())),
        ErrorKind::Corrupt,
        &["virtual size"],
    );
    expect(
        open_patched(d, "l1", &img, |b| b[40..48].copy_from_slice(&past_eof.to_be_bytes())),
        ErrorKind::Corrupt,
        &["L1 table", "past the end"],
    );
    expect(
        open_patched(d, "l1hdr", &img, |b| b[40..48].copy_from_slice(&0u64.to_be_bytes())),
        ErrorKind::Corrupt,
        &["L1 table", "header"],
    );
    expect(
        open_patched(d, "l2eof", &img, |b| {
            b[l2_offset..l2_offset + 8].copy_from_slice(&(past_eof | 1 << 63).to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["L2 entry", "past the end"],
    );
    expect(
        open_patched(d, "l2hdr", &img, |b| {
            b[l2_offset + 8..l2_offset + 16].copy_from_slice(&(1u64 << 63).to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["L2 entry", "header"],
    );
    expect(
        open_patched(d, "l2align", &img, |b| {
            let e = be64(b, l2_offset) + 512;
            b[l2_offset..l2_offset + 8].copy_from_slice(&e.to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["aligned"],
    );
    expect(
        open_patched(d, "l1eof", &img, |b| {
            b[l1_offset..l1_offset + 8].copy_from_slice(&(past_eof | 1 << 63).to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["L2 table", "past the end"],
    );
    expect(
        open_patched(d, "compressed", &img, |b| {
            b[l2_offset..l2_offset + 8].copy_from_slice(&(1u64 << 62 | past_eof).to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["compressed", "past the end"],
    );
    expect(
        open_patched(d, "badzip", &img, |b| {
            // Point a compressed descriptor at uncompressed pattern bytes.
            let data = be64(b, l2_offset) & 0x00ff_ffff_ffff_fe00;
            b[l2_offset..l2_offset + 8].copy_from_slice(&(1u64 << 62 | 3u64 << 54 | data).to_be_bytes())
        }),
        ErrorKind::Corrupt,
        &["decompress"],
    );
    expect(
        open_patched(d, "feature", &img, |b| b[79] |= 1 << 5),
        ErrorKind::Unsupported,
        &["incompatible feature bit 5"],
    );
    expect(
        open_patched(d, "datafile", &img, |b| b[79] |= 1 << 2),
        ErrorKind::Unsupported,
        &["external data file"],
    );
    expect(open_patched(d, "crypt", &img, |b| b[35] = 2), ErrorKind::Unsupported, &["encrypted"]);
    expect(
        open_patched(d, "backing", &img, |b| {
            b[8..16].copy_from_slice(&512u64.to_be_bytes());
            b[16..20].copy_from_slice(&5000u32.to_be_bytes());
        }),
        ErrorKind::Corrupt,
        &["backing file name length 5000"],
    );
    expect(
        open_patched(d, "hdrlen", &img, |b| b[100..104].copy_from_slice(&101u32.to_be_bytes())),
        ErrorKind::Corrupt,
        &["header_length"],
    );
    expect(
        open_patched(d, "ext", &img, |b| {
            let at = 112; // qemu's header length: extensions follow
            b[at + 4..at + 8].copy_from_slice(&u32::MAX.to_be_bytes());
        }),
        ErrorKind::Corrupt,
        &["header extension"],
    );
}

#[test]
fn backing_chain_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = create(dir.path(), "b.qcow2", "", MIB);
    let a = dir.path().join("a.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    qemu_img(&["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", s(&b)]);
    let e = open_disk(&a, &with_backing()).err().unwrap();
    expect(e, ErrorKind::Backing, &["loops"]);
    // Without backing it opens and names its backing file.
    let info = common::open(&a).info().unwrap();
    assert_eq!(info.backing.unwrap().name, "b.qcow2");
    // A missing backing file is a Backing error naming it.
    std::fs::remove_file(&b).unwrap();
    expect(open_disk(&a, &with_backing()).err().unwrap(), ErrorKind::Backing, &["b.qcow2"]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random byte patches anywhere in the metadata never panic: opening, mapping and
    /// reading either work or fail with an error.
    #[test]
    fn patched_metadata_never_panics(
        patches in proptest::collection::vec((0usize..3, 0usize..512, any::<u8>()), 1..8),
    ) {
        static IMG: std::sync::OnceLock<(tempfile::TempDir, Vec<u8>, [usize; 3])> = std::sync::OnceLock::new();
        let (dir, img, regions) = IMG.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let (_, bytes) = sample(dir.path());
            // Patch the header, the start of the L1 table and the start of the first L2 table.
            let l1 = be64(&bytes, 40) as usize;
            let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
            (dir, bytes, [0, l1, l2])
        });
        let mut b = img.clone();
        for (region, at, v) in patches {
            let at = regions[region] + if region == 1 { at % 16 } else { at };
            b[at] = v;
        }
        let p = dir.path().join(format!("fuzz-{}.qcow2", std::process::id()));
        std::fs::write(&p, &b).unwrap();
        let opts = OpenOptions { format: Some(Format::Qcow2), ..OpenOptions::default() };
        if let Ok(disk) = open_disk(&p, &opts) {
            let size = disk.virtual_size().min(64 * MIB);
            if size > 0 {
                let _ = collect_map(disk.as_ref());
                let mut buf = vec![0u8; size as usize];
                let _ = disk.read_at(&mut buf, 0);
            }
        }
    }
}

#[test]
fn dirty_and_corrupt_images_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bytes) = sample(dir.path());
    let reference = tern_raw(common::open(&img).as_ref());
    for (bit, name) in [(0u8, "dirty"), (1, "corrupt")] {
        let mut b = bytes.clone();
        b[79] |= 1 << bit;
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, &b).unwrap();
        let disk = common::open(&p);
        assert_eq!(tern_raw(disk.as_ref()), reference, "{name}");
        let details = disk.info().unwrap().details;
        assert!(details.contains(&(name.to_string(), "true".to_string())), "{details:?}");
    }
}

#[test]
fn concurrent_reads_from_many_threads_agree() {
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB clusters: 2 MiB per L2 table, so 64 MiB needs more tables than fit in a
    // small working set and threads race on the cache.
    let img = create(dir.path(), "mt.qcow2", "cluster_size=4096", 64 * MIB);
    let cmds: Vec<String> =
        (0..64).map(|i| format!("write -P {} {} 900k", i + 1, i * MIB + 4096 * (i % 7))).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", &img, &cmds);
    let expected = common::qemu_raw(&img, dir.path());
    let disk = common::open(&img);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (disk, expected) = (&disk, &expected);
            scope.spawn(move || {
                let mut buf = vec![0u8; 300 * KIB as usize + 17];
                let mut off = t * 4099;
                while off + buf.len() as u64 <= 64 * MIB {
                    disk.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf[..] == expected[off as usize..off as usize + buf.len()],
                        "thread {t} at {off}"
                    );
                    off += 997 * KIB + t;
                }
            });
        }
    });
}

#[test]
fn writer_empty_and_zero_sized_images_pass_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    for size in [0u64, 512, 5 * GIB] {
        let img = dir.path().join(format!("e{size}.qcow2"));
        write_qcow2(&img, size, 65536, &[]);
        qemu_img(&["check", s(&img)]);
        let info = qemu_info(&img);
        assert_eq!(info["virtual-size"].as_u64(), Some(size));
        let disk = common::open(&img);
        assert_eq!(disk.virtual_size(), size);
        if size > 0 {
            assert_eq!(disk.mapping(0, u64::MAX).unwrap().kind, MapKind::Unallocated);
        }
    }
}

/// Regression (found by the conformance suite): one write spanning data, an all-zero
/// cluster, then data. The zero cluster is skipped without allocating, so the next new
/// cluster is adjacent on the host but not in the buffer; the writer used to merge the
/// two pieces into one pwrite and shift the second piece back by a cluster.
#[test]
fn write_with_a_zero_cluster_in_the_middle_keeps_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = 4096u64;
    let mut buf = vec![0u8; 3 * cluster as usize];
    buf[..cluster as usize].fill(0x11);
    buf[2 * cluster as usize + 100..].fill(0x22);
    let writes = vec![(0, buf)];
    let img = dir.path().join("gap.qcow2");
    write_qcow2(&img, MIB, cluster, &writes);
    let mut reference = vec![0u8; MIB as usize];
    apply(&mut reference, &writes);
    assert_qemu_accepts(&img, &reference, MIB, cluster, dir.path());
}
