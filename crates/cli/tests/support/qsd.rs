//! A qemu-storage-daemon, the stand-in for a running VM: a qcow2 disk (node `disk0`)
//! and a raw one (`disk1`), each exported writable over NBD as the guest's write path,
//! and a QMP socket for tern.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Qsd {
    pub child: Child,
    args: Vec<String>,
    pub qmp: PathBuf,
    pub nbd: PathBuf,
}

impl Qsd {
    pub fn start(dir: &Path) -> Qsd {
        let (qmp, nbd) = (dir.join("qmp.sock"), dir.join("nbd.sock"));
        let (d0, d1) = (dir.join("web0.qcow2"), dir.join("web1.raw"));
        for (img, fmt) in [(&d0, "qcow2"), (&d1, "raw")] {
            let out = Command::new("qemu-img").args(["create", "-q", "-f", fmt]).arg(img).arg("24M").output();
            assert!(out.expect("qemu-img (qemu-utils) is needed").status.success());
        }
        let args = vec![
            "--blockdev".into(),
            format!("driver=file,filename={},node-name=f0", d0.display()),
            "--blockdev".into(),
            "driver=qcow2,file=f0,node-name=disk0".into(),
            "--blockdev".into(),
            format!("driver=file,filename={},node-name=f1", d1.display()),
            "--blockdev".into(),
            "driver=raw,file=f1,node-name=disk1".into(),
            "--chardev".into(),
            format!("socket,path={},server=on,wait=off,id=qmp0", qmp.display()),
            "--monitor".into(),
            "chardev=qmp0".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export".into(),
            "type=nbd,id=g0,node-name=disk0,name=disk0,writable=on".into(),
            "--export".into(),
            "type=nbd,id=g1,node-name=disk1,name=disk1,writable=on".into(),
        ];
        let child = Self::spawn(&args, &qmp, &nbd);
        Qsd { child, args, qmp, nbd }
    }

    fn spawn(args: &[String], qmp: &Path, nbd: &Path) -> Child {
        let _ = std::fs::remove_file(qmp);
        let _ = std::fs::remove_file(nbd);
        let bin =
            std::env::var_os("TERN_QEMU_STORAGE_DAEMON").unwrap_or_else(|| "qemu-storage-daemon".into());
        let child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon (qemu-system-common) is needed");
        let until = Instant::now() + Duration::from_secs(20);
        // Listening, not only bound: a socket file exists a moment before it accepts.
        let up = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_ok();
        while !(up(qmp) && up(nbd)) {
            assert!(Instant::now() < until, "qemu-storage-daemon did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    }

    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.args, &self.qmp, &self.nbd);
    }

    pub fn uri(&self, disk: &str) -> String {
        format!("nbd+unix:///{disk}?socket={}", self.nbd.display())
    }

    pub fn write(&self, disk: &str, cmd: &str) {
        let out = Command::new("qemu-io").args(["-f", "raw", &self.uri(disk), "-c", cmd]).output().unwrap();
        assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// `qemu-img compare` of a migrated image with the guest's disk now.
    pub fn same_as_guest(&self, image: &Path, fmt: &str, disk: &str) {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", fmt, "-F", "raw"])
            .arg(image)
            .arg(self.uri(disk))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", image.display(), String::from_utf8_lossy(&out.stdout));
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qsd {
    /// Write `len` random bytes (from `seed`) at `offset` of export `disk`.
    pub fn write_random(&self, disk: &str, offset: u64, len: usize, seed: u64) {
        let file = self.qmp.with_file_name(format!("random-{seed}"));
        let mut rng = super::Rng(seed | 1);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes);
        std::fs::write(&file, bytes).unwrap();
        self.write(disk, &format!("write -s {} {offset} {len}", file.display()));
        std::fs::remove_file(&file).unwrap();
    }

    /// tern's objects left in QEMU: nodes, exports, bitmaps named `tern-...`.
    pub fn tern_objects(&self) -> Vec<String> {
        use std::io::{BufRead, BufReader, Write};
        let s = std::os::unix::net::UnixStream::connect(&self.qmp).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        // The greeting.
        r.read_line(&mut line).unwrap();
        let mut cmd = |c: &str| -> serde_json::Value {
            writeln!(w, "{{\"execute\": \"{c}\"}}").unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v.get("return").is_some() {
                    return v["return"].clone();
                }
            }
        };
        cmd("qmp_capabilities");
        let mut out = Vec::new();
        for n in cmd("query-named-block-nodes").as_array().unwrap() {
            let name = n["node-name"].as_str().unwrap_or("");
            if name.starts_with("tern-") {
                out.push(format!("node {name}"));
            }
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                if b["name"].as_str().is_some_and(|s| s.starts_with("tern-")) {
                    out.push(format!("bitmap {} on {name}", b["name"]));
                }
            }
        }
        for x in cmd("query-block-exports").as_array().unwrap() {
            if x["id"].as_str().is_some_and(|s| s.starts_with("tern-")) {
                out.push(format!("export {}", x["id"]));
            }
        }
        out.sort();
        out.dedup();
        out
    }
}
