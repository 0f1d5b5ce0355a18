//! The allocating writer against QEMU: random sequences of writes, zero
//! writes and discards (offsets around cluster and L2-table boundaries) applied by the
//! engine to one copy of an image and by qemu-io to another. Both copies
//! must read the same (`qemu-img compare`), ours must pass `qemu-img check`
//! with no errors and no leaks, and an internal snapshot must still read as
//! it did.
//!
//! WRITER_CASES=N runs N cases (default 256).

use std::process::Command;

mod common;

use common::run::{ok, run};
use cowshed::engine::qcow2::Qcow2Writer;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        pattern: u8,
    },
    Zero {
        off: u64,
        len: u64,
    },
    /// Whole clusters only; they read from the backing again.
    Discard {
        off: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
struct Case {
    cluster: u64,
    compat: &'static str,
    refcount_bits: u32,
    backing: u8, // 0 none, 1 qcow2, 2 raw (shorter than the top)
    snapshot: bool,
    compressed: bool,
    /// Extended L2 entries (subclusters): v3, clusters of 16 KiB or more.
    extended: bool,
    ops: Vec<(u8, u64, i64, u64, u8)>,
}

fn l2_span(cluster: u64) -> u64 {
    cluster * (cluster / 8)
}

/// Two L2 tables' worth, so writes cross a table boundary (1 TiB of
/// sparse disk at 2 MiB clusters), and at least 4 MiB.
fn size_of(cluster: u64) -> u64 {
    (2 * l2_span(cluster)).max(4 << 20)
}

/// The backing chain's content, as the test wrote it: `(start, len,
/// pattern)` runs, zeros elsewhere.
fn backing_runs(backing: u8, size: u64) -> Vec<(u64, u64, u8)> {
    match backing {
        1 => vec![(0, 3 << 20, 0x5b), (size / 2, 64 << 10, 0x5c)],
        2 => vec![(0, 999_424, 0x6b)],
        _ => vec![],
    }
}

/// Turn raw draws into operations near interesting offsets.
fn ops(case: &Case) -> Vec<Op> {
    let size = size_of(case.cluster);
    let marks = [
        0,
        case.cluster,
        3 * case.cluster,
        l2_span(case.cluster),
        // Where a table of 16-byte (extended) entries ends.
        l2_span(case.cluster) / 2,
        size / 2,
        size - case.cluster,
    ];
    case.ops
        .iter()
        .map(|&(kind, mark, delta, len, pattern)| {
            let base = marks[(mark as usize) % marks.len()] as i64;
            let off = (base + delta).clamp(0, size as i64 - 1) as u64;
            let len = len.clamp(1, size - off).min(3 * case.cluster + 4096);
            if kind % 5 == 0 {
                Op::Zero { off, len }
            } else if kind % 5 == 1 {
                Op::Discard { off, len }
            } else {
                Op::Write {
                    off,
                    len,
                    pattern: pattern | 1,
                }
            }
        })
        .collect()
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(512u64), Just(4096), Just(65536), Just(2 << 20)],
        prop_oneof![Just("1.1"), Just("0.10")],
        prop_oneof![Just(16u32), Just(1), Just(64)],
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(
            (
                any::<u8>(),
                any::<u64>(),
                -5000i64..5000,
                1u64..300_000,
                any::<u8>(),
            ),
            1..12,
        ),
    )
        .prop_map(
            |(cluster, compat, refcount_bits, backing, snapshot, compressed, extended, ops)| Case {
                cluster,
                compat,
                // v2 has 16-bit refcounts only. (64-bit refcounts over
                // 512-byte clusters outgrow the first refcount table
                // cluster at 2 MiB of file: the table grows.)
                refcount_bits: if compat == "0.10" { 16 } else { refcount_bits },
                backing,
                // 1-bit refcounts cannot count a snapshot's second
                // reference (QEMU refuses to create one).
                snapshot: snapshot && refcount_bits != 1,
                compressed,
                extended: extended && compat == "1.1" && cluster >= 16384,
                ops,
            },
        )
}

fn check_case(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = size_of(case.cluster).to_string();
    let opts = format!(
        "cluster_size={},compat={},refcount_bits={},extended_l2={}",
        case.cluster,
        case.compat,
        case.refcount_bits,
        if case.extended { "on" } else { "off" }
    );
    let mut create: Vec<String> = ["create", "-q", "-f", "qcow2", "-o", &opts]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match case.backing {
        1 => {
            ok(
                d,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "base.qcow2", &size],
            );
            let mut qio: Vec<String> = backing_runs(1, size_of(case.cluster))
                .into_iter()
                .flat_map(|(s, n, p)| ["-c".to_string(), format!("write -P {p} {s} {n}")])
                .collect();
            qio.push("base.qcow2".into());
            let qio: Vec<&str> = qio.iter().map(|s| s.as_str()).collect();
            ok(d, "qemu-io", &qio);
            create.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from));
        }
        2 => {
            ok(
                d,
                "qemu-img",
                &["create", "-q", "-f", "raw", "base.raw", "1000000"],
            );
            let (s, n, p) = backing_runs(2, 0)[0];
            ok(
                d,
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {p} {s} {n}"),
                    "base.raw",
                ],
            );
            create.extend(["-b", "base.raw", "-F", "raw"].map(String::from));
        }
        _ => {}
    }
    create.extend(["top.qcow2".to_string(), size.clone()]);
    let create: Vec<&str> = create.iter().map(|s| s.as_str()).collect();
    ok(d, "qemu-img", &create);
    // Some state of QEMU's own: data, a zero cluster, maybe compressed.
    let c = case.cluster;
    let mut pre = vec![
        "-c".to_string(),
        format!("write -P 0x11 {} {}", c, 2 * c),
        "-c".into(),
        format!("write -z {} {}", 4 * c, c),
    ];
    if case.compressed {
        pre.extend(["-c".into(), format!("write -c -P 0x22 {} {}", 6 * c, c)]);
    }
    pre.push("top.qcow2".into());
    let pre: Vec<&str> = pre.iter().map(|s| s.as_str()).collect();
    ok(d, "qemu-io", &pre);
    if case.snapshot {
        ok(d, "qemu-img", &["snapshot", "-c", "s1", "top.qcow2"]);
        ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                "top.qcow2",
                "snap.raw",
            ],
        );
    }
    std::fs::copy(d.join("top.qcow2"), d.join("ours.qcow2")).unwrap();
    std::fs::copy(d.join("top.qcow2"), d.join("qemu.qcow2")).unwrap();

    let ops = ops(case);
    let mut w =
        Qcow2Writer::open(&d.join("ours.qcow2")).unwrap_or_else(|e| panic!("{case:?}: open: {e}"));
    let mut qio: Vec<String> = Vec::new();
    for op in &ops {
        match *op {
            Op::Write { off, len, pattern } => {
                w.write(&vec![pattern; len as usize], off)
                    .unwrap_or_else(|e| panic!("{op:?}: {e}"));
                qio.extend(["-c".into(), format!("write -P {pattern} {off} {len}")]);
            }
            Op::Zero { off, len } => {
                w.write_zeroes(off, len)
                    .unwrap_or_else(|e| panic!("{op:?}: {e}"));
                qio.extend(["-c".into(), format!("write -z {off} {len}")]);
            }
            Op::Discard { off, len } => {
                w.discard(off, len)
                    .unwrap_or_else(|e| panic!("{op:?}: {e}"));
                // qemu-io's discard keeps backing data hidden (zero
                // clusters), so QEMU is told what the range must read as
                // now: zeros, then the backing's runs written back.
                let (a, b) = (off.div_ceil(c) * c, (off + len) / c * c);
                if a < b {
                    qio.extend(["-c".into(), format!("write -z {a} {}", b - a)]);
                    for (start, n, pattern) in backing_runs(case.backing, size_of(c)) {
                        let (s, e) = (start.max(a), (start + n).min(b));
                        if s < e {
                            qio.extend(["-c".into(), format!("write -P {pattern} {s} {}", e - s)]);
                        }
                    }
                }
            }
        }
    }
    w.flush().unwrap();
    drop(w);
    qio.push("qemu.qcow2".into());
    let qio: Vec<&str> = qio.iter().map(|s| s.as_str()).collect();
    ok(d, "qemu-io", &qio);

    let cmp = run(d, "qemu-img", &["compare", "ours.qcow2", "qemu.qcow2"]);
    assert!(
        cmp.status.success(),
        "{case:?}\n{ops:?}\ncompare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let chk = run(d, "qemu-img", &["check", "ours.qcow2"]);
    assert!(
        chk.status.success(),
        "{case:?}\n{ops:?}\ncheck: {}{}",
        String::from_utf8_lossy(&chk.stdout),
        String::from_utf8_lossy(&chk.stderr)
    );
    if case.snapshot {
        ok(
            d,
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                "ours.qcow2",
                "snap-after.raw",
            ],
        );
        let same = run(
            d,
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                "snap.raw",
                "snap-after.raw",
            ],
        );
        assert!(same.status.success(), "{case:?}: the snapshot changed");
    }
}

#[test]
fn writes_match_qemu_io_and_check_clean() {
    let cases = std::env::var("WRITER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case_strategy(), |case| {
            check_case(&case);
            Ok(())
        })
        .unwrap();
}

#[test]
fn refuses_images_held_by_qemu_and_leaves_them_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"],
    );
    let before = std::fs::read(d.join("img.qcow2")).unwrap();
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "img.qcow2"])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cowshed::engine::lock_state(&d.join("img.qcow2")).unwrap()
        == cowshed::engine::LockState::None
    {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io never locked the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let err = Qcow2Writer::open(&d.join("img.qcow2"))
        .err()
        .expect("a running QEMU holds it");
    assert!(err.to_string().contains("in use by"), "{err}");
    drop(holder.stdin.take());
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(std::fs::read(d.join("img.qcow2")).unwrap(), before);
}

/// Files larger than the first refcount table cluster can count (512-byte
/// clusters: 8 MiB at 16-bit refcounts, 2 MiB at 64-bit) make the writer
/// grow the table; QEMU must read the result as its own and check it clean.
#[test]
fn refcount_table_grows_with_the_file() {
    for (compat, bits) in [("1.1", 64), ("0.10", 16), ("1.1", 32)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let opts = format!("cluster_size=512,compat={compat},refcount_bits={bits}");
        ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &opts,
                "img.qcow2",
                "32M",
            ],
        );
        std::fs::copy(d.join("img.qcow2"), d.join("qemu.qcow2")).unwrap();
        std::fs::copy(d.join("img.qcow2"), d.join("fresh.qcow2")).unwrap();
        let mut w = Qcow2Writer::open(&d.join("img.qcow2")).unwrap();
        let mut qio: Vec<String> = Vec::new();
        // Scattered 1 MiB writes: data and L2 tables interleave.
        for (k, off) in [
            0u64,
            20 << 20,
            3 << 20,
            9 << 20,
            30 << 20,
            14 << 20,
            5 << 20,
        ]
        .into_iter()
        .chain((22..26).map(|m| m << 20))
        .enumerate()
        {
            let pattern = 0x30 + k as u8;
            w.write(&vec![pattern; 1 << 20], off).unwrap();
            qio.extend(["-c".into(), format!("write -P {pattern} {off} 1M")]);
        }
        w.flush().unwrap();
        drop(w);
        qio.push("qemu.qcow2".into());
        let qio: Vec<&str> = qio.iter().map(|s| s.as_str()).collect();
        ok(d, "qemu-io", &qio);
        let reftable = |name: &str| std::fs::read(d.join(name)).unwrap()[48..60].to_vec();
        assert_ne!(
            reftable("img.qcow2"),
            reftable("fresh.qcow2"),
            "{compat}/{bits}: the refcount table did not move"
        );
        ok(d, "qemu-img", &["check", "img.qcow2"]);
        ok(d, "qemu-img", &["compare", "img.qcow2", "qemu.qcow2"]);
        let info = run(d, "qemu-img", &["info", "--output", "json", "img.qcow2"]);
        assert!(info.status.success());
    }
}

/// More L2 tables dirty at once than the writer's table cache holds (32
/// MiB: 16 tables of 2 MiB clusters): the cache must write them out, after
/// the fsync they depend on, before it evicts any, and the image must read
/// as qemu-io's copy does and check clean.
#[test]
fn more_dirty_l2_tables_than_the_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cluster = 2u64 << 20;
    let tables = 20u64;
    let size = format!("{}", tables * l2_span(cluster));
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "img.qcow2",
            &size,
        ],
    );
    std::fs::copy(d.join("img.qcow2"), d.join("qemu.qcow2")).unwrap();
    let mut w = Qcow2Writer::open(&d.join("img.qcow2")).unwrap();
    let mut qio: Vec<String> = Vec::new();
    // One small write under each L1 entry, then each table once more (by
    // now evicted or flushed), with no flush in between.
    for round in 0..2u64 {
        for t in 0..tables {
            let off = t * l2_span(cluster) + round * cluster + 4096 * t;
            let pattern = (0x40 + round * tables + t) as u8;
            w.write(&[pattern; 4096], off).unwrap();
            qio.extend(["-c".into(), format!("write -P {pattern} {off} 4096")]);
        }
    }
    w.flush().unwrap();
    drop(w);
    qio.push("qemu.qcow2".into());
    let qio: Vec<&str> = qio.iter().map(|s| s.as_str()).collect();
    ok(d, "qemu-io", &qio);
    ok(d, "qemu-img", &["check", "img.qcow2"]);
    ok(d, "qemu-img", &["compare", "img.qcow2", "qemu.qcow2"]);
}

/// Images whose data lives in an external data file (plain and raw): the
/// same writes, zero writes and discards by the engine and by qemu-io, each
/// on its own copy (built the same way, with absolute data file names:
/// QEMU resolves a relative one against its working directory), must read
/// the same; ours must check clean, and a raw data file must read, as raw,
/// what the image reads.
#[test]
fn external_data_files_match_qemu_io() {
    for (raw, cluster) in [
        (false, 4096u64),
        (false, 65536),
        (true, 65536),
        (true, 4096),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size: u64 = 4 << 20;
        for side in ["ours", "qemu"] {
            let sd = d.join(side);
            std::fs::create_dir(&sd).unwrap();
            let opts = format!(
                "cluster_size={cluster},data_file={},data_file_raw={}",
                sd.join("img.data").display(),
                if raw { "on" } else { "off" }
            );
            ok(
                &sd,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    "img.qcow2",
                    "4M",
                ],
            );
            ok(
                &sd,
                "qemu-io",
                &[
                    "-c",
                    "write -P 0x21 0 1M",
                    "-c",
                    "write -z 2M 128k",
                    "img.qcow2",
                ],
            );
        }
        let mut w = Qcow2Writer::open(&d.join("ours/img.qcow2")).unwrap();
        let mut qio: Vec<String> = Vec::new();
        // A fixed pseudo-random mix of offsets around cluster boundaries.
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ cluster;
        for k in 0..40u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = ((x >> 8) % (size / cluster)) * cluster + (x % 3) * 512 * (x >> 60 & 1);
            let len = (((x >> 20) % (3 * cluster)) + 1).min(size - off);
            match k % 4 {
                0 => {
                    w.write_zeroes(off, len).unwrap();
                    qio.extend(["-c".into(), format!("write -z {off} {len}")]);
                }
                1 => {
                    // Without a backing a discarded cluster reads as zeros.
                    w.discard(off, len).unwrap();
                    let (a, b) = (
                        off.div_ceil(cluster) * cluster,
                        (off + len) / cluster * cluster,
                    );
                    if a < b {
                        qio.extend(["-c".into(), format!("write -z {a} {}", b - a)]);
                    }
                }
                _ => {
                    let p = (k + 0x40) as u8;
                    w.write(&vec![p; len as usize], off).unwrap();
                    qio.extend(["-c".into(), format!("write -P {p} {off} {len}")]);
                }
            }
        }
        w.flush().unwrap();
        drop(w);
        qio.push("img.qcow2".into());
        let qio: Vec<&str> = qio.iter().map(|s| s.as_str()).collect();
        ok(&d.join("qemu"), "qemu-io", &qio);
        let case = format!("raw={raw} cluster={cluster}");
        // Each side's data file took its writes; neither reads the other's.
        let data = |side: &str| std::fs::read(d.join(side).join("img.data")).unwrap();
        assert_ne!(data("ours"), vec![0u8; size as usize], "{case}");
        let cmp = run(
            d,
            "qemu-img",
            &["compare", "ours/img.qcow2", "qemu/img.qcow2"],
        );
        assert!(
            cmp.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        let chk = run(d, "qemu-img", &["check", "ours/img.qcow2"]);
        assert!(
            chk.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&chk.stdout)
        );
        if raw {
            let view = run(
                d,
                "qemu-img",
                &[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "qcow2",
                    "ours/img.data",
                    "ours/img.qcow2",
                ],
            );
            assert!(
                view.status.success(),
                "{case}: raw data file differs: {}",
                String::from_utf8_lossy(&view.stdout)
            );
            assert_eq!(data("ours"), data("qemu"), "{case}: raw data files differ");
        }
    }
}
