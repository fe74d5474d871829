//! Oracles shared by the engine's and the `tern` binary's behaviour tests (the CLI's
//! support includes this file by path): the qemu tools, and SHA-256 of a file.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

/// Run a qemu tool; panic with its output if it fails.
pub fn qemu(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// SHA-256 of a whole file, hex, read in pieces.
pub fn sha256_file(p: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    // Bounded by the file's length.
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}
