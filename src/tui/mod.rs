//! The terminal UI: `cowshed [DIR...]`. One event channel feeds
//! [`App::update`]; [`view::draw`] is a pure function of the app; workers
//! (catalog, inspector, jobs) do every file access off the UI thread.

pub mod app;
pub mod config;
pub mod dialog;
pub mod event;
pub mod keymap;
pub mod reclaim;
pub mod rows;
pub mod theme;
pub mod view;
pub mod worker;

use std::io::{self, Stdout};
use std::path::PathBuf;

use color_eyre::eyre::{eyre, WrapErr};
use crossbeam_channel::{unbounded, RecvTimeoutError, Sender};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{DisableMouseCapture, EnableMouseCapture};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::Rect;
use ratatui::Terminal;

pub use app::App;
pub use config::Config;
pub use event::Event;

/// Command-line flags that override the config file's settings.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `--readonly`: nothing is written, action keys are disabled.
    pub readonly: bool,
    /// `--connect URI`: the libvirt connections to read instead of the
    /// config's.
    pub connect: Vec<String>,
}

/// Open the TUI on `roots` (the config's roots, else the current directory,
/// when empty). Returns the process exit code.
pub fn run(roots: Vec<PathBuf>, config: Option<PathBuf>, flags: Flags) -> color_eyre::Result<i32> {
    run_with(roots, config, flags, |_| {})
}

/// [`run`], with `sources` given a sender into the UI's event channel
/// before the loop starts, so a caller (the demo, a file watcher) can feed
/// it events such as [`Event::Growth`] from threads of its own.
pub fn run_with(
    roots: Vec<PathBuf>,
    config: Option<PathBuf>,
    flags: Flags,
    sources: impl FnOnce(Sender<Event>),
) -> color_eyre::Result<i32> {
    let mut config = Config::load(config.as_deref()).map_err(|e| eyre!(e))?;
    config.readonly |= flags.readonly;
    if !flags.connect.is_empty() {
        config.libvirt = flags.connect;
    }
    let roots = if !roots.is_empty() {
        roots
    } else if !config.roots.is_empty() {
        config.roots.clone()
    } else {
        vec![PathBuf::from(".")]
    };
    for r in &roots {
        // Roots on other hosts are looked at there, by their agents.
        if matches!(crate::remote::Root::parse(r), crate::remote::Root::Local(_)) && !r.exists() {
            return Err(eyre!("{}: no such file or directory", r.display()));
        }
    }
    let (tx, rx) = unbounded();
    let mut terminal = enter().wrap_err("cannot set up the terminal")?;
    // From here on the terminal must be restored whatever happens.
    let result = (|| -> color_eyre::Result<i32> {
        let size = terminal.size()?;
        let mut app = App::new(
            roots,
            config,
            true,
            tx.clone(),
            Rect::new(0, 0, size.width, size.height),
        )?;
        event::spawn_input(tx.clone())?;
        sources(tx.clone());
        drop(tx);
        loop {
            // Only after events: an idle UI draws nothing.
            terminal.draw(|f| view::draw(&app, f))?;
            // Idle: block until something happens. Moving: wake for ticks.
            let first = if app.is_moving() {
                match rx.recv_timeout(app::TICK) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => Event::Tick,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => break,
                }
            };
            app.update(first);
            // Coalesce: everything already queued, then one redraw.
            while let Ok(ev) = rx.try_recv() {
                app.update(ev);
            }
            if app.quit {
                break;
            }
        }
        Ok(0)
    })();
    leave();
    result
}

fn enter() -> io::Result<Terminal<CrosstermBackend<Stdout>>> {
    install_panic_hook();
    enable_raw_mode()?;
    let mut out = io::stdout();
    if let Err(e) = execute!(out, EnterAlternateScreen, EnableMouseCapture) {
        leave();
        return Err(e);
    }
    Terminal::new(CrosstermBackend::new(out))
}

/// Undo [`enter`]; safe to call twice, errors ignored (there is nothing
/// better to do with them while leaving).
fn leave() {
    let _ = disable_raw_mode();
    let _ = execute!(
        io::stdout(),
        DisableMouseCapture,
        LeaveAlternateScreen,
        cursor::Show
    );
}

/// Restore the terminal before the previous hook (color-eyre's, installed in
/// `main`) prints the report, so the report is readable and the shell sane.
/// Only a panic of the UI thread ends the UI; a job's panic is caught by
/// the pool and must not restore the terminal under a running UI.
fn install_panic_hook() {
    let ui_thread = std::thread::current().id();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() == ui_thread {
            leave();
        }
        previous(info);
    }));
}
