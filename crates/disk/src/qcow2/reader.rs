//! Reading qcow2 images: guest offset -> L1 -> L2 -> host bytes, with runs of
//! contiguous clusters coalesced into one `pread` and runs of the same kind merged
//! into one mapping.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::cache::{L2Cache, L2Table};
use super::compress::decompress_cluster;
use super::extension::Extensions;
use super::geometry::{Geometry, MAX_CLUSTER_BITS};
use super::header::{compatible, incompatible, Header};
use super::l2::{CompressedCluster, EntryDecoder, HostOffset, Unit};
use crate::io::ImageFile;
use crate::{
    check_range, BackingInfo, Disk, Error, Format, ImageInfo, MapKind, Mapping, OpenOptions, Result,
};

/// An open qcow2 image (read-only).
pub struct Qcow2Disk {
    file: ImageFile,
    header: Header,
    extensions: Extensions,
    decoder: EntryDecoder,
    /// The active L1 table, only the entries the virtual size needs.
    l1: Vec<u64>,
    cache: Mutex<L2Cache>,
    backing_name: Option<String>,
    /// The opened backing file and the path it resolved to.
    backing: Option<(Box<dyn Disk>, PathBuf)>,
}

/// What a run of guest bytes found by walking the tables is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    /// Uncompressed, starting at this host offset.
    Data(HostOffset),
    /// Inside the compressed cluster at guest offset `guest_cluster`.
    Compressed {
        cluster: CompressedCluster,
        guest_cluster: u64,
    },
    Zero,
    Unallocated,
}

impl RunKind {
    fn map_kind(self) -> MapKind {
        match self {
            RunKind::Data(_) | RunKind::Compressed { .. } => MapKind::Data,
            RunKind::Zero => MapKind::Zero,
            RunKind::Unallocated => MapKind::Unallocated,
        }
    }
}

/// How far a run extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Merge {
    /// While the bytes can be read the same way: host-contiguous data, one compressed
    /// cluster, zeros, unallocated.
    Readable,
    /// While the map kind stays the same.
    SameKind,
}

impl Qcow2Disk {
    /// Open a qcow2 image. `seen` holds the images above it in a backing chain
    /// (including this one), for loop detection when the backing file is opened.
    pub fn open(file: ImageFile, options: &OpenOptions, seen: &mut Vec<PathBuf>) -> Result<Self> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        let first = read_first_cluster(&file, file_len)?;
        let (header, extensions) = Header::parse(&first, &path)?;
        let backing_name = header.backing_name(&first, &path)?;
        let geometry = Geometry::new(header.cluster_bits, header.extended_l2());
        let decoder = EntryDecoder { geometry, file_len, v3: header.version >= 3 };
        let l1 = read_l1(&file, &header, geometry, file_len)?;

        let backing = match (&backing_name, options.allow_backing) {
            (Some(name), true) => {
                let format = backing_format(extensions.backing_format.as_deref(), &path)?;
                let disk = crate::detect::open_backing(&path, name, format, options, seen)?;
                Some((disk, crate::detect::resolve_backing(&path, name)))
            }
            _ => None,
        };
        Ok(Qcow2Disk {
            cache: Mutex::new(L2Cache::new(geometry.cluster_size())),
            file,
            header,
            extensions,
            decoder,
            l1,
            backing_name,
            backing,
        })
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn geometry(&self) -> Geometry {
        self.decoder.geometry
    }

    /// The L2 table for L1 index `l1_index`, or `None` if it is unallocated.
    fn l2_table(&self, l1_index: u64) -> Result<Option<L2Table>> {
        let entry = self.l1[l1_index as usize];
        let Some(at) = self.decoder.l2_table(entry, l1_index, self.path())? else {
            return Ok(None);
        };
        if let Some(t) = self.lock_cache().get(at) {
            return Ok(Some(t));
        }
        let mut bytes = vec![0u8; self.geometry().cluster_size() as usize];
        self.file.read_exact_at(&mut bytes, at.0)?;
        let table: L2Table =
            bytes.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect();
        self.lock_cache().insert(at, table.clone());
        Ok(Some(table))
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, L2Cache> {
        // The cache holds only immutable tables; a panic elsewhere cannot leave it
        // half-updated, so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run starting at guest `start`, at most `max_len` bytes (at least one unit or
    /// the rest of the disk), extended while `merge` allows.
    fn run_at(&self, start: u64, max_len: u64, merge: Merge) -> Result<(u64, RunKind)> {
        let g = self.geometry();
        let end = start + max_len.min(self.header.size - start);
        let unit = 1u64 << g.unit_bits();
        let cluster = g.cluster_size();
        let mut pos = start;
        let mut first: Option<RunKind> = None;
        // Whether `next`, found at `pos`, continues the run.
        let continues = |first: &mut Option<RunKind>, next: RunKind, pos: u64| -> bool {
            let Some(kind) = *first else {
                *first = Some(next);
                return true;
            };
            match merge {
                Merge::SameKind => kind.map_kind() == next.map_kind(),
                Merge::Readable => match (kind, next) {
                    (RunKind::Data(h), RunKind::Data(n)) => h.0 + (pos - start) == n.0,
                    (a, b) => a == b,
                },
            }
        };
        'tables: while pos < end {
            let l1_index = g.l1_index(pos);
            let table_end = ((l1_index + 1) << g.l2_span_bits()).min(end);
            let Some(table) = self.l2_table(l1_index)? else {
                if !continues(&mut first, RunKind::Unallocated, pos) {
                    break;
                }
                pos = table_end;
                continue;
            };
            while pos < table_end {
                let guest_cluster = pos & !(cluster - 1);
                let index = g.l2_index(pos);
                let (entry, bitmap) =
                    if g.extended_l2 { (table[2 * index], table[2 * index + 1]) } else { (table[index], 0) };
                let unit_start = pos & !(unit - 1);
                let sub = ((unit_start - guest_cluster) >> g.unit_bits()) as u32;
                let kind = match self.decoder.unit(entry, bitmap, sub, guest_cluster, self.path())? {
                    Unit::Data(h) => RunKind::Data(HostOffset(h.0 + (pos - unit_start))),
                    Unit::Compressed(c) => RunKind::Compressed { cluster: c, guest_cluster },
                    Unit::Zero => RunKind::Zero,
                    Unit::Unallocated => RunKind::Unallocated,
                };
                if !continues(&mut first, kind, pos) {
                    break 'tables;
                }
                // A compressed cluster has no subclusters: skip to its end at once.
                let step_end = if matches!(kind, RunKind::Compressed { .. }) {
                    guest_cluster + cluster
                } else {
                    unit_start + unit
                };
                pos = step_end.min(table_end);
            }
        }
        // `start < end`, so the first iteration always sets `first`.
        Ok((pos - start, first.unwrap_or(RunKind::Unallocated)))
    }

    fn read_compressed(
        &self,
        out: &mut [u8],
        c: CompressedCluster,
        skip: u64,
        guest_cluster: u64,
    ) -> Result<()> {
        let cluster_size = self.geometry().cluster_size() as usize;
        let mut input = vec![0u8; c.len as usize];
        // The last sector of the last compressed cluster may be cut short by the end of
        // the file; qemu reads zeros there, and so do we.
        self.file.read_at_zero_fill(&mut input, c.host.0)?;
        let mut cluster = vec![0u8; cluster_size];
        decompress_cluster(self.header.compression, &input, &mut cluster).map_err(|why| {
            Error::corrupt(
                self.path(),
                format!(
                    "compressed cluster for guest offset {guest_cluster:#x} at host offset {:#x} ({} bytes) does not decompress: {why}",
                    c.host.0, c.len
                ),
            )
        })?;
        out.copy_from_slice(&cluster[skip as usize..skip as usize + out.len()]);
        Ok(())
    }

    fn read_backing(&self, out: &mut [u8], offset: u64) -> Result<()> {
        let Some((disk, _)) = &self.backing else {
            out.fill(0);
            return Ok(());
        };
        let size = disk.virtual_size();
        let n = if offset >= size { 0 } else { (size - offset).min(out.len() as u64) as usize };
        if n > 0 {
            disk.read_at(&mut out[..n], offset)?;
        }
        out[n..].fill(0);
        Ok(())
    }
}

/// The first cluster of the file (or all of a shorter file), where the header and its
/// extensions live. The cluster size is in the header: read enough for the fixed
/// fields, then the whole first cluster if the size is one tern handles.
pub(super) fn read_first_cluster(file: &ImageFile, file_len: u64) -> Result<Vec<u8>> {
    let mut first = vec![0u8; file_len.min(512) as usize];
    file.read_exact_at(&mut first, 0)?;
    if first.len() >= 24 && first[..4] == super::MAGIC {
        let bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
        if bits <= MAX_CLUSTER_BITS {
            let want = file_len.min(1 << bits) as usize;
            if want > first.len() {
                first = vec![0u8; want];
                file.read_exact_at(&mut first, 0)?;
            }
        }
    }
    Ok(first)
}

/// Check the L1 table's place in the file and read the entries the virtual size needs.
fn read_l1(file: &ImageFile, h: &Header, g: Geometry, file_len: u64) -> Result<Vec<u64>> {
    let needed = g.l1_entries_for(h.size) as usize;
    if h.l1_size == 0 {
        return Ok(Vec::new());
    }
    let off = h.l1_table_offset;
    let bytes = u64::from(h.l1_size) * 8;
    let what = format!("L1 table at offset {off:#x} (l1_table_offset, offset 40) of {} entries", h.l1_size);
    if off & (g.cluster_size() - 1) != 0 {
        return Err(Error::corrupt(file.path(), format!("{what} is not aligned to a cluster")));
    }
    if off < g.cluster_size() {
        return Err(Error::corrupt(file.path(), format!("{what} overlaps the header cluster")));
    }
    if off.checked_add(bytes).is_none_or(|end| end > file_len) {
        return Err(Error::corrupt(
            file.path(),
            format!("{what} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let mut raw = vec![0u8; needed * 8];
    file.read_exact_at(&mut raw, off)?;
    Ok(raw.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// The format the image names for its backing file, as tern's [`Format`]; `None`
/// (detect) when it names none.
fn backing_format(name: Option<&str>, path: &Path) -> Result<Option<Format>> {
    Ok(match name {
        None => None,
        Some("qcow2") => Some(Format::Qcow2),
        Some("raw") | Some("file") => Some(Format::Raw),
        Some("vpc") => Some(Format::Vhd),
        Some("vhdx") => Some(Format::Vhdx),
        Some(other) => {
            return Err(Error::unsupported(path, format!("backing file format {other:?} is not supported")))
        }
    })
}

impl Disk for Qcow2Disk {
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.path(), offset, buf.len(), self.header.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (len, kind) = self.run_at(pos, (buf.len() - done) as u64, Merge::Readable)?;
            let out = &mut buf[done..done + len as usize];
            match kind {
                // The cluster start was checked to lie in the file; a last cluster cut
                // short by the end of the file reads as zeros, as in qemu.
                RunKind::Data(h) => self.file.read_at_zero_fill(out, h.0)?,
                RunKind::Compressed { cluster, guest_cluster } => {
                    self.read_compressed(out, cluster, pos - guest_cluster, guest_cluster)?
                }
                RunKind::Zero => out.fill(0),
                RunKind::Unallocated => self.read_backing(out, pos)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn mapping(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let size = self.header.size;
        if offset >= size {
            return Err(Error::invalid(
                Some(self.path()),
                format!("map offset {offset} is beyond the end ({size})"),
            ));
        }
        let limit = max_len.clamp(1, size - offset);
        let (length, kind) = self.run_at(offset, limit, Merge::SameKind)?;
        match (kind.map_kind(), &self.backing) {
            (MapKind::Unallocated, Some((disk, _))) => {
                let bsize = disk.virtual_size();
                if offset >= bsize {
                    // Past the backing file's end the guest reads zeros.
                    return Ok(Mapping { start: offset, length, kind: MapKind::Zero });
                }
                let m = disk.mapping(offset, length.min(bsize - offset))?;
                Ok(Mapping { start: offset, length: m.length.min(length), kind: m.kind })
            }
            (kind, _) => Ok(Mapping { start: offset, length, kind }),
        }
    }

    fn info(&self) -> Result<ImageInfo> {
        let h = &self.header;
        let v3 = h.version >= 3;
        let mut details = vec![
            ("compat".to_string(), if v3 { "1.1" } else { "0.10" }.to_string()),
            ("compression type".to_string(), h.compression.name().to_string()),
            ("refcount bits".to_string(), (1u32 << h.refcount_order).to_string()),
        ];
        if v3 {
            let flag = |b: bool| b.to_string();
            details.push(("lazy refcounts".into(), flag(h.compatible & compatible::LAZY_REFCOUNTS != 0)));
            details.push(("extended l2".into(), flag(h.extended_l2())));
            details.push(("dirty".into(), flag(h.incompatible & incompatible::DIRTY != 0)));
            details.push(("corrupt".into(), flag(h.incompatible & incompatible::CORRUPT != 0)));
        }
        if h.nb_snapshots > 0 {
            details.push(("internal snapshots".into(), h.nb_snapshots.to_string()));
        }
        if !self.extensions.bitmaps.is_empty() {
            details.push(("bitmaps".into(), "present".into()));
        }
        let backing = self.backing_name.as_ref().map(|name| BackingInfo {
            name: name.clone(),
            locators: vec![name.clone()],
            format: self.extensions.backing_format.clone(),
            opened: self.backing.as_ref().map(|(_, p)| p.clone()),
        });
        Ok(ImageInfo {
            format: Format::Qcow2,
            subformat: if v3 { "v3" } else { "v2" }.to_string(),
            virtual_size: h.size,
            allocated_bytes: self.file.allocated_bytes()?,
            file_size: self.file.len()?,
            cluster_size: Some(self.geometry().cluster_size()),
            logical_sector_size: 512,
            backing,
            details,
        })
    }
}
