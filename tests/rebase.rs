//! `cowshed rebase` against `qemu-img rebase` run on a copy of the same
//! image: the guest view is kept (`qemu-img compare` with the image as it
//! was), `qemu-img check` is clean, the result reads like qemu-img's and
//! has the same `qemu-img map` (so the same clusters were written, data or
//! zero) and the same backing name and format in `qemu-img info`. Unsafe
//! mode changes the header only, byte for byte as qemu-img does. Refusals
//! (missing -F, a loop, a raw image, an image QEMU holds) change nothing.

mod common;

use common::*;
use serde_json::Value;

const CASES: &[(&str, &str)] = &[
    ("4k", "cluster_size=4k"),
    ("64k", "cluster_size=64k"),
    // Subclusters: the image's own 4 KiB writes leave the rest of their
    // clusters to the backing, which a rebase must not overwrite.
    ("64k-extended-l2", "cluster_size=64k,extended_l2=on"),
];

/// The cluster size `opts` asks for (64 KiB by default).
fn cluster_size(opts: &str) -> u64 {
    if opts.contains("cluster_size=4k") {
        4096
    } else {
        65536
    }
}

/// Sizes of (old base, new base, image) in KiB.
const SIZES: &[(u64, u64, u64)] = &[
    // Old base shorter, new base longer, image not a multiple of 64 KiB.
    (3072, 7168, 6176),
    // New base shorter than the image.
    (4096, 3072, 4096),
    // All the same size.
    (4096, 4096, 4096),
];

/// bases/A.qcow2 (the old base), bases/B.qcow2 (the new one, differing from
/// A in whole and partial clusters, zero clusters and a compressed one),
/// bases/B2.qcow2 (an overlay of B with data of its own), bases/B.raw (B as
/// raw), vm/top.qcow2 over `../bases/A.qcow2` with data, partial writes and
/// zero clusters of its own, and vm/orig.qcow2, a copy of it.
fn fixture(w: &Work, opts: &str, (old, new, top): (u64, u64, u64)) {
    w.mkdir("bases");
    w.mkdir("vm");
    let k = |n: u64| format!("{}", n * KIB);
    w.create("bases/A.qcow2", "qcow2", opts, None, old * KIB);
    w.io(
        "qcow2",
        "bases/A.qcow2",
        &[
            format!("write -P 0xaa 0 {}", k(old)),
            "write -z 1M 64k".into(),
            "write -P 0xa1 1300k 3k".into(),
        ],
    );
    let cs = cluster_size(opts);
    w.create("bases/B.qcow2", "qcow2", opts, None, new * KIB);
    w.io(
        "qcow2",
        "bases/B.qcow2",
        &[
            // Compressed writes need unallocated clusters: first.
            format!("write -c -P 0xbc 1792k {cs}"),
            "write -P 0xaa 0 1792k".into(),
            format!(
                "write -P 0xaa {} {}",
                1792 * KIB + cs,
                new * KIB - 1792 * KIB - cs
            ),
            "write -P 0xbb 64k 4k".into(),
            "write -P 0xbb 512k 128k".into(),
            "write -z 1M 64k".into(),
            "write -z 1536k 64k".into(),
            "write -P 0xa1 1300k 3k".into(),
        ],
    );
    w.create(
        "bases/B2.qcow2",
        "qcow2",
        opts,
        Some(("B.qcow2", "qcow2")),
        new * KIB,
    );
    w.io("qcow2", "bases/B2.qcow2", &["write -P 0xb2 2M 100k".into()]);
    w.qemu_img(&["convert", "-O", "raw", "bases/B.qcow2", "bases/B.raw"]);
    w.create(
        "vm/top.qcow2",
        "qcow2",
        opts,
        Some(("../bases/A.qcow2", "qcow2")),
        top * KIB,
    );
    w.io(
        "qcow2",
        "vm/top.qcow2",
        &[
            "write -P 0x11 512k 4k".into(),
            "write -P 0x12 700k 10k".into(),
            "write -z 2560k 64k".into(),
            "write -P 0x13 3M 64k".into(),
        ],
    );
    w.copy("vm/top.qcow2", "vm/orig.qcow2");
}

/// Run the same rebase with qemu-img on vm/q.qcow2 and with cowshed on
/// vm/o.qcow2 (both copies of vm/orig.qcow2) and compare everything.
fn rebase_both(w: &Work, f: &mut Failures, label: &str, args: &[&str]) {
    w.copy("vm/orig.qcow2", "vm/q.qcow2");
    w.copy("vm/orig.qcow2", "vm/o.qcow2");
    let with = |img: &str| {
        let mut a = vec!["rebase"];
        a.extend_from_slice(args);
        a.push(img);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let qa = with("vm/q.qcow2");
    w.qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let oa = with("vm/o.qcow2");
    let needed = space_needed(w, args, "vm/o.qcow2");
    let before = disk_usage(w, "vm/o.qcow2");
    let r = w.cowshed(&oa.iter().map(String::as_str).collect::<Vec<_>>());
    if !r.ok() {
        f.push(label, format!("cowshed failed: {r}"));
        return;
    }
    let grown = disk_usage(w, "vm/o.qcow2").saturating_sub(before);
    f.check(grown <= needed, label, || {
        format!(
            "the file grew by {grown} bytes, more than the {needed} the free-space check asked for"
        )
    });
    if let Err(e) = w.same_view("vm/o.qcow2", "vm/orig.qcow2") {
        f.push(label, format!("guest view changed: {e}"));
    }
    if let Err(e) = w.same_view("vm/o.qcow2", "vm/q.qcow2") {
        f.push(label, format!("differs from qemu-img's result: {e}"));
    }
    let code = w.check_code("vm/o.qcow2");
    f.check(code == 0, label, || format!("qemu-img check exit {code}"));
    // With subclusters too: QEMU writes only the subclusters that differ,
    // in place in the image's own clusters (issue #13).
    let (qm, om) = (w.map_json("vm/q.qcow2"), w.map_json("vm/o.qcow2"));
    f.check(qm == om, label, || {
        format!("qemu-img map differs:\n{}", extent_diff(&qm, &om))
    });
    let (qi, oi) = (w.info_json("vm/q.qcow2"), w.info_json("vm/o.qcow2"));
    for key in [
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
    ] {
        f.check(qi.get(key) == oi.get(key), label, || {
            format!(
                "info `{key}`: qemu-img {:?}, cowshed {:?}",
                qi.get(key),
                oi.get(key)
            )
        });
    }
}

/// What the free-space check asks for, for `rebase ARGS img`.
fn space_needed(w: &Work, args: &[&str], img: &str) -> u64 {
    use cowshed::engine::{rebase_space_needed, Format, RebaseOptions};
    let after = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
    };
    let opts = RebaseOptions {
        backing: after("-b").unwrap_or("").to_string(),
        backing_format: after("-F").and_then(Format::from_name),
        unsafe_header_only: args.contains(&"-u"),
        ..Default::default()
    };
    rebase_space_needed(&w.path(img), &opts).unwrap()
}

/// Bytes the file occupies on disk.
fn disk_usage(w: &Work, img: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(w.path(img)).unwrap().blocks() * 512
}

#[test]
fn safe_rebase_and_flatten_equal_qemu_img() {
    for (cname, opts) in CASES {
        for &sizes in SIZES {
            let case = format!("safe-{cname}-{}-{}-{}", sizes.0, sizes.1, sizes.2);
            let w = Work::new(&case);
            fixture(&w, opts, sizes);
            let mut f = Failures::new(&case);
            rebase_both(
                &w,
                &mut f,
                "onto B",
                &["-b", "../bases/B.qcow2", "-F", "qcow2"],
            );
            rebase_both(
                &w,
                &mut f,
                "onto B2 (depth 2)",
                &["-b", "../bases/B2.qcow2", "-F", "qcow2"],
            );
            rebase_both(
                &w,
                &mut f,
                "onto raw B",
                &["-b", "../bases/B.raw", "-F", "raw"],
            );
            rebase_both(&w, &mut f, "flatten", &["-b", ""]);
            f.finish();
        }
    }
}

#[test]
fn safe_rebase_of_v2_and_standalone_images() {
    let w = Work::new("v2");
    fixture(&w, "compat=0.10,cluster_size=64k", (3072, 7168, 6176));
    let mut f = Failures::new("v2");
    // v2 has no zero clusters: qemu-img writes zero bytes past the old end.
    rebase_both(
        &w,
        &mut f,
        "v2 onto B",
        &["-b", "../bases/B.qcow2", "-F", "qcow2"],
    );
    rebase_both(&w, &mut f, "v2 flatten", &["-b", ""]);
    // An image without a backing file: the old chain reads zeros.
    w.create("vm/orig.qcow2", "qcow2", "", None, 4 * MIB);
    w.io("qcow2", "vm/orig.qcow2", &["write -P 0x77 64k 64k".into()]);
    rebase_both(
        &w,
        &mut f,
        "standalone onto B",
        &["-b", "../bases/B.qcow2", "-F", "qcow2"],
    );
    // Onto an image of its own chain (B <- mid <- image): only what mid
    // holds differs (QEMU skips the rest without reading it).
    w.create(
        "vm/mid.qcow2",
        "qcow2",
        "",
        Some(("../bases/B.qcow2", "qcow2")),
        6 * MIB,
    );
    w.io(
        "qcow2",
        "vm/mid.qcow2",
        &[
            "write -P 0x5a 1M 1M".into(),
            "write -z 4M 64k".into(),
            "write -P 0x5b 5M 1M".into(),
        ],
    );
    w.create(
        "vm/orig.qcow2",
        "qcow2",
        "",
        Some(("mid.qcow2", "qcow2")),
        6 * MIB,
    );
    w.io(
        "qcow2",
        "vm/orig.qcow2",
        &["write -P 0x77 1200k 64k".into()],
    );
    rebase_both(
        &w,
        &mut f,
        "onto its own chain's base",
        &["-b", "../bases/B.qcow2", "-F", "qcow2"],
    );
    f.finish();
}

/// Cluster 0 and the rest of the file.
fn split_header(bytes: &[u8], cs: usize) -> (&[u8], &[u8]) {
    bytes.split_at(cs.min(bytes.len()))
}

#[test]
fn unsafe_rebase_changes_the_header_only_as_qemu_img() {
    for (cname, opts) in CASES {
        let case = format!("unsafe-{cname}");
        let w = Work::new(&case);
        fixture(&w, opts, (4096, 4096, 4096));
        let cs = if *cname == "4k" { 4096 } else { 65536 };
        let mut f = Failures::new(&case);
        let orig = w.read_file("vm/orig.qcow2");
        let long_dir = "bases/a-rather-long-directory-name-for-the-new-backing-file-to-live-in";
        w.mkdir(long_dir);
        w.copy("bases/B.qcow2", &format!("{long_dir}/B.qcow2"));
        let long = w.path(&format!("{long_dir}/B.qcow2"));
        let long = long.to_str().unwrap();
        for (label, args) in [
            (
                "-u onto B",
                &["-u", "-b", "../bases/B.qcow2", "-F", "qcow2"][..],
            ),
            (
                "-u onto raw",
                &["-u", "-b", "../bases/B.raw", "-F", "raw"][..],
            ),
            (
                "-u onto a long absolute name",
                &["-u", "-b", long, "-F", "qcow2"][..],
            ),
            ("-u -b \"\"", &["-u", "-b", ""][..]),
        ] {
            w.copy("vm/orig.qcow2", "vm/q.qcow2");
            w.copy("vm/orig.qcow2", "vm/o.qcow2");
            let mut qa = vec!["rebase"];
            qa.extend_from_slice(args);
            let mut oa = qa.clone();
            qa.push("vm/q.qcow2");
            oa.push("vm/o.qcow2");
            w.qemu_img(&qa);
            let r = w.cowshed(&oa);
            if !r.ok() {
                f.push(label, format!("cowshed failed: {r}"));
                continue;
            }
            let (q, o) = (w.read_file("vm/q.qcow2"), w.read_file("vm/o.qcow2"));
            let (qh, qrest) = split_header(&q, cs);
            let (oh, orest) = split_header(&o, cs);
            f.check(orest == split_header(&orig, cs).1, label, || {
                "bytes outside the header cluster changed".into()
            });
            f.check(orest == qrest, label, || {
                "rest differs from qemu-img's".into()
            });
            f.check(qh == oh, label, || {
                format!(
                    "header differs from qemu-img's at byte {:?}",
                    first_difference(qh, oh)
                )
            });
            let code = w.check_code("vm/o.qcow2");
            f.check(code == 0, label, || format!("qemu-img check exit {code}"));
        }
        // The old backing need not exist.
        std::fs::remove_file(w.path("bases/A.qcow2")).unwrap();
        w.copy("vm/orig.qcow2", "vm/o.qcow2");
        let r = w.cowshed(&[
            "rebase",
            "-u",
            "-b",
            "../bases/B.qcow2",
            "-F",
            "qcow2",
            "vm/o.qcow2",
        ]);
        f.check(r.ok(), "-u without the old backing", || r.to_string());
        let info = w.info_json("vm/o.qcow2");
        f.check(
            info["backing-filename"] == "../bases/B.qcow2",
            "-u without the old backing",
            || info.to_string(),
        );
        f.finish();
    }
}

/// Run cowshed, expect a failure whose message contains `want`, and the
/// listed files unchanged byte for byte.
fn refused(w: &Work, f: &mut Failures, label: &str, args: &[&str], want: &str, files: &[&str]) {
    let before: Vec<Vec<u8>> = files.iter().map(|n| w.read_file(n)).collect();
    let r = w.cowshed(args);
    f.check(!r.ok(), label, || format!("succeeded: {r}"));
    f.check(r.stderr.contains(want), label, || {
        format!("message lacks `{want}`: {r}")
    });
    for (n, b) in files.iter().zip(before) {
        f.check(w.read_file(n) == b, label, || format!("{n} changed"));
    }
}

#[test]
fn refusals_leave_every_file_as_it_was() {
    let w = Work::new("refusals");
    fixture(&w, "cluster_size=64k", (4096, 4096, 4096));
    let mut f = Failures::new("refusals");
    let all = ["vm/top.qcow2", "bases/A.qcow2", "bases/B.qcow2"];

    // QEMU 10's wording; qemu-img itself fails the same way (in safe mode
    // only after writing the differing data, cowshed before anything).
    let q = w.qemu_img_may_fail(&["rebase", "-u", "-b", "../bases/B.qcow2", "vm/orig.qcow2"]);
    let want = "backing format must be specified";
    f.check(!q.ok() && q.stderr.contains(want), "oracle", || {
        q.to_string()
    });
    for mode in [&[][..], &["-u"][..]] {
        let mut a = vec!["rebase"];
        a.extend_from_slice(mode);
        a.extend(["-b", "../bases/B.qcow2", "vm/top.qcow2"]);
        refused(&w, &mut f, "no -F", &a, want, &all);
    }

    // Loops: the image itself, and an overlay of it.
    w.create(
        "vm/child.qcow2",
        "qcow2",
        "",
        Some(("top.qcow2", "qcow2")),
        4 * MIB,
    );
    for mode in [&[][..], &["-u"][..]] {
        for target in ["top.qcow2", "child.qcow2"] {
            let mut a = vec!["rebase"];
            a.extend_from_slice(mode);
            a.extend(["-b", target, "-F", "qcow2", "vm/top.qcow2"]);
            refused(&w, &mut f, &format!("loop via {target}"), &a, "loop", &all);
        }
    }

    // A raw image has no backing file.
    w.create("vm/disk.raw", "raw", "", None, MIB);
    for mode in [&[][..], &["-u"][..]] {
        let mut a = vec!["rebase"];
        a.extend_from_slice(mode);
        a.extend(["-b", "../bases/B.qcow2", "-F", "qcow2", "vm/disk.raw"]);
        refused(&w, &mut f, "raw image", &a, "raw image", &["vm/disk.raw"]);
    }

    // Missing new backing in safe mode.
    refused(
        &w,
        &mut f,
        "missing new backing",
        &["rebase", "-b", "nope.qcow2", "-F", "qcow2", "vm/top.qcow2"],
        "Could not open new backing file 'nope.qcow2'",
        &all,
    );

    // Safe mode needs the old backing; -u does not.
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "../bases/gone.qcow2",
        "-F",
        "qcow2",
        "vm/lost.qcow2",
        "4M",
    ]);
    refused(
        &w,
        &mut f,
        "old backing missing",
        &[
            "rebase",
            "-b",
            "../bases/B.qcow2",
            "-F",
            "qcow2",
            "vm/lost.qcow2",
        ],
        "gone.qcow2",
        &["vm/lost.qcow2"],
    );
    let r = w.cowshed(&[
        "rebase",
        "-u",
        "-b",
        "../bases/B.qcow2",
        "-F",
        "qcow2",
        "vm/lost.qcow2",
    ]);
    f.check(r.ok(), "-u with the old backing missing", || r.to_string());

    // Persistent bitmaps: kept by -u (a safe rebase records what it
    // copies in them: tests/bitmap.rs).
    w.copy("vm/orig.qcow2", "vm/bitmap.qcow2");
    w.qemu_img(&["bitmap", "--add", "vm/bitmap.qcow2", "b0"]);
    let r = w.cowshed(&[
        "rebase",
        "-u",
        "-b",
        "../bases/B.qcow2",
        "-F",
        "qcow2",
        "vm/bitmap.qcow2",
    ]);
    f.check(r.ok(), "-u keeps bitmaps", || r.to_string());
    let code = w.check_code("vm/bitmap.qcow2");
    f.check(code == 0, "-u keeps bitmaps", || {
        format!("check exit {code}")
    });

    // A running QEMU holds the image.
    let holder = w.hold_writer("vm/top.qcow2", "qcow2");
    for mode in [&[][..], &["-u"][..]] {
        let mut a = vec!["rebase"];
        a.extend_from_slice(mode);
        a.extend(["-b", "../bases/B.qcow2", "-F", "qcow2", "vm/top.qcow2"]);
        refused(&w, &mut f, "held by qemu-io", &a, "in use by pid", &all);
        let r = w.cowshed(&a);
        f.check(r.stderr.contains("qemu-io"), "held by qemu-io", || {
            r.to_string()
        });
    }
    release_holder(holder);
    f.finish();
}

#[test]
fn the_new_header_must_fit_in_the_first_cluster() {
    // 512-byte clusters, v3: header 112 + format extension 16 + end 8 =
    // 136 bytes, so a name of 376 bytes fits and one of 377 does not.
    let w = Work::new("fit");
    let mut f = Failures::new("fit");
    w.create("B.qcow2", "qcow2", "cluster_size=512", None, MIB);
    w.io("qcow2", "B.qcow2", &["write -P 0xbb 0 64k".into()]);
    w.create("A.qcow2", "qcow2", "cluster_size=512", None, MIB);
    w.create(
        "orig.qcow2",
        "qcow2",
        "cluster_size=512",
        Some(("A.qcow2", "qcow2")),
        MIB,
    );
    let name = |len: usize| format!("{}B.qcow2", "./".repeat((len - 7) / 2));
    let (fits, too_long) = (name(375), name(377));
    assert_eq!((fits.len(), too_long.len()), (375, 377));
    for mode in [&["-u"][..], &[][..]] {
        for (n, ok) in [(&fits, true), (&too_long, false)] {
            let label = format!("{mode:?} name of {} bytes", n.len());
            w.copy("orig.qcow2", "q.qcow2");
            w.copy("orig.qcow2", "o.qcow2");
            let mut a = vec!["rebase"];
            a.extend_from_slice(mode);
            a.extend(["-b", n.as_str(), "-F", "qcow2"]);
            let q = w.qemu_img_may_fail(&[&a[..], &["q.qcow2"]].concat());
            let o = w.cowshed(&[&a[..], &["o.qcow2"]].concat());
            f.check(q.ok() == ok, &label, || format!("oracle: {q}"));
            f.check(o.ok() == ok, &label, || format!("cowshed: {o}"));
            if ok && mode == ["-u"] {
                f.check(
                    w.read_file("q.qcow2") == w.read_file("o.qcow2"),
                    &label,
                    || "differs from qemu-img's".into(),
                );
            }
            if !ok {
                // qemu-img fails only after copying the data in safe mode;
                // cowshed refuses before writing anything.
                f.check(
                    w.read_file("o.qcow2") == w.read_file("orig.qcow2"),
                    &label,
                    || "changed".into(),
                );
                f.check(o.stderr.contains("does not fit"), &label, || o.to_string());
            }
        }
    }
    f.finish();
}

#[test]
fn cancelled_rebase_keeps_the_old_backing_and_the_view() {
    use cowshed::engine::fault::Plan;
    use cowshed::engine::{rebase, Cancel, Error, Format, Progress, RebaseOptions};
    let w = Work::new("cancel");
    w.create("A.qcow2", "qcow2", "", None, 64 * MIB);
    w.io("qcow2", "A.qcow2", &["write -P 0x0a 0 64M".into()]);
    w.create("B.qcow2", "qcow2", "", None, 64 * MIB);
    w.create(
        "top.qcow2",
        "qcow2",
        "",
        Some(("A.qcow2", "qcow2")),
        64 * MIB,
    );
    w.copy("top.qcow2", "orig.qcow2");
    for (label, backing) in [("rebase", "B.qcow2"), ("flatten", "")] {
        w.copy("orig.qcow2", "top.qcow2");
        let progress = Progress::new();
        let cancel = Cancel::new();
        let opts = RebaseOptions {
            backing: backing.into(),
            backing_format: Some(Format::Qcow2),
            unsafe_header_only: false,
            ..Default::default()
        };
        // Held after the differences of its second chunk are written,
        // while the cancel is requested.
        let plan = Plan::new().pause_at("rebase.copied", 2);
        let result = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let _faults = plan.enter();
                rebase(&w.path("top.qcow2"), &opts, &progress, &cancel)
            });
            let paused = plan.wait_paused(common::fault::HANG_GUARD);
            cancel.cancel();
            plan.release();
            let r = h.join().unwrap();
            assert!(paused.is_some(), "{label}: never paused: {r:?}");
            r
        });
        assert!(
            matches!(result, Err(Error::Cancelled)),
            "{label}: {result:?}"
        );
        // Seen before the next chunk is walked; chunks the reader thread
        // compared meanwhile are still written (three buffers: at most
        // three more).
        let copied = plan.hits("rebase.copied");
        assert!((2..=5).contains(&copied), "{label}: {copied} chunks copied");
        assert_eq!(plan.hits("rebase.before_header_switch"), 0, "{label}");
        assert_eq!(w.check_code("top.qcow2"), 0, "{label}");
        w.same_view("top.qcow2", "orig.qcow2").unwrap();
        let info: Value = w.info_json("top.qcow2");
        assert_eq!(info["backing-filename"], "A.qcow2", "{label}");
        assert!(
            progress.snapshot().0 < 64 * MIB,
            "{label}: finished before the cancel"
        );
    }
}

#[test]
fn help_explains_safe_unsafe_and_flatten() {
    let w = Work::new("help");
    let r = w.cowshed(&["rebase", "--help"]);
    assert!(r.ok(), "{r}");
    for want in ["Safe mode", "Unsafe mode (-u)", "-b \"\"", "-F is required"] {
        assert!(
            r.stdout.contains(want),
            "--help lacks `{want}`:\n{}",
            r.stdout
        );
    }
}
