//! Journeys through the real TUI: the real `App` (with its catalog,
//! inspector and job threads) driven by key and mouse events through
//! `App::update`, drawn by the real `view::draw` on ratatui's `TestBackend`,
//! screens compared with insta snapshots and files checked on disk. The
//! fixture images are made by qemu-img at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cowshed::tui::app::Mode;
use cowshed::tui::dialog::commit::CommitDialog;
use cowshed::tui::dialog::delete::DeleteDialog;
use cowshed::tui::dialog::rebase::RebaseDialog;
use cowshed::tui::dialog::Dialog;
use cowshed::tui::{view, App, Config, Event};
use crossbeam_channel::Receiver;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{
    Event as CtEvent, KeyCode, KeyEvent, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use ratatui::layout::Rect;
use ratatui::Terminal;
use serde_json::Value;
use tempfile::TempDir;

const W: u16 = 110;
const H: u16 = 30;
/// A hang guard for what the UI waits on (a job, an event, a lock).
const SETTLE: Duration = Duration::from_secs(60);

fn run(cmd: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A base with two overlays (one with its own overlay), a raw image and an
/// overlay whose backing file is missing.
fn fleet() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cowshed-journey-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    let img = |args: &[&str]| run("qemu-img", args, d);
    let io = |file: &str, cmd: &str| run("qemu-io", &["-c", cmd, file], d);
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    io("base.qcow2", "write -P 1 0 4M");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "web-1.qcow2",
    ]);
    io("web-1.qcow2", "write -P 2 1M 1M");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "web-2.qcow2",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "web-2.qcow2",
        "-F",
        "qcow2",
        "web-2-1.qcow2",
    ]);
    img(&["create", "-q", "-f", "raw", "disk.raw", "32M"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "old-base.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
        "64M",
    ]);
    dir
}

struct Journey {
    app: App,
    rx: Receiver<Event>,
    term: Terminal<TestBackend>,
    root: PathBuf,
}

impl Journey {
    fn start(root: &Path) -> Journey {
        Journey::with_config(root, Config::default())
    }

    fn with_config(root: &Path, config: Config) -> Journey {
        Journey::sized(root, config, W, H)
    }

    fn sized(root: &Path, config: Config, w: u16, h: u16) -> Journey {
        let (tx, rx) = crossbeam_channel::unbounded();
        let app = App::new(
            vec![root.to_path_buf()],
            config,
            true,
            tx,
            Rect::new(0, 0, w, h),
        )
        .expect("start app");
        let mut j = Journey {
            app,
            rx,
            term: Terminal::new(TestBackend::new(w, h)).expect("terminal"),
            root: root.to_path_buf(),
        };
        j.settle();
        j
    }

    fn settle(&mut self) {
        assert!(
            self.app.settle(&self.rx, SETTLE),
            "the app did not become idle"
        );
    }

    fn send(&mut self, ev: CtEvent) {
        self.app.update(Event::Input(ev));
        self.settle();
    }

    fn key(&mut self, code: KeyCode) {
        self.send(CtEvent::Key(KeyEvent::new(code, KeyModifiers::NONE)));
    }

    fn chars(&mut self, s: &str) {
        for c in s.chars() {
            self.key(KeyCode::Char(c));
        }
    }

    /// The screen as text, with the temp dir's name (the only part that
    /// varies between runs) replaced, and the header's padding after it
    /// collapsed so a longer $TMPDIR does not shift the snapshot.
    fn screen(&mut self) -> String {
        self.term.draw(|f| view::draw(&self.app, f)).expect("draw");
        let text = format!("{}", self.term.backend());
        let root = self.root.display().to_string();
        text.replace(&format!("{root}/"), "[ROOT]/")
            .lines()
            .map(|l| match l.find(&root) {
                Some(i) => {
                    let rest = l[i + root.len()..].trim_start();
                    format!("{}[ROOT] … {rest}", &l[..i])
                }
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// No dialog open, keys go to the tree.
    fn in_tree(&self) -> bool {
        self.app.dialog.is_none() && self.app.mode == Mode::Tree
    }

    fn selected_name(&self) -> String {
        let id = self.app.selected_node().expect("a selection");
        let p = &self.app.forest.nodes[id].record.path;
        p.file_name().expect("name").to_string_lossy().into_owned()
    }

    fn visible_names(&self) -> Vec<String> {
        self.app
            .rows
            .iter()
            .map(|r| {
                let p = &self.app.forest.nodes[r.id].record.path;
                p.file_name().expect("name").to_string_lossy().into_owned()
            })
            .collect()
    }
}

fn qemu_info(path: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn tree_and_details() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    assert_eq!(
        j.visible_names(),
        [
            "base.qcow2",
            "web-1.qcow2",
            "web-2.qcow2",
            "web-2-1.qcow2",
            "disk.raw",
            "orphan.qcow2"
        ]
    );
    insta::assert_snapshot!("tree_base_selected", j.screen());
    j.key(KeyCode::Down);
    assert_eq!(j.selected_name(), "web-1.qcow2");
    let d = j.app.details.as_ref().expect("details computed");
    // 1 MiB of 64 from web-1, the other 3 MiB of base's 4 from base.
    assert_eq!(d.served, vec![1 << 20, 3 << 20]);
    insta::assert_snapshot!("details_overlay", j.screen());
    // The broken one, by its glyph and words.
    j.chars("jjjjjj");
    assert_eq!(j.selected_name(), "orphan.qcow2");
    insta::assert_snapshot!("details_broken", j.screen());
}

#[test]
fn help_popup_from_the_key_table() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('?'));
    assert!(matches!(j.app.mode, Mode::Help(_)));
    insta::assert_snapshot!("help", j.screen());
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
}

#[test]
fn filter_fold_and_sort() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('/'));
    j.chars("WEB-2");
    // Matches and the bases they hang on.
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "web-2.qcow2", "web-2-1.qcow2"]
    );
    insta::assert_snapshot!("filter", j.screen());
    j.key(KeyCode::Esc);
    assert_eq!(j.visible_names().len(), 6);

    // Fold the base with Enter (cursor on it), and unfold it (Space marks).
    assert_eq!(j.selected_name(), "base.qcow2");
    j.key(KeyCode::Enter);
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "disk.raw", "orphan.qcow2"]
    );
    j.key(KeyCode::Enter);
    assert_eq!(j.visible_names().len(), 6);
    // h on an unfolded base folds it, l unfolds it again.
    j.key(KeyCode::Char('h'));
    assert_eq!(j.visible_names().len(), 3);
    j.key(KeyCode::Char('l'));
    assert_eq!(j.visible_names().len(), 6);

    // Sort by size: the biggest tree first, siblings by size too.
    j.key(KeyCode::Char('s'));
    assert_eq!(
        j.visible_names(),
        [
            "base.qcow2",
            "web-1.qcow2",
            "web-2.qcow2",
            "web-2-1.qcow2",
            "orphan.qcow2",
            "disk.raw"
        ]
    );
    assert!(j.screen().contains("sorted by size"));
    // Then by growth (nothing grows: ties fall back to names), then names.
    j.key(KeyCode::Char('s'));
    assert!(j.screen().contains("sorted by growth"));
    assert_eq!(
        j.visible_names(),
        [
            "base.qcow2",
            "web-1.qcow2",
            "web-2.qcow2",
            "web-2-1.qcow2",
            "disk.raw",
            "orphan.qcow2"
        ]
    );
    j.key(KeyCode::Char('s'));
    assert_eq!(j.app.sort, cowshed::tui::app::SortKey::Name);
    let screen = j.screen();
    let footer = screen.lines().last().expect("footer");
    assert!(!footer.contains("sorted by"), "{footer}");
}

#[test]
fn clone_with_one_key_creates_and_selects_the_overlay() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('j'));
    assert_eq!(j.selected_name(), "web-1.qcow2");
    j.key(KeyCode::Char('c'));

    let new = dir.path().join("web-1-1.qcow2");
    let info = qemu_info(&new);
    assert_eq!(info["backing-filename"], "web-1.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 << 20);
    assert_eq!(j.selected_name(), "web-1-1.qcow2");
    let id = j.app.selected_node().expect("selected");
    let parent = j.app.forest.nodes[id].parent.expect("has a parent");
    assert_eq!(
        j.app.forest.nodes[parent].record.path,
        dir.path().join("web-1.qcow2")
    );
    insta::assert_snapshot!("after_clone", j.screen());

    // The next clone of web-1 takes the next free number.
    j.key(KeyCode::Up);
    assert_eq!(j.selected_name(), "web-1.qcow2");
    j.key(KeyCode::Char('c'));
    assert_eq!(j.selected_name(), "web-1-2.qcow2");
    assert_eq!(
        qemu_info(&dir.path().join("web-1-2.qcow2"))["backing-filename"],
        "web-1.qcow2"
    );
}

#[test]
fn clone_as_asks_for_a_name() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('C'));
    assert!(matches!(j.app.dialog, Some(Dialog::Clone(_))));
    j.chars("gold.qcow2");
    insta::assert_snapshot!("clone_as_prompt", j.screen());
    j.key(KeyCode::Enter);
    let info = qemu_info(&dir.path().join("gold.qcow2"));
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(j.selected_name(), "gold.qcow2");

    // A name that exists is refused by the engine and said so; nothing
    // is overwritten.
    let before = std::fs::read(dir.path().join("disk.raw")).expect("read");
    j.key(KeyCode::Char('C'));
    j.chars("disk.raw");
    j.key(KeyCode::Enter);
    let status = j.app.status.clone().expect("a status");
    assert!(
        status.is_error() && status.text.contains("exists"),
        "{status:?}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("disk.raw")).expect("read"),
        before
    );
}

#[test]
fn raw_images_clone_with_a_raw_backing_format() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.chars("jjjjj");
    j.key(KeyCode::Up);
    assert_eq!(j.selected_name(), "disk.raw");
    j.key(KeyCode::Char('c'));
    let info = qemu_info(&dir.path().join("disk-1.qcow2"));
    assert_eq!(info["backing-filename"], "disk.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(j.selected_name(), "disk-1.qcow2");
}

#[test]
fn mouse_click_selects_and_wheel_scrolls() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    let body = view::layout(Rect::new(0, 0, W, H)).tree_body;
    j.send(CtEvent::Mouse(MouseEvent {
        kind: MouseEventKind::Down(MouseButton::Left),
        column: 5,
        row: body.y + 3,
        modifiers: KeyModifiers::NONE,
    }));
    assert_eq!(j.selected_name(), "web-2-1.qcow2");
    // Everything fits: the wheel cannot scroll past the end.
    j.send(CtEvent::Mouse(MouseEvent {
        kind: MouseEventKind::ScrollDown,
        column: 5,
        row: body.y,
        modifiers: KeyModifiers::NONE,
    }));
    assert_eq!(j.app.offset, 0);
}

#[test]
fn too_small_terminal_says_so() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.term = Terminal::new(TestBackend::new(40, 8)).expect("terminal");
    j.send(CtEvent::Resize(40, 8));
    insta::assert_snapshot!("too_small", j.screen());
}

#[test]
fn config_key_overrides_drive_dispatch_and_footer() {
    let dir = fleet();
    let config = Config::parse(
        "[keys]\nclone = \"n\"\ndown = [\"w\"]\n",
        Path::new("test.toml"),
    )
    .expect("config");
    let mut j = Journey::with_config(dir.path(), config);
    // The default keys are gone...
    j.key(KeyCode::Char('c'));
    j.key(KeyCode::Char('j'));
    assert_eq!(j.selected_name(), "base.qcow2");
    assert!(!dir.path().join("base-1.qcow2").exists());
    // ...the new ones work, and the footer and help say so.
    j.key(KeyCode::Char('w'));
    assert_eq!(j.selected_name(), "web-1.qcow2");
    j.key(KeyCode::Char('n'));
    assert!(dir.path().join("web-1-1.qcow2").exists());
    let screen = j.screen();
    let footer = screen.lines().last().expect("footer");
    assert!(footer.contains("n clone"), "{footer}");
    j.key(KeyCode::Char('?'));
    assert!(j.screen().contains("│ w "), "help lists the new key");
}

#[test]
fn rescan_finds_new_files_and_forgets_deleted_ones() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    std::fs::remove_file(dir.path().join("orphan.qcow2")).expect("rm");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "extra.qcow2", "1M"],
        dir.path(),
    );
    j.key(KeyCode::Char('r'));
    let names = j.visible_names();
    assert!(names.contains(&"extra.qcow2".to_string()), "{names:?}");
    assert!(!names.contains(&"orphan.qcow2".to_string()), "{names:?}");
}

impl Journey {
    /// Feed events until `cond` holds (live updates arrive on their own
    /// time, not in answer to a key).
    fn pump_until(&mut self, what: &str, cond: impl Fn(&App) -> bool) {
        let deadline = std::time::Instant::now() + SETTLE;
        while !cond(&self.app) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.app.update(ev),
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }
}

#[test]
fn a_growing_overlay_shows_its_rate_and_new_size() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    let key = dir
        .path()
        .join("web-2-1.qcow2")
        .canonicalize()
        .expect("canonical");
    let allocated = |app: &App| {
        let id = app.forest.get(&key).expect("still there");
        app.forest.nodes[id].record.sizes.allocated
    };
    // A guest writing: 4 MiB in steps, each seen by the live watcher
    // before the next (the rate needs sizes sampled apart).
    for i in 0..4 {
        let before = allocated(&j.app);
        run(
            "qemu-io",
            &["-c", &format!("write -P 7 {}M 1M", 8 + i), "web-2-1.qcow2"],
            dir.path(),
        );
        j.pump_until(&format!("step {i} seen"), |app| allocated(app) > before);
    }
    j.pump_until("a growth rate", |app| {
        app.growth.get(&key).is_some_and(|g| g.rate > 0.0)
    });
    assert!(j.app.is_moving(), "a growing image makes the UI tick");
    j.pump_until("the new size", |app| {
        let id = app.forest.get(&key).expect("still there");
        app.forest.nodes[id].record.sizes.allocated >= 4 << 20
    });
    let screen = j.screen();
    let row = screen
        .lines()
        .find(|l| l.contains("web-2-1.qcow2"))
        .expect("row");
    assert!(row.contains("/s"), "growth column: {row}");
}

#[test]
fn the_binary_reports_a_bad_config_before_touching_the_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[keys]\nclone = \"c\"\nquit = \"c\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .arg("--config")
        .arg(&cfg)
        .arg(dir.path())
        .output()
        .expect("run cowshed");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("bound to both"),
        "{err}"
    );
    // Nothing was drawn: no alternate screen was entered.
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_image_held_by_qemu_shows_its_lock_and_holder() {
    let dir = fleet();
    // qemu-io keeps the image open read-write (and locked) while it waits
    // for commands on stdin.
    let mut holder = Command::new("qemu-io")
        .arg("web-1.qcow2")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = holder.id();
    let stdin = holder.stdin.take();
    let _guard = Kill(holder);
    // Wait until the lock is taken (qemu-io opens the image at start).
    let path = dir.path().join("web-1.qcow2");
    let deadline = std::time::Instant::now() + SETTLE;
    while cowshed::engine::lock_state(&path).expect("lock state")
        != cowshed::engine::LockState::Writer
    {
        assert!(std::time::Instant::now() < deadline, "qemu-io took no lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('j'));
    assert_eq!(j.selected_name(), "web-1.qcow2");
    let screen = j.screen();
    let row = screen
        .lines()
        .find(|l| l.contains("web-1.qcow2 "))
        .expect("row");
    assert!(row.contains(&format!("write qemu-io {pid}")), "{row}");
    assert!(
        screen.contains(&format!("held by qemu-io (pid {pid}), read-write")),
        "{screen}"
    );
    drop(stdin);
}

// ---- commit as a job (issue 4) ----

fn qemu_img_ok(args: &[&str], dir: &Path) -> bool {
    Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e}"))
        .status
        .success()
}

/// `qemu-img check` finds no errors and no leaks (exit 0).
fn assert_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img check");
    assert!(
        out.status.success(),
        "{}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` says the two images read the same.
fn assert_same_content(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "{} vs {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest's view of `image` as a raw file in `out_dir` (outside the
/// scanned root, so it does not join the tree).
fn raw_view(image: &Path, out_dir: &Path) -> PathBuf {
    let out = out_dir.join("view.raw");
    let (i, o) = (image.display().to_string(), out.display().to_string());
    assert!(qemu_img_ok(
        &["convert", "-U", "-O", "raw", &i, &o],
        out_dir
    ));
    out
}

impl Journey {
    /// A key without waiting for the app to become idle: a confirmed job
    /// keeps it busy until the job ends, and some tests act meanwhile.
    fn press(&mut self, code: KeyCode) {
        self.app.update(Event::Input(CtEvent::Key(KeyEvent::new(
            code,
            KeyModifiers::NONE,
        ))));
    }

    /// Drive the app like the real loop until every job has ended: events
    /// as they come, a tick when none comes for a tick's time. The screen
    /// is drawn after each step; returns those drawn while a job ran.
    fn run_jobs(&mut self) -> Vec<String> {
        let deadline = std::time::Instant::now() + SETTLE * 4;
        let mut running = Vec::new();
        while self.app.jobs.iter().any(|j| !j.state.is_finished()) {
            assert!(std::time::Instant::now() < deadline, "the job did not end");
            match self.rx.recv_timeout(Duration::from_millis(50)) {
                Ok(ev) => self.app.update(ev),
                Err(_) => self.app.update(Event::Tick),
            }
            if self
                .app
                .jobs
                .iter()
                .any(|j| j.state == cowshed::jobs::JobState::Running)
            {
                running.push(self.screen());
            }
        }
        self.settle();
        running
    }

    fn select(&mut self, name: &str) {
        let i = self
            .visible_names()
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} not in the tree"));
        while self.app.selected != i {
            let code = if self.app.selected < i {
                KeyCode::Down
            } else {
                KeyCode::Up
            };
            self.key(code);
        }
        assert_eq!(self.selected_name(), name);
    }
}

#[test]
fn commit_into_a_shared_base_warns_requires_yes_and_runs_as_a_job() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-1.qcow2"), scratch.path());
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('m'));
    let Some(Dialog::Commit(CommitDialog { plan, .. })) = &j.app.dialog else {
        panic!("no confirm dialog: {:?}", j.app.status);
    };
    // web-2 and web-2-1 hang on base.qcow2 too.
    assert_eq!(plan.affected, 2);
    insta::assert_snapshot!("commit_confirm_siblings", j.screen());

    // Enter alone, or `y`, does not commit into a shared base.
    j.key(KeyCode::Char('y'));
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.dialog, Some(Dialog::Commit(_))));
    assert!(j.app.jobs.is_empty());
    assert!(j.screen().contains("only the word yes commits"));

    j.chars("yes");
    j.press(KeyCode::Enter);
    assert!(j.in_tree());
    assert_eq!(j.app.jobs.len(), 1);
    let running = j.run_jobs();
    // While it ran, the jobs pane showed it and the tree marked both images.
    let during = running
        .iter()
        .find(|s| s.contains("running   commit web-1.qcow2 → base.qcow2"))
        .expect("a screen with the running job");
    for name in ["base.qcow2 ", "web-1.qcow2 "] {
        let row = during.lines().find(|l| l.contains(name)).expect("row");
        assert!(row.contains("job: commit"), "{row}");
    }
    assert!(during.contains('%'), "{during}");

    let job = &j.app.jobs[0];
    assert_eq!(
        job.state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert!(
        job.progress.total > 0 && job.progress.done == job.progress.total,
        "{:?}",
        job.progress
    );
    let screen = j.screen();
    assert!(
        screen.contains("✓ done      commit web-1.qcow2"),
        "{screen}"
    );
    assert!(screen.contains("100%"), "{screen}");
    assert!(!screen.contains("job: commit"), "{screen}");

    // The base now holds what the overlay showed; both images are sound
    // and the overlay still reads the same (through the base).
    assert_same_content(&d.join("base.qcow2"), &before);
    assert_same_content(&d.join("web-1.qcow2"), &before);
    assert_check_clean(&d.join("base.qcow2"));
    assert_check_clean(&d.join("web-1.qcow2"));
    // web-1 was emptied: the catalog's details (refreshed after the job)
    // show everything served by the base.
    let d1 = j.app.details.as_ref().expect("details");
    assert_eq!(d1.served.first(), Some(&0), "{:?}", d1.served);
}

#[test]
fn commit_dialog_cancelled_changes_nothing() {
    let dir = fleet();
    let d = dir.path();
    let read = |n: &str| std::fs::read(d.join(n)).expect("read");
    let (base, top) = (read("base.qcow2"), read("web-2-1.qcow2"));
    let mut j = Journey::start(d);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('m'));
    let Some(Dialog::Commit(CommitDialog { plan, .. })) = &j.app.dialog else {
        panic!("no confirm dialog");
    };
    // web-2 has no other overlay: a plain y/Enter would do.
    assert_eq!(plan.affected, 0);
    let screen = j.screen();
    assert!(
        screen.contains("Commit web-2-1.qcow2 into web-2.qcow2"),
        "{screen}"
    );
    assert!(screen.contains("y/Enter commit · n/Esc cancel"), "{screen}");
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
    // And `n` cancels as well.
    j.key(KeyCode::Char('m'));
    j.key(KeyCode::Char('n'));
    assert!(j.in_tree());
    assert!(j.app.jobs.is_empty());
    assert_eq!(read("base.qcow2"), base);
    assert_eq!(read("web-2-1.qcow2"), top);
}

#[test]
fn commit_is_refused_without_a_usable_backing() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    for (name, why) in [
        ("base.qcow2", "no backing image"),
        ("disk.raw", "raw image"),
        ("orphan.qcow2", "backing missing: old-base.qcow2"),
    ] {
        j.select(name);
        j.key(KeyCode::Char('m'));
        assert!(j.in_tree(), "{name}: no dialog");
        let status = j.app.status.clone().expect("a status");
        assert!(
            status.is_error() && status.text.contains(name) && status.text.contains(why),
            "{name}: {status:?}"
        );
        assert!(j.app.jobs.is_empty());
    }
    let screen = j.screen();
    assert!(
        screen.contains("✗ cannot commit orphan.qcow2: backing missing"),
        "{screen}"
    );
}

#[test]
fn a_running_commit_is_cancelled_with_x_and_leaves_both_images_valid() {
    let dir = tempfile::Builder::new()
        .prefix("cowshed-journey-")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "big-base.qcow2", "256M"],
        d,
    );
    run("qemu-io", &["-c", "write -P 3 0 8M", "big-base.qcow2"], d);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "big-base.qcow2",
            "-F",
            "qcow2",
            "big.qcow2",
        ],
        d,
    );
    // 16 MiB of data: the job is held after its 8th MiB (a fault point)
    // while the test looks at it and cancels.
    run("qemu-io", &["-c", "write -P 9 4M 16M", "big.qcow2"], d);
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("big.qcow2"), scratch.path());
    let mut j = Journey::start(d);
    j.select("big.qcow2");
    j.key(KeyCode::Char('m'));
    assert!(matches!(j.app.dialog, Some(Dialog::Commit(_))));
    // The job submitted from this thread carries the plan.
    let plan = cowshed::engine::fault::Plan::new().pause_at("commit.copied", 8);
    let faults = plan.enter();
    // No other overlay: `y` confirms.
    j.press(KeyCode::Char('y'));
    drop(faults);
    assert_eq!(j.app.jobs.len(), 1);
    assert!(
        plan.wait_paused(SETTLE).is_some(),
        "the commit never reached its 8th chunk"
    );
    j.pump_until("the job to run", |app| {
        app.jobs[0].state != cowshed::jobs::JobState::Queued
    });
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Running);
    // Ticks while it is held mid-copy: once the rate is measurable (the
    // UI waits 50 ms of running for that) the pane shows a bar, percent,
    // rate and ETA.
    let deadline = std::time::Instant::now() + SETTLE;
    while j.app.jobs[0].rate == 0.0 {
        assert!(std::time::Instant::now() < deadline, "no progress seen");
        std::thread::sleep(Duration::from_millis(5));
        j.app.update(Event::Tick);
    }
    let screen = j.screen();
    let bar = screen
        .lines()
        .find(|l| l.contains('░') && l.contains("ETA"))
        .unwrap_or_else(|| panic!("no progress line: {screen}"));
    assert!(bar.contains('%') && bar.contains("/s"), "{bar}");
    let row = screen
        .lines()
        .find(|l| l.contains("big.qcow2 "))
        .expect("row");
    assert!(row.contains("job: commit"), "{row}");
    // No job selected: x takes the newest unfinished one.
    j.press(KeyCode::Char('x'));
    plan.release();
    j.run_jobs();
    assert_eq!(plan.hits("commit.copied"), 8, "copied on after the cancel");
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Cancelled,
        "{:?}",
        j.app.status
    );
    let screen = j.screen();
    assert!(screen.contains("– cancelled commit big.qcow2"), "{screen}");
    // Issue 11: the status line marks it as cancelled too, not with the
    // tick of a job done.
    let status = screen.lines().nth_back(1).expect("status line");
    assert!(
        status.contains("– commit big.qcow2 → big-base.qcow2: cancelled"),
        "{status}"
    );
    assert!(!status.contains('✓'), "{status}");
    assert_check_clean(&d.join("big.qcow2"));
    assert_check_clean(&d.join("big-base.qcow2"));
    // The overlay reads as before (the base may hold part of its data, as
    // after a cancelled qemu-img commit).
    assert_same_content(&d.join("big.qcow2"), &before);
}

#[test]
fn tab_focuses_the_jobs_pane_where_x_acts_on_the_selected_job() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    // No jobs: Tab says so and the tree keeps the keys.
    j.key(KeyCode::Tab);
    assert_eq!(j.app.mode, Mode::Tree);
    // Two finished clone jobs.
    j.key(KeyCode::Char('c'));
    j.select("base.qcow2");
    j.key(KeyCode::Char('c'));
    assert_eq!(j.app.jobs.len(), 2);
    j.key(KeyCode::Tab);
    assert_eq!(j.app.mode, Mode::Jobs);
    // The newest first; ↓ moves to the older one, and the tree stays put.
    let selected_image = j.selected_name();
    assert_eq!(j.app.job_selected, Some(j.app.jobs[1].id));
    j.key(KeyCode::Down);
    assert_eq!(j.app.job_selected, Some(j.app.jobs[0].id));
    assert_eq!(j.selected_name(), selected_image);
    let screen = j.screen();
    let footer = screen.lines().last().expect("footer");
    assert!(
        footer.contains("↑ select  Enter open  x cancel  Tab tree"),
        "{screen}"
    );
    assert!(
        screen
            .lines()
            .any(|l| l.contains("›✓ done      clone base.qcow2")),
        "{screen}"
    );
    // x on a finished job cancels nothing and says so.
    j.key(KeyCode::Char('x'));
    let status = j.app.status.clone().expect("status");
    assert!(status.text.contains("already done"), "{status:?}");
    j.key(KeyCode::Esc);
    assert_eq!(j.app.mode, Mode::Tree);
}

// ---- rebase, flatten and convert as jobs (issue 5) ----

#[test]
fn rebase_picks_the_new_backing_in_the_tree_and_keeps_the_guest_view() {
    let dir = fleet();
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base2.qcow2", "64M"],
        d,
    );
    run("qemu-io", &["-c", "write -P 7 0 3M", "base2.qcow2"], d);
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-1.qcow2"), scratch.path());
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('b'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Pick(_))),
        "{:?}",
        j.app.status
    );
    assert!(j
        .screen()
        .contains("select its new backing image in the tree"));
    // Itself is no backing: refused, still picking.
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.dialog, Some(Dialog::Pick(_))));
    assert!(j.screen().contains("cannot rebase onto that image"));
    j.select("base2.qcow2");
    j.key(KeyCode::Enter);
    let Some(Dialog::Rebase(RebaseDialog { plan })) = &j.app.dialog else {
        panic!("no rebase dialog: {:?}", j.app.status);
    };
    assert_eq!(plan.backing_name, "base2.qcow2");
    assert!(!plan.unsafe_mode);
    insta::assert_snapshot!("rebase_confirm", j.screen());
    // `u` explains and selects unsafe; `s` goes back to safe.
    j.key(KeyCode::Char('u'));
    assert!(matches!(&j.app.dialog, Some(Dialog::Rebase(d)) if d.plan.unsafe_mode));
    j.key(KeyCode::Char('s'));
    j.press(KeyCode::Enter);
    assert!(j.in_tree());
    j.run_jobs();
    let job = &j.app.jobs[0];
    assert_eq!(
        job.state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    let info = qemu_info(&d.join("web-1.qcow2"));
    assert_eq!(info["backing-filename"], "base2.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_same_content(&d.join("web-1.qcow2"), &before);
    assert_check_clean(&d.join("web-1.qcow2"));
    // The tree follows: web-1 now grows on base2.
    let web1 = j
        .app
        .forest
        .get(&d.join("web-1.qcow2").canonicalize().unwrap());
    let parent = web1
        .and_then(|id| j.app.forest.nodes[id].parent)
        .expect("a parent");
    assert!(j.app.forest.nodes[parent]
        .record
        .path
        .ends_with("base2.qcow2"));
}

#[test]
fn flatten_asks_then_makes_the_overlay_standalone() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-2-1.qcow2"), scratch.path());
    let mut j = Journey::start(d);
    j.select("base.qcow2");
    j.key(KeyCode::Char('f'));
    assert!(j.screen().contains("cannot flatten base.qcow2"));
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('f'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Flatten(_))),
        "{:?}",
        j.app.status
    );
    assert!(j.screen().contains("Flatten web-2-1.qcow2"));
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    let info = qemu_info(&d.join("web-2-1.qcow2"));
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_same_content(&d.join("web-2-1.qcow2"), &before);
    assert_check_clean(&d.join("web-2-1.qcow2"));
}

#[test]
fn convert_dialog_makes_a_compressed_copy_that_appears_in_the_tree() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('v'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Convert(_))),
        "{:?}",
        j.app.status
    );
    // Field 2 (compression): none → zlib → zstd.
    j.key(KeyCode::Down);
    j.key(KeyCode::Down);
    j.key(KeyCode::Right);
    j.key(KeyCode::Right);
    insta::assert_snapshot!("convert_dialog", j.screen());
    j.press(KeyCode::Enter);
    assert!(j.in_tree());
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    let out = d.join("web-1-conv.qcow2");
    assert_same_content(&out, &d.join("web-1.qcow2"));
    assert_check_clean(&out);
    let info = qemu_info(&out);
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    assert!(info.get("backing-filename").is_none(), "{info}");
    // The new image joins the tree and is selected.
    j.app.settle(&j.rx, SETTLE);
    assert!(j.visible_names().contains(&"web-1-conv.qcow2".to_string()));
    assert_eq!(j.selected_name(), "web-1-conv.qcow2");
}

// ---- refusals said before asking (issue 9) ----

/// `qemu-io` holding `name` in `dir` (read-only with `-r`) until dropped,
/// once its lock is visible.
struct Holder(std::process::Child);

impl Holder {
    fn start(dir: &Path, name: &str, read_only: bool) -> Holder {
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(name)
            .current_dir(dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        let want = if read_only {
            cowshed::engine::LockState::Reader
        } else {
            cowshed::engine::LockState::Writer
        };
        wait_lock(&dir.join(name), want);
        Holder(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Wait until `path` shows `want` as QEMU's lock state (asked without
/// taking a lock).
fn wait_lock(path: &Path, want: cowshed::engine::LockState) {
    let deadline = std::time::Instant::now() + SETTLE;
    while cowshed::engine::lock_state(path).ok() != Some(want) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never showed a {want:?} lock",
            path.display()
        );
        std::thread::yield_now();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_text(j: &Journey) -> String {
    j.app
        .status
        .as_ref()
        .map_or_else(String::new, |s| s.text.clone())
}

#[test]
fn actions_on_an_image_a_qemu_holds_are_refused_before_any_dialog() {
    let dir = fleet();
    let d = dir.path();
    let vm = Holder::start(d, "web-1.qcow2", false);
    // QEMU locks the top and its backing file one after the other: the
    // catalog is to see both.
    wait_lock(&d.join("base.qcow2"), cowshed::engine::LockState::Reader);
    let before: Vec<Vec<u8>> = ["web-1.qcow2", "base.qcow2"]
        .iter()
        .map(|n| std::fs::read(d.join(n)).expect("read"))
        .collect();
    let mut j = Journey::start(d);
    for key in ['m', 'b', 'f', 'v', 'c'] {
        j.select("web-1.qcow2");
        j.key(KeyCode::Char(key));
        assert!(j.in_tree(), "{key}: a dialog opened");
        let text = status_text(&j);
        assert!(
            text.contains(&format!("pid {}", vm.pid())) && text.contains("qemu-io"),
            "{key}: {text}"
        );
        assert!(j.app.jobs.is_empty(), "{key}: a job was queued");
    }
    // The VM holds its backing file too (read-only, as QEMU opens one): a
    // commit of another overlay into that base is refused, naming it.
    j.select("web-2.qcow2");
    j.key(KeyCode::Char('m'));
    assert!(j.in_tree());
    let text = status_text(&j);
    assert!(
        text.contains("base.qcow2")
            && text.contains("reading")
            && text.contains(&format!("pid {}", vm.pid())),
        "{text}"
    );
    drop(vm);
    // A reader alone does not change the image: a copy may be made.
    let reader = Holder::start(d, "disk.raw", true);
    j.key(KeyCode::Char('r'));
    j.select("disk.raw");
    j.key(KeyCode::Char('v'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Convert(_))),
        "a reader does not change the image: convert may copy it"
    );
    j.key(KeyCode::Esc);
    drop(reader);
    let after: Vec<Vec<u8>> = ["web-1.qcow2", "base.qcow2"]
        .iter()
        .map(|n| std::fs::read(d.join(n)).expect("read"))
        .collect();
    assert!(before == after, "an image changed");
}

#[test]
fn convert_never_replaces_an_existing_file() {
    let dir = fleet();
    let d = dir.path();
    let before = std::fs::read(d.join("web-2.qcow2")).expect("read");
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('v'));
    // Replace the proposed name with an existing image's.
    for _ in 0.."web-1-conv.qcow2".len() {
        j.key(KeyCode::Backspace);
    }
    j.chars("web-2.qcow2");
    j.key(KeyCode::Enter);
    assert!(
        matches!(j.app.dialog, Some(Dialog::Convert(_))),
        "the dialog stays"
    );
    let text = status_text(&j);
    assert!(text.contains("web-2.qcow2 exists"), "{text}");
    assert!(j.app.jobs.is_empty(), "a job was queued");
    assert_eq!(std::fs::read(d.join("web-2.qcow2")).expect("read"), before);
    // A free name converts.
    for _ in 0.."web-2.qcow2".len() {
        j.key(KeyCode::Backspace);
    }
    j.chars("fresh.qcow2");
    j.press(KeyCode::Enter);
    j.run_jobs();
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Done);
    assert_same_content(&d.join("fresh.qcow2"), &d.join("web-1.qcow2"));
}

#[test]
fn a_rebase_without_its_old_backing_offers_unsafe_and_says_why() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.select("orphan.qcow2");
    j.key(KeyCode::Char('b'));
    j.select("base.qcow2");
    j.key(KeyCode::Enter);
    let Some(Dialog::Rebase(RebaseDialog { plan })) = &j.app.dialog else {
        panic!("no rebase dialog: {:?}", j.app.status);
    };
    assert!(plan.unsafe_mode, "unsafe is the default");
    assert!(plan.safe_refused.is_some());
    assert!(j.screen().contains("safe: not possible"));
    j.key(KeyCode::Char('s'));
    let Some(Dialog::Rebase(RebaseDialog { plan })) = &j.app.dialog else {
        panic!("the dialog closed");
    };
    assert!(plan.unsafe_mode, "s cannot choose safe");
    assert!(
        status_text(&j).contains("no safe rebase"),
        "{:?}",
        j.app.status
    );
    // Unsafe repairs the broken link: the header now names the base.
    j.press(KeyCode::Enter);
    j.run_jobs();
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Done);
    let info = qemu_info(&dir.path().join("orphan.qcow2"));
    assert_eq!(info["backing-filename"], "base.qcow2");
}

#[test]
fn a_typed_backing_path_is_probed_before_it_is_accepted() {
    let dir = fleet();
    let d = dir.path();
    std::fs::write(d.join("notes.txt"), "not a disk\n").expect("write");
    let mut j = Journey::start(d);
    for (typed, why) in [
        ("missing.qcow2", "No such file"),
        ("notes.txt", "not a disk image"),
        ("/proc/self/status", "kernel file"),
        ("orphan.qcow2", "old-base.qcow2"),
    ] {
        j.select("web-2-1.qcow2");
        j.key(KeyCode::Char('b'));
        j.key(KeyCode::Char('t'));
        j.chars(typed);
        j.key(KeyCode::Enter);
        assert!(
            matches!(j.app.dialog, Some(Dialog::Pick(_))),
            "{typed}: accepted: {:?}",
            j.app.status
        );
        let text = status_text(&j);
        assert!(text.contains(why), "{typed}: {text}");
        j.key(KeyCode::Esc);
        j.key(KeyCode::Esc);
    }
    // A real image is accepted with the format the probe found.
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('b'));
    j.key(KeyCode::Char('t'));
    j.chars("disk.raw");
    j.key(KeyCode::Enter);
    let Some(Dialog::Rebase(RebaseDialog { plan })) = &j.app.dialog else {
        panic!("not accepted: {:?}", j.app.status);
    };
    assert_eq!(plan.format, cowshed::engine::Format::Raw);
    assert_eq!(plan.backing_name, "disk.raw");
}

// ---- issue 11: the second version ----

/// Every mode's keys come from the one table: with every key of every
/// layer moved to another key by the config, each mode's hints (footer or
/// dialog) and the help name the moved keys, and the moved keys drive
/// every mode, dialogs included.
#[test]
fn every_mode_reads_its_keys_from_the_table_and_config_moves_them() {
    use cowshed::tui::keymap::{Key, Layer, ACTIONS};
    let dir = fleet();
    // F-keys and alt-keys, which nothing binds by default; each layer
    // from the start of the pool, the confirm layer (read with the
    // rebase layer) from further on.
    let pool: Vec<String> = (1..=12)
        .map(|n| format!("F{n}"))
        .chain(('a'..='z').chain('0'..='9').map(|c| format!("alt+{c}")))
        .collect();
    let mut text = String::new();
    for layer in Layer::ALL {
        text.push_str(&format!("[keys.{}]\n", layer.name()));
        let start = match layer {
            Layer::Confirm => 30,
            // Read with the rebase layer and the confirm layer.
            Layer::Batch => 20,
            _ => 0,
        };
        for (i, a) in ACTIONS.iter().filter(|a| a.layer == layer).enumerate() {
            text.push_str(&format!("{} = \"{}\"\n", a.name, pool[start + i]));
        }
    }
    let config = Config::parse(&text, Path::new("moved.toml")).expect("config");
    let keymap = config.keymap.clone();
    let mut j = Journey::with_config(dir.path(), config);
    let press = |j: &mut Journey, layer: Layer, name: &str| {
        let info = ACTIONS
            .iter()
            .find(|a| a.layer == layer && a.name == name)
            .expect("action");
        let key: Key = keymap.keys(layer, info.action)[0];
        let mut modifiers = KeyModifiers::NONE;
        if key.alt {
            modifiers |= KeyModifiers::ALT;
        }
        j.send(CtEvent::Key(KeyEvent::new(key.code, modifiers)));
    };
    // Selecting with the moved keys of `layer` (the tree's or the picker's).
    let goto = |j: &mut Journey, layer: Layer, name: &str| {
        let i = j
            .visible_names()
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} not in the tree"));
        while j.app.selected != i {
            let before = j.app.selected;
            press(j, layer, if before < i { "down" } else { "up" });
            assert_ne!(j.app.selected, before, "the moved keys do not move");
        }
    };
    // The hints shown now name keys bound to their actions, and are on
    // screen as the table says them.
    let check = |j: &mut Journey, mode: &str| {
        // A dialog's hint line wraps; the footer shows what fits.
        let hints = match j.app.dialog {
            Some(_) => j.app.hints(),
            None => view::footer_hints(&j.app, W),
        };
        assert!(!hints.is_empty(), "{mode}: no hints");
        let screen = j.screen();
        for h in hints {
            let bound = j.app.keymap.keys(h.layer, h.action);
            assert!(!bound.is_empty(), "{mode}: {h:?} names no bound key");
            let names: Vec<String> = bound.iter().map(|k| k.to_string()).collect();
            assert!(
                h.keys.split('/').all(|k| names.contains(&k.to_string())),
                "{mode}: {h:?} shows keys that are not {names:?}"
            );
            assert!(
                screen.contains(&format!("{} {}", h.keys, h.label)),
                "{mode}: '{} {}' not on screen:\n{screen}",
                h.keys,
                h.label
            );
        }
    };
    check(&mut j, "tree");
    // The default keys do nothing now.
    j.key(KeyCode::Char('m'));
    assert!(j.in_tree());
    press(&mut j, Layer::Tree, "help");
    assert!(matches!(j.app.mode, Mode::Help(_)));
    check(&mut j, "help");
    // Every help line names the keys bound to its action in its layer.
    for (layer, rows) in j.app.keymap.help() {
        for h in rows {
            let keys: Vec<String> = j
                .app
                .keymap
                .keys(layer, h.action)
                .iter()
                .map(|k| k.to_string())
                .collect();
            assert_eq!(h.keys, keys.join(" "), "{layer:?} {h:?}");
        }
    }
    press(&mut j, Layer::Help, "close");
    assert!(j.in_tree());
    press(&mut j, Layer::Tree, "filter");
    check(&mut j, "filter");
    press(&mut j, Layer::Filter, "clear");
    press(&mut j, Layer::Tree, "log");
    check(&mut j, "log");
    press(&mut j, Layer::Log, "close");
    // Commit: the confirm layer.
    goto(&mut j, Layer::Tree, "web-2-1.qcow2");
    press(&mut j, Layer::Tree, "commit");
    assert!(matches!(j.app.dialog, Some(Dialog::Commit(_))));
    check(&mut j, "commit");
    press(&mut j, Layer::Confirm, "no");
    assert!(j.in_tree());
    // Flatten.
    press(&mut j, Layer::Tree, "flatten");
    assert!(matches!(j.app.dialog, Some(Dialog::Flatten(_))));
    check(&mut j, "flatten");
    press(&mut j, Layer::Confirm, "no");
    // Clone as: the input layer.
    press(&mut j, Layer::Tree, "clone_as");
    assert!(matches!(j.app.dialog, Some(Dialog::Clone(_))));
    check(&mut j, "clone as");
    press(&mut j, Layer::Input, "cancel");
    assert!(j.in_tree());
    // Rebase: the picker, its filter, a typed path, then the dialog.
    goto(&mut j, Layer::Tree, "web-1.qcow2");
    press(&mut j, Layer::Tree, "rebase");
    assert!(matches!(j.app.dialog, Some(Dialog::Pick(_))));
    check(&mut j, "pick");
    press(&mut j, Layer::Pick, "filter");
    check(&mut j, "pick filter");
    press(&mut j, Layer::Filter, "keep");
    press(&mut j, Layer::Pick, "type_path");
    check(&mut j, "pick typing");
    press(&mut j, Layer::Input, "cancel");
    goto(&mut j, Layer::Pick, "web-2.qcow2");
    press(&mut j, Layer::Pick, "choose");
    assert!(
        matches!(j.app.dialog, Some(Dialog::Rebase(_))),
        "{:?}",
        j.app.status
    );
    check(&mut j, "rebase");
    press(&mut j, Layer::Rebase, "unsafe");
    assert!(matches!(&j.app.dialog, Some(Dialog::Rebase(d)) if d.plan.unsafe_mode));
    press(&mut j, Layer::Confirm, "no");
    // Convert: its own layer.
    press(&mut j, Layer::Tree, "convert");
    assert!(matches!(j.app.dialog, Some(Dialog::Convert(_))));
    check(&mut j, "convert");
    press(&mut j, Layer::Convert, "next_field");
    assert!(matches!(&j.app.dialog, Some(Dialog::Convert(d))
        if d.plan.field == cowshed::tui::dialog::convert::Field::Format));
    press(&mut j, Layer::Convert, "cancel");
    assert!(j.in_tree());
    // A batch: marks, then the confirm list's layer with the confirm's.
    goto(&mut j, Layer::Tree, "web-2-1.qcow2");
    press(&mut j, Layer::Tree, "mark");
    assert_eq!(j.app.marks.len(), 1);
    press(&mut j, Layer::Tree, "flatten");
    assert!(matches!(j.app.dialog, Some(Dialog::Batch(_))));
    check(&mut j, "batch");
    press(&mut j, Layer::Batch, "down");
    press(&mut j, Layer::Confirm, "no");
    assert!(j.in_tree());
    press(&mut j, Layer::Tree, "mark_tree");
    press(&mut j, Layer::Tree, "clear_marks");
    assert!(j.app.marks.is_empty());
    // The reclaim view.
    press(&mut j, Layer::Tree, "reclaim");
    assert_eq!(j.app.mode, Mode::Reclaim);
    check(&mut j, "reclaim");
    press(&mut j, Layer::Reclaim, "mark");
    assert_eq!(j.app.marks.len(), 1);
    press(&mut j, Layer::Reclaim, "clear_marks");
    press(&mut j, Layer::Reclaim, "close");
    assert!(j.in_tree());
    // N clones: the count field.
    goto(&mut j, Layer::Tree, "web-2.qcow2");
    press(&mut j, Layer::Tree, "clone_many");
    assert!(matches!(&j.app.dialog, Some(Dialog::Clone(d)) if d.on_count));
    check(&mut j, "clone many");
    press(&mut j, Layer::Input, "next_field");
    assert!(matches!(&j.app.dialog, Some(Dialog::Clone(d)) if !d.on_count));
    press(&mut j, Layer::Input, "cancel");
    // Delete: its own layer with the confirm layer.
    goto(&mut j, Layer::Tree, "web-1.qcow2");
    press(&mut j, Layer::Tree, "delete");
    assert!(matches!(j.app.dialog, Some(Dialog::Delete(_))));
    check(&mut j, "delete");
    press(&mut j, Layer::Delete, "for_good");
    assert!(matches!(&j.app.dialog, Some(Dialog::Delete(d)) if d.for_good));
    check(&mut j, "delete for good");
    press(&mut j, Layer::Confirm, "no");
    assert!(j.in_tree());
    // Reset: the confirm layer.
    press(&mut j, Layer::Tree, "reset");
    assert!(
        matches!(j.app.dialog, Some(Dialog::Reset(_))),
        "{:?}",
        j.app.status
    );
    check(&mut j, "reset");
    press(&mut j, Layer::Confirm, "no");
    assert!(j.in_tree());
    // A job, the jobs pane and one job.
    goto(&mut j, Layer::Tree, "base.qcow2");
    press(&mut j, Layer::Tree, "clone");
    assert!(dir.path().join("base-1.qcow2").exists());
    press(&mut j, Layer::Tree, "focus_jobs");
    assert_eq!(j.app.mode, Mode::Jobs);
    check(&mut j, "jobs");
    press(&mut j, Layer::Jobs, "open");
    assert!(matches!(j.app.mode, Mode::Job(_)));
    check(&mut j, "job");
    press(&mut j, Layer::Job, "close");
    press(&mut j, Layer::Jobs, "back");
    assert!(j.in_tree());
}

/// A journey on a fleet made by the engine in `dir` (quicker than
/// qemu-img for many images): `names` as small standalone qcow2 images.
fn engine_images(dir: &Path, names: &[String]) {
    for n in names {
        let opts = cowshed::engine::CreateOptions {
            size: Some(1 << 20),
            ..cowshed::engine::CreateOptions::default()
        };
        cowshed::engine::create(&dir.join(n), &opts).expect("create");
    }
}

/// Defect 8: Home/End/PageUp/PageDown and g/G move through a long list.
#[test]
fn home_end_and_pages_move_through_a_long_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let names: Vec<String> = (0..60).map(|i| format!("vm-{i:02}.qcow2")).collect();
    engine_images(dir.path(), &names);
    let mut j = Journey::start(dir.path());
    let page = usize::from(view::layout(Rect::new(0, 0, W, H)).tree_body.height);
    assert!(page < 60);
    j.key(KeyCode::End);
    assert_eq!(j.selected_name(), "vm-59.qcow2");
    assert!(j.screen().contains("›vm-59.qcow2"), "the view follows");
    j.key(KeyCode::Home);
    assert_eq!(j.selected_name(), "vm-00.qcow2");
    j.key(KeyCode::PageDown);
    assert_eq!(j.app.selected, page);
    j.key(KeyCode::PageDown);
    j.key(KeyCode::PageUp);
    assert_eq!(j.app.selected, page);
    j.key(KeyCode::Char('G'));
    assert_eq!(j.selected_name(), "vm-59.qcow2");
    j.key(KeyCode::Char('g'));
    assert_eq!(j.selected_name(), "vm-00.qcow2");
}

/// Defect 2: names with wide characters do not shift the columns.
#[test]
fn wide_characters_keep_the_columns_in_place() {
    use unicode_width::UnicodeWidthStr;
    let dir = tempfile::tempdir().expect("tempdir");
    let wide = "Übergröße-日本語-🐄.qcow2";
    engine_images(dir.path(), &[wide.to_string(), "plain.qcow2".to_string()]);
    let mut j = Journey::start(dir.path());
    let screen = j.screen();
    // Where "qcow2" (the FMT column) starts, in cells, on each row.
    let fmt_column = |name: &str| {
        let row = screen
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name}: no row\n{screen}"));
        let at = row.find(" qcow2 ").expect("FMT column");
        row[..at].width()
    };
    assert_eq!(fmt_column(wide), fmt_column("plain.qcow2"), "{screen}");
    let head = screen.lines().nth(1).expect("titles");
    assert_eq!(
        fmt_column(wide),
        head[..head.find(" FMT").expect("FMT")].width(),
        "{screen}"
    );
}

/// Defect 7: same file names in two sub-folders are told apart by their
/// path under the root; the details pane shows the whole path.
#[test]
fn images_in_sub_folders_show_their_path_where_names_collide() {
    let dir = tempfile::tempdir().expect("tempdir");
    for sub in ["a", "b"] {
        std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
    }
    engine_images(
        dir.path(),
        &[
            "a/disk.qcow2".to_string(),
            "b/disk.qcow2".to_string(),
            "b/solo.qcow2".to_string(),
        ],
    );
    let mut j = Journey::start(dir.path());
    let rows: Vec<String> = j
        .app
        .rows
        .iter()
        .map(|r| cowshed::tui::rows::row_name(&j.app.forest, &j.app.roots, r))
        .collect();
    assert_eq!(rows, ["a/disk.qcow2", "b/disk.qcow2", "solo.qcow2"]);
    j.key(KeyCode::Down);
    let screen = j.screen();
    assert!(screen.contains("›b/disk.qcow2"), "{screen}");
    let full = dir.path().join("b/disk.qcow2").display().to_string();
    let raw = format!("{}", j.term.backend());
    assert!(raw.contains(&full), "no full path in the details:\n{raw}");
}

/// Defect 9: the tree's % and the details' % of an image are one figure.
#[test]
fn the_tree_and_the_details_give_the_same_percent() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    for name in ["base.qcow2", "web-1.qcow2", "web-2-1.qcow2"] {
        j.select(name);
        let screen = j.screen();
        let row = screen
            .lines()
            .find(|l| l.contains(&format!("{name} ")))
            .expect("row");
        let tree_pct = row
            .split_whitespace()
            .find(|w| w.ends_with('%'))
            .unwrap_or_else(|| panic!("no % in {row}"));
        let wanted = format!("({tree_pct} of virtual)");
        assert!(
            screen.contains(&wanted),
            "{name}: tree says {tree_pct}, details do not say {wanted}:\n{screen}"
        );
    }
}

/// Defect 5: an empty name in the clone dialog says why it stays open.
#[test]
fn an_empty_clone_name_is_refused_with_a_reason() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    j.key(KeyCode::Char('C'));
    j.key(KeyCode::Enter);
    assert!(
        matches!(j.app.dialog, Some(Dialog::Clone(_))),
        "the dialog stays"
    );
    let status = j.app.status.clone().expect("a reason");
    assert!(
        status.is_error() && status.text.contains("type a name"),
        "{status:?}"
    );
    assert!(j.app.jobs.is_empty());
}

/// Defect 5: a commit reports the bytes it copied, not the disk's size.
#[test]
fn a_finished_commit_reports_the_bytes_it_copied() {
    let dir = fleet();
    let d = dir.path();
    // 1 MiB of data in a 64 MiB disk.
    run("qemu-io", &["-c", "write -P 5 2M 1M", "web-2-1.qcow2"], d);
    let mut j = Journey::start(d);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('m'));
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Done);
    assert_eq!(j.app.jobs[0].progress.copied, 1 << 20);
    let screen = j.screen();
    assert!(screen.contains("· 1 MiB copied"), "{screen}");
    assert!(!screen.contains("64 MiB copied"), "{screen}");
}

/// Defect 4: the picker has a filter of its own; the tree's does not hide
/// the new backing, `/` filters, Esc clears the picker's filter first.
#[test]
fn the_backing_picker_has_its_own_filter() {
    let dir = fleet();
    let mut j = Journey::start(dir.path());
    // The tree filtered down to web-2's chain.
    j.key(KeyCode::Char('/'));
    j.chars("web-2-1");
    j.key(KeyCode::Enter);
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "web-2.qcow2", "web-2-1.qcow2"]
    );
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('b'));
    // Everything is there to pick from.
    assert_eq!(j.visible_names().len(), 6, "{:?}", j.visible_names());
    j.key(KeyCode::Char('/'));
    j.chars("disk");
    j.key(KeyCode::Enter);
    assert_eq!(j.visible_names(), ["disk.raw"]);
    // Esc clears the picker's filter, still picking.
    j.key(KeyCode::Esc);
    assert!(matches!(j.app.dialog, Some(Dialog::Pick(_))));
    assert_eq!(j.visible_names().len(), 6);
    // Filter again and pick.
    j.key(KeyCode::Char('/'));
    j.chars("disk");
    j.key(KeyCode::Enter);
    j.key(KeyCode::Enter);
    let Some(Dialog::Rebase(RebaseDialog { plan })) = &j.app.dialog else {
        panic!("no rebase dialog: {:?}", j.app.status);
    };
    assert_eq!(plan.backing_name, "disk.raw");
    // Cancelled: the tree's own filter is back.
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "web-2.qcow2", "web-2-1.qcow2"]
    );
}

/// Defect 6: files that are no images and files that cannot be read are
/// shown (greyed, with the reason) instead of vanishing, and the log keeps
/// every warning.
#[test]
fn files_that_are_not_images_are_shown_and_the_log_keeps_every_warning() {
    let dir = fleet();
    let d = dir.path();
    std::fs::write(d.join("notes.txt"), "not a disk\n").expect("write");
    std::fs::write(d.join(".hidden"), "a dot file\n").expect("write");
    std::os::unix::fs::symlink("gone-1.qcow2", d.join("link-1.qcow2")).expect("symlink");
    std::os::unix::fs::symlink("gone-2.qcow2", d.join("link-2.qcow2")).expect("symlink");
    let mut j = Journey::start(d);
    let names = j.visible_names();
    for n in ["notes.txt", "link-1.qcow2", "link-2.qcow2"] {
        assert!(names.contains(&n.to_string()), "{n} missing: {names:?}");
    }
    assert!(!names.contains(&".hidden".to_string()), "{names:?}");
    // Not counted as images.
    assert_eq!(j.app.totals.images, 6);
    let screen = j.screen();
    let row = |name: &str| {
        screen
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name}\n{screen}"))
            .to_string()
    };
    assert!(row("notes.txt").contains("not a disk image"), "{screen}");
    assert!(row("link-1.qcow2").contains("unreadable"), "{screen}");
    // The status line points to the log for the rest.
    assert!(screen.contains("(and 1 more: e shows the log)"), "{screen}");
    // Actions on them are refused with the reason.
    j.select("notes.txt");
    j.key(KeyCode::Char('v'));
    assert!(j.in_tree());
    assert!(status_text(&j).contains("no image cowshed can use"));
    // The log has both scan warnings and the refusal.
    j.key(KeyCode::Char('e'));
    assert!(matches!(j.app.mode, Mode::Log(_)));
    let log = j.screen();
    for want in ["link-1.qcow2", "link-2.qcow2", "cannot convert notes.txt"] {
        assert!(log.contains(want), "{want} not in the log:\n{log}");
    }
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
}

/// Defect 10: a job's whole label and error, opened from the jobs pane.
#[test]
fn a_job_opens_whole_from_the_jobs_pane() {
    let dir = fleet();
    let d = dir.path();
    // Longer than the status line and the pane: only the job opened
    // shows it whole.
    let long = format!("{}.qcow2", "a-rather-long-name-".repeat(8));
    let long = long.as_str();
    run("qemu-img", &["create", "-q", "-f", "qcow2", long, "1M"], d);
    let mut j = Journey::start(d);
    // Clone base under the long name, which exists: the job fails.
    j.key(KeyCode::Char('C'));
    j.chars(long);
    j.key(KeyCode::Enter);
    assert!(matches!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Failed(_)
    ));
    let before = j.screen();
    assert!(!before.contains(long), "shown whole already:\n{before}");
    j.key(KeyCode::Tab);
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.mode, Mode::Job(_)));
    // The popup wraps: join its lines back.
    let screen = j.screen();
    let joined: String = screen
        .lines()
        .map(|l| l.trim_matches(|c| c == '"' || c == '│' || c == ' '))
        .collect();
    assert!(joined.contains(long), "{screen}");
    j.key(KeyCode::Esc);
    assert_eq!(j.app.mode, Mode::Jobs);
}

/// Defect 3: at 60×18 the IN USE column stays, the header keeps its
/// parts apart, the jobs pane does not cover the details, and the help
/// scrolls to its end.
#[test]
fn a_small_terminal_keeps_in_use_the_header_details_and_all_of_help() {
    let dir = fleet();
    let d = dir.path();
    let vm = Holder::start(d, "web-1.qcow2", false);
    let mut j = Journey::sized(d, Config::default(), 60, 18);
    j.select("web-1.qcow2");
    let screen = j.screen();
    let row = screen
        .lines()
        .find(|l| l.contains("web-1.qcow2 "))
        .expect("row");
    assert!(row.contains("write"), "IN USE dropped: {row}\n{screen}");
    let header = screen.lines().next().expect("header");
    assert!(
        header.contains("  6 images") || header.contains("… 6 images"),
        "{header}"
    );
    // A job: the details stay readable beside it.
    j.select("disk.raw");
    j.key(KeyCode::Char('c'));
    let screen = j.screen();
    // Under the details, not over them: the details keep the width.
    let facts = screen
        .lines()
        .position(|l| l.contains("qcow2 v3 · 64 KiB clusters"))
        .unwrap_or_else(|| panic!("details covered:\n{screen}"));
    let jobs = screen
        .lines()
        .position(|l| l.contains(" jobs "))
        .unwrap_or_else(|| panic!("no jobs pane:\n{screen}"));
    assert!(jobs > facts, "{screen}");
    // Help: the last line can be scrolled to.
    j.key(KeyCode::Char('?'));
    assert!(!j.screen().contains("mouse: click selects"));
    j.key(KeyCode::End);
    assert!(
        j.screen().contains("mouse: click selects"),
        "{}",
        j.screen()
    );
    drop(vm);
}

// ---- marks, batches, N clones, the reclaim view (issue 12) ----

impl Journey {
    fn marked_names(&self) -> Vec<String> {
        self.app
            .marks
            .iter()
            .map(|k| k.file_name().expect("name").to_string_lossy().into_owned())
            .collect()
    }

    fn row_of(&mut self, name: &str) -> String {
        let screen = self.screen();
        screen
            .lines()
            .find(|l| l.contains(&format!(" {name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{screen}"))
            .trim_start_matches('"')
            .to_string()
    }
}

fn batch_dialog(j: &Journey) -> &cowshed::tui::dialog::batch::BatchDialog {
    match &j.app.dialog {
        Some(Dialog::Batch(b)) => b,
        _ => panic!("no batch dialog: {:?}", j.app.status),
    }
}

#[test]
fn marks_survive_filters_and_rescans_and_a_batch_flattens_every_marked_image() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut before = Vec::new();
    for name in ["web-1.qcow2", "web-2-1.qcow2"] {
        let copy = scratch.path().join(format!("before-{name}.raw"));
        std::fs::rename(raw_view(&d.join(name), scratch.path()), &copy).expect("rename");
        before.push(copy);
    }
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    // Space marks and moves down; on web-2 it marks, again unmarks.
    j.key(KeyCode::Char(' '));
    assert_eq!(j.selected_name(), "web-2.qcow2");
    j.key(KeyCode::Char(' '));
    j.key(KeyCode::Up);
    j.key(KeyCode::Char(' '));
    assert_eq!(j.marked_names(), ["web-1.qcow2"]);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char(' '));
    assert_eq!(j.marked_names(), ["web-1.qcow2", "web-2-1.qcow2"]);
    // In the cursor's cell, on the rows; the header counts them.
    assert!(j.row_of("web-1.qcow2").starts_with("●"));
    assert!(j.row_of("web-2-1.qcow2").starts_with("●"));
    assert!(!j.row_of("web-2.qcow2").starts_with("●"));
    let screen = j.screen();
    let header = screen.lines().next().expect("header");
    let (n, bytes) = j.app.marked_totals();
    assert_eq!(n, 2);
    assert!(
        header.contains(&format!("● 2 marked · {}", view::human(bytes))),
        "{header}"
    );
    // A filter hides one: it stays marked. So does a rescan.
    j.key(KeyCode::Char('/'));
    j.chars("web-1");
    j.key(KeyCode::Enter);
    assert_eq!(j.app.marked_totals().0, 2);
    j.key(KeyCode::Esc);
    j.key(KeyCode::Char('r'));
    assert_eq!(j.marked_names(), ["web-1.qcow2", "web-2-1.qcow2"]);
    // `*` marks a whole tree, and again unmarks it.
    j.select("web-2.qcow2");
    j.key(KeyCode::Char('*'));
    assert_eq!(
        j.marked_names(),
        ["web-1.qcow2", "web-2-1.qcow2", "web-2.qcow2"]
    );
    j.key(KeyCode::Char('*'));
    assert_eq!(j.marked_names(), ["web-1.qcow2"]);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char(' '));

    // `f` with marks: one list, whatever is selected.
    j.select("disk.raw");
    j.key(KeyCode::Char('f'));
    let b = batch_dialog(&j);
    assert_eq!(b.items.len(), 2);
    assert_eq!(b.accepted(), 2);
    let screen = j.screen();
    assert!(screen.contains("flatten 2 marked images?"), "{screen}");
    assert!(screen.contains("✓ web-1.qcow2"), "{screen}");
    assert!(screen.contains("✓ web-2-1.qcow2"), "{screen}");
    j.press(KeyCode::Char('y'));
    assert!(j.in_tree());
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 2);
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    for (name, copy) in ["web-1.qcow2", "web-2-1.qcow2"].iter().zip(&before) {
        let info = qemu_info(&d.join(name));
        assert!(info.get("backing-filename").is_none(), "{name}: {info}");
        assert_same_content(&d.join(name), copy);
        assert_check_clean(&d.join(name));
    }
    // Done with: their marks went.
    assert!(j.app.marks.is_empty());
}

#[test]
fn a_batch_lists_an_image_a_qemu_holds_as_skipped_and_runs_the_rest() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-2-1.qcow2"), scratch.path());
    let vm = Holder::start(d, "web-1.qcow2", false);
    let held = std::fs::read(d.join("web-1.qcow2")).expect("read");
    let mut j = Journey::start(d);
    // The catalog has seen the lock before anything is asked.
    let web1 = j
        .app
        .forest
        .get(&d.join("web-1.qcow2").canonicalize().expect("canonical"))
        .expect("web-1 scanned");
    assert_eq!(
        j.app.forest.nodes[web1].record.lock,
        cowshed::engine::LockState::Writer
    );
    j.select("web-1.qcow2");
    j.key(KeyCode::Char(' '));
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char(' '));
    j.key(KeyCode::Char('f'));
    assert_eq!(batch_dialog(&j).accepted(), 1);
    let screen = j.screen();
    assert!(screen.contains("1 skipped, with the reason"), "{screen}");
    let skipped = screen
        .lines()
        .position(|l| l.contains("– web-1.qcow2"))
        .unwrap_or_else(|| panic!("web-1 not listed as skipped:\n{screen}"));
    // The reason names the holder (it may wrap onto the next line).
    let reason: String = screen.lines().skip(skipped).take(3).collect();
    assert!(
        reason.contains(&format!("pid {}", vm.pid())) && reason.contains("qemu-io"),
        "{screen}"
    );
    assert!(screen.contains("y/Enter flatten 1"), "{screen}");
    j.press(KeyCode::Enter);
    assert!(
        status_text(&j).contains("1 image skipped"),
        "{}",
        status_text(&j)
    );
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 1, "one job, for the image nobody holds");
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Done);
    let info = qemu_info(&d.join("web-2-1.qcow2"));
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_same_content(&d.join("web-2-1.qcow2"), &before);
    // The held image: untouched, and still marked.
    assert_eq!(std::fs::read(d.join("web-1.qcow2")).expect("read"), held);
    assert_eq!(j.marked_names(), ["web-1.qcow2"]);
    drop(vm);
}

#[test]
fn a_batch_with_nothing_to_do_says_so_and_cancelling_changes_nothing() {
    let dir = fleet();
    let d = dir.path();
    let files = ["base.qcow2", "disk.raw", "orphan.qcow2"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|n| std::fs::read(d.join(n)).expect("read"))
        .collect();
    let mut j = Journey::start(d);
    for name in files {
        j.select(name);
        j.key(KeyCode::Char(' '));
    }
    // Nothing to commit into, a raw image, a missing backing.
    j.key(KeyCode::Char('m'));
    let b = batch_dialog(&j);
    assert_eq!((b.items.len(), b.accepted()), (3, 0));
    j.key(KeyCode::Char('y'));
    assert!(matches!(j.app.dialog, Some(Dialog::Batch(_))));
    assert!(status_text(&j).contains("nothing to commit"));
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
    assert!(j.app.jobs.is_empty());
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|n| std::fs::read(d.join(n)).expect("read"))
        .collect();
    assert!(before == after, "an image changed");
    assert_eq!(j.app.marks.len(), 3);
    j.key(KeyCode::Char('u'));
    assert!(j.app.marks.is_empty());
}

#[test]
fn a_batch_convert_asks_once_and_never_replaces_a_file() {
    let dir = fleet();
    let d = dir.path();
    // web-2's new name is taken by an image of its own.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "web-2-copy.qcow2", "1M"],
        d,
    );
    let taken = std::fs::read(d.join("web-2-copy.qcow2")).expect("read");
    let mut j = Journey::start(d);
    for name in ["web-1.qcow2", "web-2.qcow2"] {
        j.select(name);
        j.key(KeyCode::Char(' '));
    }
    j.key(KeyCode::Char('v'));
    assert!(matches!(&j.app.dialog, Some(Dialog::Convert(c)) if c.batch.len() == 2));
    // The suffix: -conv becomes -copy.
    for _ in 0..4 {
        j.key(KeyCode::Backspace);
    }
    j.chars("copy");
    j.key(KeyCode::Enter);
    let b = batch_dialog(&j);
    assert_eq!(b.accepted(), 1);
    let screen = j.screen();
    assert!(screen.contains("→ web-1-copy.qcow2"), "{screen}");
    assert!(screen.contains("web-2-copy.qcow2 exists"), "{screen}");
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 1);
    assert_eq!(j.app.jobs[0].state, cowshed::jobs::JobState::Done);
    assert_same_content(&d.join("web-1-copy.qcow2"), &d.join("web-1.qcow2"));
    assert_check_clean(&d.join("web-1-copy.qcow2"));
    assert_eq!(
        std::fs::read(d.join("web-2-copy.qcow2")).expect("read"),
        taken
    );
}

#[test]
fn a_batch_rebase_moves_every_marked_overlay_onto_the_picked_base() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base2.qcow2", "64M"],
        d,
    );
    run("qemu-io", &["-c", "write -P 7 0 3M", "base2.qcow2"], d);
    let mut before = Vec::new();
    for name in ["web-1.qcow2", "web-2.qcow2"] {
        let copy = scratch.path().join(format!("before-{name}.raw"));
        std::fs::rename(raw_view(&d.join(name), scratch.path()), &copy).expect("rename");
        before.push(copy);
    }
    let mut j = Journey::start(d);
    for name in ["web-1.qcow2", "web-2.qcow2"] {
        j.select(name);
        j.key(KeyCode::Char(' '));
    }
    j.key(KeyCode::Char('b'));
    assert!(matches!(&j.app.dialog, Some(Dialog::Pick(p)) if p.batch.len() == 2));
    // A typed path is refused in a batch: the tree picks.
    j.key(KeyCode::Char('t'));
    assert!(matches!(&j.app.dialog, Some(Dialog::Pick(p)) if p.typed.is_none()));
    j.select("base2.qcow2");
    j.key(KeyCode::Enter);
    let b = batch_dialog(&j);
    assert_eq!(b.accepted(), 2);
    assert!(!b.unsafe_mode);
    assert!(j.screen().contains("→ base2.qcow2 (safe)"));
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    for (name, copy) in ["web-1.qcow2", "web-2.qcow2"].iter().zip(&before) {
        let info = qemu_info(&d.join(name));
        assert_eq!(info["backing-filename"], "base2.qcow2", "{name}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{name}");
        assert_same_content(&d.join(name), copy);
        assert_check_clean(&d.join(name));
    }
}

#[test]
fn n_clones_at_once_are_numbered_past_names_that_exist() {
    let dir = fleet();
    let d = dir.path();
    // base-02 exists (an unrelated image): it is passed over, untouched.
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base-02.qcow2", "1M"],
        d,
    );
    let kept = std::fs::read(d.join("base-02.qcow2")).expect("read");
    let mut j = Journey::start(d);
    j.select("base.qcow2");
    // `N`, a number, Enter: the prefix is proposed.
    j.key(KeyCode::Char('N'));
    j.chars("3");
    assert!(j
        .screen()
        .contains("3 clones, base-01.qcow2 … base-03.qcow2"));
    j.press(KeyCode::Enter);
    assert!(j.in_tree());
    let text = status_text(&j);
    assert!(
        text.contains("base-01.qcow2 … base-04.qcow2") && text.contains("base-02.qcow2 exists"),
        "{text}"
    );
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 3);
    for name in ["base-01.qcow2", "base-03.qcow2", "base-04.qcow2"] {
        let info = qemu_info(&d.join(name));
        assert_eq!(info["backing-filename"], "base.qcow2", "{name}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{name}");
        assert_same_content(&d.join(name), &d.join("base.qcow2"));
    }
    assert_eq!(std::fs::read(d.join("base-02.qcow2")).expect("read"), kept);
    // The count field of `C`, with a prefix of one's own.
    j.select("web-2.qcow2");
    j.key(KeyCode::Char('C'));
    j.chars("db-");
    j.key(KeyCode::Tab);
    j.chars("x2");
    j.press(KeyCode::Enter);
    j.run_jobs();
    for name in ["db-01.qcow2", "db-02.qcow2"] {
        let info = qemu_info(&d.join(name));
        assert_eq!(info["backing-filename"], "web-2.qcow2", "{name}");
    }
    assert!(!d.join("db-03.qcow2").exists());
    // A count out of range is refused with the reason.
    j.key(KeyCode::Char('N'));
    j.chars("1000");
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.dialog, Some(Dialog::Clone(_))));
    assert!(
        status_text(&j).contains("from 1 to 999"),
        "{}",
        status_text(&j)
    );
    j.key(KeyCode::Esc);
}

/// Sets the last write of `name` to `days` ago.
fn written_days_ago(dir: &Path, name: &str, days: u64) {
    let when = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    std::fs::File::options()
        .write(true)
        .open(dir.join(name))
        .and_then(|f| f.set_modified(when))
        .expect("set mtime");
}

#[test]
fn the_reclaim_view_lists_what_nothing_uses_by_size_times_age() {
    let dir = fleet();
    let d = dir.path();
    for (name, days) in [
        ("web-1.qcow2", 1),
        ("web-2-1.qcow2", 300),
        ("orphan.qcow2", 10),
        ("disk.raw", 2),
    ] {
        written_days_ago(d, name, days);
    }
    let mut j = Journey::start(d);
    // The order the pure function gives, from the sizes the scan saw.
    let expected: Vec<String> =
        cowshed::tui::reclaim::candidates(&j.app.forest, &j.app.vms, std::time::SystemTime::now())
            .iter()
            .map(|c| {
                c.key
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
    j.key(KeyCode::Char('D'));
    assert_eq!(j.app.mode, Mode::Reclaim);
    let listed: Vec<String> = j
        .app
        .reclaim
        .rows
        .iter()
        .map(|c| {
            c.key
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed, expected);
    // Bases with overlays are not listed; the oldest overlay leads (its
    // 196 KiB for 300 days outweigh web-1's 1.3 MiB for one).
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["disk.raw", "orphan.qcow2", "web-1.qcow2", "web-2-1.qcow2"]
    );
    assert_eq!(listed[0], "web-2-1.qcow2");
    let screen = j.screen();
    assert!(screen.contains("300 d ago"), "{screen}");
    let total: u64 = j.app.reclaim.rows.iter().map(|c| c.allocated).sum();
    assert!(
        screen.contains(&format!("4 images · {} in all", view::human(total))),
        "{screen}"
    );
    // Space marks and moves on; `*` marks the whole list, again unmarks.
    j.key(KeyCode::Char(' '));
    assert_eq!(j.app.reclaim.selected, 1);
    assert_eq!(j.marked_names(), ["web-2-1.qcow2"]);
    assert!(j.screen().contains("● 1 marked"));
    j.key(KeyCode::Char('*'));
    assert_eq!(j.app.marks.len(), 4);
    j.key(KeyCode::Char('*'));
    assert!(j.app.marks.is_empty());
    // Without marks the view's delete would take the selected row.
    assert_eq!(j.app.reclaim_targets(), [j.app.reclaim.rows[1].id]);
    j.key(KeyCode::Char(' '));
    assert_eq!(j.app.reclaim_targets(), [j.app.reclaim.rows[1].id]);
    // A QEMU takes an image: it leaves the list, the selection stays.
    let vm = Holder::start(d, "disk.raw", true);
    let selected = j.app.reclaim.selected_key().cloned();
    j.app.update(Event::Input(CtEvent::Key(KeyEvent::new(
        KeyCode::Char('r'),
        KeyModifiers::NONE,
    ))));
    j.settle();
    assert_eq!(j.app.reclaim.rows.len(), 3);
    assert!(!j
        .app
        .reclaim
        .rows
        .iter()
        .any(|c| c.key.ends_with("disk.raw")));
    assert_eq!(j.app.reclaim.selected_key().cloned(), selected);
    drop(vm);
    // The marks stay when the view closes.
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
    assert_eq!(j.marked_names(), [listed[1].clone()]);
}

#[test]
fn a_batch_commit_into_a_shared_base_asks_for_yes_and_runs_one_job_per_overlay() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    run("qemu-io", &["-c", "write -P 5 8M 1M", "web-2-1.qcow2"], d);
    // Afterwards base holds web-1's data and web-2 holds web-2-1's: every
    // image of the tree reads web-1's old view with web-2-1's write on it,
    // web-1 alone reads just its old view (this is what the warning says).
    let web1 = scratch.path().join("web-1.raw");
    std::fs::rename(raw_view(&d.join("web-1.qcow2"), scratch.path()), &web1).expect("rename");
    let both = raw_view(&d.join("web-1.qcow2"), scratch.path());
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 5 8M 1M",
            &both.display().to_string(),
        ],
        d,
    );
    let mut j = Journey::start(d);
    for name in ["web-1.qcow2", "web-2-1.qcow2"] {
        j.select(name);
        j.key(KeyCode::Char(' '));
    }
    j.key(KeyCode::Char('m'));
    let b = batch_dialog(&j);
    assert_eq!(b.accepted(), 2);
    // web-1's base has other overlays: the word yes is asked for.
    assert!(b.needs_typed_yes());
    assert!(j.screen().contains("2 other overlays of it change"));
    j.key(KeyCode::Enter);
    assert!(j.app.jobs.is_empty() && batch_dialog(&j).nudge);
    j.chars("yes");
    j.press(KeyCode::Enter);
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 2);
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    assert_same_content(&d.join("web-1.qcow2"), &web1);
    assert_same_content(&d.join("web-2-1.qcow2"), &both);
    assert_same_content(&d.join("web-2.qcow2"), &both);
    for name in ["base.qcow2", "web-2.qcow2", "web-1.qcow2", "web-2-1.qcow2"] {
        assert_check_clean(&d.join(name));
    }
}

// ---- the lifecycle: delete, stream out, reset (issue 12) ----

/// The items in the trash of `dir`.
fn trash_items(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join(".cowshed-trash"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn delete_moves_into_the_trash_by_default_and_for_good_with_a_key() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('d'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Delete(_))),
        "{:?}",
        j.app.status
    );
    let screen = j.screen();
    assert!(
        screen.contains("Move web-2-1.qcow2 to the trash") && screen.contains("frees"),
        "{screen}"
    );
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert!(!d.join("web-2-1.qcow2").exists());
    let items = trash_items(d);
    assert!(
        items.len() == 1 && items[0].ends_with("-web-2-1.qcow2"),
        "{items:?}"
    );
    // Gone from the tree, and a rescan does not find it in the trash.
    assert!(!j.visible_names().contains(&"web-2-1.qcow2".to_string()));
    j.key(KeyCode::Char('r'));
    assert!(!j.visible_names().contains(&"web-2-1.qcow2".to_string()));

    // For good: `f` switches, the dialog says so, no trash item is made.
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('d'));
    j.key(KeyCode::Char('f'));
    let screen = j.screen();
    assert!(
        screen.contains("Delete web-1.qcow2 for good") && screen.contains("cannot be undone"),
        "{screen}"
    );
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert!(!d.join("web-1.qcow2").exists());
    assert_eq!(trash_items(d), items);
    assert!(!j.visible_names().contains(&"web-1.qcow2".to_string()));
    // The base's other overlay is untouched.
    assert_check_clean(&d.join("web-2.qcow2"));
}

#[test]
fn delete_refuses_before_asking_what_the_catalog_knows() {
    let dir = fleet();
    let d = dir.path();
    let vm = Holder::start(d, "web-1.qcow2", false);
    let mut j = Journey::start(d);
    for key in ['d', 'R'] {
        j.select("web-1.qcow2");
        j.key(KeyCode::Char(key));
        assert!(j.in_tree(), "{key}: a dialog opened");
        let text = status_text(&j);
        assert!(
            text.contains(&format!("pid {}", vm.pid())) && text.contains("qemu-io"),
            "{key}: {text}"
        );
    }
    drop(vm);
    j.key(KeyCode::Char('r'));
    // Several images with a dependent left out: refused, naming it.
    let f = &j.app.forest;
    let id = |name: &str| {
        f.nodes
            .iter()
            .position(|n| n.record.path == d.join(name))
            .expect(name)
    };
    let err = DeleteDialog::open(f, &[id("base.qcow2"), id("web-1.qcow2")], &[])
        .err()
        .expect("refused");
    assert!(err.contains("web-2.qcow2"), "{err}");
    assert!(j.app.jobs.is_empty());
}

#[test]
fn delete_of_many_goes_leaves_first_one_job_each() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    let ids: Vec<usize> = ["web-2.qcow2", "web-2-1.qcow2"]
        .iter()
        .map(|n| {
            j.app
                .forest
                .nodes
                .iter()
                .position(|x| x.record.path == d.join(n))
                .expect(n)
        })
        .collect();
    let dialog = DeleteDialog::open(&j.app.forest, &ids, &[d.to_path_buf()]).expect("plan");
    let order: Vec<String> = dialog
        .plan
        .items
        .iter()
        .map(|i| i.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(order, ["web-2-1.qcow2", "web-2.qcow2"]);
    j.app.dialog = Some(Dialog::Delete(dialog));
    let screen = j.screen();
    assert!(screen.contains("Move 2 images to the trash"), "{screen}");
    j.press(KeyCode::Char('f'));
    j.press(KeyCode::Enter);
    assert_eq!(j.app.jobs.len(), 2);
    j.run_jobs();
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    assert!(!d.join("web-2.qcow2").exists() && !d.join("web-2-1.qcow2").exists());
    assert!(trash_items(d).is_empty());
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "web-1.qcow2", "disk.raw", "orphan.qcow2"]
    );
}

#[test]
fn delete_with_stream_rebases_the_dependents_onto_its_backing_first() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-2-1.qcow2"), scratch.path());
    let mut j = Journey::start(d);
    j.select("web-2.qcow2");
    j.key(KeyCode::Char('d'));
    assert!(matches!(j.app.dialog, Some(Dialog::Delete(_))));
    let screen = j.screen();
    assert!(
        screen.contains("web-2-1.qcow2 uses it as") && screen.contains("s stream out"),
        "{screen}"
    );
    // Deleting it alone would break web-2-1: refused, the dialog stays.
    j.key(KeyCode::Char('y'));
    assert!(matches!(j.app.dialog, Some(Dialog::Delete(_))));
    assert!(
        status_text(&j).contains("stream it out"),
        "{}",
        status_text(&j)
    );
    assert!(j.app.jobs.is_empty());
    j.key(KeyCode::Char('s'));
    let screen = j.screen();
    assert!(
        screen.contains("Stream it out: first its dependent web-2-1.qcow2 is rebased"),
        "{screen}"
    );
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert!(!d.join("web-2.qcow2").exists());
    assert_eq!(trash_items(d).len(), 1);
    let info = qemu_info(&d.join("web-2-1.qcow2"));
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_same_content(&d.join("web-2-1.qcow2"), &before);
    assert_check_clean(&d.join("web-2-1.qcow2"));
    // The tree shows it on the base now.
    let f = &j.app.forest;
    let id = f
        .nodes
        .iter()
        .position(|n| n.record.path == d.join("web-2-1.qcow2"))
        .expect("still there");
    let parent = f.nodes[id].parent.expect("a parent");
    assert_eq!(f.nodes[parent].record.path, d.join("base.qcow2"));
}

#[test]
fn reset_asks_then_gives_the_overlay_its_base_back() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    j.select("base.qcow2");
    j.key(KeyCode::Char('R'));
    assert!(j.in_tree());
    assert!(
        status_text(&j).contains("cannot reset base.qcow2: it has no backing file"),
        "{}",
        status_text(&j)
    );
    j.select("web-2.qcow2");
    j.key(KeyCode::Char('R'));
    assert!(j.in_tree());
    assert!(
        status_text(&j).contains("web-2-1.qcow2"),
        "{}",
        status_text(&j)
    );

    j.select("web-1.qcow2");
    let before = std::fs::read(d.join("web-1.qcow2")).expect("read");
    j.key(KeyCode::Char('R'));
    assert!(matches!(j.app.dialog, Some(Dialog::Reset(_))));
    let screen = j.screen();
    assert!(
        screen.contains("Reset web-1.qcow2") && screen.contains("lost for good"),
        "{screen}"
    );
    j.key(KeyCode::Char('n'));
    assert!(j.in_tree());
    assert_eq!(std::fs::read(d.join("web-1.qcow2")).expect("read"), before);
    j.key(KeyCode::Char('R'));
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert_same_content(&d.join("web-1.qcow2"), &d.join("base.qcow2"));
    assert_check_clean(&d.join("web-1.qcow2"));
    let info = qemu_info(&d.join("web-1.qcow2"));
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
}

#[test]
fn the_reclaim_view_deletes_its_marked_images_into_the_trash() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    j.key(KeyCode::Char('D'));
    assert_eq!(j.app.mode, Mode::Reclaim);
    let picked: Vec<String> = j.app.reclaim.rows[..2]
        .iter()
        .map(|c| {
            c.key
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    j.key(KeyCode::Char(' '));
    j.key(KeyCode::Char(' '));
    j.key(KeyCode::Char('d'));
    assert!(
        matches!(&j.app.dialog, Some(Dialog::Delete(dd)) if dd.plan.items.len() == 2),
        "{:?}",
        j.app.status
    );
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    // Both went into the trash, lost their marks, and left the list; the
    // view is still open.
    let items = trash_items(d);
    for name in &picked {
        assert!(!d.join(name).exists(), "{name} is still there");
        assert!(
            items.iter().any(|i| i.ends_with(&format!("-{name}"))),
            "{items:?}"
        );
    }
    assert!(j.app.marks.is_empty());
    assert_eq!(j.app.mode, Mode::Reclaim);
    assert!(j
        .app
        .reclaim
        .rows
        .iter()
        .all(|c| !picked.iter().any(|n| c.key.ends_with(n))));
}

#[test]
fn a_batch_reset_gives_every_marked_overlay_its_base_back_and_skips_a_base() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    for name in ["web-1.qcow2", "web-2-1.qcow2", "base.qcow2"] {
        j.select(name);
        j.key(KeyCode::Char(' '));
    }
    j.key(KeyCode::Char('R'));
    let Some(Dialog::Batch(b)) = &j.app.dialog else {
        panic!("no batch: {:?}", j.app.status)
    };
    assert_eq!(b.accepted(), 2);
    let screen = j.screen();
    assert!(screen.contains("no backing file"), "{screen}");
    j.press(KeyCode::Char('y'));
    j.run_jobs();
    assert_eq!(j.app.jobs.len(), 2);
    for job in &j.app.jobs {
        assert_eq!(job.state, cowshed::jobs::JobState::Done, "{}", job.label);
    }
    // Each now reads exactly what its backing reads.
    assert_same_content(&d.join("web-1.qcow2"), &d.join("base.qcow2"));
    assert_same_content(&d.join("web-2-1.qcow2"), &d.join("web-2.qcow2"));
    for name in ["web-1.qcow2", "web-2-1.qcow2"] {
        assert_check_clean(&d.join(name));
    }
    // The skipped base stays marked.
    assert_eq!(j.marked_names(), ["base.qcow2"]);
}

// ---- the doctor, protect and the stale-base guard (issue 12) ----

/// Drop the backing-format extension of a qcow2 image made by qemu-img
/// (QEMU 10 makes no image without one): its magic becomes one QEMU skips.
fn forget_backing_format(path: &Path) {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(path).expect("read");
    let at = bytes[..bytes.len().min(65536)]
        .windows(4)
        .position(|b| b == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing-format extension");
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(&[0x0b, 0xad, 0xf0, 0x0d], at as u64))
        .expect("patch");
}

#[test]
fn the_doctor_lists_an_images_problems_and_enter_applies_a_fix() {
    let dir = fleet();
    let d = dir.path();
    // web-1: nothing grows on it, so the patch modifies no base.
    forget_backing_format(&d.join("web-1.qcow2"));
    let mut j = Journey::start(d);
    // A healthy image: said on the status line, no dialog.
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('!'));
    assert!(j.in_tree());
    assert!(
        status_text(&j).contains("no chain problems"),
        "{}",
        status_text(&j)
    );
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('!'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Doctor(_))),
        "{:?}",
        j.app.status
    );
    insta::assert_snapshot!("doctor_dialog", j.screen());
    j.key(KeyCode::Enter);
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert_eq!(
        qemu_info(&d.join("web-1.qcow2"))["backing-filename-format"],
        "qcow2"
    );
    assert_check_clean(&d.join("web-1.qcow2"));
    j.settle();
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('!'));
    assert!(j.in_tree(), "the problem is gone");
    // A broken chain is listed, with nothing for Enter to do.
    j.select("orphan.qcow2");
    j.key(KeyCode::Char('!'));
    assert!(matches!(j.app.dialog, Some(Dialog::Doctor(_))));
    assert!(j.screen().contains("old-base.qcow2 is missing"));
    j.key(KeyCode::Enter);
    assert!(status_text(&j).contains("no fix"), "{}", status_text(&j));
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
}

#[test]
fn the_doctor_offers_flatten_for_a_chain_deeper_than_the_config_allows() {
    let dir = fleet();
    let d = dir.path();
    let config = Config::parse("[doctor]\nmax_depth = 1\n", &d.join("c.toml")).expect("config");
    let mut j = Journey::with_config(d, config);
    j.select("web-2-1.qcow2");
    j.key(KeyCode::Char('!'));
    let Some(Dialog::Doctor(doc)) = &j.app.dialog else {
        panic!("{:?}", j.app.status);
    };
    // web-2 has no other overlay: commit is offered beside flatten.
    assert_eq!(doc.entries.len(), 2, "flatten and commit");
    assert!(j
        .screen()
        .contains("reads through 2 backing files, more than 1"));
    j.key(KeyCode::Enter);
    assert!(
        matches!(j.app.dialog, Some(Dialog::Flatten(_))),
        "flatten opens its own dialog: {:?}",
        j.app.status
    );
    j.key(KeyCode::Esc);
    j.key(KeyCode::Char('!'));
    j.key(KeyCode::Down);
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.dialog, Some(Dialog::Commit(_))));
    j.key(KeyCode::Esc);
    assert!(j.in_tree());
}

#[test]
fn p_protects_the_selected_base_and_the_tree_marks_it() {
    use std::os::unix::fs::MetadataExt;
    let dir = fleet();
    let d = dir.path();
    let mode = |f: &str| std::fs::metadata(d.join(f)).expect("stat").mode() & 0o777;
    let before = mode("base.qcow2");
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    j.key(KeyCode::Char('p'));
    assert!(status_text(&j).contains("no base"), "{}", status_text(&j));
    assert_eq!(mode("web-1.qcow2"), before);
    j.select("base.qcow2");
    j.key(KeyCode::Char('p'));
    j.run_jobs();
    j.settle();
    assert_eq!(mode("base.qcow2"), before & !0o222);
    let screen = j.screen();
    let row = screen
        .lines()
        .find(|l| l.contains("base.qcow2 "))
        .expect("row");
    assert!(row.contains("⊘ base.qcow2"), "{row}");
    assert!(
        screen.contains("protected: no write bit on disk"),
        "{screen}"
    );
    j.key(KeyCode::Char('p'));
    j.run_jobs();
    j.settle();
    assert_eq!(mode("base.qcow2"), before);
    assert!(!j.screen().contains("⊘ base.qcow2"));
}

#[test]
fn the_stale_base_alarm_comes_and_goes_live() {
    let dir = fleet();
    let d = dir.path();
    let mut j = Journey::start(d);
    let key = d.join("base.qcow2").canonicalize().expect("canonical");
    let flag = |app: &App, kind: &str| {
        app.forest
            .get(&key)
            .is_some_and(|id| app.forest.nodes[id].flags.iter().any(|f| f.kind() == kind))
    };
    // Booted by mistake: the base opened for writing.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "qcow2", "base.qcow2", "-c", "sleep 600000"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = writer.id();
    j.pump_until("the alarm", |app| flag(app, "open-for-writing"));
    let screen = j.screen();
    let banner = screen.lines().next().expect("header");
    assert!(
        banner.contains(&format!(
            "ALARM: base base.qcow2 is open for writing by pid {pid} (qemu-io): its 3 overlays \
             will read corrupt data"
        )),
        "{screen}"
    );
    let row = screen
        .lines()
        .find(|l| l.contains("▾ ✗ base.qcow2"))
        .unwrap_or_else(|| panic!("the base's row is marked: {screen}"));
    assert!(row.contains("write qemu-io"), "{row}");
    let _ = writer.kill();
    let _ = writer.wait();
    let _guard = Kill(writer);
    j.pump_until("the alarm to go", |app| !flag(app, "open-for-writing"));
    assert!(!j.screen().contains("ALARM"));
    // Written into after its overlays were made: the warning names them,
    // live (where the file system records birth times).
    if std::fs::metadata(d).expect("stat").created().is_ok() {
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 9 0 64k", "base.qcow2"],
            d,
        );
        j.pump_until("the warning", |app| flag(app, "modified-after-dependents"));
        let id = j.app.forest.get(&key).expect("base");
        let text: Vec<String> = j.app.forest.nodes[id]
            .flags
            .iter()
            .map(|f| f.describe())
            .collect();
        assert!(
            text.iter()
                .any(|t| t.starts_with("modified after web-1.qcow2, web-2.qcow2 were created")),
            "{text:?}"
        );
    }
}

/// `S` on an overlay: create a snapshot (named), write on, apply it (after
/// a yes that says the current state is lost), delete it; each a job that
/// leaves what `qemu-img snapshot` would: the list, the guest view, a
/// clean check. The details pane lists the snapshots.
#[test]
fn snapshots_are_created_applied_and_deleted_from_the_details() {
    let dir = fleet();
    let d = dir.path();
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut j = Journey::start(d);
    j.select("web-1.qcow2");
    assert!(j
        .screen()
        .contains("snapshots none (S: create, apply, delete)"));
    let before = raw_view(&d.join("web-1.qcow2"), scratch.path());
    j.key(KeyCode::Char('S'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Snapshot(_))),
        "{:?}",
        j.app.status
    );
    assert!(j.screen().contains("no snapshots yet"));
    j.key(KeyCode::Char('c'));
    j.chars("before-upgrade");
    j.key(KeyCode::Enter);
    assert!(j.app.dialog.is_none());
    j.run_jobs();
    let listed = |d: &Path| -> Vec<String> {
        qemu_info(&d.join("web-1.qcow2"))["snapshots"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(listed(d), ["before-upgrade"]);
    assert_check_clean(&d.join("web-1.qcow2"));
    let screen = j.screen();
    assert!(
        screen.contains("snapshots 1 (S: create, apply, delete)"),
        "{screen}"
    );
    assert!(screen.contains("before-upgrade"), "{screen}");
    // The guest writes on.
    run("qemu-io", &["-c", "write -P 9 0 2M", "web-1.qcow2"], d);
    // Apply: asked first, and the question says what is lost.
    j.key(KeyCode::Char('S'));
    j.key(KeyCode::Char('a'));
    let screen = j.screen();
    assert!(screen.contains("The current state is lost"), "{screen}");
    j.key(KeyCode::Char('n'));
    assert!(matches!(j.app.dialog, Some(Dialog::Snapshot(_))));
    j.key(KeyCode::Char('a'));
    j.key(KeyCode::Char('y'));
    j.run_jobs();
    assert_same_content(&d.join("web-1.qcow2"), &before);
    assert_check_clean(&d.join("web-1.qcow2"));
    // Delete it.
    j.key(KeyCode::Char('S'));
    j.key(KeyCode::Char('d'));
    j.key(KeyCode::Char('y'));
    j.run_jobs();
    assert!(listed(d).is_empty());
    assert_check_clean(&d.join("web-1.qcow2"));
    assert_same_content(&d.join("web-1.qcow2"), &before);
    // A raw image has none: refused when the key is pressed.
    j.select("disk.raw");
    j.key(KeyCode::Char('S'));
    assert!(j.app.dialog.is_none());
    let status = format!("{:?}", j.app.status);
    assert!(
        status.contains("only qcow2 images have internal snapshots"),
        "{status}"
    );
}

#[test]
fn move_asks_where_then_repoints_the_overlays_and_follows_the_image() {
    let dir = fleet();
    let d = dir.path();
    std::fs::create_dir(d.join("bases")).unwrap();
    let scratch = tempfile::tempdir().expect("tempdir");
    let before = raw_view(&d.join("web-2-1.qcow2"), scratch.path());
    // A VM on an overlay holds the base too: neither may move, and the
    // refusal names it before any dialog.
    let vm = Holder::start(d, "web-1.qcow2", false);
    let deadline = std::time::Instant::now() + SETTLE;
    while cowshed::engine::lock_state(&d.join("base.qcow2")).ok()
        != Some(cowshed::engine::LockState::Reader)
    {
        assert!(std::time::Instant::now() < deadline, "the base is not held");
        std::thread::yield_now();
    }
    let mut j = Journey::start(d);
    for name in ["web-1.qcow2", "base.qcow2"] {
        j.select(name);
        j.key(KeyCode::Char('M'));
        assert!(j.in_tree(), "{name}: a dialog opened");
        let text = status_text(&j);
        assert!(
            text.contains(&format!("pid {}", vm.pid())),
            "{name}: {text}"
        );
    }
    drop(vm);
    j.key(KeyCode::Char('r'));
    j.select("base.qcow2");
    j.key(KeyCode::Char('M'));
    assert!(
        matches!(j.app.dialog, Some(Dialog::Move(_))),
        "{:?}",
        j.app.status
    );
    insta::assert_snapshot!("move_dialog", j.screen());
    let clear = |j: &mut Journey| {
        j.send(CtEvent::Key(KeyEvent::new(
            KeyCode::Char('u'),
            KeyModifiers::CONTROL,
        )))
    };
    // An existing file is refused in the dialog, which stays open.
    clear(&mut j);
    j.chars("disk.raw");
    j.key(KeyCode::Enter);
    assert!(matches!(j.app.dialog, Some(Dialog::Move(_))));
    assert!(
        status_text(&j).contains("disk.raw exists"),
        "{}",
        status_text(&j)
    );
    // An existing directory takes it in.
    clear(&mut j);
    j.chars("bases");
    j.press(KeyCode::Enter);
    j.run_jobs();
    assert_eq!(
        j.app.jobs[0].state,
        cowshed::jobs::JobState::Done,
        "{:?}",
        j.app.status
    );
    assert!(!d.join("base.qcow2").exists());
    for overlay in ["web-1.qcow2", "web-2.qcow2"] {
        let info = qemu_info(&d.join(overlay));
        assert_eq!(info["backing-filename"], "bases/base.qcow2", "{info}");
        assert_check_clean(&d.join(overlay));
    }
    assert_same_content(&d.join("web-2-1.qcow2"), &before);
    // The moved image is selected, with its overlays under it.
    let id = j.app.selected_node().expect("a selection");
    assert_eq!(
        j.app.forest.nodes[id].record.path,
        d.join("bases/base.qcow2")
    );
    assert_eq!(j.app.forest.nodes[id].children.len(), 2);
}

/// The details pane lists an image's persistent bitmaps as `qemu-img info`
/// has them (in its order): name, granularity, enabled or disabled, and
/// the in-use flag of one a QEMU did not store back.
#[test]
fn the_details_list_persistent_bitmaps() {
    let dir = fleet();
    let d = dir.path();
    let img = "web-1.qcow2";
    run("qemu-img", &["bitmap", "--add", img, "backup-1"], d);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "512", "--disable", img, "fine"],
        d,
    );
    run("qemu-img", &["bitmap", "--add", img, "crashed"], d);
    // Set crashed's in-use flag, as a QEMU that died with it loaded
    // leaves it.
    let path = d.join(img);
    let file = std::fs::File::open(&path).unwrap();
    let h =
        cowshed::engine::qcow2::Header::read(&file, &path, file.metadata().unwrap().len()).unwrap();
    let ext = h.extensions.bitmaps.clone().unwrap();
    let dir_entries = cowshed::engine::qcow2::bitmap::read_directory(&file, &path, &ext).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mut pos = ext.directory_offset as usize;
    for b in &dir_entries {
        if b.name == b"crashed" {
            bytes[pos + 15] |= 1;
        }
        pos += (24 + b.extra.len() + b.name.len()).next_multiple_of(8);
    }
    std::fs::write(&path, bytes).unwrap();
    let listed: Vec<(String, u64, Vec<String>)> = qemu_info(&path)["format-specific"]["data"]
        ["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    let mut j = Journey::start(d);
    j.select(img);
    let screen = j.screen();
    let row = screen
        .lines()
        .find(|l| l.contains(" bitmaps 3: "))
        .unwrap_or_else(|| panic!("no bitmaps row:\n{screen}"))
        .to_string();
    for (name, granularity, flags) in &listed {
        let recording = if flags.iter().any(|f| f == "auto") {
            "enabled"
        } else {
            "disabled"
        };
        let size = if *granularity == 512 {
            "512 B".to_string()
        } else {
            format!("{} KiB", granularity / 1024)
        };
        let in_use = if flags.iter().any(|f| f == "in-use") {
            ", in use (inconsistent)"
        } else {
            ""
        };
        let item = format!("{name} {size} {recording}{in_use}");
        assert!(row.contains(&item), "no {item:?} in {row}");
    }
}
