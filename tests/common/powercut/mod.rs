//! The power-cut harness (CrashMonkey / ALICE style): run an operation on a
//! FUSE mount that records every change it makes ([`recorder`]), derive
//! the states a power cut could leave from the log ([`states`], whose doc
//! states the model), lay each out on real files and judge it with
//! qemu-img.

#![allow(dead_code)]

pub mod recorder;
pub mod states;

use std::path::{Path, PathBuf};
use std::process::Command;

use recorder::{Recorder, Recording};
use states::{Budget, Model, Violation};

/// One operation's recorded run, with its scratch directories.
pub struct Session {
    pub name: String,
    _tmp: tempfile::TempDir,
    /// The images before the operation (made here, then recorded).
    pub backing: PathBuf,
    /// Where the operation runs (the recorder's mount).
    pub mount: PathBuf,
    /// Reference files the judge compares with (views taken before).
    pub refs: PathBuf,
    work: PathBuf,
    pristine: PathBuf,
    /// See [`Session::refusing_copy_file_range`].
    refuse_copy_file_range: bool,
}

impl Session {
    pub fn new(name: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("cowshed-powercut-{name}-"))
            .tempdir()
            .unwrap();
        let d = tmp.path().to_path_buf();
        let s = Session {
            name: name.to_string(),
            backing: d.join("backing"),
            mount: d.join("mnt"),
            refs: d.join("refs"),
            work: d.join("work"),
            pristine: d.join("pristine"),
            refuse_copy_file_range: false,
            _tmp: tmp,
        };
        for p in [&s.backing, &s.refs, &s.work] {
            std::fs::create_dir_all(p).unwrap();
        }
        s
    }

    /// The recorder answers copy_file_range with ENOSYS (the kernel falls
    /// back to reads and writes through the mount).
    pub fn refusing_copy_file_range(mut self) -> Self {
        self.refuse_copy_file_range = true;
        self
    }

    /// Mount the recorder over the backing directory, run `op` in the
    /// mount, unmount. A mount failure fails the test with the reason.
    pub fn record<R>(&self, op: impl FnOnce(&Path, &Recorder) -> R) -> (Recording, R) {
        let rec = Recorder::start(
            &self.backing,
            &self.mount,
            &self.pristine,
            self.refuse_copy_file_range,
        )
        .unwrap_or_else(|e| panic!("[{}] {e}", self.name));
        let r = op(&self.mount, &rec);
        (rec.finish(), r)
    }

    /// Draw the crash states of `rec` and judge each one.
    pub fn judge(
        &self,
        rec: &Recording,
        budget: Budget,
        judge: &(dyn Fn(&Path, &states::CrashState) -> Result<(), String> + Sync),
    ) -> Tally {
        if std::env::var_os("POWERCUT_LOG").is_some() {
            println!("[{}] log:\n{}", self.name, rec.describe());
        }
        let model = Model::new(rec);
        let (points, states) = model.states(budget);
        self.replay_matches_backing(&model);
        let violations = states::judge_all(&model, &states, &self.work, threads(), judge);
        Tally {
            name: self.name.clone(),
            entries: rec.entries.len(),
            syncs: model.syncs(),
            points,
            states: states.len(),
            violations,
        }
    }
}

impl Session {
    /// The harness checks itself: the log replayed in full must give the
    /// very files the operation left in the backing directory (a change
    /// the recorder missed would show here).
    fn replay_matches_backing(&self, model: &Model) {
        let mut replica = states::Replica::new(model, &self.work.join("final"));
        replica.with_state(&model.final_state(), |d| {
            let names = |dir: &Path| {
                let mut v: Vec<_> = std::fs::read_dir(dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (replayed, left) = (names(d), names(&self.backing));
            assert_eq!(
                replayed, left,
                "[{}] replayed names differ from the backing directory",
                self.name
            );
            for n in &left {
                let a = std::fs::read(d.join(n)).unwrap();
                let b = std::fs::read(self.backing.join(n)).unwrap();
                assert!(
                    a == b,
                    "[{}] replayed {n:?} differs from the file the operation left",
                    self.name
                );
            }
        });
        std::fs::remove_dir_all(self.work.join("final")).unwrap();
    }
}

/// Judging threads: one per core (qemu-img does the work).
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// One operation's figures.
pub struct Tally {
    pub name: String,
    pub entries: usize,
    pub syncs: usize,
    pub points: usize,
    pub states: usize,
    pub violations: Vec<Violation>,
}

impl Tally {
    /// The first few violations, for a failure message.
    pub fn examples(&self, n: usize) -> String {
        self.violations
            .iter()
            .take(n)
            .map(|v| format!("  {}\n    {}", v.state, v.what.replace('\n', "\n    ")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The table printed at the end of a run.
pub fn table(rows: &[Tally]) -> String {
    let mut s = format!(
        "{:<34} {:>8} {:>6} {:>7} {:>7} {:>10}\n",
        "operation", "entries", "fsyncs", "points", "states", "violations"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<34} {:>8} {:>6} {:>7} {:>7} {:>10}\n",
            r.name,
            r.entries,
            r.syncs,
            r.points,
            r.states,
            r.violations.len()
        ));
    }
    s
}

/// Run a tool in `dir`; (exit code, stdout + stderr).
pub fn tool(dir: &Path, prog: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img check` finds no corruption (leaks are allowed: exit 0 or 3).
pub fn no_corruption(dir: &Path, img: &str) -> Result<(), String> {
    match tool(dir, "qemu-img", &["check", img]) {
        (0 | 3, _) => Ok(()),
        (code, out) => Err(format!(
            "qemu-img check {img} exited {code}:\n{}",
            tail(&out)
        )),
    }
}

/// Run a tool in `dir` that must succeed; its output.
pub fn must(dir: &Path, prog: &str, args: &[&str]) -> String {
    let (code, out) = tool(dir, prog, args);
    assert_eq!(code, 0, "{prog} {args:?}: {out}");
    out
}

/// `qemu-img check` finds nothing at all: no corruption and no leak (the
/// metadata-generation switches of snapshot, bitmap and amend leave none).
/// The first findings of each kind are enough to see why.
pub fn clean_check(dir: &Path, img: &str) -> Result<(), String> {
    let (code, out) = tool(dir, "qemu-img", &["check", img]);
    if code == 0 {
        return Ok(());
    }
    let first: Vec<&str> = (out.lines().filter(|l| l.starts_with("ERROR")).take(2))
        .chain(out.lines().filter(|l| l.starts_with("Leaked")).take(1))
        .collect();
    Err(format!(
        "qemu-img check exited {code}: {}",
        first.join("\n")
    ))
}

/// `qemu-img check`'s count of corruptions (for images that start with some).
pub fn corruptions(dir: &Path, img: &str) -> Result<u64, String> {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", img])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img: {e}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "qemu-img check {img} exited {:?}, no JSON ({e}):\n{}",
            out.status.code(),
            tail(&String::from_utf8_lossy(&out.stderr))
        )
    })?;
    Ok(v["corruptions"].as_u64().unwrap_or(0))
}

/// `qemu-img compare` of a raw reference with `img` says they are equal.
pub fn same_view(dir: &Path, reference: &Path, img: &str, fmt: &str) -> Result<(), String> {
    let r = reference.to_string_lossy();
    match tool(
        dir,
        "qemu-img",
        &["compare", "-f", "raw", "-F", fmt, &r, img],
    ) {
        (0, _) => Ok(()),
        (code, out) => Err(format!(
            "qemu-img compare (view before) {img} exited {code}:\n{}",
            tail(&out)
        )),
    }
}

/// The guest view of `img` as a raw file at `out`.
pub fn raw_view(dir: &Path, img: &str, out: &Path) {
    let o = out.to_string_lossy();
    let (code, text) = tool(dir, "qemu-img", &["convert", "-U", "-O", "raw", img, &o]);
    assert_eq!(code, 0, "qemu-img convert {img}: {text}");
}

/// The last lines of a tool's output, enough to see why.
fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}
