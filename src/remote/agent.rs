//! `cowshed agent --stdio`: the other end of a remote root. Reads
//! [`Request`]s on stdin, answers with [`Reply`]s on stdout, one JSON line
//! each; serves the catalog (scan, forest, watch), this host's libvirt
//! domains (the inventory code, on this host's connections), the details
//! pane's facts and a fresh look at what uses a file, and runs jobs with
//! the same code as local roots.
//!
//! Jobs outlive the connection: when stdin ends (the ssh connection was
//! lost), the agent stops watching, lets its running jobs finish (never
//! cancels them: an operator asked for them) and exits after the last.
//! Each job's state is recorded in the state directory
//! (`$COWSHED_STATE_DIR`, else `$XDG_STATE_HOME/cowshed`, else
//! `~/.local/state/cowshed`, under `agent-jobs/`), so the agent of the
//! next connection answers `outcome` for it, or says it was lost when the
//! agent that ran it died first.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{after, never, select, tick, unbounded, Receiver};
use serde::{Deserialize, Serialize};

use super::protocol::{
    decode, encode, BitmapAction, HeaderFixKind, JobOp, Reply, Request, SnapshotAction, WireChange,
    WireCheck, WireDetails, WireError, WireImage, WireInfo, WireJobState, WireListing, WireNode,
    WireProgress, WireTime, WireVm, WireVmUse, PROTOCOL_VERSION,
};
use crate::catalog::identity::Identities;
use crate::catalog::scan::{read_record, scan_all};
use crate::catalog::{CatalogEvent, Forest, ImageRecord, WatchOptions, Watcher};
use crate::engine::qcow2::header::CompressionType;
use crate::engine::{self, Format};
use crate::inventory::{Connections, Inventory};
use crate::jobs::{JobEvent, JobId, JobState, Jobs};

/// A burst of structural changes (a directory of clones appearing) goes
/// out as one snapshot.
const PUBLISH_AFTER: Duration = Duration::from_millis(100);
/// Progress of running jobs is sent this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// A job run by an earlier connection's agent is looked at this often.
const FOREIGN_EVERY: Duration = Duration::from_millis(500);

/// Serve one session on stdin/stdout; returns the exit code. `conns` are
/// this host's libvirt connections (its own `--connect`, its config's
/// `libvirt`, else the default set): their domains guard the jobs run here
/// and are sent with the forest.
pub fn run_stdio(conns: Connections) -> i32 {
    // The client going away must not kill the agent while jobs run:
    // writes to a closed stdout fail instead, and are dropped.
    // SAFETY: setting a signal disposition; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let requests = spawn_reader();
    let mut agent = Agent::new(conns);
    agent.serve(&requests)
}

fn spawn_reader() -> Receiver<String> {
    let (tx, rx) = unbounded();
    // Not an engine operation: the one thread that reads stdin.
    let _ = std::thread::Builder::new()
        .name("cowshed-agent-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    rx
}

/// The journal of one job on this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    kind: String,
    state: WireJobState,
    message: Option<String>,
    created: Option<PathBuf>,
    progress: WireProgress,
    /// The agent running it.
    pid: u32,
}

fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("COWSHED_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("cowshed");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/cowshed")
}

fn journal_dir() -> PathBuf {
    state_dir().join("agent-jobs")
}

/// A job id names a file: only plain characters.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

fn journal_path(id: &str) -> PathBuf {
    journal_dir().join(format!("{id}.json"))
}

fn save(record: &Record) -> std::io::Result<()> {
    let dir = journal_dir();
    std::fs::create_dir_all(&dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
    tmp.write_all(&encode(record))?;
    tmp.as_file().sync_all()?;
    tmp.persist(journal_path(&record.id)).map_err(|e| e.error)?;
    Ok(())
}

fn load(id: &str) -> Option<Record> {
    let text = std::fs::read_to_string(journal_path(id)).ok()?;
    decode(&text).ok()
}

fn alive(pid: u32) -> bool {
    // Signal 0: is there such a process (ours to signal or not).
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 sends nothing.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

struct Live {
    id: String,
    kind: &'static str,
}

/// The agent's stdout, shared with the threads that answer `info`,
/// `check` and `list`; `None` once the client is gone.
type Out = Arc<Mutex<Option<std::io::Stdout>>>;

/// Send one message; a failed write means the client is gone.
fn send_to(out: &Out, reply: &Reply) {
    let line = encode(reply);
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(o) = out.as_mut() {
        let mut lock = o.lock();
        if lock.write_all(&line).and_then(|()| lock.flush()).is_err() {
            drop(lock);
            *out = None;
        }
    }
}

struct Agent {
    out: Out,
    /// This host's libvirt connections, and their last reading.
    conns: Connections,
    inventory: Arc<Inventory>,
    inventory_rx: Receiver<Inventory>,
    inventory_polled: bool,
    host: String,
    roots: Vec<PathBuf>,
    records: HashMap<PathBuf, ImageRecord>,
    errors: Vec<WireError>,
    watcher: Option<Watcher>,
    watch_rx: Receiver<CatalogEvent>,
    /// The forest as the client has it (every node by key, as last sent):
    /// later forests go out as the changes against it.
    sent: HashMap<PathBuf, WireChange>,
    jobs: Jobs,
    job_rx: Receiver<JobEvent>,
    live: HashMap<JobId, Live>,
    by_name: HashMap<String, JobId>,
    /// Jobs of earlier agents whose outcome a client waits for.
    foreign: Vec<String>,
}

impl Agent {
    fn new(conns: Connections) -> Agent {
        let (job_tx, job_rx) = unbounded::<JobEvent>();
        Agent {
            out: Arc::new(Mutex::new(Some(std::io::stdout()))),
            conns,
            inventory: Arc::new(Inventory::default()),
            inventory_rx: never(),
            inventory_polled: false,
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            roots: Vec::new(),
            records: HashMap::new(),
            errors: Vec::new(),
            watcher: None,
            watch_rx: never(),
            sent: HashMap::new(),
            jobs: Jobs::new(crate::jobs::DEFAULT_WORKERS, job_tx),
            job_rx,
            live: HashMap::new(),
            by_name: HashMap::new(),
            foreign: Vec::new(),
        }
    }

    fn connected(&self) -> bool {
        self.out.lock().map(|o| o.is_some()).unwrap_or(false)
    }

    fn send(&self, reply: &Reply) {
        send_to(&self.out, reply);
    }

    fn serve(&mut self, requests: &Receiver<String>) -> i32 {
        // The handshake: nothing else is served before it.
        let Ok(first) = requests.recv() else {
            return 0;
        };
        match decode::<Request>(&first) {
            Ok(Request::Hello { protocol }) if protocol == PROTOCOL_VERSION => {
                self.send(&Reply::Hello {
                    protocol: PROTOCOL_VERSION,
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    host: self.host.clone(),
                });
            }
            Ok(Request::Hello { protocol }) => {
                self.send(&Reply::Refused {
                    message: format!(
                        "this cowshed agent ({}) speaks protocol {PROTOCOL_VERSION}, the client \
                         protocol {protocol}",
                        env!("CARGO_PKG_VERSION")
                    ),
                });
                return 2;
            }
            _ => {
                self.send(&Reply::Refused {
                    message: "expected a hello first".into(),
                });
                return 2;
            }
        }
        let mut requests = requests.clone();
        let mut publish_due = never();
        let progress_tick = tick(PROGRESS_EVERY);
        let foreign_tick = tick(FOREIGN_EVERY);
        loop {
            select! {
                recv(requests) -> msg => match msg {
                    Ok(line) => self.handle(&line),
                    Err(_) => {
                        requests = never();
                        self.watcher = None;
                        self.watch_rx = never();
                        self.inventory_rx = never();
                        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                },
                recv(self.watch_rx) -> ev => match ev {
                    Ok(ev) => {
                        if self.apply(ev) {
                            publish_due = after(PUBLISH_AFTER);
                        }
                    }
                    Err(_) => self.watch_rx = never(),
                },
                recv(publish_due) -> _ => {
                    publish_due = never();
                    self.publish_changes();
                }
                recv(self.inventory_rx) -> inv => match inv {
                    Ok(inv) => {
                        self.inventory = Arc::new(inv);
                        self.send(&self.vms());
                    }
                    Err(_) => self.inventory_rx = never(),
                },
                recv(self.job_rx) -> ev => {
                    if let Ok(ev) = ev {
                        self.job_event(ev);
                    }
                }
                recv(progress_tick) -> _ => {
                    for (&jid, live) in &self.live {
                        if let Some(p) = self.jobs.progress(jid) {
                            self.send(&Reply::JobState {
                                id: live.id.clone(),
                                state: WireJobState::Running,
                                message: None,
                                progress: WireProgress { done: p.done, total: p.total, copied: p.copied },
                                created: None,
                            });
                        }
                    }
                }
                recv(foreign_tick) -> _ => self.look_at_foreign(),
            }
            // Lost or closed: what runs is finished first.
            if !self.connected() && self.live.is_empty() {
                return 0;
            }
        }
    }

    fn handle(&mut self, line: &str) {
        let request = match decode::<Request>(line) {
            Ok(r) => r,
            Err(message) => return self.send(&Reply::Error { message }),
        };
        match request {
            Request::Hello { .. } => self.send(&Reply::Error {
                message: "hello twice".into(),
            }),
            Request::Watch { roots, live } => self.watch(roots, live),
            Request::Job { id, op } => self.submit(id, op),
            Request::Cancel { id } => match self.by_name.get(&id) {
                Some(&jid) => {
                    self.jobs.cancel(jid);
                    crate::engine::fault::point("agent.cancel_passed_on");
                }
                None => self.send(&Reply::Error {
                    message: format!("no running job {id} on {}", self.host),
                }),
            },
            Request::Outcome { id } => self.outcome(&id),
            Request::List { id, image } => self.list(id, image),
            Request::Refresh { paths } => self.refresh(&paths),
            Request::Info { path } => self.info(path),
            Request::Check { paths } => self.check(paths),
        }
    }

    fn watch(&mut self, roots: Vec<PathBuf>, live: bool) {
        self.watcher = None;
        let (records, errors) = scan_all(&roots);
        self.errors = errors
            .into_iter()
            .map(|(path, message)| WireError { path, message })
            .collect();
        if live {
            let (tx, rx) = unbounded();
            let w = Watcher::start(roots.clone(), WatchOptions::default(), tx);
            for r in &records {
                w.track(r);
            }
            if let Some(reason) = w.polling_only().first() {
                self.send(&Reply::PollingOnly {
                    reason: format!("{} cannot be watched", reason.display()),
                });
            }
            self.watcher = Some(w);
            self.watch_rx = rx;
        }
        self.records = records.into_iter().map(|r| (r.key.clone(), r)).collect();
        self.roots = roots;
        // The first forest comes with its domains: read them now (a
        // `tree` waits for both), then again every REFRESH_EVERY while
        // live.
        self.inventory = Arc::new(Inventory::read(&self.conns));
        if live && !self.inventory_polled {
            self.inventory_polled = true;
            self.inventory_rx = poll_inventory(self.conns.clone(), (*self.inventory).clone());
        }
        self.publish();
    }

    /// The whole forest, then the domains that use its images.
    fn publish(&mut self) {
        let nodes = self.forest_nodes();
        self.sent = by_key(&nodes);
        self.send(&Reply::Snapshot {
            nodes,
            errors: self.errors.clone(),
        });
        self.send(&self.vms());
    }

    /// What changed since the forest last sent, then the domains (new
    /// images may be used by one).
    fn publish_changes(&mut self) {
        let now = by_key(&self.forest_nodes());
        let mut nodes: Vec<WireChange> = now
            .iter()
            .filter(|(k, n)| self.sent.get(*k) != Some(n))
            .map(|(_, n)| n.clone())
            .collect();
        nodes.sort_by(|a, b| a.image.key.cmp(&b.image.key));
        let mut removed: Vec<PathBuf> = self
            .sent
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        removed.sort();
        self.sent = now;
        self.send(&Reply::Changes {
            nodes,
            removed,
            errors: self.errors.clone(),
        });
        self.send(&self.vms());
    }

    /// The forest of the watched roots, built here, each image with its
    /// identity.
    fn forest_nodes(&self) -> Vec<WireNode> {
        let forest = Forest::build(self.records.values().cloned().collect());
        let ids = Identities::read();
        forest
            .nodes
            .iter()
            .map(|n| {
                let mut image = WireImage::from(&n.record);
                image.identity = ids.of(n.record.dev_ino.0, n.record.dev_ino.1);
                WireNode {
                    image,
                    parent: n.parent,
                    flags: n.flags.clone(),
                }
            })
            .collect()
    }

    /// Which watched images this host's domains use.
    fn vms(&self) -> Reply {
        let mut users: Vec<WireVmUse> = self
            .records
            .values()
            .filter_map(|r| {
                let vms: Vec<WireVm> = self
                    .inventory
                    .users_of(r.dev_ino)
                    .map(|d| WireVm::from(&d.user()))
                    .collect();
                (!vms.is_empty()).then(|| WireVmUse {
                    key: r.key.clone(),
                    vms,
                })
            })
            .collect();
        users.sort_by(|a, b| a.key.cmp(&b.key));
        Reply::Vms {
            users,
            unreadable: self
                .inventory
                .unreadable
                .iter()
                .map(|(uri, why)| WireError {
                    path: PathBuf::from(uri),
                    message: why.clone(),
                })
                .collect(),
        }
    }

    /// Read `paths` again (a job ended on them) and send what changed.
    fn refresh(&mut self, paths: &[PathBuf]) {
        for path in paths {
            self.records.retain(|_, r| r.path != *path);
            if let Ok(Some(r)) = read_record(path) {
                if let Some(w) = &self.watcher {
                    w.track(&r);
                }
                self.records.insert(r.key.clone(), r);
            }
        }
        self.publish_changes();
    }

    /// Answer `list` from a thread of its own: reading a snapshot table on
    /// a slow disk must not hold up the watch or the jobs' progress.
    fn list(&self, id: String, image: PathBuf) {
        let out = Arc::clone(&self.out);
        let answer = move || {
            let reply = match listing(&image) {
                Ok(l) => Reply::Listing {
                    id,
                    listing: Some(l),
                    error: None,
                },
                Err(e) => Reply::Listing {
                    id,
                    listing: None,
                    error: Some(e.to_string()),
                },
            };
            send_to(&out, &reply);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("cowshed-agent-list".into())
            .spawn(answer)
        {
            self.send(&Reply::Error {
                message: format!("cannot list on {}: {e}", self.host),
            });
        }
    }

    /// Answer `info` from a thread of its own: reading a long chain's
    /// block status must not hold up progress and live updates.
    fn info(&self, path: PathBuf) {
        let out = Arc::clone(&self.out);
        let spawned = std::thread::Builder::new()
            .name("cowshed-agent-info".into())
            .spawn(move || {
                let d = crate::tui::worker::inspect(&path, &path);
                let details = WireDetails {
                    info: d.info.as_ref().ok().map(WireInfo::from),
                    info_error: d.info.err(),
                    chain: d.chain,
                    served: d.served,
                    empty: d.empty,
                    chain_error: d.chain_error,
                };
                send_to(
                    &out,
                    &Reply::Info {
                        path,
                        details: Box::new(details),
                    },
                );
            });
        if let Err(e) = spawned {
            self.send(&Reply::Error {
                message: format!("cannot read details: {e}"),
            });
        }
    }

    /// Answer `check` from a thread of its own: the domains are read
    /// afresh (virsh), the files' locks and holders looked at now.
    fn check(&self, paths: Vec<PathBuf>) {
        let out = Arc::clone(&self.out);
        let conns = self.conns.clone();
        let spawned = std::thread::Builder::new()
            .name("cowshed-agent-check".into())
            .spawn(move || {
                let inventory = Inventory::read(&conns);
                let unreadable: Vec<String> = inventory
                    .unreadable
                    .iter()
                    .map(|(uri, why)| format!("libvirt connection {uri} could not be read: {why}"))
                    .collect();
                let images = paths
                    .into_iter()
                    .map(|path| {
                        let vms = inventory
                            .users_of_path(&path)
                            .into_iter()
                            .map(|d| WireVm::from(&d.user()))
                            .collect();
                        let (lock, holders, error) = match read_record(&path) {
                            Ok(Some(r)) => (r.lock.name().to_string(), r.holders, None),
                            Ok(None) => ("none".into(), Vec::new(), None),
                            Err(e) => ("none".into(), Vec::new(), Some(e)),
                        };
                        let error = error
                            .or_else(|| (!unreadable.is_empty()).then(|| unreadable.join("; ")));
                        WireCheck {
                            path,
                            lock,
                            holders,
                            vms,
                            error,
                        }
                    })
                    .collect();
                send_to(&out, &Reply::Checked { images });
            });
        if let Err(e) = spawned {
            self.send(&Reply::Error {
                message: format!("cannot check: {e}"),
            });
        }
    }

    /// Apply a watcher event; true when the forest must be sent again.
    fn apply(&mut self, ev: CatalogEvent) -> bool {
        match ev {
            CatalogEvent::SizesChanged { key, sizes } => {
                if let Some(r) = self.records.get_mut(&key) {
                    r.sizes = sizes;
                    // Said now: not a change to send again.
                    if let Some(s) = self.sent.get_mut(&key) {
                        s.image.sizes = sizes.into();
                    }
                    self.send(&Reply::Sizes {
                        key,
                        sizes: sizes.into(),
                    });
                }
                false
            }
            CatalogEvent::Modified { key, mtime } => {
                if let Some(r) = self.records.get_mut(&key) {
                    r.mtime = mtime;
                    if let Some(s) = self.sent.get_mut(&key) {
                        s.image.mtime = WireTime::from_system(mtime);
                    }
                    self.send(&Reply::Modified {
                        key,
                        mtime: WireTime::from_system(mtime),
                    });
                }
                false
            }
            CatalogEvent::Appeared(r) | CatalogEvent::HeaderChanged(r) => {
                self.records.insert(r.key.clone(), *r);
                true
            }
            CatalogEvent::Vanished { path } => {
                self.records.retain(|k, r| *k != path && r.path != path);
                true
            }
            CatalogEvent::PollingOnly { reason } => {
                self.send(&Reply::PollingOnly { reason });
                false
            }
        }
    }

    fn submit(&mut self, id: String, op: JobOp) {
        let refuse = |agent: &Agent, message: String| {
            agent.send(&Reply::JobState {
                id: id.clone(),
                state: WireJobState::Failed,
                message: Some(message),
                progress: WireProgress::default(),
                created: None,
            });
        };
        if !valid_id(&id) {
            return refuse(self, format!("bad job id {id:?}"));
        }
        // An id already used is a client bug or a replay: never run twice.
        if self.by_name.contains_key(&id) || load(&id).is_some() {
            return refuse(
                self,
                format!("job {id} was already submitted on {}", self.host),
            );
        }
        let kind = op.kind();
        let record = Record {
            id: id.clone(),
            kind: kind.to_string(),
            state: WireJobState::Queued,
            message: None,
            created: None,
            progress: WireProgress::default(),
            pid: std::process::id(),
        };
        // Without a record a lost connection could not be answered: refuse.
        if let Err(e) = save(&record) {
            return refuse(
                self,
                format!("cannot record the job in {}: {e}", journal_dir().display()),
            );
        }
        let touches = touches(&op);
        let work = work(op, self.roots.clone(), self.conns.clone());
        let jid = self.jobs.submit(touches, work);
        self.by_name.insert(id.clone(), jid);
        self.live.insert(jid, Live { id, kind });
    }

    fn job_event(&mut self, ev: JobEvent) {
        let Some(live) = self.live.get(&ev.id) else {
            return;
        };
        let (state, message) = match &ev.state {
            JobState::Queued => (WireJobState::Queued, None),
            JobState::Running => (WireJobState::Running, None),
            JobState::Done => (WireJobState::Done, None),
            JobState::Failed(m) => (WireJobState::Failed, Some(m.clone())),
            JobState::Cancelled => (WireJobState::Cancelled, None),
        };
        let progress = WireProgress {
            done: ev.progress.done,
            total: ev.progress.total,
            copied: ev.progress.copied,
        };
        let record = Record {
            id: live.id.clone(),
            kind: live.kind.to_string(),
            state,
            message: message.clone(),
            created: ev.created.clone(),
            progress,
            pid: std::process::id(),
        };
        // The outcome is recorded before it is said: a client that heard
        // it can always hear it again.
        let _ = save(&record);
        self.send(&Reply::JobState {
            id: live.id.clone(),
            state,
            message,
            progress,
            created: ev.created,
        });
        if state.is_finished() {
            if let Some(live) = self.live.remove(&ev.id) {
                self.by_name.remove(&live.id);
            }
        }
    }

    fn outcome(&mut self, id: &str) {
        if let Some(&jid) = self.by_name.get(id) {
            let p = self.jobs.progress(jid).unwrap_or_default();
            return self.send(&Reply::JobState {
                id: id.to_string(),
                state: WireJobState::Running,
                message: None,
                progress: WireProgress {
                    done: p.done,
                    total: p.total,
                    copied: p.copied,
                },
                created: None,
            });
        }
        let lost = |message: String| Reply::JobState {
            id: id.to_string(),
            state: WireJobState::Lost,
            message: Some(message),
            progress: WireProgress::default(),
            created: None,
        };
        if !valid_id(id) {
            return self.send(&lost(format!("bad job id {id:?}")));
        }
        match load(id) {
            None => self.send(&lost(format!("no record of job {id} on {}", self.host))),
            Some(r) => {
                let reply = self.answer(r);
                if !matches!(&reply, Reply::JobState { state, .. } if state.is_finished())
                    && !self.foreign.iter().any(|f| f == id)
                {
                    self.foreign.push(id.to_string());
                }
                self.send(&reply);
            }
        }
    }

    /// What a journal record says now: its outcome, still running in the
    /// agent of an earlier connection, or lost with that agent.
    fn answer(&self, r: Record) -> Reply {
        let (state, message) = if r.state.is_finished() || alive(r.pid) {
            (r.state, r.message)
        } else {
            (
                WireJobState::Lost,
                Some(format!(
                    "the agent running this {} on {} ended before it did; the images are as an \
                     interrupted {} leaves them (not run again)",
                    r.kind, self.host, r.kind
                )),
            )
        };
        Reply::JobState {
            id: r.id,
            state,
            message,
            progress: r.progress,
            created: r.created,
        }
    }

    fn look_at_foreign(&mut self) {
        if self.foreign.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.foreign);
        for id in ids {
            let Some(r) = load(&id) else { continue };
            let reply = self.answer(r);
            let finished = matches!(&reply, Reply::JobState { state, .. } if state.is_finished());
            if finished {
                self.send(&reply);
            } else {
                self.foreign.push(id);
            }
        }
    }
}

/// A forest's nodes by key, each parent named by its key.
fn by_key(nodes: &[WireNode]) -> HashMap<PathBuf, WireChange> {
    nodes
        .iter()
        .map(|n| {
            (
                n.image.key.clone(),
                WireChange {
                    image: n.image.clone(),
                    parent: n
                        .parent
                        .and_then(|p| nodes.get(p))
                        .map(|p| p.image.key.clone()),
                    flags: n.flags.clone(),
                },
            )
        })
        .collect()
}

/// The images a job works on, as the pool's keys: two jobs on one image
/// never run together.
fn touches(op: &JobOp) -> Vec<PathBuf> {
    let key = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    match op {
        JobOp::Clone { base, .. } => vec![key(base)],
        JobOp::Commit { image, .. } | JobOp::Rebase { image, .. } => vec![key(image)],
        JobOp::Convert { src, dst, .. } => vec![key(src), key(dst)],
        JobOp::Reset { image, .. }
        | JobOp::Snapshot { image, .. }
        | JobOp::Bitmap { image, .. }
        | JobOp::HeaderFix { image, .. }
        | JobOp::Protect { image, .. } => vec![key(image)],
        JobOp::Delete { paths, .. } => paths.iter().map(|p| key(p)).collect(),
        JobOp::Move { src, dst, .. } => vec![key(src), key(dst)],
    }
}

fn parse_format(name: &str, path: &Path) -> engine::Result<Format> {
    match Format::from_name(name) {
        Some(f @ (Format::Qcow2 | Format::Raw)) => Ok(f),
        _ => Err(engine::Error::invalid(
            path,
            format!("format '{name}' is not one cowshed writes (qcow2, raw)"),
        )),
    }
}

/// The engine call for an operation: what `cowshed` runs for the same
/// command here.
fn work(op: JobOp, roots: Vec<PathBuf>, conns: Connections) -> crate::jobs::Work {
    let host_vms = move || Inventory::read(&conns).vm_users(false);
    match op {
        JobOp::Clone { base, new } => Box::new(move |_, _| {
            let format = engine::probe(&base)?;
            // The name as the TUI's clone stores it: relative beside its
            // base, absolute elsewhere.
            let backing = if new.parent() == base.parent() {
                base.file_name().map_or_else(
                    || base.display().to_string(),
                    |n| n.to_string_lossy().into(),
                )
            } else {
                std::path::absolute(&base)
                    .unwrap_or_else(|_| base.clone())
                    .display()
                    .to_string()
            };
            let opts = engine::CreateOptions {
                format: Format::Qcow2,
                backing: Some(backing),
                backing_format: Some(format),
                ..engine::CreateOptions::default()
            };
            engine::create(&new, &opts)?;
            Ok(Some(new))
        }),
        JobOp::Commit { image, keep_top } => Box::new(move |p, c| {
            let opts = engine::CommitOptions {
                base: None,
                keep_top,
                vms: host_vms(),
            };
            engine::commit(&image, &opts, p, c)?;
            Ok(None)
        }),
        JobOp::Rebase {
            image,
            backing,
            backing_format,
            unsafe_header_only,
        } => Box::new(move |p, c| {
            let backing_format = backing_format
                .map(|f| parse_format(&f, &image))
                .transpose()?;
            let opts = engine::RebaseOptions {
                backing,
                backing_format,
                unsafe_header_only,
                vms: host_vms(),
            };
            engine::rebase(&image, &opts, p, c)?;
            Ok(None)
        }),
        JobOp::Convert {
            src,
            dst,
            format,
            compress,
            cluster_size,
            compression_type,
            backing,
            backing_format,
        } => Box::new(move |p, c| {
            let default = engine::CreateOptions::default();
            let compression = match compression_type.as_deref() {
                None => default.compression,
                Some("zlib") => CompressionType::Deflate,
                Some("zstd") => CompressionType::Zstd,
                Some(other) => {
                    return Err(engine::Error::invalid(
                        &dst,
                        format!("unknown compression type '{other}' (zlib, zstd)"),
                    ))
                }
            };
            let opts = engine::ConvertOptions {
                target: engine::CreateOptions {
                    format: parse_format(&format, &dst)?,
                    cluster_size: cluster_size.unwrap_or(default.cluster_size),
                    compression,
                    backing,
                    backing_format: backing_format.map(|f| parse_format(&f, &dst)).transpose()?,
                    ..default
                },
                compress,
                // Never replaces a file on another host unseen.
                replace: None,
                ..engine::ConvertOptions::default()
            };
            engine::convert(&src, &dst, &opts, p, c)?;
            Ok(Some(dst))
        }),
        JobOp::Delete { paths, trash } => Box::new(move |p, c| {
            let opts = engine::RemoveOptions {
                roots,
                stream: false,
                trash,
                vms: host_vms(),
            };
            engine::remove(&paths, &opts, p, c)?;
            Ok(None)
        }),
        JobOp::Move {
            src,
            dst,
            roots: move_roots,
        } => Box::new(move |p, c| {
            let opts = engine::MoveOptions {
                roots: if move_roots.is_empty() {
                    roots
                } else {
                    move_roots
                },
                vms: host_vms(),
            };
            let report = engine::move_image(&src, &dst, &opts, p, c)?;
            Ok(Some(report.dst))
        }),
        JobOp::Reset {
            image,
            roots: reset_roots,
        } => Box::new(move |_, _| {
            let opts = engine::ResetOptions {
                roots: if reset_roots.is_empty() {
                    roots
                } else {
                    reset_roots
                },
                vms: host_vms(),
            };
            engine::reset(&image, &opts)?;
            Ok(None)
        }),
        JobOp::Snapshot { image, action } => Box::new(move |_, _| {
            use engine::ops::snapshot;
            // As `cowshed snapshot` checks the host's domains first.
            engine::preflight::ensure_no_vm_users(&image, &host_vms())?;
            match action {
                SnapshotAction::Create { name } => {
                    snapshot::create(&image, name.as_bytes(), None).map(drop)
                }
                SnapshotAction::Apply { id } => snapshot::apply(&image, id.as_bytes(), None),
                SnapshotAction::Delete { id } => snapshot::delete_id(&image, id.as_bytes(), None),
            }?;
            Ok(None)
        }),
        JobOp::Bitmap {
            image,
            name,
            action,
        } => Box::new(move |_, _| {
            use engine::ops::bitmap;
            // As `cowshed bitmap` checks the host's domains first.
            engine::preflight::ensure_no_vm_users(&image, &host_vms())?;
            let (act, granularity) = match action {
                BitmapAction::Add { granularity } => (bitmap::Action::Add, granularity),
                BitmapAction::Remove => (bitmap::Action::Remove, None),
                BitmapAction::Clear => (bitmap::Action::Clear, None),
                BitmapAction::Enable => (bitmap::Action::Enable, None),
                BitmapAction::Disable => (bitmap::Action::Disable, None),
                BitmapAction::Merge { from } => (bitmap::Action::Merge(from.into_bytes()), None),
            };
            bitmap::run(
                &image,
                Some(Format::Qcow2),
                name.as_bytes(),
                &[act],
                granularity,
                None,
            )?;
            Ok(None)
        }),
        JobOp::HeaderFix { image, fix } => Box::new(move |p, c| {
            use crate::catalog::doctor::{plan_header_fix, Fix};
            let fix = match fix {
                HeaderFixKind::RecordBackingFormat => Fix::RecordFormat,
                HeaderFixKind::MakeBackingNameRelative => Fix::MakeRelative,
            };
            let plan = plan_header_fix(&image, &[fix])
                .map_err(|why| engine::Error::invalid(&image, why))?;
            engine::rebase(&image, &plan.rebase_options(), p, c)?;
            Ok(None)
        }),
        JobOp::Protect { image, off } => Box::new(move |_, _| {
            use engine::ops::protect::{protect, unprotect};
            if off {
                unprotect(&image)?;
            } else {
                protect(&image)?;
            }
            Ok(None)
        }),
    }
}

/// The snapshots and bitmaps of `image`, from the engine's `info` (what
/// the inspector reads for a local image's dialogs).
fn listing(image: &Path) -> engine::Result<WireListing> {
    let info = engine::info(image, None)?;
    let Some(q) = info.qcow2 else {
        return Err(engine::Error::invalid(
            image,
            format!(
                "a {} image has no internal snapshots or persistent bitmaps",
                info.format.name()
            ),
        ));
    };
    Ok(WireListing::from_qcow2(&q))
}

/// Read this host's domains every [`crate::inventory::REFRESH_EVERY`] on a
/// thread of its own; each reading that differs from the last is passed
/// on. The thread ends when the agent stops listening.
fn poll_inventory(conns: Connections, first: Inventory) -> Receiver<Inventory> {
    let (tx, rx) = unbounded();
    let _ = std::thread::Builder::new()
        .name("cowshed-agent-inventory".into())
        .spawn(move || {
            let mut last = first;
            loop {
                std::thread::sleep(crate::inventory::REFRESH_EVERY);
                let now = Inventory::read(&conns);
                if now != last {
                    if tx.send(now.clone()).is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_name_plain_files_only() {
        for good in ["a", "c-1.x_2", "host1-1700000000-42"] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
