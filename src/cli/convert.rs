//! `cowshed convert`: flatten a chain into a new image. Raw output for now.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use color_eyre::eyre::bail;

use super::parse_format;
use super::progress::{install_ctrlc, spawn_reporter};
use crate::engine::{self, CacheMode, Cancel, ConvertOptions, Format, Progress};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cache {
    /// Flush the output before renaming it into place (default).
    Writeback,
    /// Do not flush (qemu-img convert's default): faster, not crash-safe.
    Unsafe,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Output format. Only raw is written yet.
    #[arg(short = 'O', value_parser = parse_format, default_value = "raw")]
    output_format: Format,
    /// Cache mode of the output.
    #[arg(short = 't', value_enum, default_value = "writeback")]
    cache: Cache,
    /// Show progress on stderr.
    #[arg(short = 'p')]
    progress: bool,
    src: PathBuf,
    dst: PathBuf,
}

pub fn run(a: ConvertArgs) -> color_eyre::Result<i32> {
    if a.output_format != Format::Raw {
        bail!(
            "-O {}: cowshed convert writes raw output only so far",
            a.output_format.name()
        );
    }
    let cancel = Cancel::new();
    // Ctrl-C cancels: the engine removes its temporary file and leaves no
    // partial destination.
    install_ctrlc(&cancel)?;
    let opts = ConvertOptions {
        src_format: a.format,
        cache: match a.cache {
            Cache::Writeback => CacheMode::Writeback,
            Cache::Unsafe => CacheMode::Unsafe,
        },
    };
    let progress = Arc::new(Progress::new());
    let reporter = a.progress.then(|| spawn_reporter(progress.clone()));
    let result = engine::convert_to_raw(&a.src, &a.dst, &opts, &progress, &cancel);
    if let Some((stop, handle)) = reporter {
        stop.cancel();
        let _ = handle.join();
    }
    match result {
        Ok(()) => Ok(0),
        Err(engine::Error::Cancelled) => {
            eprintln!(
                "cowshed: convert cancelled; {} was not written",
                a.dst.display()
            );
            Ok(130)
        }
        Err(e) => Err(e.into()),
    }
}
