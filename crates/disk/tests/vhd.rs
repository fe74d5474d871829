//! VHD: reading images made by qemu-img and Windows, differencing chains, writing, and
//! malformed images, with qemu-img as the oracle.
//!
//! qemu only probes VHDs by the footer copy at offset 0, so a *fixed* VHD is "raw" to
//! qemu-img unless told `-f vpc`; the helpers here always say `-f vpc`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_reads_like_qemu, qemu_img, qemu_info, run, testdata};
use proptest::prelude::*;
use tern_disk::{
    collect_map, convert, create_disk, open_disk, ConvertOptions, CreateFormat, CreateOptions, Disk,
    ErrorKind, Format, MapKind, OpenOptions,
};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn open(path: &Path) -> Box<dyn Disk> {
    open_disk(path, &OpenOptions::read_only()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_err(path: &Path, allow_backing: bool) -> tern_disk::Error {
    // Forced to VHD: with both cookies broken, detection would say raw.
    match open_disk(path, &OpenOptions { allow_backing, format: Some(Format::Vhd), ..OpenOptions::default() })
    {
        Ok(_) => panic!("{} opened but should have been refused", path.display()),
        Err(e) => e,
    }
}

/// Assert tern's map says Data exactly where qemu-img's says there is stored non-zero
/// data. For dynamic disks that is qemu's `data` flag; for fixed disks qemu says
/// `data: true` everywhere and marks file holes `zero: true`, which tern maps `Zero`.
fn assert_map_like_qemu(path: &Path) {
    compare_map_with_qemu(path, true);
}

/// Like [`assert_map_like_qemu`], for images whose sector bitmaps are partly set: QEMU
/// ignores bitmaps and calls a whole allocated block data, tern maps the sectors
/// whose bits are clear `Unallocated`. So tern's data must lie inside qemu's, and
/// what qemu calls unallocated must be unallocated for tern.
fn assert_map_within_qemu(path: &Path) {
    compare_map_with_qemu(path, false);
}

fn compare_map_with_qemu(path: &Path, exact: bool) {
    let disk = open(path);
    let fixed = disk.info().unwrap().subformat == "fixed";
    let ours = collect_map(disk.as_ref()).unwrap();
    let theirs = common::qemu_map(path);
    let (mut i, mut j, mut off) = (0, 0, 0u64);
    while i < ours.len() && j < theirs.len() {
        let o = ours[i];
        let (ts, tl, tdata, tzero) = theirs[j];
        let their_data = if fixed { !tzero } else { tdata };
        assert!(
            if exact {
                (o.kind == MapKind::Data) == their_data
            } else {
                o.kind != MapKind::Data || their_data
            },
            "{}: at offset {off} tern says {:?}, qemu-img says data={tdata} zero={tzero}",
            path.display(),
            o.kind
        );
        if !fixed && !tdata {
            assert_eq!(o.kind, MapKind::Unallocated, "{}: at {off}", path.display());
        }
        off = o.end().min(ts + tl);
        if off == o.end() {
            i += 1;
        }
        if off == ts + tl {
            j += 1;
        }
    }
    assert_eq!(off, disk.virtual_size(), "{}: maps do not cover the disk", path.display());
}

fn qemu_virtual_size(path: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-f", "vpc", "--output=json", s(path)])).unwrap();
    assert_eq!(v["format"], "vpc");
    v["virtual-size"].as_u64().unwrap()
}

fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    common::qemu_io(fmt, path, cmds);
}

/// (offset, length, pattern byte)
type RawWrite = (u64, u64, u8);

/// A raw file of `size` bytes with `writes` applied.
fn make_raw(path: &Path, size: u64, writes: &[RawWrite]) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    let cmds: Vec<String> = writes.iter().map(|(o, l, p)| format!("write -P {p} {o} {l}")).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    if !cmds.is_empty() {
        qemu_io("raw", path, &cmds);
    }
}

#[test]
fn qemu_created_images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let writes = ["write -P 0x11 0 4k", "write -P 0x22 3M 1M", "write -P 0x33 9000k 17k"];
    for (name, opts) in [
        ("dyn.vhd", vec![]),
        ("dyn-force.vhd", vec!["-o", "force_size=on"]),
        ("fixed.vhd", vec!["-o", "subformat=fixed"]),
        ("fixed-force.vhd", vec!["-o", "subformat=fixed,force_size=on"]),
    ] {
        let img = dir.path().join(name);
        let mut args = vec!["create", "-q", "-f", "vpc"];
        args.extend(&opts);
        args.extend([s(&img), "10M"]);
        qemu_img(&args);
        qemu_io("vpc", &img, &writes);
        let disk = open(&img);
        assert_eq!(disk.virtual_size(), qemu_virtual_size(&img), "{name}");
        if name.contains("force") {
            assert_eq!(disk.virtual_size(), 10 * MIB, "{name}: force_size keeps the exact size");
        }
        let info = disk.info().unwrap();
        assert_eq!(info.subformat, if name.starts_with("fixed") { "fixed" } else { "dynamic" });
        assert_reads_like_qemu(&img, dir.path());
        assert_map_like_qemu(&img);
    }
}

#[test]
fn images_converted_by_qemu_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, u64, Vec<RawWrite>)> = vec![
        (
            "sparse",
            32 * MIB,
            vec![(MIB, 64 << 10, 1), (20 * MIB + 512, 3 * MIB, 2), (32 * MIB - 4096, 4096, 3)],
        ),
        ("full", 6 * MIB, vec![(0, 6 * MIB, 0x5a)]),
        ("empty", 8 * MIB, vec![]),
        ("odd", 5 * MIB + 3 * 512, vec![(5 * MIB, 1536, 7), (0, 512, 8)]),
    ];
    for (name, size, writes) in cases {
        let raw = dir.path().join(format!("{name}.raw"));
        make_raw(&raw, size, &writes);
        for (suffix, opts) in
            [("dyn", None), ("fixed", Some("subformat=fixed")), ("force", Some("force_size=on"))]
        {
            let img = dir.path().join(format!("{name}-{suffix}.vhd"));
            let mut args = vec!["convert", "-f", "raw", "-O", "vpc"];
            if let Some(o) = opts {
                args.extend(["-o", o]);
            }
            args.extend([s(&raw), s(&img)]);
            qemu_img(&args);
            assert_reads_like_qemu(&img, dir.path());
            assert_map_like_qemu(&img);
        }
    }
}

#[test]
fn large_sparse_image_with_data_past_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    let size = 4 * 1024 * MIB + 6 * MIB;
    make_raw(&raw, size, &[(4096, 4096, 1), (4 * 1024 * MIB + MIB, 2 * MIB + 512, 2), (size - 512, 512, 3)]);
    let img = dir.path().join("big.vhd");
    qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", "force_size=on", s(&raw), s(&img)]);
    let disk = open(&img);
    assert_eq!(disk.virtual_size(), size);
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 4 * 1024 * MIB + MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
    assert_reads_like_qemu(&img, dir.path());
    assert_map_like_qemu(&img);
}

#[test]
fn dfvfs_ext2_reads_like_qemu() {
    let data = testdata("dfvfs");
    let dir = tempfile::tempdir().unwrap();
    let img = data.join("ext2.vhd");
    assert_reads_like_qemu(&img, dir.path());
    assert_map_like_qemu(&img);
    let info = open(&img).info().unwrap();
    let detail = |k: &str| info.details.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    assert!(detail("creator").starts_with("qemu"), "{:?}", info.details);
    assert!(detail("size from").contains("CHS"), "{:?}", info.details);
    assert_eq!(info.virtual_size, 4212736);
}

#[test]
fn dfvfs_windows_differencing_disk_without_its_parent() {
    let data = testdata("dfvfs");
    let img = data.join("fat-differential.vhd");
    let disk = open(&img);
    let info = disk.info().unwrap();
    assert_eq!(info.subformat, "differencing");
    assert_eq!(info.cluster_size, Some(2 * MIB));
    assert_eq!(info.virtual_size, 4 * MIB);
    let backing = info.backing.expect("a differencing disk names its parent");
    assert!(backing.opened.is_none());
    assert!(
        backing.locators.iter().any(|l| l == r"C:\Projects\dfvfs\test_data\fat-parent.vhd"),
        "{:?}",
        backing.locators
    );
    assert!(backing.locators.iter().any(|l| l == r".\fat-parent.vhd"), "{:?}", backing.locators);
    // Absent sectors read as zero without the parent; present ones are mapped data.
    let map = collect_map(disk.as_ref()).unwrap();
    assert!(map.iter().any(|m| m.kind == MapKind::Data), "{map:?}");
    assert!(map.iter().any(|m| m.kind == MapKind::Unallocated), "{map:?}");
    // The bitmap of block 0 marks sector 134 present and sector 133 absent.
    let mut sector = vec![0u8; 512];
    disk.read_at(&mut sector, 133 * 512).unwrap();
    assert!(sector.iter().all(|&b| b == 0));
    let m = disk.mapping(134 * 512, 512).unwrap();
    assert_eq!(m.kind, MapKind::Data);
    // qemu opens it as a plain dynamic disk (no parent support), and its data sits
    // exactly under the set bits, so both read the same bytes.
    let tmp = tempfile::tempdir().unwrap();
    assert_reads_like_qemu(&img, tmp.path());

    let err = open_err(&img, true);
    assert_eq!(err.kind(), ErrorKind::Backing, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("parent not found"), "{msg}");
    assert!(msg.contains(r"C:\Projects\dfvfs\test_data\fat-parent.vhd"), "{msg}");
    assert!(msg.contains(r".\fat-parent.vhd"), "{msg}");
}

#[test]
fn dfvfs_images_with_bad_checksums_are_refused() {
    let data = testdata("dfvfs");
    let err = open_err(&data.join("image.vhd"), false);
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let msg = err.to_string();
    assert!(msg.contains("checksum") && msg.contains("stored 0x") && msg.contains("computed 0x"), "{msg}");
    for allow in [false, true] {
        let err = open_err(&data.join("image-differential.vhd"), allow);
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("footer") && err.to_string().contains("checksum"), "{err}");
    }
}

// ---------------------------------------------------------------------------------
// Hand-assembled images, independent of tern's writer: footer, header, BAT, locators
// and blocks laid out here from the specification.

fn vhd_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)))
}

/// A footer: creator "win " (sized by current size), geometry for `size`.
fn footer_bytes(size: u64, disk_type: u32, unique_id: [u8; 16]) -> [u8; 512] {
    let mut f = [0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset: u64 = if disk_type == 2 { u64::MAX } else { 512 };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[28..32].copy_from_slice(b"win ");
    f[32..36].copy_from_slice(&0x000a_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..60].copy_from_slice(&[0, 100, 16, 63]);
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&unique_id);
    let sum = vhd_checksum(&f);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

struct Assembled {
    size: u64,
    block_size: u32,
    disk_type: u32,
    unique_id: [u8; 16],
    parent_id: [u8; 16],
    /// (block index, bitmap, data of block_size bytes)
    blocks: Vec<(u32, Vec<u8>, Vec<u8>)>,
    /// (platform code, data)
    locators: Vec<([u8; 4], Vec<u8>)>,
}

impl Assembled {
    fn new(size: u64, block_size: u32, disk_type: u32) -> Self {
        Assembled {
            size,
            block_size,
            disk_type,
            unique_id: [0x42; 16],
            parent_id: [0; 16],
            blocks: Vec::new(),
            locators: Vec::new(),
        }
    }

    fn bitmap_size(&self) -> usize {
        ((self.block_size as usize / 512).div_ceil(8)).div_ceil(512) * 512
    }

    /// Layout: footer copy 0, header 512, BAT 1536, locator data, blocks, footer.
    fn build(&self) -> Vec<u8> {
        let entries = self.size.div_ceil(u64::from(self.block_size)) as usize;
        let bat_len = (entries * 4).div_ceil(512) * 512;
        let mut out = vec![0u8; 1536 + bat_len];
        let footer = footer_bytes(self.size, self.disk_type, self.unique_id);
        out[..512].copy_from_slice(&footer);
        let mut header = [0u8; 1024];
        header[..8].copy_from_slice(b"cxsparse");
        header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        header[16..24].copy_from_slice(&1536u64.to_be_bytes());
        header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
        header[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        header[40..56].copy_from_slice(&self.parent_id);
        for (i, c) in "parent.vhd".encode_utf16().enumerate() {
            header[64 + 2 * i..66 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        for (i, (code, data)) in self.locators.iter().enumerate() {
            let at = out.len() as u64;
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512 + 512 * usize::from(data.is_empty()), 0);
            let e = 576 + 24 * i;
            header[e..e + 4].copy_from_slice(code);
            header[e + 4..e + 8]
                .copy_from_slice(&(data.len().div_ceil(512).max(1) as u32 * 512).to_be_bytes());
            header[e + 8..e + 12].copy_from_slice(&(data.len() as u32).to_be_bytes());
            header[e + 16..e + 24].copy_from_slice(&at.to_be_bytes());
        }
        let sum = vhd_checksum(&header);
        header[36..40].copy_from_slice(&sum.to_be_bytes());
        out[512..1536].copy_from_slice(&header);
        for e in 0..bat_len / 4 {
            out[1536 + 4 * e..1540 + 4 * e].copy_from_slice(&u32::MAX.to_be_bytes());
        }
        for (index, bitmap, data) in &self.blocks {
            let sector = (out.len() / 512) as u32;
            let i = *index as usize;
            out[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&sector.to_be_bytes());
            let mut bm = bitmap.clone();
            bm.resize(self.bitmap_size(), 0);
            out.extend_from_slice(&bm);
            assert_eq!(data.len(), self.block_size as usize);
            out.extend_from_slice(data);
        }
        out.extend_from_slice(&footer);
        out
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Recompute the footer checksums (both copies) and the header checksum of a
/// dynamic image after a field was patched.
fn fix_checksums(b: &mut [u8]) {
    let end = b.len() - 512;
    for at in [0, end] {
        b[at + 64..at + 68].fill(0);
        let sum = vhd_checksum(&b[at..at + 512]);
        b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
    }
    b[512 + 36..512 + 40].fill(0);
    let sum = vhd_checksum(&b[512..1536]);
    b[512 + 36..512 + 40].copy_from_slice(&sum.to_be_bytes());
}

/// A parent made by tern's writer: 8 MiB, every byte of sector n is n % 251 + 1.
fn make_parent(path: &Path) -> Vec<u8> {
    let size = 8 * MIB;
    let content: Vec<u8> = (0..size).map(|i| ((i / 512) % 251 + 1) as u8).collect();
    let mut w =
        create_disk(path, &CreateOptions { format: CreateFormat::VhdDynamic, virtual_size: size }).unwrap();
    w.write_at(&content, 0).unwrap();
    w.finish().unwrap();
    content
}

fn parent_unique_id(path: &Path) -> [u8; 16] {
    let b = std::fs::read(path).unwrap();
    b[b.len() - 512 + 68..b.len() - 512 + 84].try_into().unwrap()
}

/// A differencing child of `parent` with block 1 (of 2 MiB) partly present: sectors
/// 0..8 and 100 are 0xC1; and block 3 wholly present with 0xC3.
fn make_child(dir: &Path, parent_id: [u8; 16], locators: Vec<([u8; 4], Vec<u8>)>) -> (PathBuf, Assembled) {
    let mut a = Assembled::new(8 * MIB, 2 << 20, 4);
    a.parent_id = parent_id;
    a.locators = locators;
    let mut bitmap = vec![0u8; 512];
    bitmap[0] = 0xFF;
    bitmap[100 / 8] |= 0x80 >> (100 % 8);
    let mut data = vec![0xEEu8; 2 << 20]; // bytes under clear bits must not be read
    for sector in (0..8).chain([100]) {
        data[sector * 512..(sector + 1) * 512].fill(0xC1);
    }
    a.blocks.push((1, bitmap, data));
    a.blocks.push((3, vec![0xFF; 512], vec![0xC3; 2 << 20]));
    let path = dir.join("child.vhd");
    std::fs::write(&path, a.build()).unwrap();
    (path, a)
}

fn expected_child(parent: &[u8]) -> Vec<u8> {
    let mut e = parent.to_vec();
    let b1 = 2 * MIB as usize;
    for sector in (0..8).chain([100]) {
        e[b1 + sector * 512..b1 + (sector + 1) * 512].fill(0xC1);
    }
    e[6 * MIB as usize..8 * MIB as usize].fill(0xC3);
    e
}

#[test]
fn differencing_disk_reads_through_to_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent_path = dir.path().join("parent.vhd");
    let parent = make_parent(&parent_path);
    let id = parent_unique_id(&parent_path);
    let locators = vec![
        (*b"W2ku", utf16le(r"D:\vms\parent.vhd")),
        (*b"W2ru", utf16le(r".\parent.vhd")),
        (*b"Mac ", vec![1, 2, 3]),
    ];
    let (child, _) = make_child(dir.path(), id, locators);

    let disk = open_disk(&child, &OpenOptions { allow_backing: true, ..OpenOptions::default() }).unwrap();
    let info = disk.info().unwrap();
    assert_eq!(info.subformat, "differencing");
    let backing = info.backing.unwrap();
    assert_eq!(backing.opened.as_deref().map(|p| p.ends_with("parent.vhd")), Some(true));
    assert_eq!(backing.locators.len(), 3);
    let ours = common::tern_raw(disk.as_ref());
    let expected = expected_child(&parent);
    assert!(
        ours == expected,
        "differencing read differs at {:?}",
        ours.iter().zip(&expected).position(|(a, b)| a != b)
    );
    // Every byte is data: the child's own sectors or the parent's (fully written).
    let map = collect_map(disk.as_ref()).unwrap();
    assert_eq!(map.len(), 1, "{map:?}");
    assert_eq!(map[0].kind, MapKind::Data);

    // Without allow_backing: opens, names the parent, reads absent sectors as zero.
    let alone = open(&child);
    let info = alone.info().unwrap();
    assert!(info.backing.as_ref().unwrap().opened.is_none());
    assert_eq!(info.backing.unwrap().name, r"D:\vms\parent.vhd");
    let bytes = common::tern_raw(alone.as_ref());
    let zero_based = expected_child(&vec![0u8; parent.len()]);
    assert!(bytes == zero_based);
    let map = collect_map(alone.as_ref()).unwrap();
    let data: Vec<(u64, u64)> =
        map.iter().filter(|m| m.kind == MapKind::Data).map(|m| (m.start, m.length)).collect();
    assert_eq!(data, vec![(2 * MIB, 8 * 512), (2 * MIB + 100 * 512, 512), (6 * MIB, 2 * MIB)]);
    // Converting needs the parent.
    let out = dir.path().join("flat.raw");
    let err = convert(
        alone.as_ref(),
        &out,
        &ConvertOptions { format: CreateFormat::Raw, virtual_size: None, progress: None, sync: true },
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backing);
}

#[test]
fn differencing_disk_with_a_wrong_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let parent_path = dir.path().join("parent.vhd");
    make_parent(&parent_path);
    let mut id = parent_unique_id(&parent_path);
    id[0] ^= 0xff;
    let (child, _) = make_child(dir.path(), id, vec![(*b"W2ru", utf16le(r".\parent.vhd"))]);
    let err = open_err(&child, true);
    assert_eq!(err.kind(), ErrorKind::Backing);
    assert!(err.to_string().contains("unique id"), "{err}");
    // Without backing it still opens.
    open(&child);
}

#[test]
fn differencing_disk_with_a_missing_parent_names_every_locator() {
    let dir = tempfile::tempdir().unwrap();
    let locators = vec![
        (*b"W2ku", utf16le(r"D:\vms\gone.vhd")),
        (*b"W2ru", utf16le(r"..\base\gone.vhd")),
        (*b"MacX", b"file://localhost/Users/me/gone.vhd".to_vec()),
    ];
    let (child, _) = make_child(dir.path(), [1; 16], locators);
    let err = open_err(&child, true);
    assert_eq!(err.kind(), ErrorKind::Backing);
    let msg = err.to_string();
    assert!(msg.contains("parent not found"), "{msg}");
    for l in
        [r"D:\vms\gone.vhd", r"..\base\gone.vhd", "file://localhost/Users/me/gone.vhd", "/Users/me/gone.vhd"]
    {
        assert!(msg.contains(l), "{l} missing from: {msg}");
    }
}

// ---------------------------------------------------------------------------------
// Writing.

#[test]
fn tern_written_images_match_their_source_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 10 MiB + 3 sectors: not representable in CHS, so only the current size can
    // carry it; qemu must report it exactly.
    for size in [10 * MIB + 3 * 512, 64 * MIB, 512] {
        let raw = dir.path().join(format!("src-{size}.raw"));
        let mut writes = vec![(0, 512, 9)];
        if size > MIB {
            writes.extend([(MIB + 512, 3 * MIB, 0x77), (size - 1024, 1024, 0x66)]);
        }
        make_raw(&raw, size, &writes);
        let src = open(&raw);
        for (fmt, kind) in [(CreateFormat::VhdDynamic, "dynamic"), (CreateFormat::VhdFixed, "fixed")] {
            let out = dir.path().join(format!("out-{size}-{kind}.vhd"));
            convert(
                src.as_ref(),
                &out,
                &ConvertOptions { format: fmt, virtual_size: None, progress: None, sync: true },
            )
            .unwrap();
            assert_eq!(qemu_virtual_size(&out), size, "{kind} {size}");
            let info = qemu_info(&out);
            if kind == "dynamic" {
                // Dynamic VHDs are probed by qemu without -f.
                assert_eq!(info["format"], "vpc");
                assert_eq!(info["cluster-size"], 2 * MIB);
            }
            // qemu's vpc driver has no check; compare instead (and read the map).
            run(std::process::Command::new("qemu-img").args([
                "compare",
                "-f",
                "raw",
                "-F",
                "vpc",
                s(&raw),
                s(&out),
            ]));
            assert_reads_like_qemu(&out, dir.path());
            // tern's bitmaps mark exactly the sectors written.
            assert_map_within_qemu(&out);
            let ours = open(&out);
            assert_eq!(ours.info().unwrap().subformat, kind);
            assert!(ours
                .info()
                .unwrap()
                .details
                .iter()
                .any(|(k, v)| k == "creator" && v.starts_with("tern")));
            // Sparse: unwritten ranges of a dynamic disk are not allocated.
            if kind == "dynamic" && size == 64 * MIB {
                let len = std::fs::metadata(&out).unwrap().len();
                assert!(len < 16 * MIB, "dynamic output is {len} bytes");
            }
        }
    }
}

#[test]
fn qemu_vpc_has_no_check_so_compare_is_the_oracle() {
    // Documents why the writer tests use `qemu-img compare` instead of `check`.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhd");
    let mut w =
        create_disk(&img, &CreateOptions { format: CreateFormat::VhdDynamic, virtual_size: MIB }).unwrap();
    w.write_at(&[1u8; 512], 0).unwrap();
    w.finish().unwrap();
    let out = std::process::Command::new("qemu-img").args(["check", "-f", "vpc", s(&img)]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not support"), "{out:?}");
}

#[test]
fn azure_output_is_a_fixed_vhd_of_whole_mebibytes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Not a whole MiB (a raw disk is whole sectors).
    let size = 5 * MIB + 12288;
    make_raw(&raw, size, &[(0, 4096, 1), (5 * MIB, 12288, 2)]);
    let src = open(&raw);
    // What `tern disk convert --azure` (= `-O azure`) asks of the library.
    let out_size = size.div_ceil(MIB) * MIB;
    let out = dir.path().join("azure.vhd");
    convert(
        src.as_ref(),
        &out,
        &ConvertOptions {
            format: CreateFormat::VhdFixed,
            virtual_size: Some(out_size),
            progress: None,
            sync: true,
        },
    )
    .unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, out_size + 512);
    assert_eq!(out_size % MIB, 0);
    let f = &bytes[bytes.len() - 512..];
    assert_eq!(&f[..8], b"conectix");
    assert_eq!(u32::from_be_bytes(f[60..64].try_into().unwrap()), 2, "disk type fixed");
    assert_eq!(u64::from_be_bytes(f[48..56].try_into().unwrap()), out_size);
    let mut zeroed = f.to_vec();
    zeroed[64..68].fill(0);
    assert_eq!(u32::from_be_bytes(f[64..68].try_into().unwrap()), vhd_checksum(&zeroed));
    assert_eq!(qemu_virtual_size(&out), out_size);
    run(std::process::Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "vpc", s(&raw), s(&out)]));
}

/// The size at which the CHS geometry of the VHD specification stops growing
/// (65535 cylinders × 16 heads × 255 sectors): about 127.5 GiB.
const CHS_LIMIT: u64 = 65535 * 16 * 255 * 512;

/// What one reader made of one image: its virtual size, and whether the last sector of
/// the source (and of the output, when that is larger) reads back.
fn reader_view(size_of: impl Fn() -> u64, read_ok: impl Fn(&str) -> bool, src: u64, out: u64) -> String {
    let size = size_of();
    let mut reads = vec![format!("read -P 0xa5 {} 512", src - 512)];
    if out > src {
        reads.push(format!("read -P 0 {} 512", out - 512));
    }
    let last =
        if reads.iter().all(|r| read_ok(r)) { "last sector reads back" } else { "LAST SECTOR UNREADABLE" };
    format!("{size} ({last})")
}

fn io_ok(qemu_io: &Path, img: &Path, cmd: &str) -> bool {
    let out =
        std::process::Command::new(qemu_io).args(["-r", "-f", "vpc", "-c", cmd, s(img)]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("failed") && text.contains("read 512/512 bytes")
}

#[test]
fn tern_vhds_have_the_same_size_in_qemu_7_2_and_qemu_10() {
    // QEMU 7.2 (Debian 12) sizes a VHD by its CHS geometry unless its creator is one
    // it knows to store an exact current size; QEMU 10 uses the current size for every
    // creator but Virtual PC's and old QEMU's. A VHD tern writes must be the size tern
    // says to both, fixed, dynamic and Azure, below the CHS limit (where the geometry
    // addresses less than the disk) and above it (where it is the maximum).
    let Some(old) = common::old_qemu::old_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sizes =
        [GIB, 10 * MIB + 3 * 512, 127 * GIB, CHS_LIMIT - 512, CHS_LIMIT, 128 * GIB, 200 * GIB + 7 * 512];
    let mut wrong = Vec::new();
    for size in sizes {
        // Sparse: only the first and last sectors are written.
        let raw = dir.path().join(format!("src-{size}.raw"));
        make_raw(&raw, size, &[(0, 512, 0x5a), (size - 512, 512, 0xa5)]);
        let src = open(&raw);
        for kind in ["fixed", "dynamic", "azure"] {
            let (format, out_size) = match kind {
                "fixed" => (CreateFormat::VhdFixed, size),
                "dynamic" => (CreateFormat::VhdDynamic, size),
                // What `tern disk convert -O azure` asks of the library.
                _ => (CreateFormat::VhdFixed, size.div_ceil(MIB) * MIB),
            };
            let out = dir.path().join(format!("out-{size}-{kind}.vhd"));
            convert(
                src.as_ref(),
                &out,
                &ConvertOptions { format, virtual_size: Some(out_size), progress: None, sync: false },
            )
            .unwrap();
            let tern = open(&out).virtual_size();
            assert_eq!(tern, out_size, "{kind} {size}: tern's own size");
            let expected = format!("{out_size} (last sector reads back)");
            let new = reader_view(
                || qemu_virtual_size(&out),
                |cmd| io_ok(Path::new("qemu-io"), &out, cmd),
                size,
                out_size,
            );
            let seven = reader_view(
                || old.virtual_size("vpc", &out),
                |cmd| io_ok(&old.qemu_io, &out, cmd),
                size,
                out_size,
            );
            if new != expected || seven != expected {
                wrong.push(format!("{kind} VHD of {out_size} bytes: QEMU 10 {new}; QEMU 7.2 {seven}"));
            }
            // Small disks: the whole content, as QEMU 7.2 reads it.
            if size < 2 * GIB && seven == expected {
                old.img(&["compare", "-q", "-f", "raw", "-F", "vpc", s(&raw), s(&out)]);
            }
            std::fs::remove_file(&out).unwrap();
        }
        std::fs::remove_file(&raw).unwrap();
    }
    assert!(wrong.is_empty(), "VHDs tern wrote that QEMU reads at another size:\n{}", wrong.join("\n"));
}

#[derive(Debug, Clone)]
struct Write {
    offset: u64,
    len: usize,
    byte: u8,
}

fn writes(size: u64) -> impl Strategy<Value = Vec<Write>> {
    proptest::collection::vec(
        (0..size, 1usize..(3 << 20), any::<u8>()).prop_map(move |(offset, len, byte)| Write {
            offset,
            len: len.min((size - offset) as usize),
            byte,
        }),
        1..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_read_back_through_tern_and_qemu(
        size_sectors in 1u64..(14 << 11),
        fixed in any::<bool>(),
        ws in writes(7 << 20),
    ) {
        let size = size_sectors * 512;
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.vhd");
        let format = if fixed { CreateFormat::VhdFixed } else { CreateFormat::VhdDynamic };
        let mut w = create_disk(&img, &CreateOptions { format, virtual_size: size }).unwrap();
        let mut model = vec![0u8; size as usize];
        for wr in ws.iter().filter(|w| w.offset < size) {
            let len = wr.len.min((size - wr.offset) as usize);
            let data = vec![wr.byte; len];
            w.write_at(&data, wr.offset).unwrap();
            model[wr.offset as usize..wr.offset as usize + len].copy_from_slice(&data);
        }
        w.finish().unwrap();
        let disk = open(&img);
        prop_assert_eq!(disk.virtual_size(), size);
        prop_assert!(common::tern_raw(disk.as_ref()) == model, "tern reads differ from what was written");
        prop_assert!(common::qemu_raw(&img, dir.path()) == model, "qemu-img reads differ from what was written");
    }
}

// ---------------------------------------------------------------------------------
// Malformed images: each refused with a clear error of the right kind, never a panic.

/// A valid dynamic image of 6 MiB: blocks 0 and 2 allocated.
fn valid_dynamic() -> Vec<u8> {
    let mut a = Assembled::new(6 * MIB, 2 << 20, 3);
    a.blocks.push((0, vec![0xFF; 512], vec![1; 2 << 20]));
    a.blocks.push((2, vec![0xF0; 512], vec![2; 2 << 20]));
    a.build()
}

fn expect_refused(dir: &Path, name: &str, bytes: &[u8], kind: ErrorKind, words: &[&str]) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(&path, true);
    assert_eq!(err.kind(), kind, "{name}: {err}");
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "{name}: {w:?} missing from: {msg}");
    }
}

#[test]
fn malformed_images_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = valid_dynamic();
    {
        let path = d.join("good.vhd");
        std::fs::write(&path, &good).unwrap();
        let disk = open(&path);
        assert_eq!(disk.virtual_size(), 6 * MIB);
        let mut b = vec![0u8; 512];
        disk.read_at(&mut b, 4 * MIB + 4 * 512).unwrap();
        assert!(b.iter().all(|&x| x == 0), "bit clear in block 2 reads zero");
        disk.read_at(&mut b, 4 * MIB).unwrap();
        assert!(b.iter().all(|&x| x == 2));
        // Not compared with qemu: QEMU ignores sector bitmaps and would read the 2s
        // stored under the clear bits; the specification says they are absent.
    }
    let hdr = 512;
    let set_u32 = |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let set_u64 = |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());

    expect_refused(d, "tiny.vhd", &good[..300], ErrorKind::Corrupt, &["truncated"]);
    expect_refused(d, "truncated.vhd", &good[..good.len() - MIB as usize], ErrorKind::Corrupt, &["block 2"]);

    let mut b = good.clone();
    b[..8].copy_from_slice(b"connectx");
    let end = b.len() - 512;
    b[end..end + 8].copy_from_slice(b"connectx");
    expect_refused(d, "cookie.vhd", &b, ErrorKind::Corrupt, &["conectix"]);

    let mut b = good.clone();
    b[40] ^= 1;
    expect_refused(
        d,
        "footer-sum.vhd",
        &b,
        ErrorKind::Corrupt,
        &["footer", "checksum", "stored", "computed"],
    );

    let mut b = good.clone();
    b[hdr + 100] ^= 1;
    expect_refused(d, "header-sum.vhd", &b, ErrorKind::Corrupt, &["dynamic header", "checksum"]);

    let mut b = good.clone();
    b[hdr..hdr + 8].copy_from_slice(b"cxsparsf");
    fix_checksums(&mut b);
    expect_refused(d, "header-cookie.vhd", &b, ErrorKind::Corrupt, &["cxsparse"]);

    for (name, bs) in [("bs0.vhd", 0), ("bs3m.vhd", 3 << 20), ("bs-huge.vhd", 1 << 31)] {
        let mut b = good.clone();
        set_u32(&mut b, hdr + 32, bs);
        fix_checksums(&mut b);
        expect_refused(d, name, &b, ErrorKind::Corrupt, &["block size"]);
    }

    let mut b = good.clone();
    let past = (b.len() / 512) as u32 + 10;
    set_u32(&mut b, 1536, past);
    expect_refused(d, "bat-past-eof.vhd", &b, ErrorKind::Corrupt, &["block 0", "past the end"]);

    let mut b = good.clone();
    set_u32(&mut b, 1536 + 8, 3); // block 2 at sector 3: on the BAT
    expect_refused(d, "bat-on-bat.vhd", &b, ErrorKind::Corrupt, &["block 2", "block allocation table"]);

    let mut b = good.clone();
    set_u32(&mut b, 1536, 1); // block 0 at sector 1: on the dynamic header
    expect_refused(d, "bat-on-header.vhd", &b, ErrorKind::Corrupt, &["block 0", "dynamic header"]);

    let mut b = good.clone();
    let block0 = u32::from_be_bytes(b[1536..1540].try_into().unwrap());
    set_u32(&mut b, 1536 + 4, block0 + 8); // block 1 inside block 0
    expect_refused(d, "bat-overlap.vhd", &b, ErrorKind::Corrupt, &["block", "overlap"]);

    let mut b = good.clone();
    set_u32(&mut b, 1536 + 8, block0 + 8); // block 2 inside block 0
    expect_refused(d, "bat-alias.vhd", &b, ErrorKind::Corrupt, &["blocks 0 and 2 overlap"]);

    let mut b = good.clone();
    set_u32(&mut b, hdr + 28, 2); // 2 entries for 3 blocks
    fix_checksums(&mut b);
    expect_refused(d, "entries-small.vhd", &b, ErrorKind::Corrupt, &["max table entries"]);

    let mut b = good.clone();
    set_u32(&mut b, hdr + 28, u32::MAX);
    fix_checksums(&mut b);
    expect_refused(d, "entries-huge.vhd", &b, ErrorKind::Corrupt, &["max table entries"]);

    let mut b = good.clone();
    let len = b.len() as u64;
    set_u64(&mut b, hdr + 16, len - 8); // the BAT's 12 bytes would pass EOF
    fix_checksums(&mut b);
    expect_refused(
        d,
        "entries-past-eof.vhd",
        &b,
        ErrorKind::Corrupt,
        &["block allocation table", "past the end"],
    );

    let mut b = good.clone();
    set_u64(&mut b, hdr + 16, u64::MAX - 100); // BAT offset overflowing
    fix_checksums(&mut b);
    expect_refused(d, "bat-offset.vhd", &b, ErrorKind::Corrupt, &["block allocation table"]);

    let mut b = good.clone();
    let end = b.len() - 512;
    for at in [0, end] {
        set_u64(&mut b, at + 16, 1 << 40);
    }
    fix_checksums(&mut b);
    expect_refused(d, "data-offset.vhd", &b, ErrorKind::Corrupt, &["data offset", "past the end"]);

    let mut b = good.clone();
    let end = b.len() - 512;
    for at in [0, end] {
        set_u64(&mut b, at + 48, 1 << 50); // current size beyond 2040 GiB
    }
    fix_checksums(&mut b);
    expect_refused(d, "too-big.vhd", &b, ErrorKind::Unsupported, &["2040 GiB"]);

    let mut b = good.clone();
    let end = b.len() - 512;
    for at in [0, end] {
        set_u32(&mut b, at + 60, 7);
    }
    fix_checksums(&mut b);
    expect_refused(d, "disk-type.vhd", &b, ErrorKind::Unsupported, &["disk type 7"]);

    // A differencing disk whose locator data runs past the end of the file.
    let mut a = Assembled::new(4 * MIB, 2 << 20, 4);
    a.locators.push((*b"W2ru", utf16le(r".\p.vhd")));
    let mut b = a.build();
    let loc = hdr + 576;
    let near_end = b.len() as u64 - 4;
    set_u64(&mut b, loc + 16, near_end);
    fix_checksums(&mut b);
    expect_refused(d, "locator.vhd", &b, ErrorKind::Corrupt, &["parent locator 0", "past the end"]);

    // A block placed on the locator data.
    let mut a = Assembled::new(4 * MIB, 2 << 20, 4);
    a.locators.push((*b"W2ru", utf16le(r".\p.vhd")));
    a.blocks.push((0, vec![0xFF; 512], vec![0; 2 << 20]));
    let mut b = a.build();
    let locator_sector = (u64::from_be_bytes(b[loc + 16..loc + 24].try_into().unwrap()) / 512) as u32;
    set_u32(&mut b, 1536, locator_sector);
    expect_refused(d, "bat-on-locator.vhd", &b, ErrorKind::Corrupt, &["block 0", "parent locator 0"]);

    // Fixed disk whose footer claims more data than the file holds.
    let mut f = vec![0u8; MIB as usize];
    f.extend_from_slice(&footer_bytes(2 * MIB, 2, [3; 16]));
    expect_refused(d, "fixed-short.vhd", &f, ErrorKind::Corrupt, &["smaller than the virtual size"]);
}

#[test]
fn every_truncation_and_byte_flip_of_metadata_is_handled() {
    // Not a fuzzer, but a cheap sweep: no prefix of a valid image and no single-byte
    // corruption of its metadata may panic, and a reader that opens must read.
    let dir = tempfile::tempdir().unwrap();
    let mut a = Assembled::new(3 * MIB, 1 << 20, 4);
    a.locators.push((*b"W2ru", utf16le(r".\p.vhd")));
    a.blocks.push((1, vec![0xAA; 512], vec![5; 1 << 20]));
    let good = a.build();
    let path = dir.path().join("x.vhd");
    let try_open = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(disk) = open_disk(&path, &OpenOptions::read_only()) {
            let _ = collect_map(disk.as_ref());
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < disk.virtual_size() {
                let n = (disk.virtual_size() - off).min(buf.len() as u64) as usize;
                let _ = disk.read_at(&mut buf[..n], off);
                off += n as u64;
            }
            let _ = disk.info();
        }
    };
    for cut in (0..4096).step_by(97).chain([good.len() - 1, good.len() - 511]) {
        try_open(&good[..cut]);
    }
    for at in (0..2048).step_by(3) {
        let mut b = good.clone();
        b[at] = b[at].wrapping_add(0x5b);
        fix_checksums(&mut b);
        try_open(&b);
    }
}
