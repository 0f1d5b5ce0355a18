//! Live updates: the watcher turns real writes (by `qemu-io`), creations,
//! renames and deletions (by `qemu-img` and the file system) into catalog
//! events, through inotify and through the poll alone.
//!
//! These tests assert that updates arrive, waiting on the events with a
//! generous time-out (a hang guard); how fast they arrive is measured by
//! benches/scan_live.py, not here, since a busy machine delays them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use cowshed::catalog::scan::scan_all;
use cowshed::catalog::{CatalogEvent, Sizes, WatchMode, WatchOptions, Watcher};
use crossbeam_channel::{unbounded, Receiver};

const MIB: u64 = 1 << 20;
/// A hang guard for an awaited event, never a speed requirement.
const DEADLINE: Duration = Duration::from_secs(60);

fn run(cmd: &str, args: &[&str], dir: &Path) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scratch(case: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cowshed-live-{case}-"))
        .tempdir()
        .expect("temp dir")
}

fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

/// The sizes an event reports for `key`: a write may come as a header
/// change too, since the writer's lock is part of the record.
fn sizes_for(ev: &CatalogEvent, key: &Path) -> Option<Sizes> {
    match ev {
        CatalogEvent::SizesChanged { key: k, sizes } if k == key => Some(*sizes),
        CatalogEvent::HeaderChanged(r) | CatalogEvent::Appeared(r) if r.key == key => Some(r.sizes),
        _ => None,
    }
}

/// Wait until an event satisfies `pred`; every event seen is kept in `log`.
fn wait_for(
    rx: &Receiver<CatalogEvent>,
    within: Duration,
    log: &mut Vec<CatalogEvent>,
    mut pred: impl FnMut(&CatalogEvent) -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while let Some(left) = within.checked_sub(start.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(ev) => {
                let hit = pred(&ev);
                log.push(ev);
                if hit {
                    return Some(start.elapsed());
                }
            }
            Err(_) => break,
        }
    }
    None
}

fn qemu_write(dir: &Path, image: &str, pattern: u64, offset: u64) {
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P {pattern} {offset} 1M"),
            image,
        ],
        dir,
    );
}

/// Events only: the poll is set far beyond the test's length, so any
/// report within the deadline came through inotify.
fn events_only() -> WatchOptions {
    WatchOptions {
        mode: WatchMode::Events,
        poll_interval: Duration::from_secs(3600),
        discover_interval: Duration::from_secs(3600),
        ..WatchOptions::default()
    }
}

#[test]
fn overlay_growth_is_reported_while_it_grows() {
    let dir = scratch("grow");
    let d = dir.path();
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "base.qcow2", "64M"],
        d,
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "web-1.qcow2",
        ],
        d,
    );
    let (records, errors) = scan_all(&[d.to_path_buf()]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(records.len(), 2);
    let (tx, rx) = unbounded();
    let watcher = Watcher::start(vec![d.to_path_buf()], events_only(), tx);
    assert!(watcher.polling_only().is_empty(), "inotify unavailable");
    for r in &records {
        watcher.track(r);
    }
    let overlay = d.join("web-1.qcow2");
    let key = overlay.canonicalize().expect("canonical");
    let before = allocated(&overlay);

    // A guest writing: a MiB at a time, each write reported before the
    // next (through inotify: the poll is off).
    let mut log = Vec::new();
    // (where in the log a write's final size was reported, that size)
    let mut confirmed = Vec::new();
    for i in 0..5u64 {
        qemu_write(d, "web-1.qcow2", i + 1, i * MIB);
        let now = allocated(&overlay);
        let is_now = |e: &CatalogEvent| sizes_for(e, &key).is_some_and(|s| s.allocated == now);
        let at = log
            .iter()
            .position(is_now)
            .or_else(|| wait_for(&rx, DEADLINE, &mut log, is_now).map(|_| log.len() - 1));
        let at = at.unwrap_or_else(|| {
            panic!("write {i}: no report of {now} bytes allocated; events: {log:#?}")
        });
        confirmed.push((at, now));
    }
    let after = allocated(&overlay);
    assert!(after >= before + 5 * MIB, "{before} -> {after}");
    // Once a write's size is reported, no later report goes below it (a
    // write in progress may show a block QEMU frees again when it ends,
    // so reports between two writes' ends need not be monotonic), and
    // every report carries the virtual size.
    for (at, floor) in confirmed {
        for e in &log[at..] {
            if let Some(s) = sizes_for(e, &key) {
                assert!(s.allocated >= floor, "{} < {floor}: {log:#?}", s.allocated);
            }
        }
    }
    let reported: Vec<Sizes> = log.iter().filter_map(|e| sizes_for(e, &key)).collect();
    assert!(reported.iter().all(|s| s.virtual_size == 64 * MIB));
    // The base was only read: nothing said about it changed size.
    let base_key = d.join("base.qcow2").canonicalize().expect("canonical");
    assert!(
        !log.iter()
            .any(|e| matches!(e, CatalogEvent::SizesChanged { key, .. } if *key == base_key)),
        "{log:#?}"
    );
}

#[test]
fn images_appear_move_and_vanish() {
    let dir = scratch("appear");
    let d = dir.path().canonicalize().expect("canonical");
    std::fs::create_dir(d.join("sub")).expect("mkdir");
    let (tx, rx) = unbounded();
    let watcher = Watcher::start(vec![d.clone()], events_only(), tx);
    assert!(watcher.polling_only().is_empty(), "inotify unavailable");
    let mut log = Vec::new();

    // Not an image: never reported.
    std::fs::write(d.join("notes.txt"), "not an image\n").expect("write");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "sub/new.qcow2", "16M"],
        &d,
    );
    let new = d.join("sub/new.qcow2");
    // qemu-img creates a qcow2 image of size 0 and then grows it: the
    // watcher may report it in between, and must then report the header
    // change. The last record of it is the finished image.
    let done = wait_for(&rx, DEADLINE, &mut log, |e| match e {
        CatalogEvent::Appeared(r) | CatalogEvent::HeaderChanged(r) => {
            r.key == new && r.sizes.virtual_size == 16 * MIB
        }
        _ => false,
    });
    assert!(done.is_some(), "{log:#?}");
    assert!(
        log.iter()
            .any(|e| matches!(e, CatalogEvent::Appeared(r) if r.key == new)),
        "{log:#?}"
    );
    let record = log.iter().rev().find_map(|e| match e {
        CatalogEvent::Appeared(r) | CatalogEvent::HeaderChanged(r) if r.key == new => Some(r),
        _ => None,
    });
    let record = record.expect("the record");
    assert_eq!(record.sizes.virtual_size, 16 * MIB);
    assert!(record.summary.is_some());

    // A rename is a vanish and an appear.
    let moved = d.join("moved.qcow2");
    std::fs::rename(&new, &moved).expect("rename");
    let mut gone = false;
    let mut back = false;
    wait_for(&rx, DEADLINE, &mut log, |e| {
        match e {
            CatalogEvent::Vanished { path } if *path == new => gone = true,
            CatalogEvent::Appeared(r) if r.key == moved => back = true,
            _ => {}
        }
        gone && back
    });
    assert!(gone && back, "rename not seen as vanish + appear: {log:#?}");

    std::fs::remove_file(&moved).expect("rm");
    let vanished = wait_for(
        &rx,
        DEADLINE,
        &mut log,
        |e| matches!(e, CatalogEvent::Vanished { path } if *path == moved),
    );
    assert!(vanished.is_some(), "{log:#?}");
    assert!(
        !log.iter().any(|e| match e {
            CatalogEvent::Appeared(r) => r.path.ends_with("notes.txt"),
            _ => false,
        }),
        "{log:#?}"
    );
}

#[test]
fn poll_alone_sees_growth_appearance_and_deletion() {
    let dir = scratch("poll");
    let d = dir.path().canonicalize().expect("canonical");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "old.qcow2", "16M"],
        &d,
    );
    let (tx, rx) = unbounded();
    let opts = WatchOptions {
        mode: WatchMode::PollOnly,
        poll_interval: Duration::from_millis(200),
        track_existing: true,
        ..WatchOptions::default()
    };
    let watcher = Watcher::start(vec![d.clone()], opts, tx);
    assert_eq!(watcher.polling_only(), &[d.clone()][..]);
    let mut log = Vec::new();

    // A new image is reported by a poll, which comes after the start's
    // silent walk: from then on the existing image is known.
    run("qemu-img", &["create", "-f", "raw", "disk.raw", "8M"], &d);
    let raw: PathBuf = d.join("disk.raw");
    let appeared = wait_for(
        &rx,
        DEADLINE,
        &mut log,
        |e| matches!(e, CatalogEvent::Appeared(r) if r.key == raw),
    );
    assert!(appeared.is_some(), "{log:#?}");

    let old = d.join("old.qcow2");
    qemu_write(&d, "old.qcow2", 7, 4 * MIB);
    let after = allocated(&old);
    let grew = wait_for(&rx, DEADLINE, &mut log, |e| {
        sizes_for(e, &old).is_some_and(|s| s.allocated == after)
    });
    assert!(grew.is_some(), "{log:#?}");

    std::fs::remove_file(&old).expect("rm");
    let vanished = wait_for(
        &rx,
        DEADLINE,
        &mut log,
        |e| matches!(e, CatalogEvent::Vanished { path } if *path == old),
    );
    assert!(vanished.is_some(), "{log:#?}");
    // The existing image was learnt silently (the polls that saw it grow
    // and vanish came after the one that learnt it), not reported.
    assert!(
        !log.iter()
            .any(|e| matches!(e, CatalogEvent::Appeared(r) if r.key == old)),
        "{log:#?}"
    );
    assert!(
        !log.iter()
            .any(|e| matches!(e, CatalogEvent::PollingOnly { .. })),
        "poll mode was asked for, not fallen back to: {log:#?}"
    );
}

#[test]
fn dropping_the_watcher_stops_it() {
    let dir = scratch("drop");
    let (tx, rx) = unbounded();
    let watcher = Watcher::start(vec![dir.path().to_path_buf()], events_only(), tx);
    drop(watcher);
    // The thread held the only sender: once it has ended (drop joins it),
    // the channel is disconnected rather than waiting.
    assert!(matches!(
        rx.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    ));
}

#[test]
fn an_idle_tree_costs_nothing() {
    // Directories, an image, a non-image: the watcher's own reads (probing,
    // walking) are file-system events too, and must not feed back.
    let dir = scratch("idle");
    let d = dir.path();
    std::fs::create_dir_all(d.join("a/b/c")).expect("mkdir");
    std::fs::write(d.join("a/notes.txt"), "x").expect("write");
    let (tx, rx) = unbounded();
    let watcher = Watcher::start(
        vec![d.to_path_buf()],
        WatchOptions {
            track_existing: true,
            ..events_only()
        },
        tx,
    );
    // Stir it: a new image in a new directory is walked and probed.
    std::fs::create_dir_all(d.join("a/b/new")).expect("mkdir");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "a/b/new/x.qcow2", "1M"],
        d,
    );
    let mut log = Vec::new();
    let appeared = wait_for(&rx, DEADLINE, &mut log, |e| {
        matches!(e, CatalogEvent::Appeared(_))
    });
    assert!(appeared.is_some(), "{log:#?}");
    // The echoes of that settle (the count of paths looked at stops
    // moving: a watcher feeding on its own reads never gets there), then
    // nothing more happens.
    let settled = settle(|| watcher.touches());
    sleep(Duration::from_millis(1200));
    let later = watcher.touches();
    assert_eq!(settled, later, "the watcher keeps busy on an idle tree");
    assert!(rx.try_recv().is_err());
}

#[test]
fn the_discovery_walk_finds_images_that_came_without_an_event() {
    // An image already there when the watcher starts (and not tracked)
    // stands for one whose event was lost: only the walk can find it.
    let dir = scratch("discover");
    let d = dir.path().canonicalize().expect("canonical");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "quiet.qcow2", "1M"],
        &d,
    );
    let (tx, rx) = unbounded();
    let opts = WatchOptions {
        discover_interval: Duration::from_millis(300),
        ..events_only()
    };
    let watcher = Watcher::start(vec![d.clone()], opts, tx);
    assert!(watcher.polling_only().is_empty(), "inotify unavailable");
    let quiet = d.join("quiet.qcow2");
    let mut log = Vec::new();
    let found = wait_for(
        &rx,
        DEADLINE,
        &mut log,
        |e| matches!(e, CatalogEvent::Appeared(r) if r.key == quiet),
    );
    assert!(found.is_some(), "{log:#?}");
    // Found once, not again at every walk (300 ms apart): a few walks'
    // time for a repeat to show. A busy machine walks less often, which
    // can only let this pass, never fail it wrongly.
    sleep(Duration::from_millis(700));
    while let Ok(ev) = rx.try_recv() {
        log.push(ev);
    }
    assert_eq!(log.len(), 1, "{log:#?}");
}

#[test]
fn a_qemu_taking_and_dropping_an_image_is_seen() {
    // qemu-io without -c holds the image open (and locked for writing)
    // until told to quit, without writing: no stat changes, only the open
    // and close events, and the lock bytes.
    use cowshed::engine::LockState;
    use std::io::Write;
    use std::process::Stdio;
    let dir = scratch("lock");
    let d = dir.path().canonicalize().expect("canonical");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "vm.qcow2", "16M"],
        &d,
    );
    let key = d.join("vm.qcow2");
    let (tx, rx) = unbounded();
    // Taking the lock is seen by its open event. Dropping it may come
    // too soon after the last look for the event to be followed (see
    // `recheck_lock`), so the poll, here quick, re-reads the lock of
    // images in use.
    let opts = WatchOptions {
        track_existing: true,
        poll_interval: Duration::from_millis(500),
        ..events_only()
    };
    let watcher = Watcher::start(vec![d.clone()], opts, tx);
    assert!(watcher.polling_only().is_empty(), "inotify unavailable");
    // Past the once-a-second limit that the start's own probe set (a
    // minimum the watcher enforces, so waiting it out is exact).
    sleep(Duration::from_millis(1100));
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "qcow2", "vm.qcow2"])
        .current_dir(&d)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut log = Vec::new();
    let locked = wait_for(&rx, DEADLINE, &mut log, |e| {
        matches!(e, CatalogEvent::HeaderChanged(r)
            if r.key == key && r.lock == LockState::Writer
                && r.holders.iter().any(|h| h.pid == qemu.id()))
    });
    let quit = qemu
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"quit\n")
        .and_then(|_| qemu.wait().map(|_| ()));
    let _ = qemu.kill();
    quit.expect("qemu-io quits");
    assert!(locked.is_some(), "lock not seen: {log:#?}");
    let released = wait_for(&rx, DEADLINE, &mut log, |e| {
        matches!(e, CatalogEvent::HeaderChanged(r)
            if r.key == key && r.lock == LockState::None && r.holders.is_empty())
    });
    assert!(released.is_some(), "release not seen: {log:#?}");
}

/// Wait until `count` stops moving (three looks 200 ms apart agree);
/// returns its value. A hang guard of [`DEADLINE`].
fn settle(count: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    let mut last = count();
    let mut same = 0;
    while same < 3 {
        assert!(Instant::now() < deadline, "never settled (at {last})");
        sleep(Duration::from_millis(200));
        let now = count();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}
