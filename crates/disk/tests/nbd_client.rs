//! tern's NBD client (`tern_disk::nbd`) against tern's own server (tern-nbd) and
//! against qemu-nbd: the same reads and the same allocation map from both.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_disk::nbd::{NbdClient, NbdDisk, STATE_HOLE, STATE_ZERO};
use tern_disk::{collect_map, Disk};
use tern_nbd::{Export, FileExport, Listen, Server, ServerOptions};

fn image(path: &Path) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(16 << 20).unwrap();
    let mut want = vec![0u8; 16 << 20];
    for (i, &(off, len)) in [(0usize, 65536usize), (3 << 20, 1 << 20), (9 << 20, 4096)].iter().enumerate() {
        let data: Vec<u8> = (0..len).map(|j| (j as u8) ^ (i as u8 + 1)).collect();
        f.write_all_at(&data, off as u64).unwrap();
        want[off..off + len].copy_from_slice(&data);
    }
    want
}

#[test]
fn reads_and_maps_through_terns_server_and_qemu_nbd_alike() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    let want = image(&img);
    let sock = dir.path().join("tern.sock");
    let export: Arc<dyn Export> = Arc::new(FileExport::open(&img, true).unwrap());
    let server =
        Server::bind(&Listen::Unix(sock.clone()), ServerOptions::new(vec![("d".into(), export)])).unwrap();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.serve().unwrap());

    let qsock = dir.path().join("q.sock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _qemu = Kill(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-r", "--persistent", "--shared=4", "-x", "d", "-k"])
            .arg(&qsock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd is needed (Debian package qemu-utils; scripts/deps installs it)"),
    );
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&qsock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(20), "qemu-nbd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut maps = Vec::new();
    for s in [&sock, &qsock] {
        let disk = NbdDisk::open_unix(s, "d", Duration::from_secs(10)).unwrap();
        assert_eq!(disk.virtual_size(), 16 << 20);
        let mut got = vec![0u8; 16 << 20];
        disk.read_at(&mut got, 0).unwrap();
        assert!(got == want, "content through {}", s.display());
        maps.push(collect_map(&disk).unwrap());
        let mut c = NbdClient::connect_unix(s, "d", &["base:allocation"], Duration::from_secs(10)).unwrap();
        assert!(c.read_only());
        let ext = c.extents("base:allocation", 0, 16 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 16 << 20);
        assert_eq!(ext[0].flags & (STATE_HOLE | STATE_ZERO), 0, "data first");
        assert_eq!(ext[1].flags, STATE_HOLE | STATE_ZERO, "then a hole");
        c.disconnect();
    }
    assert_eq!(maps[0], maps[1]);
    stop.stop();
    t.join().unwrap();
}
