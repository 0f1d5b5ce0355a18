//! `reset`: throw away an overlay's own changes, so that its guest sees its
//! backing file again. A fresh empty qcow2 with the same backing name and
//! format, virtual size and options (cluster size, compat version,
//! compression type, lazy refcounts, extended L2, refcount width) is laid
//! out as `qemu-img create` would, written beside the image under a
//! temporary name, flushed, and renamed over it: a crash leaves either the
//! old image or the new one, never half of each. The file keeps its mode
//! (and its owner, when running as root).
//!
//! Refused, with nothing changed: an image a QEMU holds (its writer locks
//! are held through the replace, and taken on the new file before it takes
//! the name), an image without a backing file (nothing to go back to),
//! one that other images use as their backing file (their view would
//! change), one with internal snapshots or persistent bitmaps (they would
//! be lost), an external data file, an encrypted image.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::engine::dependents::{find_dependents, Scope};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::{open_image_file, probe_file, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::ops::create::{fresh_layout, qcow2_header, CreateOptions};
use crate::engine::preflight::ensure_no_vm_users;
use crate::engine::qcow2::header::{CryptMethod, Header};
use crate::engine::space;

#[derive(Debug, Clone, Default)]
pub struct ResetOptions {
    /// Directories searched (recursively) for dependents besides the
    /// image's own directory.
    pub roots: Vec<PathBuf>,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
}

/// Replace the overlay at `path` with a fresh empty one.
pub fn reset(path: &Path, opts: &ResetOptions) -> Result<()> {
    let m = std::fs::symlink_metadata(path).at(path)?;
    if m.file_type().is_symlink() {
        return Err(Error::invalid(
            path,
            "is a symbolic link: the new image is renamed into place, which would replace the \
             link rather than the image; give the image's own path",
        ));
    }
    let file = open_image_file(path)?;
    let lock = ImageLock::acquire(&file, path, LockMode::WRITER).map_err(|e| match e {
        Error::Locked { path, detail } => Error::Locked {
            path,
            detail: format!("{detail}; an image in use is never reset"),
        },
        e => e,
    })?;
    let format = probe_file(&file, path)?;
    if format != Format::Qcow2 {
        return Err(Error::invalid(
            path,
            format!(
                "is a {} image: it has no backing file to go back to",
                format.name()
            ),
        ));
    }
    let meta = file.metadata().at(path)?;
    let old = Header::read(&file, path, meta.len())?;
    refuse_what_would_be_lost(path, &old)?;
    ensure_no_vm_users(path, &opts.vms)?;
    let users = find_dependents(path, &Scope::around(path, &opts.roots))?;
    if !users.is_empty() {
        let names: Vec<String> = users
            .iter()
            .map(|d| format!("'{}'", d.path.display()))
            .collect();
        return Err(Error::invalid(
            path,
            format!(
                "is the backing file of {}: resetting it would change what they read",
                names.join(", ")
            ),
        ));
    }

    let (len, extents) = fresh_layout(path, fresh_header(path, &old)?)?;
    space::ensure_fits(path, len)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".cowshed-reset-")
        .permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .tempfile_in(&dir)
        .at(path)?;
    let new: &File = tmp.as_file();
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::fchown(new, Some(meta.uid()), Some(meta.gid())).at(path)?;
        // chown clears set-id bits: put the mode back.
        new.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .at(path)?;
    }
    for (off, data) in &extents {
        new.write_all_at(data, *off).at(path)?;
    }
    new.set_len(len).at(path)?;
    new.sync_all().at(path)?;
    // Locked before it takes the name: a QEMU opening the path from then on
    // finds it in use until the reset is over.
    let new_lock = ImageLock::acquire(new, tmp.path(), LockMode::WRITER)?;
    fault::point("reset.before_rename");
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    File::open(&dir).and_then(|d| d.sync_all()).at(&dir)?;
    fault::point("reset.renamed");
    drop(new_lock);
    drop(lock);
    Ok(())
}

/// What a fresh image could not keep.
fn refuse_what_would_be_lost(path: &Path, h: &Header) -> Result<()> {
    let refuse = |why: &str| Err(Error::invalid(path, why.to_string()));
    if h.backing_file.is_none() {
        return refuse(
            "has no backing file: resetting it would leave an empty disk, not go back to a base",
        );
    }
    if h.nb_snapshots > 0 {
        return refuse(&format!(
            "has {} internal snapshot(s), which a reset would lose",
            h.nb_snapshots
        ));
    }
    if h.extensions.bitmaps.is_some() {
        return refuse("has persistent bitmaps, which a reset would lose");
    }
    if h.has_data_file() || h.extensions.data_file.is_some() {
        return refuse("keeps its data in an external data file, which a reset would leave stale");
    }
    if h.crypt_method != CryptMethod::None {
        return refuse("is encrypted: a reset would make it an unencrypted image");
    }
    Ok(())
}

/// The header `qemu-img create -f qcow2 -b NAME -F FMT -o …` writes for the
/// image's own options, with its backing name and format exactly as they
/// are stored (a format that was not recorded stays unrecorded).
fn fresh_header(path: &Path, old: &Header) -> Result<Header> {
    let opts = CreateOptions {
        format: Format::Qcow2,
        size: Some(old.size),
        cluster_size: old.cluster_size(),
        version: old.version,
        compression: old.compression_type,
        lazy_refcounts: old.lazy_refcounts(),
        extended_l2: old.has_extended_l2(),
        refcount_bits: old.refcount_bits(),
        ..CreateOptions::default()
    };
    let mut h = qcow2_header(path, &opts, old.size)?;
    h.backing_file = old.backing_file.clone();
    h.extensions.backing_format = old.extensions.backing_format.clone();
    Ok(h)
}
