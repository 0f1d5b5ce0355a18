//! Kill `cowshed commit` and `cowshed rebase` with SIGKILL at the fault
//! points they pass (src/engine/fault.rs): first an uninterrupted run lists
//! the points and how often each is passed, then one run is killed at each
//! chosen (point, hit), the same set on every machine. After every kill the
//! images must pass `qemu-img check` without corruptions (leaked clusters
//! are allowed: the write ordering guarantees leaks at worst) and the top
//! must read exactly as before.
//!
//! CRASH_HITS_PER_POINT=N kills at up to N hits of each point (default 4:
//! the first two, the last two; more adds evenly spaced ones).

mod common;

use common::fault::{self, Trace};
use common::run::{check_code, ok};
use std::path::Path;

fn hits_per_point() -> usize {
    std::env::var("CRASH_HITS_PER_POINT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn copy_all(from: &Path, to: &Path, names: &[&str]) {
    std::fs::create_dir(to).unwrap();
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

/// The points a crash test must reach, or its fixture no longer exercises
/// what it claims to.
fn assert_passes(trace: &Trace, what: &str, points: &[&str]) {
    for p in points {
        assert!(
            trace.hits(p) > 0,
            "{what} never passes {p}; it passed {:?}",
            trace.counts()
        );
    }
}

fn same_view(dir: &Path, img: &str, view: &str) -> Result<(), String> {
    let out = common::run::run(dir, "qemu-img", &["compare", img, view]);
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A base and a top with data, zeros and holes, at 4 KiB clusters (many L2
/// tables and refblocks); the top is larger, so the commit grows the base
/// and its L1 table. `view.raw` is the top's view.
fn commit_fixture(src: &Path) {
    std::fs::create_dir(src).unwrap();
    let create = |args: &[&str]| {
        let mut a = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"];
        a.extend(args);
        ok(src, "qemu-img", &a);
    };
    create(&["base.qcow2", "48M"]);
    ok(src, "qemu-io", &["-c", "write -P 0x0b 0 16M", "base.qcow2"]);
    create(&["-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "64M"]);
    ok(
        src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 1M 24M",
            "-c",
            "write -z 30M 4M",
            "-c",
            "write -P 0x22 40M 20M",
            "top.qcow2",
        ],
    );
    ok(
        src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );
}

#[test]
fn sigkill_during_commit_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    commit_fixture(&src);
    commit_kills(
        dir.path(),
        &[
            "commit.copied",
            "writer.l1.before_switch",
            "writer.l1.switched",
            "writer.refblock.before_link",
            "writer.l2_table.before_link",
            "writer.l2_batch.before",
            "writer.l2_batch.after",
            "commit.base_flushed",
            "commit.before_empty",
            "writer.empty.before_rename",
            "commit.emptied",
        ],
    );
}

/// The writer's rarer steps: a base whose clusters and L2 tables are
/// shared with an internal snapshot (copied, then the old ones released
/// after the new tables are durable), at 512-byte clusters and 64-bit
/// refcounts, so that the refcount table grows (one cluster of it covers
/// 2 MiB of file).
#[test]
fn sigkill_during_commit_into_a_snapshotted_base_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            "base.qcow2",
            "4M",
        ],
    );
    ok(&src, "qemu-io", &["-c", "write -P 0x0b 0 2M", "base.qcow2"]);
    ok(&src, "qemu-img", &["snapshot", "-c", "s1", "base.qcow2"]);
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "6M",
        ],
    );
    ok(
        &src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 512k 3M",
            "-c",
            "write -c -P 0x33 5M 64k",
            "top.qcow2",
        ],
    );
    ok(
        &src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );
    commit_kills(
        dir.path(),
        &[
            "writer.releases.before",
            "writer.releases.after",
            "writer.reftable.before_switch",
            "writer.reftable.switched",
            "writer.refblock.before_link",
            "writer.l2_table.before_link",
            "writer.l1.before_switch",
        ],
    );
}

/// Commit `src/top.qcow2` into `src/base.qcow2` once uninterrupted (it
/// must pass `must_pass`), then once killed at each chosen (point, hit):
/// both images clean or leaking only, the top's view unchanged.
fn commit_kills(d: &Path, must_pass: &[&str]) {
    let src = d.join("src");
    let images = ["base.qcow2", "top.qcow2"];
    let args = ["commit", "-q", "top.qcow2"];
    let full = d.join("full");
    copy_all(&src, &full, &images);
    let trace = fault::trace(&full, &args);
    // Uninterrupted, the base (grown to the top's size, which grows its L1
    // table) holds the top's view and both are clean.
    assert_eq!(check_code(&full, "base.qcow2"), 0);
    assert_eq!(check_code(&full, "top.qcow2"), 0);
    same_view(&full, "base.qcow2", "../src/view.raw").unwrap();
    assert_passes(&trace, "commit", must_pass);

    let chosen = fault::choose(&trace, hits_per_point());
    eprintln!("commit: {} kills over {:?}", chosen.len(), trace.counts());
    for (i, (point, hit)) in chosen.iter().enumerate() {
        let t = d.join(format!("t{i}"));
        copy_all(&src, &t, &images);
        fault::kill_at(&t, &args, point, *hit);
        for img in images {
            let code = check_code(&t, img);
            assert!(
                code == 0 || code == 3,
                "killed at {point} #{hit}: {img} check exit {code}"
            );
        }
        same_view(&t, "top.qcow2", "../src/view.raw")
            .unwrap_or_else(|e| panic!("killed at {point} #{hit}: the top's view changed: {e}"));
        std::fs::remove_dir_all(&t).unwrap();
    }
}

/// A cancel observed mid-copy (the job held at a chosen chunk while the
/// cancel is requested) or after the base's flush: an error, both images
/// clean, the top's view unchanged.
#[test]
fn commit_cancel_keeps_both_images_valid() {
    use cowshed::engine::fault::Plan;
    use cowshed::engine::{commit, Cancel, CommitOptions, Error, Progress};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    ok(d, "qemu-io", &["-c", "write -P 0x77 0 32M", "top.qcow2"]);
    ok(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );
    for n in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(d.join(n), d.join(format!("orig-{n}"))).unwrap();
    }
    for (point, hit) in [("commit.copied", 3), ("commit.base_flushed", 1)] {
        for n in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(d.join(format!("orig-{n}")), d.join(n)).unwrap();
        }
        let plan = Plan::new().pause_at(point, hit);
        let progress = Progress::new();
        let cancel = Cancel::new();
        let result = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _faults = plan.enter();
                commit(
                    &d.join("top.qcow2"),
                    &CommitOptions::default(),
                    &progress,
                    &cancel,
                )
            });
            let paused = plan.wait_paused(fault::HANG_GUARD);
            cancel.cancel();
            plan.release();
            let r = h.join().unwrap();
            assert_eq!(paused, Some((point.to_string(), hit)), "{r:?}");
            r
        });
        assert!(
            matches!(result, Err(Error::Cancelled)),
            "{point}: {result:?}"
        );
        // Seen at the next chunk: nothing copied after the chosen one.
        assert_eq!(plan.hits("commit.copied"), if hit == 3 { 3 } else { 32 });
        assert_eq!(plan.hits("commit.before_empty"), 0, "{point}");
        assert_eq!(check_code(d, "base.qcow2"), 0, "{point}");
        assert_eq!(check_code(d, "top.qcow2"), 0, "{point}");
        ok(d, "qemu-img", &["compare", "top.qcow2", "view.raw"]);
    }
}

/// A top over A whose view differs from B in places, B with data past A's
/// end; `view.raw` is the top's view.
fn rebase_fixture(src: &Path) {
    std::fs::create_dir(src).unwrap();
    let create = |name: &str, backing: Option<&str>, size: &str| {
        let mut a = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"];
        if let Some(b) = backing {
            a.extend(["-b", b, "-F", "qcow2"]);
        }
        a.extend([name, size]);
        ok(src, "qemu-img", &a);
    };
    create("A.qcow2", None, "48M");
    ok(src, "qemu-io", &["-c", "write -P 0x0b 0 32M", "A.qcow2"]);
    // B: half of A's data differs, and it has data past A's end.
    create("B.qcow2", None, "64M");
    ok(
        src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x0c 0 16M",
            "-c",
            "write -P 0x0b 16M 16M",
            "-c",
            "write -P 0x0d 50M 6M",
            "B.qcow2",
        ],
    );
    create("top.qcow2", Some("A.qcow2"), "64M");
    ok(
        src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 1M 3M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x22 20M 2M",
            "top.qcow2",
        ],
    );
    ok(
        src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );
}

fn backing_of(dir: &Path, img: &str) -> String {
    let info = common::run::run(dir, "qemu-img", &["info", "-U", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    v["backing-filename"].as_str().unwrap_or("").to_string()
}

/// Kill `cowshed rebase` (onto another base, and onto "" to flatten) at
/// its fault points: the image passes `qemu-img check` (leaks at worst),
/// reads exactly as before, and names its old backing if the kill came
/// before the header switch, the new one after.
#[test]
fn sigkill_during_rebase_never_corrupts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    rebase_fixture(&src);
    let images = ["A.qcow2", "B.qcow2", "top.qcow2"];
    let kinds: [(&str, &[&str], &str); 2] = [
        (
            "rebase",
            &["rebase", "-b", "B.qcow2", "-F", "qcow2", "top.qcow2"],
            "B.qcow2",
        ),
        ("flatten", &["rebase", "-b", "", "top.qcow2"], ""),
    ];
    for (kind, args, new_backing) in kinds {
        let full = d.join(format!("full-{kind}"));
        copy_all(&src, &full, &images);
        let trace = fault::trace(&full, args);
        assert_eq!(check_code(&full, "top.qcow2"), 0, "{kind}");
        same_view(&full, "top.qcow2", "../src/view.raw").unwrap();
        assert_eq!(backing_of(&full, "top.qcow2"), new_backing, "{kind}");
        assert_passes(
            &trace,
            kind,
            &[
                "rebase.copied",
                "writer.refblock.before_link",
                "writer.l2_table.before_link",
                "writer.l2_batch.before",
                "writer.l2_batch.after",
                "rebase.before_header_switch",
                "writer.backing.before_switch",
                "rebase.header_switched",
            ],
        );
        let chosen = fault::choose(&trace, hits_per_point());
        eprintln!("{kind}: {} kills over {:?}", chosen.len(), trace.counts());
        for (i, (point, hit)) in chosen.iter().enumerate() {
            let t = d.join(format!("{kind}{i}"));
            copy_all(&src, &t, &images);
            let reached = fault::kill_at(&t, args, point, *hit);
            let code = check_code(&t, "top.qcow2");
            assert!(
                code == 0 || code == 3,
                "{kind} killed at {point} #{hit}: check exit {code}"
            );
            same_view(&t, "top.qcow2", "../src/view.raw").unwrap_or_else(|e| {
                panic!("{kind} killed at {point} #{hit}: the view changed: {e}")
            });
            // The header is switched by the one write after this point.
            let switched = reached
                .position("writer.backing.before_switch", 1)
                .is_some_and(|p| p + 1 < reached.lines.len());
            let want = if switched { new_backing } else { "A.qcow2" };
            assert_eq!(
                backing_of(&t, "top.qcow2"),
                want,
                "{kind} killed at {point} #{hit}"
            );
            std::fs::remove_dir_all(&t).unwrap();
        }
    }
}
