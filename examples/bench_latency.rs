//! Benchmark helper for `benches/scan_live.py`: the time from a write into an
//! overlay (the moment `qemu-io` exits) to the new allocated size on the
//! screen of the real [`App`].
//!
//! It runs the TUI's own loop (the one in `cowshed::tui::run_with`: draw,
//! block on the event channel, wake for ticks only while something moves,
//! coalesce, redraw) with a ratatui `TestBackend` instead of a terminal, on
//! a temporary directory holding `base.qcow2` and `top.qcow2`. The App starts
//! the real catalog worker and its real watcher (inotify, debounced). A writer
//! thread runs `qemu-io -c 'write -P N OFF 1M' top.qcow2`, notes when it
//! exits and what `stat` then says (st_blocks × 512), and wakes the loop with
//! an `Event::Tick`. After each redraw the loop checks
//!
//! - *state*: the overlay's record in `app.forest` has the new allocated size
//!   (time taken before the draw);
//! - *screen*: the overlay's row of the drawn buffer shows that size, as
//!   `view::human` formats it (time taken after the draw).
//!
//! usage: bench_latency [--writes N] [--dir PARENT] [--timeout-ms MS]
//! Prints one JSON object on stdout (milliseconds); progress on stderr.

use std::error::Error;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cowshed::tui::{app, view, App, Config, Event};
use crossbeam_channel::{unbounded, RecvTimeoutError};
use ratatui::backend::TestBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;

const W: u16 = 160;
const H: u16 = 40;
const MIB: u64 = 1 << 20;

/// One write the loop waits to see.
#[derive(Clone, Copy)]
struct Target {
    index: usize,
    /// When qemu-io exited.
    exited: Instant,
    /// st_blocks × 512 after the write.
    allocated: u64,
}

#[derive(Default)]
struct Sample {
    allocated: u64,
    state_ms: Option<f64>,
    screen_ms: Option<f64>,
    qemu_io_ms: f64,
}

fn run(cmd: &mut Command) -> Result<(), Box<dyn Error>> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

fn allocated(p: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(p)?.blocks() * 512)
}

/// The text of the buffer row that names `name`, if any.
fn row_with(term: &Terminal<TestBackend>, name: &str) -> Option<String> {
    let buf = term.backend().buffer();
    (0..buf.area.height).find_map(|y| {
        let line: String = (0..buf.area.width)
            .map(|x| buf[(x, y)].symbol().to_string())
            .collect();
        line.contains(name).then_some(line)
    })
}

fn record_allocated(app: &App, path: &Path) -> Option<u64> {
    app.forest
        .nodes
        .iter()
        .find(|n| n.record.path == path || n.record.key == path)
        .map(|n| n.record.sizes.allocated)
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut writes = 40usize;
    let mut parent = std::env::temp_dir();
    let mut timeout = Duration::from_millis(3000);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--writes" => writes = val()?.parse()?,
            "--dir" => parent = PathBuf::from(val()?),
            "--timeout-ms" => timeout = Duration::from_millis(val()?.parse()?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let writes = writes.clamp(1, 60);

    let tmp = tempfile::Builder::new()
        .prefix("cowshed-bench-latency.")
        .tempdir_in(&parent)?;
    let dir = tmp.path().canonicalize()?;
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("64M"))?;
    run(Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ])
        .arg(&top))?;

    let (tx, rx) = unbounded::<Event>();
    let mut term = Terminal::new(TestBackend::new(W, H))?;
    let mut app = App::new(
        vec![dir.clone()],
        Config::default(),
        true,
        tx.clone(),
        Rect::new(0, 0, W, H),
    )?;
    if !app.settle(&rx, Duration::from_secs(10)) {
        return Err("the first scan did not finish in 10 s".into());
    }
    if record_allocated(&app, &top).is_none() {
        return Err(format!("{} is not in the catalog", top.display()).into());
    }
    // Let the watcher take the scan's records and go quiet.
    thread::sleep(Duration::from_millis(500));
    while let Ok(ev) = rx.try_recv() {
        app.update(ev);
    }

    // The writer: one write at a time, the next only once the loop has seen
    // the last one (or given up), after a pseudo-random pause of 300-700 ms.
    let pending: Arc<Mutex<Option<Target>>> = Arc::new(Mutex::new(None));
    let (ack_tx, ack_rx) = unbounded::<()>();
    let (done_tx, done_rx) = unbounded::<Result<Vec<f64>, String>>();
    {
        let pending = pending.clone();
        let top = top.clone();
        let wake = tx.clone();
        thread::spawn(move || {
            let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
            let mut qemu_io_ms = Vec::new();
            for i in 0..writes {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                thread::sleep(Duration::from_millis(300 + seed % 400));
                let cmd = format!("write -P {} {} 1M", (i % 250) + 1, i as u64 * MIB);
                let start = Instant::now();
                let st = Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", &cmd])
                    .arg(&top)
                    .output();
                let exited = Instant::now();
                match st {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => {
                        let _ = done_tx.send(Err(format!(
                            "qemu-io {cmd}: {}: {}",
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim()
                        )));
                        return;
                    }
                    Err(e) => {
                        let _ = done_tx.send(Err(format!("qemu-io: {e}")));
                        return;
                    }
                }
                qemu_io_ms.push((exited - start).as_secs_f64() * 1e3);
                let alloc = match allocated(&top) {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = done_tx.send(Err(format!("stat: {e}")));
                        return;
                    }
                };
                *pending.lock().unwrap() = Some(Target {
                    index: i,
                    exited,
                    allocated: alloc,
                });
                // Wake the loop so it checks even if the size already came.
                let _ = wake.send(Event::Tick);
                if ack_rx.recv().is_err() {
                    return;
                }
            }
            let _ = done_tx.send(Ok(qemu_io_ms));
        });
    }

    let name = "top.qcow2";
    let mut samples: Vec<Sample> = Vec::new();
    let mut state_seen: Option<f64> = None;
    let mut draws = 0u64;
    let mut ticks = 0u64;
    let qemu_io_ms = loop {
        // The loop of `tui::run_with`, with a check after each draw.
        let before_draw = Instant::now();
        term.draw(|f| view::draw(&app, f))?;
        draws += 1;
        let target = *pending.lock().unwrap();
        if let Some(t) = target {
            if state_seen.is_none() && record_allocated(&app, &top) == Some(t.allocated) {
                state_seen = Some(
                    before_draw
                        .saturating_duration_since(t.exited)
                        .as_secs_f64()
                        * 1e3,
                );
            }
            let want = view::human(t.allocated);
            let on_screen = state_seen.is_some()
                && row_with(&term, name).is_some_and(|row| row.contains(&want));
            let waited = t.exited.elapsed();
            if on_screen || waited > timeout {
                let screen_ms = on_screen.then_some(waited.as_secs_f64() * 1e3);
                samples.push(Sample {
                    allocated: t.allocated,
                    state_ms: state_seen,
                    screen_ms,
                    qemu_io_ms: 0.0,
                });
                eprintln!(
                    "write {:2}: {:>9} allocated, state {:>7}, screen {:>7}",
                    t.index + 1,
                    t.allocated,
                    state_seen.map_or("-".into(), |v| format!("{v:.1} ms")),
                    screen_ms.map_or("missed".into(), |v| format!("{v:.1} ms")),
                );
                state_seen = None;
                *pending.lock().unwrap() = None;
                let _ = ack_tx.send(());
            }
        }
        if let Ok(r) = done_rx.try_recv() {
            break r?;
        }
        // The real loop blocks in `recv` when idle and wakes every
        // `app::TICK` while something moves. Here it also wakes every 50 ms
        // (100 ms when no write is pending) to notice a missed write or the
        // writer's end; an arriving event still wakes it at once, so this
        // changes neither when a size arrives nor when it is drawn.
        let wait = if pending.lock().unwrap().is_some() {
            Duration::from_millis(50)
        } else {
            Duration::from_millis(100).min(app::TICK)
        };
        let first = match rx.recv_timeout(wait) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => {
                ticks += 1;
                Event::Tick
            }
            Err(RecvTimeoutError::Disconnected) => break Vec::new(),
        };
        app.update(first);
        while let Ok(ev) = rx.try_recv() {
            app.update(ev);
        }
    };
    for (s, q) in samples.iter_mut().zip(&qemu_io_ms) {
        s.qemu_io_ms = *q;
    }
    let list = |f: &dyn Fn(&Sample) -> Option<f64>| -> String {
        let v: Vec<String> = samples
            .iter()
            .map(|s| f(s).map_or("null".into(), |x| format!("{x:.3}")))
            .collect();
        format!("[{}]", v.join(","))
    };
    println!(
        "{{\"writes\":{},\"screen_ms\":{},\"state_ms\":{},\"qemu_io_ms\":{},\"allocated\":[{}],\"draws\":{},\"timeout_wakeups\":{},\"timeout_ms\":{}}}",
        samples.len(),
        list(&|s| s.screen_ms),
        list(&|s| s.state_ms),
        list(&|s| Some(s.qemu_io_ms)),
        samples
            .iter()
            .map(|s| s.allocated.to_string())
            .collect::<Vec<_>>()
            .join(","),
        draws,
        ticks,
        timeout.as_millis(),
    );
    drop(app);
    Ok(())
}
