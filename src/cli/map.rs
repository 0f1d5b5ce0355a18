//! `cowshed map`: the extents `qemu-img map` prints, with the same JSON.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;
use color_eyre::eyre::bail;

use super::{display, parse_format, Output};
use crate::engine::{self, Chain, Format};

#[derive(Debug, Args)]
pub struct MapArgs {
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Start mapping at this guest offset.
    #[arg(long, default_value_t = 0)]
    start_offset: u64,
    /// Map at most this many bytes.
    #[arg(long)]
    max_length: Option<u64>,
    /// Accepted for qemu-img compatibility (cowshed takes no lock to read).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file: PathBuf,
}

pub fn run(a: MapArgs) -> color_eyre::Result<i32> {
    let _ = a.force_share;
    let chain = Chain::open(&a.file, a.format)?;
    let files: Vec<String> = chain
        .layers()
        .iter()
        .map(|l| {
            l.image
                .as_qcow2()
                .and_then(|q| q.data_file_path())
                .map_or_else(|| display(&l.path), display)
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut first = true;
    let len = a.max_length.unwrap_or(u64::MAX);
    let mut bad = None;
    if a.output == Output::Human {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
    }
    engine::map(&chain, a.start_offset, len, |e| {
        let r = match a.output {
            Output::Json => {
                let sep = if first { "[" } else { ",\n" };
                first = false;
                let offset = e
                    .offset
                    .map(|o| format!(", \"offset\": {o}"))
                    .unwrap_or_default();
                write!(
                    out,
                    "{sep}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}{offset}}}",
                    e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
                )
            }
            Output::Human => {
                if e.data && e.offset.is_none() {
                    bad.get_or_insert(e.start);
                    Ok(())
                } else if e.data && !e.zero {
                    writeln!(
                        out,
                        "{:<16}{:<16}{:<16}{}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                        files[e.depth]
                    )
                } else {
                    Ok(())
                }
            }
        };
        r.map_err(|err| engine::Error::io("<stdout>", err))
    })?;
    if a.output == Output::Json {
        writeln!(out, "{}", if first { "[]" } else { "]" })?;
    }
    out.flush()?;
    if let Some(at) = bad {
        bail!(
            "{}: File contains external, encrypted or compressed clusters (first at offset {at}); \
             use --output json to see them",
            display(&a.file)
        );
    }
    Ok(0)
}

/// qemu-img's `%#x`: "0" for zero, "0x..." otherwise.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
