//! `cowshed amend`: change options of an existing qcow2 image, like
//! `qemu-img amend -o`.

use std::path::PathBuf;

use clap::Args;

use super::parse_format;
use crate::engine::ops::amend::{amend, AmendOptions};
use crate::engine::Format;

#[derive(Debug, Args)]
#[command(
    after_help = "OPTIONS is a comma-separated list of key=value (-o may be given \
    several times). cowshed amends lazy_refcounts=on|off, compat=1.1 on a compat=0.10 \
    image (internal snapshots' table entries given v3's extra data, as QEMU gives it), \
    compat=0.10 (zero clusters expanded as QEMU does; \
    persistent bitmaps dropped), refcount_bits=1|2|4|8|16|32|64 (16 only for \
    compat=0.10), and size=SIZE (growing or, as qemu-img does, shrinking; beyond \
    qemu-img, a file other images use as backing is not shrunk without --force). \
    A downgrade, another refcount width or such a snapshot table is built beside the \
    image and switched to in \
    one header write, so a crash leaves the old image or the new one. data_file, \
    data_file_raw and encrypt.* are refused (qemu-img amend can). As in QEMU 10, \
    backing_file and backing_fmt cannot change: use `cowshed rebase`. Options only \
    `create` takes are refused with qemu-img's message. Every option is checked before \
    anything is written; the image is refused while a QEMU holds it.\n\nExit codes: 0 amended, 1 refused or failed."
)]
pub struct AmendArgs {
    /// Image format (only qcow2 has options to amend); probed if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// key=value[,key=value...]
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Shrink (size=) even when other images use FILE as their backing file.
    #[arg(long)]
    force: bool,
    /// Also look here (recursively) for images that use FILE as backing.
    #[arg(long = "root", value_name = "DIR")]
    roots: Vec<PathBuf>,
    /// Accepted for qemu-img compatibility (amend prints nothing).
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
}

impl AmendArgs {
    pub(super) fn file(&self) -> &std::path::Path {
        &self.file
    }
}

pub fn run(a: AmendArgs) -> color_eyre::Result<i32> {
    let _ = a.quiet;
    let mut options = Vec::new();
    for list in &a.options {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            options.push((k.to_string(), v.to_string()));
        }
    }
    let opts = AmendOptions {
        format: a.format,
        options,
        force: a.force,
        roots: a.roots,
    };
    amend(&a.file, &opts)?;
    Ok(0)
}
