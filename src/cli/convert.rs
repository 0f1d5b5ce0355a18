//! `cowshed convert`: flatten a chain into a new raw or qcow2 image, with
//! qemu-img convert's flags.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use color_eyre::eyre::bail;

use super::create::{apply_option, parse_size};
use super::parse_format;
use super::progress::run_cancellable;
use crate::engine::preflight::ReplaceOptions;
use crate::engine::{self, CacheMode, ConvertOptions, CreateOptions, Format};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cache {
    /// Flush the output before renaming it into place (default).
    Writeback,
    /// Do not flush (qemu-img convert's default): faster, not crash-safe.
    Unsafe,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    cowshed convert -O qcow2 disk.raw disk.qcow2\n  \
    cowshed convert -O qcow2 -c -o compression_type=zstd top.qcow2 small.qcow2\n  \
    cowshed convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 new-top.qcow2\n\n\
    The output is written under a temporary name beside DST and renamed into \
    place when complete: an interrupted convert leaves no DST.")]
pub struct ConvertArgs {
    /// Source format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format: raw (default, as in qemu-img) or qcow2.
    #[arg(short = 'O', value_parser = parse_format, default_value = "raw")]
    output_format: Format,
    /// Compress every cluster that shrinks, with the output's
    /// compression_type (qcow2 only).
    #[arg(short = 'c')]
    compress: bool,
    /// qcow2 output options, comma separated: cluster_size=N,
    /// compression_type=zlib|zstd, compat=1.1|0.10, refcount_bits=N,
    /// lazy_refcounts=on|off.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Backing file of the output, stored as given (relative to DST's
    /// directory). Only what the source's top layer holds is copied.
    #[arg(short = 'B', value_name = "BACKING")]
    backing: Option<String>,
    /// Format of the -B backing file (required, as in QEMU 10).
    #[arg(short = 'F', value_parser = parse_format, value_name = "FMT")]
    backing_format: Option<Format>,
    /// Runs of zero bytes at least this long are not written (default 4k;
    /// 0 writes everything). Bytes, or with a suffix k, M, G.
    #[arg(short = 'S', value_name = "SIZE")]
    sparse: Option<String>,
    /// Cache mode of the output.
    #[arg(short = 't', value_enum, default_value = "writeback")]
    cache: Cache,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    /// Replace DST even when other images in its directory use it as their
    /// backing file (they will read the new content: only for a DST whose
    /// overlays are to be thrown away). A DST in SRC's own chain, or held
    /// by a QEMU, is refused all the same.
    #[arg(long)]
    force: bool,
    /// Image to convert; its whole backing chain is read (with -B, only
    /// what its top layer holds is copied).
    src: PathBuf,
    /// Output file, never left half written. An existing DST is replaced,
    /// as by qemu-img, unless a QEMU holds it (refused, naming the
    /// process; QEMU's locks stay on it until it is replaced) or another
    /// image in its directory uses it as backing file (refused unless
    /// --force).
    dst: PathBuf,
}

pub fn run(a: ConvertArgs, session: &super::session::Session) -> color_eyre::Result<i32> {
    let mut target = CreateOptions {
        format: a.output_format,
        backing: a.backing.clone(),
        backing_format: a.backing_format,
        ..CreateOptions::default()
    };
    for group in &a.options {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            if !matches!(
                key,
                "cluster_size" | "compression_type" | "compat" | "refcount_bits" | "lazy_refcounts"
            ) {
                bail!(
                    "Invalid option '{key}' for convert -o (supported: cluster_size, \
                     compression_type, compat, refcount_bits, lazy_refcounts)"
                );
            }
            apply_option(&mut target, kv)?;
        }
    }
    if a.output_format != Format::Qcow2 && a.options.iter().any(|o| !o.is_empty()) {
        bail!("-o options apply to qcow2 output only");
    }
    if a.output_format == Format::Raw && a.compress {
        bail!("Compression not supported for this file format (raw); use -O qcow2");
    }
    if a.output_format == Format::Raw && a.backing.is_some() {
        bail!("raw output cannot have a backing file (-B); use -O qcow2");
    }
    let min_sparse = match a.sparse.as_deref() {
        Some(s) => parse_size(s)?,
        None => 4096,
    };
    let opts = ConvertOptions {
        src_format: a.format,
        cache: match a.cache {
            Cache::Writeback => CacheMode::Writeback,
            Cache::Unsafe => CacheMode::Unsafe,
        },
        target,
        compress: a.compress,
        min_sparse,
        replace: Some(ReplaceOptions {
            force: a.force,
            search: Vec::new(),
            // libvirt is asked only when there is something to replace.
            vms: if a.dst.symlink_metadata().is_ok() {
                session.vm_users()?
            } else {
                Default::default()
            },
        }),
    };
    // Ctrl-C cancels: the engine removes its temporary file and leaves no
    // partial destination.
    let cancelled = || format!("convert cancelled; {} was not written", a.dst.display());
    let done = run_cancellable(a.progress, cancelled, |progress, cancel| {
        engine::convert(&a.src, &a.dst, &opts, progress, cancel)
    })?;
    Ok(if done.is_some() { 0 } else { 130 })
}
