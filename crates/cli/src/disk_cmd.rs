//! `tern disk ...`: image inspection and conversion.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use tern_disk::{CompareOutcome, CreateFormat, Disk, Format, MapKind, OpenOptions};
use tern_types::{ByteSize, MIB};

use crate::progress::bytes_bar;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Show format, subformat, virtual size, allocation and backing file of an image.
    Info {
        /// The image file.
        image: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List runs of data, zero and unallocated guest bytes (like `qemu-img map`).
    Map {
        /// The image file.
        image: PathBuf,
        #[command(flatten)]
        open: OpenArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy an image's guest content into a new image of any format. Zero and
    /// unallocated ranges are neither read nor written.
    Convert {
        /// Source image.
        src: PathBuf,
        /// Destination path (must not exist unless --overwrite).
        dst: PathBuf,
        /// Output format. `azure` is a fixed VHD sized up to a whole MiB. Without it, the
        /// format is taken from --azure, else from DST's name: .qcow2, .vhd (dynamic, as
        /// qemu-img's vpc), .vhdx, .raw or .img.
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<OutFormat>,
        /// Produce what Azure accepts as an uploaded disk (same as -O azure).
        #[arg(long)]
        azure: bool,
        /// qcow2 cluster size (512 B ..= 2 MiB, power of two).
        #[arg(long, default_value = "64K", value_name = "SIZE")]
        cluster_size: ByteSize,
        /// VHDX block size (1 MiB ..= 256 MiB, power of two).
        #[arg(long, default_value = "32M", value_name = "SIZE")]
        block_size: ByteSize,
        /// Replace the destination if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Do not show a progress bar even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// Do not fsync the output before exiting (qemu-img convert's default, cache
        /// mode unsafe): faster, but a crash soon after may lose or damage the image.
        #[arg(long)]
        no_sync: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Compare the guest content of two images of any formats. Exit status 0 when
    /// identical, 1 when different (the first differing offset is printed), 2 on error.
    Compare {
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
        /// Allow opening backing files / parents named inside the images.
        #[arg(long)]
        allow_backing: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve images over NBD (like qemu-nbd): raw read-write, qcow2/VHD/VHDX read-only.
    Serve(crate::serve_cmd::ServeArgs),
}

impl DiskCommand {
    /// The exit status for an error: 2 for compare (as qemu-img), 1 otherwise.
    pub fn error_exit_code(&self) -> u8 {
        match self {
            DiskCommand::Compare { .. } => 2,
            _ => 1,
        }
    }
}

#[derive(Args)]
pub struct OpenArgs {
    /// Force the input format instead of detecting it.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<InFormat>,
    /// Open the backing file / parent named inside the image. Off by default: image
    /// metadata is untrusted and may name any file on this machine.
    #[arg(long)]
    allow_backing: bool,
}

impl OpenArgs {
    pub fn options(&self) -> OpenOptions {
        OpenOptions {
            allow_backing: self.allow_backing,
            format: self.format.map(InFormat::format),
            ..OpenOptions::default()
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum InFormat {
    Raw,
    Qcow2,
    Vhd,
    Vhdx,
}

impl InFormat {
    fn format(self) -> Format {
        match self {
            InFormat::Raw => Format::Raw,
            InFormat::Qcow2 => Format::Qcow2,
            InFormat::Vhd => Format::Vhd,
            InFormat::Vhdx => Format::Vhdx,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutFormat {
    Raw,
    Qcow2,
    /// Dynamic VHD.
    Vhd,
    /// Fixed VHD.
    VhdFixed,
    Vhdx,
    /// Fixed VHD with a virtual size rounded up to a whole MiB.
    Azure,
}

fn open(path: &Path, options: &OpenOptions) -> Result<Box<dyn Disk>> {
    Ok(tern_disk::open_disk(path, options)?)
}

pub fn run(cmd: DiskCommand) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Info { image, open: o, json } => info(&image, &o.options(), json),
        DiskCommand::Map { image, open: o, json } => map(&image, &o.options(), json),
        DiskCommand::Serve(a) => crate::serve_cmd::run(a),
        DiskCommand::Convert {
            src,
            dst,
            output_format,
            azure,
            cluster_size,
            block_size,
            overwrite,
            no_progress,
            no_sync,
            open: o,
        } => {
            let fmt = match (azure, output_format) {
                (true, None | Some(OutFormat::Azure | OutFormat::VhdFixed | OutFormat::Vhd)) => {
                    OutFormat::Azure
                }
                (true, Some(other)) => {
                    bail!("--azure produces a fixed VHD; it cannot be combined with -O {}", out_name(other))
                }
                (false, Some(f)) => f,
                (false, None) => format_from_destination(&dst)?,
            };
            let create = match fmt {
                OutFormat::Raw => CreateFormat::Raw,
                OutFormat::Qcow2 => {
                    let c = cluster_size.bytes();
                    if !c.is_power_of_two() || !(512..=2 * MIB).contains(&c) {
                        bail!("--cluster-size {c} is invalid: it must be a power of two from 512 to 2M");
                    }
                    CreateFormat::Qcow2 { cluster_size: c }
                }
                OutFormat::Vhd => CreateFormat::VhdDynamic,
                OutFormat::VhdFixed | OutFormat::Azure => CreateFormat::VhdFixed,
                OutFormat::Vhdx => {
                    let b = block_size.bytes();
                    if !b.is_power_of_two() || !(MIB..=256 * MIB).contains(&b) {
                        bail!("--block-size {b} is invalid: it must be a power of two from 1M to 256M");
                    }
                    CreateFormat::Vhdx { block_size: b }
                }
            };
            let disk = open(&src, &o.options())?;
            let size = disk.virtual_size();
            let out_size = if fmt == OutFormat::Azure { size.div_ceil(MIB) * MIB } else { size };
            if dst.exists() {
                if !overwrite {
                    bail!("{} already exists; pass --overwrite to replace it", dst.display());
                }
                std::fs::remove_file(&dst).with_context(|| format!("removing {}", dst.display()))?;
            }
            let bar = bytes_bar("converting", size, !no_progress);
            let progress = |done: u64, _total: u64| bar.set_position(done);
            tern_disk::convert(
                disk.as_ref(),
                &dst,
                &tern_disk::ConvertOptions {
                    format: create,
                    virtual_size: Some(out_size),
                    progress: Some(&progress),
                    sync: !no_sync,
                },
            )?;
            bar.finish_and_clear();
            Ok(ExitCode::SUCCESS)
        }
        DiskCommand::Compare { a, b, allow_backing, json } => {
            let opts = OpenOptions { allow_backing, ..OpenOptions::default() };
            let da = open(&a, &opts)?;
            let db = open(&b, &opts)?;
            let outcome = tern_disk::compare(da.as_ref(), db.as_ref(), None)?;
            let (identical, offset) = match outcome {
                CompareOutcome::Identical => (true, None),
                CompareOutcome::Differs { offset } => (false, Some(offset)),
            };
            if json {
                crate::print_json(&CompareReport { identical, first_difference: offset })?;
            } else if let Some(off) = offset {
                outln!("Content mismatch at offset {off}!");
            } else {
                outln!("Images are identical.");
            }
            Ok(if identical { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// The output format DST's name asks for, when -O and --azure are both absent.
fn format_from_destination(dst: &Path) -> Result<OutFormat> {
    let ext = dst.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    Ok(match ext.as_deref() {
        Some("qcow2") => OutFormat::Qcow2,
        Some("vhd") => OutFormat::Vhd,
        Some("vhdx") => OutFormat::Vhdx,
        Some("raw" | "img") => OutFormat::Raw,
        _ => bail!(
            "which output format? {} does not say (.qcow2, .vhd, .vhdx, .raw, .img): give -O raw|qcow2|vhd|vhd-fixed|vhdx|azure",
            dst.display()
        ),
    })
}

fn out_name(f: OutFormat) -> &'static str {
    match f {
        OutFormat::Raw => "raw",
        OutFormat::Qcow2 => "qcow2",
        OutFormat::Vhd => "vhd",
        OutFormat::VhdFixed => "vhd-fixed",
        OutFormat::Vhdx => "vhdx",
        OutFormat::Azure => "azure",
    }
}

fn info(path: &Path, options: &OpenOptions, json: bool) -> Result<ExitCode> {
    let disk = open(path, options)?;
    let info = disk.info()?;
    if json {
        crate::print_json(&info)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("image: {}", path.display());
    outln!("format: {} ({})", info.format, info.subformat);
    outln!("virtual size: {} ({} bytes)", ByteSize(info.virtual_size), info.virtual_size);
    outln!("file size: {} ({} bytes)", ByteSize(info.file_size), info.file_size);
    outln!("disk size: {}", ByteSize(info.allocated_bytes));
    if let Some(c) = info.cluster_size {
        let label = if info.format == Format::Qcow2 { "cluster size" } else { "block size" };
        outln!("{label}: {} ({c} bytes)", ByteSize(c));
    }
    if info.logical_sector_size != 512 {
        outln!("logical sector size: {}", info.logical_sector_size);
    }
    if let Some(b) = &info.backing {
        let state = match &b.opened {
            Some(p) => format!("opened: {}", p.display()),
            None => "not opened".to_string(),
        };
        outln!("backing file: {} ({state})", b.name);
        if let Some(f) = &b.format {
            outln!("backing file format: {f}");
        }
        for l in b.locators.iter().filter(|l| **l != b.name) {
            outln!("parent locator: {l}");
        }
    }
    for (k, v) in &info.details {
        outln!("{k}: {v}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern disk compare --json`.
#[derive(Serialize)]
struct CompareReport {
    identical: bool,
    /// The first guest offset whose bytes differ.
    first_difference: Option<u64>,
}

#[derive(Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    kind: MapKind,
    data: bool,
    zero: bool,
}

fn map(path: &Path, options: &OpenOptions, json: bool) -> Result<ExitCode> {
    let disk = open(path, options)?;
    if let Some(b) = disk.info()?.backing.filter(|b| b.opened.is_none()) {
        eprintln!(
            "tern: warning: {} has a backing file {:?} that was not opened: its ranges show as \
             unallocated here (pass --allow-backing to map them through it)",
            path.display(),
            b.name
        );
    }
    let runs = tern_disk::collect_map(disk.as_ref())?;
    if json {
        let entries: Vec<MapEntry> = runs
            .iter()
            .map(|m| MapEntry {
                start: m.start,
                length: m.length,
                kind: m.kind,
                data: m.kind == MapKind::Data,
                zero: m.kind.reads_as_zero(),
            })
            .collect();
        crate::print_json(&entries)?;
    } else {
        outln!("{:<20}{:<20}Kind", "Offset", "Length");
        for m in runs {
            let kind = match m.kind {
                MapKind::Data => "data",
                MapKind::Zero => "zero",
                MapKind::Unallocated => "unallocated",
            };
            outln!("{:<#20x}{:<#20x}{kind}", m.start, m.length);
        }
    }
    Ok(ExitCode::SUCCESS)
}
