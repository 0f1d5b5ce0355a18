//! The engine's one error type. Every variant names the file it is about, as
//! the user gave it (or as the backing chain resolved it), and what is wrong.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },

    /// The file's metadata is malformed or breaks one of QEMU's limits. The
    /// message follows QEMU's wording where QEMU has one.
    #[error("{}: {msg}", path.display())]
    Invalid { path: PathBuf, msg: String },

    /// A recognised format the engine does not open (vmdk, vdi, qed, ...).
    #[error("{}: {format} images are not supported (only qcow2 and raw)", path.display())]
    UnsupportedFormat { path: PathBuf, format: &'static str },

    #[error("{}: Unsupported qcow2 feature(s): {features}", path.display())]
    UnsupportedFeature { path: PathBuf, features: String },

    #[error("{}: the image is encrypted ({method}); cowshed shows its metadata but cannot read its data", path.display())]
    Encrypted { path: PathBuf, method: &'static str },

    /// Backing names cowshed reports but never follows (`json:`, `nbd://`, ...).
    #[error("{}: backing file '{name}' is a {kind} name; cowshed does not follow it", path.display())]
    UnfollowedBacking {
        path: PathBuf,
        name: String,
        kind: &'static str,
    },

    #[error("{}: Backing file '{}' creates an infinite loop", path.display(), backing.display())]
    BackingCycle { path: PathBuf, backing: PathBuf },

    #[error("{}: backing chain is deeper than {limit} images", path.display())]
    ChainTooDeep { path: PathBuf, limit: usize },

    #[error("{}: format '{given}' was requested but the file is {found}", path.display())]
    FormatMismatch {
        path: PathBuf,
        given: String,
        found: &'static str,
    },

    #[error("{}: unknown image format '{format}' (expected qcow2 or raw)", path.display())]
    UnknownFormat { path: PathBuf, format: String },

    /// Another process (a running QEMU) holds the image.
    #[error("{}: {detail}", path.display())]
    Locked { path: PathBuf, detail: String },

    /// The metadata a write would rely on is corrupt: nothing was written.
    #[error(
        "{}: refusing to write: the image's metadata is corrupt: {detail}; `cowshed check {}` \
         shows what is wrong, `cowshed check -r all {}` repairs what can be repaired",
        path.display(), path.display(), path.display()
    )]
    Corrupt { path: PathBuf, detail: String },

    /// Replacing the file would change what other images read through it.
    #[error(
        "{}: is the backing file of {}: replacing it would corrupt every image that grows on it \
         (--force replaces it anyway)",
        path.display(),
        dependents.iter().map(|d| format!("'{}'", d.display())).collect::<Vec<_>>().join(", ")
    )]
    HasDependents {
        path: PathBuf,
        dependents: Vec<PathBuf>,
    },

    /// A defined virtual machine uses the file: changing it would change
    /// (or, moved, take away) a disk of that machine.
    #[error(
        "{}: is used by libvirt domain {users}: a defined domain, even shut off, would boot from \
         the changed image (--force-vms goes ahead anyway)",
        path.display()
    )]
    UsedByVm { path: PathBuf, users: String },

    /// A libvirt connection the user named could not be read, so whether a
    /// defined virtual machine uses the file is unknown.
    #[error(
        "{}: refusing to write: the check for libvirt domains using it could not be made \
         ({detail}); --force-vms goes ahead without it",
        path.display()
    )]
    VmCheckFailed { path: PathBuf, detail: String },

    /// qemu-img's exit 63: the format has no consistency check.
    #[error("{}: This image format ({format}) does not support checks", path.display())]
    CheckUnsupported { path: PathBuf, format: &'static str },

    /// The operation would not fit in the target's file system.
    #[error(
        "{}: not enough free space: the operation needs {} more but the file system has {} free",
        path.display(),
        humansize::format_size(*needed, humansize::BINARY),
        humansize::format_size(*available, humansize::BINARY)
    )]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },

    #[error("operation cancelled")]
    Cancelled,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Attach a path to `io::Result`s without repeating the closure everywhere.
pub trait IoContext<T> {
    fn at(self, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
