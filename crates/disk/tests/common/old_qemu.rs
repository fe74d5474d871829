//! QEMU 7.2 (Debian 12's qemu-img and qemu-io) as a second oracle beside the installed
//! QEMU 10. The two decide some image sizes differently (VHD: CHS geometry or the
//! footer's current size), and many KVM hosts still run 7.2, so images tern writes are
//! checked against both.
//!
//! scripts/deps unpacks it (never installs it over qemu-utils 10) into
//! `/var/cache/tern-test/qemu-7.2`, or into `$TERN_OLD_QEMU_DIR` when that is set; the
//! tools are that folder's `bin/qemu-img` and `bin/qemu-io`. A missing oracle fails the
//! test, saying what to run; outside CI, `TERN_SKIP_OLD_QEMU=1` turns that into a
//! SKIPPED line instead.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where scripts/deps puts it unless `TERN_OLD_QEMU_DIR` says otherwise.
const DEFAULT_DIR: &str = "/var/cache/tern-test/qemu-7.2";

/// The unpacked QEMU 7.2 tools.
pub struct OldQemu {
    pub qemu_img: PathBuf,
    pub qemu_io: PathBuf,
}

/// The QEMU 7.2 oracle, or `None` when it is absent and the caller was allowed to skip
/// (`TERN_SKIP_OLD_QEMU=1`, outside CI). Panics when it is absent otherwise.
pub fn old_qemu() -> Option<OldQemu> {
    let dir = std::env::var_os("TERN_OLD_QEMU_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_DIR.into());
    let q = OldQemu { qemu_img: dir.join("bin/qemu-img"), qemu_io: dir.join("bin/qemu-io") };
    let problem = match (version_line(&q.qemu_img), version_line(&q.qemu_io)) {
        (Ok(a), Ok(b)) if a.starts_with("qemu-img version 7.2.") && b.starts_with("qemu-io version 7.2.") => {
            return Some(q)
        }
        (Ok(a), Ok(_)) if !a.starts_with("qemu-img version 7.2.") => {
            format!("{} is not qemu-img 7.2: it says {a:?}", q.qemu_img.display())
        }
        (Ok(_), Ok(b)) => format!("{} is not qemu-io 7.2: it says {b:?}", q.qemu_io.display()),
        (Err(e), _) | (_, Err(e)) => e,
    };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !ci && std::env::var("TERN_SKIP_OLD_QEMU").as_deref() == Ok("1") {
        eprintln!("SKIPPED (TERN_SKIP_OLD_QEMU=1): QEMU 7.2 oracle not available: {problem}");
        eprintln!("SKIPPED: this test checked nothing against QEMU 7.2; run scripts/deps to check it");
        return None;
    }
    panic!(
        "QEMU 7.2 oracle not available: {problem}. Run scripts/deps (it unpacks Debian 12's qemu-utils into {DEFAULT_DIR}, or into $TERN_OLD_QEMU_DIR){}",
        if ci { "" } else { ", or set TERN_SKIP_OLD_QEMU=1 to skip the checks against it" }
    );
}

fn version_line(tool: &Path) -> Result<String, String> {
    let out = Command::new(tool)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tool.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}\n{}",
            tool.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_string())
}

impl OldQemu {
    /// `qemu-img ARGS...` (7.2), panicking with its stderr if it fails; its stdout.
    pub fn img(&self, args: &[&str]) -> String {
        super::run(Command::new(&self.qemu_img).args(args))
    }

    /// The virtual size `qemu-img info` (7.2) reports for `path` read as `fmt`.
    pub fn virtual_size(&self, fmt: &str, path: &Path) -> u64 {
        let info: serde_json::Value =
            serde_json::from_str(&self.img(&["info", "-f", fmt, "--output=json", path.to_str().unwrap()]))
                .unwrap();
        assert_eq!(info["format"], fmt, "{}: {info}", path.display());
        info["virtual-size"].as_u64().unwrap()
    }

    /// Run `qemu-io -r -f FMT -c CMD... PATH` (7.2), read-only; panics unless every
    /// command succeeded (it exits non-zero on a failed read or pattern mismatch, and
    /// says "failed").
    pub fn io_read_only(&self, fmt: &str, path: &Path, cmds: &[&str]) -> String {
        let mut c = Command::new(&self.qemu_io);
        c.args(["-r", "-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = super::run(c.arg(path));
        assert!(!out.contains("failed"), "qemu-io 7.2 {cmds:?} on {}: {out}", path.display());
        out
    }
}
