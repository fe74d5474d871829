//! Helpers shared by the disk integration tests: the qemu-img oracle and the
//! fixtures made by other tools. Each test binary uses a different subset.
#![allow(dead_code)]

pub mod old_qemu;

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_disk::{open_disk, Disk, OpenOptions};

/// Run a command, panic with its stderr if it fails, return stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img ARGS...`
pub fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// `qemu-io -f FMT -c CMD... PATH`
pub fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(path));
}

/// qemu's name for the format of `path`, as tern detects it. qemu-img must be told:
/// it probes fixed VHDs (footer only, at the end) as raw.
pub fn qemu_fmt(path: &Path) -> &'static str {
    let file = tern_disk::ImageFile::open(path, false).unwrap();
    match tern_disk::detect_format(&file).unwrap() {
        tern_disk::Format::Raw => "raw",
        tern_disk::Format::Qcow2 => "qcow2",
        tern_disk::Format::Vhd => "vpc",
        tern_disk::Format::Vhdx => "vhdx",
    }
}

/// `qemu-img compare -q` of two images, each with its format named.
pub fn qemu_compare(a: &Path, b: &Path) {
    qemu_img(&[
        "compare",
        "-q",
        "-f",
        qemu_fmt(a),
        "-F",
        qemu_fmt(b),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
}

/// The guest content of `path` as qemu-img sees it (`qemu-img convert -O raw`).
pub fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!("{}.oracle.raw", path.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&out);
    qemu_img(&["convert", "-f", qemu_fmt(path), "-O", "raw", path.to_str().unwrap(), out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `qemu-img info --output=json` parsed.
pub fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-f", qemu_fmt(path), "--output=json", path.to_str().unwrap()]))
        .unwrap()
}

/// `qemu-img map --output=json` as (start, length, data, zero) runs.
pub fn qemu_map(path: &Path) -> Vec<(u64, u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "map",
        "-f",
        qemu_fmt(path),
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Every byte of a disk through tern.
pub fn tern_raw(disk: &dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; disk.virtual_size() as usize];
    for (i, chunk) in buf.chunks_mut(1 << 20).enumerate() {
        disk.read_at(chunk, (i as u64) << 20).unwrap();
    }
    buf
}

/// Open read-only, no backing files.
pub fn open(path: &Path) -> Box<dyn Disk> {
    open_disk(path, &OpenOptions::read_only()).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Assert tern reads `path` byte-identically to `qemu-img convert -O raw`, naming the
/// first difference. Streams in 4 MiB pieces, so large sparse disks need no memory.
pub fn assert_reads_like_qemu(path: &Path, dir: &Path) {
    let disk = open(path);
    let oracle = dir.join(format!("{}.oracle.raw", path.file_name().unwrap().to_string_lossy()));
    let _ = std::fs::remove_file(&oracle);
    qemu_img(&[
        "convert",
        "-f",
        qemu_fmt(path),
        "-O",
        "raw",
        path.to_str().unwrap(),
        oracle.to_str().unwrap(),
    ]);
    let theirs = std::fs::File::open(&oracle).unwrap();
    let their_len = theirs.metadata().unwrap().len();
    assert_eq!(disk.virtual_size(), their_len, "{}: virtual size differs from qemu-img", path.display());
    let mut a = vec![0u8; 4 << 20];
    let mut b = vec![0u8; 4 << 20];
    let mut off = 0;
    while off < their_len {
        let n = (their_len - off).min(a.len() as u64) as usize;
        disk.read_at(&mut a[..n], off).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&theirs, &mut b[..n], off).unwrap();
        if let Some(i) = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y) {
            panic!("{}: content differs from qemu-img at offset {}", path.display(), off + i as u64);
        }
        off += n as u64;
    }
    std::fs::remove_file(oracle).unwrap();
}

/// Assert tern's map agrees with qemu-img's on which bytes are data and which read as
/// zero without data. Compared byte range by byte range, so run boundaries may differ.
///
/// For qcow2 and raw, qemu's map is exact and must match. For VHD and VHDX it is not:
/// QEMU 10 maps every allocated VHD block (whatever its sector bitmap says) and the
/// whole of any VHDX as data. There tern must be *within* qemu (never data where qemu
/// says there is none) and every range tern maps as zero must read as zeros in qemu.
pub fn assert_map_like_qemu(path: &Path) {
    let disk = open(path);
    let ours = tern_disk::collect_map(disk.as_ref()).unwrap();
    let theirs = qemu_map(path);
    let exact = matches!(qemu_fmt(path), "qcow2" | "raw");
    let content = if exact {
        Vec::new()
    } else {
        let dir = tempfile::tempdir().unwrap();
        qemu_raw(path, dir.path())
    };
    let (mut i, mut j, mut off) = (0, 0, 0u64);
    while i < ours.len() && j < theirs.len() {
        let o = ours[i];
        let (ts, tl, tdata, _tzero) = theirs[j];
        assert!(o.start <= off && off < o.end() && ts <= off && off < ts + tl);
        let ours_data = o.kind == tern_disk::MapKind::Data;
        let end = o.end().min(ts + tl);
        if exact {
            assert_eq!(
                ours_data,
                tdata,
                "{}: at offset {off} tern says {:?}, qemu-img says data={tdata}",
                path.display(),
                o.kind
            );
        } else {
            assert!(
                tdata || !ours_data,
                "{}: at offset {off} tern says data, qemu-img does not",
                path.display()
            );
            if !ours_data {
                let range = &content[off as usize..end as usize];
                assert!(
                    range.iter().all(|&b| b == 0),
                    "{}: tern maps {off}..{end} as {:?} but qemu reads non-zero bytes there",
                    path.display(),
                    o.kind
                );
            }
        }
        off = end;
        if off == o.end() {
            i += 1;
        }
        if off == ts + tl {
            j += 1;
        }
    }
    assert_eq!(off, disk.virtual_size(), "{}: maps do not cover the disk", path.display());
}

/// The folder of disk images made by other tools, carried in the repository under
/// `tests/data/` (see its README for their origin, licence and what each must do). Every
/// file listed in its `SHA256SUMS` must be there with that digest: a missing or altered
/// fixture fails the test that needs it, naming the file. Tests copy a fixture before
/// opening anything writable.
pub fn testdata(subdir: &str) -> PathBuf {
    use sha2::Digest;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(subdir);
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))
        .unwrap_or_else(|e| panic!("test fixtures: {}: {e}", dir.join("SHA256SUMS").display()));
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (want, name) = line.split_once("  ").unwrap_or_else(|| panic!("SHA256SUMS: bad line {line:?}"));
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("test fixture {} is missing: {e}", path.display()));
        let got = format!("{:x}", sha2::Sha256::digest(&bytes));
        assert_eq!(got, want, "test fixture {} is not the file SHA256SUMS lists", path.display());
    }
    dir
}

/// Where a qcow2 image keeps its persistent bitmaps, for tests that patch them: found
/// by walking the header extensions and the directory as the qcow2 specification lays
/// them out (big endian).
#[derive(Debug)]
pub struct BitmapLayout {
    /// File offset of the bitmaps extension record (its type field; the data is at +8).
    pub ext_at: usize,
    pub dir_offset: u64,
    pub dir_size: u64,
    /// Per directory entry: (file offset of the entry, bitmap table offset, table size).
    pub entries: Vec<(u64, u64, u32)>,
}

/// The bitmap layout of the qcow2 image `bytes` (panics if it has no bitmaps).
pub fn qcow2_bitmap_layout(bytes: &[u8]) -> BitmapLayout {
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let mut at = be32(100) as usize;
    loop {
        let (kind, len) = (be32(at), be32(at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            break;
        }
        at += 8 + len.next_multiple_of(8);
    }
    let (nb, dir_size, dir_offset) = (be32(at + 8), be64(at + 16), be64(at + 24));
    let mut entries = Vec::new();
    let mut e = dir_offset as usize;
    for _ in 0..nb {
        let name_size = u16::from_be_bytes(bytes[e + 18..e + 20].try_into().unwrap()) as usize;
        let extra = be32(e + 20) as usize;
        entries.push((e as u64, be64(e), be32(e + 8)));
        e += (24 + extra + name_size).next_multiple_of(8);
    }
    BitmapLayout { ext_at: at, dir_offset, dir_size, entries }
}
