//! Migrate: a recovery point -> disk images in a target format plus VM definitions.
//!
//! Every chunk is fetched by N workers and verified (authenticated, and hashed back to
//! its address by `open_chunk_into`). Raw and fixed-VHD outputs (fixed layout) are written by
//! the workers themselves, each chunk as it arrives, past the page cache where the
//! filesystem allows (`O_DIRECT`); other formats allocate as they go and are written in
//! chunk order by one thread. The SHA-256 printed for each disk is the one replication
//! recorded in the manifest; for a point without one it is computed from the chunks in
//! order. `verify` reads each output back and compares.
//!
//! Outputs are written under `<name>.partial` and renamed once complete; on any error
//! every output of the run is removed, so a wrong image never carries a final name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use sha2::{Digest, Sha256};
use tern_chunk::Key;
use tern_disk::{CreateFormat, CreateOptions};
use tern_store::Store;
use tern_types::MIB;

use crate::point::PointReader;
use crate::{catalog, vmdef, Engine, Error, ErrorKind, Manifest, ManifestDisk, Result};

/// Sector size QEMU counts image sizes in.
const SECTOR: u64 = 512;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateFormat {
    /// Sparse raw.
    Raw,
    /// qcow2 v3, 64 KiB clusters.
    Qcow2,
    /// Dynamic VHD.
    Vhd,
    /// Dynamic VHDX, 32 MiB blocks.
    Vhdx,
    /// Fixed VHD with the size rounded up to a whole MiB, as Azure requires.
    Azure,
}

impl MigrateFormat {
    /// Every output format.
    pub const ALL: [MigrateFormat; 5] = [
        MigrateFormat::Raw,
        MigrateFormat::Qcow2,
        MigrateFormat::Vhd,
        MigrateFormat::Vhdx,
        MigrateFormat::Azure,
    ];

    /// The `--format` value naming it.
    pub fn name(self) -> &'static str {
        match self {
            MigrateFormat::Raw => "raw",
            MigrateFormat::Qcow2 => "qcow2",
            MigrateFormat::Vhd => "vhd",
            MigrateFormat::Vhdx => "vhdx",
            MigrateFormat::Azure => "azure",
        }
    }

    /// File extension of outputs.
    pub fn extension(self) -> &'static str {
        match self {
            MigrateFormat::Raw => "raw",
            MigrateFormat::Qcow2 => "qcow2",
            MigrateFormat::Vhd | MigrateFormat::Azure => "vhd",
            MigrateFormat::Vhdx => "vhdx",
        }
    }

    /// QEMU's driver name for the format (libvirt `<driver type=...>`).
    pub fn qemu_driver(self) -> &'static str {
        match self {
            MigrateFormat::Raw => "raw",
            MigrateFormat::Qcow2 => "qcow2",
            MigrateFormat::Vhd | MigrateFormat::Azure => "vpc",
            MigrateFormat::Vhdx => "vhdx",
        }
    }

    fn create(self) -> CreateFormat {
        match self {
            MigrateFormat::Raw => CreateFormat::Raw,
            MigrateFormat::Qcow2 => CreateFormat::Qcow2 { cluster_size: 64 << 10 },
            MigrateFormat::Vhd => CreateFormat::VhdDynamic,
            MigrateFormat::Vhdx => CreateFormat::Vhdx { block_size: 32 * MIB },
            MigrateFormat::Azure => CreateFormat::VhdFixed,
        }
    }

    /// Output virtual size for a disk of `size` bytes; any padding reads as zeros.
    pub fn output_size(self, size: u64) -> u64 {
        match self {
            MigrateFormat::Raw => size,
            MigrateFormat::Azure => size.div_ceil(MIB) * MIB,
            // QEMU takes the size of a qcow2, VHD or VHDX image in whole 512-byte
            // sectors, rounding down, so a size that is not a multiple of 512 would lose
            // the disk's last bytes (qemu-img create rounds up for the same reason).
            MigrateFormat::Qcow2 | MigrateFormat::Vhd | MigrateFormat::Vhdx => size.div_ceil(SECTOR) * SECTOR,
        }
    }
}

/// Which point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSelector {
    /// The newest.
    Latest,
    /// This id.
    Id(String),
}

/// Options of a migration.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Point to migrate.
    pub point: PointSelector,
    /// Output format.
    pub format: MigrateFormat,
    /// Output folder (created if missing).
    pub out_dir: PathBuf,
    /// Test migration: outputs named `<vm>-test-...`, replication state untouched.
    pub test: bool,
    /// Fetch workers, 1..=32.
    pub threads: usize,
    /// fsync every output before reporting success (the default). `false` leaves them
    /// in the page cache, as `qemu-img convert` does: for scratch test migrations.
    pub sync: bool,
    /// Read every output back through its format and check its SHA-256 against the
    /// point's before reporting success.
    pub verify: bool,
}

/// Progress events.
#[derive(Debug, Clone)]
pub enum MigrateEvent {
    /// A disk starts.
    DiskStart {
        /// Disk number.
        disk: u32,
        /// Guest size.
        total: u64,
    },
    /// Guest bytes written (or known zero).
    Progress {
        /// Disk number.
        disk: u32,
        /// Guest bytes of the chunk.
        bytes: u64,
    },
}

/// One produced disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MigratedDisk {
    /// Disk number.
    pub disk: u32,
    /// Output file.
    pub path: PathBuf,
    /// Guest size of the source disk.
    pub virtual_size: u64,
    /// Guest size of the output (Azure rounds up to a MiB, qcow2 / VHD / VHDX to a
    /// sector; the padding is zeros).
    pub output_virtual_size: u64,
    /// Length of the output file in bytes (the format's metadata included).
    pub file_size: u64,
    /// SHA-256 of the source disk's guest content (`virtual_size` bytes), hex: as
    /// recorded at replication, or computed from the chunks for a point without it.
    pub sha256: String,
    /// Whether the output was read back and found to have that SHA-256 (`verify`).
    pub verified: bool,
}

/// What a migration produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrateReport {
    /// VM name.
    pub vm: String,
    /// The store it was read from.
    pub store_url: String,
    /// Output format (`--format`).
    pub format: &'static str,
    /// A test migration.
    pub test: bool,
    /// Point id.
    pub point_id: String,
    /// Point instant.
    pub instant: String,
    /// Disks.
    pub disks: Vec<MigratedDisk>,
    /// libvirt domain XML.
    pub libvirt_xml: PathBuf,
    /// Azure ARM template.
    pub arm_template: PathBuf,
}

/// Removes every registered path unless disarmed.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn partial(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// A recovery point opened to be read in place (`tern points serve`): a point reader
/// per disk, and the runtime they fetch with.
pub struct OpenPoint {
    /// The VM's name in the manifest.
    pub vm_name: String,
    /// The point.
    pub point_id: String,
    /// The point's instant (RFC 3339).
    pub instant: String,
    /// One reader per disk, in order: verified reads of the point.
    pub disks: Vec<PointReader>,
    // Dropped after the readers, which fetch through it.
    _rt: tokio::runtime::Runtime,
}

/// The runtime the readers of an [`OpenPoint`] fetch through: keep it until they are
/// dropped.
pub struct PointRuntime(#[allow(dead_code)] tokio::runtime::Runtime);

impl OpenPoint {
    /// The readers, and the runtime to keep alive while they are used.
    pub fn into_disks(self) -> (Vec<PointReader>, PointRuntime) {
        (self.disks, PointRuntime(self._rt))
    }
}

/// The point `selector` names among VM `vm_id`'s `points` (VM `name` to the user).
fn select_point(points: &[String], selector: &PointSelector, name: &str) -> Result<String> {
    match selector {
        PointSelector::Latest => points
            .last()
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("VM {name:?} has no recovery point"))),
        PointSelector::Id(id) => {
            crate::check_point_id(id)?;
            if !points.contains(id) {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("VM {name:?} has no point {id} (see `tern points {name}`)"),
                ));
            }
            Ok(id.clone())
        }
    }
}

/// Open point `selector` of VM `name` for reading in place, straight from the store.
pub fn open_point(engine: &Engine, name: &str, selector: &PointSelector) -> Result<OpenPoint> {
    let store = engine.open_store_at(&engine.store_url_for(name)?, false)?;
    let key = engine.load_key()?;
    let rt = engine.runtime()?;
    rt.block_on(engine.check_store(&store, &key, false))?;
    let vm_id = rt.block_on(catalog::find_vm(engine, &store, &key, name))?;
    let points = rt.block_on(store.list_points(&vm_id))?;
    let point_id = select_point(&points, selector, name)?;
    let env = rt.block_on(store.get_manifest(&vm_id, &point_id))?;
    let manifest = Manifest::open(&key, &env, &vm_id, &point_id)
        .map_err(|e| e.context(format!("manifest of point {point_id}")))?;
    let mut disks = Vec::new();
    for d in &manifest.disks {
        let r = rt
            .block_on(PointReader::open(&key, &store, rt.handle().clone(), &vm_id, &point_id, d))
            .map_err(|e| e.context(format!("disk {} of point {point_id}", d.index)))?;
        disks.push(r);
    }
    Ok(OpenPoint {
        vm_name: manifest.vm.name.clone(),
        point_id,
        instant: manifest.instant.clone(),
        disks,
        _rt: rt,
    })
}

/// Migrate VM `name` (a name or a store VM id) from the engine's store.
pub fn migrate(
    engine: &Engine,
    name: &str,
    opts: &MigrateOptions,
    observer: &(dyn Fn(MigrateEvent) + Sync),
) -> Result<MigrateReport> {
    crate::check_threads(opts.threads)?;
    let store = engine.open_store_at(&engine.store_url_for(name)?, false)?;
    let key = engine.load_key()?;
    let rt = engine.runtime()?;
    rt.block_on(engine.check_store(&store, &key, false))?;
    let vm_id = rt.block_on(catalog::find_vm(engine, &store, &key, name))?;
    let points = rt.block_on(store.list_points(&vm_id))?;
    let point_id = select_point(&points, &opts.point, name)?;
    let env = rt.block_on(store.get_manifest(&vm_id, &point_id))?;
    let manifest = Manifest::open(&key, &env, &vm_id, &point_id)
        .map_err(|e| e.context(format!("manifest of point {point_id}")))?;

    std::fs::create_dir_all(&opts.out_dir)
        .map_err(|e| Error::io(format!("creating {}", opts.out_dir.display()), e))?;
    // Absolute, so that the libvirt domain and the report name the disks wherever they
    // are read from (a relative --out would make paths relative to libvirt's folder).
    let out_dir = std::fs::canonicalize(&opts.out_dir)
        .map_err(|e| Error::io(format!("resolving {}", opts.out_dir.display()), e))?;
    let vm_name = &manifest.vm.name;
    let stem = if opts.test { format!("{vm_name}-test") } else { vm_name.clone() };
    let disk_paths: Vec<PathBuf> = manifest
        .disks
        .iter()
        .map(|d| out_dir.join(format!("{stem}-disk{}.{}", d.index, opts.format.extension())))
        .collect();
    let xml_path = out_dir.join(format!("{stem}.xml"));
    let arm_path = out_dir.join(format!("{stem}-azure.json"));
    for p in disk_paths.iter().chain([&xml_path, &arm_path]) {
        if p.exists() {
            return Err(Error::invalid(format!(
                "{} already exists: remove it or choose another --out folder",
                p.display()
            )));
        }
    }
    let mut cleanup = Cleanup(Vec::new());
    let mut disks = Vec::new();
    for (d, path) in manifest.disks.iter().zip(&disk_paths) {
        let tmp = partial(path);
        cleanup.0.push(tmp.clone());
        cleanup.0.push(path.clone());
        let label = format!("disk {} of VM {vm_name} at point {point_id}", d.index);
        let sha = restore_disk(&key, &store, rt.handle(), &vm_id, &point_id, d, &tmp, opts, observer)
            .map_err(|e| e.context(&label))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))?;
        disks.push(MigratedDisk {
            disk: d.index,
            path: path.clone(),
            virtual_size: d.virtual_size,
            output_virtual_size: opts.format.output_size(d.virtual_size),
            file_size: std::fs::metadata(path).map_err(|e| Error::io(path.display(), e))?.len(),
            sha256: sha,
            verified: opts.verify,
        });
    }
    let files: Vec<(PathBuf, u64)> = disks.iter().map(|d| (d.path.clone(), d.file_size)).collect();
    let xml = vmdef::libvirt_xml(&manifest, &files, opts.format, opts.test);
    let arm = vmdef::arm_template(&manifest, &files, opts.test);
    for (p, text) in [(&xml_path, xml), (&arm_path, arm)] {
        cleanup.0.push(p.clone());
        std::fs::write(p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
    }
    cleanup.0.clear();
    Ok(MigrateReport {
        vm: vm_name.clone(),
        store_url: store.url().to_string(),
        format: opts.format.name(),
        test: opts.test,
        point_id,
        instant: manifest.instant.clone(),
        disks,
        libvirt_xml: xml_path,
        arm_template: arm_path,
    })
}

#[allow(clippy::too_many_arguments)]
fn restore_disk(
    key: &Key,
    store: &Store,
    rt: &tokio::runtime::Handle,
    vm_id: &str,
    point_id: &str,
    d: &ManifestDisk,
    out: &Path,
    opts: &MigrateOptions,
    observer: &(dyn Fn(MigrateEvent) + Sync),
) -> Result<String> {
    let point = rt.block_on(PointReader::open(key, store, rt.clone(), vm_id, point_id, d))?;
    let mut writer = tern_disk::create_disk(
        out,
        &CreateOptions {
            format: opts.format.create(),
            virtual_size: opts.format.output_size(d.virtual_size),
        },
    )?;
    if !opts.sync {
        writer.skip_sync();
    }
    observer(MigrateEvent::DiskStart { disk: d.index, total: d.virtual_size });
    let src = Source { point: &point, disk: d.index, threads: opts.threads, observer };
    let sha = match (&d.sha256, writer.concurrent()) {
        // The content hash was recorded at replication and every chunk is checked
        // against its address, so chunks need no ordering: each worker writes its own,
        // straight to the device where the filesystem allows.
        (Some(sha), Some(parallel)) => {
            parallel.direct_io();
            src.restore_parallel(parallel.as_ref())?;
            sha.clone()
        }
        (Some(sha), None) => {
            src.restore_ordered(writer.as_mut(), None)?;
            sha.clone()
        }
        (None, _) => {
            let mut hasher = Sha256::new();
            src.restore_ordered(writer.as_mut(), Some(&mut hasher))?;
            hex::encode(hasher.finalize())
        }
    };
    writer.finish()?;
    if opts.verify {
        let found = hash_image(out, d.virtual_size)?;
        if found != sha {
            return Err(Error::corrupt(format!(
                "the written image reads back with SHA-256 {found}, the point's content is {sha}"
            )));
        }
    }
    Ok(sha)
}

/// SHA-256 of the first `size` guest bytes of the image at `path`, read back through
/// its format (runs mapped as zero are hashed without reading).
fn hash_image(path: &Path, size: u64) -> Result<String> {
    let disk = tern_disk::open_disk(path, &tern_disk::OpenOptions::read_only())?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let zeros = vec![0u8; 4 << 20];
    for m in tern_disk::collect_map(disk.as_ref())?.into_iter().filter(|m| m.start < size) {
        let (mut off, end) = (m.start, m.end().min(size));
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            if m.kind == tern_disk::MapKind::Data {
                disk.read_at(&mut buf[..n], off)?;
                hasher.update(&buf[..n]);
            } else {
                hasher.update(&zeros[..n]);
            }
            off += n as u64;
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Where one disk's chunks come from, for the two ways of writing them.
struct Source<'a> {
    point: &'a PointReader,
    disk: u32,
    threads: usize,
    observer: &'a (dyn Fn(MigrateEvent) + Sync),
}

impl Source<'_> {
    /// Workers take chunk numbers in order, fetch and verify each into their own aligned
    /// buffer and write its non-zero pieces; memory is one chunk per worker.
    fn restore_parallel(&self, writer: &dyn tern_disk::ConcurrentWrite) -> Result<()> {
        let point = self.point;
        let count = point.chunk_count();
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..self.threads {
                s.spawn(|| {
                    let mut buf = tern_disk::AlignedBuf::zeroed(point.chunk_size() as usize);
                    while !abort.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= count {
                            break;
                        }
                        let range = point.chunk_range(n);
                        let len = (range.end - range.start) as usize;
                        let res = if point.known_zero(range.clone()) {
                            Ok(())
                        } else {
                            let data = &mut buf[..len];
                            point.read_chunk(n, data).and_then(|_| {
                                // Zero pieces are not written: the new image reads
                                // them as zero and stays as sparse as the source.
                                tern_disk::write_nonzero(
                                    &mut |p, at| writer.write_at(p, at),
                                    data,
                                    range.start,
                                )
                                .map_err(|e| Error::from(e).context("writing"))
                            })
                        };
                        match res {
                            Ok(()) => {
                                (self.observer)(MigrateEvent::Progress { disk: self.disk, bytes: len as u64 })
                            }
                            Err(e) => {
                                abort.store(true, Ordering::Relaxed);
                                let e = e.context(format!("chunk {n} at offset {}", range.start));
                                error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        match error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Workers fetch and verify; this thread writes chunks in order (writers that
    /// allocate as they go need one caller) and, given a `hasher`, a thread feeds it the
    /// guest content in order (zero chunks as zeros). Workers may run at most
    /// a window of chunks ahead of the writer, which bounds memory to about 2 x threads
    /// chunks.
    fn restore_ordered(
        &self,
        writer: &mut dyn tern_disk::DiskWriter,
        hasher: Option<&mut Sha256>,
    ) -> Result<()> {
        let (point, count) = (self.point, self.point.chunk_count());
        let window = self.threads * 2;
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let written = Mutex::new(0usize);
        let moved = Condvar::new();
        let (tx, rx) = mpsc::channel::<(usize, Result<Option<Vec<u8>>>)>();
        let mut error: Option<Error> = None;
        // The hash runs on its own thread so that hashing overlaps writing: it gets each
        // chunk after it is written (None = a zero chunk).
        let (hash_tx, hash_rx) = mpsc::sync_channel::<(Option<Vec<u8>>, usize)>(window);
        let hash_tx = hasher.is_some().then_some(hash_tx);
        std::thread::scope(|s| {
            let hashing = hasher.map(|hasher| {
                s.spawn(move || {
                    let zeros = vec![0u8; point.chunk_size() as usize];
                    for (data, len) in hash_rx {
                        hasher.update(data.as_deref().unwrap_or(&zeros[..len]));
                    }
                })
            });
            for _ in 0..self.threads {
                let tx = tx.clone();
                let (next, abort, written, moved) = (&next, &abort, &written, &moved);
                s.spawn(move || loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    {
                        let mut w = written.lock().unwrap_or_else(|p| p.into_inner());
                        // The worker holding chunk `*w` never waits here, so this ends.
                        while n >= *w + window && !abort.load(Ordering::Relaxed) {
                            w = moved.wait(w).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    if abort.load(Ordering::Relaxed) {
                        break;
                    }
                    let range = point.chunk_range(n);
                    let res = if point.known_zero(range.clone()) {
                        Ok(None)
                    } else {
                        let mut data = vec![0u8; (range.end - range.start) as usize];
                        point
                            .read_chunk(n, &mut data)
                            .map(|_| Some(data))
                            .map_err(|e| e.context(format!("chunk {n} at offset {}", range.start)))
                    };
                    let failed = res.is_err();
                    if tx.send((n, res)).is_err() || failed {
                        break;
                    }
                });
            }
            drop(tx);
            let mut pending: BTreeMap<usize, Option<Vec<u8>>> = BTreeMap::new();
            let mut expected = 0usize;
            for (n, res) in rx.iter() {
                if error.is_some() {
                    continue;
                }
                match res {
                    Err(e) => error = Some(e),
                    Ok(data) => {
                        pending.insert(n, data);
                    }
                }
                while error.is_none() {
                    let Some(data) = pending.remove(&expected) else { break };
                    let range = point.chunk_range(expected);
                    let len = (range.end - range.start) as usize;
                    if let Some(bytes) = &data {
                        // Zero pieces are not written, as in `restore_parallel`.
                        let res =
                            tern_disk::write_nonzero(&mut |p, at| writer.write_at(p, at), bytes, range.start);
                        if let Err(e) = res {
                            error = Some(Error::from(e).context(format!("writing chunk {expected}")));
                        }
                    }
                    if let Some(h) = &hash_tx {
                        let _ = h.send((data, len));
                    }
                    (self.observer)(MigrateEvent::Progress { disk: self.disk, bytes: len as u64 });
                    expected += 1;
                }
                let mut w = written.lock().unwrap_or_else(|p| p.into_inner());
                *w = expected;
                if error.is_some() {
                    abort.store(true, Ordering::Relaxed);
                }
                moved.notify_all();
            }
            if error.is_none() && expected != count {
                error = Some(Error::corrupt(format!("only {expected} of {count} chunks arrived")));
            }
            drop(hash_tx);
            if let Some(hashing) = hashing {
                hashing.join().expect("hashing thread");
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
