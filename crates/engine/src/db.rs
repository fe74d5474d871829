//! The state database: SQLite under the data directory (docs/formats/state-db.md).
//!
//! It is a cache of the store plus replication progress: losing it loses no replicated
//! data (points are found again by reading manifests). The schema version is SQLite's
//! `PRAGMA user_version`; [`StateDb::open`] upgrades older schemas in order and refuses
//! newer ones. WAL mode lets `tern status` read while a replication writes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use crate::vm::{Firmware, VmDef, VmDisk};
use crate::{Error, ErrorKind, Result};

/// Schema version this build writes. NEVER reuse a number: each version's DDL is kept
/// in [`MIGRATIONS`] so that any older database can be upgraded.
pub const SCHEMA_VERSION: i64 = 6;

const MIGRATIONS: &[&str] = &[
    // Version 1.
    r#"
    CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        cpus INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        firmware TEXT NOT NULL CHECK (firmware IN ('bios', 'uefi')),
        created TEXT NOT NULL
    );
    CREATE TABLE vm_disks (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        disk INTEGER NOT NULL,
        path TEXT NOT NULL,
        PRIMARY KEY (vm_id, disk)
    );
    CREATE TABLE replications (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        store_url TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('running', 'done')),
        instant TEXT NOT NULL,
        chunk_size INTEGER NOT NULL,
        run_started TEXT,
        run_base_bytes INTEGER NOT NULL DEFAULT 0,
        finished TEXT,
        PRIMARY KEY (vm_id, point_id)
    );
    CREATE TABLE replication_disks (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        disk INTEGER NOT NULL,
        source_path TEXT NOT NULL,
        read_path TEXT NOT NULL,
        snapshot_kind TEXT NOT NULL CHECK (snapshot_kind IN ('reflink', 'in-place')),
        source_format TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_uploaded INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ('pending', 'copying', 'done')),
        PRIMARY KEY (vm_id, point_id, disk),
        FOREIGN KEY (vm_id, point_id) REFERENCES replications(vm_id, point_id) ON DELETE CASCADE
    );
    CREATE TABLE chunk_progress (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        disk INTEGER NOT NULL,
        chunk INTEGER NOT NULL,
        address BLOB,
        PRIMARY KEY (vm_id, point_id, disk, chunk)
    ) WITHOUT ROWID;
    CREATE TABLE points (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        store_url TEXT NOT NULL,
        instant TEXT NOT NULL,
        manifest TEXT NOT NULL,
        PRIMARY KEY (store_url, vm_id, point_id)
    );
    CREATE TABLE settings (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // Version 2: a running replication's recent rate, for `tern status`.
    r#"
    ALTER TABLE replications ADD COLUMN recent_rate INTEGER;
    "#,
    // Version 3: the store each VM replicates to (NULL: not fixed yet, the default
    // store), taken from its latest replication; a disk's format when the user gave one;
    // a running replication's live progress (chunks in flight counted by what was sent).
    r#"
    ALTER TABLE vms ADD COLUMN store_url TEXT;
    UPDATE vms SET store_url = (
        SELECT r.store_url FROM replications r WHERE r.vm_id = vms.id
        ORDER BY r.point_id DESC LIMIT 1
    );
    ALTER TABLE vm_disks ADD COLUMN format TEXT
        CHECK (format IS NULL OR format IN ('raw', 'qcow2', 'vhd', 'vhdx'));
    ALTER TABLE replications ADD COLUMN run_live_bytes INTEGER;
    "#,
    // Version 4: VMs in a running QEMU (`vms.qemu`: the QMP socket, the NBD server,
    // the node of each disk), their change tracking, and disks read from a QEMU view.
    r#"
    ALTER TABLE vms ADD COLUMN qemu TEXT;
    CREATE TABLE tracking (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        store_url TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('initial', 'resync', 'delta', 'backlog')),
        last_point TEXT,
        last_error TEXT,
        updated TEXT NOT NULL
    );
    CREATE TABLE vm_settings (
        vm_id TEXT PRIMARY KEY REFERENCES vms(id) ON DELETE CASCADE,
        enabled INTEGER NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        frequency_ms INTEGER,
        retention_age_s INTEGER,
        retention_count INTEGER,
        log_budget INTEGER,
        updated TEXT NOT NULL
    );
    CREATE TABLE replication_disks_v4 (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        disk INTEGER NOT NULL,
        source_path TEXT NOT NULL,
        read_path TEXT NOT NULL,
        snapshot_kind TEXT NOT NULL CHECK (snapshot_kind IN ('reflink', 'in-place', 'qemu-view')),
        source_format TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_uploaded INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ('pending', 'copying', 'done')),
        PRIMARY KEY (vm_id, point_id, disk),
        FOREIGN KEY (vm_id, point_id) REFERENCES replications(vm_id, point_id) ON DELETE CASCADE
    );
    INSERT INTO replication_disks_v4 SELECT * FROM replication_disks;
    DROP TABLE replication_disks;
    ALTER TABLE replication_disks_v4 RENAME TO replication_disks;
    "#,
    // Version 5: what happened to a VM's replication that outlives the pass (a
    // resync and why, a backlog), for `tern status`; disks read from a file QEMU
    // pushed a cut into (`qemu-push`).
    r#"
    CREATE TABLE vm_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        at TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('resync', 'backlog', 'scan')),
        message TEXT NOT NULL
    );
    CREATE INDEX vm_events_by_vm ON vm_events (vm_id, kind, id);
    CREATE TABLE replication_disks_v5 (
        vm_id TEXT NOT NULL,
        point_id TEXT NOT NULL,
        disk INTEGER NOT NULL,
        source_path TEXT NOT NULL,
        read_path TEXT NOT NULL,
        snapshot_kind TEXT NOT NULL CHECK (snapshot_kind IN ('reflink', 'in-place', 'qemu-view', 'qemu-push')),
        source_format TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        bytes_done INTEGER NOT NULL DEFAULT 0,
        bytes_uploaded INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL CHECK (state IN ('pending', 'copying', 'done')),
        PRIMARY KEY (vm_id, point_id, disk),
        FOREIGN KEY (vm_id, point_id) REFERENCES replications(vm_id, point_id) ON DELETE CASCADE
    );
    INSERT INTO replication_disks_v5 SELECT * FROM replication_disks;
    DROP TABLE replication_disks;
    ALTER TABLE replication_disks_v5 RENAME TO replication_disks;
    "#,
    // Version 6: compactions done beside the cycles (docs/formats/segment.md,
    // "Compaction"), until a cycle rebases onto them.
    r#"
    CREATE TABLE compactions (
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        disk INTEGER NOT NULL,
        point_id TEXT NOT NULL,
        chain_base TEXT NOT NULL,
        segments INTEGER NOT NULL,
        last_segment TEXT NOT NULL,
        index_digest TEXT NOT NULL,
        data_chunks INTEGER NOT NULL,
        stored_bytes INTEGER NOT NULL,
        created TEXT NOT NULL,
        PRIMARY KEY (vm_id, disk, point_id)
    );
    "#,
];

/// Events kept per VM and kind (older ones are dropped).
const EVENTS_KEPT: i64 = 50;

/// Something that happened to a VM's replication (`vm_events`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmEvent {
    /// When (RFC 3339).
    pub at: String,
    /// `resync` (tracking was lost; the message says why), `backlog` (a cycle's
    /// changes did not fit in the log budget or file system), or `scan` (a QEMU VM was
    /// shut off and its images were scanned).
    pub kind: String,
    /// What happened, for the user.
    pub message: String,
}

/// How a VM is replicated: what `tern replicate --frequency ...`, `pause` and
/// `resume` set, and the agent follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSettings {
    /// Replication is enabled: the agent replicates the VM.
    pub enabled: bool,
    /// Paused by `tern pause`: the agent skips it until `tern resume`.
    pub paused: bool,
    /// Time between cycles; `None`: the agent's `--frequency`.
    pub frequency_ms: Option<u64>,
    /// Points older than this many seconds expire (the newest point never does).
    pub retention_age_s: Option<u64>,
    /// At most this many points are kept.
    pub retention_count: Option<u64>,
    /// Most bytes one disk's change log may take on the host; `None`: the default
    /// ([`crate::DEFAULT_LOG_BUDGET`]).
    pub log_budget: Option<u64>,
}

/// A QEMU VM's change tracking, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingRow {
    /// VM id.
    pub vm_id: String,
    /// The store the tracked points are in.
    pub store_url: String,
    /// The bitmap sequence number that records changes since `last_point`.
    pub seq: u64,
    /// `initial` or `resync` (a full pass is due or running: the bitmap does not yet
    /// cover everything since a committed point), `delta` (it does), or `backlog` (it
    /// does, and the last cycle could not stage its changes: over the log budget, or
    /// the log file system full).
    pub state: String,
    /// The newest point this tracking committed.
    pub last_point: Option<String>,
    /// The last cycle's error, cleared by a committed point.
    pub last_error: Option<String>,
    /// When the row last changed (RFC 3339).
    pub updated: String,
}

/// id, name, cpus, memory_bytes, firmware, store_url, qemu.
type VmRow = (String, String, i64, i64, String, Option<String>, Option<String>);

/// The open state database. One connection behind a mutex: writers are few (one
/// replication's progress writer, CLI commands) and SQLite serializes them anyway.
#[derive(Debug)]
pub struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

/// A replication as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationRow {
    /// VM id.
    pub vm_id: String,
    /// The point this replication will create.
    pub point_id: String,
    /// The store it writes to.
    pub store_url: String,
    /// `running` or `done`.
    pub state: String,
    /// The snapshot instant (RFC 3339).
    pub instant: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// When the current (or last) run of `tern replicate` started (RFC 3339).
    pub run_started: Option<String>,
    /// Bytes done when that run started (for the rate).
    pub run_base_bytes: u64,
    /// When the point was committed.
    pub finished: Option<String>,
    /// Guest bytes per second over the last minute of the run, updated about every
    /// second while it runs.
    pub recent_rate: Option<u64>,
    /// Guest bytes this run has processed, chunks in flight counted by the share of
    /// them sent, updated with `recent_rate`: ahead of the chunks recorded as done.
    pub run_live_bytes: u64,
}

/// One disk of a replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationDiskRow {
    /// Disk number in the VM.
    pub disk: u32,
    /// The VM's image.
    pub source_path: PathBuf,
    /// What is read: the reflink snapshot, or the image itself.
    pub read_path: PathBuf,
    /// `reflink` or `in-place`.
    pub snapshot_kind: String,
    /// Detected format of the source.
    pub source_format: String,
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// Guest bytes whose chunk is recorded.
    pub bytes_done: u64,
    /// Envelope bytes uploaded (after dedup).
    pub bytes_uploaded: u64,
    /// `pending`, `copying` or `done`.
    pub state: String,
}

/// A compaction done beside the cycles: disk `disk` of point `point_id` has a base
/// index of its own in the store, which no manifest references yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionRow {
    /// VM id.
    pub vm_id: String,
    /// The disk.
    pub disk: u32,
    /// The compacted point: its index is `vms/<vm>/points/<point_id>/disk-<disk>.index`.
    pub point_id: String,
    /// The base of the chain it folded.
    pub chain_base: String,
    /// How many segments of that chain it folded.
    pub segments: u64,
    /// The point of the last of them.
    pub last_segment: String,
    /// The new index's digest (hex).
    pub index_digest: String,
    /// Chunks the index references.
    pub data_chunks: u64,
    /// Envelope bytes the compaction stored.
    pub stored_bytes: u64,
}

/// A recovery point as cached locally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRow {
    /// VM id.
    pub vm_id: String,
    /// Point id.
    pub point_id: String,
    /// Store URL.
    pub store_url: String,
    /// Instant (RFC 3339).
    pub instant: String,
    /// The manifest JSON.
    pub manifest: String,
}

fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} is too large for the state database")))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl StateDb {
    /// Open (creating if needed) the database at `path` and bring its schema up to date.
    pub fn open(path: &Path) -> Result<StateDb> {
        let ctx =
            |e: rusqlite::Error| Error::new(ErrorKind::Io, format!("state database {}: {e}", path.display()));
        let conn = Connection::open(path).map_err(ctx)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(ctx)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(ctx)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(ctx)?;
        Self::init(conn, path)
    }

    /// An empty database in memory with the current schema: what read-only commands
    /// see on a data directory that has no database yet (they create no file).
    pub fn open_in_memory() -> Result<StateDb> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory()
            .map_err(|e| Error::new(ErrorKind::Io, format!("in-memory state database: {e}")))?;
        Self::init(conn, path)
    }

    fn init(conn: Connection, path: &Path) -> Result<StateDb> {
        let ctx =
            |e: rusqlite::Error| Error::new(ErrorKind::Io, format!("state database {}: {e}", path.display()));
        conn.pragma_update(None, "foreign_keys", true).map_err(ctx)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(ctx)?;
        if version > SCHEMA_VERSION {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "state database {} has schema version {version}; this tern knows up to {SCHEMA_VERSION}: use a newer tern",
                    path.display()
                ),
            ));
        }
        for (i, ddl) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
            let tx = conn.unchecked_transaction().map_err(ctx)?;
            tx.execute_batch(ddl).map_err(ctx)?;
            tx.pragma_update(None, "user_version", i as i64 + 1).map_err(ctx)?;
            tx.commit().map_err(ctx)?;
        }
        Ok(StateDb { conn: Mutex::new(conn), path: path.to_path_buf() })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions
        // roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- VMs ----

    /// Register a VM; its name must be new.
    pub fn vm_add(&self, vm: &VmDef) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let exists: Option<String> =
            tx.query_row("SELECT id FROM vms WHERE name = ?1", [&vm.name], |r| r.get(0)).optional()?;
        if exists.is_some() {
            return Err(Error::invalid(format!("a VM named {:?} already exists", vm.name)));
        }
        tx.execute(
            "INSERT INTO vms (id, name, cpus, memory_bytes, firmware, created, store_url, qemu) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                vm.id,
                vm.name,
                vm.cpus,
                to_i64(vm.memory_bytes, "memory")?,
                vm.firmware.name(),
                crate::now_rfc3339(),
                vm.store_url,
                vm.qemu
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| Error::invalid(format!("encoding the QEMU source: {e}")))?
            ],
        )?;
        for (i, d) in vm.disks.iter().enumerate() {
            let path = d
                .path
                .to_str()
                .ok_or_else(|| Error::invalid(format!("disk path {} is not UTF-8", d.path.display())))?;
            tx.execute(
                "INSERT INTO vm_disks (vm_id, disk, path, format) VALUES (?1, ?2, ?3, ?4)",
                params![vm.id, i as i64, path, d.format.map(|f| f.name())],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn vm_from_row(c: &Connection, row: VmRow) -> Result<VmDef> {
        let (id, name, cpus, mem, fw, store_url, qemu) = row;
        let qemu = qemu
            .map(|q| serde_json::from_str(&q))
            .transpose()
            .map_err(|e| Error::corrupt(format!("state database: VM {name}'s QEMU source: {e}")))?;
        let mut st = c.prepare("SELECT path, format FROM vm_disks WHERE vm_id = ?1 ORDER BY disk")?;
        let rows = st
            .query_map([&id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        let disks = rows
            .into_iter()
            .map(|(path, format)| {
                let format = match format.as_deref() {
                    None => None,
                    Some(f) => Some(crate::vm::parse_format(f).map_err(|_| {
                        Error::corrupt(format!("state database: disk {path} has unknown format {f:?}"))
                    })?),
                };
                Ok(VmDisk { path: PathBuf::from(path), format })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VmDef {
            id,
            name,
            cpus: u32::try_from(cpus).unwrap_or(1),
            memory_bytes: to_u64(mem),
            firmware: Firmware::parse(&fw)?,
            disks,
            store_url,
            qemu,
        })
    }

    const VM_COLS: &'static str = "id, name, cpus, memory_bytes, firmware, store_url, qemu";

    fn vm_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRow> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
    }

    // ---- Tracking ----

    /// VM `vm_id`'s tracking, if it has any.
    pub fn tracking(&self, vm_id: &str) -> Result<Option<TrackingRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT vm_id, store_url, seq, state, last_point, last_error, updated FROM tracking WHERE vm_id = ?1",
                [vm_id],
                |r| {
                    Ok(TrackingRow {
                        vm_id: r.get(0)?,
                        store_url: r.get(1)?,
                        seq: to_u64(r.get(2)?),
                        state: r.get(3)?,
                        last_point: r.get(4)?,
                        last_error: r.get(5)?,
                        updated: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    /// Record VM `row.vm_id`'s tracking (replacing what was there).
    pub fn set_tracking(&self, row: &TrackingRow) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO tracking (vm_id, store_url, seq, state, last_point, last_error, updated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                row.vm_id,
                row.store_url,
                to_i64(row.seq, "bitmap sequence")?,
                row.state,
                row.last_point,
                row.last_error,
                crate::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// VM `vm_id`'s replication settings (all off when never set).
    pub fn settings(&self, vm_id: &str) -> Result<VmSettings> {
        let row = self
            .conn()
            .query_row(
                "SELECT enabled, paused, frequency_ms, retention_age_s, retention_count, log_budget FROM vm_settings WHERE vm_id = ?1",
                [vm_id],
                |r| {
                    Ok(VmSettings {
                        enabled: r.get::<_, i64>(0)? != 0,
                        paused: r.get::<_, i64>(1)? != 0,
                        frequency_ms: r.get::<_, Option<i64>>(2)?.map(to_u64),
                        retention_age_s: r.get::<_, Option<i64>>(3)?.map(to_u64),
                        retention_count: r.get::<_, Option<i64>>(4)?.map(to_u64),
                        log_budget: r.get::<_, Option<i64>>(5)?.map(to_u64),
                    })
                },
            )
            .optional()?;
        Ok(row.unwrap_or_default())
    }

    /// Record VM `vm_id`'s replication settings.
    pub fn set_settings(&self, vm_id: &str, s: &VmSettings) -> Result<()> {
        let opt = |v: Option<u64>, what: &str| v.map(|v| to_i64(v, what)).transpose();
        self.conn().execute(
            "INSERT OR REPLACE INTO vm_settings (vm_id, enabled, paused, frequency_ms, retention_age_s, retention_count, log_budget, updated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                vm_id,
                s.enabled as i64,
                s.paused as i64,
                opt(s.frequency_ms, "frequency")?,
                opt(s.retention_age_s, "retention age")?,
                opt(s.retention_count, "retention count")?,
                opt(s.log_budget, "log budget")?,
                crate::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// Record an event of VM `vm_id` (kind `resync`, `backlog` or `scan`).
    pub fn add_event(&self, vm_id: &str, kind: &str, message: &str) -> Result<()> {
        let c = self.conn();
        c.execute(
            "INSERT INTO vm_events (vm_id, at, kind, message) VALUES (?1, ?2, ?3, ?4)",
            params![vm_id, crate::now_rfc3339(), kind, message],
        )?;
        c.execute(
            "DELETE FROM vm_events WHERE vm_id = ?1 AND kind = ?2 AND id NOT IN \
             (SELECT id FROM vm_events WHERE vm_id = ?1 AND kind = ?2 ORDER BY id DESC LIMIT ?3)",
            params![vm_id, kind, EVENTS_KEPT],
        )?;
        Ok(())
    }

    /// The newest event of kind `kind` of VM `vm_id`.
    pub fn last_event(&self, vm_id: &str, kind: &str) -> Result<Option<VmEvent>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT at, kind, message FROM vm_events WHERE vm_id = ?1 AND kind = ?2 ORDER BY id DESC LIMIT 1",
                [vm_id, kind],
                |r| Ok(VmEvent { at: r.get(0)?, kind: r.get(1)?, message: r.get(2)? }),
            )
            .optional()?)
    }

    /// Forget VM `vm_id`'s tracking.
    pub fn remove_tracking(&self, vm_id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM tracking WHERE vm_id = ?1", [vm_id])?;
        Ok(())
    }

    /// The VM named `name`.
    pub fn vm_get(&self, name: &str) -> Result<Option<VmDef>> {
        let c = self.conn();
        let sql = format!("SELECT {} FROM vms WHERE name = ?1", Self::VM_COLS);
        match c.query_row(&sql, [name], Self::vm_row).optional()? {
            None => Ok(None),
            Some(row) => Ok(Some(Self::vm_from_row(&c, row)?)),
        }
    }

    /// Every VM, by name.
    pub fn vm_list(&self) -> Result<Vec<VmDef>> {
        let c = self.conn();
        let sql = format!("SELECT {} FROM vms ORDER BY name", Self::VM_COLS);
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], Self::vm_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|row| Self::vm_from_row(&c, row)).collect()
    }

    /// Fix the store VM `vm_id` replicates to.
    /// Record a compaction done beside the cycles.
    pub fn add_compaction(&self, r: &CompactionRow) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO compactions (vm_id, disk, point_id, chain_base, segments, last_segment, \
             index_digest, data_chunks, stored_bytes, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.vm_id,
                r.disk,
                r.point_id,
                r.chain_base,
                to_i64(r.segments, "segments")?,
                r.last_segment,
                r.index_digest,
                to_i64(r.data_chunks, "data chunks")?,
                to_i64(r.stored_bytes, "stored bytes")?,
                crate::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// Compactions of disk `disk` of VM `vm_id` not yet used, newest first.
    pub fn compactions(&self, vm_id: &str, disk: u32) -> Result<Vec<CompactionRow>> {
        let c = self.conn();
        let mut q = c.prepare(
            "SELECT vm_id, disk, point_id, chain_base, segments, last_segment, index_digest, data_chunks, \
             stored_bytes FROM compactions WHERE vm_id = ?1 AND disk = ?2 ORDER BY point_id DESC",
        )?;
        let rows = q.query_map(params![vm_id, disk], |r| {
            Ok(CompactionRow {
                vm_id: r.get(0)?,
                disk: r.get(1)?,
                point_id: r.get(2)?,
                chain_base: r.get(3)?,
                segments: r.get::<_, i64>(4)? as u64,
                last_segment: r.get(5)?,
                index_digest: r.get(6)?,
                data_chunks: r.get::<_, i64>(7)? as u64,
                stored_bytes: r.get::<_, i64>(8)? as u64,
            })
        })?;
        Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
    }

    /// Forget the compaction of disk `disk` of point `point_id` (used, or stale).
    pub fn remove_compaction(&self, vm_id: &str, disk: u32, point_id: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM compactions WHERE vm_id = ?1 AND disk = ?2 AND point_id = ?3",
            params![vm_id, disk, point_id],
        )?;
        Ok(())
    }

    /// Record how VM `vm_id` is reached in its QEMU (its tracking mode, say).
    pub fn vm_set_qemu(&self, vm_id: &str, qemu: &crate::QemuSource) -> Result<()> {
        let json = serde_json::to_string(qemu)
            .map_err(|e| Error::invalid(format!("encoding the QEMU source: {e}")))?;
        self.conn().execute("UPDATE vms SET qemu = ?2 WHERE id = ?1", [vm_id, &json])?;
        Ok(())
    }

    /// Move VM `vm_id` to the store at `store_url`.
    pub fn vm_set_store(&self, vm_id: &str, store_url: &str) -> Result<()> {
        self.conn().execute("UPDATE vms SET store_url = ?2 WHERE id = ?1", [vm_id, store_url])?;
        Ok(())
    }

    /// Forget a VM and its local replication progress. Stored points stay in the store.
    pub fn vm_remove(&self, name: &str) -> Result<VmDef> {
        let vm = self
            .vm_get(name)?
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no VM named {name:?}")))?;
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM chunk_progress WHERE vm_id = ?1", [&vm.id])?;
        tx.execute("DELETE FROM replications WHERE vm_id = ?1", [&vm.id])?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [&vm.id])?;
        tx.commit()?;
        Ok(vm)
    }

    // ---- Replications ----

    fn replication_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicationRow> {
        Ok(ReplicationRow {
            vm_id: r.get(0)?,
            point_id: r.get(1)?,
            store_url: r.get(2)?,
            state: r.get(3)?,
            instant: r.get(4)?,
            chunk_size: r.get(5)?,
            run_started: r.get(6)?,
            run_base_bytes: to_u64(r.get(7)?),
            finished: r.get(8)?,
            recent_rate: r.get::<_, Option<i64>>(9)?.map(to_u64),
            run_live_bytes: to_u64(r.get::<_, Option<i64>>(10)?.unwrap_or(0)),
        })
    }

    const REPL_COLS: &'static str =
        "vm_id, point_id, store_url, state, instant, chunk_size, run_started, run_base_bytes, finished, recent_rate, run_live_bytes";

    /// The unfinished replication of `vm_id` to `store_url`, if any.
    pub fn running_replication(&self, vm_id: &str, store_url: &str) -> Result<Option<ReplicationRow>> {
        let c = self.conn();
        let sql = format!(
            "SELECT {} FROM replications WHERE vm_id = ?1 AND store_url = ?2 AND state = 'running'",
            Self::REPL_COLS
        );
        Ok(c.query_row(&sql, [vm_id, store_url], Self::replication_from).optional()?)
    }

    /// Every unfinished replication of `vm_id`, to any store.
    pub fn running_replications(&self, vm_id: &str) -> Result<Vec<ReplicationRow>> {
        let c = self.conn();
        let sql =
            format!("SELECT {} FROM replications WHERE vm_id = ?1 AND state = 'running'", Self::REPL_COLS);
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([vm_id], Self::replication_from)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The most recent replication of `vm_id` (running or done), for `tern status`.
    pub fn last_replication(&self, vm_id: &str) -> Result<Option<ReplicationRow>> {
        let c = self.conn();
        let sql = format!(
            "SELECT {} FROM replications WHERE vm_id = ?1 ORDER BY (state = 'running') DESC, point_id DESC LIMIT 1",
            Self::REPL_COLS
        );
        Ok(c.query_row(&sql, [vm_id], Self::replication_from).optional()?)
    }

    /// Record a new replication and its disks.
    pub fn start_replication(&self, row: &ReplicationRow, disks: &[ReplicationDiskRow]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO replications (vm_id, point_id, store_url, state, instant, chunk_size) VALUES (?1, ?2, ?3, 'running', ?4, ?5)",
            params![row.vm_id, row.point_id, row.store_url, row.instant, row.chunk_size],
        )?;
        for d in disks {
            tx.execute(
                "INSERT INTO replication_disks (vm_id, point_id, disk, source_path, read_path, snapshot_kind, source_format, virtual_size, state) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending')",
                params![
                    row.vm_id,
                    row.point_id,
                    d.disk,
                    d.source_path.to_string_lossy(),
                    d.read_path.to_string_lossy(),
                    d.snapshot_kind,
                    d.source_format,
                    to_i64(d.virtual_size, "disk size")?
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Drop an unfinished replication whose snapshot is gone, with its progress.
    pub fn finish_abandoned(&self, vm_id: &str, point_id: &str) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM chunk_progress WHERE vm_id = ?1 AND point_id = ?2",
            params![vm_id, point_id],
        )?;
        tx.execute("DELETE FROM replications WHERE vm_id = ?1 AND point_id = ?2", params![vm_id, point_id])?;
        tx.commit()?;
        Ok(())
    }

    /// Mark the start of a run (first or resumed), for the rate in `tern status`.
    pub fn mark_run_started(&self, vm_id: &str, point_id: &str) -> Result<()> {
        let c = self.conn();
        c.execute(
            "UPDATE replications SET run_started = ?3, run_base_bytes = \
             (SELECT COALESCE(SUM(bytes_done), 0) FROM replication_disks WHERE vm_id = ?1 AND point_id = ?2) \
             WHERE vm_id = ?1 AND point_id = ?2",
            params![vm_id, point_id, crate::now_rfc3339()],
        )?;
        Ok(())
    }

    /// Record a running replication's recent rate (`None`: not known yet).
    pub fn record_rate(
        &self,
        vm_id: &str,
        point_id: &str,
        recent_rate: Option<u64>,
        live: u64,
    ) -> Result<()> {
        let rate = recent_rate.map(|r| to_i64(r, "rate")).transpose()?;
        self.conn().execute(
            "UPDATE replications SET recent_rate = ?3, run_live_bytes = ?4 WHERE vm_id = ?1 AND point_id = ?2",
            params![vm_id, point_id, rate, to_i64(live, "live progress")?],
        )?;
        Ok(())
    }

    /// The disks of a replication, in order.
    pub fn replication_disks(&self, vm_id: &str, point_id: &str) -> Result<Vec<ReplicationDiskRow>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT disk, source_path, read_path, snapshot_kind, source_format, virtual_size, bytes_done, bytes_uploaded, state \
             FROM replication_disks WHERE vm_id = ?1 AND point_id = ?2 ORDER BY disk",
        )?;
        let rows = st
            .query_map([vm_id, point_id], |r| {
                Ok(ReplicationDiskRow {
                    disk: r.get(0)?,
                    source_path: PathBuf::from(r.get::<_, String>(1)?),
                    read_path: PathBuf::from(r.get::<_, String>(2)?),
                    snapshot_kind: r.get(3)?,
                    source_format: r.get(4)?,
                    virtual_size: to_u64(r.get(5)?),
                    bytes_done: to_u64(r.get(6)?),
                    bytes_uploaded: to_u64(r.get(7)?),
                    state: r.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Set a disk's state.
    pub fn set_disk_state(&self, vm_id: &str, point_id: &str, disk: u32, state: &str) -> Result<()> {
        let c = self.conn();
        c.execute(
            "UPDATE replication_disks SET state = ?4 WHERE vm_id = ?1 AND point_id = ?2 AND disk = ?3",
            params![vm_id, point_id, disk, state],
        )?;
        Ok(())
    }

    /// Record completed chunks in one transaction: `(chunk, address or None for zero,
    /// guest bytes, uploaded bytes)`.
    pub fn record_chunks(
        &self,
        vm_id: &str,
        point_id: &str,
        disk: u32,
        chunks: &[(u64, Option<[u8; 32]>, u64, u64)],
    ) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let tx = c.transaction()?;
        let (mut done, mut up) = (0u64, 0u64);
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO chunk_progress (vm_id, point_id, disk, chunk, address) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (n, addr, guest, uploaded) in chunks {
                let changed = st.execute(params![
                    vm_id,
                    point_id,
                    disk,
                    to_i64(*n, "chunk")?,
                    addr.map(|a| a.to_vec())
                ])?;
                if changed == 1 {
                    done += guest;
                    up += uploaded;
                }
            }
        }
        tx.execute(
            "UPDATE replication_disks SET bytes_done = bytes_done + ?4, bytes_uploaded = bytes_uploaded + ?5 \
             WHERE vm_id = ?1 AND point_id = ?2 AND disk = ?3",
            params![vm_id, point_id, disk, to_i64(done, "bytes")?, to_i64(up, "bytes")?],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Recorded chunks of a disk: `(chunk, address or None for zero)`.
    pub fn recorded_chunks(
        &self,
        vm_id: &str,
        point_id: &str,
        disk: u32,
    ) -> Result<Vec<(u64, Option<[u8; 32]>)>> {
        let c = self.conn();
        let mut st = c.prepare(
            "SELECT chunk, address FROM chunk_progress WHERE vm_id = ?1 AND point_id = ?2 AND disk = ?3 ORDER BY chunk",
        )?;
        let rows = st
            .query_map(params![vm_id, point_id, disk], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(n, a)| {
                let addr = match a {
                    None => None,
                    Some(v) => Some(<[u8; 32]>::try_from(v.as_slice()).map_err(|_| {
                        Error::corrupt(format!(
                            "state database: chunk {n} of disk {disk} has a malformed address"
                        ))
                    })?),
                };
                Ok((to_u64(n), addr))
            })
            .collect()
    }

    /// Forget recorded chunks `chunks` of a disk (their objects are gone from the
    /// store: a garbage collection ran while the replication was stopped), so the
    /// resumed run reads them again.
    pub fn forget_chunks(&self, vm_id: &str, point_id: &str, disk: u32, chunks: &[u64]) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        for &n in chunks {
            tx.execute(
                "DELETE FROM chunk_progress WHERE vm_id = ?1 AND point_id = ?2 AND disk = ?3 AND chunk = ?4",
                params![vm_id, point_id, disk, to_i64(n, "chunk")?],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Commit a finished replication: mark it done, cache its point, drop its progress.
    pub fn finish_replication(&self, point: &PointRow) -> Result<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE replications SET state = 'done', finished = ?3 WHERE vm_id = ?1 AND point_id = ?2",
            params![point.vm_id, point.point_id, crate::now_rfc3339()],
        )?;
        tx.execute(
            "UPDATE replication_disks SET state = 'done' WHERE vm_id = ?1 AND point_id = ?2",
            params![point.vm_id, point.point_id],
        )?;
        tx.execute(
            "DELETE FROM chunk_progress WHERE vm_id = ?1 AND point_id = ?2",
            params![point.vm_id, point.point_id],
        )?;
        Self::insert_point(&tx, point)?;
        tx.commit()?;
        Ok(())
    }

    fn insert_point(c: &Connection, p: &PointRow) -> Result<()> {
        c.execute(
            "INSERT OR REPLACE INTO points (vm_id, point_id, store_url, instant, manifest) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![p.vm_id, p.point_id, p.store_url, p.instant, p.manifest],
        )?;
        Ok(())
    }

    /// The newest point of VM `vm_id` this host knows of (committed here or read from
    /// the store).
    pub fn newest_point(&self, vm_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT max(point_id) FROM points WHERE vm_id = ?1", [vm_id], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// The cached manifest (JSON) of VM `vm_id`'s point `point_id` in store `store_url`.
    pub fn point_manifest(&self, store_url: &str, vm_id: &str, point_id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT manifest FROM points WHERE store_url = ?1 AND vm_id = ?2 AND point_id = ?3",
                [store_url, vm_id, point_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Cache a point read from the store.
    pub fn cache_point(&self, p: &PointRow) -> Result<()> {
        Self::insert_point(&self.conn(), p)
    }

    // ---- Settings ----

    /// A setting's JSON value.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    /// Set a setting's JSON value.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_disk::Format;

    fn vm(name: &str) -> VmDef {
        VmDef {
            id: crate::vm::new_vm_id().unwrap(),
            name: name.into(),
            cpus: 2,
            memory_bytes: 1 << 30,
            firmware: Firmware::Uefi,
            disks: vec![
                PathBuf::from("/a.img").into(),
                VmDisk { path: "/b.qcow2".into(), format: Some(Format::Qcow2) },
            ],
            store_url: None,
            qemu: None,
        }
    }

    #[test]
    fn schema_is_versioned_and_reopens() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        let db = StateDb::open(&p).unwrap();
        db.vm_add(&vm("one")).unwrap();
        drop(db);
        let db = StateDb::open(&p).unwrap();
        assert_eq!(db.vm_list().unwrap().len(), 1);
        let v: i64 = db.conn().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        db.conn().pragma_update(None, "user_version", 99).unwrap();
        drop(db);
        assert!(StateDb::open(&p).unwrap_err().to_string().contains("schema version 99"));
    }

    #[test]
    fn a_version_1_database_is_upgraded_with_its_rows() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.db");
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute_batch(
                "INSERT INTO vms (id, name, cpus, memory_bytes, firmware, created)
                     VALUES ('v', 'web', 2, 1073741824, 'bios', '2026-01-01T00:00:00Z'),
                            ('w', 'new', 2, 1073741824, 'bios', '2026-01-01T00:00:00Z');
                 INSERT INTO vm_disks (vm_id, disk, path) VALUES ('v', 0, '/web.img'), ('w', 0, '/new.img');
                 INSERT INTO replications (vm_id, point_id, store_url, state, instant, chunk_size)
                     VALUES ('v', '20260101T000000Z-00000001', 'file:///old', 'done', '2026-01-01T00:00:00Z', 4194304),
                            ('v', '20260102T000000Z-00000002', 'file:///s', 'running', '2026-01-02T00:00:00Z', 4194304);",
            )
            .unwrap();
        }
        let db = StateDb::open(&p).unwrap();
        let v: i64 = db.conn().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let r = db.running_replication("v", "file:///s").unwrap().unwrap();
        assert_eq!(r.recent_rate, None);
        // Version 3: a VM replicates to the store of its latest replication; one never
        // replicated has none fixed yet. Disks keep detecting their format.
        let web = db.vm_get("web").unwrap().unwrap();
        assert_eq!(web.store_url.as_deref(), Some("file:///s"));
        assert_eq!(web.disks, vec![VmDisk { path: "/web.img".into(), format: None }]);
        assert_eq!(db.vm_get("new").unwrap().unwrap().store_url, None);
    }

    #[test]
    fn vms_round_trip_and_names_are_unique() {
        let d = tempfile::tempdir().unwrap();
        let db = StateDb::open(&d.path().join("t.db")).unwrap();
        let a = vm("a");
        db.vm_add(&a).unwrap();
        assert!(db.vm_add(&vm("a")).unwrap_err().to_string().contains("already exists"));
        assert_eq!(db.vm_get("a").unwrap().unwrap(), a);
        db.vm_set_store(&a.id, "file:///elsewhere").unwrap();
        assert_eq!(db.vm_get("a").unwrap().unwrap().store_url.as_deref(), Some("file:///elsewhere"));
        db.vm_remove("a").unwrap();
        assert!(db.vm_get("a").unwrap().is_none());
        assert_eq!(db.vm_remove("a").unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn progress_counts_each_chunk_once() {
        let d = tempfile::tempdir().unwrap();
        let db = StateDb::open(&d.path().join("t.db")).unwrap();
        let a = vm("a");
        db.vm_add(&a).unwrap();
        let row = ReplicationRow {
            vm_id: a.id.clone(),
            point_id: "p1".into(),
            store_url: "file:///s".into(),
            state: "running".into(),
            instant: crate::now_rfc3339(),
            chunk_size: 65536,
            run_started: None,
            run_base_bytes: 0,
            finished: None,
            recent_rate: None,
            run_live_bytes: 0,
        };
        let disk = ReplicationDiskRow {
            disk: 0,
            source_path: "/a.img".into(),
            read_path: "/a.img".into(),
            snapshot_kind: "in-place".into(),
            source_format: "raw".into(),
            virtual_size: 1 << 20,
            bytes_done: 0,
            bytes_uploaded: 0,
            state: "pending".into(),
        };
        db.start_replication(&row, std::slice::from_ref(&disk)).unwrap();
        db.record_chunks(&a.id, "p1", 0, &[(0, None, 65536, 0), (1, Some([7; 32]), 65536, 100)]).unwrap();
        db.record_chunks(&a.id, "p1", 0, &[(1, Some([7; 32]), 65536, 100)]).unwrap();
        let disks = db.replication_disks(&a.id, "p1").unwrap();
        assert_eq!(disks[0].bytes_done, 131072);
        assert_eq!(disks[0].bytes_uploaded, 100);
        assert_eq!(db.recorded_chunks(&a.id, "p1", 0).unwrap(), vec![(0, None), (1, Some([7; 32]))]);
        assert_eq!(db.running_replication(&a.id, "file:///s").unwrap().unwrap().point_id, "p1");
        db.record_rate(&a.id, "p1", Some(12345), 99).unwrap();
        let r = db.last_replication(&a.id).unwrap().unwrap();
        assert_eq!((r.recent_rate, r.run_live_bytes), (Some(12345), 99));
    }
}
