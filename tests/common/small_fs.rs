//! A small file system for free-space tests: a size-limited tmpfs mounted
//! in a private user and mount namespace (`unshare -rm`), so no root and no
//! cleanup are needed. Where the kernel forbids unprivileged namespaces the
//! caller is told, and the test says it could not run.

use std::path::Path;
use std::process::{Command, Output};

/// Run `script` (sh) in `dir` with a `mib`-MiB tmpfs mounted on
/// `dir/small`. Files the script writes outside `small/` stay visible
/// afterwards. None when namespaces are unavailable here.
pub fn run_with_small_fs(dir: &Path, mib: u64, script: &str) -> Option<Output> {
    std::fs::create_dir_all(dir.join("small")).unwrap();
    let probe = Command::new("unshare")
        .args(["-rm", "true"])
        .output()
        .ok()?;
    if !probe.status.success() {
        eprintln!(
            "cannot run: unshare -rm refused ({}); free-space test skipped",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        return None;
    }
    let full = format!("set -e\nmount -t tmpfs -o size={mib}m tmpfs small\n{script}");
    Some(
        Command::new("unshare")
            .args(["-rm", "sh", "-c", &full])
            .current_dir(dir)
            .output()
            .expect("spawn unshare"),
    )
}
