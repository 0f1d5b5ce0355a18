//! `amend`: change options of an existing qcow2 image, as `qemu-img amend
//! -o` does. Every option is checked before anything is written, with
//! qemu-img's messages where it refuses (creation-only options, the backing
//! file, lazy refcounts on a compat=0.10 image, ...), so a refused amend
//! leaves the file byte-identical.
//!
//! What cowshed changes: `lazy_refcounts`, `compat=1.1` on a compat=0.10
//! image (a header rewrite, as QEMU's upgrade; with the snapshot table
//! written anew where its entries lack v3's extra data), `size`
//! (through `resize`, which keeps its guard against shrinking a base under
//! its overlays), `refcount_bits` (every refcount stored again at the new
//! width) and `compat=0.10` (zero clusters expanded, as QEMU expands them),
//! the last two as one switch to metadata built aside
//! (`writer/amend.rs`). The external data file and encryption options are
//! refused with a pointer to qemu-img.

use std::path::{Path, PathBuf};

use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::{open_image_file, probe_file, Format};
use crate::engine::ops::resize::{resize, NewSize, ResizeOptions};
use crate::engine::qcow2::header::{compat, Header};
use crate::engine::qcow2::writer::backing::HeaderEditor;
use crate::engine::qcow2::writer::Qcow2Writer;
use crate::engine::size::parse_size;

#[derive(Debug, Clone, Default)]
pub struct AmendOptions {
    /// The format given with -f; probed when absent.
    pub format: Option<Format>,
    /// `key=value` pairs in the order given (all `-o` lists joined).
    pub options: Vec<(String, String)>,
    /// A size that shrinks a file other images use as backing: allowed.
    pub force: bool,
    /// Where to look for such images besides the file's own directory.
    pub roots: Vec<PathBuf>,
}

/// Options only `create` takes: qemu-img names them as such.
const CREATION_ONLY: &[&str] = &[
    "cluster_size",
    "compression_type",
    "encryption",
    "encrypt.format",
    "extended_l2",
    "nocow",
    "preallocation",
];

/// What was asked, parsed and checked against the image.
#[derive(Debug, Default)]
struct Wanted {
    /// compat=1.1 on a compat=0.10 image.
    upgrade: bool,
    /// compat=0.10 on a compat=1.1 image.
    downgrade: bool,
    /// Another refcount width, in bits.
    refcount_bits: Option<u32>,
    lazy_refcounts: Option<bool>,
    size: Option<u64>,
}

/// Amend `path` with `opts.options`.
pub fn amend(path: &Path, opts: &AmendOptions) -> Result<()> {
    if opts.options.is_empty() {
        return Err(Error::invalid(path, "Must specify options (-o)"));
    }
    let format = match opts.format {
        Some(f) => f,
        None => probe_file(&open_image_file(path)?, path)?,
    };
    if format != Format::Qcow2 {
        return Err(Error::invalid(
            path,
            format!(
                "Format driver '{}' does not support option amendment",
                format.name()
            ),
        ));
    }
    repair_if_dirty(path, opts)?;
    // QEMU's writer lock first, then the metadata check, then reading.
    let mut editor = HeaderEditor::open(path)?;
    let wanted = parse(path, editor.header(), &opts.options)?;
    // An upgrade may write the snapshot table anew.
    let snapshots = wanted.upgrade && editor.header().nb_snapshots > 0;
    if wanted.downgrade || wanted.refcount_bits.is_some() || snapshots {
        drop(editor);
        return amend_metadata(path, opts);
    }
    // Every header change in one write: the upgrade, then the bits.
    editor.rewrite(|h| header_changes(h, &wanted))?;
    drop(editor);
    if let Some(size) = wanted.size {
        resize_to(path, opts, size)?;
    }
    Ok(())
}

/// An image left dirty (lazy refcounts, then a crash) has its refcounts
/// repaired first, as QEMU's open for writing repairs it before `qemu-img
/// amend` goes on; an image marked corrupt is left to the writer's refusal.
/// The options are checked first: a refused amend leaves even a dirty
/// image as it was.
fn repair_if_dirty(path: &Path, opts: &AmendOptions) -> Result<()> {
    let file = open_image_file(path)?;
    let len = file.metadata().at(path)?.len();
    let h = Header::read(&file, path, len)?;
    drop(file);
    if !h.is_dirty() || h.is_corrupt() {
        return Ok(());
    }
    parse(path, &h, &opts.options)?;
    let report = crate::engine::ops::check::check_repair_all(path, Some(Format::Qcow2))?;
    if report.exit_code() != 0 {
        return Err(Error::invalid(
            path,
            "the image was left dirty and its repair did not leave it clean; see `cowshed \
             check`",
        ));
    }
    Ok(())
}

/// The amend that rewrites metadata (another refcount width, a
/// downgrade, an upgrade with snapshots), in QEMU's order: upgrade and header bits, refcount width,
/// size, downgrade last. Whatever QEMU would refuse is refused before
/// anything is written.
fn amend_metadata(path: &Path, opts: &AmendOptions) -> Result<()> {
    let mut w = Qcow2Writer::open(path)?;
    // Parsed again against the header as held now.
    let wanted = parse(path, w.header(), &opts.options)?;
    if wanted.downgrade {
        let order_then = wanted
            .refcount_bits
            .map_or(w.header().refcount_order, u32::trailing_zeros);
        let size_then = wanted.size.unwrap_or(w.virtual_size());
        if let Some(why) = w.downgrade_refusal(order_then, size_then)? {
            return Err(Error::invalid(path, why));
        }
    }
    if wanted.upgrade && w.upgrade_rewrites_snapshots()? {
        w.upgrade_with_snapshot_table(|h| header_changes(h, &wanted))?;
    } else {
        w.rewrite(|h| header_changes(h, &wanted))?;
    }
    if let Some(bits) = wanted.refcount_bits {
        w.change_refcount_width(bits)?;
    }
    if let Some(size) = wanted.size {
        drop(w);
        resize_to(path, opts, size)?;
        w = Qcow2Writer::open(path)?;
    }
    if wanted.downgrade {
        w.downgrade()?;
    }
    w.flush()
}

/// The header fields `wanted` changes.
fn header_changes(h: &mut Header, wanted: &Wanted) {
    if wanted.upgrade {
        // As QEMU's qcow2_upgrade: v3 fields at their defaults.
        h.version = 3;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
    }
    if let Some(on) = wanted.lazy_refcounts {
        if on {
            h.compatible_features |= compat::LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !compat::LAZY_REFCOUNTS;
        }
    }
}

fn resize_to(path: &Path, opts: &AmendOptions, size: u64) -> Result<()> {
    let ropts = ResizeOptions {
        format: Some(Format::Qcow2),
        // qemu-img amend shrinks without being asked twice.
        shrink: true,
        force: opts.force,
        roots: opts.roots.clone(),
        // The CLI checked the defined machines for the whole amend.
        vms: Default::default(),
    };
    resize(path, NewSize::Exactly(size), &ropts).map(|_| ())
}

fn parse(path: &Path, h: &Header, options: &[(String, String)]) -> Result<Wanted> {
    let bad = |msg: String| Error::invalid(path, msg);
    let mut wanted = Wanted::default();
    let (mut backing_file, mut backing_fmt) = (None, None);
    for (key, value) in options {
        match key.as_str() {
            "lazy_refcounts" => {
                let on = match value.as_str() {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => {
                        return Err(bad(
                            "Parameter 'lazy_refcounts' expects 'on' or 'off'".into()
                        ))
                    }
                };
                wanted.lazy_refcounts = Some(on);
            }
            "size" => {
                let size = parse_size(value).map_err(bad)?;
                wanted.size = Some(size);
            }
            "compat" => {
                let version = match value.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => return Err(bad(format!("Unknown compatibility level {value}"))),
                };
                if version > h.version {
                    wanted.upgrade = true;
                } else if version < h.version {
                    wanted.downgrade = true;
                }
            }
            "refcount_bits" => {
                let bits: u64 = value.parse().unwrap_or(0);
                if !bits.is_power_of_two() || bits > 64 {
                    return Err(bad(
                        "Refcount width must be a power of two and may not exceed 64 bits".into(),
                    ));
                }
                wanted.refcount_bits = Some(bits as u32);
            }
            "backing_file" => backing_file = Some(value.clone()),
            "backing_fmt" => backing_fmt = Some(value.clone()),
            "data_file" if !h.has_data_file() => {
                return Err(bad(
                    "data-file can only be set for images that use an external data file".into(),
                ))
            }
            "data_file" | "data_file_raw" => {
                return Err(bad(format!(
                    "amending '{key}' is not supported by cowshed; qemu-img amend can"
                )))
            }
            k if k.starts_with("encrypt.") && !CREATION_ONLY.contains(&k) => {
                return Err(bad(format!(
                    "amending '{key}' is not supported by cowshed; qemu-img amend can"
                )))
            }
            k if CREATION_ONLY.contains(&k) => {
                return Err(bad(format!(
                    "Invalid parameter '{key}'\nThis option is only supported for image creation"
                )))
            }
            _ => return Err(bad(format!("Invalid parameter '{key}'"))),
        }
    }
    let version = if wanted.upgrade {
        3
    } else if wanted.downgrade {
        2
    } else {
        h.version
    };
    // As QEMU, a width or lazy_refcounts the image has already is no change
    // to refuse.
    if wanted.refcount_bits == Some(1 << h.refcount_order) && !wanted.upgrade {
        wanted.refcount_bits = None;
    }
    if wanted.refcount_bits.is_some_and(|b| b != 16) && version < 3 {
        return Err(bad(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use \
             compat=1.1 or greater)"
                .into(),
        ));
    }
    if let Some(on) = wanted.lazy_refcounts {
        if on && version < 3 && !(h.version >= 3 && h.lazy_refcounts()) {
            return Err(bad(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)"
                    .into(),
            ));
        }
    }
    // QEMU 10 never changes the backing file here; naming the current one
    // (file and format both) is accepted.
    if (backing_file.is_some() || backing_fmt.is_some())
        && (backing_file != h.backing_file || backing_fmt != h.extensions.backing_format)
    {
        return Err(bad(
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
        ));
    }
    Ok(wanted)
}
