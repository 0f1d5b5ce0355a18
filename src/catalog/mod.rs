//! What images exist under the scanned roots and how they relate. The
//! catalog reads headers (through the engine's probe) and file metadata; it
//! never writes an image.

pub mod doctor;
pub mod forest;
pub mod identity;
pub mod scan;
pub mod watch;

use std::path::PathBuf;
use std::time::SystemTime;

use crate::engine::{HeaderSummary, LockState};

/// Holder discovery lives in the engine, beside the locks it explains.
pub use crate::engine::holders::{self, Holder};
pub use forest::{Flag, Forest, Node, NodeId, Subtree, TreeSpace};
pub use scan::{scan, ScanEvent};
pub use watch::{CatalogEvent, SizeHistory, WatchMode, WatchOptions, Watcher};

/// Sizes from `stat`: cheap enough for the UI's live refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sizes {
    pub virtual_size: u64,
    /// st_blocks × 512: what the image costs on disk.
    pub allocated: u64,
    /// st_size.
    pub apparent: u64,
}

/// One image file found by a scan.
#[derive(Debug, Clone)]
pub struct ImageRecord {
    /// As reached from the root that was scanned.
    pub path: PathBuf,
    /// Canonical path: the identity of the file (links shown once). On
    /// another host, `HOST:` and the canonical path there.
    pub key: PathBuf,
    /// The host the file is on, as the root named it (`host1`,
    /// `user@host1`); `None`: this machine. `path` is a path there.
    pub host: Option<String>,
    pub dev_ino: (u64, u64),
    /// Header facts; `None` when the header could not be read (`error` says
    /// why).
    pub summary: Option<HeaderSummary>,
    pub error: Option<String>,
    pub sizes: Sizes,
    pub mtime: Option<SystemTime>,
    /// Birth time (statx), where the file system records it: an overlay
    /// born before its base was last modified may read changed data.
    pub created: Option<SystemTime>,
    /// Permission bits (st_mode & 0o7777): a base without write bits is
    /// protected.
    pub mode: u32,
    pub lock: LockState,
    pub holders: Vec<Holder>,
    /// Another host's file: its name on every host that sees it (shared
    /// storage), as its agent said (`remote::identity`). `None` here.
    pub identity: Option<String>,
    /// Another host's file: the defined domains there that use it (this
    /// machine's own come from the local inventory, by `dev_ino`).
    pub vms: Vec<crate::engine::preflight::VmUser>,
    /// Other hosts that see the same file (shared storage), with its path
    /// there: the row is shown once, on `host`, and jobs run there.
    pub seen_on: Vec<(String, PathBuf)>,
}

impl ImageRecord {
    /// Where the file is, as a user names it: `host1:/srv/a.qcow2` on
    /// another host, the path here.
    pub fn location(&self) -> String {
        match &self.host {
            Some(h) => format!("{h}:{}", self.path.display()),
            None => self.path.display().to_string(),
        }
    }

    /// Every host that sees the file, `host` first (`host1+host2`;
    /// `local+host1` for a file of this machine another host sees too),
    /// or `None` for this machine's own.
    pub fn hosts_label(&self) -> Option<String> {
        let first = match self.host.as_deref() {
            Some(h) => h,
            None if self.seen_on.is_empty() => return None,
            None => "local",
        };
        let mut label = first.to_string();
        for (h, _) in &self.seen_on {
            label.push('+');
            label.push_str(h);
        }
        Some(label)
    }
}
