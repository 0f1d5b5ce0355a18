//! Benchmark helper for `benches/scan_live.py`: how long a key takes on a
//! large fleet, from the key event to the redrawn screen, in the real
//! [`App`] (its catalog worker and watcher running) drawing into a ratatui
//! `TestBackend` as the TUI's loop does: `App::update` then `view::draw`.
//! The time the terminal takes to show the frame is not in it.
//!
//! usage: bench_keys FLEET_DIR [--rounds N]
//! Prints one JSON object on stdout: per key, the milliseconds of each
//! press; progress on stderr.

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cowshed::tui::{view, App, Config, Event};
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event as CtEvent, KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use ratatui::Terminal;

const W: u16 = 160;
const H: u16 = 40;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let mut fleet: Option<PathBuf> = None;
    let mut rounds = 20usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().ok_or("--rounds N")?.parse()?,
            _ => fleet = Some(PathBuf::from(a)),
        }
    }
    let fleet = fleet.ok_or("usage: bench_keys FLEET_DIR [--rounds N]")?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut app = App::new(
        vec![fleet],
        Config::default(),
        true,
        tx,
        Rect::new(0, 0, W, H),
    )?;
    let started = Instant::now();
    if !app.settle(&rx, Duration::from_secs(300)) {
        return Err("the app did not settle".into());
    }
    eprintln!(
        "bench_keys: {} images in {:.2} s",
        app.forest.nodes.len(),
        started.elapsed().as_secs_f64()
    );
    let mut term = Terminal::new(TestBackend::new(W, H))?;
    term.draw(|f| view::draw(&app, f))?;
    // What a user does on a long list: move, jump, page, filter, sort.
    let keys: &[(&str, &[KeyCode])] = &[
        ("down", &[KeyCode::Down]),
        ("up", &[KeyCode::Up]),
        ("end", &[KeyCode::End]),
        ("home", &[KeyCode::Home]),
        ("page_down", &[KeyCode::PageDown]),
        ("fold", &[KeyCode::Enter]),
        ("filter_char", &[KeyCode::Char('/'), KeyCode::Char('7')]),
        ("filter_clear", &[KeyCode::Esc]),
        ("sort", &[KeyCode::Char('s')]),
        ("help", &[KeyCode::Char('?'), KeyCode::Esc]),
    ];
    let mut out = String::from("{");
    for (i, (name, codes)) in keys.iter().enumerate() {
        let mut ms = Vec::new();
        for _ in 0..rounds {
            for &code in *codes {
                let t = Instant::now();
                app.update(Event::Input(CtEvent::Key(KeyEvent::new(
                    code,
                    KeyModifiers::NONE,
                ))));
                // Whatever the key queued (details asked of the inspector)
                // is answered before the next press, as a person types.
                while let Ok(ev) = rx.try_recv() {
                    app.update(ev);
                }
                term.draw(|f| view::draw(&app, f))?;
                ms.push(t.elapsed().as_secs_f64() * 1e3);
                app.settle(&rx, Duration::from_secs(30));
            }
        }
        let list: Vec<String> = ms.iter().map(|m| format!("{m:.3}")).collect();
        out.push_str(&format!(
            "{}\"{name}\": [{}]",
            if i > 0 { ", " } else { "" },
            list.join(", ")
        ));
    }
    out.push('}');
    println!("{out}");
    Ok(())
}
