//! The free-space guard: before an operation writes, compare what it will
//! need with what the target's file system has, and refuse up front rather
//! than fail half way with ENOSPC (which leaves a job to undo).

use std::path::Path;

use crate::engine::error::{Error, IoContext, Result};

/// Bytes available to an unprivileged writer on the file system holding
/// `path` (a file or a directory; a file that does not exist yet is looked
/// up through its directory).
pub fn available(path: &Path) -> Result<u64> {
    let probe = if path.exists() {
        path
    } else {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    };
    let st = nix::sys::statvfs::statvfs(probe)
        .map_err(std::io::Error::from)
        .at(path)?;
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Refuse when `needed` more bytes will not fit beside `path`.
pub fn ensure_fits(path: &Path, needed: u64) -> Result<()> {
    let available = available(path)?;
    if needed > available {
        return Err(Error::NoSpace {
            path: path.to_path_buf(),
            needed,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_more_than_the_file_system_has() {
        let dir = tempfile::tempdir().unwrap();
        let free = available(dir.path()).unwrap();
        assert!(free > 0);
        ensure_fits(&dir.path().join("new.qcow2"), 1).unwrap();
        let err = ensure_fits(&dir.path().join("new.qcow2"), u64::MAX).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("new.qcow2") && msg.contains("not enough free space"),
            "{msg}"
        );
    }
}
