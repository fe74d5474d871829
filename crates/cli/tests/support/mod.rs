//! Helpers shared by the `tern` binary's behaviour tests: running the binary, sample
//! images, reading a local store folder, and the peers used as oracles or stores
//! (qemu-img, moto's S3 server behind a loopback proxy that can be cut, tmpfs).
#![allow(dead_code)] // Each test binary uses a different subset.

#[path = "../../../engine/tests/support/oracle.rs"]
mod oracle;
pub mod proxy;
pub mod qsd;
pub mod serve;

#[allow(unused_imports)] // Each test binary uses a different subset.
pub use oracle::{qemu, sha256_file as sha256};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary with its own data directory and no environment leaking in.
pub fn tern(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.arg("--data-dir").arg(data);
    c.env_remove("TERN_DATA_DIR").env_remove("TERN_KEY_FILE");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("AZURE_") || k.starts_with("AZURITE_") {
            c.env_remove(&*k);
        }
    }
    c
}

/// Run to success; stdout.
pub fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run to failure (exit status 1) with one `tern: error:` line; that line.
pub fn fails(c: &mut Command) -> String {
    let o: Output = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{c:?} should fail: {}\n{err}", String::from_utf8_lossy(&o.stdout));
    one_error_line(&err)
}

/// The single `tern: error:` line of a failed run's stderr (other lines are progress).
pub fn one_error_line(stderr: &str) -> String {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("tern: error: ")).collect();
    assert_eq!(errors.len(), 1, "one error line expected in:\n{stderr}");
    assert!(stderr.ends_with(&format!("{}\n", errors[0])), "the error is the last thing printed:\n{stderr}");
    errors[0].to_string()
}

/// Run a command that must end by itself; kill it and fail after `limit` (a hang is a
/// bug: no test waits forever). Returns the status, stderr and the time it took.
pub fn run_bounded(c: &mut Command, limit: Duration) -> (ExitStatus, String, Duration) {
    let start = Instant::now();
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = { stderr }.read_to_string(&mut s);
        s
    });
    let status = wait_bounded(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{c:?} did not end within {limit:?}");
    });
    (status, reader.join().unwrap(), start.elapsed())
}

/// Wait for `child` at most `limit`; `None` if it is still running.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    // Bounded by `limit`.
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A small deterministic generator (xorshift64*) for image content and kill moments.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A raw image of `mib` MiB of incompressible data: every chunk is stored, at the
/// same size under any key, so bytes at the store are a count of chunks.
pub fn random_image(path: &Path, mib: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
}

/// `tern status NAME --json` of one VM.
pub fn status(data: &Path, name: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok(tern(data).args(["status", name, "--json"]))).unwrap();
    v[0].clone()
}

/// Chunk objects in a local store folder: name -> size. Staging files of unfinished
/// writes (`name#n`) are not chunks.
pub fn chunk_objects(store: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(shards) = std::fs::read_dir(store.join("chunks")) else { return out };
    for shard in shards.flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.insert(name, f.metadata().unwrap().len());
            }
        }
    }
    out
}

/// Staging files an interrupted write left in a local store: path -> (size, links).
/// A staging file with two links was complete and linked to its final name.
pub fn staging_files(store: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let Ok(shards) = std::fs::read_dir(store.join("chunks")) else { return out };
    for shard in shards.flatten() {
        for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
            if f.file_name().to_string_lossy().contains('#') {
                let m = f.metadata().unwrap();
                out.insert(f.path(), (m.len(), m.nlink()));
            }
        }
    }
    out
}

/// A new key in `key_file` and the `config.json` of a new store with `chunk_size` for
/// it: the store layout allows any power-of-two chunk size from 64 KiB to 64 MiB
/// (docs/formats/store-layout.md), and smaller chunks make more kill points.
pub fn new_store_config(key_file: &Path, chunk_size: u32) -> String {
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    let key = tern_chunk::Key::generate().unwrap();
    key.save_new(key_file).unwrap();
    serde_json::json!({
        "format": "tern-store",
        "version": 1,
        "key_id": key.id().to_string(),
        "chunk_size": chunk_size,
    })
    .to_string()
}

/// [`new_store_config`] for a store in the local folder `store`.
pub fn new_store_with_chunk_size(key_file: &Path, store: &Path, chunk_size: u32) {
    std::fs::create_dir_all(store).unwrap();
    std::fs::write(store.join("config.json"), new_store_config(key_file, chunk_size)).unwrap();
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// moto's S3 server on a free loopback port, killed on drop.
pub struct Moto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start moto with bucket `bucket`, or `None` (with a SKIPPED line) when it is not
/// installed and TERN_SKIP_EMULATORS=1 allows that; CI installs it (scripts/deps).
pub fn moto(bucket: &str) -> Option<Moto> {
    if !on_path("moto_server") {
        if std::env::var("TERN_SKIP_EMULATORS").as_deref() == Ok("1") {
            println!("SKIPPED: moto_server is not installed");
            return None;
        }
        panic!("moto_server is not installed: run scripts/deps (or set TERN_SKIP_EMULATORS=1 to skip)");
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut m = Moto { port, child, _dir: dir };
    let start = Instant::now();
    // Bounded: moto answers within seconds; 60 s leaves room for a busy machine.
    loop {
        assert!(m.child.try_wait().unwrap().is_none(), "moto exited during startup");
        if let Ok(200) = proxy::http_put(port, &format!("/{bucket}"), b"") {
            return Some(m);
        }
        assert!(start.elapsed() < Duration::from_secs(60), "moto did not answer on port {port} within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The environment that points `tern` at an S3 server on loopback `port`.
pub fn s3_env(c: &mut Command, port: u16) -> &mut Command {
    c.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
}

/// A tmpfs mounted on a temp folder, unmounted on drop (also on panic).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mount one of `size` (mount's syntax: `8m`), or `Err(why)` when not permitted.
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tern-test"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Change its size in place; the files stay.
    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}
