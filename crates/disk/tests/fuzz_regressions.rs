//! Inputs found by fuzzing (`scripts/fuzz`), and hostile shapes reviewed alongside:
//! opening and reading each must give an error or valid data, never a panic, a hang
//! or a huge allocation. Each test is named after what was wrong.
//!
//! Inputs live in `tests/fuzz-regressions/<format>/`, stored as the file the fuzz
//! driver opened (checksums repaired, see `fuzz/src/lib.rs`), raw-deflate compressed
//! (`.deflate`) since images are mostly zeros.

mod common;

use std::path::{Path, PathBuf};

use tern_disk::vhdx::{DifferencingOptions, ParentLocator, VhdxWriter};
use tern_disk::{
    open_disk, qcow2_bitmap_extents, qcow2_bitmaps, DiskWriter, ErrorKind, Format, MapKind, Mapping,
    OpenOptions,
};

const MIB: u64 = 1 << 20;

#[path = "../../../fuzz/src/walk.rs"]
mod walk;

/// Inflate `tests/fuzz-regressions/<format>/<name>.deflate` into a temporary file.
fn regression_file(dir: &Path, format: &str, name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions").join(format).join(name);
    let packed = std::fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let bytes = miniz_oxide::inflate::decompress_to_vec(&packed).expect("raw deflate");
    let path = dir.join(name.trim_end_matches(".deflate"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Open `path` as `format` and walk it the way the fuzz driver does. Returns the
/// open error, if any; panics only if the library breaks an invariant.
fn exercise(path: &Path, format: Format, writable: bool) -> Result<(), tern_disk::Error> {
    let options = OpenOptions { format: Some(format), writable, ..OpenOptions::default() };
    let disk = open_disk(path, &options)?;
    walk::walk(disk.as_ref());
    Ok(())
}

/// A differencing VHDX with 32 MiB blocks whose sector bitmap alternates across the
/// 4 KiB windows the reader loads it through: mapping walks it run by run (it used to
/// rebuild the runs of the whole rest of the block on each call, quadratic in the
/// block's sectors) and every run comes out exact.
#[test]
fn vhdx_bitmap_runs_are_exact_across_bitmap_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("child.vhdx");
    let block = 32 * MIB;
    let options = DifferencingOptions {
        virtual_size: block,
        locator: ParentLocator {
            entries: vec![
                ("parent_linkage".into(), "{2DC27766-F623-4200-9D64-115E9BFD4A08}".into()),
                ("relative_path".into(), ".\\parent.vhdx".into()),
            ],
        },
    };
    let mut w = VhdxWriter::create_differencing(&path, block, &options).unwrap();
    // One bit per 512-byte sector; a 4 KiB window covers 32768 sectors (16 MiB).
    // Written: sectors 32760..32780 every third one, and 40000..40100 whole.
    let mut written: Vec<u64> = (32760..32780).step_by(3).collect();
    written.extend(40000..40100);
    for &s in &written {
        w.write_at(&[0xEE; 512], s * 512).unwrap();
    }
    Box::new(w).finish().unwrap();

    let disk = open_disk(&path, &OpenOptions::read_only()).unwrap();
    let mut got: Vec<Mapping> = Vec::new();
    let mut off = 32750 * 512;
    while off < 40200 * 512 {
        let m = disk.mapping(off, 40200 * 512 - off).unwrap();
        off = m.end();
        got.push(m);
    }
    let is_written = |s: u64| written.contains(&s);
    let mut expected: Vec<(u64, u64, bool)> = Vec::new();
    for s in 32750..40200u64 {
        match expected.last_mut() {
            Some(r) if r.2 == is_written(s) => r.1 += 512,
            _ => expected.push((s * 512, 512, is_written(s))),
        }
    }
    let got: Vec<(u64, u64, bool)> =
        got.iter().map(|m| (m.start, m.length, m.kind == MapKind::Data)).collect();
    assert_eq!(got, expected);
    let mut b = vec![0u8; 1024];
    disk.read_at(&mut b, 32763 * 512).unwrap();
    assert!(b[..512].iter().all(|&x| x == 0xEE) && b[512..].iter().all(|&x| x == 0));
}

/// A pending log entry whose zero descriptor runs to the 1 PiB its `LastFileOffset`
/// claims: replay used to write zeros toward that end (a hang that fills the disk).
/// Now the entry is corrupt; read-only opens refuse the pending log as before.
#[test]
fn vhdx_log_entry_claiming_a_petabyte_file_is_refused_not_zero_filled() {
    let dir = tempfile::tempdir().unwrap();
    let path = regression_file(dir.path(), "vhdx", "log-entry-claims-petabyte-file.vhdx.deflate");
    let len = std::fs::metadata(&path).unwrap().len();
    let e = exercise(&path, Format::Vhdx, false).unwrap_err();
    assert!(e.to_string().contains("pending log"), "{e}");
    let e = exercise(&path, Format::Vhdx, true).unwrap_err();
    assert!(e.to_string().contains("beyond any VHDX file"), "{e}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "the file did not grow");
}

/// Hostile bitmaps extensions, directories and tables, patched into an image qemu-img
/// made: listing or reading the bitmap gives a `Corrupt` error naming the file and
/// what is wrong, never a panic or an allocation the field asks for; and the image's
/// data still reads (its bitmaps do not matter to that).
#[test]
fn qcow2_hostile_bitmap_metadata_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("good.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]);
    common::qemu_img(&["bitmap", "--add", p, "b"]);
    common::qemu_io("qcow2", &img, &["write 1M 64k"]);
    let good = std::fs::read(&img).unwrap();
    let l = common::qcow2_bitmap_layout(&good);
    assert_eq!(qcow2_bitmap_extents(&img, "b").unwrap(), vec![MIB..MIB + 64 * 1024]);
    walk::walk_qcow2_bitmaps(&img, Some(64 * MIB));
    let ext = l.ext_at + 8;
    let (entry, table, _) = l.entries[0];
    let (entry, table) = (entry as usize, table as usize);
    let beyond = (good.len() as u64).next_multiple_of(1 << 16) + (1 << 16);
    let data = u64::from_be_bytes(good[table..table + 8].try_into().unwrap());
    assert_ne!(data, 0, "the written bit's cluster is stored");

    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let put = |at: usize, v: &[u8]| -> Patch {
        let v = v.to_vec();
        Box::new(move |b: &mut Vec<u8>| b[at..at + v.len()].copy_from_slice(&v))
    };
    let cases: Vec<(&str, Patch, &str)> = vec![
        ("extension of 16 bytes", put(l.ext_at + 4, &16u32.to_be_bytes()), "is 16 bytes long"),
        ("nb_bitmaps 0", put(ext, &0u32.to_be_bytes()), "nb_bitmaps 0"),
        ("nb_bitmaps above qemu's limit", put(ext, &70000u32.to_be_bytes()), "nb_bitmaps 70000"),
        ("one entry short", put(ext, &2u32.to_be_bytes()), "nb_bitmaps is 2"),
        ("reserved field", put(ext + 4, &1u32.to_be_bytes()), "reserved"),
        (
            "truncated directory",
            put(ext + 8, &(l.dir_size - 8).to_be_bytes()),
            "past the end of the directory",
        ),
        ("directory of 8 bytes", put(ext + 8, &8u64.to_be_bytes()), "truncated"),
        ("absurd directory size", put(ext + 8, &u64::MAX.to_be_bytes()), "bitmap_directory_size"),
        ("directory past the file", put(ext + 16, &beyond.to_be_bytes()), "past the end of the file"),
        ("unaligned directory", put(ext + 16, &(l.dir_offset + 8).to_be_bytes()), "not aligned"),
        ("directory in the header", put(ext + 16, &0u64.to_be_bytes()), "header cluster"),
        ("absurd table size", put(entry + 8, &u32::MAX.to_be_bytes()), "bitmap_table_size"),
        ("table size 0", put(entry + 8, &0u32.to_be_bytes()), "bitmap_table_size 0"),
        ("table longer than the disk needs", put(entry + 8, &2u32.to_be_bytes()), "it must be 1"),
        ("table past the file", put(entry, &beyond.to_be_bytes()), "past the end of the file"),
        ("unaligned table", put(entry, &(table as u64 + 512).to_be_bytes()), "not aligned"),
        ("reserved flags", put(entry + 12, &0x10u32.to_be_bytes()), "reserved bits"),
        ("type 2", put(entry + 16, &[2]), "type 2"),
        ("granularity 2^64", put(entry + 17, &[64]), "granularity_bits 64"),
        (
            "name longer than the directory",
            put(entry + 18, &0xffffu16.to_be_bytes()),
            "past the end of the directory",
        ),
        ("empty name", put(entry + 18, &0u16.to_be_bytes()), "name_size 0"),
        ("name not UTF-8", put(entry + 24, &[0xff]), "UTF-8"),
        ("huge extra data", put(entry + 20, &u32::MAX.to_be_bytes()), "past the end of the directory"),
        ("data cluster past the file", put(table, &beyond.to_be_bytes()), "past the end of the file"),
        ("unaligned data cluster", put(table, &(data + 512).to_be_bytes()), "not aligned"),
        ("reserved table bits", put(table, &(data | 1 << 60).to_be_bytes()), "reserved bits"),
        ("offset and all-ones", put(table, &(data | 1).to_be_bytes()), "all-ones"),
    ];
    for (what, patch, says) in cases {
        let mut bytes = good.clone();
        patch(&mut bytes);
        let path = dir.path().join("hostile.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let e = match qcow2_bitmaps(&path) {
            Err(e) => e,
            Ok(list) => {
                let name = list.first().map(|b| b.name.clone()).unwrap_or_else(|| "b".into());
                qcow2_bitmap_extents(&path, &name).expect_err(what)
            }
        };
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert!(e.to_string().contains("hostile.qcow2") && e.to_string().contains(says), "{what}: {e}");
        exercise(&path, Format::Qcow2, false)
            .unwrap_or_else(|e| panic!("{what}: the data no longer reads: {e}"));
        walk::walk_qcow2_bitmaps(&path, None);
    }

    // Two table entries naming one data cluster: refused, not read twice.
    let img = dir.path().join("small.qcow2");
    let p = img.to_str().unwrap();
    common::qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "64M"]);
    common::qemu_img(&["bitmap", "--add", "--granularity", "512", p, "b"]);
    // One data cluster holds 4096 bits, 2 MiB of disk: these land in entries 0 and 2.
    common::qemu_io("qcow2", &img, &["write 0 512", "write 4M 512"]);
    let mut bytes = std::fs::read(&img).unwrap();
    let (_, table, table_size) = common::qcow2_bitmap_layout(&bytes).entries[0];
    assert_eq!(table_size, 32);
    let table = table as usize;
    let first: [u8; 8] = bytes[table..table + 8].try_into().unwrap();
    assert_ne!(bytes[table + 16..table + 24], [0; 8], "entry 2 holds data");
    bytes[table + 16..table + 24].copy_from_slice(&first);
    std::fs::write(&img, &bytes).unwrap();
    let e = qcow2_bitmap_extents(&img, "b").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("which an earlier entry uses"), "{e}");
}
