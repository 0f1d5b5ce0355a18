//! The file-system steps a move is made of, each durable when it returns:
//! directory fsyncs after links, renames and unlinks, a rename that never
//! replaces, and paths made absolute through canonical directories.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::engine::error::{Error, IoContext, Result};

/// The directory holding `p`, `.` for a bare name.
pub fn parent_or_dot(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Make a directory's entries (a new link, a rename, an unlink) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).at(dir)?;
    d.sync_all().at(dir)
}

/// `p` through its directory's canonical path, the last component kept as
/// it is (it need not exist, and a link there is not followed).
pub fn absolute_through_dir(p: &Path) -> Result<PathBuf> {
    let name = p
        .file_name()
        .ok_or_else(|| Error::invalid(p, "names no file (it ends in '..' or '/')"))?;
    let dir = parent_or_dot(p);
    let dir = std::fs::canonicalize(&dir).at(&dir)?;
    Ok(dir.join(name))
}

/// Rename `from` to `to`, failing rather than replacing `to` if it exists
/// (RENAME_NOREPLACE; where the file system lacks it, a link and an unlink
/// for files, and a last look for directories).
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::invalid(p, "the path contains a NUL byte"))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call; the syscall
    // reads them only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(Error::io(to, e));
    }
    if from.symlink_metadata().at(from)?.is_dir() {
        if to.symlink_metadata().is_ok() {
            return Err(Error::io(to, std::io::ErrorKind::AlreadyExists.into()));
        }
        return std::fs::rename(from, to).at(to);
    }
    std::fs::hard_link(from, to).at(to)?;
    std::fs::remove_file(from).at(from)
}

/// Does `p` exist (as a name: a dangling link exists)?
pub fn exists(p: &Path) -> Result<bool> {
    match p.symlink_metadata() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(p, e)),
    }
}

/// Device and inode of what `p` names (links followed), if it exists.
pub fn file_id(p: &Path) -> Result<Option<(u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => Ok(Some((m.dev(), m.ino()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(p, e)),
    }
}

/// Remove a file if it is there.
pub fn remove_if_present(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rename_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        assert!(rename_noreplace(&a, &b).is_err());
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"a");
        assert!(!exists(&a).unwrap());
    }
}
