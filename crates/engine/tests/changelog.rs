//! Change logs (docs/formats/change-log.md): what is written reads back; a log is
//! sealed or absent; every damaged, truncated or foreign log is refused with its name.

use std::os::unix::fs::PermissionsExt;

use tern_engine::changelog::{log_paths, LogHeader, LogReader, LogWriter, RecordKind};
use tern_engine::ErrorKind;

fn header(seq: u64) -> LogHeader {
    LogHeader {
        vm_id: *b"0123456789abcdef",
        disk: 1,
        seq,
        instant_ms: 1_764_700_000_123,
        virtual_size: 64 << 20,
        granularity: 65536,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed | 1).collect()
}

fn small_log(dir: &std::path::Path) -> std::path::PathBuf {
    let mut w = LogWriter::create(dir, header(7)).unwrap();
    w.data(4096, &pattern(1024, 1)).unwrap();
    w.zero(1 << 20, 65536).unwrap();
    w.data(2 << 20, &pattern(512, 2)).unwrap();
    w.seal().unwrap().path
}

#[test]
fn records_read_back_and_zeros_cost_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("disk.qcow2.tern");
    let mut w = LogWriter::create(&logs, header(3)).unwrap();
    let a = pattern(65536, 7);
    w.data(0, &a).unwrap();
    w.data(65536, &vec![0u8; 65536]).unwrap(); // all zero: a zero record
    w.zero(1 << 20, 4 << 20).unwrap();
    let b = pattern(3 * 512, 9);
    w.data((8 << 20) + 512, &b).unwrap();
    let sealed = w.seal().unwrap();
    let (partial, final_path) = log_paths(&logs, 3);
    assert_eq!(sealed.path, final_path);
    assert!(!partial.exists(), "the partial file is renamed at seal");
    assert_eq!((sealed.records, sealed.data_bytes), (4, 65536 + 1536));
    assert_eq!(sealed.changed_bytes, 65536 * 2 + (4 << 20) + 1536);
    assert_eq!(sealed.file_bytes, std::fs::metadata(&final_path).unwrap().len());
    assert_eq!(sealed.file_bytes, 96 + 4 * 16 + 65536 + 1536 + 64);
    assert_eq!(std::fs::metadata(&final_path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&logs).unwrap().permissions().mode() & 0o777, 0o700);

    let r = LogReader::open(&final_path).unwrap();
    assert_eq!(*r.header(), header(3));
    let kinds: Vec<(u64, u64, RecordKind)> =
        r.records().iter().map(|x| (x.offset, x.length, x.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, 65536, RecordKind::Data),
            (65536, 65536, RecordKind::Zero),
            (1 << 20, 4 << 20, RecordKind::Zero),
            ((8 << 20) + 512, 1536, RecordKind::Data),
        ]
    );
    let mut buf = vec![0u8; 65536];
    r.read(&r.records()[0], &mut buf).unwrap();
    assert_eq!(buf, a);
    let mut buf = vec![1u8; 1536];
    r.read(&r.records()[3], &mut buf).unwrap();
    assert_eq!(buf, b);
}

#[test]
fn the_writer_refuses_extents_out_of_order_unaligned_or_past_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::create(dir.path(), header(1)).unwrap();
    w.data(1 << 20, &pattern(4096, 1)).unwrap();
    for (off, len, what) in [
        (0u64, 512u64, "before the end of the previous one"),
        ((1 << 20) + 2048, 512, "before the end of the previous one"),
        ((2 << 20) + 1, 512, "not whole sectors"),
        (2 << 20, 100, "not whole sectors"),
        ((64 << 20) - 512, 1024, "past the disk"),
        (3 << 20, 65 << 20, "at most 64 MiB"),
    ] {
        let err = w.zero(off, len).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains(what), "{off}+{len}: {err}");
    }
    // Still usable after a refusal.
    w.zero(3 << 20, 512).unwrap();
    w.seal().unwrap();
}

#[test]
fn an_unsealed_log_has_no_sealed_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::create(dir.path(), header(5)).unwrap();
    w.data(0, &pattern(4096, 3)).unwrap();
    drop(w); // killed before seal
    let (partial, sealed) = log_paths(dir.path(), 5);
    assert!(partial.exists() && !sealed.exists());
    let err = LogReader::open(&partial).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    // A new writer for the same cycle replaces the partial file.
    let mut w = LogWriter::create(dir.path(), header(5)).unwrap();
    w.zero(0, 512).unwrap();
    w.seal().unwrap();
    assert_eq!(LogReader::open(&sealed).unwrap().records().len(), 1);
}

#[test]
fn every_flipped_byte_and_every_truncation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_log(dir.path());
    let good = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.tlog");
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 0x40;
        std::fs::write(&bad, &b).unwrap();
        let err = LogReader::open(&bad).expect_err(&format!("byte {i} flipped was accepted"));
        assert_eq!(err.kind(), ErrorKind::Corrupt, "byte {i}: {err}");
        assert!(err.to_string().contains("bad.tlog"), "{err}");
    }
    for n in 0..good.len() {
        std::fs::write(&bad, &good[..n]).unwrap();
        let err = LogReader::open(&bad).expect_err(&format!("truncated to {n} bytes was accepted"));
        assert!(matches!(err.kind(), ErrorKind::Corrupt | ErrorKind::Io), "{n}: {err}");
    }
    std::fs::write(&bad, b"not a log at all, just some text that is long enough to have a header and a trailer in it, surely, yes").unwrap();
    let err = LogReader::open(&bad).unwrap_err();
    assert!(err.to_string().contains("not a tern change log"), "{err}");
    let mut v2 = good.clone();
    v2[7] = 2;
    std::fs::write(&bad, &v2).unwrap();
    assert!(LogReader::open(&bad).unwrap_err().to_string().contains("version 2 is not supported"));
}
