//! Persistent dirty bitmaps of qcow2 images, with QEMU as the peer: qemu-img adds,
//! merges and clears bitmaps, qemu-io writes through them (it loads the enabled
//! persistent bitmaps, records its writes and stores them back on close), and tern's
//! extents must be exactly those writes rounded out to each bitmap's granularity.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{qemu_img, qemu_info, qemu_io};
use tern_disk::{qcow2_bitmap_extents, qcow2_bitmaps, ErrorKind, StoredBitmap};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f qcow2 [-o cluster_size=N]` of `size` bytes.
fn create(dir: &Path, name: &str, cluster: Option<u64>, size: u64) -> PathBuf {
    let p = dir.join(name);
    let opts = cluster.map(|c| format!("cluster_size={c}"));
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(o) = &opts {
        args.extend(["-o", o.as_str()]);
    }
    args.extend([s(&p), size.as_str()]);
    qemu_img(&args);
    p
}

/// `qemu-img bitmap --add [--granularity G] [--disable] IMG NAME`
fn add(img: &Path, name: &str, granularity: Option<u64>, enabled: bool) {
    let g = granularity.map(|g| g.to_string());
    let mut args = vec!["bitmap", "--add"];
    if let Some(g) = &g {
        args.extend(["--granularity", g.as_str()]);
    }
    if !enabled {
        args.push("--disable");
    }
    args.extend([s(img), name]);
    qemu_img(&args);
}

/// qemu-io writes of (offset, length), each a distinct pattern; returns them.
fn write(img: &Path, writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let cmds: Vec<String> =
        writes.iter().enumerate().map(|(i, (o, l))| format!("write -P {} {o} {l}", 0x10 + i)).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io("qcow2", img, &cmds);
    writes.to_vec()
}

/// The truth: `writes` rounded out to `granularity`, clipped to `size`, sorted, merged.
fn rounded(writes: &[(u64, u64)], granularity: u64, size: u64) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = writes
        .iter()
        .map(|&(o, l)| (o / granularity * granularity)..(o + l).next_multiple_of(granularity).min(size))
        .collect();
    r.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for x in r {
        match out.last_mut() {
            Some(last) if last.end >= x.start => last.end = last.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

fn extents(img: &Path, name: &str) -> Vec<Range<u64>> {
    qcow2_bitmap_extents(img, name).unwrap_or_else(|e| panic!("bitmap {name}: {e}"))
}

/// tern's listing must be QEMU's (`qemu-img info`: names, granularity, flags, order).
fn assert_lists_like_qemu(img: &Path) -> Vec<StoredBitmap> {
    let ours = qcow2_bitmaps(img).unwrap();
    let info = qemu_info(img);
    let theirs: Vec<StoredBitmap> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| {
                    let flags: Vec<&str> =
                        b["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
                    StoredBitmap {
                        name: b["name"].as_str().unwrap().to_string(),
                        granularity: b["granularity"].as_u64().unwrap(),
                        in_use: flags.contains(&"in-use"),
                        auto: flags.contains(&"auto"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ours, theirs, "{}: bitmaps differ from qemu-img info", img.display());
    ours
}

#[test]
fn enabled_bitmaps_hold_qemu_io_writes_rounded_to_their_granularity() {
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of any granularity but 512: the last bit of each bitmap is partial.
    let size = 100 * MIB + 3 * 512;
    let img = create(dir.path(), "a.qcow2", None, size);
    assert!(qcow2_bitmaps(&img).unwrap().is_empty());
    add(&img, "g64k", None, true);
    add(&img, "g512", Some(512), true);
    add(&img, "g1m", Some(MIB), true);
    add(&img, "off", Some(4 * KIB), false);
    let listed = assert_lists_like_qemu(&img);
    assert_eq!(
        listed.iter().map(|b| (b.name.as_str(), b.granularity, b.auto)).collect::<Vec<_>>(),
        [("g64k", 64 * KIB, true), ("g512", 512, true), ("g1m", MIB, true), ("off", 4 * KIB, false),]
    );
    // Untouched bitmaps are empty.
    for b in &listed {
        assert_eq!(extents(&img, &b.name), vec![], "{}", b.name);
    }

    let mut writes = write(
        &img,
        &[
            (1000, 3000),           // unaligned, inside one 64 KiB bit
            (64 * KIB - 100, 200),  // across a 64 KiB boundary
            (5 * MIB + 7, 2 * MIB), // unaligned, many bits
            (size - 700, 700),      // the partial last bit
            (37 * MIB, 512),        // one sector
            (37 * MIB + 1024, 512), // a gap of one 512-byte bit
        ],
    );
    let check = |writes: &[(u64, u64)]| {
        for (name, g) in [("g64k", 64 * KIB), ("g512", 512), ("g1m", MIB)] {
            assert_eq!(extents(&img, name), rounded(writes, g, size), "bitmap {name}");
        }
        assert_eq!(extents(&img, "off"), vec![], "a disabled bitmap records nothing");
    };
    check(&writes);
    assert_eq!(extents(&img, "g1m").last().unwrap().end, size, "clipped to the virtual size");

    // A second qemu-io run adds to what the first stored.
    writes.extend(write(&img, &[(99 * MIB, 64 * KIB + 1), (0, 1)]));
    check(&writes);
    assert_lists_like_qemu(&img);

    // Merge a bitmap into the disabled one: it then holds g512's bits at 4 KiB.
    qemu_img(&["bitmap", "--merge", "g512", s(&img), "off"]);
    assert_eq!(extents(&img, "off"), rounded(&writes, 4 * KIB, size));
    // Clear one; enable another: the flags follow.
    qemu_img(&["bitmap", "--clear", s(&img), "g64k"]);
    assert_eq!(extents(&img, "g64k"), vec![]);
    qemu_img(&["bitmap", "--enable", s(&img), "off"]);
    qemu_img(&["bitmap", "--disable", s(&img), "g1m"]);
    let listed = assert_lists_like_qemu(&img);
    assert!(listed.iter().find(|b| b.name == "off").unwrap().auto);
    assert!(!listed.iter().find(|b| b.name == "g1m").unwrap().auto);
    assert_eq!(extents(&img, "g1m"), rounded(&writes, MIB, size), "disabling keeps the content");

    let e = qcow2_bitmap_extents(&img, "nope").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("\"nope\"") && e.to_string().contains("\"g512\""), "{e}");
}

#[test]
fn small_clusters_spread_a_bitmap_over_many_table_entries() {
    // 512-byte clusters: one data cluster holds 4096 bits, 2 MiB at 512-byte granularity,
    // so a 300 MiB disk needs 150 table entries (more than one cluster of table).
    let dir = tempfile::tempdir().unwrap();
    let size = 300 * MIB;
    let img = create(dir.path(), "small.qcow2", Some(512), size);
    add(&img, "fine", Some(512), true);
    add(&img, "coarse", Some(128 * KIB), true);
    let mut w = Vec::new();
    for i in 0..40u64 {
        w.push((i * 7 * MIB + i * 4097, 3000 + i * 100));
    }
    w.push((2 * MIB - 512, 1024)); // across a data cluster boundary
    w.push((size - 512, 512));
    let writes = write(&img, &w);
    assert_eq!(extents(&img, "fine"), rounded(&writes, 512, size));
    assert_eq!(extents(&img, "coarse"), rounded(&writes, 128 * KIB, size));
    assert_lists_like_qemu(&img);
}

#[test]
fn a_large_sparse_disk_reads_only_its_few_dirty_bits() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * GIB;
    let img = create(dir.path(), "big.qcow2", None, size);
    add(&img, "g64k", None, true);
    add(&img, "g512", Some(512), true);
    let mut writes = write(&img, &[(0, 4096), (17 * GIB + 123, 70 * KIB), (size - 4096, 4096)]);
    // Zero writes are writes too (and cost no data): a long run across many bitmap clusters.
    qemu_io("qcow2", &img, &[&format!("write -z {} {}", 40 * GIB, 600 * MIB)]);
    writes.push((40 * GIB, 600 * MIB));
    for (name, g) in [("g64k", 64 * KIB), ("g512", 512)] {
        assert_eq!(extents(&img, name), rounded(&writes, g, size), "bitmap {name}");
    }
    assert_lists_like_qemu(&img);
}

/// Poll `qemu-img info -U` until QEMU has marked every bitmap of `img` in use.
fn wait_in_use(img: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = qemu_img(&["info", "-U", "--output=json", s(img)]);
        if out.contains("in-use") {
            return;
        }
        assert!(Instant::now() < deadline, "qemu-io never marked the bitmaps in use: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_bitmap_left_in_use_by_a_killed_qemu_is_listed_but_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = create(dir.path(), "a.qcow2", None, size);
    add(&img, "b", None, true);
    add(&img, "idle", None, false);
    write(&img, &[(MIB, 4096)]);
    // qemu-io opens the image writable, marks the bitmaps in use, writes, and is killed
    // before it can store them back.
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 8M 64k", "-c", "sleep 60000", s(&img)])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_in_use(&img);
    child.kill().unwrap();
    child.wait().unwrap();

    let listed = qcow2_bitmaps(&img).unwrap();
    assert!(listed.iter().all(|b| b.in_use), "{listed:?}");
    assert_lists_like_qemu(&img);
    let e = qcow2_bitmap_extents(&img, "b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("\"b\"") && e.to_string().contains("in use"), "{e}");
}

#[test]
fn bitmaps_marked_inconsistent_by_the_autoclear_bit_are_ignored_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", None, 64 * MIB);
    add(&img, "b", None, true);
    write(&img, &[(0, 512)]);
    let mut bytes = std::fs::read(&img).unwrap();
    common::qcow2_bitmap_layout(&bytes);
    // autoclear_features is bytes 88-95; bit 0 is its last byte's lowest bit.
    bytes[95] &= !1;
    let copy = dir.path().join("cleared.qcow2");
    std::fs::write(&copy, &bytes).unwrap();
    assert_eq!(qcow2_bitmaps(&copy).unwrap(), vec![]);
    let e = qcow2_bitmap_extents(&copy, "b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("inconsistent"), "{e}");
    // QEMU lists none either.
    let info = qemu_img(&["info", "-U", "--output=json", s(&copy)]);
    assert!(!info.contains("\"bitmaps\""), "{info}");
}

/// QEMU stores clean clusters of bitmap data as table entries of 0 and reads an entry of
/// 1 as a cluster of all ones; no QEMU command writes one, so it is patched in.
#[test]
fn a_table_entry_of_one_is_a_cluster_of_all_ones() {
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB clusters at 512-byte granularity: one table entry covers 16 MiB.
    let size = 40 * MIB;
    let img = create(dir.path(), "a.qcow2", Some(4 * KIB), size);
    add(&img, "b", Some(512), true);
    let writes = write(&img, &[(20 * MIB, 4096), (33 * MIB, 512)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let layout = common::qcow2_bitmap_layout(&bytes);
    let (_, table, table_size) = layout.entries[0];
    assert_eq!(table_size, 3);
    let mut patch = |index: u64, value: u64| {
        let at = (table + index * 8) as usize;
        bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    };
    // The first cluster (clean) becomes all ones; so does the last, which is partial.
    patch(0, 1);
    patch(2, 1);
    let copy = dir.path().join("ones.qcow2");
    std::fs::write(&copy, &bytes).unwrap();
    let mut want = rounded(&[(0, 16 * MIB)], 512, size);
    want.extend(rounded(&writes[..1], 512, size));
    want.push(32 * MIB..size);
    assert_eq!(extents(&copy, "b"), want);
}

#[test]
fn bitmaps_written_by_qemu_7_2_read_the_same() {
    let Some(old) = common::old_qemu::old_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * GIB + 512;
    let img = dir.path().join("old.qcow2");
    old.img(&["create", "-q", "-f", "qcow2", s(&img), &size.to_string()]);
    old.img(&["bitmap", "--add", s(&img), "b"]);
    old.img(&["bitmap", "--add", "--granularity", "4096", s(&img), "fine"]);
    old.img(&["bitmap", "--add", "--disable", s(&img), "off"]);
    let writes = [(123, 456), (GIB - 10, 20), (size - 512, 512)];
    let mut c = Command::new(&old.qemu_io);
    c.args(["-f", "qcow2"]);
    for (o, l) in writes {
        c.args(["-c", &format!("write {o} {l}")]);
    }
    common::run(c.arg(&img));
    assert_eq!(extents(&img, "b"), rounded(&writes, 64 * KIB, size));
    assert_eq!(extents(&img, "fine"), rounded(&writes, 4096, size));
    assert_eq!(extents(&img, "off"), vec![]);
    assert_lists_like_qemu(&img);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]

    /// Random writes on a disk of random size (whole sectors) with a random cluster size
    /// and granularity: the extents are the writes rounded out, whatever the shape.
    #[test]
    fn random_writes_are_the_extents_of_every_enabled_bitmap(
        cluster_bits in 9u32..17,
        granularity_bits in 9u32..21,
        sectors in 1u64..40_000,
        writes in proptest::collection::vec((0u64..20 * MIB, 1u64..300 * KIB), 0..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let size = sectors * 512;
        let img = create(dir.path(), "p.qcow2", Some(1 << cluster_bits), size);
        add(&img, "b", Some(1 << granularity_bits), true);
        add(&img, "fine", Some(512), true);
        let writes: Vec<(u64, u64)> = writes
            .into_iter()
            .map(|(o, l)| (o % size, l))
            .map(|(o, l)| (o, l.min(size - o)))
            .collect();
        if !writes.is_empty() {
            write(&img, &writes);
        }
        proptest::prop_assert_eq!(extents(&img, "b"), rounded(&writes, 1 << granularity_bits, size));
        proptest::prop_assert_eq!(extents(&img, "fine"), rounded(&writes, 512, size));
    }
}

/// Extra data in a directory entry is allowed by the specification (QEMU refuses any):
/// the bitmap is listed, and read only when `extra_data_compatible` (flag bit 2) says
/// it may be used. Patched in by moving the name behind 8 bytes of extra data.
#[test]
fn extra_data_is_skipped_and_honours_extra_data_compatible() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "a.qcow2", None, 64 * MIB);
    add(&img, "b", None, true);
    let writes = write(&img, &[(3 * MIB, 1)]);
    let good = std::fs::read(&img).unwrap();
    let l = common::qcow2_bitmap_layout(&good);
    let e = l.entries[0].0 as usize;
    assert_eq!(l.dir_size, 32, "one entry: 24 bytes, the name \"b\", padding");
    let with_extra = |flags: u32| {
        let mut b = good.clone();
        // The directory may end the file: the longer entry lengthens it.
        b.resize(b.len().max(e + 40), 0);
        b[e + 12..e + 16].copy_from_slice(&flags.to_be_bytes());
        b[e + 20..e + 24].copy_from_slice(&8u32.to_be_bytes());
        b[e + 24..e + 32].copy_from_slice(b"extra\0\0\0");
        b[e + 32..e + 40].copy_from_slice(b"b\0\0\0\0\0\0\0");
        b[l.ext_at + 16..l.ext_at + 24].copy_from_slice(&40u64.to_be_bytes());
        let p = dir.path().join(format!("extra-{flags}.qcow2"));
        std::fs::write(&p, b).unwrap();
        p
    };
    let auto = 1 << 1;
    let refused = with_extra(auto);
    let listed = qcow2_bitmaps(&refused).unwrap();
    assert_eq!(
        listed,
        vec![StoredBitmap { name: "b".into(), granularity: 64 * KIB, in_use: false, auto: true }]
    );
    let err = qcow2_bitmap_extents(&refused, "b").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("extra_data_compatible"), "{err}");
    let usable = with_extra(auto | 1 << 2);
    assert_eq!(extents(&usable, "b"), rounded(&writes, 64 * KIB, 64 * MIB));
}
