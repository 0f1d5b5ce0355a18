//! End to end in a real terminal: tmux runs the built binary on a fixture
//! directory, keys are sent with `send-keys`, the pane is read with
//! `capture-pane`, and the files are checked on disk with qemu-img.

mod common;

use common::run::ok;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cowshed");
const WAIT: Duration = Duration::from_secs(60);

/// A tmux server of our own (its own socket, no user config) with one
/// session; killed on drop, whatever way the test ends.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn start(dir: &Path, name: &str, command: &str) -> Tmux {
        let t = Tmux {
            socket: format!("cowshed-test-{}-{name}", std::process::id()),
            session: "tui".into(),
        };
        let out = t.tmux_in(
            dir,
            &[
                "new-session",
                "-d",
                "-x",
                "120",
                "-y",
                "40",
                "-s",
                &t.session,
                command,
            ],
        );
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn tmux_in(&self, dir: &Path, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .current_dir(dir)
            // The outer terminal tmux pretends to be; inside, tmux sets its
            // own TERM for the program.
            .env("TERM", "xterm-256color")
            // Never the developer's own cowshed config.
            .env("XDG_CONFIG_HOME", dir)
            .output()
            .expect("run tmux")
    }

    fn tmux(&self, args: &[&str]) -> Output {
        self.tmux_in(Path::new("/"), args)
    }

    fn capture(&self) -> String {
        let out = self.tmux(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn send(&self, keys: &str) {
        let out = self.tmux(&["send-keys", "-t", &self.session, keys]);
        assert!(
            out.status.success(),
            "send-keys: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn alive(&self) -> bool {
        self.tmux(&["has-session", "-t", &self.session])
            .status
            .success()
    }

    /// Poll the pane until `pred` holds; panic with the last screen if not.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return screen;
            }
            if start.elapsed() > WAIT {
                panic!("timed out waiting for {what}; the pane shows:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

#[test]
fn clone_in_a_real_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, &["base.qcow2", "16M"]);
    create_qcow2(d, &["-b", "base.qcow2", "-F", "qcow2", "vm.qcow2"]);

    let tmux = Tmux::start(d, "clone", &format!("'{BIN}' ."));
    tmux.wait_for("the tree", |s| {
        s.contains("base.qcow2") && s.contains("vm.qcow2") && s.contains("2 images")
    });
    // The base is selected first; one key clones it.
    tmux.send("c");
    let screen = tmux.wait_for("the clone in the tree", |s| {
        s.contains("created base-1.qcow2") && s.contains("base-1.qcow2 ")
    });
    let selected = screen
        .lines()
        .find(|l| l.starts_with('›'))
        .unwrap_or_default();
    assert!(
        selected.contains("base-1.qcow2"),
        "selected row: {selected}\n{screen}"
    );

    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(d.join("base-1.qcow2"))
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");

    tmux.send("q");
    wait_until("q to end the program", || !tmux.alive());
}

#[test]
fn quitting_restores_the_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, &["base.qcow2", "16M"]);
    // A shell around cowshed shows what the terminal is like afterwards:
    // the line printed before must be back (alternate screen left) and the
    // tty must be cooked again (raw mode off: `icanon` without a minus).
    let script = format!(
        "echo before-cowshed; '{BIN}' .; echo \"exit=$?\"; stty -a | tr ' ' '\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; sleep 600"
    );
    let tmux = Tmux::start(
        d,
        "restore",
        &format!("sh -c \"{}\"", script.replace('"', "\\\"")),
    );
    tmux.wait_for("the tree", |s| {
        s.contains("1 image") && !s.contains("before-cowshed")
    });
    tmux.send("q");
    let screen = tmux.wait_for("the shell after cowshed", |s| {
        s.contains("exit=0") && s.contains("echo")
    });
    let lines: Vec<&str> = screen.lines().map(str::trim).collect();
    assert!(lines.contains(&"before-cowshed"), "{screen}");
    assert!(
        lines.contains(&"icanon") && lines.contains(&"echo"),
        "{screen}"
    );
    assert!(
        !lines.contains(&"-icanon") && !lines.contains(&"-echo"),
        "{screen}"
    );
}

/// `cowshed demo` in a real terminal: the simulated guest holds web-1 like
/// a running VM (QEMU's writer locks) and makes it grow on screen and on
/// disk; quitting releases it, and QEMU finds the image clean.
#[test]
fn demo_guest_grows_an_overlay_through_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fleet = d.join("fleet");
    let tmux = Tmux::start(d, "demo", &format!("'{BIN}' demo fleet"));
    tmux.wait_for("the demo tree", |s| {
        s.contains("web-1.qcow2") && s.contains("debian-12.qcow2")
    });
    let web1 = fleet.join("web-1.qcow2");
    let first = std::fs::metadata(&web1).unwrap().len();
    wait_until("web-1.qcow2 to grow", || {
        std::fs::metadata(&web1).unwrap().len() >= first + (2 << 20)
    });
    assert_eq!(
        cowshed::engine::lock_state(&web1).unwrap(),
        cowshed::engine::LockState::Writer,
        "the guest holds web-1 as a writer"
    );
    let refused = Command::new("qemu-io")
        .args(["-c", "write 0 4k"])
        .arg(&web1)
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "QEMU could write into the guest's image"
    );
    tmux.wait_for("a growth rate on screen", |s| s.contains("/s"));
    tmux.send("q");
    wait_until("the demo to quit", || !tmux.alive());
    assert_eq!(
        cowshed::engine::lock_state(&web1).unwrap(),
        cowshed::engine::LockState::None
    );
    ok(&fleet, "qemu-img", &["check", "web-1.qcow2"]);
}

/// Issue 11, defect 13: `cowshed demo` without a DIR builds its fleet in a
/// temporary directory and removes it on quit (it used to leave a fleet,
/// its guest's image filled to 1 GiB, behind every run).
#[test]
fn demo_without_a_dir_removes_its_fleet_on_quit() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let tmux = Tmux::start(
        dir.path(),
        "demo-temp",
        &format!("env TMPDIR='{}' '{BIN}' demo", tmp.display()),
    );
    tmux.wait_for("the demo tree", |s| {
        s.contains("web-1.qcow2") && s.contains("debian-12.qcow2")
    });
    let fleets: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert_eq!(fleets.len(), 1, "one fleet while it runs");
    tmux.send("q");
    wait_until("the demo to quit", || !tmux.alive());
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Issue 11, defect 6: an image the user may not read is shown where it
/// is, greyed, with the reason, not dropped from the tree. Run as an
/// unprivileged user (root reads everything), in a real terminal.
#[test]
fn an_image_that_cannot_be_read_is_shown_with_the_reason() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    for name in ["ok.qcow2", "locked.qcow2"] {
        ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", name, "1M"]);
        std::fs::set_permissions(d.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(
        d.join("locked.qcow2"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let as_nobody = format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups '{BIN}' '{}'",
        d.display()
    );
    let tmux = Tmux::start(d, "unreadable", &as_nobody);
    let screen = tmux.wait_for("both files", |s| {
        s.contains("ok.qcow2") && s.contains("locked.qcow2")
    });
    let row = screen
        .lines()
        .find(|l| l.contains("locked.qcow2"))
        .unwrap_or_default();
    assert!(
        row.contains("unreadable") && row.contains("Permission denied"),
        "{row}\n{screen}"
    );
    assert!(
        screen.contains("1 image "),
        "not counted as an image:\n{screen}"
    );
    tmux.send("q");
}

/// A root on another host (an sshd of the test's own on localhost): its
/// tree under the host's name, a clone run there by the agent and seen
/// through its live updates, and the rows greyed with the reason once the
/// host is gone.
#[test]
fn a_remote_root_in_a_real_terminal() {
    let Some(sshd) = common::sshd::Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    create_qcow2(d, &["base.qcow2", "16M"]);
    let env = agent_env(&sshd);
    let command = format!("env {} '{BIN}' host1:{}", env, d.display());
    let tmux = Tmux::start(d, "remote", &command);
    tmux.wait_for("the host's tree", |s| s.contains("host1: base.qcow2"));
    tmux.send("c");
    tmux.wait_for("the clone made there", |s| s.contains("base-1.qcow2"));
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(d.join("base-1.qcow2"))
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["backing-filename"], "base.qcow2");
    // What the agent does not run (a move of several marked images) is
    // refused, never run on a local file of that name.
    tmux.send("g");
    tmux.send("*");
    tmux.wait_for("the tree marked", |s| s.contains("2 marked"));
    tmux.send("M");
    tmux.wait_for("the refusal", |s| s.contains("acts on one image at a time"));
    drop(sshd);
    tmux.wait_for("the stale rows", |s| s.contains("stale: host1 unreachable"));
}

/// `qemu-img info` of a file, as JSON (`-U`: the TUI may look at it).
/// Poll `cond` until it holds, failing after [`WAIT`] with `what`: the
/// test waits on state (a file there, a lock gone), never on a duration.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// No process holds the image (a job's own lock is gone: it ended).
fn unlocked(path: &Path) -> bool {
    matches!(
        cowshed::engine::lock_state(path),
        Ok(cowshed::engine::LockState::None)
    )
}

/// What a cowshed started in tmux needs to reach the test's hosts and
/// run the binary under test there, as `env` arguments (`K='V' ...`).
fn agent_env(sshd: &common::sshd::Sshd) -> String {
    let pairs: Vec<String> = sshd
        .env(&sshd.remote_command(&[]))
        .into_iter()
        .map(|(k, v)| format!("{k}='{v}'"))
        .collect();
    pairs.join(" ")
}

/// `qemu-img create -q -f qcow2 ARGS...` in `dir`.
fn create_qcow2(dir: &Path, args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend(args);
    ok(dir, "qemu-img", &all);
}

/// `qemu-io -f qcow2 -c CMD IMAGE` in `dir`.
fn qemu_io(dir: &Path, image: &str, cmd: &str) {
    ok(dir, "qemu-io", &["-f", "qcow2", "-c", cmd, image]);
}

fn qemu_info(path: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Select the image `name` of host1 in the tree: filter down to it (and what it
/// hangs on, above it) and take the last row. The old filter is erased
/// in the filter's own line: an Escape sent just before another key
/// would reach the program as Alt and that key.
fn select(tmux: &Tmux, name: &str) {
    tmux.send("/");
    let out = tmux.tmux(&["send-keys", "-N", "64", "-t", &tmux.session, "BSpace"]);
    assert!(out.status.success(), "send-keys");
    tmux.wait_for("an empty filter", |s| s.contains(" / ▏"));
    tmux.send(name);
    tmux.wait_for(name, |s| s.contains(&format!(" / {name}▏")));
    tmux.send("Enter");
    tmux.send("G");
    // The row may come with the host's next snapshot (a job's new file).
    tmux.wait_for("the row selected", |s| {
        s.lines()
            .any(|l| l.starts_with('›') && l.contains(&format!("{name} ")))
    });
}

/// Move, rebase, delete (trash and for good) and convert on another
/// host's images, from their dialogs: each runs there, by the agent, and
/// the files are checked with qemu-img (the "other host" is localhost).
#[test]
fn dialogs_act_on_a_remote_root_through_its_agent() {
    let Some(sshd) = common::sshd::Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Outside the root: not an image of the tree.
    let aside = tempfile::tempdir().expect("tempdir");
    let io = |img: &str, cmd: &str| qemu_io(d, img, cmd);
    create_qcow2(d, &["base.qcow2", "16M"]);
    io("base.qcow2", "write -P 0xaa 0 1M");
    create_qcow2(d, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    io("top.qcow2", "write -P 0xbb 1M 1M");
    create_qcow2(d, &["other.qcow2", "16M"]);
    io("other.qcow2", "write -P 0xcc 2M 1M");
    let env = agent_env(&sshd);
    let command = format!("env {} '{BIN}' host1:{}", env, d.display());
    let tmux = Tmux::start(d, "remote-dialogs", &command);
    tmux.wait_for("the host's tree", |s| s.contains("host1: base.qcow2"));

    // Move: the base is renamed there and its overlay re-pointed.
    select(&tmux, "base.qcow2");
    tmux.send("M");
    tmux.wait_for("the move dialog", |s| s.contains("to: base.qcow2"));
    tmux.send("C-u");
    tmux.send("base-moved.qcow2");
    tmux.send("Enter");
    tmux.wait_for("the move's end", |s| s.contains("base-moved.qcow2: done"));
    assert!(!d.join("base.qcow2").exists());
    assert_eq!(qemu_info(&d.join("base-moved.qcow2"))["format"], "qcow2");
    assert_eq!(
        qemu_info(&d.join("top.qcow2"))["backing-filename"],
        "base-moved.qcow2"
    );

    // Rebase (safe) onto a path typed for that host: the guest's view of
    // the overlay is the same as before.
    let before = aside.path().join("top-before.raw");
    ok(
        d,
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            "top.qcow2",
            &before.display().to_string(),
        ],
    );
    select(&tmux, "top.qcow2");
    // The host's forest hangs it on the moved base (what it hangs on shows
    // above it): its chain is whole, so the rebase may be safe.
    tmux.wait_for("the overlay on the moved base", |s| {
        s.contains("host1: base-moved.qcow2")
    });
    tmux.send("b");
    tmux.send("t");
    tmux.send("other.qcow2");
    tmux.send("Enter");
    // Safe: the forest shows the overlay's chain whole again after the
    // move (a stale one would only offer unsafe).
    tmux.wait_for("the rebase dialog, safe", |s| {
        s.contains("other.qcow2") && s.contains("(•) safe")
    });
    tmux.send("y");
    tmux.wait_for("the rebase's end", |s| {
        s.contains("top.qcow2 → other.qcow2: done")
    });
    let info = qemu_info(&d.join("top.qcow2"));
    assert_eq!(info["backing-filename"], "other.qcow2");
    ok(
        d,
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            &before.display().to_string(),
        ],
    );

    // Delete into the trash: nothing uses the old base any more, once the
    // host's live forest says so.
    select(&tmux, "base-moved.qcow2");
    tmux.wait_for("the old base alone", |s| {
        s.contains("tree of base-moved.qcow2: 1 image ")
    });
    tmux.send("d");
    tmux.wait_for("the delete dialog", |s| s.contains("delete?"));
    tmux.send("y");
    tmux.wait_for("the trashing's end", |s| {
        s.contains("trash base-moved.qcow2: done")
    });
    assert!(!d.join("base-moved.qcow2").exists());
    let trashed: Vec<_> = files_under(&d.join(".cowshed-trash"))
        .into_iter()
        .filter(|p| {
            Command::new("qemu-img")
                .args(["info", "-U", "--output=json"])
                .arg(p)
                .output()
                .is_ok_and(|o| {
                    o.status.success()
                        && serde_json::from_slice::<Value>(&o.stdout)
                            .is_ok_and(|v| v["format"] == "qcow2")
                })
        })
        .collect();
    assert_eq!(trashed.len(), 1, "the trashed base: {trashed:?}");

    // Convert: a copy beside it, the same guest data.
    select(&tmux, "other.qcow2");
    tmux.send("v");
    tmux.wait_for("the convert dialog", |s| s.contains("other-conv.qcow2"));
    tmux.send("Enter");
    tmux.wait_for("the convert's end", |s| {
        s.contains("→ other-conv.qcow2: done")
    });
    let info = qemu_info(&d.join("other-conv.qcow2"));
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    ok(
        d,
        "qemu-img",
        &["compare", "-U", "other.qcow2", "other-conv.qcow2"],
    );

    // Delete for good: gone, and not into the trash.
    select(&tmux, "other-conv.qcow2");
    tmux.send("d");
    tmux.wait_for("the delete dialog", |s| s.contains("delete?"));
    tmux.send("f");
    tmux.wait_for("for good", |s| s.contains("for good"));
    tmux.send("y");
    tmux.wait_for("the deletion's end", |s| {
        s.contains("delete other-conv.qcow2: done")
    });
    assert!(!d.join("other-conv.qcow2").exists());
    assert!(files_under(&d.join(".cowshed-trash"))
        .iter()
        .all(|p| !p.to_string_lossy().contains("other-conv")));
    tmux.send("q");
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// Two hosts that see one directory (both the test's sshd), host1 with a
/// libvirt domain (the test driver's, no daemon) on the overlay, host2
/// without: the tree shows each file once with both hosts and the VM
/// column from host1, the details pane the chain and the domain as
/// host1's agent found them, and a commit run on host2 is refused naming
/// the domain on host1, the files untouched. Then the same directory as a
/// local root beside host1: shown once as this machine's, and a commit
/// run here is refused by host1's domain too.
#[test]
fn shared_storage_of_two_hosts_in_a_real_terminal() {
    // Short paths: the refusal fits the status line.
    let dir = tempfile::Builder::new()
        .prefix("c")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = dir.path();
    let aside = tempfile::tempdir().expect("tempdir");
    let a = aside.path();
    create_qcow2(d, &["base.qcow2", "16M"]);
    qemu_io(d, "base.qcow2", "write -P 0xaa 0 1M");
    create_qcow2(d, &["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    qemu_io(d, "top.qcow2", "write -P 0xbb 1M 1M");
    std::fs::write(
        a.join("node.xml"),
        format!(
            "<node><domain type='test'><name>guard-vm</name>\
             <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid><memory>65536</memory>\
             <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
             <source file='{}'/><target dev='vda'/></disk></devices></domain></node>",
            d.join("top.qcow2").display()
        ),
    )
    .expect("node xml");
    std::fs::create_dir_all(a.join("config/cowshed")).expect("config dir");
    std::fs::write(
        a.join("config/cowshed/config.toml"),
        format!("libvirt = [\"test://{}\"]\n", a.join("node.xml").display()),
    )
    .expect("config");
    let config = a.join("config").display().to_string();
    let Some(sshd) = common::sshd::Sshd::start_or_skip(
        &["host1", "host2"],
        &[("host1", "XDG_CONFIG_HOME", &config)],
    ) else {
        return;
    };
    let env = agent_env(&sshd);
    let command = format!(
        "env {} '{BIN}' host2:{dir} host1:{dir}",
        env,
        dir = d.display()
    );
    let before: Vec<Vec<u8>> = ["top.qcow2", "base.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).expect("read"))
        .collect();
    let tmux = Tmux::start(d, "remote-shared", &command);
    let screen = tmux.wait_for("one tree with both hosts and the domain", |s| {
        s.contains("host2+host1: base.qcow2")
            && s.lines()
                .any(|l| l.contains("top.qcow2") && l.contains("guard-vm running"))
    });
    assert_eq!(
        screen.matches("top.qcow2").count(),
        1,
        "the overlay once:\n{screen}"
    );
    select(&tmux, "top.qcow2");
    tmux.wait_for("the details from host1's agent", |s| {
        s.contains("chain  top.qcow2 → base.qcow2")
            && s.contains("vm guard-vm (running")
            && s.contains("shared: also host1:")
    });
    tmux.send("m");
    tmux.wait_for("the commit question", |s| s.contains("top.qcow2 into"));
    tmux.send("y");
    tmux.wait_for("the refusal", |s| {
        s.contains("failed") && s.contains("used by domain guard-vm (running")
    });
    let after: Vec<Vec<u8>> = ["top.qcow2", "base.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).expect("read"))
        .collect();
    assert!(before == after, "a refused commit changed a file");
    tmux.send("q");
    drop(tmux);

    // The same directory as a local root and on host1 (this machine seen
    // over ssh): each file once, this machine's row naming host1 too; a
    // commit run here asks host1 first, whose domain refuses it.
    let command = format!("env {} '{BIN}' {dir} host1:{dir}", env, dir = d.display());
    let tmux = Tmux::start(d, "local-shared", &command);
    let screen = tmux.wait_for("one tree, this machine's and host1's", |s| {
        s.contains("local+host1: base.qcow2")
            && s.lines()
                .any(|l| l.contains("top.qcow2") && l.contains("guard-vm running"))
    });
    assert_eq!(
        screen.matches("top.qcow2").count(),
        1,
        "the overlay once:\n{screen}"
    );
    select(&tmux, "top.qcow2");
    tmux.wait_for("the shared line", |s| {
        s.contains("shared: also host1:") && s.contains("jobs run on this machine")
    });
    tmux.send("m");
    tmux.wait_for("the commit question", |s| s.contains("top.qcow2 into"));
    tmux.send("y");
    tmux.wait_for("the refusal from host1", |s| {
        s.contains("failed") && s.contains("used by domain guard-vm (running")
    });
    let after: Vec<Vec<u8>> = ["top.qcow2", "base.qcow2"]
        .iter()
        .map(|f| std::fs::read(d.join(f)).expect("read"))
        .collect();
    assert!(before == after, "a commit refused by host1 changed a file");
    tmux.send("q");
}

/// Wait until the selected image shows no holder: a job's end has the
/// host's agent read its image again, and the tree drops the job's own
/// lock (which a dialog opened at once would otherwise refuse).
fn released(tmux: &Tmux) {
    tmux.wait_for("the job's lock gone", |s| s.contains("held by nobody"));
}

/// The snapshots (`S`) and bitmaps (`B`) dialogs, flatten (`f`) and reset
/// (`R`) on another host's images: the lists come from that host's agent,
/// every change runs there, and each is checked with qemu-img. A refusal
/// only the agent sees (a QEMU that took the image after the dialog
/// opened) reaches the status line in the engine's words; read-only mode
/// refuses before anything is sent.
#[test]
fn snapshot_bitmap_flatten_and_reset_dialogs_on_a_remote_root() {
    let Some(sshd) = common::sshd::Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let aside = tempfile::tempdir().expect("tempdir");
    let io = |img: &str, cmd: &str| qemu_io(d, img, cmd);
    let create = |args: &[&str]| create_qcow2(d, args);
    create(&["base.qcow2", "16M"]);
    io("base.qcow2", "write -P 0xaa 0 1M");
    create(&["solo.qcow2", "16M"]);
    io("solo.qcow2", "write -P 0x51 0 2M");
    for overlay in ["flat.qcow2", "wipe.qcow2", "held.qcow2"] {
        create(&["-b", "base.qcow2", "-F", "qcow2", overlay]);
        io(overlay, "write -P 0xbb 1M 1M");
    }
    let raw = |img: &str, name: &str| {
        let out = aside.path().join(name).display().to_string();
        ok(d, "qemu-img", &["convert", "-U", "-O", "raw", img, &out]);
        out
    };
    let compare = |img: &str, raw: &str| {
        ok(
            d,
            "qemu-img",
            &["compare", "-U", "-f", "qcow2", "-F", "raw", img, raw],
        );
    };
    let env = agent_env(&sshd);
    let command = format!("env {} '{BIN}' host1:{}", env, d.display());
    let tmux = Tmux::start(d, "remote-snapshots", &command);
    tmux.wait_for("the host's tree", |s| s.contains("host1: base.qcow2"));

    // Snapshots: the (empty) list from the agent, create, apply, delete.
    select(&tmux, "solo.qcow2");
    tmux.send("S");
    tmux.wait_for("the agent's empty list", |s| s.contains("no snapshots yet"));
    tmux.send("c");
    tmux.wait_for("the name field", |s| s.contains("name: ▏"));
    tmux.send("first");
    tmux.send("Enter");
    tmux.wait_for("the snapshot's creation", |s| {
        s.contains("snapshot create 'first' solo.qcow2: done")
    });
    released(&tmux);
    let listed = ok(d, "qemu-img", &["snapshot", "-U", "-l", "solo.qcow2"]);
    assert!(listed.contains("first"), "{listed}");
    let at_snapshot = raw("solo.qcow2", "solo-first.raw");
    io("solo.qcow2", "write -P 0x52 0 1M");
    tmux.send("S");
    // The dialog's own row (the details pane lists it too).
    tmux.wait_for("the agent's list", |s| s.contains("▸ 1    first ·"));
    tmux.send("a");
    tmux.wait_for("the apply question", |s| {
        s.contains("Apply snapshot 'first'")
    });
    tmux.send("y");
    tmux.wait_for("the apply's end", |s| {
        s.contains("snapshot apply 'first' solo.qcow2: done")
    });
    released(&tmux);
    compare("solo.qcow2", &at_snapshot);
    tmux.send("S");
    // The dialog's own row (the details pane lists it too).
    tmux.wait_for("the agent's list", |s| s.contains("▸ 1    first ·"));
    tmux.send("d");
    tmux.wait_for("the delete question", |s| {
        s.contains("Delete snapshot 'first'")
    });
    tmux.send("y");
    tmux.wait_for("the delete's end", |s| {
        s.contains("snapshot delete 'first' solo.qcow2: done")
    });
    released(&tmux);
    assert!(qemu_info(&d.join("solo.qcow2")).get("snapshots").is_none());
    compare("solo.qcow2", &at_snapshot);

    // Bitmaps: add, disable, remove, as qemu-img info sees them.
    let bitmaps = || qemu_info(&d.join("solo.qcow2"))["format-specific"]["data"]["bitmaps"].clone();
    tmux.send("B");
    tmux.wait_for("the agent's empty list", |s| s.contains("no bitmaps yet"));
    tmux.send("a");
    tmux.wait_for("the name field", |s| s.contains("name: ▏"));
    tmux.send("b0");
    tmux.send("Enter");
    tmux.wait_for("the bitmap's addition", |s| {
        s.contains("bitmap add 'b0' solo.qcow2: done")
    });
    released(&tmux);
    let b = bitmaps();
    assert_eq!(b[0]["name"], "b0", "{b}");
    assert_eq!(b[0]["flags"], serde_json::json!(["auto"]), "{b}");
    tmux.send("B");
    tmux.wait_for("the agent's list", |s| {
        s.contains("▸ b0 · 64 KiB · enabled")
    });
    tmux.send("e");
    tmux.wait_for("the bitmap disabled", |s| {
        s.contains("bitmap disable 'b0' solo.qcow2: done")
    });
    released(&tmux);
    assert_eq!(bitmaps()[0]["flags"], serde_json::json!([]));
    tmux.send("B");
    tmux.wait_for("the agent's list", |s| {
        s.contains("▸ b0 · 64 KiB · disabled")
    });
    tmux.send("d");
    tmux.wait_for("the remove question", |s| s.contains("Remove bitmap 'b0'"));
    tmux.send("y");
    tmux.wait_for("the bitmap removed", |s| {
        s.contains("bitmap remove 'b0' solo.qcow2: done")
    });
    assert!(bitmaps().is_null());
    ok(d, "qemu-img", &["check", "-U", "solo.qcow2"]);

    // Flatten: standalone, the same guest view.
    let flat_view = raw("flat.qcow2", "flat.raw");
    select(&tmux, "flat.qcow2");
    tmux.send("f");
    tmux.wait_for("the flatten question", |s| s.contains("flatten?"));
    tmux.send("y");
    tmux.wait_for("the flatten's end", |s| {
        s.contains("flatten flat.qcow2: done")
    });
    assert!(qemu_info(&d.join("flat.qcow2"))
        .get("backing-filename")
        .is_none());
    compare("flat.qcow2", &flat_view);

    // Reset: its own data gone, it reads as its base again.
    select(&tmux, "wipe.qcow2");
    tmux.send("R");
    tmux.wait_for("the reset question", |s| s.contains("reset?"));
    tmux.send("y");
    tmux.wait_for("the reset's end", |s| s.contains("reset wipe.qcow2: done"));
    assert_eq!(
        qemu_info(&d.join("wipe.qcow2"))["backing-filename"],
        "base.qcow2"
    );
    ok(
        d,
        "qemu-img",
        &["compare", "-U", "wipe.qcow2", "base.qcow2"],
    );

    // A batch of the host's marked images: each converted there, beside
    // itself, the same guest data.
    select(&tmux, "flat.qcow2");
    tmux.send("Space");
    select(&tmux, "wipe.qcow2");
    tmux.send("Space");
    tmux.wait_for("two marked", |s| s.contains("2 marked"));
    tmux.send("v");
    tmux.wait_for("the convert dialog", |s| s.contains("-conv"));
    tmux.send("Enter");
    tmux.wait_for("the batch list", |s| s.contains("Convert 2 marked images"));
    tmux.send("y");
    tmux.wait_for("the batch started", |s| {
        s.contains("convert: 2 jobs started")
    });
    // Made under another name and renamed into place: there means done.
    for made in ["flat-conv.qcow2", "wipe-conv.qcow2"] {
        wait_until(made, || d.join(made).exists());
    }
    compare("flat-conv.qcow2", &flat_view);
    ok(
        d,
        "qemu-img",
        &["compare", "-U", "wipe-conv.qcow2", "base.qcow2"],
    );
    for made in ["flat-conv.qcow2", "wipe-conv.qcow2"] {
        ok(d, "qemu-img", &["check", "-U", made]);
    }

    // Protect: the base read-only there, then writable again.
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d.join(f))
            .expect("stat")
            .permissions()
            .mode()
            & 0o222
    };
    select(&tmux, "base.qcow2");
    tmux.send("p");
    tmux.wait_for("the protection", |s| {
        s.contains("protect base.qcow2 (read-only on disk): done")
    });
    assert_eq!(mode("base.qcow2"), 0);
    // `p` toggles what the tree shows: the host's watch must have said so.
    tmux.wait_for("the base shown protected", |s| {
        s.contains("⊘ host1: base.qcow2")
    });
    tmux.send("p");
    tmux.wait_for("the protection lifted", |s| {
        s.contains("unprotect base.qcow2 (writable again): done")
    });
    assert_ne!(mode("base.qcow2"), 0);

    // A QEMU takes the image while the question is open: the agent
    // refuses, and says who holds it.
    select(&tmux, "held.qcow2");
    tmux.send("R");
    tmux.wait_for("the reset question", |s| s.contains("reset?"));
    let before = std::fs::read(d.join("held.qcow2")).expect("read");
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "held.qcow2"])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    wait_until("qemu-io's lock on held.qcow2", || {
        matches!(
            cowshed::engine::lock_state(&d.join("held.qcow2")),
            Ok(cowshed::engine::LockState::Writer)
        )
    });
    tmux.send("y");
    let screen = tmux.wait_for("the agent's refusal", |s| {
        s.contains("reset held.qcow2 failed:")
    });
    drop(holder.stdin.take());
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(screen.contains("in use by"), "{screen}");
    assert_eq!(std::fs::read(d.join("held.qcow2")).expect("read"), before);
    tmux.send("q");

    // Read-only: refused here, nothing sent.
    let command = format!("env {} '{BIN}' --readonly host1:{}", env, d.display());
    let ro = Tmux::start(d, "remote-readonly", &command);
    ro.wait_for("the host's tree", |s| s.contains("host1: base.qcow2"));
    select(&ro, "held.qcow2");
    ro.send("f");
    ro.wait_for("the read-only refusal", |s| s.contains("read-only:"));
    assert_eq!(std::fs::read(d.join("held.qcow2")).expect("read"), before);
    ro.send("q");
}

/// The doctor (`!`) and commit (`m`) on another host's images: the
/// doctor's header fix and the commit run there by its agent, each checked
/// with qemu-img.
#[test]
fn doctor_commit_batch_rebase_and_clone_dialogs_on_a_remote_root() {
    let Some(sshd) = common::sshd::Sshd::start_or_skip(&["host1"], &[]) else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let aside = tempfile::tempdir().expect("tempdir");
    let io = |img: &str, cmd: &str| qemu_io(d, img, cmd);
    let create = |args: &[&str]| create_qcow2(d, args);
    create(&["base.qcow2", "16M"]);
    io("base.qcow2", "write -P 0xaa 0 1M");
    let base = d.join("base.qcow2").display().to_string();
    create(&["-b", &base, "-F", "qcow2", "abs.qcow2"]);
    io("abs.qcow2", "write -P 0xab 2M 1M");
    create(&["cbase.qcow2", "16M"]);
    io("cbase.qcow2", "write -P 0xc1 0 2M");
    create(&["-b", "cbase.qcow2", "-F", "qcow2", "ctop.qcow2"]);
    io("ctop.qcow2", "write -P 0xc2 1M 2M");
    create(&["other.qcow2", "16M"]);
    io("other.qcow2", "write -P 0x0e 4M 1M");
    for r in ["r1.qcow2", "r2.qcow2"] {
        create(&["-b", "base.qcow2", "-F", "qcow2", r]);
        io(r, "write -P 0x71 5M 1M");
    }
    let raw = |img: &str| {
        let out = aside
            .path()
            .join(format!("{img}.raw"))
            .display()
            .to_string();
        ok(d, "qemu-img", &["convert", "-U", "-O", "raw", img, &out]);
        out
    };
    let r_views = [raw("r1.qcow2"), raw("r2.qcow2")];
    let top_view = aside.path().join("ctop.raw").display().to_string();
    ok(
        d,
        "qemu-img",
        &["convert", "-U", "-O", "raw", "ctop.qcow2", &top_view],
    );
    let env = agent_env(&sshd);
    let command = format!("env {} '{BIN}' host1:{}", env, d.display());
    let tmux = Tmux::start(d, "remote-doctor", &command);
    tmux.wait_for("the host's tree", |s| s.contains("host1: base.qcow2"));

    // The doctor: an absolute backing name, made relative there.
    select(&tmux, "abs.qcow2");
    tmux.send("!");
    tmux.wait_for("the doctor's fix", |s| {
        s.contains("make the backing name relative")
    });
    tmux.send("Enter");
    tmux.wait_for("the fix's end", |s| {
        s.contains("make the backing name relative of abs.qcow2: done")
    });
    let info = qemu_info(&d.join("abs.qcow2"));
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    ok(d, "qemu-img", &["check", "-U", "abs.qcow2"]);

    // Commit: the base then reads as the overlay did.
    select(&tmux, "ctop.qcow2");
    tmux.send("m");
    tmux.wait_for("the commit question", |s| {
        s.contains("Commit") && s.contains("ctop.qcow2 into")
    });
    tmux.send("y");
    tmux.wait_for("the commit's end", |s| {
        s.contains("commit ctop.qcow2 → cbase.qcow2: done")
    });
    ok(
        d,
        "qemu-img",
        &[
            "compare",
            "-U",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "cbase.qcow2",
            &top_view,
        ],
    );
    ok(d, "qemu-img", &["check", "-U", "cbase.qcow2"]);

    // A batch rebase of two marked overlays onto an image picked in the
    // tree: each rebased there, the guest views kept.
    select(&tmux, "r1.qcow2");
    tmux.send("Space");
    select(&tmux, "r2.qcow2");
    tmux.send("Space");
    tmux.wait_for("two marked", |s| s.contains("2 marked"));
    tmux.send("b");
    tmux.send("/");
    tmux.send("other.qcow2");
    tmux.send("Enter");
    tmux.send("G");
    tmux.wait_for("the new backing picked", |s| {
        s.lines()
            .any(|l| l.starts_with('›') && l.contains("other.qcow2 "))
    });
    tmux.send("Enter");
    tmux.wait_for("the batch list", |s| {
        s.contains("Rebase 2 marked images onto")
    });
    tmux.send("y");
    tmux.wait_for("the batch started", |s| {
        s.contains("rebase: 2 jobs started")
    });
    for (img, view) in ["r1.qcow2", "r2.qcow2"].iter().zip(&r_views) {
        // The new header, and the job's lock gone: the job is over.
        wait_until(&format!("{img} rebased"), || {
            qemu_info(&d.join(img))["backing-filename"] == "other.qcow2" && unlocked(&d.join(img))
        });
        ok(
            d,
            "qemu-img",
            &["compare", "-U", "-f", "qcow2", "-F", "raw", img, view],
        );
        ok(d, "qemu-img", &["check", "-U", img]);
    }

    // Clone with a name (`C`), and two at once (`N`): made there, each an
    // overlay of the image, named as for a local one.
    select(&tmux, "other.qcow2");
    tmux.send("C");
    tmux.wait_for("the clone dialog", |s| {
        s.contains("clone") && s.contains("name:")
    });
    tmux.send("mine.qcow2");
    tmux.send("Enter");
    tmux.send("N");
    tmux.wait_for("the count field", |s| {
        s.contains("prefix:") || s.contains("count:")
    });
    tmux.send("2");
    tmux.send("Enter");
    tmux.wait_for("the clones started", |s| {
        s.contains("2 clones of other.qcow2 started")
    });
    for made in ["mine.qcow2", "other-01.qcow2", "other-02.qcow2"] {
        wait_until(made, || d.join(made).exists() && unlocked(&d.join(made)));
        let info = qemu_info(&d.join(made));
        assert_eq!(info["backing-filename"], "other.qcow2", "{made}: {info}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{made}: {info}");
        ok(d, "qemu-img", &["compare", "-U", made, "other.qcow2"]);
    }
    tmux.send("q");
}
