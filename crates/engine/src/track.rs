//! Tracking sources (DESIGN.md, "Change tracking sources"; docs/continuous.md): one
//! interface through which a replication pass learns, per cycle and disk, what changed
//! since the previous cut and reads it as of this cut's instant.
//!
//! A source knows how to freeze every disk of a VM at one instant (a [`Cut`]) and, for
//! each disk, either the extents written since the previous cut ([`Changes::Extents`]),
//! a change log it already wrote ([`Changes::Logged`], the journal's way), or nothing
//! ([`Changes::Unknown`]: the pass compares the whole disk with the previous point). The
//! pass itself (crate `cycle`) is the same for every source: plan, cut, stage into change
//! logs, release the cut, upload, commit, then tell the source the cycle is committed.
//!
//! Sources:
//! - `qemu` ([`crate::qemu::source::QemuSource`]): QEMU's persistent dirty bitmaps over
//!   QMP, a copy-before-write view exported over NBD.
//! - `scan` ([`ScanSource`]): image files (a stopped VM, or a reflink copy of a running
//!   one's images); every cycle compares the disks with the previous point by chunk
//!   digest, so only what differs is shipped.
//!
//! The tracking sequence number `seq` counts cuts: the changes since cut `seq` are what
//! "tracking `seq`" holds (QEMU: bitmap `tern-<vm>-<seq>`).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tern_disk::Disk;

use crate::changelog::{LogHeader, LogWriter, SealedLog};
use crate::snapshot::{self, SnapshotKind};
use crate::{Error, ErrorKind, ReplicationDiskRow, Result, VmDef};

/// One disk of a cut: what reads it as of the cut's instant.
#[derive(Debug, Clone)]
pub struct CutDisk {
    /// Virtual size in bytes.
    pub size: u64,
    /// What to read: an image file (a snapshot or the image itself) or an NBD URL of
    /// a QEMU view (`nbd+unix:///EXPORT?socket=PATH`). Recorded in the state database,
    /// so that a killed initial replication can read it again.
    pub read_path: PathBuf,
    /// How the view was made.
    pub snapshot: SnapshotKind,
    /// The format to open `read_path` as (`raw` for an NBD view).
    pub format: String,
    /// Something the user should know about this view (an in-place read of an image
    /// open for writing, with `--force`).
    pub warning: Option<String>,
}

impl CutDisk {
    /// Open the view for reading.
    pub fn open(&self) -> Result<Box<dyn Disk>> {
        open_view(&self.read_path, self.snapshot, &self.format)
    }
}

/// Open what a replication disk reads: an image file as `format`, or a QEMU view over
/// NBD.
pub(crate) fn open_view(read_path: &Path, kind: SnapshotKind, format: &str) -> Result<Box<dyn Disk>> {
    if kind == SnapshotKind::QemuView {
        let url = read_path.to_string_lossy();
        let (export, socket) = url
            .strip_prefix("nbd+unix:///")
            .and_then(|r| r.split_once("?socket="))
            .ok_or_else(|| Error::corrupt(format!("state database: QEMU view {url:?} is not an NBD URL")))?;
        let disk =
            tern_disk::nbd::NbdDisk::open_unix(Path::new(socket), export, std::time::Duration::from_secs(30))
                .map_err(|e| {
                    Error::from(e).context("opening the QEMU view (is the VM's cut still there?)")
                })?;
        return Ok(Box::new(disk));
    }
    let format = crate::vm::parse_format(format)
        .map_err(|_| Error::corrupt(format!("state database: unknown disk format {format:?}")))?;
    // The VM's own disk: a backing file it names is part of its content.
    let o = tern_disk::OpenOptions {
        allow_backing: true,
        format: Some(format),
        ..tern_disk::OpenOptions::read_only()
    };
    Ok(tern_disk::open_disk(read_path, &o)?)
}

/// Every disk of a VM frozen at one instant.
pub trait Cut {
    /// The cut's sequence number: tracking `seq` starts at it.
    fn seq(&self) -> u64;
    /// The instant the disks were frozen at (the point's instant).
    fn instant(&self) -> SystemTime;
    /// One per disk of the VM, in order.
    fn disks(&self) -> &[CutDisk];
}

/// What a source knows about one disk's changes since the previous cut.
#[derive(Debug)]
pub enum Changes {
    /// Only these byte ranges (sorted, disjoint) may differ from the previous point;
    /// the pass reads them from the cut's view into a change log.
    Extents(Vec<Range<u64>>),
    /// The source already wrote them into this sealed change log (the journal).
    Logged(SealedLog),
    /// Not known: the pass reads the whole disk and compares it with the previous
    /// point (a scan, or a resync after tracking was lost).
    Unknown,
}

/// What became of tracking `seq` after a failure, a kill or a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    /// It holds every change since the last committed point (what an uncommitted cut
    /// started was folded back into it).
    Intact,
    /// It was lost (the reason, for the user): the next pass compares every disk.
    Lost(String),
    /// The source keeps no tracking between cuts (scan): every pass compares.
    Never,
    /// Intact on some disks only: the others (`true` here, per disk) are compared
    /// with the previous point in the next cycle, the rest ship what was tracked.
    Partly(Vec<bool>, String),
}

/// A source of change tracking for one VM. See the module documentation.
pub trait TrackingSource {
    /// The source's cuts.
    type Cut: Cut;

    /// The source's name as `tern status` shows it: `qemu`, `scan`.
    fn name(&self) -> &'static str;

    /// The granularity changes are tracked at, in bytes (a change log's granularity,
    /// and the unit a comparison ships).
    fn granularity(&self) -> u64;

    /// Take down what a killed run left behind (views, exports, overlays, snapshots).
    /// Tracking state is not touched: [`TrackingSource::restore`] decides about it.
    fn clean_leftovers(&mut self) -> Result<()>;

    /// The views of an unfinished initial replication that cut `seq` made, recorded
    /// as `disks`, if they are all still there: the pass then resumes reading them.
    fn resume(&mut self, seq: u64, disks: &[ReplicationDiskRow]) -> Result<Option<Self::Cut>>;

    /// Bring tracking to "tracking `seq` holds every change since the last committed
    /// point", after any failure or kill, and say whether it could.
    fn restore(&mut self, seq: u64) -> Result<Tracked>;

    /// Drop all tracking state (before a pass that reads every disk whole).
    fn drop_tracking(&mut self) -> Result<()>;

    /// Freeze every disk at one instant, starting tracking `seq`. Unless `first`,
    /// tracking `seq - 1` stops at the same instant and [`TrackingSource::changes`]
    /// says what it recorded.
    fn cut(&mut self, seq: u64, first: bool) -> Result<Self::Cut>;

    /// Disk `disk`'s changes between the previous cut and `cut`. `dir` is where a
    /// source that writes change logs itself puts it; `header` is the log's header.
    fn changes(&mut self, cut: &Self::Cut, disk: usize, dir: &Path, header: LogHeader) -> Result<Changes>;

    /// Check, after every disk of `cut` was read and before anything commits, that
    /// the views held all along: what was read is the disks at the cut's instant.
    fn verify(&mut self, cut: &Self::Cut) -> Result<()>;

    /// Take the cut's views down (tracking stays).
    fn release(&mut self, cut: &mut Self::Cut) -> Result<()>;

    /// Whether an initial replication that failed keeps its cut, for the next pass
    /// to resume from ([`TrackingSource::resume`]). A QEMU view is not kept (it slows
    /// the guest's writes while it exists); a reflink snapshot costs only the space
    /// the VM rewrites meanwhile.
    fn keeps_failed_cut(&self) -> bool;

    /// The point holding tracking `seq`'s changes is committed: drop what held them.
    fn committed(&mut self, seq: u64) -> Result<()>;
}

/// Copy `extents` of `view` into a new change log in `dir` and seal it. Over `budget`
/// bytes of log, nothing is sealed (the partial log is removed) and an error of kind
/// `Busy` says so: the caller keeps the changes tracked for the next cut.
pub fn stage_extents(
    view: &dyn Disk,
    extents: &[Range<u64>],
    dir: &Path,
    header: LogHeader,
    budget: u64,
) -> Result<SealedLog> {
    /// Largest piece read and logged at once (memory per disk while staging).
    const PIECE: u64 = 4 << 20;
    if view.virtual_size() != header.virtual_size {
        return Err(Error::invalid(format!(
            "the view has {} bytes, the log header says {}",
            view.virtual_size(),
            header.virtual_size
        )));
    }
    let mut log = LogWriter::create(dir, header)?;
    let partial = crate::changelog::log_paths(dir, header.seq).0;
    let fail = |log: LogWriter, e: Error| {
        drop(log);
        let _ = std::fs::remove_file(&partial);
        Err(e)
    };
    let mut buf = vec![0u8; PIECE as usize];
    for e in extents {
        if e.end > header.virtual_size || e.start > e.end {
            return fail(log, Error::corrupt(format!("changed extent {e:?} is beyond the disk's end")));
        }
        let mut at = e.start;
        while at < e.end {
            let n = (e.end - at).min(PIECE);
            let b = &mut buf[..n as usize];
            if let Err(err) = view.read_at(b, at) {
                return fail(log, Error::from(err).context(format!("reading the view at {at}")));
            }
            if let Err(err) = log.data(at, b) {
                return fail(log, err);
            }
            at += n;
            if log.bytes_written() > budget {
                return fail(
                    log,
                    Error::new(
                        ErrorKind::Busy,
                        format!(
                            "the change log would exceed its budget of {budget} bytes; the changes stay tracked"
                        ),
                    ),
                );
            }
        }
    }
    log.seal()
}

/// The scan source: a VM of image files. A cut is a snapshot of every image (a
/// reflink copy where the filesystem can make one, else the image read in place, which
/// is refused while something has it open for writing unless forced); nothing is
/// tracked between cuts, so every cycle after the first compares the disks with the
/// previous point and ships only what differs.
#[derive(Debug)]
pub struct ScanSource {
    vm: VmDef,
    /// Where this source's snapshots go (one folder per cut).
    snapshots: PathBuf,
    force: bool,
    granularity: u64,
}

/// A scan cut: every image snapshotted (or read in place).
#[derive(Debug)]
pub struct ScanCut {
    seq: u64,
    instant: SystemTime,
    disks: Vec<CutDisk>,
    dir: PathBuf,
}

impl Cut for ScanCut {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn instant(&self) -> SystemTime {
        self.instant
    }
    fn disks(&self) -> &[CutDisk] {
        &self.disks
    }
}

impl ScanSource {
    /// The scan source of `vm` (a VM of image files), its snapshots under `snapshots`.
    /// `force`: read an image in place even while it is open for writing.
    pub fn new(vm: &VmDef, snapshots: PathBuf, force: bool, granularity: u64) -> ScanSource {
        ScanSource { vm: vm.clone(), snapshots, force, granularity }
    }

    fn cut_dir(&self, seq: u64) -> PathBuf {
        self.snapshots.join(format!("cut-{seq}"))
    }
}

impl TrackingSource for ScanSource {
    type Cut = ScanCut;

    fn name(&self) -> &'static str {
        "scan"
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn clean_leftovers(&mut self) -> Result<()> {
        // Snapshots of cuts a killed run made: reflink copies only (never an image).
        if let Ok(dir) = std::fs::read_dir(&self.snapshots) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().starts_with("cut-") {
                    std::fs::remove_dir_all(e.path())
                        .map_err(|err| Error::io(format!("removing {}", e.path().display()), err))?;
                }
            }
        }
        Ok(())
    }

    fn resume(&mut self, seq: u64, disks: &[ReplicationDiskRow]) -> Result<Option<ScanCut>> {
        let intact = disks.len() == self.vm.disks.len() && disks.iter().all(|d| d.read_path.exists());
        if !intact {
            return Ok(None);
        }
        let disks = disks
            .iter()
            .map(|d| CutDisk {
                size: d.virtual_size,
                read_path: d.read_path.clone(),
                snapshot: SnapshotKind::from_name(&d.snapshot_kind).unwrap_or_default(),
                format: d.source_format.clone(),
                warning: None,
            })
            .collect();
        Ok(Some(ScanCut { seq, instant: SystemTime::now(), disks, dir: self.cut_dir(seq) }))
    }

    fn restore(&mut self, _seq: u64) -> Result<Tracked> {
        Ok(Tracked::Never)
    }

    fn drop_tracking(&mut self) -> Result<()> {
        Ok(())
    }

    fn cut(&mut self, seq: u64, _first: bool) -> Result<ScanCut> {
        let dir = self.cut_dir(seq);
        let instant = SystemTime::now();
        let mut cut = ScanCut { seq, instant, disks: Vec::new(), dir: dir.clone() };
        let res = (|| {
            for (i, vd) in self.vm.disks.iter().enumerate() {
                let src = &vd.path;
                let o = tern_disk::OpenOptions {
                    allow_backing: true,
                    format: vd.format,
                    ..tern_disk::OpenOptions::read_only()
                };
                let disk = tern_disk::open_disk(src, &o)
                    .map_err(|e| Error::from(e).context(format!("disk {i} of VM {}", self.vm.name)))?;
                let info = disk.info()?;
                // A relative backing file name would not resolve from the snapshot
                // folder, so images with a backing file are read in place.
                let snap = if info.backing.is_some() {
                    let w = snapshot::writers_of(src)?;
                    if !w.is_empty() && !self.force {
                        return Err(Error::new(
                            ErrorKind::Busy,
                            format!(
                                "{} has a backing file and is open for writing: stop the VM or pass --force",
                                src.display()
                            ),
                        ));
                    }
                    snapshot::Snapshot { path: src.clone(), kind: SnapshotKind::InPlace, warning: None }
                } else {
                    snapshot::take(src, &dir, &format!("disk-{i}"), self.force)?
                };
                cut.disks.push(CutDisk {
                    size: disk.virtual_size(),
                    read_path: snap.path,
                    snapshot: snap.kind,
                    format: info.format.name().into(),
                    warning: snap.warning,
                });
            }
            Ok(())
        })();
        match res {
            Ok(()) => Ok(cut),
            Err(e) => {
                let _ = self.release(&mut cut);
                Err(e)
            }
        }
    }

    fn changes(&mut self, _cut: &ScanCut, _disk: usize, _dir: &Path, _header: LogHeader) -> Result<Changes> {
        Ok(Changes::Unknown)
    }

    fn verify(&mut self, cut: &ScanCut) -> Result<()> {
        // An image read in place must not have been opened for writing meanwhile (a
        // VM started during the read): the point would mix two moments.
        for (i, d) in cut.disks.iter().enumerate() {
            if d.snapshot != SnapshotKind::InPlace || self.force {
                continue;
            }
            let w = snapshot::writers_of(&d.read_path)?;
            if !w.is_empty() {
                let who = w.iter().map(|w| format!("{} (pid {})", w.command, w.pid)).collect::<Vec<_>>();
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!(
                        "disk {i} ({}) was opened for writing by {} while tern read it in place: \
                         nothing is committed (the next pass reads it again)",
                        d.read_path.display(),
                        who.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn release(&mut self, cut: &mut ScanCut) -> Result<()> {
        // Only the reflink copies tern made: never an image read in place.
        for d in cut.disks.iter().filter(|d| d.snapshot == SnapshotKind::Reflink) {
            let _ = std::fs::remove_file(&d.read_path);
            // Its folder: this cut's, or (resumed) the one an earlier run made.
            if let Some(parent) = d.read_path.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        let _ = std::fs::remove_dir(&cut.dir);
        let _ = std::fs::remove_dir(&self.snapshots);
        Ok(())
    }

    fn keeps_failed_cut(&self) -> bool {
        true
    }

    fn committed(&mut self, _seq: u64) -> Result<()> {
        Ok(())
    }
}
