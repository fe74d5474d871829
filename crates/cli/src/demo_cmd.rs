//! `tern demo`: the whole flow on a sample VM, saying what it does.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use tern_engine::throttle::Throttle;
use tern_engine::{Firmware, MigrateFormat, MigrateOptions, PointSelector, ReplicateOptions, VmDef};
use tern_types::ByteSize;

use crate::{DataDirArg, GlobalArgs};

#[derive(Args)]
pub struct DemoArgs {
    /// Size of the sample disk (a multiple of 1M).
    #[arg(long, default_value = "256M", value_name = "SIZE")]
    size: ByteSize,
    /// Keep the temporary data directory (ignored with --data-dir, which is kept).
    #[arg(long)]
    keep: bool,
    #[command(flatten)]
    data: DataDirArg,
}

/// Make a sample disk, register a VM, replicate it, migrate it to raw and to an
/// Azure-ready VHD, check both against the source, verify the store.
pub fn run(g: &GlobalArgs, a: DemoArgs) -> Result<ExitCode> {
    let temp =
        tempfile::Builder::new().prefix("tern-demo.").tempdir().context("creating a temporary folder")?;
    let mut g = g.with(&a.data, None, None);
    let work = match &g.data_dir {
        Some(d) => d.join("demo"),
        None => {
            g.data_dir = Some(temp.path().join("data"));
            temp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let engine = g.engine()?;
    outln!("data directory: {}", engine.data_dir().root().display());
    outln!("store:          {}", engine.store_url());

    let name = format!("demo-{}", &tern_engine::new_vm_id()?[..8]);
    let disk = work.join(format!("{name}.raw"));
    let written = tern_engine::sample::write_sample_disk(&disk, a.size.bytes(), 2026)?;
    outln!(
        "1. made a sample VM disk {}: {} with {} of data (random extents and text) and holes",
        disk.display(),
        a.size,
        ByteSize(written)
    );
    let vm = VmDef {
        id: tern_engine::new_vm_id()?,
        name: name.clone(),
        cpus: 2,
        memory_bytes: 2 << 30,
        firmware: Firmware::Uefi,
        disks: vec![disk.clone().into()],
        store_url: None,
        qemu: None,
    };
    tern_engine::register_vm(&engine, vm)?;
    outln!("2. registered VM {name}: 2 vCPUs, 2 GiB, UEFI, 1 disk  (tern vm add)");

    let r = tern_engine::replicate(
        &engine,
        &name,
        &ReplicateOptions::default(),
        &Throttle::unlimited(),
        &|_| {},
    )?;
    let d = &r.disks[0];
    outln!(
        "3. replicated it with 4 workers: {} chunks, {} uploaded ({}), {} zero (not stored); point {}  (tern replicate)",
        d.chunks,
        d.uploaded_chunks,
        ByteSize(d.uploaded_bytes),
        d.zero_chunks,
        r.point_id
    );

    let out = work.join("migrated");
    for (step, format) in [(4, MigrateFormat::Raw), (5, MigrateFormat::Azure)] {
        let opts = MigrateOptions {
            point: PointSelector::Latest,
            format,
            out_dir: out.clone(),
            test: format == MigrateFormat::Azure,
            threads: 4,
            sync: true,
            verify: true,
        };
        let m = tern_engine::migrate(&engine, &name, &opts, &|_| {})?;
        let md = &m.disks[0];
        let src = tern_disk::open_disk(&disk, &Default::default())?;
        let dst = tern_disk::open_disk(&md.path, &Default::default())?;
        let same = matches!(
            tern_disk::compare(src.as_ref(), dst.as_ref(), None)?,
            tern_disk::CompareOutcome::Identical
        );
        if !same {
            bail!("the migrated disk {} differs from the source", md.path.display());
        }
        outln!(
            "{step}. migrated to {:?}{}: {} (sha256 {}), identical to the source; VM definitions {} and {}  (tern migrate)",
            format,
            if opts.test { " as a test migration" } else { "" },
            md.path.display(),
            &md.sha256[..16],
            m.libvirt_xml.display(),
            m.arm_template.display()
        );
    }
    let v =
        tern_engine::verify(&engine, &tern_engine::VerifyOptions { read_data: true, ..Default::default() })?;
    outln!(
        "6. verified the store: {} point(s), {} chunk(s) read and checked, {} problem(s)  (tern store verify --read-data)",
        v.points,
        v.distinct_chunks,
        v.problems.len()
    );
    if g.data_dir.as_deref() == Some(temp.path().join("data").as_path()) {
        if a.keep {
            let kept = temp.keep();
            outln!("kept everything in {}", kept.display());
        } else {
            outln!("removed the temporary folder (pass --keep to look around)");
        }
    }
    Ok(if v.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
