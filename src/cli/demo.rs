//! `cowshed demo [DIR]`: build a small fleet of images (a base with
//! overlays, a chain of depth 3, a raw disk, a broken overlay), start a
//! simulated guest writing into one overlay, and open the TUI on it.
//!
//! Images are made by the engine (`engine::create`, byte for byte what
//! qemu-img makes). The engine has no allocating writer yet, so guest data
//! is written by `qemu-io` (Debian's qemu-utils) when it is installed: a
//! few extents into the base and overlays at build time, and, while the TUI
//! is open, one 1 MiB write every 300 ms into `web-1.qcow2`. Without
//! qemu-io the fleet is built empty and nothing grows.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Args;
use color_eyre::eyre::{bail, eyre, WrapErr};
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use super::{display, human_size};
use crate::engine::{self, CreateOptions, Format};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Build the fleet and exit: no simulated guest, no TUI (for scripts,
    /// tests and screenshots).
    #[arg(long, visible_alias = "build-only")]
    no_tui: bool,
    /// Where to build: a new or empty directory, or a previous demo fleet
    /// (its images are kept, missing ones rebuilt). Default: a fresh
    /// temporary directory, whose path is printed.
    dir: Option<PathBuf>,
}

/// Marks a directory as a demo fleet, which `demo` may build into again.
pub const MARKER: &str = ".cowshed-demo";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The overlay the simulated guest writes into.
const GROWING: &str = "web-1.qcow2";
/// The guest's pace: 1 MiB per tick, about 3.3 MiB/s.
const GUEST_WRITE: u64 = MIB;
const GUEST_PERIOD: Duration = Duration::from_millis(300);

enum Kind {
    Base {
        size: u64,
    },
    Overlay {
        backing: &'static str,
    },
    Raw {
        size: u64,
    },
    /// An overlay whose backing file does not exist (made like
    /// `qemu-img create -u`).
    Broken {
        wanted: &'static str,
        size: u64,
    },
}

struct Image {
    name: &'static str,
    kind: Kind,
    /// Guest writes at build time: (pattern byte, offset, length).
    writes: &'static [(u8, u64, u64)],
}

/// The fleet, in build order (a backing before its overlays).
const FLEET: &[Image] = &[
    Image {
        name: "debian-12.qcow2",
        kind: Kind::Base { size: GIB },
        writes: &[(0x11, 0, 24 * MIB), (0x12, 256 * MIB, 8 * MIB)],
    },
    Image {
        name: GROWING,
        kind: Kind::Overlay {
            backing: "debian-12.qcow2",
        },
        writes: &[(0x21, 0, 2 * MIB)],
    },
    Image {
        name: "web-2.qcow2",
        kind: Kind::Overlay {
            backing: "debian-12.qcow2",
        },
        writes: &[],
    },
    Image {
        name: "db-1.qcow2",
        kind: Kind::Overlay {
            backing: "debian-12.qcow2",
        },
        writes: &[(0x31, 64 * MIB, 6 * MIB)],
    },
    Image {
        name: "db-1-1.qcow2",
        kind: Kind::Overlay {
            backing: "db-1.qcow2",
        },
        writes: &[(0x32, 70 * MIB, 2 * MIB)],
    },
    Image {
        name: "db-1-1-1.qcow2",
        kind: Kind::Overlay {
            backing: "db-1-1.qcow2",
        },
        writes: &[(0x33, 72 * MIB, MIB)],
    },
    Image {
        name: "win11.raw",
        kind: Kind::Raw { size: 256 * MIB },
        writes: &[(0x41, 0, 4 * MIB)],
    },
    Image {
        name: "orphan.qcow2",
        kind: Kind::Broken {
            wanted: "old-base.qcow2",
            size: GIB,
        },
        writes: &[],
    },
];

pub fn run(a: DemoArgs) -> color_eyre::Result<i32> {
    let dir = prepare_dir(a.dir)?;
    let qemu_io = find_in_path("qemu-io");
    let (made, kept) = build_fleet(&dir, qemu_io.as_deref())?;
    println!(
        "cowshed demo fleet in {} ({made} images built, {kept} kept):",
        display(&dir)
    );
    for image in FLEET {
        println!("  {:<16} {}", image.name, describe(&image.kind));
    }
    match &qemu_io {
        Some(_) => {}
        None if made > 0 => println!(
            "qemu-io not found (Debian: apt-get install qemu-utils): the images hold no data"
        ),
        None => {}
    }
    if a.no_tui {
        return Ok(0);
    }
    let guest = match &qemu_io {
        Some(q) => {
            println!(
                "simulated guest: {} writes {} into {GROWING} every {} ms (stops when cowshed exits)",
                display(q),
                human_size(GUEST_WRITE),
                GUEST_PERIOD.as_millis()
            );
            Some(Guest::start(q.clone(), dir.join(GROWING))?)
        }
        None => {
            println!(
                "no simulated guest: it needs qemu-io (the engine has no allocating writer yet)"
            );
            None
        }
    };
    let code = open_tui(&dir);
    if let Some(g) = guest {
        if let Some(err) = g.stop() {
            eprintln!("cowshed: the simulated guest stopped early: {err}");
        }
    }
    code
}

/// Build the demo fleet in `dir` (new, empty or a previous fleet) and
/// nothing else: no guest, no TUI. Public so that the screenshots example
/// renders the very fleet `cowshed demo` shows. Returns how many images
/// were built and whether they hold data (that needs qemu-io).
pub fn build_fleet_in(dir: &Path) -> color_eyre::Result<(usize, bool)> {
    let dir = prepare_dir(Some(dir.to_path_buf()))?;
    let qemu_io = find_in_path("qemu-io");
    let (made, _) = build_fleet(&dir, qemu_io.as_deref())?;
    Ok((made, qemu_io.is_some()))
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Base { size } => format!("qcow2 base, {} virtual", human_size(*size)),
        Kind::Overlay { backing } => format!("qcow2 overlay on {backing}"),
        Kind::Raw { size } => format!("raw, {} virtual", human_size(*size)),
        Kind::Broken { wanted, .. } => format!("qcow2 overlay on {wanted}, which is missing"),
    }
}

/// The TUI on the fleet. Kept apart so the demo's own work (fleet, guest)
/// does not depend on how the TUI is started.
fn open_tui(dir: &Path) -> color_eyre::Result<i32> {
    crate::tui::run(vec![dir.to_path_buf()], None)
}

/// The directory to build in: `dir` if new, empty or a previous demo
/// fleet; else a fresh temporary one (kept after exit).
fn prepare_dir(dir: Option<PathBuf>) -> color_eyre::Result<PathBuf> {
    let Some(dir) = dir else {
        let tmp = tempfile::Builder::new()
            .prefix("cowshed-demo-")
            .tempdir()
            .wrap_err("cannot create a temporary directory for the demo")?;
        return Ok(tmp.keep());
    };
    match fs::metadata(&dir) {
        Err(_) => {
            fs::create_dir_all(&dir).wrap_err_with(|| format!("cannot create {}", display(&dir)))?
        }
        Ok(m) if !m.is_dir() => bail!("{} exists and is not a directory", display(&dir)),
        Ok(_) => {
            let mut entries =
                fs::read_dir(&dir).wrap_err_with(|| format!("cannot read {}", display(&dir)))?;
            // A user's directory is never written into: only an empty one
            // or one a demo made before.
            if entries.next().is_some() && !dir.join(MARKER).exists() {
                bail!(
                    "{} is not empty and holds no demo fleet (no {MARKER} file); \
                     give a new or empty directory",
                    display(&dir)
                );
            }
        }
    }
    Ok(dir)
}

/// Build what is missing; returns (built, kept).
fn build_fleet(dir: &Path, qemu_io: Option<&Path>) -> color_eyre::Result<(usize, usize)> {
    // The marker goes first, so that an interrupted build can be resumed.
    fs::write(
        dir.join(MARKER),
        "A demo fleet made by `cowshed demo`; `cowshed demo` may add to it. Delete freely.\n",
    )
    .wrap_err_with(|| format!("cannot write in {}", display(dir)))?;
    let (mut made, mut kept) = (0, 0);
    for image in FLEET {
        let path = dir.join(image.name);
        if path.symlink_metadata().is_ok() {
            kept += 1;
            continue;
        }
        let opts = match image.kind {
            Kind::Base { size } => CreateOptions {
                size: Some(size),
                ..CreateOptions::default()
            },
            Kind::Overlay { backing } => CreateOptions {
                backing: Some(backing.into()),
                backing_format: Some(Format::Qcow2),
                ..CreateOptions::default()
            },
            Kind::Raw { size } => CreateOptions {
                format: Format::Raw,
                size: Some(size),
                ..CreateOptions::default()
            },
            Kind::Broken { wanted, size } => CreateOptions {
                backing: Some(wanted.into()),
                backing_format: Some(Format::Qcow2),
                unsafe_backing: true,
                size: Some(size),
                ..CreateOptions::default()
            },
        };
        engine::create(&path, &opts)?;
        if let Some(q) = qemu_io {
            let format = if matches!(image.kind, Kind::Raw { .. }) {
                "raw"
            } else {
                "qcow2"
            };
            write_data(q, &path, format, image.writes)?;
        }
        made += 1;
    }
    Ok((made, kept))
}

/// Guest data by qemu-io, all writes in one run.
fn write_data(
    qemu_io: &Path,
    image: &Path,
    format: &str,
    writes: &[(u8, u64, u64)],
) -> color_eyre::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new(qemu_io);
    cmd.arg("-f").arg(format);
    for (pattern, offset, len) in writes {
        cmd.arg("-c")
            .arg(format!("write -P {pattern} {offset} {len}"));
    }
    let out = cmd
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .wrap_err_with(|| format!("cannot run {}", display(qemu_io)))?;
    if !out.status.success() {
        return Err(eyre!(
            "qemu-io could not write into {}: {}",
            display(image),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The simulated guest: a thread that runs one short `qemu-io` write per
/// tick. Short-lived children keep it safe to stop at any moment: dropping
/// the guest kills the write in flight, Ctrl-C reaches the children with
/// the rest of the foreground process group, and if cowshed dies the
/// write in flight ends by itself and no new one starts.
struct Guest {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl Guest {
    fn start(qemu_io: PathBuf, image: PathBuf) -> color_eyre::Result<Guest> {
        let virtual_size = engine::inspect(&image)?.virtual_size;
        // Continue past what is written already, so a reused fleet grows
        // too: the file's length is about the data it holds.
        let apparent = fs::metadata(&image).map_or(0, |m| m.len());
        let start = (apparent / GUEST_WRITE * GUEST_WRITE) % virtual_size.max(GUEST_WRITE);
        let (stop, stop_rx) = bounded::<()>(0);
        let thread = thread::Builder::new()
            .name("cowshed-demo-guest".into())
            .spawn(move || {
                let mut offset = start;
                let mut failures = 0;
                for n in 0u64.. {
                    let tick = Instant::now();
                    let pattern = n % 255 + 1;
                    let child = Command::new(&qemu_io)
                        .args(["-f", "qcow2", "-c"])
                        .arg(format!("write -P {pattern} {offset} {GUEST_WRITE}"))
                        .arg(&image)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn();
                    let ok = match child {
                        Ok(c) => match wait_or_stop(c, &stop_rx) {
                            Some(ok) => ok,
                            None => return None,
                        },
                        Err(e) => return Some(format!("cannot run qemu-io: {e}")),
                    };
                    // A run of failures (the image taken by another
                    // writer, deleted...) ends the guest, not the demo.
                    failures = if ok { 0 } else { failures + 1 };
                    if failures >= 5 {
                        return Some(format!(
                            "qemu-io failed 5 times writing {}",
                            display(&image)
                        ));
                    }
                    offset = (offset + GUEST_WRITE) % virtual_size.max(GUEST_WRITE);
                    let left = GUEST_PERIOD.saturating_sub(tick.elapsed());
                    match stop_rx.recv_timeout(left) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return None,
                    }
                }
                None
            })
            .wrap_err("cannot start the simulated guest")?;
        Ok(Guest {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stop writing; the reason if the guest had stopped by itself.
    fn stop(mut self) -> Option<String> {
        self.halt()
    }

    fn halt(&mut self) -> Option<String> {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Wait for a write to finish: `Some(success)`, or `None` when told to
/// stop (the child is then killed and reaped).
fn wait_or_stop(mut child: Child, stop: &crossbeam_channel::Receiver<()>) -> Option<bool> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status.success()),
            Ok(None) => {}
            Err(_) => return Some(false),
        }
        if !matches!(
            stop.recv_timeout(Duration::from_millis(20)),
            Err(RecvTimeoutError::Timeout)
        ) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    }
}
