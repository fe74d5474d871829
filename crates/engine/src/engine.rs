//! The per-command context: data directory, key file, state database, store URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_chunk::Key;
use tern_store::{Store, StoreConfig};

use crate::throttle::{Schedule, SystemClock, Throttle};
use crate::{DataDir, Error, ErrorKind, Result, StateDb, VmDef};

/// What the global flags say.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--key-file` (or `TERN_KEY_FILE`, read by the caller or here).
    pub key_file: Option<PathBuf>,
    /// `--store` URL, or a local path.
    pub store_url: Option<String>,
    /// The host's offset from UTC, for work hours. The caller determines it while the
    /// process is single-threaded (reading the local offset later is not sound).
    pub local_offset: Option<time::UtcOffset>,
    /// A command that only reads (status, points, migrate, verify, listings): it creates
    /// nothing, neither the data directory nor the state database (an empty in-memory
    /// one stands in when there is none) nor a local store's folder.
    pub read_only: bool,
}

/// An open context for one command.
#[derive(Debug)]
pub struct Engine {
    dir: DataDir,
    key_file: PathBuf,
    /// `--store`, normalized.
    explicit_store: Option<String>,
    /// The data directory's default store.
    default_store: String,
    db: Arc<StateDb>,
    local_offset: time::UtcOffset,
}

const THROTTLE_SETTING: &str = "throttle";

/// `file://` URL for a local path; URLs pass through.
pub fn normalize_store_url(s: &str) -> Result<String> {
    if s.contains("://") {
        return Ok(s.trim_end_matches('/').to_string());
    }
    let p = Path::new(s);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::io("current directory", e))?.join(p)
    };
    Ok(format!("file://{}", abs.display()))
}

impl Engine {
    /// Resolve the data directory, create it, open the state database.
    pub fn open(opts: &EngineOptions) -> Result<Engine> {
        let dir = DataDir::resolve(opts.data_dir.as_deref())?;
        let db = if opts.read_only && !dir.db_path().exists() {
            StateDb::open_in_memory()?
        } else {
            dir.ensure()?;
            StateDb::open(&dir.db_path())?
        };
        let key_file = opts
            .key_file
            .clone()
            .or_else(|| std::env::var_os("TERN_KEY_FILE").filter(|v| !v.is_empty()).map(PathBuf::from))
            .unwrap_or_else(|| dir.key_path());
        let explicit_store = opts.store_url.as_deref().map(normalize_store_url).transpose()?;
        Ok(Engine {
            default_store: dir.default_store_url(),
            dir,
            key_file,
            explicit_store,
            db: Arc::new(db),
            local_offset: opts.local_offset.unwrap_or(time::UtcOffset::UTC),
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    /// The state database.
    pub fn db(&self) -> &StateDb {
        &self.db
    }

    /// The key file path in use.
    pub fn key_file(&self) -> &Path {
        &self.key_file
    }

    /// The store this command names: `--store`, else the data directory's default
    /// store. Commands about one VM use [`Engine::store_url_for`] instead.
    pub fn store_url(&self) -> &str {
        self.explicit_store.as_deref().unwrap_or(&self.default_store)
    }

    /// `--store`, if given (normalized).
    pub fn explicit_store(&self) -> Option<&str> {
        self.explicit_store.as_deref()
    }

    /// The store VM `vm` replicates to (the default store until one is fixed).
    pub fn vm_store_url<'a>(&'a self, vm: &'a VmDef) -> &'a str {
        vm.store_url.as_deref().unwrap_or(&self.default_store)
    }

    /// The store to read VM `name` from: `--store` when given (a copy of a store, or
    /// the store of another host's VM), else the store of the VM registered here under
    /// that name, else the default store.
    pub fn store_url_for(&self, name: &str) -> Result<String> {
        if let Some(u) = &self.explicit_store {
            return Ok(u.clone());
        }
        Ok(match self.db.vm_get(name)? {
            Some(vm) => self.vm_store_url(&vm).to_string(),
            None => self.default_store.clone(),
        })
    }

    /// The store a replication of `vm` writes to: its own. A `--store` that names
    /// another store than the one the VM replicates to is refused: moving a VM to a new
    /// store is its own command (`tern vm set-store`), never a side effect of a flag.
    pub fn replication_store_url(&self, vm: &VmDef) -> Result<String> {
        match (&self.explicit_store, &vm.store_url) {
            (Some(e), Some(own)) if e != own => Err(Error::invalid(format!(
                "VM {} replicates to {own}, not {e}: to move it there, run `tern vm set-store {} {e}` \
                 (its points in {own} stay there and can still be migrated)",
                vm.name, vm.name
            ))),
            (Some(u), _) | (None, Some(u)) => Ok(u.clone()),
            (None, None) => Ok(self.default_store.clone()),
        }
    }

    /// Load the key; a missing file is an error (reading never invents a key).
    pub fn load_key(&self) -> Result<Key> {
        if !self.key_file.exists() {
            return Err(Error::new(
                ErrorKind::Key,
                format!(
                    "no key file at {}: pass the store's key with --key-file (or TERN_KEY_FILE); \
                     `tern key export` on the replicating host prints it",
                    self.key_file.display()
                ),
            ));
        }
        Ok(Key::load(&self.key_file)?)
    }

    /// Load the key, creating it on first use. Returns whether it was created.
    pub fn load_or_create_key(&self) -> Result<(Key, bool)> {
        Ok(Key::load_or_create(&self.key_file)?)
    }

    /// Open the store at `url`. With `create`, the folder of a `file://` store is made
    /// if missing (replication); without it, a missing folder is a `NotFound` error and
    /// nothing is created.
    pub fn open_store_at(&self, url: &str, create: bool) -> Result<Store> {
        if let Some(path) = url.strip_prefix("file://") {
            if create {
                std::fs::create_dir_all(path)
                    .map_err(|e| Error::io(format!("creating store folder {path}"), e))?;
            } else if !Path::new(path).is_dir() {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("store {url} does not exist (no folder {path}): is the URL right?"),
                ));
            }
        }
        // Store errors name the store already.
        Store::open(url).map_err(Error::from)
    }

    /// A runtime for the store's async calls; workers use its handle from their threads.
    pub fn runtime(&self) -> Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the async runtime", e))
    }

    /// The key and config for writing to `store`. A store that has a config needs the
    /// key file to exist: a missing file is reported as missing, never replaced by a new
    /// key that cannot read the store. A new store is initialized with the key, which is
    /// created on first use.
    pub async fn key_for_writing(&self, store: &Store) -> Result<(Key, StoreConfig)> {
        let initialized = store.read_config().await.map_err(Error::from)?.is_some();
        let key = if initialized { self.load_key()? } else { self.load_or_create_key()?.0 };
        let cfg = self.check_store(store, &key, true).await?;
        Ok((key, cfg))
    }

    /// Check the store's config against `key`; with `create`, initialize a new store.
    pub async fn check_store(&self, store: &Store, key: &Key, create: bool) -> Result<StoreConfig> {
        let url = store.url();
        let cfg = match store
            .read_config()
            .await
            // Store errors name the store and the object already.
            .map_err(Error::from)?
        {
            Some(c) => c,
            None if create => {
                let new = StoreConfig {
                    format: "tern-store".into(),
                    version: 1,
                    key_id: key.id().to_string(),
                    chunk_size: tern_chunk::DEFAULT_CHUNK_SIZE,
                };
                store.init_config(&new).await.map_err(Error::from)?
            }
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                    "store {url} has no config.json: nothing was ever replicated there (is the URL right?)"
                ),
                ))
            }
        };
        if cfg.format != "tern-store" || cfg.version != 1 {
            return Err(Error::corrupt(format!(
                "store {url}: config.json says format {:?} version {}, expected \"tern-store\" version 1",
                cfg.format, cfg.version
            )));
        }
        if cfg.key_id != key.id().to_string() {
            return Err(Error::new(
                ErrorKind::Key,
                format!(
                    "wrong key: store {url} was written with key id {}, but key file {} has key id {}; \
                     pass the store's key with --key-file",
                    cfg.key_id,
                    self.key_file.display(),
                    key.id()
                ),
            ));
        }
        if !cfg.chunk_size.is_power_of_two()
            || !(tern_chunk::MIN_CHUNK_SIZE..=tern_chunk::MAX_CHUNK_SIZE).contains(&cfg.chunk_size)
        {
            return Err(Error::corrupt(format!(
                "store {url}: config.json chunk size {} is invalid",
                cfg.chunk_size
            )));
        }
        Ok(cfg)
    }

    /// The VM named `name`, registered on this host.
    pub fn vm(&self, name: &str) -> Result<VmDef> {
        self.db.vm_get(name)?.ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("no VM named {name:?} on this host (see `tern vm list`)"))
        })
    }

    /// The bandwidth schedule (unlimited when never set).
    pub fn schedule(&self) -> Result<Schedule> {
        match self.db.setting(THROTTLE_SETTING)? {
            None => Ok(Schedule::unlimited()),
            Some(json) => serde_json::from_str(&json)
                .map_err(|e| Error::corrupt(format!("state database: throttle setting is malformed: {e}"))),
        }
    }

    /// Store the bandwidth schedule; running replications pick it up within a second.
    pub fn set_schedule(&self, s: &Schedule) -> Result<()> {
        let json = serde_json::to_string(s).map_err(|e| Error::invalid(format!("encoding schedule: {e}")))?;
        self.db.set_setting(THROTTLE_SETTING, &json)
    }

    /// The host's throttle: real clock, schedule re-read from the database.
    pub fn throttle(&self) -> Throttle {
        let db = self.db.clone();
        Throttle::new(
            Arc::new(SystemClock::default()),
            self.local_offset,
            Box::new(move || {
                let json = db.setting(THROTTLE_SETTING).ok()??;
                serde_json::from_str(&json).ok()
            }),
        )
    }
}
