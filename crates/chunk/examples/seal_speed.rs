//! The machine's single-core limit for replication: keyed BLAKE3 + zstd level 1 +
//! AES-256-GCM over every non-zero 4 MiB chunk of a file read from the page cache.
//! Used by bench/replicate.sh to report tern's throughput as a fraction of it.
//!
//!     cargo run --release -p tern-chunk --example seal_speed -- FILE

use std::io::Read;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("usage: seal_speed FILE");
    let key = tern_chunk::Key::from_bytes([1; 32]);
    let mut f = std::fs::File::open(&path).expect("open");
    let mut buf = vec![0u8; tern_chunk::DEFAULT_CHUNK_SIZE as usize];
    let (mut data, mut total) = (0u64, 0u64);
    let t = Instant::now();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).expect("read") {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        total += n as u64;
        if buf[..n].iter().any(|&b| b != 0) {
            data += n as u64;
            std::hint::black_box(tern_chunk::seal_chunk(&key, &buf[..n], 1).expect("seal"));
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{{\"seconds\": {s:.3}, \"bytes\": {total}, \"data_bytes\": {data}, \"data_mib_per_s\": {:.1}}}",
        data as f64 / s / 1048576.0
    );
}
