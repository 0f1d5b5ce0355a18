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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, at, never, select, unbounded, Receiver, Sender};

use super::event::Event;
use crate::catalog::scan::{read_record, scan};
use crate::catalog::{
    CatalogEvent, Forest, ImageRecord, ScanEvent, SizeHistory, Sizes, WatchOptions, Watcher,
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
    /// changed): added, updated, or removed if it is gone. `host:/path`
    /// names a file of another host: its agent reads it again.
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
    /// Files found that are no images, or could not be read, by path: shown
    /// greyed with the reason.
    skipped: HashMap<PathBuf, (String, Sizes)>,
    /// Keys seen by the running scan: at its end, records not seen again
    /// are gone. Old records stay until then so a rescan does not blank
    /// the screen.
    seen: std::collections::HashSet<PathBuf>,
    errors: Vec<(PathBuf, String)>,
    seq: u64,
    scanning: bool,
    /// The forest last sent: what the UI shows now.
    shown: Arc<Forest>,
    /// Roots on other hosts, in the order named: what each agent last
    /// sent, and why it is not current when it is not.
    hosts: Vec<HostView>,
}

struct HostView {
    host: String,
    /// Paths there to read again (a job of ours on them ended).
    refresh: Sender<Vec<PathBuf>>,
    nodes: crate::remote::client::Grafts,
    errors: Vec<(PathBuf, String)>,
    /// The domains there that use its images, as last read there.
    vms: crate::remote::client::HostVms,
    vm_errors: Vec<(PathBuf, String)>,
    stale: Option<String>,
}

impl Catalog {
    fn publish(&mut self, events: &Sender<Event>) {
        let skipped = self
            .skipped
            .iter()
            .map(|(p, (reason, sizes))| (p.clone(), reason.clone(), *sizes))
            .collect();
        let mut records: Vec<ImageRecord> = self.records.values().cloned().collect();
        if !self.hosts.is_empty() {
            crate::catalog::identity::name_local(&mut records);
        }
        let mut forest = Forest::build(records).with_skipped(skipped);
        let mut errors = self.errors.clone();
        for h in &self.hosts {
            let mut nodes = h.nodes.clone();
            crate::remote::client::apply_vms(&mut nodes, &h.vms);
            if let Some(reason) = &h.stale {
                for (_, _, flags) in &mut nodes {
                    flags.push(crate::catalog::Flag::Stale {
                        reason: reason.clone(),
                    });
                }
            }
            forest.graft(nodes);
            errors.extend(h.errors.iter().cloned());
            errors.extend(h.vm_errors.iter().cloned());
        }
        self.shown = Arc::new(forest);
        let _ = events.send(Event::Catalog(CatalogUpdate {
            forest: Arc::clone(&self.shown),
            scanning: self.scanning,
            seq: self.seq,
            errors,
        }));
    }

    fn upsert(&mut self, r: ImageRecord) {
        self.skipped.remove(&r.path);
        self.records.insert(r.key.clone(), r);
    }
}

/// `host:/path` (how jobs name another host's file to re-read) as the
/// host and the path there.
fn remote_file(path: &Path) -> Option<(String, PathBuf)> {
    match crate::remote::Root::parse(path) {
        crate::remote::Root::Remote { host, path } => Some((host, path)),
        crate::remote::Root::Local(_) => None,
    }
}

fn catalog_worker(
    roots: &[PathBuf],
    live: bool,
    cmds: &Receiver<(u64, CatalogCmd)>,
    events: &Sender<Event>,
) {
    let (local, remote) = crate::remote::split_roots(roots);
    let roots = &local[..];
    let (host_tx, host_rx) = unbounded::<crate::remote::client::HostEvent>();
    // Dropped with the worker: the host threads see it and end.
    let (_stop_hosts, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let ssh = crate::remote::client::SshOptions::from_env();
    let mut refreshers = Vec::new();
    for (host, host_roots) in &remote {
        let (refresh_tx, refresh_rx) = unbounded::<Vec<PathBuf>>();
        refreshers.push(refresh_tx);
        let (host, host_roots, tx, stop, ssh) = (
            host.clone(),
            host_roots.clone(),
            host_tx.clone(),
            stop_rx.clone(),
            ssh.clone(),
        );
        let _ = thread::Builder::new()
            .name(format!("cowshed-host-{host}"))
            .spawn(move || {
                crate::remote::client::follow(
                    &host,
                    &host_roots,
                    live,
                    &ssh,
                    &tx,
                    &stop,
                    &refresh_rx,
                );
            });
    }
    drop(host_tx);
    let mut host_rx = if remote.is_empty() { never() } else { host_rx };
    let mut cat = Catalog {
        records: HashMap::new(),
        skipped: HashMap::new(),
        seen: std::collections::HashSet::new(),
        errors: Vec::new(),
        seq: 0,
        scanning: false,
        shown: Arc::new(Forest::default()),
        hosts: remote
            .iter()
            .zip(refreshers)
            .map(|((host, _), refresh)| HostView {
                host: host.clone(),
                refresh,
                nodes: Vec::new(),
                errors: Vec::new(),
                vms: HashMap::new(),
                vm_errors: Vec::new(),
                stale: Some("connecting".into()),
            })
            .collect(),
    };
    let mut scan_rx: Receiver<ScanEvent> = never();
    let (watch_tx, mut watch_rx) = unbounded::<CatalogEvent>();
    // Kept alive for the worker's lifetime; dropping it stops its thread.
    let watcher = live.then(|| Watcher::start(roots.to_vec(), WatchOptions::default(), watch_tx));
    let mut growth = GrowthReports::default();
    let mut skipped_seen: HashSet<PathBuf> = HashSet::new();
    let mut publish_due: Receiver<Instant> = never();
    let mut last_publish = Instant::now();
    loop {
        let mut publish = false;
        let growth_tick = growth.due().map_or_else(never, at);
        select! {
            recv(cmds) -> msg => {
                let Ok((seq, cmd)) = msg else { return };
                cat.seq = seq;
                match cmd {
                    CatalogCmd::Rescan => {
                        cat.seen.clear();
                        skipped_seen.clear();
                        cat.errors.clear();
                        cat.scanning = true;
                        scan_rx = start_scan(roots.to_vec());
                    }
                    // Another host's file: its agent reads it there.
                    CatalogCmd::Probe(path) if remote_file(&path).is_some() => {
                        if let Some((host, there)) = remote_file(&path) {
                            if let Some(h) = cat.hosts.iter().find(|h| h.host == host) {
                                let _ = h.refresh.send(vec![there]);
                            }
                        }
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
                    growth.sample(&r.key, Instant::now(), r.sizes.allocated);
                    cat.seen.insert(r.key.clone());
                    cat.upsert(*r);
                    publish = true;
                }
                Ok(ScanEvent::Skipped { path, reason, sizes }) => {
                    skipped_seen.insert(path.clone());
                    cat.skipped.insert(path, (reason, sizes));
                    publish = true;
                }
                Ok(ScanEvent::Error { path, message }) => {
                    // Shown where it is found too, not only in the log.
                    skipped_seen.insert(path.clone());
                    let reason = format!("unreadable: {}", without_path(&message, &path));
                    cat.skipped.insert(path.clone(), (reason, Sizes::default()));
                    cat.errors.push((path, message));
                    publish = true;
                }
                Ok(ScanEvent::Done) | Err(_) => {
                    scan_rx = never();
                    cat.scanning = false;
                    let seen = std::mem::take(&mut cat.seen);
                    cat.records.retain(|k, _| seen.contains(k));
                    let seen_skipped = std::mem::take(&mut skipped_seen);
                    cat.skipped.retain(|p, _| seen_skipped.contains(p));
                    for report in growth.retain(|k| seen.contains(k)) {
                        send_growth(events, report);
                    }
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
                            let _ = events.send(Event::Sizes {
                                key: key.clone(),
                                sizes,
                            });
                            let report = growth.changed(&key, Instant::now(), sizes.allocated);
                            send_growth(events, report);
                        }
                    }
                    CatalogEvent::Modified { key, mtime } => {
                        if let Some(r) = cat.records.get_mut(&key) {
                            r.mtime = mtime;
                            // A guest's every write moves the mtime: the
                            // forest is built again only when the base's
                            // stale-base warning changes with it.
                            publish |= stale_warning_changes(&cat.shown, &key, mtime);
                        }
                    }
                    CatalogEvent::Appeared(r) | CatalogEvent::HeaderChanged(r) => {
                        growth.sample(&r.key, Instant::now(), r.sizes.allocated);
                        cat.upsert(*r);
                        publish = true;
                    }
                    CatalogEvent::Vanished { path } => {
                        cat.records.retain(|k, r| *k != path && r.path != path);
                        cat.skipped.remove(&path);
                        if let Some(report) = growth.forget(&path) {
                            send_growth(events, report);
                        }
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
            recv(host_rx) -> msg => {
                use crate::remote::client::HostEvent;
                let Ok(ev) = msg else {
                    host_rx = never();
                    continue;
                };
                let view = |cat: &mut Catalog, host: &str| {
                    cat.hosts.iter_mut().position(|h| h.host == host)
                };
                match ev {
                    HostEvent::Snapshot { host, nodes, errors } => {
                        if let Some(i) = view(&mut cat, &host) {
                            for (r, _, _) in &nodes {
                                growth.sample(&r.key, Instant::now(), r.sizes.allocated);
                            }
                            let h = &mut cat.hosts[i];
                            h.nodes = nodes;
                            h.errors = errors;
                            h.stale = None;
                            publish = true;
                        }
                    }
                    HostEvent::Sizes { host, key, sizes } => {
                        if let Some(i) = view(&mut cat, &host) {
                            let h = &mut cat.hosts[i];
                            if let Some(n) = h.nodes.iter_mut().find(|n| n.0.key == key) {
                                n.0.sizes = sizes;
                                let _ = events.send(Event::Sizes { key: key.clone(), sizes });
                                let report = growth.changed(&key, Instant::now(), sizes.allocated);
                                send_growth(events, report);
                            }
                        }
                    }
                    HostEvent::Vms { host, vms, errors } => {
                        if let Some(i) = view(&mut cat, &host) {
                            let h = &mut cat.hosts[i];
                            publish |= h.vms != vms || h.vm_errors != errors;
                            h.vms = vms;
                            h.vm_errors = errors;
                        }
                    }
                    HostEvent::Modified { host, key, mtime } => {
                        if let Some(i) = view(&mut cat, &host) {
                            if let Some(n) = cat.hosts[i].nodes.iter_mut().find(|n| n.0.key == key) {
                                n.0.mtime = mtime;
                            }
                        }
                    }
                    HostEvent::Down { host, reason, retry } => {
                        if let Some(i) = view(&mut cat, &host) {
                            cat.hosts[i].stale = Some(format!(
                                "{host} unreachable ({reason}); trying again in {} s",
                                retry.as_secs()
                            ));
                            publish = true;
                        }
                    }
                }
            }
            recv(growth_tick) -> _ => {
                for report in growth.tick(Instant::now()) {
                    send_growth(events, report);
                }
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

/// Whether a base at `key`, modified at `mtime`, warns of other
/// dependents than the shown forest says.
fn stale_warning_changes(shown: &Forest, key: &Path, mtime: Option<std::time::SystemTime>) -> bool {
    let Some(id) = shown.get(key) else {
        return false;
    };
    let shown_stale = shown.nodes[id]
        .flags
        .iter()
        .find_map(|f| match f {
            crate::catalog::Flag::ModifiedAfterDependents { dependents } => {
                Some(dependents.as_slice())
            }
            _ => None,
        })
        .unwrap_or_default();
    shown.dependents_older_than(id, mtime) != shown_stale
}

/// `message` without the `path: ` it starts with (as often as it does):
/// the row it is shown in is that file already.
fn without_path<'a>(message: &'a str, path: &Path) -> &'a str {
    let prefix = format!("{}: ", path.display());
    let mut rest = message;
    while let Some(r) = rest.strip_prefix(&prefix) {
        rest = r;
    }
    rest
}

fn send_growth(events: &Sender<Event>, r: GrowthReport) {
    let _ = events.send(Event::Growth {
        key: r.key,
        allocated: r.allocated,
        rate: r.rate,
        history: r.history,
    });
}

/// One image's growth as the UI is told it.
#[derive(Debug, Clone, PartialEq)]
pub struct GrowthReport {
    pub key: PathBuf,
    pub allocated: u64,
    /// Bytes per second over the last seconds; 0 once writes stopped.
    pub rate: f64,
    /// Bytes grown in each recent second, oldest first (the sparkline).
    pub history: Vec<u64>,
}

impl GrowthReport {
    fn moving(&self) -> bool {
        self.rate != 0.0 || self.history.iter().any(|&b| b > 0)
    }
}

/// Size histories of the images, and which of them the UI was last told
/// are growing: those are told again every [`GROWTH_EVERY`] until a report
/// says they stopped, so a rate never stays on screen after the writes
/// end (issue 11: it did, while another image kept changing).
#[derive(Default)]
pub struct GrowthReports {
    histories: HashMap<PathBuf, SizeHistory>,
    /// Last told as growing.
    moving: HashSet<PathBuf>,
    /// When the next round of reports is due; `None` when nothing moves.
    due: Option<Instant>,
}

impl GrowthReports {
    /// A size seen without a write behind it (a scan, a header change):
    /// history only.
    pub fn sample(&mut self, key: &Path, at: Instant, allocated: u64) {
        self.histories
            .entry(key.to_path_buf())
            .or_default()
            .push(at, allocated);
    }

    /// An image's size changed: its report now, and a round of reports
    /// armed if none is. An armed round is never pushed back: a writer
    /// that never pauses would otherwise starve every other image's
    /// reports, which then keep their last rate forever.
    pub fn changed(&mut self, key: &Path, at: Instant, allocated: u64) -> GrowthReport {
        self.sample(key, at, allocated);
        let report = self.report(key, at);
        if report.moving() {
            self.moving.insert(key.to_path_buf());
            self.due.get_or_insert(at + GROWTH_EVERY);
        }
        report
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The round of reports due at `now`: every image last told as
    /// growing; those that stopped are told so once and then left alone.
    pub fn tick(&mut self, now: Instant) -> Vec<GrowthReport> {
        let keys: Vec<PathBuf> = self.moving.iter().cloned().collect();
        let reports: Vec<GrowthReport> = keys.iter().map(|k| self.report(k, now)).collect();
        for r in &reports {
            if !r.moving() {
                self.moving.remove(&r.key);
            }
        }
        self.due = (!self.moving.is_empty()).then(|| now + GROWTH_EVERY);
        reports
    }

    /// The image is gone: if it was growing, a last report that it stopped.
    pub fn forget(&mut self, key: &Path) -> Option<GrowthReport> {
        self.histories.remove(key);
        self.moving.remove(key).then(|| GrowthReport {
            key: key.to_path_buf(),
            allocated: 0,
            rate: 0.0,
            history: Vec::new(),
        })
    }

    /// Keep only the images `keep` says exist; stop reports for the rest.
    pub fn retain(&mut self, keep: impl Fn(&PathBuf) -> bool) -> Vec<GrowthReport> {
        let gone: Vec<PathBuf> = self
            .histories
            .keys()
            .filter(|k| !keep(k))
            .cloned()
            .collect();
        gone.iter().filter_map(|k| self.forget(k)).collect()
    }

    fn report(&self, key: &Path, now: Instant) -> GrowthReport {
        let h = self.histories.get(key);
        GrowthReport {
            key: key.to_path_buf(),
            allocated: h.and_then(SizeHistory::latest).unwrap_or(0),
            rate: h.map_or(0.0, |h| h.rate_at(now)),
            history: h.map_or_else(Vec::new, |h| h.sparkline_at(now)),
        }
    }
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
    /// The same for a file on another host: its agent computes them.
    RemoteDetails {
        key: PathBuf,
        host: String,
        path: PathBuf,
    },
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
                // One connection per host, kept while it works.
                let mut hosts: HashMap<String, crate::remote::client::Connection> = HashMap::new();
                let ssh = crate::remote::client::SshOptions::from_env();
                while let Ok(mut req) = rx.recv() {
                    // Moving through the tree asks for many details; only
                    // the last is still wanted. Probes are all answered.
                    while matches!(
                        req,
                        InspectRequest::Details(..) | InspectRequest::RemoteDetails { .. }
                    ) {
                        match rx.try_recv() {
                            Ok(newer) => req = newer,
                            Err(_) => break,
                        }
                    }
                    let event = match req {
                        InspectRequest::Details(key, path) => {
                            Event::Details(Box::new(inspect(&key, &path)))
                        }
                        InspectRequest::RemoteDetails { key, host, path } => Event::Details(
                            Box::new(inspect_remote(&mut hosts, &ssh, key, &host, &path)),
                        ),
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

    /// Ask `host`'s agent for the details of the image with `key` there,
    /// at `path` there.
    pub fn request_remote(&self, key: PathBuf, host: String, path: PathBuf) {
        let _ = self
            .tx
            .send(InspectRequest::RemoteDetails { key, host, path });
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

/// The details of `path` on `host`, as its agent computes them; a lost
/// connection is opened again once, then the failure is the answer.
fn inspect_remote(
    hosts: &mut HashMap<String, crate::remote::client::Connection>,
    ssh: &crate::remote::client::SshOptions,
    key: PathBuf,
    host: &str,
    path: &Path,
) -> Details {
    use crate::remote::client::{fetch_details, Connection};
    let mut answer = Err(String::new());
    for _ in 0..2 {
        let conn = match hosts.remove(host) {
            Some(c) => c,
            None => match Connection::open(host, ssh) {
                Ok(c) => c,
                Err(e) => {
                    answer = Err(e.to_string());
                    break;
                }
            },
        };
        let mut conn = conn;
        match fetch_details(&mut conn, path) {
            Ok(d) => {
                hosts.insert(host.to_string(), conn);
                answer = Ok(d);
                break;
            }
            Err(e) => answer = Err(e.to_string()),
        }
    }
    match answer {
        Ok(d) => Details {
            key,
            info: match (d.info, d.info_error) {
                (Some(i), _) => i.into_info(),
                (None, e) => Err(e.unwrap_or_else(|| "no details came".into())),
            },
            chain: d.chain,
            served: d.served,
            empty: d.empty,
            chain_error: d.chain_error,
        },
        Err(e) => Details {
            key,
            info: Err(e),
            chain: Vec::new(),
            served: Vec::new(),
            empty: 0,
            chain_error: None,
        },
    }
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

/// How often the libvirt domains are read again.
pub const INVENTORY_POLL: std::time::Duration = crate::inventory::REFRESH_EVERY;

/// Read the defined domains of `conns` on a thread of its own, now and
/// every [`INVENTORY_POLL`], and send each reading that differs from the
/// last. The thread ends with the UI (its channel closed).
pub fn spawn_inventory(
    conns: crate::inventory::Connections,
    tx: crossbeam_channel::Sender<super::Event>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("cowshed-inventory".into())
        .spawn(move || {
            let mut last: Option<crate::inventory::Inventory> = None;
            loop {
                let now = crate::inventory::Inventory::read(&conns);
                if last.as_ref() != Some(&now) {
                    if tx
                        .send(super::Event::Inventory(std::sync::Arc::new(now.clone())))
                        .is_err()
                    {
                        return;
                    }
                    last = Some(now);
                }
                // A closed channel is only seen on a send: a UI that quit
                // leaves this thread asleep until the process ends with it.
                std::thread::sleep(INVENTORY_POLL);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, defect 1: two images grow, then stop, while a third keeps
    /// changing more often than once a second (a guest, a convert's
    /// output). The two must be told they stopped. The old worker pushed
    /// its one report timer back on every size change, so it never fired
    /// and their last rates stayed on screen for good.
    #[test]
    fn images_that_stop_growing_are_told_so_while_another_keeps_writing() {
        const MIB: u64 = 1 << 20;
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let (base, top, busy) = (
            PathBuf::from("/vm/base.qcow2"),
            PathBuf::from("/vm/top.qcow2"),
            PathBuf::from("/vm/busy.qcow2"),
        );
        let mut g = GrowthReports::default();
        let mut last: HashMap<PathBuf, GrowthReport> = HashMap::new();
        // The worker's loop, on a simulated clock: a due round first, then
        // what the watcher reports at that moment.
        for step in 0..=600u64 {
            let now = ms(step * 50);
            if g.due().is_some_and(|d| d <= now) {
                for r in g.tick(now) {
                    last.insert(r.key.clone(), r);
                }
            }
            // base and top: 300 MiB/s for two seconds.
            if step <= 40 && step % 4 == 0 {
                for (k, n) in [(&base, step), (&top, 2 * step)] {
                    let r = g.changed(k, now, n * 75 * MIB);
                    last.insert(r.key.clone(), r);
                }
            }
            // busy: a write every 300 ms, all the time.
            if step % 6 == 0 {
                let r = g.changed(&busy, now, step * MIB);
                last.insert(r.key.clone(), r);
            }
        }
        for k in [&base, &top] {
            let r = &last[k];
            assert_eq!(r.rate, 0.0, "{}: still {} B/s", k.display(), r.rate);
            assert!(r.history.iter().all(|&b| b == 0), "{r:?}");
        }
        assert!(last[&busy].rate > 0.0, "the busy one still grows");
        // Nothing moves any more once the busy one stops, and its reports
        // end with a zero too.
        while let Some(now) = g.due() {
            for r in g.tick(now) {
                last.insert(r.key.clone(), r);
            }
            assert!(now < ms(60_000), "reports never end");
        }
        assert_eq!(last[&busy].rate, 0.0);
    }

    #[test]
    fn a_growing_image_that_vanishes_is_told_to_stop() {
        let t0 = Instant::now();
        let mut g = GrowthReports::default();
        let k = PathBuf::from("/vm/tmp.qcow2");
        g.sample(&k, t0, 0);
        assert!(g.changed(&k, t0 + Duration::from_secs(1), 1 << 20).rate > 0.0);
        let r = g.forget(&k).expect("a last report");
        assert_eq!(r.rate, 0.0);
        assert!(g.tick(t0 + Duration::from_secs(2)).is_empty());
        assert_eq!(g.due(), None);
    }
}
