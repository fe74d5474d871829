//! The cut test's writer and model (shared by the consistency and journal tests): a
//! writer does numbered steps in a fixed order, each acknowledged before the next is
//! sent: on disk 0 a counter sector then an operation (data, write-zeroes,
//! write-zeroes with unmap), then the same on disk 1, then the next number. A point
//! is one instant of both disks iff each disk equals the replayed model after some
//! prefix of its own steps, and one moment of the global order fits both prefixes.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// The steps of one test.
pub struct Steps {
    /// Bytes per disk.
    pub size: usize,
    /// The last step number.
    pub last: u64,
    /// Whole sectors only (as a guest device writes), else unaligned writes too.
    pub aligned: bool,
}

impl Steps {
    /// Offset of the counter sector.
    pub fn counter(&self) -> usize {
        self.size - 512
    }

    /// Operation of step k on disk d: (kind, offset, length, byte). Kinds: 0 data, 1
    /// write-zeroes, 2 write-zeroes with unmap.
    pub fn op(&self, d: u64, k: u64) -> (u8, usize, usize, u8) {
        let slots = (self.size / 4096 - 8) as u64;
        let mut off = ((k * 7919 + d * 13) % slots) as usize * 4096 + (k % 8) as usize * 512;
        let mut len = 3072 + (k % 5) as usize * 4096;
        if !self.aligned {
            off += (k % 3) as usize * 100;
            len -= 72;
        }
        let kind = if k.is_multiple_of(9) {
            1
        } else if k.is_multiple_of(13) {
            2
        } else {
            0
        };
        (kind, off, len.min(self.counter() - off), (k * 31 + d) as u8 | 1)
    }

    fn qemu_io_cmd(&self, d: u64, k: u64) -> String {
        let (kind, off, len, b) = self.op(d, k);
        match kind {
            0 => format!("write -P {b} {off} {len}"),
            1 => format!("write -z {off} {len}"),
            _ => format!("write -z -u {off} {len}"),
        }
    }

    /// Disk d after its steps up to `k` (the counter of k written) and, if `with_op`,
    /// the operation of k too.
    pub fn model(&self, d: u64, k: u64, with_op: bool) -> Vec<u8> {
        let mut m = vec![0u8; self.size];
        let c = self.counter();
        for j in 1..=k {
            m[c..].fill(j as u8);
            if j < k || with_op {
                let (kind, off, len, b) = self.op(d, j);
                m[off..off + len].fill(if kind == 0 { b } else { 0 });
            }
        }
        m
    }

    /// Which state of disk `d` the bytes are (there is at most one): (k, with_op).
    pub fn state_of(&self, d: u64, bytes: &[u8]) -> Option<(u64, bool)> {
        let k = u64::from(bytes[self.counter()]);
        [(k, true), (k, false)].into_iter().find(|&(k, w)| self.model(d, k, w) == bytes)
    }

    /// Whether a point's two disks are the guest at one instant; the states found.
    pub fn consistent(&self, disks: &[Vec<u8>]) -> (bool, String) {
        let (Some(s0), Some(s1)) = (self.state_of(0, &disks[0]), self.state_of(1, &disks[1])) else {
            return (false, "a disk is not any prefix of its writes".into());
        };
        let (a0, b0) = moments(0, s0.0, s0.1);
        let (a1, b1) = moments(1, s1.0, s1.1);
        (a0.max(a1) <= b0.min(b1), format!("disk0 at {s0:?}, disk1 at {s1:?}"))
    }

    /// Write every step through the NBD exports `disk0` and `disk1` at `nbd` (the
    /// guest's write path), storing the last step done in `progress`. Every write
    /// must succeed: the guest never sees tern.
    pub fn writer(&self, nbd: &Path, progress: &AtomicU64) {
        for k in 1..=self.last {
            for d in 0..2u64 {
                let uri = format!("nbd+unix:///disk{d}?socket={}", nbd.display());
                let out = Command::new("qemu-io")
                    .args([
                        "-f",
                        "raw",
                        &uri,
                        "-c",
                        &format!("write -P {k} {} 512", self.counter()),
                        "-c",
                        &self.qemu_io_cmd(d, k),
                    ])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
            }
            progress.store(k, Ordering::Relaxed);
        }
    }
}

/// The global position of a disk's state: steps are numbered 4k-3 (disk 0 counter),
/// 4k-2 (disk 0 op), 4k-1 (disk 1 counter), 4k (disk 1 op). Returns the range of
/// global moments (last step applied) that leave the disk in this state.
fn moments(d: u64, k: u64, with_op: bool) -> (u64, u64) {
    if k == 0 {
        return (0, if d == 0 { 0 } else { 2 });
    }
    let step = 4 * k - 3 + 2 * d + u64::from(with_op);
    // Until the disk's next step.
    let next = if with_op { 4 * (k + 1) - 3 + 2 * d } else { step + 1 };
    (step, next - 1)
}
