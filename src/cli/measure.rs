//! `cowshed measure`: the size a new image would take, with qemu-img
//! measure's text, JSON keys and errors.

use std::path::PathBuf;

use clap::Args;
use color_eyre::eyre::{bail, eyre};
use serde_json::{json, Map, Value};

use super::create::{apply_option as apply_create_option, parse_size};
use super::{parse_format, Output};
use crate::engine::ops::measure::{measure, MeasureOptions, MeasureSource, Preallocation};
use crate::engine::{CreateOptions, Format};

#[derive(Debug, Args)]
pub struct MeasureArgs {
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Format of the new image: qcow2 or raw (default raw, as qemu-img).
    // Parsed when run, so that an unsupported one exits 1 as in qemu-img.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Options of the new image, comma separated: cluster_size=N,
    /// refcount_bits=N, compat=1.1|0.10, extended_l2=on|off,
    /// preallocation=off|metadata|falloc|full, backing_file=NAME;
    /// compression_type and lazy_refcounts are accepted (no effect on size).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Size of a new, empty disk (k, M, G, T, P, E suffixes) instead of a
    /// source image.
    #[arg(long)]
    size: Option<String>,
    /// Source image format (qcow2 or raw); probed if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Accepted for qemu-img compatibility (cowshed takes no lock to read).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source image: the new image would hold a copy of its whole chain.
    file: Option<PathBuf>,
}

pub fn run(a: MeasureArgs) -> color_eyre::Result<i32> {
    let _ = a.force_share;
    let format = parse_format(&a.out_format).map_err(|e| eyre!(e))?;
    let mut opts = MeasureOptions {
        format,
        ..MeasureOptions::default()
    };
    for group in &a.options {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            apply_option(&mut opts, kv)?;
        }
    }
    if opts.format == Format::Raw && a.options.iter().any(|o| !o.is_empty()) {
        bail!("-o options apply to qcow2 images only");
    }
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let source = match (size, &a.file) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(n), None) => MeasureSource::Size(n),
        (None, Some(p)) => MeasureSource::Image {
            path: p,
            format: a.format,
        },
    };
    let m = measure(source, &opts)?;
    match a.output {
        Output::Json => {
            let mut o = Map::new();
            if let Some(b) = m.bitmaps {
                o.insert("bitmaps".into(), json!(b));
            }
            o.insert("required".into(), json!(m.required));
            o.insert("fully-allocated".into(), json!(m.fully_allocated));
            println!("{}", serde_json::to_string_pretty(&Value::Object(o))?);
        }
        Output::Human => {
            println!("required size: {}", m.required);
            println!("fully allocated size: {}", m.fully_allocated);
            if let Some(b) = m.bitmaps {
                println!("bitmaps size: {b}");
            }
        }
    }
    Ok(0)
}

fn apply_option(o: &mut MeasureOptions, kv: &str) -> color_eyre::Result<()> {
    let (k, v) = kv
        .split_once('=')
        .ok_or_else(|| eyre!("option '{kv}' needs a value (key=value)"))?;
    match k {
        "preallocation" => {
            o.preallocation = match v {
                "off" => Preallocation::Off,
                "metadata" => Preallocation::Metadata,
                "falloc" => Preallocation::Falloc,
                "full" => Preallocation::Full,
                _ => bail!("Parameter 'preallocation' does not accept value '{v}'"),
            }
        }
        "backing_file" => o.backing = !v.is_empty(),
        // The layout options of `create`, parsed and checked the same way;
        // compression_type and lazy_refcounts change no size.
        _ => {
            let mut c = CreateOptions {
                cluster_size: o.cluster_size,
                refcount_bits: o.refcount_bits,
                version: o.version,
                extended_l2: o.extended_l2,
                ..CreateOptions::default()
            };
            apply_create_option(&mut c, kv)
                .map_err(|e| eyre!("{e} (measure also takes preallocation, backing_file)"))?;
            o.cluster_size = c.cluster_size;
            o.refcount_bits = c.refcount_bits;
            o.version = c.version;
            o.extended_l2 = c.extended_l2;
        }
    }
    Ok(())
}
