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

/// Print `(NN.NN/100%)` lines like qemu-img -p, on stderr.
fn spawn_reporter(p: Arc<Progress>) -> (Cancel, std::thread::JoinHandle<()>) {
    let stop = Cancel::new();
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let start = Instant::now();
        loop {
            let (done, total) = p.snapshot();
            let pct = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-3);
            eprint!(
                "\r    ({pct:6.2}/100%) {}/s   ",
                super::human_size(rate as u64)
            );
            if s.is_cancelled() {
                eprintln!();
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
