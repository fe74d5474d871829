//! Guest-content equality of two disks, whatever their formats, with the semantics
//! of `qemu-img compare`: if sizes differ, the larger disk's tail must read as zeros.

use crate::{Disk, Result};

const BUFFER: usize = 1 << 20;

/// The result of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOutcome {
    /// Same guest content.
    Identical,
    /// Content differs; the first differing guest offset.
    Differs { offset: u64 },
}

/// Compare the guest content of `a` and `b`. Ranges both map as zero are not read.
pub fn compare(
    a: &dyn Disk,
    b: &dyn Disk,
    progress: Option<crate::ConvertProgress<'_>>,
) -> Result<CompareOutcome> {
    let common = a.virtual_size().min(b.virtual_size());
    let total = a.virtual_size().max(b.virtual_size());
    let mut ba = vec![0u8; BUFFER];
    let mut bb = vec![0u8; BUFFER];
    let mut off = 0;
    while off < common {
        let want = (common - off).min(BUFFER as u64);
        let ma = a.mapping(off, want)?;
        let mb = b.mapping(off, want)?;
        let len = ma.length.min(mb.length);
        let n = len as usize;
        // Word-wise equality and zero checks first; a byte scan only to name the offset.
        let mismatch = match (ma.kind.reads_as_zero(), mb.kind.reads_as_zero()) {
            (true, true) => None,
            (false, true) => {
                a.read_at(&mut ba[..n], off)?;
                first_nonzero(&ba[..n])
            }
            (true, false) => {
                b.read_at(&mut bb[..n], off)?;
                first_nonzero(&bb[..n])
            }
            (false, false) => {
                a.read_at(&mut ba[..n], off)?;
                b.read_at(&mut bb[..n], off)?;
                (ba[..n] != bb[..n]).then(|| ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y)).flatten()
            }
        };
        if let Some(i) = mismatch {
            return Ok(CompareOutcome::Differs { offset: off + i as u64 });
        }
        off += len;
        if let Some(p) = progress {
            p(off, total);
        }
    }
    let longer = if a.virtual_size() > common { a } else { b };
    while off < total {
        let m = longer.mapping(off, (total - off).min(BUFFER as u64))?;
        if !m.kind.reads_as_zero() {
            let n = m.length as usize;
            longer.read_at(&mut ba[..n], off)?;
            if let Some(i) = first_nonzero(&ba[..n]) {
                return Ok(CompareOutcome::Differs { offset: off + i as u64 });
            }
        }
        off += m.length;
        if let Some(p) = progress {
            p(off, total);
        }
    }
    Ok(CompareOutcome::Identical)
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    if crate::is_zero(buf) {
        None
    } else {
        buf.iter().position(|&x| x != 0)
    }
}
