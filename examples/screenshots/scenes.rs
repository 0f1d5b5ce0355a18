//! The screenshot scenes: the real `App` on the demo fleet, driven through
//! `App::update` like `tests/tui_journeys.rs` does, drawn by the real
//! `view::draw` on ratatui's `TestBackend`.
//!
//! Everything on screen must be the same on every run. The fleet is built
//! fresh (sizes of images made by qemu-img/qemu-io are stable on ext4), its
//! root is given as a relative path so the header and every path say
//! `demo-fleet`, not a temporary directory, and growth (a rate and its
//! sparkline, which would otherwise need a guest writing in real time) is
//! injected as the watcher's `Event::Growth`. Nothing shown is a time, date
//! or pid: no process holds the images.
//!
//! Shared by `examples/screenshots` and `tests/screenshots.rs` (by path).

use std::path::Path;
use std::time::Duration;

use cowshed::tui::{view, App, Config, Event};
use crossbeam_channel::Receiver;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{Event as CtEvent, KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::Terminal;
use tempfile::TempDir;

pub const W: u16 = 120;
pub const H: u16 = 36;
/// The fleet's directory, and what the header shows as the root.
pub const FLEET_DIR: &str = "demo-fleet";
const SETTLE: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

pub struct Stage {
    pub app: App,
    rx: Receiver<Event>,
    term: Terminal<TestBackend>,
    // Kept for its Drop: the fleet goes when the stage does.
    _tmp: TempDir,
}

impl Stage {
    /// Build the demo fleet in a new temporary directory and open the app
    /// on it, settled. This changes the process's working directory to
    /// that temporary directory (to scan a relative root), so a process
    /// must not run two stages at once.
    pub fn new() -> Result<Stage, String> {
        let tmp = tempfile::Builder::new()
            .prefix("cowshed-screenshots-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let (_, with_data) = cowshed::cli::build_demo_fleet(&tmp.path().join(FLEET_DIR))
            .map_err(|e| format!("building the demo fleet: {e:#}"))?;
        if !with_data {
            return Err(
                "qemu-io not found (Debian: apt-get install qemu-utils): the demo fleet \
                 would hold no data and the screenshots would show empty images"
                    .into(),
            );
        }
        std::env::set_current_dir(tmp.path())
            .map_err(|e| format!("cd {}: {e}", tmp.path().display()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        // Not live: the watcher would only add timing to a still fleet.
        let app = App::new(
            vec![Path::new(FLEET_DIR).to_path_buf()],
            Config::default(),
            false,
            tx,
            Rect::new(0, 0, W, H),
        )
        .map_err(|e| format!("starting the app: {e}"))?;
        let term = Terminal::new(TestBackend::new(W, H)).map_err(|e| e.to_string())?;
        let mut stage = Stage {
            app,
            rx,
            term,
            _tmp: tmp,
        };
        stage.settle()?;
        Ok(stage)
    }

    fn settle(&mut self) -> Result<(), String> {
        if self.app.settle(&self.rx, SETTLE) {
            Ok(())
        } else {
            Err("the app did not become idle".into())
        }
    }

    pub fn key(&mut self, code: KeyCode) -> Result<(), String> {
        self.app.update(Event::Input(CtEvent::Key(KeyEvent::new(
            code,
            KeyModifiers::NONE,
        ))));
        self.settle()
    }

    /// Move the selection to the image called `name` with the arrow keys.
    pub fn select(&mut self, name: &str) -> Result<(), String> {
        let forest = &self.app.forest;
        let target = self
            .app
            .rows
            .iter()
            .position(|r| cowshed::tui::app::file_name(&forest.nodes[r.id].record.path) == name)
            .ok_or_else(|| format!("no row for {name}"))?;
        while self.app.selected != target {
            let code = if self.app.selected < target {
                KeyCode::Down
            } else {
                KeyCode::Up
            };
            let before = self.app.selected;
            self.key(code)?;
            if self.app.selected == before {
                return Err(format!("the selection does not move towards {name}"));
            }
        }
        Ok(())
    }

    /// What the watcher reports while a guest writes into `name`: `rate`
    /// bytes per second and the bytes grown in each recent second.
    pub fn grow(&mut self, name: &str, rate: f64, history: &[u64]) -> Result<(), String> {
        let node = self
            .app
            .forest
            .nodes
            .iter()
            .find(|n| cowshed::tui::app::file_name(&n.record.path) == name)
            .ok_or_else(|| format!("no image {name}"))?;
        let (key, allocated) = (node.record.key.clone(), node.record.sizes.allocated);
        self.app.update(Event::Growth {
            key,
            allocated,
            rate,
            history: history.to_vec(),
        });
        self.settle()
    }

    /// Make `name` look last written `days` ago: the reclaim view's ages
    /// then read the same on every run (a file made seconds ago would not).
    pub fn written_days_ago(&mut self, name: &str, days: u64) -> Result<(), String> {
        let path = self
            .app
            .forest
            .nodes
            .iter()
            .find(|n| cowshed::tui::app::file_name(&n.record.path) == name)
            .map(|n| n.record.path.clone())
            .ok_or_else(|| format!("no image {name}"))?;
        let when = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(when))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn draw(&mut self) -> Result<Buffer, String> {
        self.term
            .draw(|f| view::draw(&self.app, f))
            .map_err(|e| e.to_string())?;
        Ok(self.term.backend().buffer().clone())
    }
}

/// The first scene: the forest with two overlays growing, the busier one
/// selected.
pub fn forest(stage: &mut Stage) -> Result<Buffer, String> {
    stage.grow(
        "web-1.qcow2",
        3.4 * MIB as f64,
        &[MIB / 2, MIB, 2 * MIB, 3 * MIB, 3 * MIB, 4 * MIB],
    )?;
    stage.grow(
        "db-1-1-1.qcow2",
        0.5 * MIB as f64,
        &[MIB / 4, MIB / 2, 0, MIB / 4, MIB, MIB / 2],
    )?;
    stage.select("web-1.qcow2")?;
    stage.draw()
}

/// Every scene in order, named as its PNG is: the fleet changes in the
/// last one (a clone is made).
pub fn all(stage: &mut Stage) -> Result<Vec<(&'static str, Buffer)>, String> {
    let mut shots = vec![("forest", forest(stage)?)];
    // A chain of four: the allocation bar has a part for each layer.
    stage.select("db-1-1-1.qcow2")?;
    shots.push(("details", stage.draw()?));
    stage.key(KeyCode::Char('?'))?;
    shots.push(("help", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    stage.select("web-2.qcow2")?;
    stage.key(KeyCode::Char('c'))?;
    shots.push(("clone", stage.draw()?));
    // The convert dialog, compression set to zstd.
    stage.select("web-2.qcow2")?;
    stage.key(KeyCode::Char('v'))?;
    for code in [KeyCode::Down, KeyCode::Down, KeyCode::Right, KeyCode::Right] {
        stage.key(code)?;
    }
    shots.push(("convert", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    // A batch: three marked images, one of which cannot be flattened.
    for name in ["web-1.qcow2", "db-1-1-1.qcow2", "orphan.qcow2"] {
        stage.select(name)?;
        stage.key(KeyCode::Char(' '))?;
    }
    stage.key(KeyCode::Char('f'))?;
    shots.push(("batch", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    stage.key(KeyCode::Char('u'))?;
    // The reclaim view, with ages set and two images marked in it.
    for (name, days) in [
        ("web-1.qcow2", 2),
        ("web-2-1.qcow2", 1),
        ("db-1-1-1.qcow2", 45),
        ("win11.raw", 120),
        ("orphan.qcow2", 400),
    ] {
        stage.written_days_ago(name, days)?;
    }
    stage.key(KeyCode::Char('r'))?;
    stage.key(KeyCode::Char('D'))?;
    stage.key(KeyCode::Char(' '))?;
    stage.key(KeyCode::Char(' '))?;
    shots.push(("reclaim", stage.draw()?));
    stage.key(KeyCode::Esc)?;
    Ok(shots)
}
