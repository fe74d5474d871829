//! `tern disk serve`: images of any format over NBD, as qemu-nbd serves them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tern_disk::{DiskExport, Format, OpenOptions};
use tern_nbd::{Export, FileExport, Listen, Server, ServerOptions};

use crate::disk_cmd::OpenArgs;

/// Serve disk images over NBD until interrupted (SIGINT or SIGTERM).
///
/// Each IMAGE becomes one export named after its file name (`disk.qcow2`), in the
/// order given; the first one is also the default export (empty name). `nbdinfo --list`
/// lists them. Raw images (files or block devices) are served read-write unless
/// --read-only; qcow2, VHD and VHDX images are always served read-only (tern has no
/// writable layer for existing images of those formats).
///
/// By default the server listens on a Unix socket in a new private folder (0700, socket
/// 0600) and prints its URI; --socket puts the socket elsewhere (also 0600), --bind
/// listens on TCP, which is refused beyond loopback addresses unless TLS is set up with
/// --tls-cert and --tls-key (clients must then use NBD_OPT_STARTTLS, as qemu does with
/// tls-creds). The URIs are printed once the server is ready; with --json, one JSON
/// object instead. On SIGINT or SIGTERM, requests in flight are answered, clients are
/// disconnected and the socket is removed.
///
/// Example, booting a VM from a qcow2 without changing it:
///   tern disk serve --socket /run/tern/web.sock web.qcow2
///   qemu-system-x86_64 -blockdev driver=nbd,node-name=d0,server.type=unix,server.path=/run/tern/web.sock,export=web.qcow2,reconnect-delay=5 ...
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct ServeArgs {
    /// The images to serve (raw, qcow2, VHD, VHDX), each as one export.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Serve raw images read-only as well.
    #[arg(long)]
    read_only: bool,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    open: OpenArgs,
}

/// Where and how an NBD server listens (`tern disk serve`, `tern points serve`).
#[derive(Args)]
pub struct ListenArgs {
    /// Listen on this Unix socket (created 0600; a missing folder is created 0700).
    #[arg(long, value_name = "PATH", conflicts_with = "bind")]
    socket: Option<PathBuf>,
    /// Listen on TCP at ADDR:PORT (NBD's port is 10809). Loopback only, unless TLS.
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// TLS certificate chain (PEM) of the server; with --tls-key, clients must use TLS.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the server.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// With TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Requests served at once per client (1 to 64).
    #[arg(long, default_value_t = 16, value_name = "N")]
    threads: usize,
    /// Report clients connecting and leaving (and why) on standard error.
    #[arg(short, long)]
    verbose: bool,
    /// Print the exports as one JSON object once ready (docs/json.md).
    #[arg(long)]
    json: bool,
}

/// What `--json` prints once the server listens.
#[derive(Serialize)]
struct ServeReport {
    /// The Unix socket, if serving on one.
    socket: Option<PathBuf>,
    /// The TCP address, if serving on one.
    address: Option<String>,
    tls: bool,
    exports: Vec<ExportReport>,
}

#[derive(Serialize)]
pub(crate) struct ExportReport {
    name: String,
    uri: String,
    /// The image file, or for a recovery point `VM point ID disk N`.
    image: String,
    format: String,
    size: u64,
    read_only: bool,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    let mut exports: Vec<(String, Arc<dyn Export>)> = Vec::new();
    let mut reports = Vec::new();
    for image in &a.images {
        let name = export_name(image)?;
        if exports.iter().any(|(n, _)| *n == name) {
            bail!("two images are named {name:?}: each export is named after its file name, so serve them from separate commands");
        }
        let (export, format) = open_export(image, &a.open.options(), a.read_only)?;
        reports.push(ExportReport {
            name: name.clone(),
            uri: String::new(),
            image: image.display().to_string(),
            format: format.to_string(),
            size: export.size(),
            read_only: export.capabilities().read_only,
        });
        exports.push((name, export));
    }
    serve(&a.listen, exports, reports)
}

/// Serve `exports` (described by `reports`, in the same order) as `l` says, until
/// SIGINT or SIGTERM.
pub(crate) fn serve(
    l: &ListenArgs,
    exports: Vec<(String, Arc<dyn Export>)>,
    mut reports: Vec<ExportReport>,
) -> Result<ExitCode> {
    if !(1..=64).contains(&l.threads) {
        bail!("--threads {} is out of range: give 1 to 64", l.threads);
    }
    let tls = match (&l.tls_cert, &l.tls_key) {
        (Some(c), Some(k)) => Some(tern_nbd::tls_server_config(c, k, l.tls_ca.as_deref())?),
        _ => None,
    };
    // Without --socket or --bind: a private folder of our own, removed at the end.
    let mut private: Option<tempfile::TempDir> = None;
    let listen = match (&l.socket, l.bind) {
        (Some(p), _) => Listen::Unix(p.clone()),
        (None, Some(addr)) => Listen::Tcp(addr),
        (None, None) => {
            let base =
                std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::Builder::new()
                .prefix("tern-nbd-")
                .tempdir_in(&base)
                .with_context(|| format!("creating a private socket folder in {}", base.display()))?;
            let path = dir.path().join("nbd.sock");
            private = Some(dir);
            Listen::Unix(path)
        }
    };
    let mut options = ServerOptions::new(exports);
    options.threads_per_connection = l.threads;
    options.tls = tls;
    if l.verbose {
        options.log = Some(Arc::new(|m: &str| eprintln!("tern: {m}")));
    }
    let mut server = Server::bind(&listen, options).with_context(|| format!("serving on {listen}"))?;
    server.stop_on(tern_engine::agent::stop_on_signals());
    let scheme = if l.tls_cert.is_some() { "nbds" } else { "nbd" };
    let (socket, address) = match server.local() {
        Listen::Unix(p) => (Some(p), None),
        Listen::Tcp(addr) => (None, Some(addr.to_string())),
    };
    for r in &mut reports {
        r.uri = match (&socket, &address) {
            (Some(p), _) => format!("{scheme}+unix:///{}?socket={}", uri_path(&r.name), p.display()),
            (None, Some(addr)) => format!("{scheme}://{addr}/{}", uri_path(&r.name)),
            _ => unreachable!("a server listens somewhere"),
        };
    }
    let report = ServeReport { socket, address, tls: l.tls_cert.is_some(), exports: reports };
    if l.json {
        crate::print_json(&report)?;
    } else {
        for e in &report.exports {
            let mode = if e.read_only { "read-only" } else { "read-write" };
            outln!("{}  ({}, {} bytes, {mode})", e.uri, e.format, e.size);
        }
    }
    {
        use std::io::Write as _;
        std::io::stdout().flush()?;
    }
    server.serve().context("serving NBD")?;
    drop(private);
    Ok(ExitCode::SUCCESS)
}

/// The export name of an image: its file name.
fn export_name(image: &Path) -> Result<String> {
    let Some(name) = image.file_name().and_then(|n| n.to_str()) else {
        bail!("{} has no file name usable as an export name (UTF-8)", image.display());
    };
    Ok(name.to_string())
}

/// An export name as it goes into the path of an NBD URI.
fn uri_path(name: &str) -> String {
    let mut out = String::new();
    for b in name.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn open_export(image: &Path, options: &OpenOptions, read_only: bool) -> Result<(Arc<dyn Export>, Format)> {
    let disk = tern_disk::open_disk(image, options)?;
    let format = disk.info()?.format;
    if format == Format::Raw {
        drop(disk);
        let e = FileExport::open(image, read_only).with_context(|| {
            format!(
                "opening {} {}",
                image.display(),
                if read_only {
                    "for reading"
                } else {
                    "for reading and writing (or serve it with --read-only)"
                }
            )
        })?;
        return Ok((Arc::new(e), format));
    }
    Ok((Arc::new(DiskExport::new(disk, format)), format))
}

/// Serve a recovery point over NBD, straight from the store, until interrupted.
///
/// Each disk of the point becomes one export, `NAME-diskN` (the first is also the
/// default export); every read is fetched from the store and verified, as migrate
/// reads it, so a test VM boots from any point in seconds without materializing its
/// disks. Read-only by default; with --writable, writes go to a temporary overlay
/// (a file beside nothing, deleted when the server stops): the store is never
/// written. Listening, TLS and --json are as for `tern disk serve`.
///
/// Example, a test boot of the newest point of VM web:
///   tern points serve web --writable --socket /run/tern/web-test.sock
///   qemu-system-x86_64 -blockdev driver=nbd,node-name=d0,server.type=unix,server.path=/run/tern/web-test.sock,export=web-disk0,reconnect-delay=5 ...
#[derive(Args)]
#[command(verbatim_doc_comment)]
pub struct PointsServeArgs {
    /// The VM: its name (found through the store's manifests if this host does not
    /// know it) or its id.
    name: String,
    /// The point to serve (an id from `tern points NAME`) [default: the newest].
    #[arg(long, value_name = "ID")]
    point: Option<String>,
    /// Accept writes into a temporary overlay, discarded when the server stops.
    #[arg(long)]
    writable: bool,
    #[command(flatten)]
    listen: ListenArgs,
    #[command(flatten)]
    globals: crate::StoreOptions,
}

pub fn points_serve(g: &crate::GlobalArgs, a: PointsServeArgs) -> Result<ExitCode> {
    let engine = g.with_store(&a.globals).engine_read_only()?;
    let selector = match &a.point {
        Some(id) => tern_engine::PointSelector::Id(id.clone()),
        None => tern_engine::PointSelector::Latest,
    };
    let point = tern_engine::open_point(&engine, &a.name, &selector)?;
    let (vm, id) = (point.vm_name.clone(), point.point_id.clone());
    let (disks, _runtime) = point.into_disks();
    let mut exports: Vec<(String, Arc<dyn Export>)> = Vec::new();
    let mut reports = Vec::new();
    for (i, d) in disks.into_iter().enumerate() {
        let base: Arc<dyn Export> = Arc::new(DiskExport::new(Box::new(d), Format::Raw));
        let export: Arc<dyn Export> = if a.writable { Arc::new(Overlay::new(base)?) } else { base };
        let name = format!("{vm}-disk{i}");
        reports.push(ExportReport {
            name: name.clone(),
            uri: String::new(),
            image: format!("VM {vm} point {id} disk {i}"),
            format: "raw".into(),
            size: export.size(),
            read_only: export.capabilities().read_only,
        });
        exports.push((name, export));
    }
    eprintln!(
        "tern: serving point {id} of VM {vm}{}",
        if a.writable {
            " with a temporary overlay for writes (discarded at the end)"
        } else {
            ", read-only"
        }
    );
    serve(&a.listen, exports, reports)
}

/// Bytes per block of an [`Overlay`].
const OVERLAY_BLOCK: u64 = 4096;

/// A writable layer over a read-only export: written blocks live in an unlinked
/// temporary file, gone when the server stops; the export below is never written.
struct Overlay {
    base: Arc<dyn Export>,
    /// The file, and one bit per block: written here.
    state: std::sync::Mutex<(std::fs::File, Vec<u64>)>,
}

impl Overlay {
    fn new(base: Arc<dyn Export>) -> Result<Overlay> {
        let file = tempfile::tempfile().context("creating the overlay's temporary file")?;
        let blocks = base.size().div_ceil(OVERLAY_BLOCK);
        let bits = vec![0u64; blocks.div_ceil(64) as usize];
        Ok(Overlay { base, state: std::sync::Mutex::new((file, bits)) })
    }
}

fn io_error(e: std::io::Error) -> tern_nbd::ExportError {
    tern_nbd::ExportError::new(tern_nbd::ExportErrorKind::Io, format!("overlay: {e}"))
}

impl Export for Overlay {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn capabilities(&self) -> tern_nbd::Capabilities {
        tern_nbd::Capabilities { read_only: false, trim: false, fast_zero: false, multi_conn: true }
    }

    fn description(&self) -> Option<String> {
        Some("recovery point with a temporary overlay".into())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> tern_nbd::ExportResult<()> {
        use std::os::unix::fs::FileExt;
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (file, bits) = &*st;
        let mut at = 0usize;
        while at < buf.len() {
            let off = offset + at as u64;
            let block = off / OVERLAY_BLOCK;
            let n = ((block + 1) * OVERLAY_BLOCK - off).min((buf.len() - at) as u64) as usize;
            let part = &mut buf[at..at + n];
            if bits[(block / 64) as usize] & (1 << (block % 64)) != 0 {
                file.read_exact_at(part, off).map_err(io_error)?;
            } else {
                self.base.read_at(part, off)?;
            }
            at += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> tern_nbd::ExportResult<()> {
        use std::os::unix::fs::FileExt;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (file, bits) = &mut *st;
        let mut at = 0usize;
        let mut whole = vec![0u8; OVERLAY_BLOCK as usize];
        while at < buf.len() {
            let off = offset + at as u64;
            let block = off / OVERLAY_BLOCK;
            let start = block * OVERLAY_BLOCK;
            let end = ((block + 1) * OVERLAY_BLOCK).min(self.size());
            let n = (end - off).min((buf.len() - at) as u64) as usize;
            let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
            if bits[word] & bit == 0 && (off != start || off + n as u64 != end) {
                // A first, partial write of a block: the rest of it from below.
                let w = &mut whole[..(end - start) as usize];
                self.base.read_at(w, start)?;
                w[(off - start) as usize..(off - start) as usize + n].copy_from_slice(&buf[at..at + n]);
                file.write_all_at(w, start).map_err(io_error)?;
            } else {
                file.write_all_at(&buf[at..at + n], off).map_err(io_error)?;
            }
            bits[word] |= bit;
            at += n;
        }
        Ok(())
    }

    fn flush(&self) -> tern_nbd::ExportResult<()> {
        // Discarded at the end: nothing needs to be durable.
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        options: tern_nbd::ZeroOptions,
    ) -> tern_nbd::ExportResult<()> {
        tern_nbd::export::write_zeroes_by_writes(self, offset, length, options.fua)
    }
}
