//! Raw images: sparse mapping and round trips, checked against qemu-img.

use std::process::Command;

use tern_disk::{open_disk, MapKind, OpenOptions};

fn qemu_io(path: &std::path::Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(path).output().expect("qemu-io runs");
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sparse_raw_maps_holes_as_zero_and_data_as_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    qemu_io(&img, &["write -P 0x5a 8M 1M", "write -P 0x01 40M 64K"]);
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    let map = tern_disk::collect_map(disk.as_ref()).unwrap();
    let data: Vec<(u64, u64)> =
        map.iter().filter(|m| m.kind == MapKind::Data).map(|m| (m.start, m.length)).collect();
    // Filesystems may allocate a little more than written, never less.
    assert!(data.iter().any(|&(s, l)| s <= 8 << 20 && s + l >= 9 << 20), "{map:?}");
    assert!(data.iter().any(|&(s, l)| s <= 40 << 20 && s + l >= (40 << 20) + (64 << 10)), "{map:?}");
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 8 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[test]
fn read_past_end_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, vec![1u8; 4096]).unwrap();
    let disk = open_disk(&img, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 512];
    let err = disk.read_at(&mut buf, 4000).unwrap_err();
    assert_eq!(err.kind(), tern_disk::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("beyond the virtual size"), "{err}");
}

/// Writes through the concurrent handle with direct I/O on: aligned buffers bypass the
/// page cache, unaligned ones (the odd tail of a disk) do not, from several threads at
/// once; the image reads back exactly as written.
#[test]
fn direct_and_buffered_writes_mix_into_one_exact_image() {
    use tern_disk::{create_disk, AlignedBuf, CreateFormat, CreateOptions, DIRECT_ALIGN};
    let dir = tempfile::tempdir().unwrap();
    for format in [CreateFormat::Raw, CreateFormat::VhdFixed] {
        let path = dir.path().join(format!("{format:?}.img"));
        // Not a multiple of the alignment: the last piece must go through the page cache.
        let size = (3 << 20) + 1536;
        let w = create_disk(&path, &CreateOptions { format, virtual_size: size }).unwrap();
        let c = w.concurrent().expect("fixed layout");
        // The temp folder's filesystem (ext4, XFS, tmpfs from Linux 6.6) takes O_DIRECT;
        // a test that silently fell back to the page cache would prove nothing.
        assert!(c.direct_io(), "{format:?}: direct I/O could not be turned on in {}", dir.path().display());
        let mut expected = vec![0u8; size as usize];
        std::thread::scope(|s| {
            for t in 0..3u8 {
                let c = c.clone();
                s.spawn(move || {
                    let mut buf = AlignedBuf::zeroed(1 << 20);
                    buf.iter_mut().enumerate().for_each(|(i, b)| *b = (i as u8) ^ (t + 1));
                    c.write_at(&buf, u64::from(t) << 20).unwrap();
                });
            }
        });
        for t in 0..3usize {
            expected[t << 20..(t + 1) << 20]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u8) ^ (t as u8 + 1));
        }
        // Unaligned in memory, offset and length: the page cache path.
        let tail = vec![0xabu8; 1536];
        c.write_at(&tail, 3 << 20).unwrap();
        expected[3 << 20..].copy_from_slice(&tail);
        let odd = vec![0x5au8; 100];
        c.write_at(&odd, (1 << 20) + 7).unwrap();
        expected[(1 << 20) + 7..(1 << 20) + 107].copy_from_slice(&odd);
        // An aligned write over bytes just written through the page cache wins.
        let mut fix = AlignedBuf::zeroed(DIRECT_ALIGN);
        fix.fill(0x11);
        c.write_at(&fix, 1 << 20).unwrap();
        expected[1 << 20..(1 << 20) + DIRECT_ALIGN].fill(0x11);
        drop(c);
        w.finish().unwrap();
        let d = open_disk(&path, &OpenOptions::read_only()).unwrap();
        let mut got = vec![0u8; size as usize];
        d.read_at(&mut got, 0).unwrap();
        assert!(got == expected, "{format:?}: content differs");
    }
}

mod not_a_disk {
    use std::path::Path;

    use tern_disk::{open_disk, ErrorKind, Format, OpenOptions};

    fn err(path: &Path, format: Option<Format>) -> tern_disk::Error {
        match open_disk(path, &OpenOptions { format, ..OpenOptions::read_only() }) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn a_name_that_promises_a_format_must_hold_it() {
        let d = tempfile::tempdir().unwrap();
        // A VHD that lost its footer: the data of a fixed VHD without its last 512 bytes.
        let vhd = d.path().join("web.vhd");
        let o = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vpc", "-o", "subformat=fixed"])
            .arg(&vhd)
            .arg("4M")
            .output()
            .expect("qemu-img runs (scripts/deps installs qemu-utils)");
        assert!(o.status.success());
        let len = std::fs::metadata(&vhd).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&vhd).unwrap().set_len(len - 512).unwrap();
        let e = err(&vhd, None);
        assert_eq!(e.kind(), ErrorKind::NotADisk);
        let m = e.to_string();
        assert!(m.contains("web.vhd") && m.contains("the name says vhd") && m.contains("conectix"), "{m}");
        // Said to be raw, it is one: the VHD's data, whole sectors.
        let disk =
            open_disk(&vhd, &OpenOptions { format: Some(Format::Raw), ..OpenOptions::read_only() }).unwrap();
        assert_eq!(disk.virtual_size(), len - 512);

        // Random bytes named .qcow2 / .vhdx; a qcow2 named .vhdx says what it is.
        for name in ["random.qcow2", "random.VHDX", "random.avhdx"] {
            let p = d.path().join(name);
            std::fs::write(&p, vec![0x5a; 1 << 20]).unwrap();
            let e = err(&p, None);
            assert_eq!(e.kind(), ErrorKind::NotADisk, "{name}: {e}");
        }
        let q = d.path().join("real.vhdx");
        let o = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("1M")
            .output()
            .unwrap();
        assert!(o.status.success());
        let m = err(&q, None).to_string();
        assert!(m.contains("the name says vhdx") && m.contains("its content is a qcow2 image"), "{m}");
    }

    #[test]
    fn a_raw_disk_is_whole_sectors() {
        let d = tempfile::tempdir().unwrap();
        let text = d.path().join("notes.txt");
        std::fs::write(&text, b"this is not a disk :-)\n").unwrap();
        for format in [None, Some(Format::Raw)] {
            let e = err(&text, format);
            assert_eq!(e.kind(), ErrorKind::NotADisk);
            assert!(e.to_string().contains("23 bytes"), "{e}");
        }
        let odd = d.path().join("odd.img");
        std::fs::write(&odd, vec![0; 1000]).unwrap();
        assert_eq!(err(&odd, None).kind(), ErrorKind::NotADisk);
        let whole = d.path().join("whole.img");
        std::fs::write(&whole, vec![0; 1024]).unwrap();
        assert_eq!(open_disk(&whole, &OpenOptions::read_only()).unwrap().virtual_size(), 1024);
    }
}
