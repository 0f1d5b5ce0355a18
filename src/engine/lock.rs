//! QEMU's image locks (QCOW2.md §7), read side: who holds an image, found by
//! asking the kernel with F_OFD_GETLK. Asking takes no lock, so a running
//! QEMU is never disturbed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg};

use super::error::{Error, IoContext, Result};

/// First byte of the "I hold permission i" range; 200 + i is "I do not share
/// permission i".
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
/// consistent-read, write, write-unchanged, resize (QEMU 10).
const PERMS: i64 = 4;
const PERM_WRITE: i64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    /// No QEMU has the image open (or it runs with locking=off).
    None,
    /// Opened read-only by QEMU (a VM's backing file, qemu-img info, ...).
    Reader,
    /// Opened read-write: a running VM, qemu-io, qemu-nbd, a commit.
    Writer,
}

impl LockState {
    pub fn name(self) -> &'static str {
        match self {
            LockState::None => "none",
            LockState::Reader => "reader",
            LockState::Writer => "writer",
        }
    }
}

/// Which of QEMU's lock bytes someone else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockBytes {
    /// Bit i: byte 100 + i (permission i held).
    pub held: u8,
    /// Bit i: byte 200 + i (permission i not shared).
    pub unshared: u8,
}

impl LockBytes {
    pub fn state(self) -> LockState {
        if self.held & (1 << PERM_WRITE) != 0 {
            LockState::Writer
        } else if self.held != 0 || self.unshared != 0 {
            LockState::Reader
        } else {
            LockState::None
        }
    }
}

/// Is byte `start` locked by another open file description?
fn byte_locked(file: &File, start: i64) -> std::io::Result<bool> {
    let mut fl = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).map_err(std::io::Error::from)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Probe the lock bytes of an already opened file.
pub fn lock_bytes(file: &File, path: &Path) -> Result<LockBytes> {
    let mut out = LockBytes::default();
    for i in 0..PERMS {
        if byte_locked(file, PERM_BASE + i).at(path)? {
            out.held |= 1 << i;
        }
        if byte_locked(file, SHARED_BASE + i).at(path)? {
            out.unshared |= 1 << i;
        }
    }
    Ok(out)
}

/// Lock state of the image at `path`, opening it read-only just to ask.
pub fn lock_state(path: &Path) -> Result<LockState> {
    let file = crate::engine::format::open_image_file(path)?;
    match lock_bytes(&file, path) {
        Ok(b) => Ok(b.state()),
        // File systems without OFD locks: QEMU runs unlocked there too.
        Err(Error::Io { cause: source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            Ok(LockState::None)
        }
        Err(e) => Err(e),
    }
}
