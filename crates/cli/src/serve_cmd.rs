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
    /// Listen on this Unix socket (created 0600; a missing folder is created 0700).
    #[arg(long, value_name = "PATH", conflicts_with = "bind")]
    socket: Option<PathBuf>,
    /// Listen on TCP at ADDR:PORT (NBD's port is 10809). Loopback only, unless TLS.
    #[arg(long, value_name = "ADDR")]
    bind: Option<SocketAddr>,
    /// Serve raw images read-only as well.
    #[arg(long)]
    read_only: bool,
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
    #[command(flatten)]
    open: OpenArgs,
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
struct ExportReport {
    name: String,
    uri: String,
    image: PathBuf,
    format: Format,
    size: u64,
    read_only: bool,
}

pub fn run(a: ServeArgs) -> Result<ExitCode> {
    if !(1..=64).contains(&a.threads) {
        bail!("--threads {} is out of range: give 1 to 64", a.threads);
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Some(tern_nbd::tls_server_config(c, k, a.tls_ca.as_deref())?),
        _ => None,
    };
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
            image: image.clone(),
            format,
            size: export.size(),
            read_only: export.capabilities().read_only,
        });
        exports.push((name, export));
    }

    // Without --socket or --bind: a private folder of our own, removed at the end.
    let mut private: Option<tempfile::TempDir> = None;
    let listen = match (&a.socket, a.bind) {
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
    options.threads_per_connection = a.threads;
    options.tls = tls;
    if a.verbose {
        options.log = Some(Arc::new(|m: &str| eprintln!("tern: {m}")));
    }
    let mut server = Server::bind(&listen, options).with_context(|| format!("serving on {listen}"))?;
    server.stop_on(tern_engine::agent::stop_on_signals());
    let scheme = if a.tls_cert.is_some() { "nbds" } else { "nbd" };
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
    let report = ServeReport { socket, address, tls: a.tls_cert.is_some(), exports: reports };
    if a.json {
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
