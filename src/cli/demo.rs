//! `cowshed demo [DIR]`: build a small fleet of images (a base with
//! overlays, a chain of depth 3, a raw disk, a broken overlay), start a
//! simulated guest writing into one overlay, and open the TUI on it.
//!
//! Images are made by the engine (`engine::create`, byte for byte what
//! qemu-img makes) and their data is written by the engine's allocating
//! writer: a few extents into the base and overlays at build time, and,
//! while the TUI is open, one 1 MiB write every 300 ms into `web-1.qcow2`
//! by a simulated guest that holds the image like a running VM would
//! (QEMU's writer locks).

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Args;
use color_eyre::eyre::{bail, WrapErr};
use crossbeam_channel::{bounded, RecvTimeoutError, Sender};

use super::{display, human_size};
use crate::engine::qcow2::Qcow2Writer;
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
/// The guest writes like a log within the first this many bytes of the
/// disk: at the end it discards them and starts again, so the overlay
/// grows most of the time yet never takes much more than this on disk,
/// however long the demo runs (it used to fill its whole 1 GiB).
const GUEST_SPAN: u64 = 192 * MIB;

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
    let given = a.dir.is_some();
    let (dir, temporary) = prepare_dir(a.dir)?;
    let (made, kept) = build_fleet(&dir)?;
    println!(
        "cowshed demo fleet in {} ({made} images built, {kept} kept):",
        display(&dir)
    );
    for image in FLEET {
        println!("  {:<16} {}", image.name, describe(&image.kind));
    }
    if a.no_tui {
        // Built for later use: kept, whatever the directory.
        if let Some(t) = temporary {
            let _ = t.keep();
        }
        return Ok(0);
    }
    println!(
        "simulated guest: cowshed's writer puts {} into {GROWING} every {} ms within its first {}, \
         holding it like a running VM (stops when cowshed exits)",
        human_size(GUEST_WRITE),
        GUEST_PERIOD.as_millis(),
        human_size(GUEST_SPAN)
    );
    if !given {
        println!("the fleet is removed when cowshed exits (give a DIR to keep it)");
    }
    let guest = Guest::start(dir.join(GROWING))?;
    let code = open_tui(&dir);
    if let Some(err) = guest.stop() {
        eprintln!("cowshed: the simulated guest stopped early: {err}");
    }
    // The guest has let go of its image: the temporary fleet can go.
    if let Some(t) = temporary {
        if let Err(e) = t.close() {
            eprintln!(
                "cowshed: cannot remove the demo fleet {}: {e}",
                display(&dir)
            );
        }
    }
    code
}

/// Build the demo fleet in `dir` (new, empty or a previous fleet) and
/// nothing else: no guest, no TUI. Public so that the screenshots example
/// renders the very fleet `cowshed demo` shows. Returns how many images
/// were built and whether they hold data (always, since the engine writes
/// it; kept for callers that predate the writer).
pub fn build_fleet_in(dir: &Path) -> color_eyre::Result<(usize, bool)> {
    let (dir, _) = prepare_dir(Some(dir.to_path_buf()))?;
    let (made, _) = build_fleet(&dir)?;
    Ok((made, true))
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
    crate::tui::run(vec![dir.to_path_buf()], None, crate::tui::Flags::default())
}

/// The directory to build in: `dir` if new, empty or a previous demo
/// fleet; else a fresh temporary one, returned with its guard (dropping
/// it removes the fleet).
fn prepare_dir(dir: Option<PathBuf>) -> color_eyre::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let Some(dir) = dir else {
        let tmp = tempfile::Builder::new()
            .prefix("cowshed-demo-")
            .tempdir()
            .wrap_err("cannot create a temporary directory for the demo")?;
        return Ok((tmp.path().to_path_buf(), Some(tmp)));
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
    Ok((dir, None))
}

/// Build what is missing; returns (built, kept).
fn build_fleet(dir: &Path) -> color_eyre::Result<(usize, usize)> {
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
        let format = if matches!(image.kind, Kind::Raw { .. }) {
            "raw"
        } else {
            "qcow2"
        };
        write_data(&path, format, image.writes)?;
        made += 1;
    }
    Ok((made, kept))
}

/// Guest data through the engine's writer (qcow2) or plain positional
/// writes (raw).
fn write_data(image: &Path, format: &str, writes: &[(u8, u64, u64)]) -> color_eyre::Result<()> {
    if writes.is_empty() {
        return Ok(());
    }
    if format == "raw" {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(image)
            .wrap_err_with(|| format!("cannot open {}", display(image)))?;
        for &(pattern, offset, len) in writes {
            f.write_all_at(&vec![pattern; len as usize], offset)
                .wrap_err_with(|| format!("cannot write into {}", display(image)))?;
        }
        return Ok(());
    }
    let mut w = Qcow2Writer::open(image)?;
    for &(pattern, offset, len) in writes {
        w.write(&vec![pattern; len as usize], offset)?;
    }
    w.flush()?;
    Ok(())
}

/// The simulated guest: a thread that holds the overlay open through the
/// engine's writer (with QEMU's writer locks, as a running VM would) and
/// writes 1 MiB every tick. It is a stand-in for an external VM, not one of
/// cowshed's own operations, so it lives here and not in `jobs`.
struct Guest {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl Guest {
    fn start(image: PathBuf) -> color_eyre::Result<Guest> {
        let mut writer = Qcow2Writer::open(&image)?;
        let span = GUEST_SPAN.min(writer.virtual_size()).max(GUEST_WRITE);
        // Continue past what is written already, so a reused fleet grows
        // too: the file's length is about the data it holds.
        let apparent = fs::metadata(&image).map_or(0, |m| m.len());
        let start = (apparent / GUEST_WRITE * GUEST_WRITE) % span;
        let (stop, stop_rx) = bounded::<()>(0);
        let thread = thread::Builder::new()
            .name("cowshed-demo-guest".into())
            .spawn(move || {
                let mut offset = start;
                for n in 0u64.. {
                    let tick = Instant::now();
                    if let Err(e) = guest_write(&mut writer, &mut offset, n, span) {
                        return Some(e.to_string());
                    }
                    let left = GUEST_PERIOD.saturating_sub(tick.elapsed());
                    match stop_rx.recv_timeout(left) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                writer.flush().err().map(|e| e.to_string())
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

/// One write of the guest at `offset` within `span`, the log rotated
/// (the span discarded, writing from its start again) when it is full.
/// Flushed like a guest's fsync, so what the TUI reads of the image's
/// tables follows the writes.
fn guest_write(
    writer: &mut Qcow2Writer,
    offset: &mut u64,
    n: u64,
    span: u64,
) -> crate::engine::Result<()> {
    if *offset + GUEST_WRITE > span {
        writer.discard(0, span)?;
        *offset = 0;
    }
    let pattern = (n % 255 + 1) as u8;
    writer.write(&vec![pattern; GUEST_WRITE as usize], *offset)?;
    writer.flush()?;
    *offset += GUEST_WRITE;
    Ok(())
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Issue 11, defect 13: however long the guest writes, the overlay
    /// stays within its span (plus metadata), and QEMU finds it clean.
    #[test]
    fn the_guest_writes_like_a_rotated_log_within_its_span() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("guest.qcow2");
        let opts = CreateOptions {
            size: Some(64 * MIB),
            ..CreateOptions::default()
        };
        engine::create(&image, &opts).expect("create");
        let span = 8 * MIB;
        let mut writer = Qcow2Writer::open(&image).expect("open");
        let mut offset = 0;
        let mut most = 0;
        for n in 0..40 {
            guest_write(&mut writer, &mut offset, n, span).expect("write");
            let allocated = fs::metadata(&image).expect("stat").blocks() * 512;
            most = most.max(allocated);
        }
        drop(writer);
        // Data up to the span, and a few clusters of metadata.
        assert!(most <= span + MIB, "grew to {most} bytes");
        assert!(most >= span / 2, "hardly wrote: {most}");
        let check = std::process::Command::new("qemu-img")
            .args(["check", "-q"])
            .arg(&image)
            .output()
            .expect("qemu-img");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }
}
