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
