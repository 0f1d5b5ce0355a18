//! What a writing operation checks before its first write, in one place:
//! the metadata it is about to rely on is sound, and a file it replaces is
//! neither held by a QEMU nor the backing file of another image. A refusal
//! here leaves every file byte-identical. The free-space guard is
//! [`crate::engine::space`]; QEMU's locks are [`crate::engine::lock`].
//! Defined virtual machines are known to the shells, not to the engine:
//! they hand them in as [`VmUsers`], checked by [`ensure_no_vm_users`].

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::chain::Chain;
use super::dependents::{find_dependents, Scope};
use super::error::{Error, IoContext, Result};
use super::format::open_image_file;
use super::lock::{ImageLock, LockMode};
use super::ops::check::check_open;
use super::qcow2::header::Header;
use super::qcow2::Qcow2Image;

/// Refuse to write into a qcow2 image whose metadata is corrupt, the way
/// QEMU's corruption checks would stop it, but before anything is written
/// rather than half way: the checker that `cowshed check` runs reads every
/// table the writer may follow (L1, L2, refcount table and blocks,
/// snapshots, bitmaps) and finds unaligned or out-of-file offsets, reserved
/// bits and clusters used twice. Leaks are harmless and allowed.
pub fn ensure_metadata_sound(path: &Path, file: &File) -> Result<()> {
    let image = Qcow2Image::open(path, file.try_clone().at(path)?)?;
    let report = check_open(path, &image)?;
    if report.corruptions == 0 && report.check_errors == 0 {
        return Ok(());
    }
    let first = report
        .findings
        .iter()
        .find(|f| f.starts_with("ERROR"))
        .or(report.findings.first())
        .map_or_else(String::new, |f| format!(" ({})", f.trim()));
    Err(Error::Corrupt {
        path: path.to_path_buf(),
        detail: format!(
            "{} corruption(s){first}",
            report.corruptions + report.check_errors
        ),
    })
}

/// A header a writer must not store: the qcow2 spec forbids a backing file
/// beside a raw external data file (`data_file_raw`), and QEMU refuses to
/// set one ("Could not change the backing file").
pub fn ensure_backing_allowed(h: &Header, path: &Path, name: Option<&str>) -> Result<()> {
    match name {
        Some(n) if h.data_file_raw() => Err(Error::invalid(
            path,
            format!(
                "Could not change the backing file to '{n}': the image's external data file is \
                 raw (data_file_raw=on), which cannot have a backing file"
            ),
        )),
        _ => Ok(()),
    }
}

/// How a destination that exists may be replaced.
#[derive(Debug, Clone, Default)]
pub struct ReplaceOptions {
    /// Replace it even when other images use it as their backing file.
    pub force: bool,
    /// Directories searched for such images besides the destination's own.
    pub search: Vec<PathBuf>,
    /// The defined virtual machines: one using the destination keeps it.
    pub vms: VmUsers,
}

/// QEMU's locks on a destination that is about to be replaced, held until
/// it is: a QEMU starting meanwhile cannot open it, as with qemu-img
/// convert. `None` when the destination did not exist.
#[derive(Debug)]
pub struct DestinationClaim {
    _lock: Option<ImageLock>,
}

/// Check that `dst` may be created or replaced by an operation reading
/// `sources`: when it exists, it is not one of their files, no QEMU holds
/// it (the error names the holder), and no image in its directory (or in
/// `opts.search`) uses it as backing file unless `opts.force`. On success,
/// the locks stay held for as long as the returned claim lives.
pub fn claim_destination(
    dst: &Path,
    sources: &[&Chain],
    opts: &ReplaceOptions,
) -> Result<DestinationClaim> {
    match dst.symlink_metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(DestinationClaim { _lock: None })
        }
        Err(e) => return Err(Error::io(dst, e)),
        // The new file is renamed into place: that would replace the link
        // (or the device node), not the image behind it.
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::invalid(
                dst,
                "is a symbolic link: the output is renamed into place, which would replace the \
                 link rather than the image it points to; give the image's own path",
            ))
        }
        Ok(m) if !m.is_file() => {
            return Err(Error::invalid(
                dst,
                "is not a regular file: the output is a new file renamed into place, which \
                 would replace it",
            ))
        }
        Ok(_) => {}
    }
    let file = open_image_file(dst)?;
    let m = file.metadata().at(dst)?;
    for chain in sources {
        for layer in chain.layers() {
            let lm = layer.image.file().metadata().at(&layer.path)?;
            if (lm.dev(), lm.ino()) == (m.dev(), m.ino()) {
                return Err(Error::invalid(
                    dst,
                    format!(
                        "destination is the same file as '{}' in the source chain",
                        layer.path.display()
                    ),
                ));
            }
        }
    }
    let lock = ImageLock::acquire(&file, dst, LockMode::WRITER).map_err(|e| match e {
        Error::Locked { path, detail } => Error::Locked {
            path,
            detail: format!("{detail}; refusing to replace an image in use"),
        },
        e => e,
    })?;
    ensure_no_vm_users(dst, &opts.vms)?;
    if !opts.force {
        let mut scope = Scope::around(dst, &[]);
        scope.dirs.extend(opts.search.iter().cloned());
        let users = find_dependents(dst, &scope)?;
        if !users.is_empty() {
            return Err(Error::HasDependents {
                path: dst.to_path_buf(),
                dependents: users.into_iter().map(|d| d.path).collect(),
            });
        }
    }
    Ok(DestinationClaim { _lock: Some(lock) })
}

/// A defined virtual machine (a libvirt domain) that uses an image: as one
/// of its disks or in the backing chain libvirt records for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmUser {
    pub name: String,
    pub uuid: String,
    /// As libvirt words it: running, paused, shut off, ...
    pub state: String,
    /// The libvirt connection URI it was found on.
    pub connection: String,
}

/// What the shell found out about defined virtual machines before an
/// operation: which files (device, inode: every spelling of a path and
/// every bind mount matches) each uses, and which connections the user
/// named could not be read, so that the check is not silently skipped.
#[derive(Debug, Clone, Default)]
pub struct VmUsers {
    pub by_file: HashMap<(u64, u64), Vec<VmUser>>,
    /// Connections that were asked and could not answer: (URI, why).
    pub unreadable: Vec<(String, String)>,
    /// Go ahead anyway (`--force-vms`, or "yes" in the TUI).
    pub force: bool,
}

impl VmUsers {
    /// The machines using the file at `path`; none when it cannot be
    /// stat'ed (the operation reports that itself).
    pub fn of(&self, path: &Path) -> &[VmUser] {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| self.by_file.get(&(m.dev(), m.ino())))
            .map_or(&[], Vec::as_slice)
    }
}

/// Refuse to change the file at `path` while a defined virtual machine uses
/// it, running or shut off (its next boot would read a changed disk, or
/// miss a moved one), and when a connection the user named could not be
/// read (the check could not be made). The one place of that refusal.
pub fn ensure_no_vm_users(path: &Path, vms: &VmUsers) -> Result<()> {
    if vms.force {
        return Ok(());
    }
    let users = vms.of(path);
    if !users.is_empty() {
        return Err(Error::UsedByVm {
            path: path.to_path_buf(),
            users: users
                .iter()
                .map(|u| format!("'{}' ({}, {})", u.name, u.state, u.connection))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if !vms.unreadable.is_empty() {
        return Err(Error::VmCheckFailed {
            path: path.to_path_buf(),
            detail: vms
                .unreadable
                .iter()
                .map(|(uri, why)| format!("{uri}: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    Ok(())
}
