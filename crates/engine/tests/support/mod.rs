//! Helpers shared by the engine's behaviour tests: a host in a temp folder, VMs,
//! replicate / migrate with no progress display, and the qemu tools as oracles.
#![allow(dead_code)] // Each test binary uses a different subset.

mod oracle;
pub mod steps;

use std::path::{Path, PathBuf};

#[allow(unused_imports)] // Each test binary uses a different subset.
pub use oracle::{qemu, sha256_file};
use tern_engine::throttle::Throttle;
use tern_engine::{
    migrate, replicate, Engine, EngineOptions, Firmware, MigrateFormat, MigrateOptions, MigrateReport,
    PointSelector, ReplicateOptions, ReplicateReport, VmDef,
};

/// A host: a temp folder holding the data directory (state, key, default store).
pub struct Host {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub engine: Engine,
}

impl Host {
    /// A host of an engine opened on a data directory inside `dir`.
    pub fn wrap(engine: Engine, dir: tempfile::TempDir) -> Host {
        let root = dir.path().to_path_buf();
        Host { _dir: dir, root, engine }
    }
}

pub fn host() -> Host {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let engine =
        Engine::open(&EngineOptions { data_dir: Some(root.join("data")), ..Default::default() }).unwrap();
    Host { _dir: dir, root, engine }
}

pub fn add_vm(engine: &Engine, name: &str, disks: &[PathBuf]) {
    add_vm_firmware(engine, name, disks, Firmware::Bios);
}

pub fn add_vm_firmware(engine: &Engine, name: &str, disks: &[PathBuf], firmware: Firmware) {
    engine
        .db()
        .vm_add(&VmDef {
            id: tern_engine::new_vm_id().unwrap(),
            name: name.into(),
            cpus: 2,
            memory_bytes: 2 << 30,
            firmware,
            disks: disks.iter().cloned().map(Into::into).collect(),
            store_url: None,
            qemu: None,
        })
        .unwrap();
}

/// VM "web"'s point `point` migrated to raw images in `<root>/p<i>`, read back, and
/// the folder removed: the disks' bytes.
pub fn migrate_raw(h: &Host, point: &str, i: usize) -> Vec<Vec<u8>> {
    let out = h.root.join(format!("p{i}"));
    let r = migrate(
        &h.engine,
        "web",
        &MigrateOptions {
            point: PointSelector::Id(point.into()),
            format: MigrateFormat::Raw,
            out_dir: out.clone(),
            test: false,
            threads: 2,
            sync: false,
            verify: false,
        },
        &|_| {},
    )
    .unwrap();
    let disks = r.disks.iter().map(|d| std::fs::read(&d.path).unwrap()).collect();
    std::fs::remove_dir_all(out).unwrap();
    disks
}

pub fn run_replicate(
    engine: &Engine,
    name: &str,
    opts: &ReplicateOptions,
) -> tern_engine::Result<ReplicateReport> {
    replicate(engine, name, opts, &Throttle::unlimited(), &|_| {})
}

pub fn run_migrate(
    engine: &Engine,
    name: &str,
    format: MigrateFormat,
    out: &Path,
) -> tern_engine::Result<MigrateReport> {
    migrate(
        engine,
        name,
        &MigrateOptions {
            point: PointSelector::Latest,
            format,
            out_dir: out.into(),
            test: false,
            threads: 3,
            sync: true,
            verify: true,
        },
        &|_| {},
    )
}

/// Point `point` of VM `name` migrated to raw images in `out` (verified): their paths.
pub fn migrate_point(engine: &Engine, name: &str, point: &str, out: &Path) -> Vec<PathBuf> {
    let r = migrate(
        engine,
        name,
        &MigrateOptions {
            point: PointSelector::Id(point.into()),
            format: MigrateFormat::Raw,
            out_dir: out.into(),
            test: false,
            threads: 3,
            sync: false,
            verify: true,
        },
        &|_| {},
    )
    .unwrap();
    r.disks.into_iter().map(|d| d.path).collect()
}

/// `qemu-img compare` of `a` (QEMU driver `fa`) with `b` (driver `fb`). Formats are
/// always given: QEMU probes a fixed VHD as raw.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    qemu("qemu-img", &["compare", "-f", fa, "-F", fb, &a.to_string_lossy(), &b.to_string_lossy()]);
}

/// The virtual size QEMU reads from an image.
pub fn qemu_virtual_size(p: &Path, fmt: &str) -> u64 {
    let info = qemu("qemu-img", &["info", "--output=json", "-f", fmt, &p.to_string_lossy()]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// SHA-256 of an image's guest content as QEMU reads it (`qemu-img convert -O raw`).
pub fn qemu_guest_sha256(p: &Path, fmt: &str, scratch: &Path) -> String {
    let raw = scratch.join(format!("{}.sha-raw", p.file_name().unwrap().to_string_lossy()));
    qemu("qemu-img", &["convert", "-f", fmt, "-O", "raw", &p.to_string_lossy(), &raw.to_string_lossy()]);
    let sha = sha256_file(&raw);
    std::fs::remove_file(&raw).unwrap();
    sha
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded by the tree's size.
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Total bytes of every file under `dir` (0 if it does not exist).
pub fn tree_bytes(dir: &Path) -> u64 {
    if !dir.exists() {
        return 0;
    }
    walk(dir).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

/// The qemu-storage-daemon the QEMU tests run: `$TERN_QEMU_STORAGE_DAEMON` (another
/// QEMU's, e.g. Debian 12's 7.2 unpacked beside the installed one), else the one on PATH.
pub fn qemu_storage_daemon() -> std::process::Command {
    let bin = std::env::var_os("TERN_QEMU_STORAGE_DAEMON").unwrap_or_else(|| "qemu-storage-daemon".into());
    std::process::Command::new(bin)
}

/// A qemu-storage-daemon, the stand-in for a running VM: disk `i` is node `disk{i}` (on
/// file node `f{i}`), exported writable over NBD as `disk{i}`: the guest's write path.
pub struct Qsd {
    pub child: std::process::Child,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
    pub dir: tempfile::TempDir,
    args: Vec<std::ffi::OsString>,
}

impl Qsd {
    /// Start one with a new image per `(format, size)` (`qcow2` or `raw`, qemu-img sizes).
    pub fn start(disks: &[(&str, &str)]) -> Qsd {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let nbd = dir.path().join("nbd.sock");
        let mut c = qemu_storage_daemon();
        for (i, (fmt, size)) in disks.iter().enumerate() {
            let img = dir.path().join(format!("d{i}.{fmt}"));
            let out = Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(&img).arg(size).output();
            let out = out.expect("qemu-img is needed (Debian package qemu-utils; scripts/deps installs it)");
            assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
            c.arg("--blockdev").arg(format!("driver=file,filename={},node-name=f{i}", img.display()));
            c.arg("--blockdev").arg(format!("driver={fmt},file=f{i},node-name=disk{i}"));
        }
        c.arg("--chardev").arg(format!("socket,path={},server=on,wait=off,id=qmp0", qmp.display()));
        c.args(["--monitor", "chardev=qmp0"]);
        c.arg("--nbd-server").arg(format!("addr.type=unix,addr.path={}", nbd.display()));
        for i in 0..disks.len() {
            c.arg("--export").arg(format!("type=nbd,id=g{i},node-name=disk{i},name=disk{i},writable=on"));
        }
        let args: Vec<std::ffi::OsString> = c.get_args().map(|a| a.to_owned()).collect();
        let child = Self::spawn(&args, &qmp, &nbd);
        Qsd { child, qmp, nbd, dir, args }
    }

    fn spawn(args: &[std::ffi::OsString], qmp: &Path, nbd: &Path) -> std::process::Child {
        let _ = std::fs::remove_file(qmp);
        let _ = std::fs::remove_file(nbd);
        let child = qemu_storage_daemon().args(args).stdout(std::process::Stdio::null()).spawn().expect(
            "qemu-storage-daemon is needed (Debian package qemu-system-common; scripts/deps installs it)",
        );
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // Listening, not only bound: a socket file exists a moment before it accepts.
        let up = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(up(qmp) && up(nbd)) {
            assert!(std::time::Instant::now() < until, "qemu-storage-daemon did not create its sockets");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    }

    /// Stop the daemon (SIGKILL when `kill`, else QMP `quit`, a clean close that
    /// writes persistent bitmaps) and start it again on the same images and sockets.
    pub fn restart(&mut self, kill: bool) {
        if kill {
            let _ = self.child.kill();
        } else {
            let mut q =
                tern_engine::qemu::Qmp::connect(&self.qmp, std::time::Duration::from_secs(10)).unwrap();
            let _ = q.execute("quit", None);
        }
        let _ = self.child.wait();
        self.child = Self::spawn(&self.args, &self.qmp, &self.nbd);
    }

    /// Shut the daemon off cleanly (QMP `quit`: persistent bitmaps are written) and
    /// wait for it to exit; [`Qsd::boot`] starts it again.
    pub fn shut_off(&mut self) {
        let mut q = tern_engine::qemu::Qmp::connect(&self.qmp, std::time::Duration::from_secs(10)).unwrap();
        let _ = q.execute("quit", None);
        let _ = self.child.wait();
    }

    /// Start the daemon again on the same images and sockets, after [`Qsd::shut_off`].
    pub fn boot(&mut self) {
        self.child = Self::spawn(&self.args, &self.qmp, &self.nbd);
    }

    /// Disk `i`'s image file.
    pub fn image(&self, i: usize) -> PathBuf {
        let found = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_stem().is_some_and(|s| s == format!("d{i}").as_str()));
        found.unwrap_or_else(|| panic!("no image of disk {i}"))
    }

    /// `vm add NAME --qmp` of this daemon, naming its running NBD server.
    pub fn spec(&self, name: &str) -> tern_engine::QemuVmSpec {
        tern_engine::QemuVmSpec {
            name: name.into(),
            qmp: self.qmp.clone(),
            nodes: Vec::new(),
            nbd: Some(self.nbd.clone()),
            cpus: None,
            memory_bytes: None,
            firmware: None,
            push: None,
            journal: false,
        }
    }

    /// Write `len` bytes of random data (from `seed`) at `offset` of export `disk`.
    pub fn guest_random(&self, disk: &str, offset: u64, len: usize, seed: u64) {
        let file = self.dir.path().join(format!("random-{seed}"));
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&file, bytes).unwrap();
        self.guest(disk, &[format!("write -s {} {offset} {len}", file.display())]);
        std::fs::remove_file(&file).unwrap();
    }

    /// SHA-256 of export `disk` as the guest sees it now.
    pub fn guest_sha256(&self, disk: &str) -> String {
        use sha2::Digest;
        let mut c =
            tern_disk::nbd::NbdClient::connect_unix(&self.nbd, disk, &[], std::time::Duration::from_secs(10))
                .unwrap();
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < c.size() {
            let n = (c.size() - off).min(buf.len() as u64) as usize;
            c.read(&mut buf[..n], off).unwrap();
            h.update(&buf[..n]);
            off += n as u64;
        }
        hex::encode(h.finalize())
    }

    /// Run qemu-io commands on export `disk` (the guest writing).
    pub fn guest(&self, disk: &str, cmds: &[String]) {
        let uri = format!("nbd+unix:///{disk}?socket={}", self.nbd.display());
        let mut c = std::process::Command::new("qemu-io");
        c.args(["-f", "raw", &uri]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where scripts/deps unpacks a qemu-system-x86_64 of the installed qemu-utils'
/// version unless `$TERN_QEMU_SYSTEM_DIR` says otherwise.
const QEMU_SYSTEM_DIR: &str = "/var/cache/tern-test/qemu-system";

/// The qemu-system-x86_64 the real-VM tests run: `$TERN_QEMU_SYSTEM` (scripts/test
/// names Debian 12's 7.2 there for its second run), else one on PATH, else the one of
/// the installed qemu-utils' version that scripts/deps unpacks. Panics saying so when
/// there is none: a missing emulator is not a pass.
pub fn qemu_system_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TERN_QEMU_SYSTEM") {
        return bin.into();
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file());
    if let Some(bin) = on_path {
        return bin;
    }
    let dir =
        std::env::var_os("TERN_QEMU_SYSTEM_DIR").map(PathBuf::from).unwrap_or_else(|| QEMU_SYSTEM_DIR.into());
    let bin = dir.join("bin/qemu-system-x86_64");
    assert!(
        bin.is_file(),
        "no qemu-system-x86_64: not in $TERN_QEMU_SYSTEM, not on PATH, not at {}; run scripts/deps (it \
         unpacks one into {QEMU_SYSTEM_DIR}, or into $TERN_QEMU_SYSTEM_DIR)",
        bin.display()
    );
    bin
}

/// A real QEMU system emulator, the running VM: q35 under TCG, 2 vCPUs, 256 MiB, no
/// OS (the guest sits in its firmware). Disk `i` is node `disk{i}` (on file node
/// `f{i}`) behind device `vd{i}`, a virtio-blk-pci; the guest's writes are HMP
/// `qemu-io` on that device's own block backend, the path a guest's I/O takes. Only
/// its QMP socket is given, as on a host where nothing else was set up for tern.
pub struct QemuSystem {
    pub child: std::process::Child,
    pub qmp: PathBuf,
    pub dir: tempfile::TempDir,
    args: Vec<std::ffi::OsString>,
}

impl QemuSystem {
    /// Start one with a new image per `(format, size)` (`qcow2` or `raw`, qemu-img
    /// sizes), plus `extra` arguments (more devices).
    pub fn start(disks: &[(&str, &str)], extra: &[String]) -> QemuSystem {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let qmp = dir.path().join("qmp.sock");
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let mut arg = |a: String| args.push(a.into());
        for a in ["-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-m", "256", "-smp", "2"] {
            arg(a.into());
        }
        arg("-qmp".into());
        arg(format!("unix:{},server=on,wait=off", qmp.display()));
        for (i, (fmt, size)) in disks.iter().enumerate() {
            let img = dir.path().join(format!("d{i}.{fmt}"));
            let out = Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(&img).arg(size).output();
            let out = out.expect("qemu-img is needed (Debian package qemu-utils; scripts/deps installs it)");
            assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
            arg("-blockdev".into());
            arg(format!("driver=file,filename={},node-name=f{i}", img.display()));
            arg("-blockdev".into());
            arg(format!("driver={fmt},file=f{i},node-name=disk{i}"));
            arg("-device".into());
            arg(format!("virtio-blk-pci,drive=disk{i},id=vd{i}"));
        }
        for a in extra {
            arg(a.clone());
        }
        let child = Self::spawn(&args, &qmp, dir.path());
        QemuSystem { child, qmp, dir, args }
    }

    fn spawn(args: &[std::ffi::OsString], qmp: &Path, dir: &Path) -> std::process::Child {
        let _ = std::fs::remove_file(qmp);
        let bin = qemu_system_bin();
        // qemu-io's reports go to QEMU's stdout: kept in a log beside the images.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("qemu.log")).unwrap();
        let mut child = std::process::Command::new(&bin)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/deps", bin.display()));
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // Listening, not only bound: a socket file exists a moment before it accepts.
        while std::os::unix::net::UnixStream::connect(qmp).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                panic!("{} exited ({status}) before creating its QMP socket:\n{log}", bin.display());
            }
            assert!(std::time::Instant::now() < until, "{} did not create its QMP socket", bin.display());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    }

    /// One QMP command on a connection of its own (tern's pass needs the socket when
    /// it runs: a QMP socket serves one client at a time).
    pub fn qmp(&self, command: &str, arguments: Option<serde_json::Value>) -> serde_json::Value {
        let mut q = tern_engine::qemu::Qmp::connect(&self.qmp, std::time::Duration::from_secs(10)).unwrap();
        q.execute(command, arguments).unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// An HMP command through QMP `human-monitor-command`; its output.
    pub fn hmp(&self, command_line: &str) -> String {
        let out =
            self.qmp("human-monitor-command", Some(serde_json::json!({ "command-line": command_line })));
        out.as_str().unwrap_or_default().to_string()
    }

    /// The guest writing: a qemu-io command (`write -P 0x11 0 1M`) on device `vd{disk}`'s
    /// block backend. HMP answers nothing on success, an error otherwise.
    pub fn guest(&self, disk: usize, cmd: &str) {
        let out = self.hmp(&format!("qemu-io -d vd{disk}/virtio-backend \"{cmd}\""));
        assert!(out.trim().is_empty(), "HMP qemu-io on vd{disk} ({cmd}): {out}");
    }

    /// QMP `query-status`'s `status`: `running`, `paused`, ...
    pub fn status(&self) -> String {
        self.qmp("query-status", None)["status"].as_str().unwrap_or_default().to_string()
    }

    /// QMP `quit` (a clean close: persistent bitmaps are written), and wait for exit.
    pub fn quit(&mut self) {
        let mut q = tern_engine::qemu::Qmp::connect(&self.qmp, std::time::Duration::from_secs(10)).unwrap();
        let _ = q.execute("quit", None);
        let _ = self.child.wait();
    }

    /// Start QEMU again with the same arguments, images and socket, after [`QemuSystem::quit`].
    pub fn boot(&mut self) {
        self.child = Self::spawn(&self.args, &self.qmp, self.dir.path());
    }

    /// Start QEMU again like [`QemuSystem::boot`], with `first` before its other
    /// arguments (devices ahead of the VM's own, so that the nodes QEMU names itself
    /// get other names).
    pub fn boot_with(&mut self, first: &[String]) {
        let mut args: Vec<std::ffi::OsString> = first.iter().map(Into::into).collect();
        args.extend(self.args.iter().cloned());
        self.child = Self::spawn(&args, &self.qmp, self.dir.path());
    }

    /// Disk `i`'s image file.
    pub fn image(&self, i: usize) -> PathBuf {
        let found = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_stem().is_some_and(|s| s == format!("d{i}").as_str()));
        found.unwrap_or_else(|| panic!("no image of disk {i}"))
    }

    /// `vm add NAME --qmp SOCKET`: no nodes (discovered from the devices), no NBD
    /// server (tern starts its own), vCPUs, memory and firmware read from QEMU.
    pub fn spec(&self, name: &str) -> tern_engine::QemuVmSpec {
        tern_engine::QemuVmSpec {
            name: name.into(),
            qmp: self.qmp.clone(),
            nodes: Vec::new(),
            nbd: None,
            cpus: None,
            memory_bytes: None,
            firmware: None,
            push: None,
            journal: false,
        }
    }
}

impl Drop for QemuSystem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
