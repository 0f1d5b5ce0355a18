//! A name for a file that is the same on every host that sees it, so the
//! client can show a file on shared storage once with all its hosts.
//!
//! Device and inode alone are not enough: device numbers are per host.
//! On an NFS mount the inode is the server's fileid, the same on every
//! client, and the mount's source (`server:/export`) names the server's
//! file system: `nfs SOURCE INODE`. On a local file system, `/etc/machine-id`
//! names the machine, so two "hosts" that are really this one machine (two
//! ssh aliases, the tests' two ports) match too: `local MACHINE-ID DEV
//! INODE`. A host without a machine id gives no identity for its local
//! files: never merged, never wrongly merged.

use std::collections::HashMap;

/// What /proc/self/mountinfo says about one mounted device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    fstype: String,
    source: String,
}

/// The identities of files on this host; built once per forest sent.
pub struct Identities {
    machine_id: Option<String>,
    /// By device number (major, minor).
    mounts: HashMap<(u64, u64), Mount>,
}

impl Identities {
    pub fn read() -> Identities {
        let machine_id = ["/etc/machine-id", "/var/lib/dbus/machine-id"]
            .iter()
            .find_map(|p| {
                let id = std::fs::read_to_string(p).ok()?;
                let id = id.trim();
                (!id.is_empty()).then(|| id.to_string())
            });
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default();
        Identities { machine_id, mounts }
    }

    /// The identity of the file with device `dev` and inode `ino`.
    pub fn of(&self, dev: u64, ino: u64) -> Option<String> {
        let major = u64::from(libc::major(dev));
        let minor = u64::from(libc::minor(dev));
        match self.mounts.get(&(major, minor)) {
            Some(m) if m.fstype == "nfs" || m.fstype == "nfs4" => {
                Some(format!("nfs {} {ino}", m.source))
            }
            _ => self
                .machine_id
                .as_ref()
                .map(|id| format!("local {id} {dev} {ino}")),
        }
    }
}

/// Give this machine's records their identity, so that a file a remote
/// host's agent also sends (shared storage, or that host being this
/// machine) is grafted onto this machine's node rather than shown twice.
pub fn name_local(records: &mut [crate::catalog::ImageRecord]) {
    let ids = Identities::read();
    for r in records.iter_mut().filter(|r| r.host.is_none()) {
        r.identity = ids.of(r.dev_ino.0, r.dev_ino.1);
    }
}

/// `/proc/self/mountinfo`: `ID PARENT MAJOR:MINOR ROOT POINT OPTS
/// [TAGS...] - FSTYPE SOURCE SUPEROPTS`, one mount a line.
fn parse_mountinfo(text: &str) -> HashMap<(u64, u64), Mount> {
    let mut mounts = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dev) = fields.get(2) else { continue };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) else {
            continue;
        };
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(fstype), Some(source)) = (fields.get(dash + 1), fields.get(dash + 2)) else {
            continue;
        };
        mounts.insert(
            (major, minor),
            Mount {
                fstype: fstype.to_string(),
                source: source.to_string(),
            },
        );
    }
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs_files_are_named_by_the_server_local_ones_by_the_machine() {
        let text = "36 25 0:32 / /srv/images rw,relatime shared:1 - nfs4 \
                    filer:/export/images rw,vers=4.2\n\
                    24 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n\
                    garbage\n";
        let ids = Identities {
            machine_id: Some("abc".into()),
            mounts: parse_mountinfo(text),
        };
        let nfs = libc::makedev(0, 32);
        let disk = libc::makedev(8, 1);
        assert_eq!(
            ids.of(nfs, 77).as_deref(),
            Some("nfs filer:/export/images 77")
        );
        assert_eq!(
            ids.of(disk, 77),
            Some(format!("local abc {disk} 77")),
            "a local file: this machine, device and inode"
        );
        let nameless = Identities {
            machine_id: None,
            mounts: parse_mountinfo(text),
        };
        assert_eq!(nameless.of(disk, 77), None);
        assert!(nameless.of(nfs, 77).is_some());
    }
}
