//! Helpers for the server's interop tests: a tern server on a Unix socket in a temp
//! folder, the peers (qemu-nbd, nbdkit) serving the same file, and the clients found
//! on PATH with the package that has them named when they are missing.
#![allow(dead_code)] // Each test binary uses a different subset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod raw;

use tern_nbd::{Export, Listen, Server, ServerOptions, StopHandle};

/// `program`, or a panic naming the Debian package that has it (scripts/deps installs
/// them all).
pub fn tool(program: &str) -> Command {
    let package = match program {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "nbdkit" => "nbdkit",
        "fio" => "fio",
        other => other,
    };
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(found, "{program} is needed (Debian package {package}; scripts/deps installs it)");
    Command::new(program)
}

/// Run to success within `limit`; stdout.
pub fn ok(c: &mut Command) -> String {
    let o = bounded(c, Duration::from_secs(120));
    assert!(
        o.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Run a command that must end by itself within `limit` (killed and a failure
/// otherwise).
pub fn bounded(c: &mut Command, limit: Duration) -> Output {
    let child = c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            // SAFETY: kill of the child this function started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{c:?} did not end within {limit:?}");
        }
    }
}

/// A tern server in this process, stopped (and waited for) on drop.
pub struct Tern {
    pub socket: PathBuf,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Tern {
    pub fn start(dir: &Path, exports: Vec<(String, Arc<dyn Export>)>) -> Tern {
        Tern::start_with(dir, ServerOptions::new(exports))
    }

    pub fn start_with(dir: &Path, mut options: ServerOptions) -> Tern {
        let socket = dir.join("tern.sock");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = log.clone();
        options.log = Some(Arc::new(move |m: &str| l2.lock().unwrap().push(m.to_string())));
        let server = Server::bind(&Listen::Unix(socket.clone()), options).unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.serve().unwrap());
        Tern { socket, stop, thread: Some(thread), log }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Another NBD server (qemu-nbd or nbdkit) serving a file on a Unix socket, killed on
/// drop.
pub struct Peer {
    pub socket: PathBuf,
    pub export: String,
    child: Child,
}

impl Peer {
    /// `qemu-nbd` serving `file` (raw) as export `name`.
    pub fn qemu_nbd(dir: &Path, file: &Path, name: &str, read_only: bool) -> Peer {
        let socket = dir.join("qemu-nbd.sock");
        let mut c = tool("qemu-nbd");
        c.args([
            "-f",
            "raw",
            "--persistent",
            "--shared=16",
            "--cache=writeback",
            "--discard=unmap",
            "-x",
            name,
            "-k",
        ])
        .arg(&socket)
        .arg(file);
        if read_only {
            c.arg("--read-only");
        }
        Peer::spawn(c, socket, name)
    }

    /// `nbdkit file` serving `file`; its one export answers any name.
    pub fn nbdkit(dir: &Path, file: &Path, read_only: bool) -> Peer {
        let socket = dir.join("nbdkit.sock");
        let mut c = tool("nbdkit");
        c.args(["--foreground", "--exit-with-parent", "-U"]).arg(&socket);
        if read_only {
            c.arg("--readonly");
        }
        c.arg("file").arg(format!("file={}", file.display()));
        Peer::spawn(c, socket, "")
    }

    fn spawn(mut c: Command, socket: PathBuf, name: &str) -> Peer {
        let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let start = Instant::now();
        // Bounded: the server creates its socket within seconds or the test fails.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{c:?} did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer { socket, export: name.to_string(), child }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export, self.socket.display())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes (xorshift64*).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw file of `size` bytes with `pattern` data at each of `data` (offset,
/// length) ranges.
pub fn sparse_file(path: &Path, size: u64, data: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in data.iter().enumerate() {
        f.write_all_at(&pattern(len, i as u64 + 1), off).unwrap();
    }
}

/// `nbdsh`, run by a Python that has libnbd's module: nbdsh runs `python3 -m nbd`, and
/// a python3 first on PATH (pyenv, a virtualenv) may not see the system's packages.
pub fn nbdsh() -> Command {
    let mut c = tool("nbdsh");
    let has = |python: &str| {
        Command::new(python)
            .args(["-c", "import nbd"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has("python3") {
        assert!(has("/usr/bin/python3"), "no python3 imports nbd (Debian package python3-libnbd)");
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("/usr/bin:{path}"));
    }
    c
}
