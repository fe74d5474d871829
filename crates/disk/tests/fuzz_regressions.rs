//! Inputs found by fuzzing (`scripts/fuzz`), and hostile shapes reviewed alongside:
//! opening and reading each must give an error or valid data, never a panic, a hang
//! or a huge allocation. Each test is named after what was wrong.
//!
//! Inputs live in `tests/fuzz-regressions/<format>/`, stored as the file the fuzz
//! driver opened (checksums repaired, see `fuzz/src/lib.rs`), raw-deflate compressed
//! (`.deflate`) since images are mostly zeros.

use std::path::{Path, PathBuf};

use tern_disk::vhdx::{DifferencingOptions, ParentLocator, VhdxWriter};
use tern_disk::{open_disk, DiskWriter, Format, MapKind, Mapping, OpenOptions};

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
