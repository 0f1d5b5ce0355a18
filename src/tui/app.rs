//! The TUI's state and its one way to change: [`App::update`]. Nothing here
//! reads a file: scans, probes and details are asked of the worker threads
//! (`worker.rs`), engine operations run as jobs, and the answers come back
//! as events.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ratatui::crossterm::event::{
    Event as CtEvent, KeyCode, KeyEvent, KeyEventKind, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::{Position, Rect};

use super::chainops::{BackingPick, ConvertPlan, FlattenPlan, RebasePlan};
use super::config::Config;
use super::event::Event;
use super::keymap::{Action, Key, Keymap};
use super::theme::Theme;
use super::view;
use super::worker::{CatalogCmd, CatalogHandle, Details, InspectHandle};
use crate::catalog::{Forest, NodeId};
use crate::engine::{self, CreateOptions, Format};
use crate::jobs::{JobId, JobState, Jobs, Work, DEFAULT_WORKERS};

/// Identity and state of a record, to tell when details are stale.
type Stamp = (
    PathBuf,
    crate::catalog::Sizes,
    Option<std::time::SystemTime>,
    Option<crate::engine::HeaderSummary>,
);

/// How often the UI redraws while something moves.
pub const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Size,
    Growth,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::Size => "size",
            SortKey::Growth => "growth",
        }
    }

    fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::Size,
            SortKey::Size => SortKey::Growth,
            SortKey::Growth => SortKey::Name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing a filter.
    Filter,
    /// Typing the name of a clone of the image with this key.
    CloneName {
        source: PathBuf,
        input: String,
    },
    Help,
    /// Asking before a commit; nothing has been done yet.
    ConfirmCommit(Box<CommitPlan>),
    /// `b`: choosing the new backing in the tree (or typing its path).
    PickBacking(Box<BackingPick>),
    /// Safe or unsafe, asked before a rebase.
    ConfirmRebase(Box<RebasePlan>),
    ConfirmFlatten(Box<FlattenPlan>),
    /// The convert dialog.
    Convert(Box<ConvertPlan>),
}

/// What a commit of the selected overlay would do, computed from the forest
/// in memory when `m` is pressed (no I/O on the key path), shown in the
/// confirm dialog and carried out when confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPlan {
    pub top: PathBuf,
    pub top_key: PathBuf,
    pub base: PathBuf,
    pub base_key: PathBuf,
    /// The overlay's allocated bytes: about what gets copied.
    pub allocated: u64,
    /// Other overlays of the base (the top's siblings and everything on
    /// them) among the scanned images: their view changes with the base.
    pub affected: usize,
    /// The base's file system may be too small for what is copied.
    pub space_warning: Option<String>,
    /// What the user typed: with affected overlays the word `yes` is
    /// required, so a reflexive Enter cannot invalidate them.
    pub input: String,
    /// Enter was pressed without `yes` typed: say what is wanted.
    pub nudge: bool,
}

impl CommitPlan {
    pub fn needs_typed_yes(&self) -> bool {
        self.affected > 0
    }
}

/// One visible line of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: NodeId,
    pub depth: usize,
    /// Tree guides drawn before the name (`│ ├ └`).
    pub guides: String,
    pub has_children: bool,
    pub folded: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Growth {
    pub rate: f64,
    pub history: Vec<u64>,
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
    pub progress: (u64, u64),
    /// When it started running, for the rate.
    pub started: Option<Instant>,
    /// Bytes per second since it started, and the time left at that rate;
    /// computed on ticks so drawing stays a pure function of state.
    pub rate: f64,
    pub eta: Option<Duration>,
}

impl JobView {
    pub(crate) fn new(
        id: JobId,
        kind: &'static str,
        label: String,
        touches: Vec<PathBuf>,
    ) -> JobView {
        JobView {
            id,
            kind,
            label,
            touches,
            refresh: Vec::new(),
            state: JobState::Queued,
            progress: (0, 0),
            started: None,
            rate: 0.0,
            eta: None,
        }
    }
}

/// A message on the status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
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
    pub details: Option<Details>,
    pub growth: HashMap<PathBuf, Growth>,
    pub jobs: Vec<JobView>,
    /// Keys move through the jobs pane instead of the tree (Tab).
    pub jobs_focus: bool,
    /// The job `x` cancels; `None` means the newest unfinished one.
    pub job_selected: Option<JobId>,
    pub status: Option<Status>,
    /// The terminal's size, for layout-dependent decisions (scrolling,
    /// mouse hits).
    pub area: Rect,
    pub quit: bool,

    selected_key: Option<PathBuf>,
    details_wanted: Option<PathBuf>,
    /// What the selected record looked like when its details were asked.
    details_stamp: Option<Stamp>,
    /// Select this path as soon as the catalog shows it (a new clone).
    select_after: Option<PathBuf>,
    catalog_seen: u64,
    catalog: CatalogHandle,
    pub(crate) inspector: InspectHandle,
    pub(crate) pool: Jobs,
    /// Last time a growth report said an image grows.
    last_growth: Option<Instant>,
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
        let mut catalog = CatalogHandle::start(roots.clone(), live, events.clone())?;
        let inspector = InspectHandle::start(events.clone())?;
        let pool = Jobs::new(DEFAULT_WORKERS, events);
        catalog.send(CatalogCmd::Rescan);
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
            mode: Mode::Normal,
            details: None,
            growth: HashMap::new(),
            jobs: Vec::new(),
            jobs_focus: false,
            job_selected: None,
            status: None,
            area,
            quit: false,
            selected_key: None,
            details_wanted: None,
            details_stamp: None,
            select_after: None,
            catalog_seen: 0,
            catalog,
            inspector,
            pool,
            last_growth: None,
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
            || matches!(&self.mode, Mode::PickBacking(p) if p.probing.is_some())
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

    /// The path to show for an image: relative to the root it was found
    /// under, so the screen says what the operator typed.
    pub fn display_path(&self, p: &Path) -> String {
        for r in &self.roots {
            if let Ok(rel) = p.strip_prefix(r) {
                if !rel.as_os_str().is_empty() {
                    return rel.display().to_string();
                }
            }
        }
        p.display().to_string()
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

    pub fn update(&mut self, event: Event) {
        match event {
            Event::Input(CtEvent::Key(k)) if k.kind != KeyEventKind::Release => self.on_key(k),
            Event::Input(CtEvent::Mouse(m)) => self.on_mouse(m),
            Event::Input(CtEvent::Resize(w, h)) => {
                self.area = Rect::new(0, 0, w, h);
                self.scroll_to_selection();
            }
            Event::Input(_) => {}
            Event::Catalog(u) => {
                self.catalog_seen = self.catalog_seen.max(u.seq);
                self.scanning = u.scanning;
                self.scan_errors = u.errors;
                self.forest = u.forest;
                self.totals = totals(&self.forest);
                let mut select = None;
                if let Some(want) = &self.select_after {
                    if let Some(id) = self
                        .forest
                        .nodes
                        .iter()
                        .position(|n| &n.record.path == want)
                    {
                        // Unfold the way to it, and make sure a filter
                        // does not hide it.
                        for a in self.forest.chain(id).into_iter().skip(1) {
                            self.folded.remove(&self.forest.nodes[a].record.key);
                        }
                        if !self.filter.is_empty() && !self.name_matches(id) {
                            self.filter.clear();
                        }
                        select = Some(id);
                        self.select_after = None;
                    } else if !self.scanning && self.catalog_seen >= self.catalog.last_sent() {
                        // The catalog has answered and it is not there.
                        self.select_after = None;
                    }
                }
                self.rebuild_rows();
                if let Some(i) = select.and_then(|id| self.rows.iter().position(|r| r.id == id)) {
                    self.select_row(i);
                }
                // The selected image changed on disk (a guest writes, a
                // header was rewritten): its details are stale.
                let stamp = self.selected_stamp();
                if stamp.is_some() && stamp != self.details_stamp && self.details_wanted.is_none() {
                    self.request_details();
                }
            }
            Event::Details(d) => {
                if self.details_wanted.as_ref() == Some(&d.key) {
                    self.details_wanted = None;
                }
                if self.selected_key.as_ref() == Some(&d.key) {
                    self.details = Some(*d);
                }
            }
            Event::BackingProbe(p) => self.on_backing_probe(p),
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
                self.growth.insert(key, Growth { rate, history });
                if self.sort == SortKey::Growth {
                    self.rebuild_rows();
                }
            }
            Event::Sizes { key, sizes } => {
                if let Some(id) = self.forest.get(&key) {
                    Arc::make_mut(&mut self.forest).nodes[id].record.sizes = sizes;
                    self.totals = totals(&self.forest);
                    if self.sort != SortKey::Name {
                        self.rebuild_rows();
                    }
                    let stamp = self.selected_stamp();
                    if stamp.is_some()
                        && stamp != self.details_stamp
                        && self.details_wanted.is_none()
                    {
                        self.request_details();
                    }
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
            if e.progress.1 > 0 {
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
                self.status = Some(Status { text, error: false });
                if let Some(p) = e.created {
                    self.select_after = Some(p.clone());
                    self.catalog.send(CatalogCmd::Probe(p));
                }
            }
            JobState::Failed(msg) => {
                self.status = Some(Status {
                    text: format!("{label} failed: {}", self.relativize(msg)),
                    error: true,
                });
            }
            JobState::Cancelled => {
                self.status = Some(Status {
                    text: format!("{label}: cancelled"),
                    error: false,
                });
            }
            JobState::Queued | JobState::Running => {}
        }
        // Keep the list short: finished jobs beyond the last few go.
        const KEEP_FINISHED: usize = 4;
        let finished = self.jobs.iter().filter(|j| j.state.is_finished()).count();
        if finished > KEEP_FINISHED {
            let mut drop = finished - KEEP_FINISHED;
            self.jobs.retain(|j| {
                if drop > 0 && j.state.is_finished() {
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

    fn on_key(&mut self, k: KeyEvent) {
        let key = Key::from_event(&k);
        let plain_char = match k.code {
            KeyCode::Char(c) if !key.ctrl && !key.alt => Some(c),
            _ => None,
        };
        match &self.mode {
            Mode::PickBacking(_) => {
                if self.pick_backing_key(k.code, plain_char) {
                    return;
                }
                // Otherwise only moving through the tree: the pick is modal.
                if let Some(
                    action @ (Action::Up
                    | Action::Down
                    | Action::Left
                    | Action::Right
                    | Action::Fold),
                ) = self.keymap.action_for(key)
                {
                    self.dispatch(action);
                }
                return;
            }
            Mode::ConfirmRebase(_) => return self.confirm_rebase_key(k.code, plain_char),
            Mode::ConfirmFlatten(_) => return self.confirm_flatten_key(k.code, plain_char),
            Mode::Convert(_) => return self.convert_key(k.code, plain_char),
            _ => {}
        }
        match &mut self.mode {
            Mode::Help => {
                // Any key closes help; it is a popup, not a mode to learn.
                self.mode = Mode::Normal;
                return;
            }
            Mode::Filter => match k.code {
                KeyCode::Esc => {
                    self.filter.clear();
                    self.mode = Mode::Normal;
                    self.rebuild_rows();
                    return;
                }
                KeyCode::Enter => {
                    self.mode = Mode::Normal;
                    return;
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                    self.rebuild_rows();
                    return;
                }
                KeyCode::Char(c) if !key.ctrl && !key.alt => {
                    self.filter.push(c);
                    self.rebuild_rows();
                    return;
                }
                // Arrows and the like still move through the results.
                _ => {}
            },
            Mode::CloneName { source, input } => {
                match k.code {
                    KeyCode::Esc => self.mode = Mode::Normal,
                    KeyCode::Enter => {
                        let (source, name) = (source.clone(), input.trim().to_string());
                        self.mode = Mode::Normal;
                        if !name.is_empty() {
                            self.clone_image(&source, Some(name));
                        }
                    }
                    KeyCode::Backspace => {
                        input.pop();
                    }
                    KeyCode::Char(c) if !key.ctrl && !key.alt => input.push(c),
                    _ => {}
                }
                return;
            }
            Mode::ConfirmCommit(plan) => {
                let confirmed = match k.code {
                    // `n` cancels in both forms: `yes` has no n in it.
                    KeyCode::Esc | KeyCode::Char('n' | 'N') => {
                        self.mode = Mode::Normal;
                        self.status = Some(Status {
                            text: "commit cancelled: nothing was changed".into(),
                            error: false,
                        });
                        return;
                    }
                    KeyCode::Enter if plan.needs_typed_yes() => {
                        let yes = plan.input.trim().eq_ignore_ascii_case("yes");
                        if !yes {
                            plan.input.clear();
                            plan.nudge = true;
                        }
                        yes
                    }
                    KeyCode::Backspace => {
                        plan.input.pop();
                        false
                    }
                    KeyCode::Char(c) if plan.needs_typed_yes() && !key.ctrl && !key.alt => {
                        // A few letters are enough for `yes`; more is noise.
                        if plan.input.chars().count() < 8 {
                            plan.input.push(c);
                        }
                        false
                    }
                    KeyCode::Enter | KeyCode::Char('y' | 'Y') => !plan.needs_typed_yes(),
                    _ => false,
                };
                if confirmed {
                    let plan = std::mem::replace(&mut self.mode, Mode::Normal);
                    if let Mode::ConfirmCommit(plan) = plan {
                        self.submit_commit(*plan);
                    }
                }
                return;
            }
            // Handled above.
            Mode::PickBacking(_)
            | Mode::ConfirmRebase(_)
            | Mode::ConfirmFlatten(_)
            | Mode::Convert(_) => return,
            Mode::Normal => {
                if self.jobs_focus && k.code == KeyCode::Esc {
                    self.jobs_focus = false;
                    return;
                }
                if k.code == KeyCode::Esc && !self.filter.is_empty() {
                    self.filter.clear();
                    self.rebuild_rows();
                    return;
                }
            }
        }
        if let Some(action) = self.keymap.action_for(key) {
            self.dispatch(action);
        }
    }

    fn dispatch(&mut self, action: Action) {
        match action {
            // With the jobs pane focused, up and down pick the job `x` acts on.
            Action::Up if self.jobs_focus => self.move_job_selection(-1),
            Action::Down if self.jobs_focus => self.move_job_selection(1),
            Action::Up => self.move_selection(-1),
            Action::Down => self.move_selection(1),
            Action::Left => self.left(),
            Action::Right => self.right(),
            Action::Fold => self.toggle_fold(),
            Action::Filter => self.mode = Mode::Filter,
            Action::Sort => {
                self.sort = self.sort.next();
                self.status = Some(Status {
                    text: format!("sorted by {}", self.sort.name()),
                    error: false,
                });
                self.rebuild_rows();
            }
            Action::Clone => {
                if let Some(key) = self.selected_key.clone() {
                    self.clone_image(&key, None);
                }
            }
            Action::CloneAs => {
                if let Some(source) = self.selected_key.clone() {
                    self.mode = Mode::CloneName {
                        source,
                        input: String::new(),
                    };
                }
            }
            Action::Commit => self.ask_commit(),
            Action::Rebase => self.ask_rebase(),
            Action::Flatten => self.ask_flatten(),
            Action::Convert => self.ask_convert(),
            Action::CancelJob => self.cancel_job(),
            Action::FocusJobs => {
                if self.jobs.is_empty() {
                    self.jobs_focus = false;
                    self.status = Some(Status {
                        text: "no jobs".into(),
                        error: false,
                    });
                } else {
                    self.jobs_focus = !self.jobs_focus;
                    if self.jobs_focus && self.job_selected.is_none() {
                        // Start where the pane starts: the newest job.
                        self.job_selected = self.jobs.last().map(|j| j.id);
                    }
                }
            }
            Action::Rescan => {
                self.scanning = true;
                self.catalog.send(CatalogCmd::Rescan);
                self.request_details();
            }
            Action::Help => self.mode = Mode::Help,
            Action::Quit => self.quit = true,
        }
    }

    /// Queue a job that creates an overlay of the image with `key` next to
    /// it: `<stem>-<n>.qcow2` with the first free n, or `name`. The backing
    /// name is the file name alone (same directory, so it stays valid when
    /// the directory moves) and its format is recorded.
    fn clone_image(&mut self, key: &Path, name: Option<String>) {
        let Some(id) = self.forest.get(key) else {
            return;
        };
        let record = &self.forest.nodes[id].record;
        let fail = |app: &mut App, text: String| {
            app.status = Some(Status { text, error: true });
        };
        let Some(format) = record.summary.as_ref().map(|s| s.format) else {
            let text = format!(
                "cannot clone {}: its header could not be read",
                self.display_path(&record.path)
            );
            return fail(self, text);
        };
        if !matches!(format, Format::Qcow2 | Format::Raw) {
            let text = format!("cannot clone a {} image", format.name());
            return fail(self, text);
        }
        // An overlay on a disk a VM writes would read it changing.
        if let Err(why) = crate::tui::chainops::in_use(&self.forest, &[id], true) {
            let text = format!("cannot clone {}: {why}", self.display_path(&record.path));
            return fail(self, text);
        }
        if name.as_deref().is_some_and(|n| n.contains('/')) {
            return fail(
                self,
                "give a file name, not a path: the clone goes next to its backing image".into(),
            );
        }
        let source = record.path.clone();
        let Some(file_name) = source.file_name().map(|f| f.to_string_lossy().into_owned()) else {
            return;
        };
        let label = format!("clone {}", self.display_path(&source));
        let work: Work = Box::new(move |_progress, cancel| {
            cancel.check()?;
            let dir = source.parent().unwrap_or(Path::new(""));
            let target = match name {
                Some(n) => dir.join(n),
                None => first_free_clone_name(&source)?,
            };
            let opts = CreateOptions {
                format: Format::Qcow2,
                backing: Some(file_name),
                backing_format: Some(format),
                ..CreateOptions::default()
            };
            engine::create(&target, &opts)?;
            Ok(Some(target))
        });
        let job = self.pool.submit(vec![key.to_path_buf()], work);
        self.jobs
            .push(JobView::new(job, "clone", label, vec![key.to_path_buf()]));
    }

    /// `m`: check that the selected image can be committed, from what the
    /// forest knows, and open the confirm dialog; or say why not.
    fn ask_commit(&mut self) {
        let Some(id) = self.selected_node() else {
            return;
        };
        match commit_plan(&self.forest, id) {
            Ok(mut plan) => {
                plan.space_warning =
                    crate::tui::chainops::space_warning(&plan.base, plan.allocated);
                self.mode = Mode::ConfirmCommit(Box::new(plan));
            }
            Err(why) => {
                let name = self.display_path(&self.forest.nodes[id].record.path);
                self.status = Some(Status {
                    text: format!("cannot commit {name}: {why}"),
                    error: true,
                });
            }
        }
    }

    /// Queue the confirmed commit. It touches both images, so no other job
    /// on either runs meanwhile; the engine takes QEMU's locks itself.
    fn submit_commit(&mut self, plan: CommitPlan) {
        let label = format!(
            "commit {} → {}",
            file_name(&plan.top),
            file_name(&plan.base)
        );
        let top = plan.top.clone();
        let work: Work = Box::new(move |progress, cancel| {
            let opts = engine::CommitOptions {
                base: None,
                keep_top: false,
            };
            engine::commit(&top, &opts, progress, cancel)?;
            Ok(None)
        });
        let touches = vec![plan.top_key.clone(), plan.base_key.clone()];
        let id = self.pool.submit(touches.clone(), work);
        let mut view = JobView::new(id, "commit", label.clone(), touches);
        view.refresh = vec![plan.top, plan.base];
        self.jobs.push(view);
        self.status = Some(Status {
            text: format!("{label}: started (x cancels)"),
            error: false,
        });
    }

    /// `x`: cancel the job selected in the focused jobs pane, or else the
    /// newest one not finished.
    fn cancel_job(&mut self) {
        // The selection counts only while the pane has the focus: from the
        // tree, `x` means "stop what is running now".
        let selected = self.job_selected.filter(|_| self.jobs_focus);
        let target = match selected {
            Some(id) => self.jobs.iter().find(|j| j.id == id),
            None => self.jobs.iter().rev().find(|j| !j.state.is_finished()),
        };
        let Some(j) = target else {
            self.status = Some(Status {
                text: "no job to cancel".into(),
                error: false,
            });
            return;
        };
        let (id, text) = if j.state.is_finished() {
            (None, format!("{}: already {}", j.label, j.state.name()))
        } else {
            (Some(j.id), format!("{}: cancelling…", j.label))
        };
        if let Some(id) = id {
            self.pool.cancel(id);
        }
        self.status = Some(Status { text, error: false });
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

    fn request_details(&mut self) {
        let Some(id) = self.selected_node() else {
            self.details = None;
            return;
        };
        let r = &self.forest.nodes[id].record;
        if self.details.as_ref().is_some_and(|d| d.key != r.key) {
            self.details = None;
        }
        self.details_wanted = Some(r.key.clone());
        self.inspector.request(r.key.clone(), r.path.clone());
        self.details_stamp = self.selected_stamp();
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

    fn name_matches(&self, id: NodeId) -> bool {
        let name = file_name(&self.forest.nodes[id].record.path);
        name.to_lowercase().contains(&self.filter.to_lowercase())
    }

    /// Recompute the visible rows from the forest, folds, filter and sort,
    /// keeping the selected image selected.
    fn rebuild_rows(&mut self) {
        let f = Arc::clone(&self.forest);
        // With a filter: matches and their ancestors, all unfolded.
        let shown: Option<HashSet<NodeId>> = (!self.filter.is_empty()).then(|| {
            let mut s = HashSet::new();
            for id in 0..f.nodes.len() {
                if self.name_matches(id) {
                    s.extend(f.chain(id));
                }
            }
            s
        });
        let mut rows = Vec::new();
        let roots = self.sorted(&f, &f.roots, shown.as_ref());
        for &r in &roots {
            self.push_rows(&f, r, 0, &mut Vec::new(), shown.as_ref(), &mut rows);
        }
        self.rows = rows;
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

    fn sorted(&self, f: &Forest, ids: &[NodeId], shown: Option<&HashSet<NodeId>>) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| shown.is_none_or(|s| s.contains(id)))
            .collect();
        let name = |id: &NodeId| file_name(&f.nodes[*id].record.path);
        match self.sort {
            SortKey::Name => v.sort_by_key(|id| name(id)),
            SortKey::Size => v.sort_by(|a, b| {
                f.nodes[*b]
                    .record
                    .sizes
                    .allocated
                    .cmp(&f.nodes[*a].record.sizes.allocated)
                    .then_with(|| name(a).cmp(&name(b)))
            }),
            SortKey::Growth => {
                let rate = |id: &NodeId| {
                    self.growth
                        .get(&f.nodes[*id].record.key)
                        .map_or(0.0, |g| g.rate)
                };
                v.sort_by(|a, b| {
                    rate(b)
                        .total_cmp(&rate(a))
                        .then_with(|| name(a).cmp(&name(b)))
                });
            }
        }
        v
    }

    /// Push `id` and (unless folded) its subtree. `last` says, for each
    /// ancestor level, whether that ancestor was the last of its siblings.
    fn push_rows(
        &self,
        f: &Forest,
        id: NodeId,
        depth: usize,
        last: &mut Vec<bool>,
        shown: Option<&HashSet<NodeId>>,
        rows: &mut Vec<Row>,
    ) {
        let children = self.sorted(f, &f.nodes[id].children, shown);
        let folded = shown.is_none() && self.folded.contains(&f.nodes[id].record.key);
        // `last` holds one entry per level including this node's own.
        let mut g = String::new();
        for (lvl, &l) in last.iter().enumerate() {
            if lvl + 1 == last.len() {
                g.push_str(if l { "└ " } else { "├ " });
            } else {
                g.push_str(if l { "  " } else { "│ " });
            }
        }
        rows.push(Row {
            id,
            depth,
            guides: g,
            has_children: !children.is_empty(),
            folded: folded && !children.is_empty(),
        });
        if folded {
            return;
        }
        let n = children.len();
        for (i, c) in children.into_iter().enumerate() {
            last.push(i + 1 == n);
            self.push_rows(f, c, depth + 1, last, shown, rows);
            last.pop();
        }
    }
}

impl JobView {
    /// Average rate since the start and the time left at that rate.
    fn update_rate(&mut self, now: Instant) {
        let Some(start) = self.started else {
            return;
        };
        let secs = now.duration_since(start).as_secs_f64();
        let (done, total) = self.progress;
        // Over the first few milliseconds the average is mostly noise.
        if secs < 0.05 || done == 0 {
            return;
        }
        self.rate = done as f64 / secs;
        self.eta =
            (total >= done).then(|| Duration::from_secs_f64((total - done) as f64 / self.rate));
    }
}

/// What committing node `id` into its backing would do, or why it cannot.
/// Only the forest is read: this runs on a key press.
pub fn commit_plan(f: &Forest, id: NodeId) -> Result<CommitPlan, String> {
    let node = &f.nodes[id];
    let r = &node.record;
    let Some(summary) = &r.summary else {
        return Err("its header could not be read".into());
    };
    if summary.format == Format::Raw {
        return Err("a raw image has no backing image to commit into".into());
    }
    if summary.format != Format::Qcow2 {
        return Err(format!(
            "{} images are not supported",
            summary.format.name()
        ));
    }
    if let Some(flag) = node.flags.iter().find(|fl| fl.is_broken()) {
        return Err(flag.describe());
    }
    let Some(parent) = node.parent else {
        return Err(match &summary.backing_filename {
            None => "it has no backing image: nothing to commit into".into(),
            Some(b) => format!("its backing image {b} was not found"),
        });
    };
    let base = &f.nodes[parent];
    if let Some(flag) = base.flags.iter().find(|fl| fl.is_broken()) {
        return Err(format!("its backing image is broken: {}", flag.describe()));
    }
    // The top is emptied and the base written: a VM on either (or on any
    // overlay of the top, which holds the top as its backing) stops it.
    crate::tui::chainops::in_use(f, &[id, parent], false)?;
    let affected = base
        .children
        .iter()
        .filter(|&&c| c != id)
        .map(|&c| f.walk(c).len())
        .sum();
    Ok(CommitPlan {
        top: r.path.clone(),
        top_key: r.key.clone(),
        base: base.record.path.clone(),
        base_key: base.record.key.clone(),
        allocated: r.sizes.allocated,
        affected,
        space_warning: None,
        input: String::new(),
        nudge: false,
    })
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

fn totals(f: &Forest) -> Totals {
    let mut t = Totals {
        images: f.nodes.len(),
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

/// `<stem>-<n>.qcow2` beside `source` with the first n whose name is free.
/// Runs in a job (it stats files); `engine::create` refuses to overwrite
/// anyway if another process takes the name in between.
fn first_free_clone_name(source: &Path) -> engine::Result<PathBuf> {
    let dir = source.parent().unwrap_or(Path::new(""));
    let stem = source
        .file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
    for n in 1..100_000u32 {
        let candidate = dir.join(format!("{stem}-{n}.qcow2"));
        match candidate.symlink_metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(candidate),
            Err(e) => return Err(engine::Error::io(candidate, e)),
            Ok(_) => {}
        }
    }
    Err(engine::Error::invalid(
        source,
        "no free clone name: 100000 clones exist already",
    ))
}
