//! QEMU's image locks (QCOW2.md §7). Read side: who holds an image, found by
//! asking the kernel with F_OFD_GETLK; asking takes no lock, so a running
//! QEMU is never disturbed. Write side: [`ImageLock`] takes the same bytes a
//! QEMU opener takes, so a QEMU started meanwhile sees the image in use,
//! and refuses when a running QEMU holds it.

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

/// Which permissions an opener holds and which it refuses to share, as
/// QEMU's file-posix driver locks them (QCOW2.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockMode {
    /// Bit i: permission i held (byte 100 + i).
    held: u8,
    /// Bit i: permission i not shared with others (byte 200 + i).
    unshared: u8,
}

impl LockMode {
    /// A read-write opener (qemu-io, a VM, qemu-img commit): holds
    /// consistent-read, write and resize; shares neither write nor resize.
    pub const WRITER: LockMode = LockMode {
        held: 0b1011,
        unshared: 0b1010,
    };
    /// A read-only opener without force-share (qemu-img info, a backing
    /// file): holds consistent-read; shares neither write nor resize.
    pub const READER: LockMode = LockMode {
        held: 0b0001,
        unshared: 0b1010,
    };
}

const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// QEMU's locks held on an image for as long as this value lives. The file
/// description stays open with it: OFD locks belong to it.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    bytes: Vec<i64>,
}

fn set_lock(file: &File, start: i64, kind: libc::c_int) -> std::io::Result<()> {
    let fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    };
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_SETLK(&fl))
        .map(|_| ())
        .map_err(std::io::Error::from)
}

impl ImageLock {
    /// Take QEMU's locks for `mode` on `file`, as QEMU does: lock the bytes,
    /// then look for others holding what we refuse to share, or refusing
    /// what we hold. On conflict nothing stays locked and the error names
    /// the holder ("in use by pid N (command)") when /proc tells.
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<ImageLock> {
        let file = file.try_clone().at(path)?;
        let mut lock = ImageLock {
            file,
            bytes: Vec::new(),
        };
        for i in 0..PERMS {
            if mode.held & (1 << i) != 0 {
                lock.bytes.push(PERM_BASE + i);
            }
            if mode.unshared & (1 << i) != 0 {
                lock.bytes.push(SHARED_BASE + i);
            }
        }
        for &b in &lock.bytes {
            // Dropping `lock` releases what was taken so far.
            set_lock(&lock.file, b, libc::F_RDLCK).at(path)?;
        }
        for i in 0..PERMS {
            let (what, shared) = if mode.held & (1 << i) != 0
                && byte_locked(&lock.file, SHARED_BASE + i).at(path)?
            {
                (PERM_NAMES[i as usize], false)
            } else if mode.unshared & (1 << i) != 0
                && byte_locked(&lock.file, PERM_BASE + i).at(path)?
            {
                (PERM_NAMES[i as usize], true)
            } else {
                continue;
            };
            let who = holders_of(&lock.file);
            return Err(Error::Locked {
                path: path.to_path_buf(),
                detail: format!(
                    "Failed to get {}\"{what}\" lock; in use by {who}",
                    if shared { "shared " } else { "" }
                ),
            });
        }
        Ok(lock)
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        for &b in &self.bytes {
            let _ = set_lock(&self.file, b, libc::F_UNLCK);
        }
    }
}

/// "pid 4121 (qemu-system-x86)" for the processes that have the file open,
/// or "another process" when /proc does not tell.
fn holders_of(file: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = file.metadata() else {
        return "another process".into();
    };
    let id = (m.dev(), m.ino());
    let found = super::holders::find_holders(&std::collections::HashSet::from([id]));
    match found.get(&id) {
        Some(hs) if !hs.is_empty() => hs
            .iter()
            .map(|h| format!("pid {} ({})", h.pid, h.command))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "another process".into(),
    }
}
