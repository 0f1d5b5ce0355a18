//! What long commands share on the terminal: Ctrl-C as cancel, and a
//! progress line like qemu-img -p.

use std::sync::Arc;
use std::time::{Duration, Instant};

use color_eyre::eyre::eyre;

use crate::engine::{Cancel, Progress};

/// Ctrl-C sets `cancel`; the engine stops within a chunk and cleans up.
fn install_ctrlc(cancel: &Cancel) -> color_eyre::Result<()> {
    let c = cancel.clone();
    ctrlc::set_handler(move || {
        c.cancel();
        // Tests wait for this before letting a paused operation go on.
        crate::engine::fault::point("cli.interrupted");
    })
    .map_err(|e| eyre!("cannot catch Ctrl-C: {e}"))
}

/// Print `(NN.NN/100%) RATE/s` like qemu-img -p, on stderr: rewritten
/// in place on a terminal; elsewhere (a log, a pipe) one line per percent,
/// so no two reports share a line. Nothing is printed before the
/// operation knows its total: "100% at 0 B/s" before any work was the
/// first thing users saw.
fn spawn_reporter(p: Arc<Progress>) -> (Cancel, std::thread::JoinHandle<()>) {
    use std::io::IsTerminal;
    let stop = Cancel::new();
    let s = stop.clone();
    let tty = std::io::stderr().is_terminal();
    let handle = std::thread::spawn(move || {
        let start = Instant::now();
        let mut last_whole: Option<u64> = None;
        let mut drawn = false;
        loop {
            let stopping = s.is_cancelled();
            let (done, total) = p.snapshot();
            if total > 0 {
                let pct = done.min(total) as f64 * 100.0 / total as f64;
                let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-3);
                let line = format!("    ({pct:6.2}/100%) {}/s", super::human_size(rate as u64));
                let whole = pct as u64;
                if tty {
                    eprint!("\r{line}   ");
                    drawn = true;
                } else if last_whole != Some(whole) {
                    eprintln!("{line}");
                    last_whole = Some(whole);
                }
            }
            if stopping {
                if drawn {
                    eprintln!();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    (stop, handle)
}

/// Run a long engine operation as the CLI does: Ctrl-C cancels it, `show`
/// prints progress, and a cancel is reported with `cancelled` (what state
/// the files are in) and exit code 130. Ok(None) means cancelled.
pub(crate) fn run_cancellable<T>(
    show: bool,
    cancelled: impl FnOnce() -> String,
    op: impl FnOnce(&Progress, &Cancel) -> crate::engine::Result<T>,
) -> color_eyre::Result<Option<T>> {
    let cancel = Cancel::new();
    install_ctrlc(&cancel)?;
    let progress = Arc::new(Progress::new());
    let reporter = show.then(|| spawn_reporter(progress.clone()));
    let result = op(&progress, &cancel);
    if let Some((stop, handle)) = reporter {
        stop.cancel();
        let _ = handle.join();
    }
    match result {
        Ok(v) => Ok(Some(v)),
        Err(crate::engine::Error::Cancelled) => {
            eprintln!("cowshed: {}", cancelled());
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
