//! The walk every fuzzed image gets, shared with the library's fuzz regression tests
//! (`crates/disk/tests/fuzz_regressions.rs` includes this file), so that a regression
//! input is checked exactly as the fuzzer checked it.
//!
//! Map and read the whole disk within fixed budgets (a hostile image that claims a huge
//! disk must not turn one input into a timeout), asserting the `Disk` invariants: every
//! mapping starts where asked, is non-empty and inside the disk, and what is not data
//! reads as zero (no backing file is ever opened here). qcow2 inputs also get their
//! persistent bitmaps listed and read ([`walk_qcow2_bitmaps`]).

use std::path::Path;

use tern_disk::{Disk, MapKind};

/// Largest number of mapping calls per image.
pub const MAX_MAP_STEPS: usize = 4096;
/// Largest number of guest bytes read per image.
pub const MAX_READ: u64 = 8 << 20;

/// Walk `disk` within budget; panics only if the library breaks an invariant.
pub fn walk(disk: &dyn Disk) {
    let _ = disk.info();
    let size = disk.virtual_size();
    let (mut off, mut read) = (0u64, 0u64);
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..MAX_MAP_STEPS {
        if off >= size {
            break;
        }
        let Ok(m) = disk.mapping(off, size - off) else { break };
        assert!(m.start == off && m.length > 0 && m.end() <= size, "bad mapping {m:?} at {off} of {size}");
        if read < MAX_READ {
            let n = m.length.min(buf.len() as u64) as usize;
            if disk.read_at(&mut buf[..n], off).is_ok() && m.kind != MapKind::Data {
                assert!(buf[..n].iter().all(|&b| b == 0), "{m:?} reads non-zero bytes");
            }
            read += n as u64;
        }
        off = m.end();
    }
    // Reads at the far end too, where offset arithmetic overflows first.
    if size > 0 {
        let n = size.min(4096) as usize;
        let _ = disk.read_at(&mut buf[..n], size - n as u64);
    }
}

/// List the persistent bitmaps of the qcow2 image at `path` and read every one that may
/// be read, asserting that the extents are sorted, disjoint, merged and within
/// `virtual_size` (when the image opened as a disk). Errors are fine; panics are not.
pub fn walk_qcow2_bitmaps(path: &Path, virtual_size: Option<u64>) {
    let Ok(bitmaps) = tern_disk::qcow2_bitmaps(path) else { return };
    for b in bitmaps {
        let Ok(runs) = tern_disk::qcow2_bitmap_extents(path, &b.name) else { continue };
        assert!(runs.iter().all(|r| r.start < r.end), "bitmap {:?}: an empty run", b.name);
        assert!(
            runs.windows(2).all(|w| w[0].end < w[1].start),
            "bitmap {:?}: runs not sorted and merged",
            b.name
        );
        if let (Some(size), Some(last)) = (virtual_size, runs.last()) {
            assert!(last.end <= size, "bitmap {:?}: run {last:?} past the virtual size {size}", b.name);
        }
    }
}
