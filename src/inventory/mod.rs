//! What uses an image from outside the file system: the domains libvirt
//! has defined, running or not, read through `virsh` (libvirt's own client)
//! and matched to files by device and inode, so that every spelling of a
//! path and every bind mount counts.
//!
//! `virsh` rather than the `virt` crate: the crate links libvirt's client
//! library, so the cowshed binary would not start on a host without
//! libvirt and building it would need libvirt's -dev package; `virsh`
//! speaks the same API (its `dumpxml` is virDomainGetXMLDesc) over every
//! URI libvirt knows, and where it is missing, only this feature is.

mod domain;
mod virsh;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use domain::{parse_domain, DiskXml, DomainXml, SourceXml};

use crate::engine::preflight::{VmUser, VmUsers};

/// The connections read when the user names none, each only when its
/// daemon's socket exists: nothing is started just to look.
pub const DEFAULT_CONNECTIONS: [&str; 2] = ["qemu:///system", "qemu:///session"];

/// How often the domains are read again while a view is live (the TUI, a
/// remote host's agent): a domain defined, started or undefined shows
/// within this time. Modest: each read runs virsh once per connection and
/// twice per domain.
pub const REFRESH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Which libvirt connections to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connections {
    pub uris: Vec<String>,
    /// Named by the user (`--connect`, the config's `libvirt`): one that
    /// cannot be read is reported, and writes are refused until the user
    /// says `--force-vms`. The default set skips what is not there.
    pub explicit: bool,
}

impl Connections {
    /// The URIs the user named, or the default set when none.
    pub fn from_named(named: &[String]) -> Connections {
        if named.is_empty() {
            Connections {
                uris: DEFAULT_CONNECTIONS.iter().map(|s| s.to_string()).collect(),
                explicit: false,
            }
        } else {
            Connections {
                uris: named.to_vec(),
                explicit: true,
            }
        }
    }
}

/// Why a connection could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReadError {
    #[error("virsh is not installed (Debian: libvirt-clients)")]
    NoVirsh,
    #[error("virsh {command}: {message}")]
    Failed { command: String, message: String },
    #[error("virsh {command} gave no answer within {seconds} s")]
    TimedOut { command: String, seconds: u64 },
    #[error("domain {uuid}: {message}")]
    BadXml { uuid: String, message: String },
}

/// One file in a disk's chain, as libvirt names it, with its identity when
/// it exists here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFile {
    pub path: PathBuf,
    pub id: Option<(u64, u64)>,
}

/// A disk of a domain: its own source first, then the backing chain libvirt
/// records for it (a running domain's; often none for one shut off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The guest's device name (vda, sdb, ...).
    pub target: String,
    /// disk, cdrom, floppy, lun.
    pub device: String,
    pub chain: Vec<DiskFile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: String,
    /// As virsh words it: running, paused, shut off, ...
    pub state: String,
    pub connection: String,
    pub disks: Vec<Disk>,
}

impl Domain {
    pub fn user(&self) -> VmUser {
        VmUser {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            state: self.state.clone(),
            connection: self.connection.clone(),
        }
    }

    /// Whether any of its disks' files is the file `id`.
    pub fn uses(&self, id: (u64, u64)) -> bool {
        self.disks
            .iter()
            .flat_map(|d| &d.chain)
            .any(|f| f.id == Some(id))
    }
}

/// Every domain of the connections read, and the ones that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub domains: Vec<Domain>,
    /// Connections the user named that could not be read: (URI, why).
    pub unreadable: Vec<(String, String)>,
    /// The connections that answered.
    pub read: Vec<String>,
}

impl Inventory {
    /// Read every connection (each domain's state and XML; volumes resolved
    /// to their paths). Blocking: call it off the UI thread.
    pub fn read(conns: &Connections) -> Inventory {
        let mut inv = Inventory::default();
        for uri in &conns.uris {
            if !conns.explicit && !virsh::daemon_listening(uri) {
                continue;
            }
            match virsh::read_connection(uri) {
                Ok(domains) => {
                    inv.domains.extend(domains);
                    inv.read.push(uri.clone());
                }
                Err(e) if conns.explicit => inv.unreadable.push((uri.clone(), e.to_string())),
                Err(_) => {}
            }
        }
        inv
    }

    /// The domains that use the file `id`, in the order read.
    pub fn users_of(&self, id: (u64, u64)) -> impl Iterator<Item = &Domain> {
        self.domains.iter().filter(move |d| d.uses(id))
    }

    /// The domains that use the file at `path` (stat'ed).
    pub fn users_of_path(&self, path: &Path) -> Vec<&Domain> {
        match std::fs::metadata(path) {
            Ok(m) => self.users_of((m.dev(), m.ino())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// What the engine's pre-flight step checks before a write.
    pub fn vm_users(&self, force: bool) -> VmUsers {
        let mut by_file: HashMap<(u64, u64), Vec<VmUser>> = HashMap::new();
        for d in &self.domains {
            let mut ids: Vec<(u64, u64)> = d
                .disks
                .iter()
                .flat_map(|disk| &disk.chain)
                .filter_map(|f| f.id)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                by_file.entry(id).or_default().push(d.user());
            }
        }
        VmUsers {
            by_file,
            unreadable: self.unreadable.clone(),
            force,
        }
    }
}

/// Build a domain from its parsed XML: each source stat'ed for its identity.
fn domain_from_xml(xml: DomainXml, state: String, connection: &str) -> Domain {
    let disks = xml
        .disks
        .into_iter()
        .map(|d| Disk {
            target: d.target,
            device: d.device,
            chain: d
                .chain
                .into_iter()
                .filter_map(|s| match s {
                    SourceXml::Path(p) => Some(p),
                    SourceXml::Volume { .. } | SourceXml::Other => None,
                })
                .map(|path| DiskFile {
                    id: std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino())),
                    path,
                })
                .collect(),
        })
        .collect();
    Domain {
        name: xml.name,
        uuid: xml.uuid,
        state,
        connection: connection.to_string(),
        disks,
    }
}
