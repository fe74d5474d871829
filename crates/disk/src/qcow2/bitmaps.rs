//! Persistent dirty bitmaps (QEMU docs/interop/qcow2.rst, "Bitmaps extension", "Bitmap
//! directory", "Bitmap table", "Bitmap data"): which bitmaps an image stores, and which
//! guest byte ranges one of them marks dirty.
//!
//! Layout (big endian):
//!
//! ```text
//! bitmaps extension data (exactly 24 bytes)
//!   0  nb_bitmaps (u32, >= 1)                 8  bitmap_directory_size (u64)
//!   4  reserved, zero (u32)                  16  bitmap_directory_offset (u64, cluster aligned)
//! bitmap directory: nb_bitmaps entries back to back, each padded with zeros to 8
//!   0  bitmap_table_offset (u64, aligned)    17  granularity_bits (u8): 1 bit = 2^g bytes
//!   8  bitmap_table_size (u32, entries)      18  name_size (u16, 1 ..= 1023)
//!  12  flags (u32): bit 0 in_use, 1 auto,    20  extra_data_size (u32)
//!      2 extra_data_compatible               24  extra data, then the name (no NUL)
//!  16  type (u8): 1 = dirty tracking
//! bitmap table entry (u64), one per cluster of bitmap data
//!   bits 9-55  host offset of the data cluster (cluster aligned)
//!   bit 0      with offset 0: the cluster reads as all zeros (0) or all ones (1)
//!   bits 1-8, 56-63 reserved (zero); bit 0 reserved when an offset is set
//! bitmap data: bit k is bit k % 8 (least significant first) of byte k / 8 and covers
//!   guest bytes [k * granularity, (k + 1) * granularity), clipped to the virtual size
//! ```
//!
//! Trust: the extension counts only while autoclear bit 0 is set. A program that does not
//! know bitmaps clears that bit when it changes the image, and from then on the bitmaps may
//! describe clusters it has reused; QEMU then ignores the extension, and so does tern (no
//! bitmaps are listed, and asking for one says why). A bitmap flagged `in_use` was loaded
//! by a QEMU that has not stored it back (it is running, or was killed): listed, never read.
//!
//! Everything read is checked before use, against QEMU's own limits where the
//! specification leaves room: directory and tables cluster aligned, past the header
//! cluster and inside the file, the table exactly as long as the virtual size and
//! granularity need, names UTF-8, unique and at most 1023 bytes. Memory stays bounded:
//! the directory is at most 64 MiB and inside the file, bitmap tables and data are read
//! one cluster at a time, and no data cluster may serve two table entries, so the
//! extents returned grow with the bitmap data actually in the file (at worst one range
//! per two bits of it), never with what a header claims.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use super::extension::RawExtension;
use super::header::{autoclear, Header};
use super::l2::HostOffset;
use super::reader::read_first_cluster;
use crate::io::ImageFile;
use crate::{Error, Result};

/// Length of the bitmaps extension data ("Bitmaps extension").
const EXTENSION_LEN: usize = 24;
/// qemu's limit on bitmaps per image (`QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: u32 = 65535;
/// qemu's limit on the directory size (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Fixed part of a directory entry ("Bitmap directory", bytes 0-23).
const ENTRY_FIXED_LEN: usize = 24;
/// Longest name ("Note: QEMU currently doesn't support values greater than 1023").
const MAX_NAME_LEN: usize = 1023;
/// qemu's limit on bitmap table entries (`BME_MAX_TABLE_SIZE`).
const MAX_TABLE_SIZE: u32 = 0x800_0000;
/// qemu's limit on the bytes of one bitmap's data (`BME_MAX_PHYS_SIZE`, 512 MiB).
const MAX_DATA_BYTES: u64 = 0x2000_0000;
/// The only bitmap type ("type", value 1: dirty tracking bitmap).
const DIRTY_TRACKING: u8 = 1;

/// Directory entry flags ("Bitmap directory", bytes 12-15).
mod flags {
    pub const IN_USE: u32 = 1 << 0;
    pub const AUTO: u32 = 1 << 1;
    pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
    /// Bits 3-31 are reserved and must be zero.
    pub const KNOWN: u32 = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE;
}

/// Bitmap table entry fields ("Bitmap table").
mod table {
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    pub const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
    pub const ALL_ONES: u64 = 1;
}

/// A persistent dirty bitmap stored in a qcow2 image (bitmaps extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBitmap {
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The `in_use` flag: QEMU had the image open and did not store the bitmap back
    /// cleanly; its content cannot be trusted.
    pub in_use: bool,
    /// The `auto` flag (enabled: QEMU records writes into it).
    pub auto: bool,
}

/// The persistent bitmaps of the qcow2 image at `path` (empty when it has none), in
/// directory order. An image whose bitmaps extension is marked inconsistent (autoclear
/// bit 0 clear) has none, as in QEMU.
pub fn qcow2_bitmaps(path: &Path) -> Result<Vec<StoredBitmap>> {
    let image = Image::open(path)?;
    Ok(match image.directory()? {
        Directory::Entries(entries) => entries.iter().map(Entry::stored).collect(),
        Directory::Absent | Directory::Inconsistent { .. } => Vec::new(),
    })
}

/// The byte ranges that bitmap `name` of the qcow2 image at `path` marks dirty: sorted,
/// disjoint, adjacent runs merged, clipped to the virtual size. An error (naming the
/// bitmap) when it does not exist (`InvalidInput`) or cannot be trusted (`Corrupt`: it is
/// `in_use`, or the image's bitmaps are marked inconsistent).
pub fn qcow2_bitmap_extents(path: &Path, name: &str) -> Result<Vec<Range<u64>>> {
    let image = Image::open(path)?;
    let entries = match image.directory()? {
        Directory::Entries(entries) => entries,
        Directory::Absent => {
            return Err(Error::invalid(Some(path), format!("no bitmap named {name:?}: the image has no bitmaps")))
        }
        Directory::Inconsistent { at } => {
            return Err(Error::corrupt(
                path,
                format!(
                    "bitmap {name:?} cannot be trusted: the bitmaps extension (offset {at}) is marked inconsistent \
                     (autoclear bit 0 is clear: a program without bitmap support changed the image), so QEMU ignores \
                     every bitmap of this image"
                ),
            ))
        }
    };
    let Some(entry) = entries.iter().find(|e| e.name == name) else {
        let names: Vec<String> = entries.iter().map(|e| format!("{:?}", e.name)).collect();
        return Err(Error::invalid(
            Some(path),
            format!("no bitmap named {name:?}; the image has {}", names.join(", ")),
        ));
    };
    image.extents(entry)
}

/// An image opened for its bitmaps: the header checked as for reading its data.
struct Image {
    file: ImageFile,
    header: Header,
    bitmaps: Vec<RawExtension>,
    file_len: u64,
}

/// What the bitmaps extension says.
enum Directory {
    /// No bitmaps extension.
    Absent,
    /// An extension without autoclear bit 0: to be ignored. `at`: its file offset.
    Inconsistent {
        at: usize,
    },
    Entries(Vec<Entry>),
}

/// A validated bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    /// File offset of the entry, for messages.
    at: u64,
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u8,
    extra_data_size: u32,
}

impl Entry {
    fn stored(&self) -> StoredBitmap {
        StoredBitmap {
            name: self.name.clone(),
            granularity: 1u64 << self.granularity_bits,
            in_use: self.flags & flags::IN_USE != 0,
            auto: self.flags & flags::AUTO != 0,
        }
    }
}

/// What the directory's entries are checked against.
#[derive(Clone, Copy)]
struct Limits<'a> {
    path: &'a Path,
    cluster_size: u64,
    file_len: u64,
    virtual_size: u64,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Image {
    fn open(path: &Path) -> Result<Image> {
        let file = ImageFile::open(path, false)?;
        let file_len = file.len()?;
        let first = read_first_cluster(&file, file_len)?;
        let (header, extensions) = Header::parse(&first, path)?;
        Ok(Image { file, header, bitmaps: extensions.bitmaps, file_len })
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.header.cluster_bits
    }

    fn limits(&self) -> Limits<'_> {
        Limits {
            path: self.path(),
            cluster_size: self.cluster_size(),
            file_len: self.file_len,
            virtual_size: self.header.size,
        }
    }

    /// Decode the bitmaps extension and read and check the directory it points to.
    fn directory(&self) -> Result<Directory> {
        let path = self.path();
        let ext = match self.bitmaps.as_slice() {
            [] => return Ok(Directory::Absent),
            [ext] => ext,
            [first, ..] => {
                return Err(Error::corrupt(
                    path,
                    format!(
                    "the bitmaps header extension appears {} times (first at offset {}); it may appear once",
                    self.bitmaps.len(),
                    first.at
                ),
                ))
            }
        };
        if self.header.autoclear & autoclear::BITMAPS == 0 {
            return Ok(Directory::Inconsistent { at: ext.at });
        }
        let corrupt = |what: String| {
            Error::corrupt(path, format!("bitmaps header extension at offset {}: {what}", ext.at))
        };
        let d = &ext.data;
        if d.len() != EXTENSION_LEN {
            return Err(corrupt(format!("is {} bytes long; it must be {EXTENSION_LEN}", d.len())));
        }
        let (nb_bitmaps, reserved, dir_size, dir_offset) = (be32(d, 0), be32(d, 4), be64(d, 8), be64(d, 16));
        if reserved != 0 {
            return Err(corrupt(format!("reserved field (bytes 4-7) is {reserved:#x}, not zero")));
        }
        if nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS {
            return Err(corrupt(format!("nb_bitmaps {nb_bitmaps} is outside 1 ..= {MAX_BITMAPS}")));
        }
        if dir_size == 0 || dir_size > MAX_DIRECTORY_SIZE {
            return Err(corrupt(format!(
                "bitmap_directory_size {dir_size} is outside 1 ..= {MAX_DIRECTORY_SIZE} (qemu's limit)"
            )));
        }
        check_place(dir_offset, dir_size, self.limits(), "the bitmap directory (bitmap_directory_offset)")
            .map_err(corrupt)?;
        let mut dir = vec![0u8; dir_size as usize];
        self.file.read_exact_at(&mut dir, dir_offset)?;
        parse_directory(&dir, dir_offset, nb_bitmaps, &self.limits()).map(Directory::Entries)
    }

    /// Read `entry`'s table and data, cluster by cluster, into merged dirty ranges.
    fn extents(&self, entry: &Entry) -> Result<Vec<Range<u64>>> {
        let path = self.path();
        let name = &entry.name;
        if entry.flags & flags::IN_USE != 0 {
            return Err(Error::corrupt(
                path,
                format!(
                    "bitmap {name:?} is in use: a QEMU has the image open, or stopped without storing the bitmap back, \
                     so its content cannot be trusted"
                ),
            ));
        }
        if entry.extra_data_size != 0 && entry.flags & flags::EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::unsupported(
                path,
                format!(
                    "bitmap {name:?} has {} bytes of extra data without the extra_data_compatible flag, so it must not be used",
                    entry.extra_data_size
                ),
            ));
        }
        let cluster = self.cluster_size();
        let size = self.header.size;
        let bits = size.div_ceil(1u64 << entry.granularity_bits);
        let bits_per_cluster = cluster * 8;
        let want = bits.div_ceil(bits_per_cluster);
        if want != u64::from(entry.table_size) {
            return Err(Error::corrupt(
                path,
                format!(
                    "bitmap {name:?}: bitmap_table_size {} (directory entry at offset {:#x}) does not fit the virtual size \
                     {size} at granularity {}: it must be {want}",
                    entry.table_size,
                    entry.at,
                    1u64 << entry.granularity_bits
                ),
            ));
        }
        let mut out = Ranges { granularity_bits: entry.granularity_bits, bits, size, runs: Vec::new() };
        let mut table_buf = vec![0u8; cluster as usize];
        let mut data = vec![0u8; cluster as usize];
        let per_read = cluster / 8;
        // At most one entry per cluster of data (512 MiB at most, see the directory checks).
        let mut used: HashSet<HostOffset> = HashSet::new();
        let mut index = 0u64;
        while index < want {
            let n = per_read.min(want - index);
            let chunk = &mut table_buf[..(n * 8) as usize];
            self.file.read_exact_at(chunk, entry.table_offset + index * 8)?;
            for (k, raw) in chunk.chunks_exact(8).enumerate() {
                let i = index + k as u64;
                let e = u64::from_be_bytes(raw.try_into().expect("8 bytes"));
                let first_bit = i * bits_per_cluster;
                match self.data_cluster(entry, i, e)? {
                    None if e & table::ALL_ONES != 0 => {
                        out.push_bits(first_bit, first_bit + bits_per_cluster)
                    }
                    None => {}
                    Some(host) => {
                        // QEMU gives every data cluster to one table entry. A cluster
                        // used again would let a small file describe a huge bitmap.
                        if !used.insert(host) {
                            return Err(Error::corrupt(
                                path,
                                format!(
                                    "bitmap {name:?}: bitmap table entry {i} (at offset {:#x}) points to the data cluster at {:#x}, which an earlier entry uses",
                                    entry.table_offset + i * 8,
                                    host.0
                                ),
                            ));
                        }
                        self.file.read_at_zero_fill(&mut data, host.0)?;
                        out.push_cluster(&data, first_bit);
                    }
                }
            }
            index += n;
        }
        Ok(out.runs)
    }

    /// The host offset of data cluster `i` of `entry`'s table entry `e`, checked; `None`
    /// for an unallocated (all zeros or all ones) cluster.
    fn data_cluster(&self, entry: &Entry, i: u64, e: u64) -> Result<Option<HostOffset>> {
        let bad = |what: String| {
            Error::corrupt(
                self.path(),
                format!(
                    "bitmap {:?}: bitmap table entry {i} ({e:#018x}, at offset {:#x}) {what}",
                    entry.name,
                    entry.table_offset + i * 8
                ),
            )
        };
        if e & table::RESERVED_MASK != 0 {
            return Err(bad("has reserved bits set".into()));
        }
        let host = e & table::OFFSET_MASK;
        if host == 0 {
            return Ok(None);
        }
        if e & table::ALL_ONES != 0 {
            return Err(bad("has both a cluster offset and the all-ones bit".into()));
        }
        let cluster = self.cluster_size();
        // Aligned and not 0, so past the header cluster.
        if !host.is_multiple_of(cluster) {
            return Err(bad(format!("points to offset {host:#x}, not aligned to a cluster")));
        }
        // A last cluster cut short by the end of the file reads as zeros, as in qemu.
        if host >= self.file_len {
            return Err(bad(format!(
                "points to offset {host:#x}, past the end of the file ({} bytes)",
                self.file_len
            )));
        }
        Ok(Some(HostOffset(host)))
    }
}

/// Check that `len` bytes at `offset` are cluster aligned, past the header cluster and
/// inside the file; the error says what is wrong with `what`.
fn check_place(offset: u64, len: u64, l: Limits<'_>, what: &str) -> std::result::Result<(), String> {
    if !offset.is_multiple_of(l.cluster_size) {
        return Err(format!(
            "{what} at offset {offset:#x} is not aligned to a cluster ({} bytes)",
            l.cluster_size
        ));
    }
    if offset < l.cluster_size {
        return Err(format!("{what} at offset {offset:#x} overlaps the header cluster"));
    }
    if offset.checked_add(len).is_none_or(|end| end > l.file_len) {
        return Err(format!(
            "{what} at offset {offset:#x} ({len} bytes) runs past the end of the file ({} bytes)",
            l.file_len
        ));
    }
    Ok(())
}

/// Parse and check the `nb_bitmaps` entries of the directory `dir`, read from file
/// offset `dir_offset`.
fn parse_directory(dir: &[u8], dir_offset: u64, nb_bitmaps: u32, l: &Limits<'_>) -> Result<Vec<Entry>> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut names: HashSet<String> = HashSet::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let at = dir_offset + pos as u64;
        let corrupt = |what: String| {
            Error::corrupt(l.path, format!("bitmap directory entry at offset {at:#x}: {what}"))
        };
        if entries.len() == nb_bitmaps as usize {
            return Err(corrupt(format!(
                "the directory ({} bytes) holds more entries than nb_bitmaps ({nb_bitmaps})",
                dir.len()
            )));
        }
        let rest = &dir[pos..];
        if rest.len() < ENTRY_FIXED_LEN {
            return Err(corrupt(format!(
                "truncated: {} bytes left in the directory, an entry needs {ENTRY_FIXED_LEN}",
                rest.len()
            )));
        }
        let table_offset = be64(rest, 0);
        let table_size = be32(rest, 8);
        let entry_flags = be32(rest, 12);
        let kind = rest[16];
        let granularity_bits = rest[17];
        let name_size = be16(rest, 18) as usize;
        let extra_data_size = be32(rest, 20);
        let name_start = ENTRY_FIXED_LEN as u64 + u64::from(extra_data_size);
        let unpadded = name_start + name_size as u64;
        let entry_len = unpadded.next_multiple_of(8);
        if entry_len > rest.len() as u64 {
            return Err(corrupt(format!(
                "its {extra_data_size} bytes of extra data and {name_size}-byte name run past the end of the directory"
            )));
        }
        let (name_start, unpadded, entry_len) = (name_start as usize, unpadded as usize, entry_len as usize);
        if name_size == 0 || name_size > MAX_NAME_LEN {
            return Err(corrupt(format!("name_size {name_size} is outside 1 ..= {MAX_NAME_LEN}")));
        }
        let name = match std::str::from_utf8(&rest[name_start..unpadded]) {
            Ok(n) if !n.contains('\0') => n.to_string(),
            Ok(_) => return Err(corrupt("the name contains a NUL byte".into())),
            Err(_) => return Err(corrupt("the name is not valid UTF-8".into())),
        };
        let corrupt = |what: String| {
            Error::corrupt(l.path, format!("bitmap {name:?} (directory entry at offset {at:#x}): {what}"))
        };
        if rest[unpadded..entry_len].iter().any(|&b| b != 0) {
            return Err(corrupt("the padding after the name is not zero".into()));
        }
        if kind != DIRTY_TRACKING {
            return Err(corrupt(format!("type {kind} is not 1 (dirty tracking bitmap)")));
        }
        if granularity_bits > 63 {
            return Err(corrupt(format!("granularity_bits {granularity_bits} is above 63")));
        }
        if entry_flags & !flags::KNOWN != 0 {
            return Err(corrupt(format!("flags {entry_flags:#x} set reserved bits 3-31")));
        }
        if table_size == 0 || table_size > MAX_TABLE_SIZE {
            return Err(corrupt(format!("bitmap_table_size {table_size} is outside 1 ..= {MAX_TABLE_SIZE}")));
        }
        let data_bytes = u64::from(table_size) * l.cluster_size;
        if data_bytes > MAX_DATA_BYTES {
            return Err(corrupt(format!(
                "bitmap_table_size {table_size} describes {data_bytes} bytes of bitmap data, above qemu's limit of {MAX_DATA_BYTES}"
            )));
        }
        check_place(table_offset, u64::from(table_size) * 8, *l, "its bitmap table (bitmap_table_offset)")
            .map_err(corrupt)?;
        // A bitmap that was stored cleanly covers the whole disk (an in-use one may be
        // short: QEMU resized the disk and did not store it back).
        let covered = (u128::from(data_bytes) * 8) << granularity_bits;
        if entry_flags & flags::IN_USE == 0 && u128::from(l.virtual_size) > covered {
            return Err(corrupt(format!(
                "bitmap_table_size {table_size} at granularity {} covers {covered} bytes, less than the virtual size {}",
                1u64 << granularity_bits,
                l.virtual_size
            )));
        }
        if !names.insert(name.clone()) {
            return Err(corrupt("another bitmap has the same name".into()));
        }
        entries.push(Entry {
            name,
            at,
            table_offset,
            table_size,
            flags: entry_flags,
            granularity_bits,
            extra_data_size,
        });
        pos += entry_len;
    }
    if entries.len() != nb_bitmaps as usize {
        return Err(Error::corrupt(
            l.path,
            format!(
                "nb_bitmaps is {nb_bitmaps}, but the bitmap directory at offset {dir_offset:#x} ({} bytes) ends after entry {}",
                dir.len(),
                entries.len()
            ),
        ));
    }
    Ok(entries)
}

/// Dirty guest ranges collected in bit order, adjacent runs merged.
struct Ranges {
    granularity_bits: u8,
    /// Bits the virtual size needs; later (tail) bits are ignored.
    bits: u64,
    /// Virtual size: the last bit's range is clipped to it.
    size: u64,
    runs: Vec<Range<u64>>,
}

impl Ranges {
    /// Bits `first..end` are set (callers go in increasing order).
    fn push_bits(&mut self, first: u64, end: u64) {
        let end = end.min(self.bits);
        if first >= end {
            return;
        }
        let to_bytes =
            |bit: u64| (u128::from(bit) << self.granularity_bits).min(u128::from(self.size)) as u64;
        let (start, stop) = (to_bytes(first), to_bytes(end));
        match self.runs.last_mut() {
            Some(last) if last.end == start => last.end = stop,
            _ => self.runs.push(start..stop),
        }
    }

    /// One cluster of bitmap data whose first bit is `first_bit`.
    fn push_cluster(&mut self, data: &[u8], first_bit: u64) {
        for (w, word) in data.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            let base = first_bit + w as u64 * 64;
            if base >= self.bits {
                return;
            }
            let mut pos = 0u32;
            while pos < 64 && word >> pos != 0 {
                pos += (word >> pos).trailing_zeros();
                let run = (word >> pos).trailing_ones();
                self.push_bits(base + u64::from(pos), base + u64::from(pos + run));
                pos += run;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ranges(granularity_bits: u8, size: u64) -> Ranges {
        let bits = size.div_ceil(1 << granularity_bits);
        Ranges { granularity_bits, bits, size, runs: Vec::new() }
    }

    #[test]
    fn bits_are_least_significant_first_and_runs_merge_across_words_and_clusters() {
        let mut r = ranges(9, 4 << 20);
        let mut data = vec![0u8; 512];
        data[0] = 0b0000_0110; // bits 1, 2
        data[7] = 0x80; // bit 63
        data[8] = 0x01; // bit 64: merges with 63
        data[511] = 0x80; // last bit of the cluster
        r.push_cluster(&data, 0);
        // The next cluster starts with an all-ones run: merges with the last bit.
        r.push_bits(4096, 8192);
        assert_eq!(r.runs, vec![512..1536, 63 * 512..65 * 512, 4095 * 512..8192 * 512]);
    }

    #[test]
    fn tail_bits_past_the_virtual_size_are_clipped_or_ignored() {
        // 1000 bytes at 512-byte granularity: 2 bits, the second covering 488 bytes.
        let mut r = ranges(9, 1000);
        r.push_cluster(&[0xff; 512], 0);
        assert_eq!(r.runs, vec![0..1000]);
        // Granularity far beyond the disk: one bit covers it all.
        let mut r = ranges(63, 12345);
        r.push_bits(0, 4096);
        assert_eq!(r.runs, vec![0..12345]);
    }

    fn limits(path: &Path) -> Limits<'_> {
        Limits { path, cluster_size: 65536, file_len: 1 << 30, virtual_size: 1 << 30 }
    }

    fn entry(name: &[u8], table_offset: u64, table_size: u32, flags: u32, gbits: u8) -> Vec<u8> {
        let mut e = table_offset.to_be_bytes().to_vec();
        e.extend(table_size.to_be_bytes());
        e.extend(flags.to_be_bytes());
        e.extend([DIRTY_TRACKING, gbits]);
        e.extend((name.len() as u16).to_be_bytes());
        e.extend(0u32.to_be_bytes());
        e.extend(name);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    #[test]
    fn directory_entries_are_checked() {
        let p = Path::new("t");
        let mut dir = entry(b"a", 0x30000, 1, flags::AUTO, 16);
        dir.extend(entry(b"bb", 0x40000, 1, flags::IN_USE, 16));
        let e = parse_directory(&dir, 0x20000, 2, &limits(p)).unwrap();
        assert_eq!(
            e.iter().map(|e| e.stored()).collect::<Vec<_>>(),
            vec![
                StoredBitmap { name: "a".into(), granularity: 65536, in_use: false, auto: true },
                StoredBitmap { name: "bb".into(), granularity: 65536, in_use: true, auto: false },
            ]
        );
        let err =
            |dir: &[u8], nb: u32| parse_directory(dir, 0x20000, nb, &limits(p)).unwrap_err().to_string();
        assert!(err(&dir, 1).contains("more entries than nb_bitmaps"), "{}", err(&dir, 1));
        assert!(err(&dir, 3).contains("ends after entry 2"), "{}", err(&dir, 3));
        assert!(err(&dir[..30], 2).contains("run past the end"), "{}", err(&dir[..30], 2));
        let dup = [entry(b"a", 0x30000, 1, 0, 16), entry(b"a", 0x40000, 1, 0, 16)].concat();
        assert!(err(&dup, 2).contains("same name"), "{}", err(&dup, 2));
        // 1 GiB at 512-byte granularity needs 2^21 bits = 4 clusters of 64 KiB.
        assert!(err(&entry(b"a", 0x30000, 3, 0, 9), 1).contains("less than the virtual size"));
        assert!(err(&entry(b"a", 0x30001, 1, 0, 16), 1).contains("not aligned"));
        assert!(err(&entry(b"a", 1 << 30, 1, 0, 16), 1).contains("past the end of the file"));
        assert!(err(&entry(b"a", 0x30000, u32::MAX, 0, 16), 1).contains("bitmap_table_size"));
        assert!(err(&entry(b"a", 0x30000, 1, 1 << 3, 16), 1).contains("reserved bits"));
        assert!(err(&entry(b"\xff", 0x30000, 1, 0, 16), 1).contains("UTF-8"));
        assert!(err(&entry(b"", 0x30000, 1, 0, 16), 1).contains("name_size 0"));
        let mut padded = entry(b"a", 0x30000, 1, 0, 16);
        padded[31] = 1;
        assert!(err(&padded, 1).contains("padding"));
    }

    proptest! {
        #[test]
        fn arbitrary_directories_never_panic(dir in proptest::collection::vec(any::<u8>(), 0..200), nb in 0u32..4) {
            let p = Path::new("t");
            let _ = parse_directory(&dir, 0x20000, nb, &limits(p));
        }
    }
}
