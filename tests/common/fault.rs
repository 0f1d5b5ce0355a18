//! Stopping the cowshed binary at named fault points (src/engine/fault.rs)
//! instead of after a delay: list the points an operation passes and how
//! often, choose (point, hit) pairs from that list, and kill or pause it
//! there. Every run then covers the same steps, whatever the machine's
//! speed or load.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::COWSHED;

/// A hang guard for waits on a child's progress, never a guess at speed.
pub const HANG_GUARD: Duration = Duration::from_secs(120);

/// The points an operation passed, in the order of their first pass, with
/// how often each was passed.
#[derive(Debug, Clone)]
pub struct Trace {
    pub lines: Vec<(String, u64)>,
}

impl Trace {
    pub fn read(file: &Path) -> Trace {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines = text
            .lines()
            .map(|l| {
                let (name, hit) = l
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("bad trace line {l:?}"));
                (name.to_string(), hit.parse().expect("hit number"))
            })
            .collect();
        Trace { lines }
    }

    /// Each point with its number of passes, in the order first passed.
    pub fn counts(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for (name, hit) in &self.lines {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(e) => e.1 = e.1.max(*hit),
                None => out.push((name.clone(), *hit)),
            }
        }
        out
    }

    pub fn hits(&self, name: &str) -> u64 {
        self.counts()
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, h)| h)
    }

    /// Where `(name, hit)` was passed in the whole sequence.
    pub fn position(&self, name: &str, hit: u64) -> Option<usize> {
        self.lines.iter().position(|(n, h)| n == name && *h == hit)
    }

    pub fn last(&self) -> Option<&(String, u64)> {
        self.lines.last()
    }
}

/// Run `cowshed args` in `cwd` to the end with a trace; it must succeed.
pub fn trace(cwd: &Path, args: &[&str]) -> Trace {
    let file = trace_file(cwd);
    let out = Command::new(COWSHED)
        .args(args)
        .current_dir(cwd)
        .env("COWSHED_FAULT_TRACE", &file)
        .output()
        .expect("run cowshed");
    assert!(
        out.status.success(),
        "cowshed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = Trace::read(&file);
    std::fs::remove_file(&file).expect("remove trace");
    t
}

/// A trace file name beside (not inside) `cwd`, so directory listings of
/// `cwd` only show what the operation made.
fn trace_file(cwd: &Path) -> PathBuf {
    let name = cwd.file_name().map_or("x".into(), |n| n.to_string_lossy());
    cwd.with_file_name(format!("{name}.fault-trace"))
}

/// A deterministic choice of at most `per_point` hits out of `n`: the
/// first two, the last two, and evenly spaced ones between (the ends are
/// where state changes: first allocation, last chunk before a flush).
pub fn spread(n: u64, per_point: usize) -> Vec<u64> {
    let mut v: Vec<u64> = [1, 2, n.saturating_sub(1), n]
        .into_iter()
        .filter(|&h| h >= 1 && h <= n)
        .collect();
    let inner = per_point.saturating_sub(4) as u64;
    for k in 1..=inner {
        v.push(1 + (n - 1) * k / (inner + 1));
    }
    v.sort_unstable();
    v.dedup();
    v.truncate(per_point.max(1));
    v
}

/// Every (point, hit) to stop at: `spread` of each point's hits.
pub fn choose(trace: &Trace, per_point: usize) -> Vec<(String, u64)> {
    trace
        .counts()
        .into_iter()
        .flat_map(|(name, n)| {
            spread(n, per_point)
                .into_iter()
                .map(move |h| (name.clone(), h))
        })
        .collect()
}

/// Run `cowshed args` in `cwd`, SIGKILLed at the `hit`-th pass of `point`;
/// asserts it died there (by SIGKILL, the trace ending at that point).
/// Returns the trace up to the kill.
pub fn kill_at(cwd: &Path, args: &[&str], point: &str, hit: u64) -> Trace {
    let file = trace_file(cwd);
    let _ = std::fs::remove_file(&file);
    let out = Command::new(COWSHED)
        .args(args)
        .current_dir(cwd)
        .env("COWSHED_FAULT", format!("{point}:{hit}:kill"))
        .env("COWSHED_FAULT_TRACE", &file)
        .output()
        .expect("run cowshed");
    let t = Trace::read(&file);
    std::fs::remove_file(&file).expect("remove trace");
    assert_eq!(
        out.status.signal(),
        Some(libc_sigkill()),
        "cowshed {args:?} with a kill at {point} #{hit} was not killed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        t.last(),
        Some(&(point.to_string(), hit)),
        "killed elsewhere than at {point} #{hit}"
    );
    t
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// A cowshed process held at a fault point (its other threads run on);
/// killed if dropped unreleased (a failed test).
pub struct Paused {
    child: Option<Child>,
    trace: PathBuf,
    release: PathBuf,
}

/// Start `cowshed args` in `cwd` and wait until its thread passing `point`
/// for the `hit`-th time is paused there.
pub fn pause_at(cwd: &Path, args: &[&str], point: &str, hit: u64) -> Paused {
    let trace = trace_file(cwd);
    let release = cwd.with_file_name(format!(
        "{}.fault-release",
        cwd.file_name().map_or("x".into(), |n| n.to_string_lossy())
    ));
    let _ = std::fs::remove_file(&trace);
    let _ = std::fs::remove_file(&release);
    let child = Command::new(COWSHED)
        .args(args)
        .current_dir(cwd)
        .env("COWSHED_FAULT", format!("{point}:{hit}:pause"))
        .env("COWSHED_FAULT_TRACE", &trace)
        .env("COWSHED_FAULT_RELEASE", &release)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cowshed");
    let mut p = Paused {
        child: Some(child),
        trace,
        release,
    };
    p.wait_for_trace(&format!("the pause at {point} #{hit}"), |t| {
        t.position(point, hit).is_some()
    });
    p
}

impl Paused {
    pub fn pid(&self) -> nix::unistd::Pid {
        let id = self.child.as_ref().map_or(0, Child::id);
        nix::unistd::Pid::from_raw(id as i32)
    }

    pub fn trace(&self) -> Trace {
        Trace::read(&self.trace)
    }

    /// Wait until the trace satisfies `cond` (the process must not end
    /// meanwhile).
    pub fn wait_for_trace(&mut self, what: &str, cond: impl Fn(&Trace) -> bool) {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if cond(&self.trace()) {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(st) = child.try_wait().expect("try_wait") {
                panic!("cowshed ended ({st}) before {what}");
            }
            assert!(Instant::now() < deadline, "no {what} after {HANG_GUARD:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Let the paused thread go on and wait for the process to end.
    pub fn release(mut self) -> (std::process::Output, Trace) {
        std::fs::write(&self.release, b"").expect("release file");
        let child = self.child.take().expect("running");
        let out = child.wait_with_output().expect("wait");
        let t = Trace::read(&self.trace);
        let _ = std::fs::remove_file(&self.trace);
        let _ = std::fs::remove_file(&self.release);
        (out, t)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.trace);
        let _ = std::fs::remove_file(&self.release);
    }
}
