//! Which processes hold an image open, from /proc: QEMU's OFD locks carry
//! no pid, so the open file descriptors are matched by device and inode.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm`, e.g. `qemu-system-x86`.
    pub command: String,
}

/// Processes holding any of `wanted` (device, inode) open. One pass over
/// /proc; processes we may not inspect are skipped.
pub fn find_holders(wanted: &HashSet<(u64, u64)>) -> HashMap<(u64, u64), Vec<Holder>> {
    let mut out: HashMap<(u64, u64), Vec<Holder>> = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut seen = HashSet::new();
        for fd in fds.flatten() {
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            let id = (m.dev(), m.ino());
            if wanted.contains(&id) && seen.insert(id) {
                let command = fs::read_to_string(p.path().join("comm"))
                    .map(|s| s.trim_end().to_string())
                    .unwrap_or_default();
                out.entry(id).or_default().push(Holder { pid, command });
            }
        }
    }
    out
}
