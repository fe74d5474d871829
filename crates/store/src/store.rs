//! [`Store`]: the layout's operations on an opened backend, with traffic counting and
//! error translation.
//!
//! Write rules (docs/formats/store-layout.md, "Writing"):
//! - chunks are written create-only; an existing chunk of the same address is the same
//!   plaintext, so "already exists" is success (concurrent uploads of one chunk are fine);
//! - a manifest is written create-only and never replaced;
//! - a base index may be rewritten (a resumed replication seals it again) only until its
//!   point's manifest exists: after that the point is sealed.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use tern_chunk::ChunkAddress;

use crate::backend::{self, Env, Parts};
use crate::config::StoreConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::layout::{self, PointId, VmId};
use crate::paced::{self, Pacer, Staged};
use crate::stats::{Counters, StoreStats};

mod gc;
pub use gc::{Listed, ListedKind};

/// An open store. Cheap to clone; clones share the connection pool and the counters.
#[derive(Debug, Clone)]
pub struct Store {
    url: Arc<str>,
    inner: Arc<dyn ObjectStore>,
    parts: Parts,
    counters: Arc<Counters>,
}

/// How a put's bytes are counted: with the object when it is stored, or part by part
/// as a paced body sends them (`paced::body`), only the object then.
#[derive(Debug, Clone, Copy)]
enum Count {
    Whole,
    Parts,
}

/// What an object is, for messages: `chunk <hex>`, `manifest vms/…/manifest`.
enum Object<'a> {
    Config,
    Chunk(&'a ChunkAddress),
    Index(&'a Path),
    Segment(&'a Path),
    Manifest(&'a Path),
    Listing(&'a Path),
    Other(&'a Path),
}

impl fmt::Display for Object<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Config => f.write_str(layout::CONFIG),
            Object::Chunk(address) => write!(f, "chunk {address}"),
            Object::Index(path) => write!(f, "base index {path}"),
            Object::Segment(path) => write!(f, "segment {path}"),
            Object::Manifest(path) => write!(f, "manifest {path}"),
            Object::Listing(path) => write!(f, "listing {path}/"),
            Object::Other(path) => write!(f, "object {path}"),
        }
    }
}

impl Store {
    /// Open the store at `url`: `file:///abs/path`, `az://container/prefix`,
    /// `s3://bucket/prefix`. Credentials and endpoints come from the environment.
    pub fn open(url: &str) -> Result<Store> {
        Store::open_env(url, &Env::from_process())
    }

    /// Like [`Store::open`], but credentials and endpoints come from `vars` (name, value)
    /// instead of the process environment, which is not read at all. For tests and for
    /// callers that keep several stores with different credentials.
    pub fn open_with_env(url: &str, vars: impl IntoIterator<Item = (String, String)>) -> Result<Store> {
        Store::open_env(url, &Env::from_pairs(vars))
    }

    fn open_env(url: &str, env: &Env) -> Result<Store> {
        let target = backend::parse(url)?;
        let (inner, parts) = backend::open(url, &target, env)?;
        Ok(Store { url: url.into(), inner, parts, counters: Arc::default() })
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Bytes and objects moved so far, by this store and its clones.
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// Read `config.json`, `None` if the store is new.
    pub async fn read_config(&self) -> Result<Option<StoreConfig>> {
        let bytes = match self.get(&layout::config_path(), &Object::Config).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let config: StoreConfig = serde_json::from_slice(&bytes).map_err(|e| {
            self.error(ErrorKind::InvalidInput, &Object::Config, format_args!("not a tern store config: {e}"))
        })?;
        if let Some(problem) = config.problem() {
            return Err(self.error(ErrorKind::InvalidInput, &Object::Config, problem));
        }
        Ok(Some(config))
    }

    /// Write `config.json` if absent; return the config that is in the store afterwards.
    pub async fn init_config(&self, config: &StoreConfig) -> Result<StoreConfig> {
        if let Some(problem) = config.problem() {
            return Err(self.error(ErrorKind::InvalidInput, &Object::Config, problem));
        }
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| self.error(ErrorKind::Other, &Object::Config, format_args!("encoding: {e}")))?;
        match self.put_once(&layout::config_path(), Bytes::from(json), &Object::Config).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.read_config().await?.ok_or_else(|| {
            self.error(
                ErrorKind::Other,
                &Object::Config,
                "written, then not found: the backend is not consistent",
            )
        })
    }

    /// Whether a chunk exists.
    pub async fn chunk_exists(&self, address: &ChunkAddress) -> Result<bool> {
        self.exists(&layout::chunk_path(address), &Object::Chunk(address)).await
    }

    /// Store a chunk envelope. Storing a chunk that exists already is success: the
    /// address is the keyed digest of the plaintext, so it is the same chunk.
    pub async fn put_chunk(&self, address: &ChunkAddress, envelope: Bytes) -> Result<()> {
        let path = layout::chunk_path(address);
        let object = Object::Chunk(address);
        match self.put(&path, envelope, PutMode::Create, &object).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Store a chunk envelope like [`Store::put_chunk`], with its bytes paced: `pacer`
    /// admits each part just before it is sent, and [`StoreStats::bytes_put`] grows by
    /// each part as it goes. On Azure and S3 this is one create-only put whose request
    /// body goes out part by part; in a local folder, parts are written to a staging
    /// file (and when the first grant covers the whole envelope, this is exactly
    /// `put_chunk`). Why a partial chunk is never visible: see [`Pacer`]'s module
    /// (`paced.rs`).
    ///
    /// The pacer may block, and is called on the thread that polls this future, so call
    /// this from a thread that may block (an upload thread driving the runtime with
    /// `block_on`), not from a task on a runtime worker.
    pub async fn put_chunk_paced(
        &self,
        address: &ChunkAddress,
        envelope: Bytes,
        pacer: &dyn Pacer,
    ) -> Result<()> {
        let path = layout::chunk_path(address);
        match self.put_paced(&path, envelope, PutMode::Create, &Object::Chunk(address), pacer).await {
            // Stored by another writer meanwhile: the same chunk.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            other => other,
        }
    }

    async fn put_paced(
        &self,
        path: &Path,
        envelope: Bytes,
        mode: PutMode,
        object: &Object<'_>,
        pacer: &dyn Pacer,
    ) -> Result<()> {
        match &self.parts {
            Parts::Staged(local) => {
                let first = paced::next_part(pacer, envelope.len());
                self.put_local(local, path, envelope, mode, object, first, pacer).await
            }
            Parts::Body => {
                let put = self.put_counted(path, envelope, mode, object, Count::Parts);
                paced::body::paced(pacer, self.counters.clone(), put).await
            }
        }
    }

    /// Store piece `piece` of disk `disk`'s segment in point `point` of VM `vm`
    /// (docs/formats/segment.md), paced like [`Store::put_chunk_paced`]. A piece of a
    /// point that is not committed yet may be written again (a retried cycle); once the
    /// point's manifest exists this is refused with [`ErrorKind::AlreadyExists`].
    pub async fn put_segment_paced(
        &self,
        vm: &str,
        point: &str,
        disk: u32,
        piece: u32,
        envelope: Bytes,
        pacer: &dyn Pacer,
    ) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::segment_path(&vm, &point, disk, piece);
        let object = Object::Segment(&path);
        let manifest = layout::manifest_path(&vm, &point);
        if self.exists(&manifest, &Object::Manifest(&manifest)).await? {
            return Err(self.error(
                ErrorKind::AlreadyExists,
                &object,
                "the point's manifest exists: a committed point is never changed",
            ));
        }
        self.put_paced(&path, envelope, PutMode::Overwrite, &object, pacer).await
    }

    /// Fetch a segment piece envelope.
    pub async fn get_segment(&self, vm: &str, point: &str, disk: u32, piece: u32) -> Result<Bytes> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::segment_path(&vm, &point, disk, piece);
        self.get(&path, &Object::Segment(&path)).await
    }

    /// Whether a segment piece exists.
    pub async fn segment_exists(&self, vm: &str, point: &str, disk: u32, piece: u32) -> Result<bool> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::segment_path(&vm, &point, disk, piece);
        self.exists(&path, &Object::Segment(&path)).await
    }

    /// Fetch a chunk envelope.
    pub async fn get_chunk(&self, address: &ChunkAddress) -> Result<Bytes> {
        self.get(&layout::chunk_path(address), &Object::Chunk(address)).await
    }

    /// Remove a chunk (garbage collection, tests). Removing a missing chunk is success.
    pub async fn delete_chunk(&self, address: &ChunkAddress) -> Result<()> {
        self.delete(&layout::chunk_path(address), &Object::Chunk(address)).await
    }

    /// Store the base index envelope of disk `disk` of point `point` of VM `vm`.
    /// Refused with [`ErrorKind::AlreadyExists`] once the point's manifest exists.
    pub async fn put_index(&self, vm: &str, point: &str, disk: u32, envelope: Bytes) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::index_path(&vm, &point, disk);
        let object = Object::Index(&path);
        let manifest = layout::manifest_path(&vm, &point);
        if self.exists(&manifest, &Object::Manifest(&manifest)).await? {
            return Err(self.error(
                ErrorKind::AlreadyExists,
                &object,
                "the point's manifest exists: a committed point is never changed",
            ));
        }
        self.put(&path, envelope, PutMode::Overwrite, &object).await
    }

    /// Add a base index to disk `disk` of point `point` of VM `vm`, committed or not:
    /// a compaction beside the cycles (docs/formats/segment.md) folds a committed
    /// point's chain into an index that the point's own manifest does not reference
    /// (it keeps its chain), for later points to build on. Create-only: an index that
    /// exists is never replaced ([`ErrorKind::AlreadyExists`]), so a committed point
    /// never changes.
    pub async fn add_index(&self, vm: &str, point: &str, disk: u32, envelope: Bytes) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::index_path(&vm, &point, disk);
        self.put(&path, envelope, PutMode::Create, &Object::Index(&path)).await
    }

    /// Fetch a base index envelope.
    pub async fn get_index(&self, vm: &str, point: &str, disk: u32) -> Result<Bytes> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::index_path(&vm, &point, disk);
        self.get(&path, &Object::Index(&path)).await
    }

    /// Whether a base index exists.
    pub async fn index_exists(&self, vm: &str, point: &str, disk: u32) -> Result<bool> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::index_path(&vm, &point, disk);
        self.exists(&path, &Object::Index(&path)).await
    }

    /// Store a manifest envelope: the commit point of a recovery point. Refuses to
    /// replace an existing manifest ([`ErrorKind::AlreadyExists`]).
    pub async fn put_manifest(&self, vm: &str, point: &str, envelope: Bytes) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::manifest_path(&vm, &point);
        self.put_once(&path, envelope, &Object::Manifest(&path)).await
    }

    /// Fetch a manifest envelope.
    pub async fn get_manifest(&self, vm: &str, point: &str) -> Result<Bytes> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::manifest_path(&vm, &point);
        self.get(&path, &Object::Manifest(&path)).await
    }

    /// Whether a point's manifest exists, that is whether the point exists.
    pub async fn manifest_exists(&self, vm: &str, point: &str) -> Result<bool> {
        let (vm, point) = self.ids(vm, point)?;
        let path = layout::manifest_path(&vm, &point);
        self.exists(&path, &Object::Manifest(&path)).await
    }

    /// Remove a point and everything under it (retention, tests). The manifest goes
    /// first, so that the point stops existing before any object it references goes; an
    /// interrupted delete leaves only unreferenced indexes, which a retry removes.
    pub async fn delete_point(&self, vm: &str, point: &str) -> Result<()> {
        let (vm, point) = self.ids(vm, point)?;
        let manifest = layout::manifest_path(&vm, &point);
        self.delete(&manifest, &Object::Manifest(&manifest)).await?;
        let prefix = layout::point_prefix(&vm, &point);
        let rest: Vec<Path> = self.list(&prefix).await?.into_iter().map(|meta| meta.location).collect();
        for path in rest {
            self.delete(&path, &Object::Other(&path)).await?;
        }
        Ok(())
    }

    /// VM ids that have at least one object, sorted.
    pub async fn list_vms(&self) -> Result<Vec<String>> {
        let prefix = layout::vms_prefix();
        let listing = match self.inner.list_with_delimiter(Some(&prefix)).await {
            Ok(listing) => listing,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.backend_error(e, &Object::Listing(&prefix), "list")),
        };
        let mut vms: Vec<String> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|id| layout::check_id(id).is_ok())
            .collect();
        vms.sort();
        vms.dedup();
        Ok(vms)
    }

    /// Point ids of `vm` that have a manifest, sorted (byte order: choose point ids
    /// that sort by time, such as `20261101T120000Z`).
    pub async fn list_points(&self, vm: &str) -> Result<Vec<String>> {
        let vm = VmId::new(vm).map_err(|e| self.invalid(e))?;
        let mut points: Vec<String> = self
            .list(&layout::points_prefix(&vm))
            .await?
            .iter()
            .filter_map(|meta| layout::parse_manifest_path(&vm, &meta.location))
            .collect();
        points.sort();
        points.dedup();
        Ok(points)
    }

    /// Every chunk with its stored size, sorted by address. Holds the whole list in
    /// memory; [`Store::list_chunk_shard`] bounds that to one 256th.
    pub async fn list_chunks(&self) -> Result<Vec<(ChunkAddress, u64)>> {
        self.list_chunks_under(layout::chunks_prefix()).await
    }

    /// The chunks whose address starts with the byte `shard`, with their stored sizes,
    /// sorted by address.
    pub async fn list_chunk_shard(&self, shard: u8) -> Result<Vec<(ChunkAddress, u64)>> {
        let prefix = layout::chunks_prefix().child(format!("{shard:02x}"));
        self.list_chunks_under(prefix).await
    }

    async fn list_chunks_under(&self, prefix: Path) -> Result<Vec<(ChunkAddress, u64)>> {
        let mut chunks: Vec<(ChunkAddress, u64)> = self
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|meta| Some((layout::parse_chunk_path(&meta.location)?, meta.size)))
            .collect();
        chunks.sort();
        Ok(chunks)
    }

    // ---- primitives: one backend call each, counted and with errors translated ----

    async fn put(&self, path: &Path, bytes: Bytes, mode: PutMode, object: &Object<'_>) -> Result<()> {
        self.put_counted(path, bytes, mode, object, Count::Whole).await
    }

    async fn put_counted(
        &self,
        path: &Path,
        bytes: Bytes,
        mode: PutMode,
        object: &Object<'_>,
        count: Count,
    ) -> Result<()> {
        let len = bytes.len();
        if let Parts::Staged(local) = &self.parts {
            // One part: the pacer (which would admit everything) is never asked.
            return self.put_local(local, path, bytes, mode, object, len, &|r: u64| r).await;
        }
        let opts = PutOptions::from(mode);
        match self.inner.put_opts(path, PutPayload::from(bytes.clone()), opts).await {
            Ok(_) => {
                self.count_put(len, count);
                Ok(())
            }
            Err(object_store::Error::NotImplemented) | Err(object_store::Error::NotSupported { .. }) => {
                // The backend cannot create-only (an S3 configured without conditional
                // puts): fall back to a check then a plain put. Only racing writers of
                // the same name can still both succeed; see put_once.
                if self.exists(path, object).await? {
                    return Err(self.error(
                        ErrorKind::AlreadyExists,
                        object,
                        "already exists; objects are never replaced",
                    ));
                }
                self.inner
                    .put(path, PutPayload::from(bytes))
                    .await
                    .map_err(|e| self.backend_error(e, object, "put"))?;
                self.count_put(len, count);
                Ok(())
            }
            Err(e) => {
                let error = self.backend_error(e, object, "put");
                if error.kind() == ErrorKind::AlreadyExists {
                    // The bytes travelled even though the store kept the older copy.
                    self.count_put(len, count);
                }
                Err(error)
            }
        }
    }

    fn count_put(&self, len: usize, count: Count) {
        match count {
            Count::Whole => self.counters.record_put(len),
            Count::Parts => self.counters.record_put_object(),
        }
    }

    /// A put into a local folder, durable when it returns: the bytes go to a hidden
    /// staging file, `first` bytes and then each part `pacer` admits (everything at once
    /// for an unpaced put), which is synced, then linked (create-only) or renamed
    /// (overwrite) under the object's name, and the folder synced (see `paced.rs`).
    /// object_store's own local put syncs nothing, so after a power loss an object it
    /// reported written could be missing or empty while the state database records it
    /// as stored. File work runs on the blocking pool; `Staged` removes the staging file
    /// if anything fails or this future is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn put_local(
        &self,
        local: &LocalFileSystem,
        path: &Path,
        bytes: Bytes,
        mode: PutMode,
        object: &Object<'_>,
        first: usize,
        pacer: &dyn Pacer,
    ) -> Result<()> {
        let dest = local.path_to_filesystem(path).map_err(|e| self.backend_error(e, object, "put"))?;
        let shown = dest.display().to_string();
        let io_error =
            |e: std::io::Error, what: &str| Error::from_io(&e, &self.url, &format_args!("{object}: {what}"));
        let mut staged = blocking(move || Staged::create(dest))
            .await
            .map_err(|e| self.error(ErrorKind::Other, object, e))?
            .map_err(|e| io_error(e, &format!("creating a staging file for {shown}")))?;
        let (len, mut offset, mut part) = (bytes.len(), 0, first.min(bytes.len()));
        // Bounded: every part is at least one byte.
        while part > 0 {
            let piece = bytes.slice(offset..offset + part);
            let (back, written) = blocking(move || {
                let written = staged.append(&piece);
                (staged, written)
            })
            .await
            .map_err(|e| self.error(ErrorKind::Other, object, e))?;
            staged = back;
            written.map_err(|e| io_error(e, &format!("writing {}", staged.path().display())))?;
            self.counters.record_put_bytes(part);
            offset += part;
            part = paced::next_part(pacer, len - offset);
        }
        let replace = matches!(mode, PutMode::Overwrite);
        let created =
            blocking(move || if replace { staged.replace().map(|()| true) } else { staged.commit() })
                .await
                .map_err(|e| self.error(ErrorKind::Other, object, e))?
                .map_err(|e| io_error(e, &format!("making the staged object {shown}")))?;
        // Counted even when the store kept an older copy: the bytes were written.
        self.counters.record_put_object();
        if created {
            Ok(())
        } else {
            Err(self.error(ErrorKind::AlreadyExists, object, "already exists; objects are never replaced"))
        }
    }

    /// Write an object that must never be replaced: a check first (some S3-compatible
    /// servers ignore `If-None-Match` and would silently overwrite), then a create-only
    /// put, which closes the race on every backend that honours it.
    async fn put_once(&self, path: &Path, bytes: Bytes, object: &Object<'_>) -> Result<()> {
        if self.exists(path, object).await? {
            return Err(self.error(
                ErrorKind::AlreadyExists,
                object,
                "already exists; objects are never replaced",
            ));
        }
        self.put(path, bytes, PutMode::Create, object).await
    }

    async fn get(&self, path: &Path, object: &Object<'_>) -> Result<Bytes> {
        let result = self.inner.get(path).await.map_err(|e| self.backend_error(e, object, "get"))?;
        let bytes = result.bytes().await.map_err(|e| self.backend_error(e, object, "get"))?;
        self.counters.record_get(bytes.len());
        Ok(bytes)
    }

    async fn exists(&self, path: &Path, object: &Object<'_>) -> Result<bool> {
        match self.inner.head(path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.backend_error(e, object, "head")),
        }
    }

    async fn delete(&self, path: &Path, object: &Object<'_>) -> Result<()> {
        match self.inner.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend_error(e, object, "delete")),
        }
    }

    async fn list(&self, prefix: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        match self.inner.list(Some(prefix)).try_collect().await {
            Ok(metas) => Ok(metas),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.backend_error(e, &Object::Listing(prefix), "list")),
        }
    }

    fn ids<'a>(&self, vm: &'a str, point: &'a str) -> Result<(VmId<'a>, PointId<'a>)> {
        let vm = VmId::new(vm).map_err(|e| self.invalid(e))?;
        let point = PointId::new(point).map_err(|e| self.invalid(e))?;
        Ok((vm, point))
    }

    fn invalid(&self, problem: String) -> Error {
        Error::new(ErrorKind::InvalidInput, format!("store {}: {problem}", self.url))
    }

    fn error(&self, kind: ErrorKind, object: &Object<'_>, problem: impl fmt::Display) -> Error {
        Error::at(kind, &self.url, object, problem)
    }

    fn backend_error(&self, err: object_store::Error, object: &Object<'_>, op: &str) -> Error {
        Error::from_backend(err, &self.url, object, op)
    }
}

/// Run file work on the blocking pool; a failed task (a panic) becomes its message.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work).await.map_err(|e| format!("file task failed: {e}"))
}
