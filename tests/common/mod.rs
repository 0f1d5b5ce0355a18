//! Shared helpers for the oracle tests: a scratch directory per case, the
//! QEMU tools (`qemu-img`, `qemu-io`) and the built `cowshed` binary run in
//! it, JSON parsing, and the extent-merging rule of `qemu-img map`.
//!
//! Every command runs with the scratch directory as its working directory and
//! is given paths relative to it, so that file names printed by qemu-img and
//! cowshed are directly comparable.

#![allow(dead_code)]

pub mod bitmaps;
pub mod bytes;
pub mod fault;
pub mod run;
pub mod small_fs;
pub mod sshd;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

/// The cowshed binary built by cargo for these tests.
pub const COWSHED: &str = env!("CARGO_BIN_EXE_cowshed");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A scratch directory for one test case. Every helper panics with the case
/// name in its message when a QEMU tool fails, since a broken recipe is a
/// broken test, not a cowshed bug.
pub struct Work {
    pub case: String,
    dir: TempDir,
}

/// The outcome of one command, with its output decoded.
#[derive(Debug)]
pub struct Run {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Work {
    pub fn new(case: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cowshed-oracle-{case}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("[{case}] cannot create a temporary directory: {e}"));
        Work {
            case: case.to_string(),
            dir,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Create a subdirectory (and its parents).
    pub fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.path(rel))
            .unwrap_or_else(|e| panic!("[{}] mkdir {rel}: {e}", self.case));
    }

    pub fn write_file(&self, rel: &str, bytes: &[u8]) {
        std::fs::write(self.path(rel), bytes)
            .unwrap_or_else(|e| panic!("[{}] write {rel}: {e}", self.case));
    }

    pub fn read_file(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("[{}] read {rel}: {e}", self.case))
    }

    /// Run `program args...` in the scratch directory.
    pub fn run(&self, program: &str, args: &[&str]) -> Run {
        let out: Output = Command::new(program)
            .args(args)
            .current_dir(self.root())
            .env("LC_ALL", "C")
            .output()
            .unwrap_or_else(|e| panic!("[{}] cannot run {program}: {e}", self.case));
        let mut cmdline = shell_quote(
            Path::new(program)
                .file_name()
                .map_or(program, |n| n.to_str().unwrap_or(program)),
        );
        for a in args {
            cmdline.push(' ');
            cmdline.push_str(&shell_quote(a));
        }
        Run {
            cmdline,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run a QEMU tool that must succeed (it builds the test's fixtures or
    /// gives the oracle's answer).
    fn qemu_ok(&self, program: &str, args: &[&str]) -> Run {
        let r = self.run(program, args);
        assert!(r.ok(), "[{}] oracle command failed: {r}", self.case);
        r
    }

    pub fn qemu_img(&self, args: &[&str]) -> Run {
        self.qemu_ok("qemu-img", args)
    }

    /// `qemu-img` whose failure is an acceptable, reported outcome.
    pub fn qemu_img_may_fail(&self, args: &[&str]) -> Run {
        self.run("qemu-img", args)
    }

    pub fn cowshed(&self, args: &[&str]) -> Run {
        self.run(COWSHED, args)
    }

    /// `qemu-img create -f FMT [-o OPTS] [-b BACKING -F BFMT] FILE SIZE`.
    pub fn create(
        &self,
        file: &str,
        fmt: &str,
        opts: &str,
        backing: Option<(&str, &str)>,
        size: u64,
    ) {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        if let Some((b, bf)) = backing {
            args.extend(["-b", b, "-F", bf]);
        }
        args.extend([file, &size]);
        self.qemu_img(&args);
    }

    /// Apply qemu-io commands to an image (opened with its backing chain).
    /// qemu-io reports a failed command on its output, and (in recent
    /// versions) by its exit code: both are checked.
    pub fn io(&self, fmt: &str, file: &str, cmds: &[String]) {
        let mut args = vec!["-f", fmt];
        for c in cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(file);
        let r = self.qemu_ok("qemu-io", &args);
        let all = format!("{}{}", r.stdout, r.stderr).to_lowercase();
        assert!(
            !all.contains("error") && !all.contains("failed") && !all.contains("invalid"),
            "[{}] qemu-io reported a failure: {r}",
            self.case
        );
    }

    /// Parse the stdout of a successful command as JSON.
    pub fn json(&self, r: &Run) -> Value {
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("[{}] output is not JSON ({e}): {r}", self.case))
    }
}

/// Deterministic pseudo-random bytes (SplitMix64), so failures reproduce.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A disk-like mix of content: incompressible random runs, compressible
/// repeated text, single-byte runs and zero runs, in chunks whose lengths are
/// deliberately not multiples of any cluster size.
pub fn mixed_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let lens = random_bytes(seed ^ 0x5eed, 2 * 4096);
    let mut k = 0usize;
    while out.len() < len {
        let r = u16::from_le_bytes([lens[(2 * k) % lens.len()], lens[(2 * k + 1) % lens.len()]]);
        let chunk = (1 + r as usize % 96_000).min(len - out.len());
        // Rotate the order of kinds every round so that all pairs meet.
        match (k + k / 4) % 4 {
            0 => out.extend(random_bytes(seed.wrapping_add(k as u64), chunk)),
            1 => out.extend(b"cowshed moo ".iter().cycle().take(chunk)),
            2 => out.resize(out.len() + chunk, 0),
            _ => out.resize(out.len() + chunk, (k as u8) | 1),
        }
        k += 1;
    }
    out
}

/// Is `b` mergeable into `a` (`a` directly before `b`), by the rule of
/// `qemu-img map`: same depth, present, zero, data and compressed flags,
/// contiguous guest ranges, and host offsets either both absent or
/// contiguous too.
pub fn mergeable(a: &Value, b: &Value) -> bool {
    let same = |k: &str| a.get(k) == b.get(k);
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    let (Some(s0), Some(l0), Some(s1)) = (num(a, "start"), num(a, "length"), num(b, "start"))
    else {
        return false;
    };
    if !(same("depth") && same("present") && same("zero") && same("data") && same("compressed")) {
        return false;
    }
    if s0 + l0 != s1 {
        return false;
    }
    match (a.get("offset"), b.get("offset")) {
        (None, None) => true,
        (Some(o0), Some(o1)) => match (o0.as_u64(), o1.as_u64()) {
            (Some(o0), Some(o1)) => o0 + l0 == o1,
            _ => false,
        },
        _ => false,
    }
}

/// Merge adjacent mergeable extents of a `map --output json` array. Unknown
/// keys are kept (and so still compared); merging only adds lengths.
pub fn merge_extents(extents: &[Value]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::with_capacity(extents.len());
    for e in extents {
        if let Some(last) = out.last_mut() {
            if mergeable(last, e) {
                let len = last["length"].as_u64().unwrap_or(0) + e["length"].as_u64().unwrap_or(0);
                last["length"] = Value::from(len);
                continue;
            }
        }
        out.push(e.clone());
    }
    out
}

/// One extent on one line, in a fixed key order, for readable diffs.
pub fn extent_line(e: &Value) -> String {
    let Some(obj) = e.as_object() else {
        return e.to_string();
    };
    let order = [
        "start",
        "length",
        "depth",
        "present",
        "zero",
        "data",
        "compressed",
        "offset",
    ];
    let mut s = String::from("{");
    for k in order {
        if let Some(v) = obj.get(k) {
            let _ = write!(s, " {k}: {v},");
        }
    }
    for (k, v) in obj {
        if !order.contains(&k.as_str()) {
            let _ = write!(s, " {k}: {v},");
        }
    }
    s.push_str(" }");
    s
}

/// One extent a line.
pub fn extents_text(extents: &[Value]) -> String {
    extents
        .iter()
        .map(extent_line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Render two extent lists side by side, marking the lines that differ.
pub fn extent_diff(expected: &[Value], actual: &[Value]) -> String {
    let mut s = String::new();
    for i in 0..expected.len().max(actual.len()) {
        let e = expected.get(i);
        let a = actual.get(i);
        let mark = if e == a { "  " } else { "!!" };
        let _ = writeln!(
            s,
            "{mark} [{i}]\n     qemu-img: {}\n     cowshed : {}",
            e.map_or("-".into(), extent_line),
            a.map_or("-".into(), extent_line)
        );
    }
    s
}

/// Compare one `info` object: every key qemu-img emits at top level must be
/// present with an equal value in cowshed's output, except `children`; inside
/// `format-specific`, `type` and every key of `data` are compared one by one.
/// Keys only cowshed has are fine. Returns one message per difference.
pub fn info_differences(what: &str, qemu: &Value, ours: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let (Some(q), Some(o)) = (qemu.as_object(), ours.as_object()) else {
        diffs.push(format!(
            "{what}: not both objects:\n qemu-img: {qemu}\n cowshed : {ours}"
        ));
        return diffs;
    };
    for (k, qv) in q {
        if k == "children" {
            continue;
        }
        let Some(ov) = o.get(k) else {
            diffs.push(format!(
                "{what}: key `{k}` missing in cowshed (qemu-img: {qv})"
            ));
            continue;
        };
        if k == "format-specific" {
            diffs.extend(format_specific_differences(what, qv, ov));
        } else if qv != ov {
            diffs.push(format!(
                "{what}: `{k}` differs\n   qemu-img: {qv}\n   cowshed : {ov}"
            ));
        }
    }
    diffs
}

fn format_specific_differences(what: &str, qemu: &Value, ours: &Value) -> Vec<String> {
    let mut diffs = Vec::new();
    let (Some(q), Some(o)) = (qemu.as_object(), ours.as_object()) else {
        if qemu != ours {
            diffs.push(format!(
                "{what}: `format-specific` differs\n   qemu-img: {qemu}\n   cowshed : {ours}"
            ));
        }
        return diffs;
    };
    for (k, qv) in q {
        let Some(ov) = o.get(k) else {
            diffs.push(format!(
                "{what}: key `format-specific.{k}` missing in cowshed (qemu-img: {qv})"
            ));
            continue;
        };
        match (k.as_str(), qv.as_object(), ov.as_object()) {
            ("data", Some(qd), Some(od)) => {
                for (dk, dqv) in qd {
                    match od.get(dk) {
                        None => diffs.push(format!(
                            "{what}: key `format-specific.data.{dk}` missing in cowshed \
                             (qemu-img: {dqv})"
                        )),
                        Some(dov) if dov != dqv => diffs.push(format!(
                            "{what}: `format-specific.data.{dk}` differs\n   qemu-img: {dqv}\n   \
                             cowshed : {dov}"
                        )),
                        Some(_) => {}
                    }
                }
            }
            _ if qv != ov => diffs.push(format!(
                "{what}: `format-specific.{k}` differs\n   qemu-img: {qv}\n   cowshed : {ov}"
            )),
            _ => {}
        }
    }
    diffs
}

/// The data lines of `map --output human` (everything after the header).
pub fn human_map_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("Offset"))
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The first differing byte of two buffers, if any (or the shorter length).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Collects failed checks of one case, so that one broken check does not hide
/// the others; `finish` panics with all of them.
pub struct Failures {
    case: String,
    list: Vec<String>,
}

impl Failures {
    pub fn new(case: &str) -> Self {
        Failures {
            case: case.to_string(),
            list: Vec::new(),
        }
    }

    pub fn push(&mut self, check: &str, msg: impl Into<String>) {
        self.list
            .push(format!("[{}] {check}: {}", self.case, msg.into()));
    }

    pub fn check(&mut self, cond: bool, check: &str, msg: impl FnOnce() -> String) {
        if !cond {
            self.push(check, msg());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn finish(self) {
        assert!(
            self.list.is_empty(),
            "case `{}`: {} check(s) failed\n\n{}",
            self.case,
            self.list.len(),
            self.list.join("\n\n")
        );
    }
}

/// Helpers shared by the tests of operations that change images in place
/// (rebase, commit): copies, the oracle's verdicts, a QEMU holder.
impl Work {
    /// Copy `from` to `to` (paths relative to the scratch directory).
    pub fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to))
            .unwrap_or_else(|e| panic!("[{}] copy {from} {to}: {e}", self.case));
    }

    /// `qemu-img compare A B` succeeded (same guest view).
    pub fn same_view(&self, a: &str, b: &str) -> Result<(), String> {
        let r = self.run("qemu-img", &["compare", a, b]);
        if r.ok() {
            Ok(())
        } else {
            Err(r.to_string())
        }
    }

    /// `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks only).
    pub fn check_code(&self, img: &str) -> i32 {
        self.run("qemu-img", &["check", img]).code.unwrap_or(-1)
    }

    /// `qemu-img map --output json` of an image, extents merged.
    pub fn map_json(&self, img: &str) -> Vec<Value> {
        let r = self.qemu_img(&["map", "--output", "json", img]);
        let v = self.json(&r);
        merge_extents(v.as_array().map_or(&[][..], |a| a.as_slice()))
    }

    /// `qemu-img info --output json` of an image (with -U: readable while
    /// another process holds it).
    pub fn info_json(&self, img: &str) -> Value {
        let r = self.qemu_img(&["info", "-U", "--output", "json", img]);
        self.json(&r)
    }

    /// Start `qemu-io` holding `img` open read-write (it waits for commands
    /// on stdin) and wait until its lock is visible. Stop it with
    /// [`release_holder`].
    pub fn hold_writer(&self, img: &str, fmt: &str) -> std::process::Child {
        self.hold(&["-f", fmt, img], img)
    }

    /// [`Work::hold_writer`] for a qcow2 image whose backing file is not
    /// opened at all (`backing: null`): only `img` is held, not the chain
    /// under it as a VM would hold it.
    pub fn hold_writer_alone(&self, img: &str) -> std::process::Child {
        let spec = format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{img}"}}}}"#
        );
        self.hold(&[&spec], img)
    }

    fn hold(&self, args: &[&str], img: &str) -> std::process::Child {
        use std::process::Stdio;
        let mut child = Command::new("qemu-io")
            .args(args)
            .current_dir(self.root())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("[{}] cannot spawn qemu-io: {e}", self.case));
        if self.writer_lock_seen(img) {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("[{}] qemu-io never locked {img}", self.case);
    }

    /// Wait (a 60 s hang guard) until `img` shows QEMU's writer lock,
    /// asked without taking a lock (a probe that locks, like `qemu-img
    /// info`, could make the starting QEMU fail). False if it never does.
    pub fn writer_lock_seen(&self, img: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let state = cowshed::engine::lock_state(&self.path(img));
            if matches!(state, Ok(cowshed::engine::LockState::Writer)) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }
}

/// Stop a holder started by [`Work::hold_writer`].
pub fn release_holder(mut child: std::process::Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// The file names in `dir`, sorted (to see what an operation left behind).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

impl Work {
    /// `qemu-img check --output=json FILE`: `Ok(report)` when it exits 0 with
    /// no corruptions and no leaks, else `Err(why)`.
    pub fn check_clean(&self, file: &str) -> Result<Value, String> {
        let r = self.run("qemu-img", &["check", "--output=json", file]);
        let v: Value = serde_json::from_str(&r.stdout).map_err(|e| format!("{e}: {r}"))?;
        if !r.ok() || v.get("corruptions").is_some() || v.get("leaks").is_some() {
            return Err(format!("{r}"));
        }
        Ok(v)
    }

    /// `qemu-img info --output=json FILE`'s actual-size (bytes on disk).
    pub fn actual_size(&self, file: &str) -> u64 {
        let r = self.qemu_img(&["info", "--output=json", file]);
        self.json(&r)["actual-size"].as_u64().unwrap_or_else(|| {
            panic!("[{}] no actual-size in {r}", self.case);
        })
    }

    /// `qemu-img map --output=json FILE` with host offsets dropped and
    /// neighbours merged again: what each guest range is, not where.
    pub fn map_shape(&self, file: &str) -> Vec<Value> {
        let r = self.qemu_img(&["map", "--output=json", file]);
        let mut v: Vec<Value> = self.json(&r).as_array().cloned().unwrap_or_default();
        for e in &mut v {
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
        }
        merge_extents(&v)
    }
}

impl sshd::Sshd {
    /// The cowshed binary under test as the remote command (see
    /// [`sshd::Sshd::remote_command_of`]).
    pub fn remote_command(&self, extra: &[(&str, &str)]) -> String {
        self.remote_command_of(COWSHED, extra)
    }
}
