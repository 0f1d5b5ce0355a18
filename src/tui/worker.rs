//! The UI's reading threads, so the UI thread never touches a file:
//!
//! - the **catalog worker** owns the scanned records, runs scans (streamed),
//!   re-probes single files on request, and rebuilds the [`Forest`] itself:
//!   `Forest::build` may read backing files outside the roots, which is I/O;
//! - the **inspector** computes the details of the selected image (info,
//!   chain, each layer's share of the disk from block status), always for
//!   the latest request only.
//!
//! Both only read images; engine operations that write run as jobs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, unbounded, Receiver, Sender};

use super::event::Event;
use crate::catalog::scan::{read_record, scan};
use crate::catalog::{
    CatalogEvent, Forest, ImageRecord, ScanEvent, SizeHistory, WatchOptions, Watcher,
};
use crate::engine::{self, Chain, ImageInfo};

/// While a scan streams or files change, the forest is rebuilt and sent at
/// most this often.
const REBUILD_EVERY: Duration = Duration::from_millis(100);
/// While an image grows, its rate and sparkline are re-sent this often, so
/// they also fall back to zero when the writes stop.
const GROWTH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum CatalogCmd {
    Rescan,
    /// Re-stat and re-probe one file (a clone just made, a file that
    /// changed): added, updated, or removed if it is gone.
    Probe(PathBuf),
}

/// A new forest from the catalog worker.
#[derive(Debug, Clone)]
pub struct CatalogUpdate {
    pub forest: Arc<Forest>,
    /// A scan is still streaming results.
    pub scanning: bool,
    /// The last command the worker has handled, so the UI knows when its
    /// requests are reflected.
    pub seq: u64,
    /// Problems met by the current scan (unreadable directories, ...).
    pub errors: Vec<(PathBuf, String)>,
}

pub struct CatalogHandle {
    tx: Sender<(u64, CatalogCmd)>,
    sent: u64,
}

impl CatalogHandle {
    /// Start the worker for `roots`; updates go to `events`.
    /// With `live`, a [`Watcher`] keeps the records current between scans
    /// and growth rates are reported.
    pub fn start(
        roots: Vec<PathBuf>,
        live: bool,
        events: Sender<Event>,
    ) -> std::io::Result<CatalogHandle> {
        let (tx, rx) = unbounded();
        thread::Builder::new()
            .name("cowshed-catalog".into())
            .spawn(move || catalog_worker(&roots, live, &rx, &events))?;
        Ok(CatalogHandle { tx, sent: 0 })
    }

    /// Send a command; returns its sequence number.
    pub fn send(&mut self, cmd: CatalogCmd) -> u64 {
        self.sent += 1;
        let _ = self.tx.send((self.sent, cmd));
        self.sent
    }

    pub fn last_sent(&self) -> u64 {
        self.sent
    }
}

struct Catalog {
    /// By key (canonical path): a 10,000-image scan upserts in O(1) each.
    records: HashMap<PathBuf, ImageRecord>,
    /// Keys seen by the running scan: at its end, records not seen again
    /// are gone. Old records stay until then so a rescan does not blank
    /// the screen.
    seen: std::collections::HashSet<PathBuf>,
    errors: Vec<(PathBuf, String)>,
    seq: u64,
    scanning: bool,
}

impl Catalog {
    fn publish(&self, events: &Sender<Event>) {
        let forest = Forest::build(self.records.values().cloned().collect());
        let _ = events.send(Event::Catalog(CatalogUpdate {
            forest: Arc::new(forest),
            scanning: self.scanning,
            seq: self.seq,
            errors: self.errors.clone(),
        }));
    }

    fn upsert(&mut self, r: ImageRecord) {
        self.records.insert(r.key.clone(), r);
    }
}

fn catalog_worker(
    roots: &[PathBuf],
    live: bool,
    cmds: &Receiver<(u64, CatalogCmd)>,
    events: &Sender<Event>,
) {
    let mut cat = Catalog {
        records: HashMap::new(),
        seen: std::collections::HashSet::new(),
        errors: Vec::new(),
        seq: 0,
        scanning: false,
    };
    let mut scan_rx: Receiver<ScanEvent> = never();
    let (watch_tx, mut watch_rx) = unbounded::<CatalogEvent>();
    // Kept alive for the worker's lifetime; dropping it stops its thread.
    let watcher = live.then(|| Watcher::start(roots.to_vec(), WatchOptions::default(), watch_tx));
    let mut histories: HashMap<PathBuf, SizeHistory> = HashMap::new();
    let mut growth_tick: Receiver<Instant> = never();
    let mut publish_due: Receiver<Instant> = never();
    let mut last_publish = Instant::now();
    loop {
        let mut publish = false;
        select! {
            recv(cmds) -> msg => {
                let Ok((seq, cmd)) = msg else { return };
                cat.seq = seq;
                match cmd {
                    CatalogCmd::Rescan => {
                        cat.seen.clear();
                        cat.errors.clear();
                        cat.scanning = true;
                        scan_rx = start_scan(roots.to_vec());
                    }
                    CatalogCmd::Probe(path) => match read_record(&path) {
                        Ok(Some(r)) => {
                            if let Some(w) = &watcher {
                                w.track(&r);
                            }
                            cat.upsert(r);
                        }
                        Ok(None) => cat.records.retain(|_, r| r.path != path),
                        Err(message) => {
                            cat.records.retain(|_, r| r.path != path);
                            if path.exists() {
                                cat.errors.push((path, message));
                            }
                        }
                    },
                }
                // Answers to commands go out at once: the UI waits on them.
                cat.publish(events);
                last_publish = Instant::now();
            }
            recv(scan_rx) -> msg => match msg {
                Ok(ScanEvent::Image(r)) => {
                    if let Some(w) = &watcher {
                        w.track(&r);
                    }
                    histories
                        .entry(r.key.clone())
                        .or_default()
                        .push(Instant::now(), r.sizes.allocated);
                    cat.seen.insert(r.key.clone());
                    cat.upsert(*r);
                    publish = true;
                }
                Ok(ScanEvent::Error { path, message }) => cat.errors.push((path, message)),
                Ok(ScanEvent::Done) | Err(_) => {
                    scan_rx = never();
                    cat.scanning = false;
                    let seen = std::mem::take(&mut cat.seen);
                    cat.records.retain(|k, _| seen.contains(k));
                    histories.retain(|k, _| seen.contains(k));
                    cat.publish(events);
                    last_publish = Instant::now();
                }
            },
            recv(watch_rx) -> msg => {
                let Ok(ev) = msg else {
                    watch_rx = never();
                    continue;
                };
                match ev {
                    CatalogEvent::SizesChanged { key, sizes } => {
                        if let Some(r) = cat.records.get_mut(&key) {
                            r.sizes = sizes;
                            histories
                                .entry(key.clone())
                                .or_default()
                                .push(Instant::now(), sizes.allocated);
                            let _ = events.send(Event::Sizes {
                                key: key.clone(),
                                sizes,
                            });
                            send_growth(events, &histories, &key);
                            growth_tick = after(GROWTH_EVERY);
                        }
                    }
                    CatalogEvent::Appeared(r) | CatalogEvent::HeaderChanged(r) => {
                        histories
                            .entry(r.key.clone())
                            .or_default()
                            .push(Instant::now(), r.sizes.allocated);
                        cat.upsert(*r);
                        publish = true;
                    }
                    CatalogEvent::Vanished { path } => {
                        cat.records.retain(|k, r| *k != path && r.path != path);
                        histories.remove(&path);
                        publish = true;
                    }
                    CatalogEvent::PollingOnly { reason } => {
                        let root = roots.first().cloned().unwrap_or_default();
                        cat.errors
                            .push((root, format!("live updates by polling only: {reason}")));
                        publish = true;
                    }
                }
            }
            recv(growth_tick) -> _ => {
                let now = Instant::now();
                let mut moving = false;
                for (key, h) in &histories {
                    if h.sparkline_at(now).iter().any(|&b| b > 0) {
                        moving = true;
                        send_growth(events, &histories, key);
                    }
                }
                growth_tick = if moving { after(GROWTH_EVERY) } else { never() };
            }
            recv(publish_due) -> _ => {
                publish_due = never();
                cat.publish(events);
                last_publish = Instant::now();
            }
        }
        // Coalesce bursts (a scan streaming, a guest writing): at most one
        // rebuild per REBUILD_EVERY, and the last change always goes out.
        if publish {
            let since = last_publish.elapsed();
            if since >= REBUILD_EVERY {
                cat.publish(events);
                last_publish = Instant::now();
                publish_due = never();
            } else {
                publish_due = after(REBUILD_EVERY - since);
            }
        }
    }
}

fn send_growth(events: &Sender<Event>, histories: &HashMap<PathBuf, SizeHistory>, key: &Path) {
    let Some(h) = histories.get(key) else {
        return;
    };
    let now = Instant::now();
    let _ = events.send(Event::Growth {
        key: key.to_path_buf(),
        allocated: h.latest().unwrap_or(0),
        rate: h.rate_at(now),
        history: h.sparkline_at(now),
    });
}

/// Run a scan on a thread of its own and stream its events. Dropping the
/// receiver (a newer rescan) makes the old scan's sends fail quietly.
fn start_scan(roots: Vec<PathBuf>) -> Receiver<ScanEvent> {
    let (tx, rx) = unbounded();
    let threads = thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
    let spawned = thread::Builder::new()
        .name("cowshed-scan".into())
        .spawn(move || scan(&roots, threads, &tx));
    match spawned {
        Ok(_) => rx,
        // No thread, no scan: report it as a finished empty scan instead of
        // hanging in "scanning".
        Err(_) => {
            let (tx, rx) = unbounded();
            let _ = tx.send(ScanEvent::Done);
            rx
        }
    }
}

/// What the details pane shows about one image beyond its catalog record.
#[derive(Debug, Clone)]
pub struct Details {
    /// The record's key (canonical path) the details belong to.
    pub key: PathBuf,
    pub info: Result<ImageInfo, String>,
    /// Layers top first, as the chain resolved them.
    pub chain: Vec<PathBuf>,
    /// Guest bytes served by each layer (index = depth), from block status.
    pub served: Vec<u64>,
    /// Guest bytes no layer has: read as zeros.
    pub empty: u64,
    /// Why the chain could not be opened or mapped.
    pub chain_error: Option<String>,
}

enum InspectRequest {
    /// The details of the image with this key, found at this path.
    Details(PathBuf, PathBuf),
    /// Is the typed backing name (resolved to the path) a usable image?
    Backing {
        image_key: PathBuf,
        name: String,
        resolved: PathBuf,
    },
}

/// The answer to [`InspectHandle::probe_backing`].
#[derive(Debug, Clone)]
pub struct BackingProbe {
    pub image_key: PathBuf,
    pub name: String,
    /// The image's format, or why it cannot be a backing file.
    pub result: Result<engine::Format, String>,
}

pub struct InspectHandle {
    tx: Sender<InspectRequest>,
}

impl InspectHandle {
    pub fn start(events: Sender<Event>) -> std::io::Result<InspectHandle> {
        let (tx, rx) = unbounded::<InspectRequest>();
        thread::Builder::new()
            .name("cowshed-inspect".into())
            .spawn(move || {
                while let Ok(mut req) = rx.recv() {
                    // Moving through the tree asks for many details; only
                    // the last is still wanted. Probes are all answered.
                    while matches!(req, InspectRequest::Details(..)) {
                        match rx.try_recv() {
                            Ok(newer) => req = newer,
                            Err(_) => break,
                        }
                    }
                    let event = match req {
                        InspectRequest::Details(key, path) => {
                            Event::Details(Box::new(inspect(&key, &path)))
                        }
                        InspectRequest::Backing {
                            image_key,
                            name,
                            resolved,
                        } => Event::BackingProbe(BackingProbe {
                            image_key,
                            name,
                            result: probe_backing(&resolved),
                        }),
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            })?;
        Ok(InspectHandle { tx })
    }

    /// Ask for the details of the image with `key`, found at `path`.
    pub fn request(&self, key: PathBuf, path: PathBuf) {
        let _ = self.tx.send(InspectRequest::Details(key, path));
    }

    /// Ask whether `resolved` (typed as `name` for the image `image_key`)
    /// can be a backing file; answered with [`Event::BackingProbe`].
    pub fn probe_backing(&self, image_key: PathBuf, name: String, resolved: PathBuf) {
        let _ = self.tx.send(InspectRequest::Backing {
            image_key,
            name,
            resolved,
        });
    }
}

/// A typed backing path is accepted only if it is an image cowshed can read
/// through: qcow2, or raw named as such (as the scan decides), not on a
/// pseudo file system, its own chain intact. The format comes from here.
pub fn probe_backing(path: &Path) -> Result<engine::Format, String> {
    use nix::sys::statfs::{statfs, PROC_SUPER_MAGIC, SYSFS_MAGIC};
    if let Ok(st) = statfs(path) {
        let t = st.filesystem_type();
        if t == PROC_SUPER_MAGIC || t == SYSFS_MAGIC {
            return Err("it is a kernel file (/proc, /sys), not a disk image".into());
        }
    }
    let record = read_record(path)?.ok_or_else(|| {
        "it is not a disk image cowshed recognises (qcow2, or raw named .raw or .img)".to_string()
    })?;
    if let Some(e) = record.error {
        return Err(e);
    }
    let format = record
        .summary
        .map(|s| s.format)
        .ok_or_else(|| "its header could not be read".to_string())?;
    Chain::open(path, Some(format)).map_err(|e| e.to_string())?;
    Ok(format)
}

/// Compute the details of one image (read only).
pub fn inspect(key: &Path, path: &Path) -> Details {
    let mut d = Details {
        key: key.to_path_buf(),
        info: engine::info(path, None).map_err(|e| e.to_string()),
        chain: Vec::new(),
        served: Vec::new(),
        empty: 0,
        chain_error: None,
    };
    let chain = match Chain::open(path, None) {
        Ok(c) => c,
        Err(e) => {
            d.chain_error = Some(e.to_string());
            return d;
        }
    };
    d.chain = chain.layers().iter().map(|l| l.path.clone()).collect();
    d.served = vec![0; d.chain.len()];
    let result = engine::map(&chain, 0, chain.virtual_size(), |bs| {
        if bs.present {
            if let Some(slot) = d.served.get_mut(bs.depth) {
                *slot += bs.length;
            }
        } else {
            d.empty += bs.length;
        }
        Ok(())
    });
    if let Err(e) = result {
        d.chain_error = Some(e.to_string());
    }
    d
}
