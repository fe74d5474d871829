//! Shared driver of the image fuzz targets: put the input in a file, open it as one
//! format, and exercise every read path within fixed budgets, so that a hostile image
//! that claims a huge disk cannot turn one input into a timeout.
//!
//! Checksums stop a mutating fuzzer at the first structure it touches: almost every
//! mutation of a VHD footer or a VHDX header fails its checksum, and the parser behind
//! it is never reached. So the format targets *repair* the checksums of the structures
//! they can find (VHD footer copies and dynamic header; VHDX headers, region tables and
//! log entries) before writing the file. The `detect` target writes inputs unchanged,
//! which keeps the checksum-failure paths fuzzed too.
//!
//! Set `TERN_FUZZ_KEEP=<path>` to keep a copy of the file as opened (checksums
//! repaired), which is what a regression test needs: `cargo fuzz run <target> <input>`
//! with it set turns a crash artifact into a file the library's tests can open.

use std::io::Write;
use std::path::PathBuf;

use tern_disk::{open_disk, Format, OpenOptions};

mod walk;

/// How one target drives the library.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Format forced, or `None` to detect it.
    pub format: Option<Format>,
    /// Repair the checksums of the structures of `format` before opening.
    pub repair_checksums: bool,
    /// Open writable (VHDX: replays a pending log into the scratch file).
    pub writable: bool,
}

fn scratch_path() -> PathBuf {
    let dir = std::env::var_os("TERN_FUZZ_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    dir.join(format!("tern-fuzz-{}.img", std::process::id()))
}

/// Open `data` as `format` (or detected, for `None`) read-only, checksums as they are,
/// and read it within budget.
pub fn exercise(data: &[u8], format: Option<Format>) {
    exercise_target(data, Target { format, repair_checksums: false, writable: false });
}

/// Open `data` as `target` says and read it within budget.
pub fn exercise_target(data: &[u8], target: Target) {
    let mut bytes = data.to_vec();
    if target.repair_checksums {
        match target.format {
            Some(Format::Vhd) => repair::vhd(&mut bytes),
            Some(Format::Vhdx) => repair::vhdx(&mut bytes),
            _ => {}
        }
    }
    let path = scratch_path();
    {
        let mut f = std::fs::File::create(&path).expect("scratch file");
        f.write_all(&bytes).expect("write scratch");
    }
    if let Some(keep) = std::env::var_os("TERN_FUZZ_KEEP") {
        std::fs::write(keep, &bytes).expect("write TERN_FUZZ_KEEP copy");
    }
    let options = OpenOptions { format: target.format, writable: target.writable, ..OpenOptions::default() };
    let disk = open_disk(&path, &options);
    if let Ok(disk) = &disk {
        walk::walk(disk.as_ref());
    }
    // Bitmaps are read from the header on, whether or not the data tables are sound.
    if target.format == Some(Format::Qcow2) || bytes.starts_with(&tern_disk::qcow2::MAGIC) {
        walk::walk_qcow2_bitmaps(&path, disk.ok().map(|d| d.virtual_size()));
    }
}

/// Checksum repair, from the layouts the library documents (VHD specification "Hard
/// Disk Footer Format" / "Dynamic Disk Header Format"; [MS-VHDX] 2.2.2, 2.2.3, 2.3.1.1).
mod repair {
    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }

    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    /// VHD checksum: ones' complement of the byte sum, the field itself counted as zero.
    fn vhd_sum(b: &mut [u8], field: usize) {
        b[field..field + 4].fill(0);
        let sum = b.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
        b[field..field + 4].copy_from_slice(&(!sum).to_be_bytes());
    }

    pub fn vhd(b: &mut [u8]) {
        let len = b.len();
        let mut data_offset = None;
        for start in [0, len.saturating_sub(512)] {
            if len >= 512 && &b[start..start + 8] == b"conectix" {
                vhd_sum(&mut b[start..start + 512], 64);
                data_offset = data_offset.or(Some(be64(b, start + 16)));
            }
        }
        if let Some(h) = data_offset.and_then(|o| usize::try_from(o).ok()) {
            if h.checked_add(1024).is_some_and(|end| end <= len) && &b[h..h + 8] == b"cxsparse" {
                vhd_sum(&mut b[h..h + 1024], 36);
            }
        }
    }

    /// CRC-32C of `b` with the 4-byte field at 4 zeroed, stored there little-endian.
    fn crc_at_4(b: &mut [u8]) {
        b[4..8].fill(0);
        let crc = crc32c::crc32c(b);
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn vhdx(b: &mut [u8]) {
        const KIB: usize = 1024;
        for (at, len, sig) in [
            (64 * KIB, 4 * KIB, b"head"),
            (128 * KIB, 4 * KIB, b"head"),
            (192 * KIB, 64 * KIB, b"regi"),
            (256 * KIB, 64 * KIB, b"regi"),
        ] {
            if b.len() >= at + len && &b[at..at + 4] == sig {
                crc_at_4(&mut b[at..at + len]);
            }
        }
        // Log entries: any 4 KiB sector past the header section that starts "loge" and
        // whose whole entry lies inside the input (entries that wrap are left alone).
        let mut at = 1 << 20;
        while at + 4 * KIB <= b.len() {
            if &b[at..at + 4] == b"loge" {
                let n = le32(b, at + 8) as usize;
                if n >= 64 && at.checked_add(n).is_some_and(|end| end <= b.len()) {
                    crc_at_4(&mut b[at..at + n]);
                }
            }
            at += 4 * KIB;
        }
    }
}
