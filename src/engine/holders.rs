//! Which processes hold an image open, from /proc: QEMU's OFD locks carry
//! no pid, so the open file descriptors are matched by device and inode.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// `/proc/PID/comm`, e.g. `qemu-system-x86`.
    pub command: String,
    /// One of its descriptors of the file is open for writing (from
    /// `/proc/PID/fdinfo`): QEMU opens the images it writes read-write and
    /// backing files read-only, so this tells the writer among readers.
    pub writable: bool,
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
        // Per file: the index of its holder entry for this process.
        let mut seen: HashMap<(u64, u64), usize> = HashMap::new();
        for fd in fds.flatten() {
            let Ok(m) = fs::metadata(fd.path()) else {
                continue;
            };
            let id = (m.dev(), m.ino());
            if !wanted.contains(&id) {
                continue;
            }
            let writable = opened_for_writing(&p.path().join("fdinfo").join(fd.file_name()));
            let list = out.entry(id).or_default();
            match seen.get(&id) {
                Some(&i) => list[i].writable |= writable,
                None => {
                    let command = fs::read_to_string(p.path().join("comm"))
                        .map(|s| s.trim_end().to_string())
                        .unwrap_or_default();
                    seen.insert(id, list.len());
                    list.push(Holder {
                        pid,
                        command,
                        writable,
                    });
                }
            }
        }
    }
    out
}

/// Whether the descriptor described by `fdinfo` (`/proc/PID/fdinfo/FD`)
/// was opened for writing: its `flags:` line holds the open flags in
/// octal, the access mode in the low two bits.
fn opened_for_writing(fdinfo: &Path) -> bool {
    let Ok(text) = fs::read_to_string(fdinfo) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|flags| flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_descriptor_opened_read_write_is_told_from_a_read_only_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, b"x").expect("write");
        let ro = fs::File::open(&path).expect("open");
        let rw = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open rw");
        let info = |f: &fs::File| {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/self/fdinfo/{}", f.as_raw_fd()))
        };
        assert!(!opened_for_writing(&info(&ro)));
        assert!(opened_for_writing(&info(&rw)));
        assert!(!opened_for_writing(Path::new("/proc/self/fdinfo/none")));
    }
}
