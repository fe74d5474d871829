//! A sample VM disk for `tern demo` and benchmarks: a raw image shaped like a used
//! guest disk: scattered extents of incompressible data, runs of text, and zeros
//! (never written, so the file is sparse).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use crate::{Error, Result};

/// Deterministic pseudo-random bytes (xorshift64*), so samples are reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const TEXT: &str = "Lorem ipsum dolor sit amet; tern replicates VM disks to object storage. \
    /var/log/syslog: Jan  1 00:00:00 host kernel: [    0.000000] Linux version 6.1.0 \
    GET /index.html HTTP/1.1 200 1043 \"Mozilla/5.0\"\n";

/// Write a sparse raw image of `size` bytes (a multiple of 1 MiB) at `path` (which must
/// not exist): about half in 1 MiB extents of random data, a quarter text, the rest
/// zeros (a third of the 16 MiB regions empty), scattered by `seed`. Returns the bytes written.
pub fn write_sample_disk(path: &Path, size: u64, seed: u64) -> Result<u64> {
    const MIB: u64 = 1 << 20;
    if size == 0 || !size.is_multiple_of(MIB) {
        return Err(Error::invalid(format!("sample size {size} must be a positive multiple of 1 MiB")));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.set_len(size).map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; MIB as usize];
    let text: Vec<u8> = TEXT.bytes().cycle().take(MIB as usize).collect();
    let mut written = 0;
    let mut region_empty = false;
    for i in 0..size / MIB {
        // A third of the 16 MiB regions were never written, as on a real filesystem.
        if i.is_multiple_of(16) {
            region_empty = rng.next().is_multiple_of(3);
        }
        let roll = rng.next() % 4;
        if region_empty {
            continue;
        }
        let data: &[u8] = match roll {
            0 | 1 => {
                rng.fill(&mut buf);
                &buf
            }
            2 => &text,
            _ => continue,
        };
        f.seek(SeekFrom::Start(i * MIB)).map_err(|e| Error::io(path.display(), e))?;
        f.write_all(data).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        written += MIB;
    }
    f.sync_all().map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;
    Ok(written)
}
