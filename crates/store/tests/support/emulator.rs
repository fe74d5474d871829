//! Object store emulators as child processes on a free loopback port: Azurite (blob
//! service) and moto's S3 server. Each runs in its own temporary folder, is waited for
//! with a bounded wait, and is killed when its guard drops, also on panic.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http;

/// How long an emulator may take to answer its first request. Azurite (node) and moto
/// (python) start in a second or two on an idle machine; this leaves room for a busy one.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running emulator; killed on drop.
pub struct Emulator {
    pub name: &'static str,
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An emulator is not installed and TERN_SKIP_EMULATORS=1 says to skip: the message.
#[derive(Debug)]
pub struct Skipped(pub String);

/// A loopback port nobody listens on right now. Another process could take it before
/// the emulator binds; the emulator then fails to start and the error says so.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    listener.local_addr().expect("local address").port()
}

/// Finds `program` on PATH, or decides what to do without it.
fn find(program: &str) -> Result<PathBuf, Skipped> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let message = format!("{program} is not installed (not on PATH)");
    if std::env::var("TERN_SKIP_EMULATORS").as_deref() == Ok("1") {
        Err(Skipped(message))
    } else {
        panic!("{message}: run scripts/deps to install the store emulators (or set TERN_SKIP_EMULATORS=1 to skip these tests)");
    }
}

fn spawn(name: &'static str, program: &Path, args: &[String], dir: tempfile::TempDir) -> Emulator {
    let port = args
        .iter()
        .position(|a| a == "--blobPort" || a == "-p")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse().ok())
        .expect("emulator arguments name the port");
    let log = dir.path().join("emulator.log");
    let out = File::create(&log).expect("creating the emulator log");
    let err = out.try_clone().expect("cloning the log handle");
    let child = Command::new(program)
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let mut emulator = Emulator { name, port, child, log, _dir: dir };
    emulator.wait_ready();
    emulator
}

impl Emulator {
    fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited during startup ({status}); its output:\n{}", self.name, self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && http::request(self.port, "GET", "/", &[], b"").is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "{} did not answer on 127.0.0.1:{} within {START_TIMEOUT:?}; its output:\n{}",
            self.name,
            self.port,
            self.log_text()
        );
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Azurite's blob service, data in a temporary folder.
pub fn azurite() -> Result<Emulator, Skipped> {
    let program = find("azurite-blob")?;
    let dir = tempfile::tempdir().expect("temporary folder");
    let port = free_port();
    let args = [
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &port.to_string(),
        "--location",
        &dir.path().join("data").display().to_string(),
        "--skipApiVersionCheck",
        "--loose",
        "--silent",
    ]
    .map(String::from);
    Ok(spawn("azurite", &program, &args, dir))
}

/// moto's S3 server (it serves every AWS service; only S3 is used).
pub fn moto() -> Result<Emulator, Skipped> {
    let program = find("moto_server")?;
    let dir = tempfile::tempdir().expect("temporary folder");
    let port = free_port();
    let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
    Ok(spawn("moto", &program, &args, dir))
}
