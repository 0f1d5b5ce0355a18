//! Kill `cowshed commit` with SIGKILL at random points: every image must
//! still pass `qemu-img check` without corruptions (leaked clusters are
//! allowed: the ordering guarantees leaks at worst) and the top must read
//! exactly as before.
//!
//! CRASH_TRIALS=N runs N trials (default 60).

mod common;

use common::run::{check_code, ok};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn sigkill_during_commit_never_corrupts() {
    let trials: u32 = std::env::var("CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
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
            "cluster_size=4k",
            "base.qcow2",
            "48M",
        ],
    );
    ok(
        &src,
        "qemu-io",
        &["-c", "write -P 0x0b 0 16M", "base.qcow2"],
    );
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "64M",
        ],
    );
    ok(
        &src,
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
        &src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );

    // How long an uninterrupted commit takes, to spread the kills over it.
    let full = d.join("full");
    std::fs::create_dir(&full).unwrap();
    for n in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(src.join(n), full.join(n)).unwrap();
    }
    let t0 = Instant::now();
    ok(
        &full,
        env!("CARGO_BIN_EXE_cowshed"),
        &["commit", "-q", "top.qcow2"],
    );
    let span = t0.elapsed();
    // Uninterrupted, the base (grown from 48 to 64 MiB, which grows its L1
    // table at 4 KiB clusters) holds the top's view and both are clean.
    assert_eq!(check_code(&full, "base.qcow2"), 0);
    assert_eq!(check_code(&full, "top.qcow2"), 0);
    ok(
        &full,
        "qemu-img",
        &["compare", "base.qcow2", "../src/view.raw"],
    );

    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut interrupted = 0;
    for trial in 0..trials {
        let t = d.join(format!("t{trial}"));
        std::fs::create_dir(&t).unwrap();
        for n in ["base.qcow2", "top.qcow2"] {
            std::fs::copy(src.join(n), t.join(n)).unwrap();
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = span.mul_f64((seed % 1000) as f64 / 1000.0);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cowshed"))
            .args(["commit", "-q", "top.qcow2"])
            .current_dir(&t)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            interrupted += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        for img in ["base.qcow2", "top.qcow2"] {
            let code = check_code(&t, img);
            assert!(
                code == 0 || code == 3,
                "trial {trial} (killed after {delay:?}): {img} check exit {code}"
            );
        }
        let cmp = Command::new("qemu-img")
            .args(["compare", "top.qcow2", "../src/view.raw"])
            .current_dir(&t)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "trial {trial} (killed after {delay:?}): the top's view changed: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        std::fs::remove_dir_all(&t).unwrap();
    }
    assert!(
        interrupted >= trials / 2,
        "only {interrupted} of {trials} kills landed mid-commit (commit took {span:?})"
    );
}

#[test]
fn commit_cancel_keeps_both_images_valid() {
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
    let progress = Progress::new();
    let cancel = Cancel::new();
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| {
            commit(
                &d.join("top.qcow2"),
                &CommitOptions::default(),
                &progress,
                &cancel,
            )
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while progress.snapshot().0 == 0 && !h.is_finished() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        cancel.cancel();
        h.join().unwrap()
    });
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(check_code(d, "base.qcow2"), 0);
    assert_eq!(check_code(d, "top.qcow2"), 0);
    ok(d, "qemu-img", &["compare", "top.qcow2", "view.raw"]);
}

/// Kill `cowshed rebase` (onto another base, and onto "" to flatten) with
/// SIGKILL at random points: the image passes `qemu-img check` (leaks at
/// worst), reads exactly as before, and names either its old backing (the
/// header was not switched yet) or the new one.
#[test]
fn sigkill_during_rebase_never_corrupts() {
    let trials: u32 = std::env::var("CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let create = |name: &str, backing: Option<&str>, size: &str| {
        let mut a = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k"];
        if let Some(b) = backing {
            a.extend(["-b", b, "-F", "qcow2"]);
        }
        a.extend([name, size]);
        ok(&src, "qemu-img", &a);
    };
    create("A.qcow2", None, "48M");
    ok(&src, "qemu-io", &["-c", "write -P 0x0b 0 32M", "A.qcow2"]);
    // B: half of A's data differs, and it has data past A's end.
    create("B.qcow2", None, "64M");
    ok(
        &src,
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
        &src,
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
        &src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );

    let cowshed = env!("CARGO_BIN_EXE_cowshed");
    let kinds: [(&str, &[&str]); 2] = [
        (
            "rebase",
            &["rebase", "-b", "B.qcow2", "-F", "qcow2", "top.qcow2"],
        ),
        ("flatten", &["rebase", "-b", "", "top.qcow2"]),
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for (kind, args) in kinds {
        let full = d.join(format!("full-{kind}"));
        std::fs::create_dir(&full).unwrap();
        for n in ["A.qcow2", "B.qcow2", "top.qcow2"] {
            std::fs::copy(src.join(n), full.join(n)).unwrap();
        }
        let t0 = Instant::now();
        ok(&full, cowshed, args);
        let span = t0.elapsed();
        eprintln!("uninterrupted {kind}: {span:?}");
        assert_eq!(check_code(&full, "top.qcow2"), 0, "{kind}");
        ok(
            &full,
            "qemu-img",
            &["compare", "top.qcow2", "../src/view.raw"],
        );

        let mut interrupted = 0;
        let n = trials.div_ceil(2);
        for trial in 0..n {
            let t = d.join(format!("{kind}{trial}"));
            std::fs::create_dir(&t).unwrap();
            for n in ["A.qcow2", "B.qcow2", "top.qcow2"] {
                std::fs::copy(src.join(n), t.join(n)).unwrap();
            }
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let delay = span.mul_f64((seed % 1000) as f64 / 1000.0);
            let mut child = Command::new(cowshed)
                .args(args)
                .current_dir(&t)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            if child.try_wait().unwrap().is_none() {
                interrupted += 1;
            }
            let _ = child.kill();
            let _ = child.wait();
            let code = check_code(&t, "top.qcow2");
            assert!(
                code == 0 || code == 3,
                "{kind} trial {trial} (killed after {delay:?}): check exit {code}"
            );
            let cmp = Command::new("qemu-img")
                .args(["compare", "top.qcow2", "../src/view.raw"])
                .current_dir(&t)
                .output()
                .unwrap();
            assert!(
                cmp.status.success(),
                "{kind} trial {trial} (killed after {delay:?}): the view changed: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
            let info = Command::new("qemu-img")
                .args(["info", "top.qcow2"])
                .current_dir(&t)
                .output()
                .unwrap();
            let info = String::from_utf8_lossy(&info.stdout);
            let backing = info
                .lines()
                .find_map(|l| l.strip_prefix("backing file: "))
                .unwrap_or("");
            assert!(
                ["A.qcow2", "B.qcow2", ""].contains(&backing)
                    && (kind == "rebase" || backing != "B.qcow2"),
                "{kind} trial {trial}: backing {backing:?}"
            );
            std::fs::remove_dir_all(&t).unwrap();
        }
        assert!(
            interrupted >= n / 2,
            "{kind}: only {interrupted} of {n} kills landed mid-rebase (it took {span:?})"
        );
        eprintln!("{kind}: {interrupted} of {n} kills landed mid-rebase");
    }
}
