//! `cowshed resize`: change an image's virtual size, like `qemu-img
//! resize`.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;

use super::create::parse_size;
use super::parse_format;
use crate::engine::ops::resize::{resize, NewSize, ResizeOptions};
use crate::engine::Format;

#[derive(Debug, Args)]
#[command(
    allow_negative_numbers = true,
    after_help = "SIZE is a number with an optional suffix (k, M, G, T: binary units); +SIZE \
    and -SIZE are relative to the current size. Growing leaves the new range reading as \
    zeros: the guest must grow its partition and file system itself afterwards. Shrinking \
    deletes everything past the new end and needs --shrink (shrink the guest's file system \
    and partition first). Beyond qemu-img: a file other images use as backing is not shrunk \
    (they would read differently past the new end) unless --force. Persistent bitmaps \
    are resized with the disk, as QEMU resizes them (the new range clean); an inconsistent \
    (in-use) one refuses the resize, as in QEMU. The image is refused while a QEMU holds \
    it.\n\n\
    Exit codes: 0 resized, 1 refused or failed."
)]
pub struct ResizeArgs {
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Allow the new size to be smaller (data past it is deleted).
    #[arg(long)]
    shrink: bool,
    /// Shrink even when other images use FILE as their backing file.
    #[arg(long)]
    force: bool,
    /// Also look here (recursively) for images that use FILE as backing.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Suppress the "Image resized." line.
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// The new size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(a: ResizeArgs, session: &Session) -> color_eyre::Result<i32> {
    let size = match a.size.strip_prefix('+') {
        Some(rest) => NewSize::Plus(parse_size(rest)?),
        None => match a.size.strip_prefix('-') {
            Some(rest) => NewSize::Minus(parse_size(rest)?),
            None => NewSize::Exactly(parse_size(&a.size)?),
        },
    };
    let opts = ResizeOptions {
        format: a.format,
        shrink: a.shrink,
        force: a.force,
        roots: a.roots,
        vms: session.vm_users()?,
    };
    resize(&a.file, size, &opts)?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}
