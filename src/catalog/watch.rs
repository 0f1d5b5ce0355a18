//! Live updates: file-system events (notify, debounced) and a poll fallback
//! turned into [`CatalogEvent`]s for the UI.
//!
//! The watcher runs one thread of its own. On an event it re-stats only the
//! touched file; the header is re-read only when the file's size or mtime
//! moved (a cheap probe: one small read), and the full record (lock holders
//! from `/proc`) only when the header or the lock state changed. An event
//! that changes no stat (a process opening or closing the image) has the
//! lock bytes looked at, so a QEMU starting on an image shows at once. The
//! poll re-stats the images it knows every `poll_interval` and re-reads the
//! locks of those in use: it covers file systems without inotify, writers
//! that generate no events and holders that leave without one; when notify
//! cannot watch a root (no inotify, watch limit reached) the poll also
//! walks that root to find new files, and with events the roots are walked
//! every `discover_interval` for what came without one.
//!
//! The watcher's own reads are file-system events too (inotify reports
//! opens): a look at a file or directory that changed nothing stat shows
//! ends there, so they echo once and stop.
//!
//! The watcher learns which images exist from [`Watcher::track`] (feed it
//! the scan's records) or by walking the roots itself at start
//! ([`WatchOptions::track_existing`]). A file it has not seen before is
//! reported as [`CatalogEvent::Appeared`], so a consumer should treat an
//! `Appeared` for a key it already has as a replacement.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{never, select, tick, unbounded, Receiver, Sender};
use notify::RecursiveMode;
use notify_debouncer_mini::{new_debouncer, DebounceEventResult, Debouncer};

use super::scan::read_record;
use super::{ImageRecord, Sizes};
use crate::engine::lock::lock_bytes;
use crate::engine::{inspect_file, HeaderSummary, LockState};

/// What changed under the watched roots.
#[derive(Debug, Clone)]
pub enum CatalogEvent {
    /// Only sizes moved (a guest writing): no header change.
    SizesChanged { key: PathBuf, sizes: Sizes },
    /// The image's content was written (its mtime moved) without a header
    /// change: for the stale-base guard, which compares a base's mtime
    /// with its overlays' birth times. Sent beside `SizesChanged` when the
    /// sizes moved too.
    Modified {
        key: PathBuf,
        mtime: Option<SystemTime>,
    },
    /// A new image (created, moved in, or seen for the first time). May name
    /// a key the consumer already has: then it replaces that record.
    Appeared(Box<ImageRecord>),
    /// The image at this key (its canonical path, as in
    /// [`ImageRecord::key`]) is gone: deleted, moved away, or no longer an
    /// image. A rename is a `Vanished` and an `Appeared`.
    Vanished { path: PathBuf },
    /// The header or lock state changed (rebase, resize, a QEMU that started
    /// or stopped writing, the file replaced under the same name).
    HeaderChanged(Box<ImageRecord>),
    /// Live updates for some roots come from polling only; the reason is
    /// for the status line ("inotify watch limit reached", ...).
    PollingOnly { reason: String },
}

/// Lock bytes of one image are looked at no more often than this on
/// events that change no stat.
const LOCK_RECHECK: Duration = Duration::from_secs(1);

/// After an event that came too soon after a look to be followed, the
/// poll keeps looking at the image's lock bytes this long: a few polls,
/// then the image costs nothing again.
const LOCK_WARM: Duration = Duration::from_secs(10);

/// How the watcher learns about changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WatchMode {
    /// File-system events (inotify), plus the poll for writers that do not
    /// generate events.
    #[default]
    Events,
    /// Polling alone: re-stat known images and walk the roots for new ones.
    PollOnly,
}

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub mode: WatchMode,
    /// Quiet time before an event is reported; a file written without pause
    /// is still reported about this often.
    pub debounce: Duration,
    pub poll_interval: Duration,
    /// With events, how often the roots are walked anyway for files that
    /// came without one: notify's overflow signal (a flood of events lost)
    /// does not survive the mini debouncer, and a directory moved inside a
    /// root keeps reporting under its old name.
    pub discover_interval: Duration,
    /// Walk the roots at start and learn the images there without reporting
    /// them (for callers that do not feed [`Watcher::track`]).
    pub track_existing: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            mode: WatchMode::Events,
            // 200 ms: a finished write is reported about 200 ms later
            // (measured: 188-200 ms after qemu-io exits), leaving room in
            // the 300 ms the issue gives from write to screen; a writer
            // that never pauses costs five re-stats a second.
            debounce: Duration::from_millis(200),
            poll_interval: Duration::from_secs(2),
            // A walk is a stat per file: 30 s keeps a 10,000-image fleet
            // well under 1% of a core.
            discover_interval: Duration::from_secs(30),
            track_existing: false,
        }
    }
}

enum Control {
    Track(Box<ImageRecord>),
    Stop,
}

/// A running watcher; stops (and joins its thread) when dropped.
pub struct Watcher {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
    polling_only: Vec<PathBuf>,
    touches: Arc<AtomicU64>,
}

impl Watcher {
    /// Watch `roots` recursively and send changes to `tx`. Never fails: a
    /// root that notify cannot watch is polled instead, and a
    /// [`CatalogEvent::PollingOnly`] says so.
    pub fn start(roots: Vec<PathBuf>, opts: WatchOptions, tx: Sender<CatalogEvent>) -> Watcher {
        // Absolute, not canonical: notify reports paths under the root as it
        // was given (made absolute), and records are matched by those paths.
        let roots: Vec<PathBuf> = roots.iter().map(|r| absolute(r)).collect();
        let (ev_tx, ev_rx) = unbounded::<DebounceEventResult>();
        let mut unwatched: Vec<(PathBuf, String)> = Vec::new();
        let mut debouncer = None;
        if opts.mode == WatchMode::Events {
            match new_debouncer(opts.debounce, move |res: DebounceEventResult| {
                let _ = ev_tx.send(res);
            }) {
                Ok(mut d) => {
                    for root in &roots {
                        if let Err(e) = d.watcher().watch(root, RecursiveMode::Recursive) {
                            unwatched.push((root.clone(), e.to_string()));
                        }
                    }
                    debouncer = Some(d);
                }
                Err(e) => {
                    let reason = e.to_string();
                    unwatched = roots.iter().map(|r| (r.clone(), reason.clone())).collect();
                }
            }
        } else {
            unwatched = roots
                .iter()
                .map(|r| (r.clone(), "poll mode".into()))
                .collect();
        }
        for (root, reason) in &unwatched {
            if opts.mode == WatchMode::Events {
                let _ = tx.send(CatalogEvent::PollingOnly {
                    reason: format!("{}: {reason}", root.display()),
                });
            }
        }
        let polling_only: Vec<PathBuf> = unwatched.into_iter().map(|(r, _)| r).collect();
        let (control, control_rx) = unbounded();
        let touches = Arc::new(AtomicU64::new(0));
        let state = State {
            touches: touches.clone(),
            roots,
            walk_roots: polling_only.clone(),
            events: debouncer.is_some(),
            known: HashMap::new(),
            not_images: HashMap::new(),
            dirs: HashMap::new(),
            tx,
            listener_gone: Cell::new(false),
        };
        let thread = thread::Builder::new()
            .name("cowshed-watch".into())
            .spawn(move || run(state, opts, debouncer, ev_rx, control_rx))
            .ok();
        Watcher {
            control,
            thread,
            polling_only,
            touches,
        }
    }

    /// Tell the watcher about an image the caller already knows (from the
    /// scan), so that later changes are reported against it.
    pub fn track(&self, record: &ImageRecord) {
        let _ = self.control.send(Control::Track(Box::new(record.clone())));
    }

    /// Roots that get no file-system events and are polled instead.
    pub fn polling_only(&self) -> &[PathBuf] {
        &self.polling_only
    }

    /// How many file-system events (paths) the watcher has looked at: for
    /// tests and benchmarks, to see that an idle tree costs nothing.
    pub fn touches(&self) -> u64 {
        self.touches.load(Ordering::Relaxed)
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.control.send(Control::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn run(
    mut state: State,
    opts: WatchOptions,
    // Held for its lifetime: dropping it stops the notify threads.
    debouncer: Option<Debouncer<notify::RecommendedWatcher>>,
    ev_rx: Receiver<DebounceEventResult>,
    control: Receiver<Control>,
) {
    // Without a debouncer its sender is gone and a select on `ev_rx` would
    // fire at once forever; `never()` keeps the loop asleep.
    let events = if debouncer.is_some() { ev_rx } else { never() };
    if opts.track_existing {
        let roots = state.roots.clone();
        for root in &roots {
            state.walk(root, false);
        }
    }
    let ticker = tick(opts.poll_interval.max(Duration::from_millis(10)));
    let discover = if debouncer.is_some() {
        tick(opts.discover_interval.max(Duration::from_millis(10)))
    } else {
        // Without events every poll walks already.
        never()
    };
    while state.alive() {
        select! {
            recv(control) -> msg => match msg {
                Ok(Control::Track(r)) => state.track(*r),
                Ok(Control::Stop) | Err(_) => break,
            },
            recv(events) -> res => match res {
                Ok(Ok(batch)) => {
                    let paths: HashSet<PathBuf> = batch.into_iter().map(|e| e.path).collect();
                    for p in paths {
                        state.touch(&p);
                    }
                }
                // An overflowed queue or a lost watch: events were missed,
                // so look at everything again.
                Ok(Err(_)) => state.rescan(),
                Err(_) => break,
            },
            recv(ticker) -> _ => state.poll(),
            recv(discover) -> _ => state.discover(),
        }
    }
    drop(debouncer);
}

/// The stat fields whose change is worth a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    dev_ino: (u64, u64),
    len: u64,
    blocks: u64,
    mtime: Option<SystemTime>,
    /// Permission bits: a chmod (`cowshed protect`) changes the record.
    mode: u32,
}

impl Stat {
    fn of(m: &Metadata) -> Stat {
        Stat {
            dev_ino: (m.dev(), m.ino()),
            len: m.len(),
            blocks: m.blocks(),
            mtime: m.modified().ok(),
            mode: m.mode() & 0o7777,
        }
    }
}

struct Known {
    key: PathBuf,
    stat: Stat,
    /// When its stat last changed after it became known: recently changed
    /// images are polled even when events arrive.
    changed: Option<Instant>,
    /// When the lock bytes were last looked at.
    lock_checked: Instant,
    /// An event came within a second of a look made for an event: it may
    /// be that look's echo or a QEMU opening the image right after it, so
    /// the poll looks at the lock bytes until then (the stale-base alarm
    /// must not miss a writer).
    warm_until: Option<Instant>,
    /// The last look was the poll's: an event within a second of it is
    /// taken as its echo and warms nothing, or the poll would feed on its
    /// own opens forever.
    looked_by_poll: bool,
    summary: Option<HeaderSummary>,
    error: Option<String>,
    lock: LockState,
    sizes: Sizes,
}

impl Known {
    fn is_warm(&self) -> bool {
        self.warm_until.is_some_and(|t| Instant::now() < t)
    }

    fn of(r: &ImageRecord, stat: Stat, changed: Option<Instant>) -> Known {
        Known {
            key: r.key.clone(),
            stat,
            changed,
            lock_checked: Instant::now(),
            warm_until: None,
            looked_by_poll: false,
            summary: r.summary.clone(),
            error: r.error.clone(),
            lock: r.lock,
            sizes: r.sizes,
        }
    }
}

struct State {
    roots: Vec<PathBuf>,
    /// Roots without file-system events: walked on each poll.
    walk_roots: Vec<PathBuf>,
    /// Whether file-system events arrive for the other roots. With them,
    /// the poll looks only at images in use or recently changed (writers
    /// whose writes may come without events); the periodic discovery walk
    /// stats everything else. A 10,000-image fleet stays idle this way.
    events: bool,
    /// By absolute path as reached under a root.
    known: HashMap<PathBuf, Known>,
    /// Files probed and found not to be images, with their stat then: not
    /// probed again until it changes.
    not_images: HashMap<PathBuf, Stat>,
    /// Directories as last walked.
    dirs: HashMap<PathBuf, Stat>,
    tx: Sender<CatalogEvent>,
    listener_gone: Cell<bool>,
    touches: Arc<AtomicU64>,
}

impl State {
    fn alive(&self) -> bool {
        !self.listener_gone.get()
    }

    fn emit(&self, ev: CatalogEvent) {
        // Nobody listens any more: the loop stops instead of working for
        // no one.
        if self.tx.send(ev).is_err() {
            self.listener_gone.set(true);
        }
    }

    fn track(&mut self, r: ImageRecord) {
        let path = absolute(&r.path);
        // The stat as the record saw it, not as it is now: a change since
        // the scan is then reported at the next event or poll.
        let stat = Stat {
            dev_ino: r.dev_ino,
            len: r.sizes.apparent,
            blocks: r.sizes.allocated / 512,
            mtime: r.mtime,
            mode: r.mode,
        };
        self.not_images.remove(&path);
        self.known.insert(path, Known::of(&r, stat, None));
    }

    /// Something happened at `path` (a file or a directory).
    fn touch(&mut self, path: &Path) {
        self.touches.fetch_add(1, Ordering::Relaxed);
        // An image moved into the trash is gone, not new.
        if crate::engine::trash::in_trash(path) {
            return;
        }
        match fs::metadata(path) {
            Err(_) => self.gone(path),
            // Walking a directory opens it, which inotify reports as an
            // event on it: walking again only when it changed (or is new)
            // keeps that from looping forever.
            Ok(m) if m.is_dir() => {
                if self.dirs.get(path) != Some(&Stat::of(&m)) {
                    self.walk(path, true);
                }
            }
            Ok(m) if m.is_file() => {
                let stat = Stat::of(&m);
                if self.known.get(path).is_some_and(|k| k.stat == stat) {
                    // An event that changed nothing stat shows: a process
                    // opened or closed the image, which may be a QEMU
                    // taking or dropping its locks.
                    self.recheck_lock(path, false);
                } else {
                    self.file(path, stat, true);
                }
            }
            Ok(_) => {}
        }
    }

    /// Look at the lock bytes again; a change is a header change (the
    /// record then names the new holders). On events, at most once a second
    /// per image: the look opens the file, which inotify reports as one
    /// more event on it, and that echo must not start another look. The
    /// poll (`always`) is periodic anyway and catches what that skips.
    fn recheck_lock(&mut self, path: &Path, always: bool) {
        let Some(k) = self.known.get_mut(path) else {
            return;
        };
        if !always && k.lock_checked.elapsed() < LOCK_RECHECK {
            if !k.looked_by_poll {
                k.warm_until = Some(Instant::now() + LOCK_WARM);
            }
            return;
        }
        k.lock_checked = Instant::now();
        k.looked_by_poll = always;
        let (old_lock, stat) = (k.lock, k.stat);
        let lock = File::open(path)
            .ok()
            .and_then(|f| lock_bytes(&f, path).ok())
            .map_or(LockState::None, |b| b.state());
        if lock != old_lock {
            self.reprobe(path, stat);
        }
    }

    /// `path` no longer exists: the image there vanished, or, for a
    /// directory, every known image below it that is gone too.
    fn gone(&mut self, path: &Path) {
        if let Some(k) = self.known.remove(path) {
            self.emit(CatalogEvent::Vanished { path: k.key });
            return;
        }
        self.not_images.remove(path);
        let below: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| p.starts_with(path) && fs::metadata(p).is_err())
            .cloned()
            .collect();
        for p in below {
            if let Some(k) = self.known.remove(&p) {
                self.emit(CatalogEvent::Vanished { path: k.key });
            }
        }
        self.not_images.retain(|p, _| !p.starts_with(path));
        self.dirs.retain(|p, _| !p.starts_with(path));
    }

    /// Walk a directory for files; `report` false learns silently.
    fn walk(&mut self, dir: &Path, report: bool) {
        let walk = walkdir::WalkDir::new(dir)
            .follow_links(true)
            .into_iter()
            .filter_entry(|e| !crate::engine::trash::is_trash_name(e.file_name()));
        for entry in walk {
            let Ok(entry) = entry else { continue };
            let Ok(m) = entry.metadata() else { continue };
            if m.is_dir() {
                self.dirs.insert(entry.into_path(), Stat::of(&m));
            } else if m.is_file() {
                self.file(entry.path(), Stat::of(&m), report);
            }
        }
    }

    /// A regular file at `path` with `stat` now.
    fn file(&mut self, path: &Path, stat: Stat, report: bool) {
        let Some(old) = self.known.get(path) else {
            if self.not_images.get(path) == Some(&stat) {
                return;
            }
            match read_record(path) {
                Ok(Some(r)) => {
                    self.known.insert(
                        path.to_path_buf(),
                        Known::of(&r, stat, report.then(Instant::now)),
                    );
                    self.not_images.remove(path);
                    if report {
                        self.emit(CatalogEvent::Appeared(Box::new(r)));
                    }
                }
                // Not an image, or unreadable: remember the stat so that
                // events on a busy non-image file cost one stat each.
                Ok(None) | Err(_) => {
                    self.not_images.insert(path.to_path_buf(), stat);
                }
            }
            return;
        };
        if old.stat == stat {
            return;
        }
        if old.stat.mode != stat.mode {
            // A chmod: rare, and the record carries the mode.
            self.reprobe(path, stat);
            return;
        }
        let sizes = Sizes {
            virtual_size: old.sizes.virtual_size,
            allocated: stat.blocks * 512,
            apparent: stat.len,
        };
        let header_may_have_changed = old.stat.dev_ino != stat.dev_ino
            || old.stat.len != stat.len
            || old.stat.mtime != stat.mtime;
        if header_may_have_changed && self.header_changed(path, old) {
            self.reprobe(path, stat);
            return;
        }
        let changed = sizes != old.sizes;
        let modified = old.stat.mtime != stat.mtime;
        if let Some(k) = self.known.get_mut(path) {
            if k.stat != stat {
                k.changed = Some(Instant::now());
            }
            k.stat = stat;
            k.sizes = sizes;
            if header_may_have_changed {
                // The cheap probe read the lock bytes just now.
                k.lock_checked = Instant::now();
                k.looked_by_poll = false;
            }
            let key = k.key.clone();
            if changed {
                self.emit(CatalogEvent::SizesChanged {
                    key: key.clone(),
                    sizes,
                });
            }
            if modified {
                self.emit(CatalogEvent::Modified {
                    key,
                    mtime: stat.mtime,
                });
            }
        }
    }

    /// The cheap probe: one header read and the lock bytes. True when
    /// either differs from what is known (or cannot be read now).
    fn header_changed(&self, path: &Path, old: &Known) -> bool {
        let Ok(file) = File::open(path) else {
            return true;
        };
        if let Ok(m) = file.metadata() {
            if (m.dev(), m.ino()) != old.stat.dev_ino {
                return true;
            }
        }
        let (summary, error) = match inspect_file(&file, path) {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let lock = lock_bytes(&file, path).map_or(LockState::None, |b| b.state());
        summary != old.summary || error.is_some() != old.error.is_some() || lock != old.lock
    }

    /// The full record again, after a header change.
    fn reprobe(&mut self, path: &Path, stat: Stat) {
        match read_record(path) {
            Ok(Some(r)) => {
                let key_moved = self.known.get(path).is_some_and(|k| k.key != r.key);
                if key_moved {
                    if let Some(k) = self.known.remove(path) {
                        self.emit(CatalogEvent::Vanished { path: k.key });
                    }
                    self.known.insert(
                        path.to_path_buf(),
                        Known::of(&r, stat, Some(Instant::now())),
                    );
                    self.emit(CatalogEvent::Appeared(Box::new(r)));
                } else {
                    self.known.insert(
                        path.to_path_buf(),
                        Known::of(&r, stat, Some(Instant::now())),
                    );
                    self.emit(CatalogEvent::HeaderChanged(Box::new(r)));
                }
            }
            // No longer an image (overwritten with something else).
            Ok(None) | Err(_) => {
                if let Some(k) = self.known.remove(path) {
                    self.emit(CatalogEvent::Vanished { path: k.key });
                }
                self.not_images.insert(path.to_path_buf(), stat);
            }
        }
    }

    /// Re-stat the known images (only the hot ones when events arrive);
    /// walk the roots that get no events.
    fn poll(&mut self) {
        self.poll_known(!self.events);
        let roots = self.walk_roots.clone();
        for root in &roots {
            self.walk(root, true);
        }
    }

    fn poll_known(&mut self, all: bool) {
        const HOT: Duration = Duration::from_secs(60);
        let under_walk_root = |p: &Path, roots: &[PathBuf]| roots.iter().any(|r| p.starts_with(r));
        let paths: Vec<PathBuf> = self
            .known
            .iter()
            .filter(|(p, k)| {
                all || k.lock != LockState::None
                    || k.is_warm()
                    || k.changed.is_some_and(|t| t.elapsed() < HOT)
                    || under_walk_root(p, &self.walk_roots)
            })
            .map(|(p, _)| p.clone())
            .collect();
        for p in paths {
            match fs::metadata(&p) {
                Ok(m) if m.is_file() => {
                    let stat = Stat::of(&m);
                    let unchanged_in_use = self.known.get(&p).is_some_and(|k| {
                        k.stat == stat && (k.lock != LockState::None || k.is_warm())
                    });
                    if unchanged_in_use {
                        // A QEMU that exits without writing changes no
                        // stat, its close event may have come within the
                        // recheck's quiet second, and a reader's close is
                        // no event at all: the few images in use are
                        // looked at on each poll.
                        self.recheck_lock(&p, true);
                    } else {
                        self.file(&p, stat, true);
                    }
                }
                _ => self.gone(&p),
            }
        }
    }

    /// Events were lost: everything known is checked and every root walked.
    fn rescan(&mut self) {
        self.discover();
    }

    /// The periodic look at everything: every known image re-stat'ed (the
    /// cold ones the poll skips), every root walked for new files.
    fn discover(&mut self) {
        self.poll_known(true);
        let roots = self.roots.clone();
        for root in &roots {
            self.walk(root, true);
        }
    }
}

/// A short history of an image's allocated size, for a growth rate and a
/// sparkline. Fed by the consumer of [`CatalogEvent::SizesChanged`].
#[derive(Debug, Clone, Default)]
pub struct SizeHistory {
    /// (when, allocated bytes), oldest first; the size holds from a sample
    /// until the next one.
    samples: VecDeque<(Instant, u64)>,
}

impl SizeHistory {
    /// Samples kept at most: at five a second (the debounce), 25 s.
    pub const CAPACITY: usize = 128;
    /// The growth rate is taken over this much of the recent past.
    pub const RATE_WINDOW: Duration = Duration::from_secs(3);
    /// The sparkline: this many buckets of `SPARK_BUCKET` each.
    pub const SPARK_BUCKETS: usize = 16;
    pub const SPARK_BUCKET: Duration = Duration::from_secs(1);
    /// Older samples are dropped, but one is kept as the baseline.
    const HORIZON: Duration = Duration::from_secs(20);

    pub fn new() -> Self {
        Self::default()
    }

    /// Record the allocated size seen at `at`.
    pub fn push(&mut self, at: Instant, allocated: u64) {
        // Out-of-order samples are taken as now-ish rather than reordered:
        // they come from one thread and only clock noise could cause them.
        let at = match self.samples.back() {
            Some(&(last, _)) if at < last => last,
            _ => at,
        };
        self.samples.push_back((at, allocated));
        while self.samples.len() > Self::CAPACITY {
            self.samples.pop_front();
        }
        if let Some(cutoff) = at.checked_sub(Self::HORIZON) {
            while self.samples.len() > 1 && self.samples[1].0 <= cutoff {
                self.samples.pop_front();
            }
        }
    }

    pub fn latest(&self) -> Option<u64> {
        self.samples.back().map(|&(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The size at `t`: the last sample at or before it; before the first
    /// sample, the first one (nothing is known to have changed).
    fn value_at(&self, t: Instant) -> Option<u64> {
        let first = self.samples.front()?;
        Some(
            self.samples
                .iter()
                .rev()
                .find(|&&(at, _)| at <= t)
                .unwrap_or(first)
                .1,
        )
    }

    /// Growth in bytes/s over the last few seconds (negative when the image
    /// shrank); 0 with fewer than two samples or when nothing moved lately.
    pub fn rate(&self) -> f64 {
        self.rate_at(Instant::now())
    }

    pub fn rate_at(&self, now: Instant) -> f64 {
        let (Some(&(first_at, _)), Some(v_now)) = (self.samples.front(), self.value_at(now)) else {
            return 0.0;
        };
        if self.samples.len() < 2 {
            return 0.0;
        }
        // The window, shortened to the history when it is younger.
        let start = now
            .checked_sub(Self::RATE_WINDOW)
            .map_or(first_at, |s| s.max(first_at));
        let secs = now.saturating_duration_since(start).as_secs_f64();
        if secs < 0.001 {
            return 0.0;
        }
        let v_start = self.value_at(start).unwrap_or(v_now);
        (v_now as f64 - v_start as f64) / secs
    }

    /// Bytes grown per second over the last [`Self::SPARK_BUCKETS`] seconds,
    /// oldest first, for a ratatui `Sparkline`. Shrinking counts as 0.
    pub fn sparkline(&self) -> Vec<u64> {
        self.sparkline_at(Instant::now())
    }

    pub fn sparkline_at(&self, now: Instant) -> Vec<u64> {
        (0..Self::SPARK_BUCKETS)
            .map(|i| {
                let back = |n: usize| now.checked_sub(Self::SPARK_BUCKET * n as u32);
                let (Some(start), Some(end)) = (
                    back(Self::SPARK_BUCKETS - i),
                    back(Self::SPARK_BUCKETS - i - 1),
                ) else {
                    return 0;
                };
                match (self.value_at(start), self.value_at(end)) {
                    (Some(a), Some(b)) => b.saturating_sub(a),
                    _ => 0,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn absolute_paths_match_however_the_root_was_spelt() {
        // Records from a scan of "." and events under the absolute root
        // must name a file the same way.
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(absolute(Path::new("./a/./b.qcow2")), cwd.join("a/b.qcow2"));
        assert_eq!(absolute(Path::new(".")), cwd);
        assert_eq!(absolute(Path::new("/x/./y")), Path::new("/x/y"));
    }

    #[test]
    fn empty_and_single_sample_have_no_rate() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        assert_eq!(h.rate_at(t0), 0.0);
        assert!(h.sparkline_at(t0).iter().all(|&v| v == 0));
        h.push(t0, 10 * MIB);
        assert_eq!(h.rate_at(t0 + ms(500)), 0.0);
        assert_eq!(h.latest(), Some(10 * MIB));
    }

    #[test]
    fn steady_growth_gives_its_rate() {
        // 1 MiB every 250 ms is 4 MiB/s.
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        for i in 0..=20u64 {
            h.push(t0 + ms(250 * i), i * MIB);
        }
        let now = t0 + ms(5000);
        let rate = h.rate_at(now);
        assert!(
            (rate - 4.0 * MIB as f64).abs() < 0.01 * MIB as f64,
            "{rate}"
        );
    }

    #[test]
    fn young_history_uses_its_own_span() {
        // Two samples 1 s apart: 2 MiB/s, not diluted by the 3 s window.
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        h.push(t0, 0);
        h.push(t0 + ms(1000), 2 * MIB);
        let rate = h.rate_at(t0 + ms(1000));
        assert!((rate - 2.0 * MIB as f64).abs() < 1.0, "{rate}");
    }

    #[test]
    fn rate_falls_to_zero_when_writes_stop() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        for i in 0..=8u64 {
            h.push(t0 + ms(250 * i), i * MIB);
        }
        // No sample since t0+2 s: by t0+6 s the window holds no growth.
        assert!(h.rate_at(t0 + ms(2500)) > 0.0);
        assert_eq!(h.rate_at(t0 + ms(6000)), 0.0);
    }

    #[test]
    fn shrinking_is_a_negative_rate() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        h.push(t0, 8 * MIB);
        h.push(t0 + ms(1000), 4 * MIB);
        assert!(h.rate_at(t0 + ms(1000)) < 0.0);
        assert!(h.sparkline_at(t0 + ms(1500)).iter().all(|&v| v == 0));
    }

    #[test]
    fn sparkline_buckets_growth_per_second() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        h.push(t0, 0);
        // 3 MiB during the second before `now - 1 s`, 1 MiB in the last.
        let now = t0 + ms(10_000);
        h.push(now - ms(1500), 3 * MIB);
        h.push(now - ms(500), 4 * MIB);
        let s = h.sparkline_at(now);
        assert_eq!(s.len(), SizeHistory::SPARK_BUCKETS);
        assert_eq!(s[s.len() - 1], MIB);
        assert_eq!(s[s.len() - 2], 3 * MIB);
        assert!(s[..s.len() - 2].iter().all(|&v| v == 0), "{s:?}");
        assert_eq!(s.iter().sum::<u64>(), 4 * MIB);
    }

    #[test]
    fn history_stays_short() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        for i in 0..1000u64 {
            h.push(t0 + ms(10 * i), i);
        }
        assert!(h.len() <= SizeHistory::CAPACITY);
        // Over a long time, samples older than the horizon go, but the
        // latest stays.
        let mut h = SizeHistory::new();
        for i in 0..100u64 {
            h.push(t0 + ms(1000 * i), i * MIB);
        }
        assert!(h.len() <= 22, "{}", h.len());
        assert_eq!(h.latest(), Some(99 * MIB));
        let rate = h.rate_at(t0 + ms(99_000));
        assert!((rate - MIB as f64).abs() < 1.0, "{rate}");
    }

    #[test]
    fn out_of_order_samples_do_not_go_back_in_time() {
        let t0 = Instant::now();
        let mut h = SizeHistory::new();
        h.push(t0 + ms(1000), MIB);
        h.push(t0, 2 * MIB);
        assert_eq!(h.latest(), Some(2 * MIB));
        assert_eq!(h.value_at(t0 + ms(1000)), Some(2 * MIB));
    }
}
