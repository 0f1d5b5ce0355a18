//! `cowshed convert -O qcow2` against `qemu-img convert -O qcow2` with the
//! same options: the guest view is the source's (`qemu-img compare`, and
//! qemu-io reading a known pattern back, compressed clusters included),
//! `qemu-img check` finds nothing, the allocation is the same shape, and the
//! file is about as large. Then what must never happen: a destination after
//! a cancel, a failure or a SIGKILL.

mod common;

use common::fault::HANG_GUARD;
use cowshed::engine::fault::Plan;

use common::{dir_names, mixed_bytes, Failures, Work, KIB, MIB};
use cowshed::engine::{convert, Cancel, ConvertOptions, CreateOptions, Error, Format, Progress};

/// A byte pattern every source holds at `PATTERN_AT`, for qemu-io to read.
const PATTERN: u8 = 0xab;
const PATTERN_AT: u64 = 1536 * KIB;
const PATTERN_LEN: u64 = 192 * KIB;
/// Not a multiple of any cluster size in the matrix.
const SIZE: u64 = 6 * MIB + 12 * KIB;

fn pattern_read() -> String {
    format!("read -P 0x{PATTERN:x} {PATTERN_AT} {PATTERN_LEN}")
}

/// `src.raw`: disk-like content with the pattern.
fn raw_source(w: &Work) {
    let mut b = mixed_bytes(7, SIZE as usize);
    b[PATTERN_AT as usize..(PATTERN_AT + PATTERN_LEN) as usize].fill(PATTERN);
    w.write_file("src.raw", &b);
}

/// `src.qcow2` (4 KiB clusters) from `src.raw`, with a zero cluster run and
/// a compressed cluster of its own.
fn qcow2_source(w: &Work) {
    w.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "src.raw",
        "src.qcow2",
    ]);
    w.io(
        "qcow2",
        "src.qcow2",
        &[
            "write -z 2M 64k".into(),
            "discard 3M 64k".into(),
            "write -c -P 0x5a 3M 64k".into(),
        ],
    );
}

/// `top.qcow2` over `mid.qcow2` over `base.qcow2`, with different cluster
/// sizes, partial-cluster writes, zero clusters over data and compressed
/// clusters.
fn chain_source(w: &Work) {
    w.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "base.qcow2",
    ]);
    w.create(
        "mid.qcow2",
        "qcow2",
        "cluster_size=4k",
        Some(("base.qcow2", "qcow2")),
        SIZE,
    );
    w.io(
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 0x11 100k 8k".into(),
            "write -z 512k 128k".into(),
            "write -P 0x12 5M 100k".into(),
            "write -P 0 5200k 8k".into(),
        ],
    );
    w.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=32k",
        Some(("mid.qcow2", "qcow2")),
        SIZE,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0x22 130k 3k".into(),
            "write -z 1M 64k".into(),
            "write -c -P 0x33 4M 64k".into(),
            "write -z 2304k 32k".into(),
        ],
    );
}

/// Compare cowshed's output `ours` with qemu-img's `theirs` made from `src`
/// with the same arguments.
fn compare_outputs(f: &mut Failures, w: &Work, what: &str, src: &str, ours: &str, theirs: &str) {
    let cmp = w.run("qemu-img", &["compare", src, ours]);
    f.check(
        cmp.ok(),
        &format!("{what}: compare with the source"),
        || cmp.to_string(),
    );
    if let Err(e) = w.check_clean(ours) {
        f.push(&format!("{what}: check"), e);
    }
    let read = w.run("qemu-io", &["-r", "-c", &pattern_read(), ours]);
    f.check(
        read.ok() && !read.stdout.contains("fail"),
        &format!("{what}: qemu-io reads the pattern"),
        || read.to_string(),
    );
    let (a, b) = (w.actual_size(ours), w.actual_size(theirs));
    f.check(
        a.abs_diff(b) * 100 <= b * 5,
        &format!("{what}: size within 5% of qemu-img's"),
        || format!("cowshed {a} bytes, qemu-img {b} bytes"),
    );
}

fn convert_both(
    w: &Work,
    opts: &[&str],
    src: &str,
    ours: &str,
    theirs: &str,
) -> Result<(), String> {
    let mut args = vec!["convert", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend([src, ours]);
    let r = w.cowshed(&args);
    if !r.ok() {
        return Err(r.to_string());
    }
    let mut q = vec!["convert", "-q", "-O", "qcow2"];
    q.extend_from_slice(opts);
    q.extend([src, theirs]);
    w.qemu_img(&q);
    Ok(())
}

#[test]
fn matrix_matches_qemu_img() {
    let w = Work::new("convert-qcow2-matrix");
    raw_source(&w);
    qcow2_source(&w);
    chain_source(&w);
    let mut f = Failures::new(&w.case);
    for src in ["src.raw", "src.qcow2", "top.qcow2"] {
        for cs in ["4k", "64k", "2M"] {
            for (name, extra) in [
                ("plain", &[][..]),
                ("zlib", &["-c"][..]),
                ("zstd", &["-c", "-o", "compression_type=zstd"][..]),
            ] {
                let what = format!("{src} cluster_size={cs} {name}");
                let o = format!("cluster_size={cs}");
                let mut opts = vec!["-o", o.as_str()];
                opts.extend_from_slice(extra);
                let (ours, theirs) = ("ours.qcow2", "theirs.qcow2");
                if let Err(e) = convert_both(&w, &opts, src, ours, theirs) {
                    f.push(&what, e);
                    continue;
                }
                compare_outputs(&mut f, &w, &what, src, ours, theirs);
                if name == "plain" {
                    // Uncompressed, the allocation is qemu-img's exactly.
                    let (a, b) = (w.map_shape(ours), w.map_shape(theirs));
                    f.check(a == b, &format!("{what}: map"), || {
                        common::extent_diff(&b, &a)
                    });
                }
                if name == "zstd" {
                    let info = w.qemu_img(&["info", "--output=json", ours]);
                    let ty = &w.json(&info)["format-specific"]["data"]["compression-type"];
                    f.check(ty == "zstd", &format!("{what}: compression type"), || {
                        ty.to_string()
                    });
                }
            }
        }
    }
    // Converted back to raw by qemu-img, a compressed output is the source.
    w.cowshed(&["convert", "-O", "qcow2", "-c", "src.qcow2", "c.qcow2"]);
    w.qemu_img(&["convert", "-O", "raw", "c.qcow2", "back.raw"]);
    w.qemu_img(&["convert", "-O", "raw", "src.qcow2", "view.raw"]);
    f.check(
        w.read_file("back.raw") == w.read_file("view.raw"),
        "compressed output converted back to raw",
        || "bytes differ".into(),
    );
    let c = w.check_clean("c.qcow2").unwrap_or_default();
    f.check(
        c["compressed-clusters"].as_u64().unwrap_or(0) > 0,
        "-c compresses",
        || c.to_string(),
    );
    f.finish();
}

#[test]
fn backing_output_matches_qemu_img() {
    let w = Work::new("convert-qcow2-backing");
    raw_source(&w);
    chain_source(&w);
    let mut f = Failures::new(&w.case);
    for cs in ["4k", "64k", "2M"] {
        for (name, extra) in [("plain", &[][..]), ("zlib", &["-c"][..])] {
            let what = format!("-B mid.qcow2 cluster_size={cs} {name}");
            let o = format!("cluster_size={cs}");
            let mut opts = vec!["-o", o.as_str(), "-B", "mid.qcow2", "-F", "qcow2"];
            opts.extend_from_slice(extra);
            if let Err(e) = convert_both(&w, &opts, "top.qcow2", "ours.qcow2", "theirs.qcow2") {
                f.push(&what, e);
                continue;
            }
            // The output reads through its backing.
            compare_outputs(&mut f, &w, &what, "top.qcow2", "ours.qcow2", "theirs.qcow2");
            let (a, b) = (w.map_shape("ours.qcow2"), w.map_shape("theirs.qcow2"));
            f.check(a == b, &format!("{what}: map"), || {
                common::extent_diff(&b, &a)
            });
            let info = w.qemu_img(&["info", "--output=json", "ours.qcow2"]);
            let v = w.json(&info);
            f.check(
                v["backing-filename"] == "mid.qcow2" && v["backing-filename-format"] == "qcow2",
                &format!("{what}: backing recorded"),
                || v.to_string(),
            );
        }
    }
    // QEMU 10 refuses -B without -F, and so do we.
    let r = w.cowshed(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "mid.qcow2",
        "top.qcow2",
        "x.qcow2",
    ]);
    f.check(
        !r.ok()
            && r.stderr
                .contains("Use of backing file requires explicit backing format"),
        "-B without -F",
        || r.to_string(),
    );
    f.check(
        !w.path("x.qcow2").exists(),
        "-B without -F: no output",
        || "x.qcow2 exists".into(),
    );
    f.finish();
}

/// A mostly empty 64 GiB disk: the empty ranges cost nothing (no batch is
/// read for them: the fault trace counts the batches read) and the few
/// bytes land where qemu-img puts them.
#[test]
fn huge_sparse_source_is_quick() {
    let w = Work::new("convert-qcow2-sparse");
    let f = std::fs::File::create(w.path("big.raw")).unwrap();
    f.set_len(64 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"moo", 40 << 30).unwrap();
    f.write_all_at(&[7u8; 70000], (64 << 30) - 70000).unwrap();
    drop(f);
    let mut fl = Failures::new(&w.case);
    for opts in [&["-o", "cluster_size=4k"][..], &["-c"][..]] {
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend(["big.raw", "ours.qcow2"]);
        let trace = common::fault::trace(w.root(), &args);
        let mut q = vec!["convert", "-q", "-O", "qcow2"];
        q.extend_from_slice(opts);
        q.extend(["big.raw", "theirs.qcow2"]);
        w.qemu_img(&q);
        // The two 1 MiB batches holding data (the last one's 70000 bytes
        // may straddle two), none of the 65 534 empty ones.
        let read = trace.hits("convert.qcow2.batch_read");
        fl.check(
            (2..=3).contains(&read),
            &format!("{opts:?}: batches read"),
            || format!("{read} batches read: {:?}", trace.counts()),
        );
        let cmp = w.run("qemu-img", &["compare", "big.raw", "ours.qcow2"]);
        fl.check(cmp.ok(), &format!("{opts:?}: compare"), || cmp.to_string());
        if let Err(e) = w.check_clean("ours.qcow2") {
            fl.push(&format!("{opts:?}: check"), e);
        }
        let (a, b) = (w.map_shape("ours.qcow2"), w.map_shape("theirs.qcow2"));
        fl.check(a == b, &format!("{opts:?}: map"), || {
            common::extent_diff(&b, &a)
        });
    }
    fl.finish();
}

#[test]
fn options_sparse_and_old_formats() {
    let w = Work::new("convert-qcow2-options");
    raw_source(&w);
    chain_source(&w);
    let mut f = Failures::new(&w.case);
    for (what, opts, src) in [
        ("-S 0", &["-S", "0"][..], "src.raw"),
        (
            "-S 0 -c",
            &["-S", "0", "-c", "-o", "cluster_size=64k"][..],
            "src.raw",
        ),
        (
            "-S 64k",
            &["-S", "64k", "-o", "cluster_size=4k"][..],
            "src.raw",
        ),
        (
            "refcount_bits=1 -c",
            &["-c", "-o", "refcount_bits=1,cluster_size=4k"][..],
            "top.qcow2",
        ),
        (
            "refcount_bits=64",
            &["-o", "refcount_bits=64,cluster_size=512"][..],
            "top.qcow2",
        ),
        (
            "compat=0.10 -B",
            &["-o", "compat=0.10", "-B", "mid.qcow2", "-F", "qcow2"][..],
            "top.qcow2",
        ),
    ] {
        if let Err(e) = convert_both(&w, opts, src, "ours.qcow2", "theirs.qcow2") {
            f.push(what, e);
            continue;
        }
        compare_outputs(&mut f, &w, what, src, "ours.qcow2", "theirs.qcow2");
        if !opts.contains(&"-c") {
            let (a, b) = (w.map_shape("ours.qcow2"), w.map_shape("theirs.qcow2"));
            f.check(a == b, &format!("{what}: map"), || {
                common::extent_diff(&b, &a)
            });
        }
    }
    // Refused clearly.
    for (what, args, needle) in [
        (
            "unknown -o key",
            &["-o", "preallocation=full"][..],
            "Invalid option 'preallocation'",
        ),
        (
            "bad cluster size",
            &["-o", "cluster_size=3000"][..],
            "Cluster size must be a power of two",
        ),
        (
            "extended L2",
            &["-o", "extended_l2=on"][..],
            "Invalid option 'extended_l2'",
        ),
    ] {
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend_from_slice(args);
        a.extend(["src.raw", "bad.qcow2"]);
        let r = w.cowshed(&a);
        f.check(!r.ok() && r.stderr.contains(needle), what, || r.to_string());
    }
    let r = w.cowshed(&["convert", "-c", "src.raw", "bad.raw"]);
    f.check(
        !r.ok() && r.stderr.contains("Compression not supported"),
        "-c with raw output",
        || r.to_string(),
    );
    let r = w.cowshed(&["convert", "--help"]);
    for flag in [
        "-O",
        "-c",
        "-o",
        "-B",
        "-F",
        "-S",
        "-t",
        "-p",
        "cluster_size",
    ] {
        f.check(
            r.stdout.contains(flag),
            &format!("--help mentions {flag}"),
            || r.stdout.clone(),
        );
    }
    let r = w.cowshed(&["convert", "-p", "-O", "qcow2", "src.raw", "p.qcow2"]);
    f.check(r.ok() && r.stderr.contains("100.00/100%"), "-p", || {
        r.to_string()
    });
    f.check(
        dir_names(w.root())
            .iter()
            .all(|n| !n.contains("cowshed-tmp")),
        "no temporary file left",
        || format!("{:?}", dir_names(w.root())),
    );
    f.finish();
}

/// Every `-S` value, with and without `-c`, to qcow2 and raw, from sources
/// with holes between data (where a batch buffer is reused): the output
/// reads exactly as the source. A metadata check alone once passed while
/// `-S 0` wrote an earlier batch's data into the holes.
#[test]
fn every_sparse_size_keeps_the_guest_view() {
    let w = Work::new("convert-every-S");
    raw_source(&w);
    chain_source(&w);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "holes.qcow2", "16M"]);
    w.io(
        "qcow2",
        "holes.qcow2",
        &[
            "write -P 7 0 64k".into(),
            "write -P 8 5M 3k".into(),
            "write -z 9M 1M".into(),
            "write -P 9 12M 1536k".into(),
        ],
    );
    let mut f = Failures::new(&w.case);
    for src in ["holes.qcow2", "top.qcow2"] {
        for sparse in ["0", "512", "4k", "64k", "1M"] {
            for (name, extra) in [
                ("qcow2", &["-O", "qcow2"][..]),
                ("qcow2 4k", &["-O", "qcow2", "-o", "cluster_size=4k"][..]),
                ("qcow2 v2", &["-O", "qcow2", "-o", "compat=0.10"][..]),
                ("zlib", &["-O", "qcow2", "-c"][..]),
                (
                    "zstd",
                    &["-O", "qcow2", "-c", "-o", "compression_type=zstd"][..],
                ),
                ("raw", &["-O", "raw"][..]),
            ] {
                let what = format!("{src} -S {sparse} {name}");
                let mut args = vec!["convert", "-S", sparse];
                args.extend_from_slice(extra);
                args.extend([src, "out.img"]);
                let r = w.cowshed(&args);
                if !r.ok() {
                    f.push(&what, r.to_string());
                    continue;
                }
                let cmp = w.run("qemu-img", &["compare", src, "out.img"]);
                f.check(cmp.ok(), &format!("{what}: guest view"), || cmp.to_string());
                if name != "raw" {
                    if let Err(e) = w.check_clean("out.img") {
                        f.push(&format!("{what}: check"), e);
                    }
                }
                std::fs::remove_file(w.path("out.img")).unwrap();
            }
        }
    }
    // With -B the ranges left to the backing are filled from it.
    for sparse in ["0", "4k"] {
        for extra in [&[][..], &["-c"][..]] {
            let what = format!("-B mid.qcow2 -S {sparse} {extra:?}");
            let mut args = vec![
                "convert",
                "-S",
                sparse,
                "-O",
                "qcow2",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
            ];
            args.extend_from_slice(extra);
            args.extend(["top.qcow2", "out.qcow2"]);
            let r = w.cowshed(&args);
            if !r.ok() {
                f.push(&what, r.to_string());
                continue;
            }
            let cmp = w.run("qemu-img", &["compare", "top.qcow2", "out.qcow2"]);
            f.check(cmp.ok(), &format!("{what}: guest view"), || cmp.to_string());
            std::fs::remove_file(w.path("out.qcow2")).unwrap();
        }
    }
    f.finish();
}

fn qcow2_options(compress: bool) -> ConvertOptions {
    ConvertOptions {
        target: CreateOptions {
            format: Format::Qcow2,
            ..CreateOptions::default()
        },
        compress,
        ..ConvertOptions::default()
    }
}

#[test]
fn cancel_and_failure_leave_nothing() {
    let w = Work::new("convert-qcow2-cancel");
    w.write_file("src.raw", &mixed_bytes(3, (32 * MIB) as usize));
    w.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "src.qcow2",
    ]);
    std::fs::remove_file(w.path("src.raw")).unwrap();
    let (src, dst) = (w.path("src.qcow2"), w.path("out.qcow2"));
    for compress in [false, true] {
        let progress = Progress::new();
        let cancel = Cancel::new();
        let opts = qcow2_options(compress);
        // Held after its second batch while the cancel is requested: the
        // reader sees it before reading a third.
        let plan = Plan::new().pause_at("convert.qcow2.batch_read", 2);
        let result = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _faults = plan.enter();
                convert(&src, &dst, &opts, &progress, &cancel)
            });
            let paused = plan.wait_paused(HANG_GUARD);
            cancel.cancel();
            plan.release();
            let r = h.join().unwrap();
            assert!(paused.is_some(), "never paused: {r:?}");
            r
        });
        assert!(
            matches!(result, Err(Error::Cancelled)),
            "-c {compress}: {result:?}"
        );
        assert_eq!(plan.hits("convert.qcow2.batch_read"), 2, "-c {compress}");
        assert_eq!(plan.hits("convert.before_rename"), 0, "-c {compress}");
        assert!(progress.snapshot().0 < 32 * MIB, "-c {compress}");
        assert_eq!(dir_names(w.root()), vec!["src.qcow2".to_string()]);
    }
    // A source that breaks half way: its second half lies past its end.
    std::fs::copy(&src, w.path("cut.qcow2")).unwrap();
    let len = std::fs::metadata(w.path("cut.qcow2")).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("cut.qcow2"))
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for compress in [false, true] {
        let r = convert(
            &w.path("cut.qcow2"),
            &dst,
            &qcow2_options(compress),
            &Progress::new(),
            &Cancel::new(),
        );
        assert!(r.is_err(), "converting a truncated source succeeded");
        assert_eq!(
            dir_names(w.root()),
            vec!["cut.qcow2".to_string(), "src.qcow2".to_string()]
        );
    }
}

/// SIGKILL `cowshed convert -O qcow2 -c` at its fault points (each batch
/// read and written, the end of the pipeline, before and after the rename;
/// see tests/crash.rs): a destination never appears unless complete (then
/// it is clean and equal to the source), and the source is untouched.
#[test]
fn sigkill_never_leaves_a_partial_destination() {
    use common::fault;
    let w = Work::new("convert-qcow2-crash");
    w.write_file("src.raw", &mixed_bytes(5, (4 * MIB) as usize));
    w.qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "src.qcow2",
    ]);
    let before = w.read_file("src.qcow2");
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "cluster_size=4k",
        "src.qcow2",
        "out.qcow2",
    ];
    let trace = fault::trace(w.root(), &args);
    w.check_clean("out.qcow2").unwrap();
    std::fs::remove_file(w.path("out.qcow2")).unwrap();
    for p in [
        "convert.qcow2.batch_read",
        "convert.qcow2.batch_written",
        "convert.qcow2.finished",
        "convert.before_rename",
        "convert.renamed",
    ] {
        assert!(trace.hits(p) > 0, "never passed {p}: {:?}", trace.counts());
    }

    let chosen = fault::choose(&trace, 4);
    eprintln!("{} kills over {:?}", chosen.len(), trace.counts());
    for (point, hit) in &chosen {
        fault::kill_at(w.root(), &args, point, *hit);
        let complete = point == "convert.renamed";
        assert_eq!(
            w.path("out.qcow2").exists(),
            complete,
            "killed at {point} #{hit}"
        );
        if complete {
            w.check_clean("out.qcow2")
                .unwrap_or_else(|e| panic!("killed at {point} #{hit}: {e}"));
            let cmp = w.run("qemu-img", &["compare", "src.qcow2", "out.qcow2"]);
            assert!(cmp.ok(), "killed at {point} #{hit}: {cmp}");
            std::fs::remove_file(w.path("out.qcow2")).unwrap();
        }
        // What a SIGKILL leaves is a temporary file, never the destination.
        for n in dir_names(w.root()) {
            if n.contains(".cowshed-tmp-") {
                std::fs::remove_file(w.path(&n)).unwrap();
            }
        }
        assert_eq!(dir_names(w.root()), ["src.qcow2", "src.raw"]);
    }
    assert_eq!(w.read_file("src.qcow2"), before, "the source changed");
    w.check_clean("src.qcow2").unwrap();
}

/// A destination file system too small for the output: refused before a
/// byte is written, naming both numbers; no DST and no temporary file.
#[test]
fn refuses_when_the_destination_file_system_is_too_small() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::run::ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    );
    common::run::ok(d, "qemu-io", &["-c", "write -P 0x5a 0 24M", "src.qcow2"]);
    let cow = env!("CARGO_BIN_EXE_cowshed");
    for (name, args) in [
        ("raw", "-O raw"),
        ("qcow2", "-O qcow2"),
        ("zstd", "-O qcow2 -c -o compression_type=zstd"),
    ] {
        let script = format!(
            "{cow} convert {args} src.qcow2 small/out > out-{name} 2>&1 || echo $? > rc-{name}\n\
             ls -A small > ls-{name}\n"
        );
        let Some(out) = common::small_fs::run_with_small_fs(d, 16, &script) else {
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let msg = std::fs::read_to_string(d.join(format!("out-{name}"))).unwrap();
        let rc = std::fs::read_to_string(d.join(format!("rc-{name}"))).unwrap_or_default();
        assert_eq!(rc.trim(), "1", "{name}: {msg}");
        assert!(
            msg.contains("small/out") && msg.contains("not enough free space"),
            "{name}: {msg}"
        );
        let left = std::fs::read_to_string(d.join(format!("ls-{name}"))).unwrap();
        assert!(left.trim().is_empty(), "{name}: left behind: {left}");
    }
}
