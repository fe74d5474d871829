//! Edge cases through libnbd (nbdsh, strict checks off): unaligned, out of bounds,
//! oversized, bad flags, structured replies on and off, read-only; tern must answer
//! each as nbdkit or qemu-nbd answers it (where those two agree, exactly as they do).

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use support::{nbdsh, ok, Peer, Tern};
use tern_nbd::{Export, FileExport};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/edge_cases.py");

fn run(uri: &str, structured: bool) -> BTreeMap<String, Value> {
    let out = ok(nbdsh()
        .env("TERN_URI", uri)
        .env("TERN_SR", if structured { "1" } else { "0" })
        .args(["-c", &format!("exec(open({SCRIPT:?}).read())")]));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn file(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
    p
}

fn compare(read_only: bool, structured: bool) {
    let dir = tempfile::tempdir().unwrap();
    let t = file(dir.path(), "tern.raw");
    let k = file(dir.path(), "nbdkit.raw");
    let q = file(dir.path(), "qemu.raw");
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&t, read_only).unwrap());
    let tern = Tern::start(dir.path(), vec![("disk".into(), export)]);
    let nbdkit = Peer::nbdkit(dir.path(), &k, read_only);
    let qemu = Peer::qemu_nbd(dir.path(), &q, "disk", read_only);
    let ours = run(&tern.uri("disk"), structured);
    let kit = run(&nbdkit.uri(), structured);
    let qem = run(&qemu.uri(), structured);
    let mut differ = Vec::new();
    for (case, got) in &ours {
        // Capabilities are compared below; the peers differ among themselves there.
        if case.starts_with("can_") {
            continue;
        }
        let (a, b) = (&kit[case], &qem[case]);
        if got != a && got != b {
            differ.push(format!("{case}: tern {got}, nbdkit {a}, qemu-nbd {b}"));
        }
    }
    assert!(differ.is_empty(), "read_only {read_only}, structured {structured}:\n{}", differ.join("\n"));
    assert_eq!(ours.len(), kit.len());
    assert_eq!(ours["structured"], Value::Bool(structured));
    assert_eq!(ours["read_only"], Value::Bool(read_only));
    for c in ["can_flush", "can_fua", "can_cache"] {
        assert_eq!(ours[c], Value::Bool(true), "{c}");
    }
    for c in ["can_trim", "can_zero", "can_fast_zero"] {
        assert_eq!(ours[c], Value::Bool(!read_only), "{c}");
    }
    if read_only {
        for c in ["write_unaligned", "write_fua", "trim", "zero_no_hole"] {
            assert_eq!(ours[c], Value::from("EPERM"), "{c}");
        }
    } else {
        for c in ["write_unaligned", "write_fua", "trim", "zero_no_hole", "read_unaligned", "flush"] {
            assert_eq!(ours[c], Value::from("ok"), "{c}");
        }
        assert_eq!(ours["write_past_end"], Value::from("ENOSPC"));
    }
    assert_eq!(ours["read_33m"], Value::from("EINVAL"));
    assert_eq!(ours["read_after_oversized"], Value::from("ok"));
}

#[test]
fn writable_with_structured_replies() {
    compare(false, true);
}

#[test]
fn writable_with_simple_replies() {
    compare(false, false);
}

#[test]
fn read_only_with_structured_replies() {
    compare(true, true);
}

#[test]
fn read_only_with_simple_replies() {
    compare(true, false);
}
