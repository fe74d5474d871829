//! Misbehaving clients, many clients, and the server's own limits: every bad request
//! gets an error (the one nbdkit and qemu-nbd give), a broken client is disconnected,
//! and the other clients carry on.

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use support::raw::Raw;
use support::{ok, pattern, tool, Peer, Tern};
use tern_nbd::proto::*;
use tern_nbd::{BlockSizes, Export, FileExport, Listen, MemoryExport, Server, ServerOptions};

fn raw_file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pattern(size as usize, 7)).unwrap();
    p
}

/// Requests no libnbd client would send, answered by errno (simple replies).
fn bad_requests(socket: &Path, export: &str) -> Vec<(String, u32)> {
    let mut c = Raw::connect(socket);
    let (size, _) = c.go(export);
    let cases: [(&str, u16, u16, u64, u32); 7] = [
        ("unknown command 9", 9, 0, 0, 512),
        ("unknown command 0x100", 0x100, 0, 0, 0),
        ("flush with an offset", CMD_FLUSH, 0, 512, 0),
        ("flush with a length", CMD_FLUSH, 0, 0, 512),
        ("block status without a context", CMD_BLOCK_STATUS, 0, 0, 512),
        ("read with DF without structured replies", CMD_READ, CMD_FLAG_DF, 0, 512),
        ("trim that wraps around", CMD_TRIM, 0, u64::MAX - 10, 512),
    ];
    let mut out = Vec::new();
    for (i, (name, kind, flags, offset, length)) in cases.into_iter().enumerate() {
        c.send(kind, flags, i as u64, offset, length, &[]);
        let (err, cookie, _) = c.reply(0).unwrap_or_else(|| panic!("{name}: the server hung up"));
        assert_eq!(cookie, i as u64);
        out.push((name.to_string(), err));
    }
    // Still usable after all that.
    c.send(CMD_READ, 0, 99, size - 512, 512, &[]);
    assert_eq!(c.reply(512).unwrap().0, 0);
    out
}

#[test]
fn bad_requests_get_the_errors_nbdkit_and_qemu_nbd_give() {
    let dir = tempfile::tempdir().unwrap();
    let f = raw_file(dir.path(), "d.raw", 1 << 20);
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&f, false).unwrap());
    let tern = Tern::start(dir.path(), vec![("d".into(), export)]);
    let nbdkit = Peer::nbdkit(dir.path(), &raw_file(dir.path(), "k.raw", 1 << 20), false);
    let qemu = Peer::qemu_nbd(dir.path(), &raw_file(dir.path(), "q.raw", 1 << 20), "d", false);
    let ours = bad_requests(&tern.socket, "d");
    let kit = bad_requests(&nbdkit.socket, "");
    let qem = bad_requests(&qemu.socket, "d");
    for ((o, k), q) in ours.iter().zip(&kit).zip(&qem) {
        assert!(o.1 == k.1 || o.1 == q.1, "{}: tern {}, nbdkit {}, qemu-nbd {}", o.0, o.1, k.1, q.1);
        assert_eq!(o.1, EINVAL, "{}", o.0);
    }
}

#[test]
fn options_are_answered_and_negotiation_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let m: Arc<dyn Export> = Arc::new(MemoryExport::new(1 << 20, false, BlockSizes::default()));
    let tern = Tern::start(dir.path(), vec![("m".into(), m)]);
    let mut c = Raw::connect(&tern.socket);
    let last = |r: Vec<(u32, Vec<u8>)>| r.last().unwrap().0;
    assert_eq!(last(c.option(77, b"whatever")), REP_ERR_UNSUP);
    assert_eq!(last(c.option(OPT_LIST, b"x")), REP_ERR_INVALID);
    assert_eq!(last(c.option(OPT_GO, &tern_nbd::wire::encode_info_request("nope", &[]))), REP_ERR_UNKNOWN);
    assert_eq!(last(c.option(OPT_GO, &[0, 0, 0, 9, b'm'])), REP_ERR_INVALID);
    let meta = tern_nbd::wire::encode_meta_request("m", &[BASE_ALLOCATION]);
    assert_eq!(last(c.option(OPT_SET_META_CONTEXT, &meta)), REP_ERR_INVALID, "needs structured replies");
    assert_eq!(last(c.option(OPT_STARTTLS, &[])), REP_ERR_POLICY, "no TLS configured");
    assert_eq!(last(c.option(OPT_STRUCTURED_REPLY, &[])), REP_ACK);
    assert_eq!(last(c.option(OPT_STRUCTURED_REPLY, &[])), REP_ERR_INVALID);
    let r = c.option(OPT_LIST_META_CONTEXT, &tern_nbd::wire::encode_meta_request("m", &[]));
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, REP_META_CONTEXT);
    let r = c.option(
        OPT_SET_META_CONTEXT,
        &tern_nbd::wire::encode_meta_request("m", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]),
    );
    assert_eq!((r.len(), r[0].0, r[1].0), (2, REP_META_CONTEXT, REP_ACK));
    let r = c.option(OPT_INFO, &tern_nbd::wire::encode_info_request("m", &[INFO_BLOCK_SIZE, INFO_NAME]));
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let (size, flags) = c.go("");
    assert_eq!(size, 1 << 20);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    // An option length far beyond what any option needs: disconnected.
    let mut c = Raw::connect(&tern.socket);
    c.s.write_all(&tern_nbd::wire::encode_option(OPT_GO, &[])[..12]).unwrap();
    c.s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(c.closed());
}

#[test]
fn garbage_and_half_requests_disconnect_only_their_client() {
    let dir = tempfile::tempdir().unwrap();
    let f = raw_file(dir.path(), "d.raw", 4 << 20);
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&f, false).unwrap());
    let tern = Tern::start(dir.path(), vec![("d".into(), export)]);
    // A well-behaved client working throughout.
    let mut good = Raw::connect(&tern.socket);
    good.go("d");
    let want = pattern(4 << 20, 7);
    let check = |good: &mut Raw, i: u64| {
        let off = (i * 65536) % (4 << 20);
        good.send(CMD_READ, 0, i, off, 4096, &[]);
        let (err, cookie, data) = good.reply(4096).expect("the good client is still served");
        assert_eq!((err, cookie), (0, i));
        assert!(data == want[off as usize..off as usize + 4096]);
    };
    check(&mut good, 0);
    // Garbage instead of client flags and options.
    for seed in 0..8u64 {
        let mut s = std::os::unix::net::UnixStream::connect(&tern.socket).unwrap();
        let _ = s.write_all(&pattern(4096, seed + 100));
        drop(s);
        check(&mut good, seed + 1);
    }
    // Garbage after the handshake: bad magic.
    let mut bad = Raw::connect(&tern.socket);
    bad.go("d");
    bad.s.write_all(&pattern(28, 3)).unwrap();
    assert!(bad.closed());
    check(&mut good, 20);
    // A write whose payload never comes: the client leaves mid-request.
    let mut half = Raw::connect(&tern.socket);
    half.go("d");
    half.send(CMD_WRITE, 0, 1, 0, 1 << 20, &[0xee; 1000]);
    drop(half);
    // A header cut in the middle.
    let mut cut = Raw::connect(&tern.socket);
    cut.go("d");
    cut.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(cut);
    check(&mut good, 21);
    // None of those wrote anything.
    assert!(std::fs::read(&f).unwrap() == want);
    // The server still takes new clients.
    let out = ok(tool("nbdinfo").arg("--size").arg(tern.uri("d")));
    assert_eq!(out.trim(), (4u64 << 20).to_string());
    let log = tern.log.lock().unwrap().join("\n");
    assert!(log.contains("bad magic"), "{log}");
    assert!(log.contains("mid-write"), "{log}");
}

#[test]
fn many_connections_with_requests_in_flight_answered_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&f, false).unwrap());
    let tern = Tern::start(dir.path(), vec![("d".into(), export)]);
    let socket = tern.socket.clone();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Raw::connect(&socket);
                c.go("d");
                let base = t << 20;
                // 16 writes in flight, then 16 reads in flight, 4 rounds.
                for round in 0..4u64 {
                    for i in 0..16u64 {
                        let data = pattern(65536, t * 1000 + round * 16 + i);
                        c.send(CMD_WRITE, 0, i, base + i * 65536, 65536, &data);
                    }
                    let mut seen = [false; 16];
                    for _ in 0..16 {
                        let (err, cookie, _) = c.reply(0).unwrap();
                        assert_eq!(err, 0);
                        assert!(!std::mem::replace(&mut seen[cookie as usize], true));
                    }
                    for i in 0..16u64 {
                        c.send(CMD_READ, 0, 100 + i, base + i * 65536, 65536, &[]);
                    }
                    for _ in 0..16 {
                        let (err, cookie, data) = c.reply(65536).unwrap();
                        assert_eq!(err, 0);
                        assert!(
                            data == pattern(65536, t * 1000 + round * 16 + cookie - 100),
                            "cookie {cookie}"
                        );
                    }
                }
                c.send(CMD_DISC, 0, 0, 0, 0, &[]);
                assert!(c.closed());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn block_size_constraints_are_advertised_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = BlockSizes { minimum: 512, preferred: 65536, maximum: 1 << 20 };
    let m: Arc<dyn Export> = Arc::new(MemoryExport::new(4 << 20, false, sizes));
    let tern = Tern::start(dir.path(), vec![("m".into(), m)]);
    let out = ok(tool("nbdinfo").arg("--json").arg(tern.uri("m")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(
        (e["block_size_minimum"].as_u64(), e["block_size_preferred"].as_u64()),
        (Some(512), Some(65536))
    );
    assert_eq!(e["block_size_maximum"], 1 << 20);
    let mut c = Raw::connect(&tern.socket);
    c.go("m");
    c.send(CMD_READ, 0, 1, 3, 512, &[]);
    assert_eq!(c.reply(512).unwrap().0, EINVAL);
    c.send(CMD_WRITE, 0, 2, 512, 100, &[1; 100]);
    assert_eq!(c.reply(0).unwrap().0, EINVAL);
    c.send(CMD_READ, 0, 3, 512, 2 << 20, &[]);
    assert_eq!(c.reply(0).unwrap().0, EINVAL);
    c.send(CMD_READ, 0, 4, 1024, 512, &[]);
    assert_eq!(c.reply(512).unwrap().0, 0);
}

#[test]
fn sockets_are_private_tcp_needs_loopback_and_stop_is_clean() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let m: Arc<dyn Export> = Arc::new(MemoryExport::new(1 << 20, true, BlockSizes::default()));
    let socket = dir.path().join("new").join("s.sock");
    let server =
        Server::bind(&Listen::Unix(socket.clone()), ServerOptions::new(vec![("m".into(), m.clone())]))
            .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600);
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    // A second server on the same live socket is refused.
    assert!(Server::bind(&Listen::Unix(socket.clone()), ServerOptions::new(vec![("m".into(), m.clone())]))
        .is_err());
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.serve().unwrap());
    let mut idle = Raw::connect(&socket);
    idle.go("m");
    stop.stop();
    t.join().unwrap();
    assert!(idle.closed());
    assert!(!socket.exists(), "the socket is removed");

    let addr: std::net::SocketAddr = "192.0.2.1:10809".parse().unwrap();
    let e =
        Server::bind(&Listen::Tcp(addr), ServerOptions::new(vec![("m".into(), m.clone())])).err().unwrap();
    assert!(e.to_string().contains("without TLS"), "{e}");
    let server =
        Server::bind(&Listen::Tcp("127.0.0.1:0".parse().unwrap()), ServerOptions::new(vec![("m".into(), m)]))
            .unwrap();
    let Listen::Tcp(local) = server.local() else { panic!() };
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.serve().unwrap());
    let out = ok(tool("nbdinfo").arg("--size").arg(format!("nbd://{local}/m")));
    assert_eq!(out.trim(), "1048576");
    stop.stop();
    t.join().unwrap();
}

#[test]
fn libnbd_clients_in_parallel_while_others_misbehave() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    std::fs::File::create(&f).unwrap().set_len(8 << 20).unwrap();
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&f, false).unwrap());
    let tern = Tern::start(dir.path(), vec![("d".into(), export)]);
    let socket = tern.socket.clone();
    // Misbehaving clients the whole time the good ones work: garbage, and writes whose
    // payload never comes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let nuisance = std::thread::spawn(move || {
        let mut n = 0u64;
        // Bounded: at least one round, at most 2000, or until the good clients are done.
        loop {
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
                let _ = s.write_all(&pattern(512, n));
            }
            let mut half = Raw::connect(&socket);
            half.go("d");
            half.send(CMD_WRITE, 0, 1, 0, 65536, &[0xee; 100]);
            n += 1;
            if stop2.load(std::sync::atomic::Ordering::Relaxed) || n >= 2000 {
                return n;
            }
        }
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/connections.py");
    let out = ok(support::nbdsh()
        .env("TERN_URI", tern.uri("d"))
        .args(["-c", &format!("exec(open({script:?}).read())")]));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = nuisance.join().unwrap();
    assert_eq!(out.trim(), "ok 256", "{out}");
    assert!(rounds > 0);
    // No byte of the half writes landed.
    let bytes = std::fs::read(&f).unwrap();
    assert!(!bytes.contains(&0xee));
}
