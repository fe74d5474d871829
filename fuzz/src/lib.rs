//! Shared driver of the image fuzz targets: put the input in a file, open it as one
//! format, and exercise every read path within fixed budgets, so that a hostile image
//! that claims a huge disk cannot turn one input into a timeout.

use std::io::Write;
use std::path::PathBuf;

use tern_disk::{open_disk, Format, OpenOptions};

/// Largest number of mapping calls per input.
const MAX_MAP_STEPS: usize = 4096;
/// Largest number of guest bytes read per input.
const MAX_READ: u64 = 8 << 20;

fn scratch_path() -> PathBuf {
    let dir = std::env::var_os("TERN_FUZZ_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    dir.join(format!("tern-fuzz-{}.img", std::process::id()))
}

/// Open `data` as `format` (or detected, for `None`) and read it within budget.
pub fn exercise(data: &[u8], format: Option<Format>) {
    let path = scratch_path();
    {
        let mut f = std::fs::File::create(&path).expect("scratch file");
        f.write_all(data).expect("write scratch");
    }
    let options = OpenOptions { format, ..OpenOptions::default() };
    let Ok(disk) = open_disk(&path, &options) else { return };
    let _ = disk.info();
    let size = disk.virtual_size();
    let mut off = 0u64;
    let mut read = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..MAX_MAP_STEPS {
        if off >= size {
            break;
        }
        let Ok(m) = disk.mapping(off, size - off) else { break };
        assert!(m.start == off && m.length > 0 && m.end() <= size, "bad mapping {m:?} at {off} of {size}");
        if read < MAX_READ {
            let n = m.length.min(buf.len() as u64) as usize;
            let _ = disk.read_at(&mut buf[..n], off);
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
