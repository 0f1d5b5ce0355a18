//! Crash states from a recording, and their replay onto real files.
//!
//! The model (what a power cut may leave, after the first `point` entries
//! of the log happened):
//! - for each file, every data change (write, zeroing, length change)
//!   made before its last fsync/fdatasync is on disk;
//! - any subset of its later data changes may be, each whole or torn at a
//!   4 KiB boundary of the file;
//! - names (create, link, unlink, rename) are on disk up to the last fsync
//!   of their directory; the ones after it persist in order, any prefix of
//!   them (the strict model is the empty prefix; journaling file systems
//!   may persist more).
//!
//! The subsets tried at each crash point: none, all, each single one, all
//! but each one, each torn (its first or second half alone, or everything
//! with it torn), and random subsets from a fixed seed. Singles and the
//! like are capped per point (evenly spaced when there are more); states
//! that leave the same files (same durable prefix, same picks) are tried
//! once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::recorder::{Entry, FileId, Recording};

/// The page size a torn write is split at.
pub const PAGE: u64 = 4096;

/// One pending data entry as it reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pick {
    Whole(usize),
    /// Only the part before the 4 KiB boundary nearest its middle.
    FirstHalf(usize),
    /// Only the part from that boundary on.
    SecondHalf(usize),
}

impl Pick {
    fn entry(self) -> usize {
        match self {
            Pick::Whole(i) | Pick::FirstHalf(i) | Pick::SecondHalf(i) => i,
        }
    }
}

/// One state a power cut may leave.
#[derive(Debug, Clone)]
pub struct CrashState {
    /// Entries `[0, point)` had happened.
    pub point: usize,
    /// Pending data entries that reached the disk.
    pub picks: Vec<Pick>,
    /// How many pending name entries (in order) reached the disk.
    pub names: usize,
    pub kind: &'static str,
}

impl std::fmt::Display for CrashState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let picks: Vec<String> = self
            .picks
            .iter()
            .map(|p| match p {
                Pick::Whole(i) => format!("{i}"),
                Pick::FirstHalf(i) => format!("{i}a"),
                Pick::SecondHalf(i) => format!("{i}b"),
            })
            .collect();
        let shown = if picks.len() > 12 {
            format!("{} … ({} entries)", picks[..12].join(","), picks.len())
        } else {
            picks.join(",")
        };
        write!(
            f,
            "crash after entry {} ({}): pending data on disk [{shown}], pending names on disk {}",
            self.point, self.kind, self.names
        )
    }
}

/// How many states to draw per crash point.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Cap on singles, all-but-ones and torn states per point.
    pub per_point: usize,
    /// Random subsets per point.
    pub random: usize,
    /// Crash points added between two consecutive syncs.
    pub between: usize,
    /// Cap on crash points (evenly spaced among all of them when more).
    pub max_points: usize,
}

impl Budget {
    /// For operations that build metadata aside and switch to it with one
    /// header write (snapshot, bitmap, amend): few syncs, every point tried.
    pub const METADATA_SWITCH: Budget = Budget {
        per_point: 6,
        random: 3,
        between: 1,
        max_points: 40,
    };
}

/// The log's structure: which entries each sync makes durable.
pub struct Model<'a> {
    pub rec: &'a Recording,
    /// Data entries of each file, in log order.
    file_ops: BTreeMap<FileId, Vec<usize>>,
    /// Sync entries of each file, in log order.
    file_syncs: HashMap<FileId, Vec<usize>>,
    name_ops: Vec<usize>,
    dir_syncs: Vec<usize>,
}

impl<'a> Model<'a> {
    pub fn new(rec: &'a Recording) -> Self {
        let mut m = Model {
            rec,
            file_ops: BTreeMap::new(),
            file_syncs: HashMap::new(),
            name_ops: Vec::new(),
            dir_syncs: Vec::new(),
        };
        for (i, e) in rec.entries.iter().enumerate() {
            if let Some(f) = e.data_file() {
                m.file_ops.entry(f).or_default().push(i);
            }
            match e {
                Entry::Sync { file, .. } => m.file_syncs.entry(*file).or_default().push(i),
                Entry::SyncDir => m.dir_syncs.push(i),
                e if e.is_name_op() => m.name_ops.push(i),
                _ => {}
            }
        }
        m
    }

    pub fn syncs(&self) -> usize {
        self.rec.entries.iter().filter(|e| e.is_sync()).count()
    }

    /// The last entry index `< point` in a sorted list.
    fn last_before(list: &[usize], point: usize) -> Option<usize> {
        let n = list.partition_point(|&i| i < point);
        n.checked_sub(1).map(|k| list[k])
    }

    /// How many of `file`'s data entries are durable at `point`.
    fn durable_count(&self, file: FileId, point: usize) -> usize {
        let ops = &self.file_ops[&file];
        match self
            .file_syncs
            .get(&file)
            .and_then(|s| Self::last_before(s, point))
        {
            Some(s) => ops.partition_point(|&i| i < s),
            None => 0,
        }
    }

    fn pending_data(&self, point: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (&f, ops) in &self.file_ops {
            let from = self.durable_count(f, point);
            out.extend(ops[from..].iter().copied().take_while(|&i| i < point));
        }
        out.sort_unstable();
        out
    }

    fn durable_names(&self, point: usize) -> usize {
        match Self::last_before(&self.dir_syncs, point) {
            Some(s) => self.name_ops.partition_point(|&i| i < s),
            None => 0,
        }
    }

    fn pending_names(&self, point: usize) -> usize {
        self.name_ops.partition_point(|&i| i < point) - self.durable_names(point)
    }

    /// Everything on disk after the last entry: the files the operation
    /// left, if the recorder missed nothing.
    pub fn final_state(&self) -> CrashState {
        let n = self.rec.entries.len();
        CrashState {
            point: n,
            picks: self.pending_data(n).into_iter().map(Pick::Whole).collect(),
            names: self.pending_names(n),
            kind: "final",
        }
    }

    /// Every point just before a sync, the end, and `between` points spread
    /// between consecutive syncs.
    pub fn crash_points(&self, between: usize) -> Vec<usize> {
        let n = self.rec.entries.len();
        let mut bounds: Vec<usize> = vec![0];
        bounds.extend(
            self.rec
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.is_sync())
                .map(|(i, _)| i),
        );
        bounds.push(n);
        let mut points = Vec::new();
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            for k in 1..=between {
                let p = a + (b - a) * k / (between + 1);
                if p > a && p < b {
                    points.push(p);
                }
            }
            points.push(b);
        }
        points.sort_unstable();
        points.dedup();
        points
    }

    fn tearable(&self, i: usize) -> Option<u64> {
        let (off, len) = match &self.rec.entries[i] {
            Entry::Write { offset, data, .. } => (*offset, data.len() as u64),
            Entry::Zero { offset, len, .. } => (*offset, *len),
            _ => return None,
        };
        let mid = (off + len / 2) / PAGE * PAGE;
        let split = if mid > off {
            mid
        } else {
            (off / PAGE + 1) * PAGE
        };
        (split > off && split < off + len).then_some(split)
    }

    /// The states to try, deduplicated, in order of crash point.
    pub fn states(&self, budget: Budget) -> (usize, Vec<CrashState>) {
        let all_points = self.crash_points(budget.between);
        let points = spread(&all_points, budget.max_points);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for &point in &points {
            let pending = self.pending_data(point);
            let names = self.pending_names(point);
            let mut cands: Vec<(Vec<Pick>, usize, &'static str)> = Vec::new();
            let all: Vec<Pick> = pending.iter().map(|&i| Pick::Whole(i)).collect();
            for j in 0..=names {
                cands.push((Vec::new(), j, "none"));
                cands.push((all.clone(), j, "all"));
            }
            let chosen = spread(&pending, budget.per_point);
            for &i in &chosen {
                cands.push((vec![Pick::Whole(i)], names, "single"));
                let rest: Vec<Pick> = all.iter().copied().filter(|p| p.entry() != i).collect();
                if self.tearable(i).is_some() {
                    cands.push((vec![Pick::FirstHalf(i)], names, "torn"));
                    cands.push((vec![Pick::SecondHalf(i)], names, "torn"));
                    let mut torn = rest.clone();
                    torn.push(Pick::FirstHalf(i));
                    torn.sort_unstable();
                    cands.push((torn, names, "torn"));
                }
                cands.push((rest, names, "all-but-one"));
            }
            let mut rng = SplitMix(0x5eed_0000 ^ point as u64);
            for _ in 0..budget.random {
                let mut picks = Vec::new();
                for &i in &pending {
                    let r = rng.next();
                    if r & 1 == 0 {
                        continue;
                    }
                    picks.push(match (self.tearable(i).is_some(), (r >> 1) & 7) {
                        (true, 0) => Pick::FirstHalf(i),
                        (true, 1) => Pick::SecondHalf(i),
                        _ => Pick::Whole(i),
                    });
                }
                cands.push((picks, names, "random"));
            }
            for (picks, j, kind) in cands {
                let key = self.key(point, &picks, j);
                if seen.insert(key) {
                    out.push(CrashState {
                        point,
                        picks,
                        names: j,
                        kind,
                    });
                }
            }
        }
        (points.len(), out)
    }

    /// What a state leaves on disk, whatever the point it was drawn at.
    fn key(&self, point: usize, picks: &[Pick], names: usize) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for &f in self.file_ops.keys() {
            (f, self.durable_count(f, point)).hash(&mut h);
        }
        picks.hash(&mut h);
        (self.durable_names(point) + names).hash(&mut h);
        h.finish()
    }

    /// The root's names in a state: name -> file.
    fn names_at(&self, st: &CrashState) -> BTreeMap<OsString, FileId> {
        let mut names: BTreeMap<OsString, FileId> =
            self.rec.initial_names.iter().cloned().collect();
        let n = self.durable_names(st.point) + st.names;
        for &i in &self.name_ops[..n] {
            match &self.rec.entries[i] {
                Entry::Create { name, file } | Entry::Link { name, file } => {
                    names.insert(name.clone(), *file);
                }
                Entry::Unlink { name } => {
                    names.remove(name);
                }
                Entry::Rename { from, to } => {
                    if let Some(f) = names.remove(from) {
                        names.insert(to.clone(), f);
                    }
                }
                _ => {}
            }
        }
        names
    }
}

/// `cap` elements of `v`, evenly spaced (all of them if there are fewer).
fn spread(v: &[usize], cap: usize) -> Vec<usize> {
    if v.len() <= cap {
        return v.to_vec();
    }
    (0..cap)
        .map(|k| v[k * (v.len() - 1) / (cap - 1).max(1)])
        .collect()
}

struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The bytes a change replaced, to put them back after a state was judged.
struct Undo {
    file: FileId,
    len: u64,
    offset: u64,
    bytes: Vec<u8>,
}

/// Files on a real file system that follow the durable part of the log as
/// crash points advance, and take a state's pending picks on top, undone
/// after it was judged.
pub struct Replica<'m, 'a> {
    model: &'m Model<'a>,
    files: PathBuf,
    /// Data entries of each file applied (its durable prefix).
    applied: HashMap<FileId, usize>,
    state_dir: PathBuf,
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap_or_else(|e| panic!("replica {}: {e}", p.display()))
}

impl<'m, 'a> Replica<'m, 'a> {
    pub fn new(model: &'m Model<'a>, dir: &Path) -> Self {
        let files = dir.join("files");
        let state_dir = dir.join("state");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::create_dir_all(&state_dir).unwrap();
        for (_, id) in &model.rec.initial_names {
            std::fs::copy(
                model.rec.pristine.join(id.to_string()),
                files.join(id.to_string()),
            )
            .unwrap_or_else(|e| panic!("replica of file {id}: {e}"));
        }
        for e in &model.rec.entries {
            if let Entry::Create { file, .. } = e {
                open_rw(&files.join(file.to_string()));
            }
        }
        Replica {
            model,
            files,
            applied: HashMap::new(),
            state_dir,
        }
    }

    fn file(&self, id: FileId) -> File {
        open_rw(&self.files.join(id.to_string()))
    }

    /// Apply entry `i` (or a half of it) to its file; returns what it replaced.
    fn apply(&self, pick: Pick, undo: Option<&mut Vec<Undo>>) {
        let i = pick.entry();
        let e = &self.model.rec.entries[i];
        let Some(id) = e.data_file() else { return };
        let f = self.file(id);
        let len = f.metadata().unwrap().len();
        let split = self.model.tearable(i);
        let clip = |off: u64, end: u64| -> (u64, u64) {
            match (pick, split) {
                (Pick::FirstHalf(_), Some(s)) => (off, s),
                (Pick::SecondHalf(_), Some(s)) => (s, end),
                _ => (off, end),
            }
        };
        // The range this change touches, for the undo record.
        let (a, b) = match e {
            Entry::Write { offset, data, .. } => clip(*offset, offset + data.len() as u64),
            Entry::Zero {
                offset,
                len: n,
                keep_size,
                ..
            } => {
                let (a, b) = clip(*offset, offset + n);
                if *keep_size {
                    (a.min(len), b.min(len))
                } else {
                    (a, b)
                }
            }
            Entry::SetLen { len: n, .. } => (*n.min(&len), len),
            _ => unreachable!(),
        };
        if let Some(undo) = undo {
            let end = b.min(len);
            let mut bytes = vec![0u8; end.saturating_sub(a) as usize];
            if !bytes.is_empty() {
                f.read_exact_at(&mut bytes, a).unwrap();
            }
            undo.push(Undo {
                file: id,
                len,
                offset: a,
                bytes,
            });
        }
        match e {
            Entry::Write { offset, data, .. } => {
                let s = (a - offset) as usize;
                let t = (b - offset) as usize;
                f.write_all_at(&data[s..t], a).unwrap();
            }
            Entry::Zero { .. } => {
                if b > len {
                    f.set_len(b).unwrap();
                }
                if b > a {
                    punch(&f, a, b - a);
                }
            }
            Entry::SetLen { len: n, .. } => f.set_len(*n).unwrap(),
            _ => {}
        }
    }

    /// Make every file hold exactly its durable prefix at `point` (points
    /// only move forward).
    fn advance(&mut self, point: usize) {
        for (&f, ops) in &self.model.file_ops {
            let want = self.model.durable_count(f, point);
            let have = self.applied.get(&f).copied().unwrap_or(0);
            assert!(want >= have, "crash points must come in order");
            for &i in &ops[have..want] {
                self.apply(Pick::Whole(i), None);
            }
            self.applied.insert(f, want);
        }
    }

    /// Lay out `st` in a directory (its names linked to the replica's
    /// files), run `judge` on it, then undo.
    pub fn with_state<R>(&mut self, st: &CrashState, judge: impl FnOnce(&Path) -> R) -> R {
        self.advance(st.point);
        let mut undo = Vec::new();
        for &p in &st.picks {
            self.apply(p, Some(&mut undo));
        }
        let names = self.model.names_at(st);
        for (name, id) in &names {
            std::fs::hard_link(self.files.join(id.to_string()), self.state_dir.join(name))
                .unwrap_or_else(|e| panic!("link {name:?}: {e}"));
        }
        let r = judge(&self.state_dir);
        for entry in std::fs::read_dir(&self.state_dir).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for u in undo.into_iter().rev() {
            let f = self.file(u.file);
            f.write_all_at(&u.bytes, u.offset).unwrap();
            f.set_len(u.len).unwrap();
        }
        r
    }
}

/// Zero a range cheaply (a hole), whatever its length.
fn punch(f: &File, off: u64, len: u64) {
    // SAFETY: a plain syscall on a descriptor `f` keeps open.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(rc, 0, "punch hole: {}", std::io::Error::last_os_error());
}

/// One violation: the state and what was wrong.
pub struct Violation {
    pub state: String,
    pub what: String,
}

/// Judge every state on `threads` threads (each with its own replica under
/// `work`); returns the violations, in state order.
pub fn judge_all(
    model: &Model,
    states: &[CrashState],
    work: &Path,
    threads: usize,
    judge: &(dyn Fn(&Path, &CrashState) -> Result<(), String> + Sync),
) -> Vec<Violation> {
    let threads = threads.max(1);
    let per = states.len().div_ceil(threads).max(1);
    let mut out: Vec<Violation> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = states
            .chunks(per)
            .enumerate()
            .map(|(t, chunk)| {
                let dir = work.join(format!("replica-{t}"));
                s.spawn(move || {
                    let mut replica = Replica::new(model, &dir);
                    let mut found = Vec::new();
                    for st in chunk {
                        if let Err(what) = replica.with_state(st, |d| judge(d, st)) {
                            found.push(Violation {
                                state: st.to_string(),
                                what,
                            });
                        }
                    }
                    found
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
    });
    out
}
