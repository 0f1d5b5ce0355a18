//! The TUI's state and its one way to change: [`App::update`]. Nothing here
//! reads a file: scans, probes and details are asked of the worker threads
//! (`worker.rs`), engine operations run as jobs, and the answers come back
//! as events. Keys are routed through the key table's layers: to the open
//! dialog (`dialog/`), else to the mode's own handling.

use crate::engine::preflight::VmUsers;
use crate::inventory::Inventory;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ratatui::crossterm::event::{
    Event as CtEvent, KeyEvent, KeyEventKind, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::{Position, Rect};

use super::config::Config;
use super::dialog::{self, Ctx, Dialog, JobSpec, Outcome};
use super::event::Event;
use super::keymap::{Action, Hint, Key, Keymap, Layer};
use super::reclaim::ReclaimView;
use super::rows::{build_rows, relative_to_roots, RowOptions};
use super::theme::Theme;
use super::view;
use super::worker::{CatalogCmd, CatalogHandle, Details, InspectHandle};
use crate::catalog::{Flag, Forest, NodeId};
use crate::jobs::{JobId, JobProgress, JobState, Jobs, DEFAULT_WORKERS};

pub use super::rows::{file_name, Growth, Row, SortKey};

/// Identity and state of a record, to tell when details are stale.
type Stamp = (
    PathBuf,
    crate::catalog::Sizes,
    Option<std::time::SystemTime>,
    Option<crate::engine::HeaderSummary>,
);

/// How often the UI redraws while something moves.
pub const TICK: Duration = Duration::from_millis(250);

/// Where keys go when no dialog is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tree,
    /// Typing a filter.
    Filter,
    /// The jobs pane has the keys.
    Jobs,
    /// One job, opened from the jobs pane.
    Job(JobId),
    /// The help popup, scrolled this many lines.
    Help(usize),
    /// The log, scrolled this many lines from its start.
    Log(usize),
    /// The reclaim view (`D`), its state in [`App::reclaim`].
    Reclaim,
}

impl Mode {
    pub fn layer(self) -> Layer {
        match self {
            Mode::Tree => Layer::Tree,
            Mode::Filter => Layer::Filter,
            Mode::Jobs => Layer::Jobs,
            Mode::Job(_) => Layer::Job,
            Mode::Help(_) => Layer::Help,
            Mode::Log(_) => Layer::Log,
            Mode::Reclaim => Layer::Reclaim,
        }
    }
}

#[derive(Debug, Clone)]
pub struct JobView {
    pub id: JobId,
    /// `clone`, `commit`: the tree's badge says it.
    pub kind: &'static str,
    pub label: String,
    /// Keys of the images the job works on, for the tree's badge.
    pub touches: Vec<PathBuf>,
    /// Paths the catalog re-probes when the job ends (sizes, headers).
    pub refresh: Vec<PathBuf>,
    pub state: JobState,
    pub progress: JobProgress,
    /// When it started running, for the rate.
    pub started: Option<Instant>,
    /// Bytes per second since it started, and the time left at that rate;
    /// computed on ticks so drawing stays a pure function of state.
    pub rate: f64,
    pub eta: Option<Duration>,
}

impl JobView {
    fn new(id: JobId, spec: &JobSpec) -> JobView {
        JobView {
            id,
            kind: spec.kind,
            label: spec.label.clone(),
            touches: spec.touches.clone(),
            refresh: spec.refresh.clone(),
            state: JobState::Queued,
            progress: JobProgress::default(),
            started: None,
            rate: 0.0,
            eta: None,
        }
    }

    /// Average rate since the start and the time left at that rate.
    fn update_rate(&mut self, now: Instant) {
        let Some(start) = self.started else {
            return;
        };
        let secs = now.duration_since(start).as_secs_f64();
        let JobProgress { done, total, .. } = self.progress;
        // Over the first few milliseconds the average is mostly noise.
        if secs < 0.05 || done == 0 {
            return;
        }
        self.rate = done as f64 / secs;
        self.eta =
            (total >= done).then(|| Duration::from_secs_f64((total - done) as f64 / self.rate));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusKind {
    /// What just happened (sorted, a job started).
    Info,
    /// A job or an action ended well.
    Done,
    /// Something was stopped or not done on request: nothing changed.
    Cancelled,
    /// A problem that does not stop anything (scan warnings).
    Warning,
    Error,
}

impl StatusKind {
    /// The glyph before the text: colour is never alone.
    pub fn glyph(self) -> &'static str {
        match self {
            StatusKind::Info => "·",
            StatusKind::Done => "✓",
            StatusKind::Cancelled => "–",
            StatusKind::Warning => "!",
            StatusKind::Error => "✗",
        }
    }
}

/// A message on the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub kind: StatusKind,
}

impl Status {
    pub fn info(text: impl Into<String>) -> Status {
        Status {
            text: text.into(),
            kind: StatusKind::Info,
        }
    }

    pub fn done(text: impl Into<String>) -> Status {
        Status {
            text: text.into(),
            kind: StatusKind::Done,
        }
    }

    pub fn cancelled(text: impl Into<String>) -> Status {
        Status {
            text: text.into(),
            kind: StatusKind::Cancelled,
        }
    }

    pub fn error(text: impl Into<String>) -> Status {
        Status {
            text: text.into(),
            kind: StatusKind::Error,
        }
    }

    pub fn is_error(&self) -> bool {
        self.kind == StatusKind::Error
    }
}

/// One line of the log: every warning, refusal and job result since start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Local time of day, `HH:MM:SS`.
    pub time: String,
    pub kind: StatusKind,
    pub text: String,
}

/// Totals for the header.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub images: usize,
    pub bases: usize,
    pub saved: u64,
}

pub struct App {
    pub roots: Vec<PathBuf>,
    pub keymap: Keymap,
    pub theme: Theme,
    pub forest: Arc<Forest>,
    pub totals: Totals,
    pub scanning: bool,
    pub scan_errors: Vec<(PathBuf, String)>,
    pub rows: Vec<Row>,
    /// Index into `rows`.
    pub selected: usize,
    /// First row shown.
    pub offset: usize,
    pub folded: HashSet<PathBuf>,
    pub filter: String,
    pub sort: SortKey,
    pub mode: Mode,
    /// The open dialog; it has the keys while open.
    pub dialog: Option<Dialog>,
    pub details: Option<Details>,
    pub growth: HashMap<PathBuf, Growth>,
    pub jobs: Vec<JobView>,
    /// The job the jobs pane's keys act on; `None` means the newest.
    pub job_selected: Option<JobId>,
    pub status: Option<Status>,
    pub log: Vec<LogEntry>,
    /// The terminal's size, for layout-dependent decisions (scrolling,
    /// mouse hits).
    pub area: Rect,
    pub quit: bool,
    /// The chain doctor's settings, from the config.
    pub doctor: crate::catalog::doctor::DoctorOptions,
    /// Marked images, by key: `f`, `v`, `m`, `b` (and whatever acts on
    /// [`App::targets`]) act on all of them. Kept across rescans and
    /// filters; images that vanish lose theirs.
    pub marks: BTreeSet<PathBuf>,
    /// The reclaim view's list and selection, built when it opens and on
    /// every new forest while it is open.
    pub reclaim: ReclaimView,
    /// The defined libvirt domains, as last read off the UI thread.
    pub inventory: Arc<Inventory>,
    /// The same, as the engine's pre-flight step takes it.
    pub vms: VmUsers,
    /// `--readonly` / `readonly = true`: action keys are disabled.
    pub readonly: bool,

    selected_key: Option<PathBuf>,
    details_wanted: Option<PathBuf>,
    /// What the selected record looked like when its details were asked.
    details_stamp: Option<Stamp>,
    /// Select this path as soon as the catalog shows it (a new clone).
    select_after: Option<PathBuf>,
    /// Scan warnings already in the log (a scan re-sends its list).
    logged_scan_errors: HashSet<(PathBuf, String)>,
    catalog_seen: u64,
    catalog: CatalogHandle,
    pub(crate) inspector: InspectHandle,
    pub(crate) pool: Jobs,
    /// Last time a growth report said an image grows.
    last_growth: Option<Instant>,
    /// Where threads of the app's own (another host's listing) answer.
    events: Sender<Event>,
}

impl App {
    /// Start the workers and the first scan. Events for this app go to
    /// `events`; feed whatever arrives on its receiver to [`App::update`].
    /// `live` watches the roots for changes (sizes, new and deleted files)
    /// between scans.
    pub fn new(
        roots: Vec<PathBuf>,
        config: Config,
        live: bool,
        events: Sender<Event>,
        area: Rect,
    ) -> std::io::Result<App> {
        let events_for_inventory = events.clone();
        let mut catalog = CatalogHandle::start(roots.clone(), live, events.clone())?;
        let inspector = InspectHandle::start(events.clone())?;
        let pool = Jobs::new(DEFAULT_WORKERS, events.clone());
        catalog.send(CatalogCmd::Rescan);
        let doctor = config.doctor;
        if live {
            super::worker::spawn_inventory(
                crate::inventory::Connections::from_named(&config.libvirt),
                events_for_inventory,
            )?;
        }
        Ok(App {
            roots,
            keymap: config.keymap,
            theme: config.theme,
            forest: Arc::new(Forest::default()),
            totals: Totals::default(),
            scanning: true,
            scan_errors: Vec::new(),
            rows: Vec::new(),
            selected: 0,
            offset: 0,
            folded: HashSet::new(),
            filter: String::new(),
            sort: SortKey::Name,
            mode: Mode::Tree,
            dialog: None,
            details: None,
            growth: HashMap::new(),
            jobs: Vec::new(),
            job_selected: None,
            status: None,
            log: Vec::new(),
            area,
            quit: false,
            doctor,
            marks: BTreeSet::new(),
            reclaim: ReclaimView::default(),
            inventory: Arc::new(Inventory::default()),
            vms: VmUsers::default(),
            readonly: config.readonly,
            selected_key: None,
            details_wanted: None,
            details_stamp: None,
            select_after: None,
            logged_scan_errors: HashSet::new(),
            catalog_seen: 0,
            catalog,
            inspector,
            pool,
            last_growth: None,
            events,
        })
    }

    /// Something moves on screen: a job is queued or running, or an image
    /// grew recently. Only then does the loop tick.
    pub fn is_moving(&self) -> bool {
        self.jobs.iter().any(|j| !j.state.is_finished())
            || self
                .last_growth
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
    }

    /// Waiting for an answer from a worker: a scan, a probe, details or a
    /// job. Tests wait for this to end before looking at the screen.
    pub fn is_busy(&self) -> bool {
        self.scanning
            || self.catalog_seen < self.catalog.last_sent()
            || self.details_wanted.is_some()
            || self.jobs.iter().any(|j| !j.state.is_finished())
            || self.select_after.is_some()
            || matches!(&self.dialog, Some(Dialog::Pick(p)) if p.probing.is_some())
    }

    /// Handle events from `rx` until the app is no longer busy (or
    /// `timeout` passes; returns false then). For tests and scripted runs:
    /// it makes the asynchronous workers look synchronous.
    pub fn settle(&mut self, rx: &Receiver<Event>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_busy() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(ev) => self.update(ev),
                Err(_) => return false,
            }
        }
        // Whatever else is already queued (details after a last forest).
        while let Ok(ev) = rx.try_recv() {
            self.update(ev);
        }
        !self.is_busy() || self.settle(rx, deadline.saturating_duration_since(Instant::now()))
    }

    pub fn selected_node(&self) -> Option<NodeId> {
        self.rows.get(self.selected).map(|r| r.id)
    }

    /// The images an action applies to: every marked image still in the
    /// forest (in path order), or else the selected one.
    pub fn targets(&self) -> Vec<NodeId> {
        let marked: Vec<NodeId> = self
            .marks
            .iter()
            .filter_map(|k| self.forest.get(k))
            .collect();
        if marked.is_empty() {
            self.selected_node().into_iter().collect()
        } else {
            marked
        }
    }

    /// What the reclaim view's delete acts on: its marked images, or else
    /// the one selected in it (marks elsewhere in the tree are not the
    /// view's to delete).
    pub fn reclaim_targets(&self) -> Vec<NodeId> {
        let rows = &self.reclaim.rows;
        let marked: Vec<NodeId> = rows
            .iter()
            .filter(|c| self.marks.contains(&c.key))
            .map(|c| c.id)
            .collect();
        if marked.is_empty() {
            rows.get(self.reclaim.selected)
                .map(|c| c.id)
                .into_iter()
                .collect()
        } else {
            marked
        }
    }

    /// Marked images still in the forest, and their allocated bytes.
    pub fn marked_totals(&self) -> (usize, u64) {
        self.marks
            .iter()
            .filter_map(|k| self.forest.get(k))
            .fold((0, 0), |(n, b), id| {
                (n + 1, b + self.forest.nodes[id].record.sizes.allocated)
            })
    }

    fn has_marks(&self) -> bool {
        self.marks.iter().any(|k| self.forest.get(k).is_some())
    }

    /// The path to show for an image: relative to the root it was found
    /// under, so the screen says what the operator typed.
    pub fn display_path(&self, p: &Path) -> String {
        relative_to_roots(&self.roots, p)
    }

    /// `text` (an error message) with the roots' prefixes taken off the
    /// paths in it, as in [`App::display_path`]. Only whole paths are
    /// touched: a root must start the text or follow a space or a quote.
    pub fn relativize(&self, text: &str) -> String {
        let mut out = text.to_string();
        for r in &self.roots {
            let root = r.display().to_string();
            if root.is_empty() || root == "." {
                continue;
            }
            let prefix = format!("{}/", root.trim_end_matches('/'));
            let mut result = String::with_capacity(out.len());
            let mut rest = out.as_str();
            while let Some(i) = rest.find(&prefix) {
                let prev = rest[..i].chars().last().or_else(|| result.chars().last());
                let boundary = prev.is_none_or(|c| matches!(c, ' ' | '\'' | '"' | '('));
                result.push_str(&rest[..i]);
                if !boundary {
                    result.push_str(&prefix);
                }
                rest = &rest[i + prefix.len()..];
            }
            result.push_str(rest);
            out = result;
        }
        out
    }

    /// The keys the screen offers now (the footer, or the open dialog's
    /// hint line), all from the key table.
    pub fn hints(&self) -> Vec<Hint> {
        match &self.dialog {
            Some(d) => d.hints(&self.keymap),
            None => self.keymap.footer(self.mode.layer()),
        }
    }

    /// The layers keys are looked up in now.
    pub fn layers(&self) -> &'static [Layer] {
        match &self.dialog {
            Some(d) => d.layers(),
            None => match self.mode {
                Mode::Tree => &[Layer::Tree],
                Mode::Filter => &[Layer::Filter],
                Mode::Jobs => &[Layer::Jobs],
                Mode::Job(_) => &[Layer::Job],
                Mode::Help(_) => &[Layer::Help],
                Mode::Log(_) => &[Layer::Log],
                Mode::Reclaim => &[Layer::Reclaim],
            },
        }
    }

    /// Put `s` on the status line; everything but passing information is
    /// kept in the log too.
    pub fn say(&mut self, s: Status) {
        if s.kind != StatusKind::Info {
            self.log_entry(s.kind, s.text.clone());
        }
        self.status = Some(s);
    }

    fn log_entry(&mut self, kind: StatusKind, text: String) {
        self.log.push(LogEntry {
            time: clock(),
            kind,
            text,
        });
    }

    pub fn update(&mut self, event: Event) {
        match event {
            Event::Input(CtEvent::Key(k)) if k.kind != KeyEventKind::Release => self.on_key(k),
            Event::Input(CtEvent::Mouse(m)) => self.on_mouse(m),
            Event::Input(CtEvent::Resize(w, h)) => {
                self.area = Rect::new(0, 0, w, h);
                self.scroll_to_selection();
            }
            Event::Input(_) => {}
            Event::Inventory(inv) => {
                for (uri, why) in &inv.unreadable {
                    if !self
                        .inventory
                        .unreadable
                        .iter()
                        .any(|(u, w)| u == uri && w == why)
                    {
                        self.say(Status::error(format!(
                            "libvirt connection {uri} could not be read: {why}"
                        )));
                    }
                }
                self.vms = inv.vm_users(false);
                self.inventory = inv;
                if self.mode == Mode::Reclaim {
                    self.reclaim
                        .rebuild(&self.forest, &self.vms, std::time::SystemTime::now());
                }
            }
            Event::Catalog(u) => {
                self.catalog_seen = self.catalog_seen.max(u.seq);
                self.scanning = u.scanning;
                for e in &u.errors {
                    if self.logged_scan_errors.insert(e.clone()) {
                        let text = format!("{}: {}", self.display_path(&e.0), e.1);
                        self.log_entry(StatusKind::Warning, text);
                    }
                }
                self.scan_errors = u.errors;
                self.forest = u.forest;
                self.totals = totals(&self.forest);
                // A finished scan or a probe says what is gone: its mark
                // goes too (a streaming scan has not seen everything yet).
                if !self.scanning {
                    let forest = Arc::clone(&self.forest);
                    self.marks.retain(|k| forest.get(k).is_some());
                }
                if self.mode == Mode::Reclaim {
                    self.reclaim
                        .rebuild(&self.forest, &self.vms, std::time::SystemTime::now());
                }
                // Growth of images that are gone would stay forever.
                let forest = Arc::clone(&self.forest);
                self.growth.retain(|k, _| forest.get(k).is_some());
                let mut select = None;
                if let Some(want) = &self.select_after {
                    if let Some(id) = self
                        .forest
                        .nodes
                        .iter()
                        .position(|n| &n.record.path == want)
                    {
                        // Unfold the way to it (a filter that hides it is
                        // cleared below).
                        for a in self.forest.chain(id).into_iter().skip(1) {
                            self.folded.remove(&self.forest.nodes[a].record.key);
                        }
                        select = Some(id);
                        self.select_after = None;
                    } else if !self.scanning && self.catalog_seen >= self.catalog.last_sent() {
                        // The catalog has answered and it is not there.
                        self.select_after = None;
                    }
                }
                self.rebuild_rows();
                if let Some(id) = select {
                    if !self.filter.is_empty() && !self.rows.iter().any(|r| r.id == id) {
                        self.filter.clear();
                        self.rebuild_rows();
                    }
                    if let Some(i) = self.rows.iter().position(|r| r.id == id) {
                        self.select_row(i);
                    }
                }
                // The selected image changed on disk (a guest writes, a
                // header was rewritten): its details are stale.
                self.refresh_stale_details();
            }
            Event::Details(d) => {
                if self.details_wanted.as_ref() == Some(&d.key) {
                    self.details_wanted = None;
                }
                if self.selected_key.as_ref() == Some(&d.key) {
                    self.details = Some(*d);
                }
            }
            Event::BackingProbe(p) => {
                if let Some(mut d) = self.dialog.take() {
                    let outcome = d.on_probe(p, &self.ctx());
                    self.dialog = Some(d);
                    self.apply(outcome);
                }
            }
            Event::Listing { key, listing } => {
                if let Some(mut d) = self.dialog.take() {
                    let outcome = d.on_listing(&key, listing);
                    self.dialog = Some(d);
                    self.apply(outcome);
                }
            }
            Event::Job(e) => self.on_job(e),
            Event::Growth {
                key,
                allocated: _,
                rate,
                history,
            } => {
                if rate > 0.0 {
                    self.last_growth = Some(Instant::now());
                }
                if rate == 0.0 && history.iter().all(|&b| b == 0) {
                    self.growth.remove(&key);
                } else {
                    self.growth.insert(key, Growth { rate, history });
                }
                if self.sort == SortKey::Growth {
                    self.rebuild_rows();
                }
            }
            Event::Sizes { key, sizes } => {
                if let Some(id) = self.forest.get(&key) {
                    Arc::make_mut(&mut self.forest).nodes[id].record.sizes = sizes;
                    self.totals = totals(&self.forest);
                    if self.mode == Mode::Reclaim {
                        self.reclaim
                            .rebuild(&self.forest, &self.vms, std::time::SystemTime::now());
                    }
                    if self.sort != SortKey::Name {
                        self.rebuild_rows();
                    }
                    self.refresh_stale_details();
                }
            }
            Event::Tick => {
                let now = Instant::now();
                for j in &mut self.jobs {
                    if let Some(p) = self.pool.progress(j.id) {
                        j.progress = p;
                    }
                    if j.state == JobState::Running {
                        j.update_rate(now);
                    }
                }
            }
        }
    }

    fn refresh_stale_details(&mut self) {
        let stamp = self.selected_stamp();
        if stamp.is_some() && stamp != self.details_stamp && self.details_wanted.is_none() {
            self.request_details();
        }
    }

    fn on_job(&mut self, e: crate::jobs::JobEvent) {
        let Some(j) = self.jobs.iter_mut().find(|j| j.id == e.id) else {
            return;
        };
        j.state = e.state.clone();
        if e.state == JobState::Running {
            j.started = Some(Instant::now());
        }
        if e.state.is_finished() {
            // The pool's last word on progress: ticks may have missed it.
            if e.progress.total > 0 {
                j.progress = e.progress;
            }
            j.eta = None;
            // Whatever the outcome, the images may have changed (a
            // cancelled commit has grown the base): re-read them.
            for p in std::mem::take(&mut j.refresh) {
                self.catalog.send(CatalogCmd::Probe(p));
            }
        }
        let label = j.label.clone();
        match &e.state {
            JobState::Done => {
                let text = match &e.created {
                    Some(p) => format!("{label}: created {}", self.display_path(p)),
                    None => format!("{label}: done"),
                };
                self.say(Status::done(text));
                if let Some(p) = e.created {
                    self.select_after = Some(p.clone());
                    self.catalog.send(CatalogCmd::Probe(p));
                }
            }
            JobState::Failed(msg) => {
                let text = format!("{label} failed: {}", self.relativize(msg));
                self.say(Status::error(text));
            }
            JobState::Cancelled => {
                self.say(Status::cancelled(format!(
                    "{label}: cancelled, images left valid"
                )));
            }
            JobState::Queued | JobState::Running => {}
        }
        // Keep the list short: finished jobs beyond the last few go (the
        // log keeps how each ended).
        const KEEP_FINISHED: usize = 4;
        let finished = self.jobs.iter().filter(|j| j.state.is_finished()).count();
        if finished > KEEP_FINISHED {
            let mut drop = finished - KEEP_FINISHED;
            let open = match self.mode {
                Mode::Job(id) => Some(id),
                _ => None,
            };
            self.jobs.retain(|j| {
                if drop > 0 && j.state.is_finished() && Some(j.id) != open {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
        if self
            .job_selected
            .is_some_and(|id| !self.jobs.iter().any(|j| j.id == id))
        {
            self.job_selected = None;
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            forest: &self.forest,
            keymap: &self.keymap,
            roots: &self.roots,
            selected: self.selected_node(),
            vms: &self.vms,
        }
    }

    fn on_key(&mut self, k: KeyEvent) {
        let key = Key::from_event(&k);
        let action = self.keymap.action_for(self.layers(), key);
        if self.dialog.is_some() && self.readonly && action.is_some_and(Action::writes) {
            return self.refuse_read_only();
        }
        if let Some(mut d) = self.dialog.take() {
            let outcome = d.on_key(key, action, &self.ctx());
            self.dialog = Some(d);
            self.apply(outcome);
            return;
        }
        match self.mode {
            Mode::Tree => {
                if let Some(a) = action {
                    self.tree_action(a);
                }
            }
            Mode::Filter => self.filter_key(key, action),
            Mode::Jobs => self.jobs_key(action),
            Mode::Job(id) => match action {
                Some(Action::CancelJob) => self.cancel_job(Some(id)),
                Some(Action::Close) => self.mode = Mode::Jobs,
                _ => {}
            },
            Mode::Help(at) => {
                let max = view::help_max_scroll(self);
                match scrolled(at, max, action, view::popup_page(self.area)) {
                    Some(at) => self.mode = Mode::Help(at),
                    None if action == Some(Action::Close) => self.mode = Mode::Tree,
                    None => {}
                }
            }
            Mode::Log(at) => {
                let max = view::log_max_scroll(self);
                match scrolled(at, max, action, view::popup_page(self.area)) {
                    Some(at) => self.mode = Mode::Log(at),
                    None if action == Some(Action::Close) => self.mode = Mode::Tree,
                    None => {}
                }
            }
            Mode::Reclaim => self.reclaim_key(action),
        }
    }

    /// Keys of the reclaim view: move, mark (the same marks as the tree's),
    /// close.
    fn reclaim_key(&mut self, action: Option<Action>) {
        let last = self.reclaim.rows.len().saturating_sub(1);
        let page = view::popup_page(self.area).saturating_sub(3).max(1);
        if let Some(at) = scrolled(self.reclaim.selected, last, action, page) {
            self.reclaim.selected = at;
            return;
        }
        match action {
            Some(Action::Mark) => {
                if let Some(k) = self.reclaim.selected_key().cloned() {
                    if !self.marks.remove(&k) {
                        self.marks.insert(k);
                    }
                    self.reclaim.selected = (self.reclaim.selected + 1).min(last);
                }
            }
            Some(Action::MarkTree) => {
                let keys: Vec<PathBuf> = self.reclaim.rows.iter().map(|c| c.key.clone()).collect();
                self.toggle_marks(keys);
            }
            Some(Action::ClearMarks) => self.clear_marks(),
            Some(Action::DeleteImage) if self.readonly => self.tree_action(Action::DeleteImage),
            Some(Action::DeleteImage) => {
                let targets = self.reclaim_targets();
                if !targets.is_empty() {
                    let forest = Arc::clone(&self.forest);
                    let d = dialog::delete::DeleteDialog::open(&forest, &targets, &self.roots)
                        .map(Dialog::Delete);
                    self.open("delete", d);
                }
            }
            Some(Action::Rescan) => self.tree_action(Action::Rescan),
            Some(Action::Close) => self.mode = Mode::Tree,
            _ => {}
        }
    }

    /// Mark all of `keys`, or unmark them when all are marked already.
    fn toggle_marks(&mut self, keys: Vec<PathBuf>) {
        if keys.iter().all(|k| self.marks.contains(k)) {
            for k in &keys {
                self.marks.remove(k);
            }
        } else {
            self.marks.extend(keys);
        }
    }

    fn clear_marks(&mut self) {
        let n = self.marks.len();
        self.marks.clear();
        if n > 0 {
            self.say(Status::info(format!(
                "{n} mark{} cleared",
                if n == 1 { "" } else { "s" }
            )));
        }
    }

    /// Carry out what a dialog asked for.
    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Stay => {}
            Outcome::Say(s) => self.say(s),
            Outcome::Close(s) => {
                self.close_dialog();
                self.say(s);
            }
            Outcome::Submit(spec) => {
                self.close_dialog();
                self.submit(spec);
            }
            Outcome::SubmitAll { jobs, unmark, say } => {
                self.close_dialog();
                for spec in jobs {
                    self.submit(spec);
                }
                for k in &unmark {
                    self.marks.remove(k);
                }
                if let Some(s) = say {
                    self.say(s);
                }
            }
            Outcome::Open(d) => {
                self.close_dialog();
                self.status = None;
                self.dialog = Some(d);
            }
            Outcome::Tree(a) => self.tree_action(a),
            Outcome::Refilter => self.rebuild_rows(),
            Outcome::Probe {
                image_key,
                name,
                resolved,
            } => self.inspector.probe_backing(image_key, name, resolved),
        }
    }

    fn close_dialog(&mut self) {
        // The picker set the tree's filter aside: the rows come back.
        if matches!(self.dialog.take(), Some(Dialog::Pick(_))) {
            self.rebuild_rows();
        }
    }

    /// Open a dialog, or say why not.
    fn open(&mut self, what: &str, opened: Result<Dialog, String>) {
        match opened {
            Ok(d) => {
                self.status = None;
                // The picker sets the tree's filter aside.
                let picking = matches!(d, Dialog::Pick(_));
                self.dialog = Some(d);
                if picking {
                    self.rebuild_rows();
                }
            }
            Err(why) => {
                let name = self
                    .selected_node()
                    .map(|id| self.display_path(&self.forest.nodes[id].record.path))
                    .unwrap_or_default();
                self.say(Status::error(format!("cannot {what} {name}: {why}")));
            }
        }
    }

    /// The one way work starts: queue the job, show it, say so.
    fn submit(&mut self, spec: JobSpec) {
        let cancel = self
            .keymap
            .keys(Layer::Tree, Action::CancelJob)
            .first()
            .map_or_else(String::new, |k| format!(" ({k} cancels)"));
        let text = format!("{}: started{cancel}", spec.label);
        let mut view = JobView::new(0, &spec);
        let work = self.asking_other_hosts(spec.kind, &spec.touches, spec.work);
        view.id = self.pool.submit(spec.touches, work);
        self.jobs.push(view);
        self.say(Status::info(text));
    }

    /// The job's work, first asking the other hosts that see the files of
    /// this machine it changes (shared storage; `identity::name_local`),
    /// as a job run by an agent asks the hosts beside its own: a lock, a
    /// holder or a domain there refuses it, and so does a host that cannot
    /// be asked. Clones and converts only write new files.
    fn asking_other_hosts(
        &self,
        kind: &str,
        touches: &[PathBuf],
        work: crate::jobs::Work,
    ) -> crate::jobs::Work {
        if matches!(kind, "clone" | "convert") {
            return work;
        }
        let forest = &self.forest;
        let mine = touches
            .iter()
            .filter_map(|k| forest.get(k))
            .map(|id| &forest.nodes[id].record)
            .filter(|r| r.host.is_none());
        let peers = crate::remote::client::peers(mine);
        let Some(first) = touches.first().cloned() else {
            return work;
        };
        if peers.is_empty() {
            return work;
        }
        let ssh = crate::remote::client::SshOptions::from_env();
        Box::new(move |progress, cancel| {
            crate::remote::client::check_peers(&peers, &ssh)
                .map_err(|why| crate::engine::Error::invalid(&first, why))?;
            work(progress, cancel)
        })
    }

    fn refuse_read_only(&mut self) {
        self.say(Status::error(
            "read-only: that action would change files, and cowshed runs with --readonly \
             (or readonly = true in the config)",
        ));
    }

    fn tree_action(&mut self, action: Action) {
        let page = usize::from(view::layout(self.area).tree_body.height).max(1);
        let selected = self.selected_node();
        let forest = Arc::clone(&self.forest);
        if self.readonly && action.writes() {
            return self.refuse_read_only();
        }
        let on_other_hosts: Vec<NodeId> = self
            .targets()
            .into_iter()
            .filter(|&id| forest.nodes[id].record.host.is_some())
            .collect();
        if !on_other_hosts.is_empty()
            && acts_on_images(action)
            && !self.agent_runs_dialog(action, &forest)
        {
            return self.refuse_on_other_hosts(&on_other_hosts);
        }
        match action {
            Action::Up => self.move_selection(-1),
            Action::Down => self.move_selection(1),
            Action::Top => self.select_row(0),
            Action::Bottom => self.select_row(self.rows.len().saturating_sub(1)),
            Action::PageUp => self.move_selection(-(page as isize)),
            Action::PageDown => self.move_selection(page as isize),
            Action::Left => self.left(),
            Action::Right => self.right(),
            Action::Fold => self.toggle_fold(),
            Action::Filter => self.mode = Mode::Filter,
            Action::ClearFilter if !self.filter.is_empty() => {
                self.filter.clear();
                self.rebuild_rows();
            }
            Action::Sort => {
                self.sort = self.sort.next();
                self.say(Status::info(format!("sorted by {}", self.sort.name())));
                self.rebuild_rows();
            }
            Action::Mark => {
                if let Some(id) = selected {
                    let key = forest.nodes[id].record.key.clone();
                    if !self.marks.remove(&key) {
                        self.marks.insert(key);
                    }
                    self.move_selection(1);
                }
            }
            Action::MarkTree => {
                if let Some(id) = selected {
                    let keys = forest
                        .walk(id)
                        .into_iter()
                        .map(|(n, _)| forest.nodes[n].record.key.clone())
                        .collect();
                    self.toggle_marks(keys);
                }
            }
            Action::ClearMarks => self.clear_marks(),
            Action::Reclaim => {
                self.reclaim = ReclaimView::default();
                self.reclaim
                    .rebuild(&self.forest, &self.vms, std::time::SystemTime::now());
                self.mode = Mode::Reclaim;
            }
            Action::CloneMany => {
                if let Some(id) = selected {
                    let d = dialog::clone::CloneDialog::open_many(&forest, id).map(Dialog::Clone);
                    self.open("clone", d);
                }
            }
            // With marks, the batch: one confirm list for all of them.
            Action::Flatten if self.has_marks() => {
                let d = dialog::batch::BatchDialog::flatten(&forest, &self.targets());
                self.open("flatten", Ok(Dialog::Batch(d)));
            }
            Action::ResetImage if self.has_marks() => {
                let d = dialog::batch::BatchDialog::reset(&forest, &self.targets(), &self.roots);
                self.open("reset", Ok(Dialog::Batch(d)));
            }
            Action::Commit if self.has_marks() => {
                let d = dialog::batch::BatchDialog::commit(&forest, &self.targets());
                self.open("commit", Ok(Dialog::Batch(d)));
            }
            Action::Convert if self.has_marks() => {
                let d = dialog::convert::ConvertDialog::open_batch(&forest, &self.targets());
                self.open("convert", d.map(Dialog::Convert));
            }
            Action::Rebase if self.has_marks() => {
                let d = dialog::rebase::Picker::open_batch(&forest, &self.targets());
                self.open("rebase", d.map(Dialog::Pick));
            }
            Action::Clone => {
                if let Some(id) = selected {
                    match dialog::clone::job(&forest, id, None, &self.ctx()) {
                        Ok(spec) => self.submit(spec),
                        Err(why) => self.say(Status::error(why)),
                    }
                }
            }
            Action::CloneAs => {
                if let Some(id) = selected {
                    let d = dialog::clone::CloneDialog::open(&forest, id).map(Dialog::Clone);
                    self.open("clone", d);
                }
            }
            Action::Commit => {
                if let Some(id) = selected {
                    let d = dialog::commit::CommitDialog::open(&forest, id).map(Dialog::Commit);
                    self.open("commit", d);
                }
            }
            Action::Rebase => {
                if let Some(id) = selected {
                    let d = dialog::rebase::Picker::open(&forest, id).map(Dialog::Pick);
                    self.open("rebase", d);
                }
            }
            Action::Flatten => {
                if let Some(id) = selected {
                    let d = dialog::flatten::FlattenDialog::open(&forest, id).map(Dialog::Flatten);
                    self.open("flatten", d);
                }
            }
            Action::Convert => {
                if let Some(id) = selected {
                    let d = dialog::convert::ConvertDialog::open(&forest, id).map(Dialog::Convert);
                    self.open("convert", d);
                }
            }
            Action::Move => {
                if let Some(id) = selected {
                    let d = dialog::move_image::MoveDialog::open(&forest, id).map(Dialog::Move);
                    self.open("move", d);
                }
            }
            Action::DeleteImage => {
                // The marked images, else the selected one.
                let targets = self.targets();
                if !targets.is_empty() {
                    let d = dialog::delete::DeleteDialog::open(&forest, &targets, &self.roots)
                        .map(Dialog::Delete);
                    self.open("delete", d);
                }
            }
            Action::ResetImage => {
                if let Some(id) = selected {
                    let d = dialog::reset::ResetDialog::open(&forest, id, &self.roots)
                        .map(Dialog::Reset);
                    self.open("reset", d);
                }
            }
            Action::Doctor => {
                if let Some(id) = selected {
                    match dialog::doctor::DoctorDialog::open(&forest, id, self.doctor) {
                        Ok(Some(d)) => self.open("doctor", Ok(Dialog::Doctor(d))),
                        Ok(None) => {
                            let name = self.display_path(&forest.nodes[id].record.path);
                            self.say(Status::done(format!(
                                "{name}: no chain problems (chains up to {} backing files \
                                 deep are fine)",
                                self.doctor.max_depth
                            )));
                        }
                        Err(why) => self.open("doctor", Err(why)),
                    }
                }
            }
            Action::Protect => {
                if let Some(id) = selected {
                    match dialog::protect::job(&forest, id) {
                        Ok(spec) => self.submit(spec),
                        Err(why) => self.say(Status::error(why)),
                    }
                }
            }
            Action::Snapshots => {
                if let Some(id) = selected {
                    let d =
                        dialog::snapshot::SnapshotDialog::open(&forest, id, self.details.as_ref())
                            .map(Dialog::Snapshot);
                    let opened = d.is_ok();
                    self.open("list the snapshots of", d);
                    if opened {
                        self.list_on_host(&forest, id);
                    }
                }
            }
            Action::Bitmaps => {
                if let Some(id) = selected {
                    let d = dialog::bitmaps::BitmapDialog::open(&forest, id, self.details.as_ref())
                        .map(Dialog::Bitmaps);
                    let opened = d.is_ok();
                    self.open("list the bitmaps of", d);
                    if opened {
                        self.list_on_host(&forest, id);
                    }
                }
            }
            Action::CancelJob => self.cancel_job(None),
            Action::FocusJobs => {
                if self.jobs.is_empty() {
                    self.say(Status::info("no jobs"));
                } else {
                    self.mode = Mode::Jobs;
                    if self.job_selected.is_none() {
                        // Start where the pane starts: the newest job.
                        self.job_selected = self.jobs.last().map(|j| j.id);
                    }
                }
            }
            Action::Log => self.mode = Mode::Log(view::log_max_scroll(self)),
            Action::Rescan => {
                self.scanning = true;
                self.catalog.send(CatalogCmd::Rescan);
                self.request_details();
            }
            Action::Help => self.mode = Mode::Help(0),
            Action::Quit => self.quit = true,
            _ => {}
        }
    }

    fn filter_key(&mut self, key: Key, action: Option<Action>) {
        if let Some(c) = key.typed() {
            self.filter.push(c);
            self.rebuild_rows();
            return;
        }
        match action {
            Some(Action::Keep) => self.mode = Mode::Tree,
            Some(Action::Clear) => {
                self.filter.clear();
                self.mode = Mode::Tree;
                self.rebuild_rows();
            }
            Some(Action::Delete) => {
                self.filter.pop();
                self.rebuild_rows();
            }
            Some(a @ (Action::Up | Action::Down)) => self.tree_action(a),
            _ => {}
        }
    }

    fn jobs_key(&mut self, action: Option<Action>) {
        match action {
            Some(Action::Up) => self.move_job_selection(-1),
            Some(Action::Down) => self.move_job_selection(1),
            Some(Action::Open) => {
                if let Some(id) = self.job_selected.or_else(|| self.jobs.last().map(|j| j.id)) {
                    self.mode = Mode::Job(id);
                }
            }
            Some(Action::CancelJob) => self.cancel_job(self.job_selected),
            Some(Action::Back) => self.mode = Mode::Tree,
            _ => {}
        }
    }

    /// Cancel job `id`, or else the newest one not finished.
    fn cancel_job(&mut self, id: Option<JobId>) {
        let target = match id {
            Some(id) => self.jobs.iter().find(|j| j.id == id),
            None => self.jobs.iter().rev().find(|j| !j.state.is_finished()),
        };
        let Some(j) = target else {
            self.say(Status::info("no job to cancel"));
            return;
        };
        if j.state.is_finished() {
            let text = format!("{}: already {}", j.label, j.state.name());
            self.say(Status::info(text));
        } else {
            let (id, text) = (j.id, format!("{}: cancelling…", j.label));
            self.pool.cancel(id);
            self.say(Status::info(text));
        }
    }

    /// Move the job selection in the order the pane shows (newest first).
    fn move_job_selection(&mut self, delta: isize) {
        let order: Vec<JobId> = self.jobs.iter().rev().map(|j| j.id).collect();
        if order.is_empty() {
            return;
        }
        let at = self
            .job_selected
            .and_then(|id| order.iter().position(|&o| o == id))
            .unwrap_or(0);
        let to = at.saturating_add_signed(delta).min(order.len() - 1);
        self.job_selected = Some(order[to]);
    }

    fn move_selection(&mut self, delta: isize) {
        if self.rows.is_empty() {
            return;
        }
        let last = self.rows.len() - 1;
        let to = self.selected.saturating_add_signed(delta).min(last);
        self.select_row(to);
    }

    fn select_row(&mut self, i: usize) {
        if let Some(row) = self.rows.get(i) {
            self.selected = i;
            let key = self.forest.nodes[row.id].record.key.clone();
            if self.selected_key.as_ref() != Some(&key) {
                self.selected_key = Some(key);
                self.request_details();
            }
            self.scroll_to_selection();
        }
    }

    /// For an image on another host: ask its agent, on a thread of its own,
    /// for the snapshots and bitmaps the open dialog lists; the answer
    /// comes back as [`Event::Listing`].
    fn list_on_host(&self, forest: &Forest, id: NodeId) {
        let r = &forest.nodes[id].record;
        let Some(host) = r.host.clone() else {
            return;
        };
        let (key, image, events) = (r.key.clone(), r.path.clone(), self.events.clone());
        let ask = move || {
            let ssh = crate::remote::client::SshOptions::from_env();
            let listing =
                crate::remote::client::list_on_host(&host, &ssh, &image).map_err(|e| e.to_string());
            let _ = events.send(Event::Listing { key, listing });
        };
        if let Err(e) = std::thread::Builder::new()
            .name("cowshed-list".into())
            .spawn(ask)
        {
            let _ = self.events.send(Event::Listing {
                key: r.key.clone(),
                listing: Err(format!("cannot start a thread: {e}")),
            });
        }
    }

    /// Whether `action` on the images of another host opens its dialog (or
    /// makes its job) as for local ones, the job then run by that host's
    /// agent: every action on one image; rebase, convert, flatten, reset,
    /// commit and delete on marked images of one host.
    fn agent_runs_dialog(&self, action: Action, forest: &Forest) -> bool {
        let targets = self.targets();
        let one_host = targets
            .first()
            .map(|&t| &forest.nodes[t].record.host)
            .is_some_and(|h| targets.iter().all(|&t| forest.nodes[t].record.host == *h));
        match action {
            Action::Clone
            | Action::CloneAs
            | Action::CloneMany
            | Action::Move
            | Action::Snapshots
            | Action::Bitmaps
            | Action::Doctor
            | Action::Protect => !self.has_marks(),
            // With marks, their batches: every image planned from the
            // host's forest, each job run by its agent.
            Action::Rebase
            | Action::Convert
            | Action::Flatten
            | Action::ResetImage
            | Action::Commit
            | Action::DeleteImage => one_host,
            _ => false,
        }
    }

    /// An action on images of another host that the agent does not run
    /// (several at once where only one is acted on, or images of several
    /// hosts): refused here, never run on a local file of the same name.
    fn refuse_on_other_hosts(&mut self, ids: &[NodeId]) {
        let r = &self.forest.nodes[ids[0]].record;
        let text = match (&r.host, ids.len()) {
            (Some(host), 1) => format!(
                "{} is on {host}: with marks, only rebase, convert, flatten, reset, commit and \
                 delete batch another host's images; clear the marks to act on it alone",
                r.location()
            ),
            _ => "on other hosts that acts on one image at a time; rebase, convert, flatten, \
                  reset, commit and delete also batch the marked images of one host"
                .to_string(),
        };
        self.say(Status::error(text));
    }

    fn request_details(&mut self) {
        let Some(id) = self.selected_node() else {
            self.details = None;
            return;
        };
        let node = &self.forest.nodes[id];
        let r = &node.record;
        if self.details.as_ref().is_some_and(|d| d.key != r.key) {
            self.details = None;
        }
        self.details_stamp = self.selected_stamp();
        // A file that is no image has no details to compute.
        if node.flags.iter().any(|f| matches!(f, Flag::Skipped { .. })) {
            self.details_wanted = None;
            return;
        }
        self.details_wanted = Some(r.key.clone());
        match &r.host {
            // Another host's file is not read here (a local file of the
            // same name is another file): its agent reads it.
            Some(host) => {
                self.inspector
                    .request_remote(r.key.clone(), host.clone(), r.path.clone())
            }
            None => self.inspector.request(r.key.clone(), r.path.clone()),
        }
    }

    fn selected_stamp(&self) -> Option<Stamp> {
        let r = &self.forest.nodes[self.selected_node()?].record;
        Some((r.key.clone(), r.sizes, r.mtime, r.summary.clone()))
    }

    fn left(&mut self) {
        let Some(row) = self.rows.get(self.selected).cloned() else {
            return;
        };
        if row.has_children && !row.folded {
            self.toggle_fold();
        } else if let Some(p) = self.forest.nodes[row.id].parent {
            if let Some(i) = self.rows.iter().position(|r| r.id == p) {
                self.select_row(i);
            }
        }
    }

    fn right(&mut self) {
        let Some(row) = self.rows.get(self.selected).cloned() else {
            return;
        };
        if row.folded {
            self.toggle_fold();
        } else if row.has_children {
            self.move_selection(1);
        }
    }

    fn toggle_fold(&mut self) {
        let Some(row) = self.rows.get(self.selected) else {
            return;
        };
        if !row.has_children {
            return;
        }
        let key = self.forest.nodes[row.id].record.key.clone();
        if !self.folded.remove(&key) {
            self.folded.insert(key);
        }
        self.rebuild_rows();
    }

    fn on_mouse(&mut self, m: MouseEvent) {
        let layout = view::layout(self.area);
        let body = layout.tree_body;
        match m.kind {
            MouseEventKind::Down(MouseButton::Left)
                if body.contains(Position::new(m.column, m.row)) =>
            {
                let i = self.offset + usize::from(m.row - body.y);
                if i < self.rows.len() {
                    self.select_row(i);
                }
            }
            MouseEventKind::ScrollDown => self.scroll(3),
            MouseEventKind::ScrollUp => self.scroll(-3),
            _ => {}
        }
    }

    /// Scroll the view; the selection follows when it would leave it.
    fn scroll(&mut self, delta: isize) {
        let height = usize::from(view::layout(self.area).tree_body.height).max(1);
        let max_offset = self.rows.len().saturating_sub(height);
        self.offset = self.offset.saturating_add_signed(delta).min(max_offset);
        let sel = self.selected.clamp(
            self.offset,
            (self.offset + height - 1).min(self.rows.len().saturating_sub(1)),
        );
        if sel != self.selected {
            self.select_row(sel);
        }
    }

    fn scroll_to_selection(&mut self) {
        let height = usize::from(view::layout(self.area).tree_body.height).max(1);
        if self.selected < self.offset {
            self.offset = self.selected;
        } else if self.selected >= self.offset + height {
            self.offset = self.selected + 1 - height;
        }
        self.offset = self.offset.min(self.rows.len().saturating_sub(height));
    }

    /// The filter the rows follow: the picker's own while picking a
    /// backing, else the tree's.
    pub fn effective_filter(&self) -> &str {
        match &self.dialog {
            Some(Dialog::Pick(p)) => &p.filter,
            _ => &self.filter,
        }
    }

    /// Recompute the visible rows, keeping the selected image selected.
    fn rebuild_rows(&mut self) {
        let f = Arc::clone(&self.forest);
        self.rows = build_rows(
            &f,
            &RowOptions {
                roots: &self.roots,
                folded: &self.folded,
                filter: self.effective_filter(),
                sort: self.sort,
                growth: &self.growth,
            },
        );
        let found = self.selected_key.as_ref().and_then(|k| {
            self.rows
                .iter()
                .position(|r| &f.nodes[r.id].record.key == k)
        });
        let index = found.unwrap_or(self.selected.min(self.rows.len().saturating_sub(1)));
        self.selected = index;
        let key = self
            .rows
            .get(index)
            .map(|r| f.nodes[r.id].record.key.clone());
        if key != self.selected_key
            || (key.is_some() && self.details.is_none() && self.details_wanted.is_none())
        {
            self.selected_key = key;
            self.request_details();
        }
        self.scroll_to_selection();
    }
}

/// A scroll position after a scrolling action, or `None` when `action`
/// does not scroll.
fn scrolled(at: usize, max: usize, action: Option<Action>, page: usize) -> Option<usize> {
    let at = at.min(max);
    Some(match action? {
        Action::Up => at.saturating_sub(1),
        Action::Down => (at + 1).min(max),
        Action::PageUp => at.saturating_sub(page),
        Action::PageDown => (at + page).min(max),
        Action::Top => 0,
        Action::Bottom => max,
        _ => return None,
    })
}

fn totals(f: &Forest) -> Totals {
    let is_image = |id: &NodeId| {
        !f.nodes[*id]
            .flags
            .iter()
            .any(|fl| matches!(fl, Flag::Skipped { .. }))
    };
    let mut t = Totals {
        images: (0..f.nodes.len()).filter(is_image).count(),
        ..Totals::default()
    };
    for &r in &f.roots {
        if !f.nodes[r].children.is_empty() {
            t.bases += 1;
        }
        t.saved += f.space(r).saved();
    }
    t
}

/// The local time of day, `HH:MM:SS`, for the log.
fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t = libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: localtime_r writes only into `tm`, which lives here; a null
    // return (no time zone data) falls back to UTC arithmetic below.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let local = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if local {
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        let s = now % 86_400;
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    }
}

/// Actions that read or change the images they act on (beyond the
/// catalog's facts).
fn acts_on_images(action: Action) -> bool {
    matches!(
        action,
        Action::Clone
            | Action::CloneAs
            | Action::CloneMany
            | Action::Commit
            | Action::Rebase
            | Action::Flatten
            | Action::Convert
            | Action::Move
            | Action::DeleteImage
            | Action::ResetImage
            | Action::Doctor
            | Action::Protect
            | Action::Snapshots
            | Action::Bitmaps
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrolling_stays_within_bounds() {
        assert_eq!(scrolled(0, 10, Some(Action::Up), 5), Some(0));
        assert_eq!(scrolled(9, 10, Some(Action::PageDown), 5), Some(10));
        assert_eq!(scrolled(3, 10, Some(Action::Bottom), 5), Some(10));
        assert_eq!(scrolled(30, 10, Some(Action::Up), 5), Some(9));
        assert_eq!(scrolled(3, 10, Some(Action::Close), 5), None);
        assert_eq!(clock().len(), 8);
    }
}
