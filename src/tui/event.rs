//! The one channel the UI loop waits on: terminal input, catalog updates,
//! details, job events and growth reports all arrive here as [`Event`]s. The
//! tick is not a thread: the loop waits with a timeout only while something
//! moves (see `App::is_moving`), so an idle UI sleeps in `recv`.

use std::path::PathBuf;
use std::thread;

use crossbeam_channel::Sender;
use ratatui::crossterm::event as ct;

use super::worker::{BackingProbe, CatalogUpdate, Details};
use crate::catalog::Sizes;
use crate::jobs::JobEvent;

#[derive(Debug)]
pub enum Event {
    /// A key, mouse or resize event from the terminal.
    Input(ct::Event),
    Catalog(CatalogUpdate),
    Details(Box<Details>),
    /// Whether a typed backing path is an image (the rebase picker).
    BackingProbe(BackingProbe),
    Job(JobEvent),
    /// How an image grows (from the catalog's watcher): its allocated
    /// bytes, the rate in bytes per second over the last seconds, and the
    /// bytes grown in each recent second, oldest first (the sparkline).
    Growth {
        key: PathBuf,
        allocated: u64,
        rate: f64,
        history: Vec<u64>,
    },
    /// An image's sizes changed (a guest writes). Patched into the forest
    /// in place: rebuilding a 10,000-image forest on every write would cost
    /// a core while a guest writes.
    Sizes {
        key: PathBuf,
        sizes: Sizes,
    },
    /// The defined libvirt domains, read again (see `worker::spawn_inventory`).
    Inventory(std::sync::Arc<crate::inventory::Inventory>),
    /// Another host's agent listed the snapshots and bitmaps of the image
    /// `key` (for the dialog that asked), or why it could not.
    Listing {
        key: PathBuf,
        listing: Result<crate::remote::protocol::WireListing, String>,
    },
    /// Time passes while something moves (a job runs, an image grows).
    Tick,
}

impl From<JobEvent> for Event {
    fn from(e: JobEvent) -> Self {
        Event::Job(e)
    }
}

/// Read terminal events on a thread of their own and forward them. The
/// thread ends when the receiver is gone or the terminal fails.
pub fn spawn_input(tx: Sender<Event>) -> std::io::Result<()> {
    thread::Builder::new()
        .name("cowshed-input".into())
        .spawn(move || loop {
            match ct::read() {
                Ok(ev) => {
                    if tx.send(Event::Input(ev)).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        })?;
    Ok(())
}
