//! `cowshed create`: a fresh image, byte for byte as qemu-img creates it.

use std::path::PathBuf;

use clap::Args;
use color_eyre::eyre::{bail, eyre};

use super::parse_format;
use crate::engine::qcow2::header::CompressionType;
use crate::engine::{self, CreateOptions, Format};

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format: qcow2 or raw.
    #[arg(short = 'f', value_parser = parse_format, default_value = "raw")]
    format: Format,
    /// Backing file, stored exactly as given (a relative name stays relative
    /// and is resolved against the new image's directory).
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Format of the backing file (required with -b, as in QEMU 10).
    #[arg(short = 'F', value_parser = parse_format)]
    backing_format: Option<Format>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Options, comma separated: cluster_size=N, compression_type=zlib|zstd,
    /// lazy_refcounts=on|off, extended_l2=on|off, refcount_bits=N,
    /// compat=1.1|0.10.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Suppress the "Formatting ..." line.
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// Virtual size: bytes, or with a suffix k, M, G, T, P, E (binary units).
    /// Defaults to the backing file's size.
    size: Option<String>,
}

pub fn run(a: CreateArgs) -> color_eyre::Result<i32> {
    let mut opts = CreateOptions {
        format: a.format,
        backing: a.backing.clone(),
        backing_format: a.backing_format,
        unsafe_backing: a.unsafe_backing,
        size: a.size.as_deref().map(parse_size).transpose()?,
        ..CreateOptions::default()
    };
    for group in &a.options {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            apply_option(&mut opts, kv)?;
        }
    }
    if opts.format == Format::Raw && (a.options.iter().any(|o| !o.is_empty())) {
        bail!("-o options apply to qcow2 images only");
    }
    let size = engine::create(&a.file, &opts)?;
    if !a.quiet {
        println!(
            "Formatting '{}', fmt={} size={size}{}",
            a.file.display(),
            opts.format.name(),
            a.backing
                .as_ref()
                .map(|b| format!(" backing_file={b}"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

fn on_off(key: &str, v: &str) -> color_eyre::Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}

pub(crate) fn apply_option(o: &mut CreateOptions, kv: &str) -> color_eyre::Result<()> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| eyre!("option '{kv}' needs a value (key=value)"))?;
    match k {
        "cluster_size" => o.cluster_size = parse_size(v)?,
        "compression_type" => {
            o.compression = match v {
                "zlib" => CompressionType::Deflate,
                "zstd" => CompressionType::Zstd,
                _ => bail!("Parameter 'compression_type' does not accept value '{v}'"),
            }
        }
        "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
        "extended_l2" => o.extended_l2 = on_off(k, v)?,
        "refcount_bits" => {
            o.refcount_bits = v
                .parse()
                .map_err(|_| eyre!("Parameter 'refcount_bits' expects a number"))?
        }
        "compat" => {
            o.version = match v {
                "1.1" | "v3" => 3,
                "0.10" | "v2" => 2,
                _ => bail!("Invalid compatibility level: '{v}'"),
            }
        }
        _ => bail!("Invalid parameter '{k}' (supported: cluster_size, compression_type, lazy_refcounts, extended_l2, refcount_bits, compat)"),
    }
    Ok(())
}

/// qemu-img's size syntax (see [`crate::engine::size::parse_size`]).
pub(crate) fn parse_size(s: &str) -> color_eyre::Result<u64> {
    crate::engine::size::parse_size(s).map_err(|e| eyre!(e))
}
