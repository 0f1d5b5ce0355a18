//! Journeys through the real TUI: the real `App` (with its catalog,
//! inspector and job threads) driven by key and mouse events through
//! `App::update`, drawn by the real `view::draw` on ratatui's `TestBackend`,
//! screens compared with insta snapshots and files checked on disk. The
//! fixture images are made by qemu-img at test time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cowshed::tui::app::Mode;
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
const SETTLE: Duration = Duration::from_secs(30);

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
        let (tx, rx) = crossbeam_channel::unbounded();
        let app = App::new(
            vec![root.to_path_buf()],
            config,
            true,
            tx,
            Rect::new(0, 0, W, H),
        )
        .expect("start app");
        let mut j = Journey {
            app,
            rx,
            term: Terminal::new(TestBackend::new(W, H)).expect("terminal"),
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
    assert_eq!(j.app.mode, Mode::Help);
    insta::assert_snapshot!("help", j.screen());
    j.key(KeyCode::Esc);
    assert_eq!(j.app.mode, Mode::Normal);
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

    // Fold the base with Enter (cursor on it), unfold with Space.
    assert_eq!(j.selected_name(), "base.qcow2");
    j.key(KeyCode::Enter);
    assert_eq!(
        j.visible_names(),
        ["base.qcow2", "disk.raw", "orphan.qcow2"]
    );
    j.key(KeyCode::Char(' '));
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
    assert!(matches!(j.app.mode, Mode::CloneName { .. }));
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
    assert!(status.error && status.text.contains("exists"), "{status:?}");
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
        "[keys]\nclone = \"n\"\ndown = [\"x\"]\n",
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
    j.key(KeyCode::Char('x'));
    assert_eq!(j.selected_name(), "web-1.qcow2");
    j.key(KeyCode::Char('n'));
    assert!(dir.path().join("web-1-1.qcow2").exists());
    let screen = j.screen();
    let footer = screen.lines().last().expect("footer");
    assert!(footer.contains("n clone"), "{footer}");
    j.key(KeyCode::Char('?'));
    assert!(j.screen().contains("│ x "), "help lists the new key");
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
    // A guest writing: 4 MiB in a few steps.
    for i in 0..4 {
        run(
            "qemu-io",
            &["-c", &format!("write -P 7 {}M 1M", 8 + i), "web-2-1.qcow2"],
            dir.path(),
        );
        std::thread::sleep(Duration::from_millis(150));
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
