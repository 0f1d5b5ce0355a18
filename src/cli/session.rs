//! What every command shares beyond its own flags: `--readonly` (also the
//! config's `readonly`), the libvirt connections whose defined domains guard
//! the images (`--connect`, the config's `libvirt`), and `--force-vms`. The
//! config file is read only when a command needs one of these: a command
//! that neither writes nor looks at libvirt runs whatever the file holds.

use std::path::PathBuf;

use color_eyre::eyre::eyre;

use crate::engine::preflight::VmUsers;
use crate::inventory::{Connections, Inventory};
use crate::tui::Config;

#[derive(Debug, Clone)]
pub struct Session {
    pub config: Option<PathBuf>,
    pub readonly: bool,
    pub connect: Vec<String>,
    pub force_vms: bool,
}

impl Session {
    fn file(&self) -> color_eyre::Result<Config> {
        Config::load(self.config.as_deref()).map_err(|e| eyre!(e))
    }

    /// The connections named on the command line, else in the config, else
    /// the default set.
    pub fn connections(&self) -> color_eyre::Result<Connections> {
        if !self.connect.is_empty() {
            return Ok(Connections::from_named(&self.connect));
        }
        Ok(Connections::from_named(&self.file()?.libvirt))
    }

    /// The defined domains, read now, as the engine's pre-flight step takes
    /// them. A connection the user named that cannot be read is said here
    /// too, before the refusal that follows from it.
    pub fn vm_users(&self) -> color_eyre::Result<VmUsers> {
        let inventory = Inventory::read(&self.connections()?);
        for (uri, why) in &inventory.unreadable {
            eprintln!("cowshed: libvirt connection {uri} could not be read: {why}");
        }
        Ok(inventory.vm_users(self.force_vms))
    }

    /// Refuse a command that would write, under `--readonly` or the
    /// config's `readonly = true`.
    pub fn ensure_writable(&self, what: &str) -> color_eyre::Result<()> {
        if self.readonly || self.file()?.readonly {
            return Err(eyre!(
                "{what} would change files, and cowshed runs read-only (--readonly, or \
                 `readonly = true` in the config): nothing was written"
            ));
        }
        Ok(())
    }
}
