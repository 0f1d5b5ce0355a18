//! What every command shares beyond its own flags: `--readonly` (also the
//! config's `readonly`), the libvirt connections whose defined domains guard
//! the images (`--connect`, the config's `libvirt`), and `--force-vms`.

use std::path::Path;

use color_eyre::eyre::eyre;

use crate::engine::preflight::VmUsers;
use crate::inventory::{Connections, Inventory};
use crate::tui::Config;

#[derive(Debug, Clone)]
pub struct Session {
    pub readonly: bool,
    pub connections: Connections,
    pub force_vms: bool,
}

impl Session {
    /// The command line's choices, over the config file's.
    pub fn new(
        config: Option<&Path>,
        readonly: bool,
        connect: &[String],
        force_vms: bool,
    ) -> color_eyre::Result<Session> {
        let file = Config::load(config).map_err(|e| eyre!(e))?;
        let named = if connect.is_empty() {
            &file.libvirt
        } else {
            connect
        };
        Ok(Session {
            readonly: readonly || file.readonly,
            connections: Connections::from_named(named),
            force_vms,
        })
    }

    /// The defined domains, read now, as the engine's pre-flight step takes
    /// them. A connection the user named that cannot be read is said here
    /// too, before the refusal that follows from it.
    pub fn vm_users(&self) -> VmUsers {
        let inventory = Inventory::read(&self.connections);
        for (uri, why) in &inventory.unreadable {
            eprintln!("cowshed: libvirt connection {uri} could not be read: {why}");
        }
        inventory.vm_users(self.force_vms)
    }

    /// Refuse a command that would write, under `--readonly`.
    pub fn ensure_writable(&self, what: &str) -> color_eyre::Result<()> {
        if self.readonly {
            return Err(eyre!(
                "{what} would change files, and cowshed runs read-only (--readonly, or \
                 `readonly = true` in the config): nothing was written"
            ));
        }
        Ok(())
    }
}
