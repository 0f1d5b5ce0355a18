//! `protect`: make a base image read-only on disk, and back. QEMU opens
//! backing files read-only, so overlays running on a protected base are
//! unaffected; what it stops is a base opened for writing by mistake (a VM
//! booted on it, `qemu-img commit` into it), which would corrupt every
//! overlay. The mode before protecting is kept in a user extended
//! attribute of the file, so that unprotecting restores it exactly; where
//! the file system keeps none, unprotecting gives the owner write
//! permission. Only the file's metadata changes, never a byte of it.

use std::fs::{File, Permissions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use xattr::FileExt;

use crate::engine::error::{Error, IoContext, Result};

/// The extended attribute holding the mode from before `protect`, in
/// octal (`644`).
pub const MODE_ATTR: &str = "user.cowshed.mode";

const WRITE_BITS: u32 = 0o222;

/// What `protect` or `unprotect` did to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectChange {
    /// Write bits removed; `recorded` says whether the old mode was kept
    /// in [`MODE_ATTR`] (else why not).
    Protected {
        from: u32,
        to: u32,
        recorded: std::result::Result<(), String>,
    },
    /// No write bit to remove: nothing done.
    AlreadyReadOnly { mode: u32 },
    /// Write permission given back: the recorded mode, or (`recorded`
    /// false) the owner's write bit.
    Restored { from: u32, to: u32, recorded: bool },
    /// Writable already: nothing done.
    AlreadyWritable { mode: u32 },
}

impl ProtectChange {
    /// Whether the file's mode changed.
    pub fn changed(&self) -> bool {
        matches!(
            self,
            ProtectChange::Protected { .. } | ProtectChange::Restored { .. }
        )
    }

    pub fn describe(&self) -> String {
        match self {
            ProtectChange::Protected { from, to, recorded } => {
                let kept = match recorded {
                    Ok(()) => format!("{from:o} kept in {MODE_ATTR}"),
                    Err(why) => format!(
                        "the old mode could not be kept ({why}): unprotecting will give the \
                         owner write permission"
                    ),
                };
                format!("protected: mode {from:o} → {to:o} ({kept})")
            }
            ProtectChange::AlreadyReadOnly { mode } => {
                format!("already read-only (mode {mode:o}): unchanged")
            }
            ProtectChange::Restored { from, to, recorded } => format!(
                "unprotected: mode {from:o} → {to:o} ({})",
                if *recorded {
                    "the mode recorded when protecting"
                } else {
                    "no mode recorded: owner write permission"
                }
            ),
            ProtectChange::AlreadyWritable { mode } => {
                format!("already writable (mode {mode:o}): unchanged")
            }
        }
    }
}

fn open(path: &Path) -> Result<(File, u32)> {
    let file = File::open(path).at(path)?;
    let meta = file.metadata().at(path)?;
    if !meta.is_file() {
        return Err(Error::invalid(path, "not a regular file"));
    }
    Ok((file, meta.mode() & 0o7777))
}

/// The mode [`protect`] recorded for the file at `path`, if any.
pub fn recorded_mode(path: &Path) -> Option<u32> {
    File::open(path).ok().as_ref().and_then(read_record)
}

fn read_record(file: &File) -> Option<u32> {
    file.get_xattr(MODE_ATTR)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|s| u32::from_str_radix(s.trim(), 8).ok())
        // A recorded mode without a write bit would restore nothing.
        .filter(|m| *m <= 0o7777 && m & WRITE_BITS != 0)
}

/// Remove the write bits of the file at `path`, recording its mode first.
pub fn protect(path: &Path) -> Result<ProtectChange> {
    let (file, mode) = open(path)?;
    if mode & WRITE_BITS == 0 {
        return Ok(ProtectChange::AlreadyReadOnly { mode });
    }
    // Recorded while the file is still writable: setting a user attribute
    // needs write permission.
    let recorded = file
        .set_xattr(MODE_ATTR, format!("{mode:o}").as_bytes())
        .map_err(|e| e.to_string());
    let to = mode & !WRITE_BITS;
    file.set_permissions(Permissions::from_mode(to)).at(path)?;
    Ok(ProtectChange::Protected {
        from: mode,
        to,
        recorded,
    })
}

/// Give the file at `path` its write permission back: the mode recorded by
/// [`protect`], else the owner's write bit.
pub fn unprotect(path: &Path) -> Result<ProtectChange> {
    let (file, mode) = open(path)?;
    let recorded = read_record(&file);
    if mode & WRITE_BITS != 0 {
        // Made writable by other means: the record is stale.
        let _ = file.remove_xattr(MODE_ATTR);
        return Ok(ProtectChange::AlreadyWritable { mode });
    }
    let to = recorded.unwrap_or(mode | 0o200);
    file.set_permissions(Permissions::from_mode(to)).at(path)?;
    if recorded.is_some() {
        // Writable again, so the attribute can go.
        let _ = file.remove_xattr(MODE_ATTR);
    }
    Ok(ProtectChange::Restored {
        from: mode,
        to,
        recorded: recorded.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn protecting_and_back_restores_the_exact_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("base.qcow2");
        std::fs::write(&p, b"x").expect("write");
        std::fs::set_permissions(&p, Permissions::from_mode(0o664)).expect("chmod");
        let change = protect(&p).expect("protect");
        assert!(change.changed(), "{change:?}");
        assert_eq!(mode_of(&p), 0o444);
        assert_eq!(
            protect(&p).expect("again"),
            ProtectChange::AlreadyReadOnly { mode: 0o444 }
        );
        match unprotect(&p).expect("unprotect") {
            ProtectChange::Restored { to, recorded, .. } => {
                // Where the file system keeps user attributes (the temp
                // directory may not), the group's write bit comes back too.
                assert_eq!(to, if recorded { 0o664 } else { 0o644 });
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            unprotect(&p).expect("again"),
            ProtectChange::AlreadyWritable { mode: mode_of(&p) }
        );
    }

    #[test]
    fn without_a_record_the_owner_gets_write_permission() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("base.qcow2");
        std::fs::write(&p, b"x").expect("write");
        std::fs::set_permissions(&p, Permissions::from_mode(0o440)).expect("chmod");
        assert_eq!(
            unprotect(&p).expect("unprotect"),
            ProtectChange::Restored {
                from: 0o440,
                to: 0o640,
                recorded: false
            }
        );
        assert!(protect(&dir.path().join("missing")).is_err());
        assert!(protect(dir.path()).is_err(), "a directory is refused");
    }
}
