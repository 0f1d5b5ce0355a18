//! `cowshed bitmap`: a qcow2 image's persistent dirty bitmaps, like
//! `qemu-img bitmap`: the same flags, applied in the order given, the same
//! messages and exit codes.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::{ArgAction, Args};
use color_eyre::eyre::bail;

use super::create::parse_size;
use super::parse_format;
use crate::engine::ops::bitmap::{self, Action, MergeSource};
use crate::engine::Format;

#[derive(Debug, Args)]
#[command(
    after_help = "At least one of --add, --remove, --clear, --enable, --disable; several \
    are carried out one after the other, in the order given (e.g. --add --disable makes a \
    bitmap that does not record yet); the first that fails stops the rest. Takes QEMU's write \
    lock: refused while a QEMU holds the image. Each step builds the new metadata beside the old \
    and switches the header to it in one write: a crash leaves the image as before or after \
    the step, with nothing leaked. --merge SOURCE ORs bitmap SOURCE (of -b SOURCE_FILE, opened \
    read-only without its backing chain, else of FILE) into BITMAP; bitmaps of another \
    granularity mark every granule of BITMAP their dirty ranges touch, as QEMU merges them.\n\n\
    Exit codes: 0 done, 1 refused or failed."
)]
pub struct BitmapArgs {
    /// Create BITMAP, recording future writes.
    #[arg(long, action = ArgAction::Count)]
    add: u8,
    /// Remove BITMAP and free its clusters.
    #[arg(long, action = ArgAction::Count)]
    remove: u8,
    /// Make BITMAP record no writes so far.
    #[arg(long, action = ArgAction::Count)]
    clear: u8,
    /// Start recording future writes in BITMAP.
    #[arg(long, action = ArgAction::Count)]
    enable: u8,
    /// Stop recording future writes in BITMAP.
    #[arg(long, action = ArgAction::Count)]
    disable: u8,
    /// Merge bitmap SOURCE into BITMAP (may be given several times).
    #[arg(long, value_name = "SOURCE", action = ArgAction::Append)]
    merge: Vec<OsString>,
    /// The image --merge takes its SOURCE bitmaps from (default: FILE).
    #[arg(short = 'b', value_name = "SOURCE_FILE")]
    source_file: Option<PathBuf>,
    /// Format of SOURCE_FILE (qcow2 or raw); probed if absent.
    #[arg(short = 'F', value_name = "SOURCE_FMT", value_parser = parse_format)]
    source_format: Option<Format>,
    /// Granularity of a bitmap made by --add (a power of 2, at least 512;
    /// default: the cluster size within 4 KiB..64 KiB).
    #[arg(short = 'g', long = "granularity", value_name = "SIZE")]
    granularity: Option<String>,
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', long = "format", value_parser = parse_format)]
    format: Option<Format>,
    file: Option<PathBuf>,
    bitmap: Option<OsString>,
}

impl BitmapArgs {
    pub(super) fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }
}

pub fn run(a: BitmapArgs) -> color_eyre::Result<i32> {
    let actions = ordered_actions(&a, std::env::args_os().map(|s| s.as_bytes().to_vec()));
    if actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if a.granularity.is_some() && !actions.contains(&Action::Add) {
        bail!("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if a.source_file.is_some() && a.merge.is_empty() {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let (Some(file), Some(name)) = (&a.file, &a.bitmap) else {
        bail!("Expecting filename and bitmap name");
    };
    let granularity = a.granularity.as_deref().map(parse_size).transpose()?;
    let source = a.source_file.clone().map(|path| MergeSource {
        path,
        format: a.source_format,
    });
    bitmap::run(
        file,
        a.format,
        name.as_bytes(),
        &actions,
        granularity,
        source.as_ref(),
    )?;
    Ok(0)
}

/// The actions asked for, each as often as given, in the order their
/// flags appear in `argv` (as qemu-img applies them); flags not found there
/// come last, in a fixed order.
fn ordered_actions(a: &BitmapArgs, argv: impl Iterator<Item = Vec<u8>>) -> Vec<Action> {
    let asked = [
        (a.add, Action::Add, &b"--add"[..]),
        (a.clear, Action::Clear, b"--clear"),
        (a.enable, Action::Enable, b"--enable"),
        (a.disable, Action::Disable, b"--disable"),
        (a.remove, Action::Remove, b"--remove"),
    ];
    let argv: Vec<Vec<u8>> = argv.take_while(|s| s != b"--").collect();
    let mut out: Vec<(usize, Action)> = Vec::new();
    for (times, action, flag) in asked {
        let mut at = argv
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_slice() == flag)
            .map(|(i, _)| i);
        for _ in 0..times {
            out.push((at.next().unwrap_or(usize::MAX), action.clone()));
        }
    }
    // Each --merge is followed by its SOURCE (or written --merge=SOURCE).
    let mut merge_at = argv
        .iter()
        .enumerate()
        .filter(|(_, s)| s.as_slice() == b"--merge" || s.starts_with(b"--merge="))
        .map(|(i, _)| i);
    for source in &a.merge {
        let at = merge_at.next().unwrap_or(usize::MAX);
        out.push((at, Action::Merge(source.as_bytes().to_vec())));
    }
    out.sort_by_key(|(at, _)| *at);
    out.into_iter().map(|(_, action)| action).collect()
}
