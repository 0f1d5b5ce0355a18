//! `cowshed compare` against `qemu-img compare`: for each pair of images
//! built by qemu-img and qemu-io, both tools run with and without `-s`, and
//! their stdout and exit codes must be equal (same verdict, same offset,
//! same warning).

mod common;

use common::{Failures, Work};

const MIB: u64 = 1 << 20;

/// One scenario: a recipe run in a fresh directory, then the pairs to
/// compare (paths relative to it, with optional -f/-F).
struct Case {
    name: &'static str,
    build: fn(&Work),
    pairs: &'static [&'static [&'static str]],
}

fn io(w: &Work, fmt: &str, file: &str, cmds: &[&str]) {
    w.io(
        fmt,
        file,
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

fn overlay(w: &Work, file: &str, backing: &str) {
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", file,
    ]);
}

fn qcow2(w: &Work, file: &str, size: u64) {
    w.create(file, "qcow2", "", None, size);
}

const CASES: &[Case] = &[
    Case {
        name: "same-data-different-layout",
        build: |w| {
            qcow2(w, "a.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "a.qcow2",
                &["write -P 7 0 64k", "write -P 9 5M 1M"],
            );
            qcow2(w, "b.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "b.qcow2",
                &["write -P 9 5M 1M", "write -P 7 0 64k"],
            );
            w.qemu_img(&["convert", "-O", "raw", "a.qcow2", "a.raw"]);
            w.qemu_img(&["convert", "-c", "-O", "qcow2", "a.qcow2", "a-z.qcow2"]);
            w.qemu_img(&[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "a.qcow2",
                "a-4k.qcow2",
            ]);
        },
        pairs: &[
            &["a.qcow2", "b.qcow2"],
            &["a.qcow2", "a.raw"],
            &["a.raw", "a.qcow2"],
            &["a.qcow2", "a-z.qcow2"],
            &["a-4k.qcow2", "a-z.qcow2"],
            &["-f", "qcow2", "-F", "raw", "a.qcow2", "a.raw"],
        ],
    },
    Case {
        name: "zero-clusters-and-holes",
        build: |w| {
            qcow2(w, "a.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "a.qcow2",
                &["write -P 7 0 64k", "write -z 1M 64k", "write -P 0 3M 64k"],
            );
            qcow2(w, "b.qcow2", 16 * MIB);
            io(w, "qcow2", "b.qcow2", &["write -P 7 0 64k"]);
        },
        pairs: &[&["a.qcow2", "b.qcow2"], &["b.qcow2", "a.qcow2"]],
    },
    Case {
        name: "one-byte-differs",
        build: |w| {
            qcow2(w, "a.qcow2", 16 * MIB);
            io(w, "qcow2", "a.qcow2", &["write -P 7 0 1M"]);
            qcow2(w, "data.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "data.qcow2",
                &["write -P 7 0 1M", "write -P 8 4097 1"],
            );
            // The differing byte where only one side allocates.
            qcow2(w, "tail.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "tail.qcow2",
                &["write -P 7 0 1M", "write -P 1 2100003 1"],
            );
            qcow2(w, "zero-byte.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "zero-byte.qcow2",
                &["write -P 7 0 1M", "write -P 0 2M 64k"],
            );
        },
        pairs: &[
            &["a.qcow2", "data.qcow2"],
            &["data.qcow2", "a.qcow2"],
            &["a.qcow2", "tail.qcow2"],
            &["tail.qcow2", "a.qcow2"],
            &["a.qcow2", "zero-byte.qcow2"],
        ],
    },
    Case {
        name: "sizes-differ",
        build: |w| {
            qcow2(w, "a.qcow2", 16 * MIB);
            io(w, "qcow2", "a.qcow2", &["write -P 7 0 64k"]);
            qcow2(w, "long.qcow2", 32 * MIB);
            io(
                w,
                "qcow2",
                "long.qcow2",
                &["write -P 7 0 64k", "write -z 20M 64k"],
            );
            qcow2(w, "long-data.qcow2", 32 * MIB);
            io(
                w,
                "qcow2",
                "long-data.qcow2",
                &["write -P 7 0 64k", "write -P 1 20M 512"],
            );
            qcow2(w, "long-diff.qcow2", 32 * MIB);
            io(
                w,
                "qcow2",
                "long-diff.qcow2",
                &["write -P 6 0 64k", "write -P 1 20M 512"],
            );
            w.create("short.raw", "raw", "", None, 3 * MIB + 512);
        },
        pairs: &[
            &["a.qcow2", "long.qcow2"],
            &["long.qcow2", "a.qcow2"],
            &["a.qcow2", "long-data.qcow2"],
            &["long-data.qcow2", "a.qcow2"],
            &["a.qcow2", "long-diff.qcow2"],
            &["short.raw", "long.qcow2"],
        ],
    },
    Case {
        name: "overlays-and-chains",
        build: |w| {
            qcow2(w, "base.qcow2", 16 * MIB);
            io(
                w,
                "qcow2",
                "base.qcow2",
                &["write -P 1 0 8M", "write -P 2 12M 64k"],
            );
            overlay(w, "ov.qcow2", "base.qcow2");
            overlay(w, "ov2.qcow2", "ov.qcow2");
            overlay(w, "dirty.qcow2", "base.qcow2");
            io(w, "qcow2", "dirty.qcow2", &["write -P 3 6M 4k"]);
            overlay(w, "same.qcow2", "base.qcow2");
            io(w, "qcow2", "same.qcow2", &["write -P 1 6M 4k"]);
            w.qemu_img(&["convert", "-O", "qcow2", "dirty.qcow2", "flat.qcow2"]);
            // An overlay larger than its backing reads zeros past its end.
            w.create(
                "big.qcow2",
                "qcow2",
                "",
                Some(("base.qcow2", "qcow2")),
                24 * MIB,
            );
        },
        pairs: &[
            &["ov.qcow2", "base.qcow2"],
            &["ov2.qcow2", "base.qcow2"],
            &["dirty.qcow2", "base.qcow2"],
            &["base.qcow2", "dirty.qcow2"],
            &["same.qcow2", "base.qcow2"],
            &["dirty.qcow2", "flat.qcow2"],
            &["big.qcow2", "base.qcow2"],
            &["big.qcow2", "ov2.qcow2"],
        ],
    },
    Case {
        name: "cluster-sizes-and-extended-l2",
        build: |w| {
            w.create("a.qcow2", "qcow2", "cluster_size=2097152", None, 16 * MIB);
            io(
                w,
                "qcow2",
                "a.qcow2",
                &["write -P 5 1M 4k", "write -z 8M 2M"],
            );
            w.create("b.qcow2", "qcow2", "cluster_size=512", None, 16 * MIB);
            io(w, "qcow2", "b.qcow2", &["write -P 5 1M 4k"]);
            w.create("x.qcow2", "qcow2", "extended_l2=on", None, 16 * MIB);
            io(
                w,
                "qcow2",
                "x.qcow2",
                &["write -P 5 1M 4k", "write -z 8M 2M"],
            );
            w.create("empty.qcow2", "qcow2", "", None, 16 * MIB);
            w.create("empty.raw", "raw", "", None, 16 * MIB);
        },
        pairs: &[
            &["a.qcow2", "b.qcow2"],
            &["a.qcow2", "x.qcow2"],
            &["x.qcow2", "b.qcow2"],
            &["empty.qcow2", "empty.raw"],
            &["empty.raw", "a.qcow2"],
        ],
    },
];

#[test]
fn compare_agrees_with_qemu_img() {
    for case in CASES {
        let w = Work::new(case.name);
        (case.build)(&w);
        let mut f = Failures::new(case.name);
        for pair in case.pairs {
            for strict in [false, true] {
                let mut args = vec!["compare"];
                if strict {
                    args.push("-s");
                }
                args.extend(pair.iter());
                let q = w.qemu_img_may_fail(&args);
                let c = w.cowshed(&args);
                f.check(
                    q.code == c.code && q.stdout == c.stdout,
                    &args.join(" "),
                    || format!("qemu-img:\n{q}\ncowshed:\n{c}"),
                );
                // Quiet: the same exit code, nothing printed.
                let mut quiet = args.clone();
                quiet.insert(1, "-q");
                let cq = w.cowshed(&quiet);
                f.check(
                    cq.code == q.code && cq.stdout.is_empty(),
                    &quiet.join(" "),
                    || format!("{cq}"),
                );
            }
        }
        f.finish();
    }
}

#[test]
fn open_failures_exit_2_as_qemu_img_does() {
    let w = Work::new("compare-open");
    qcow2(&w, "a.qcow2", MIB);
    w.create("a.raw", "raw", "", None, MIB);
    for args in [
        &["compare", "a.qcow2", "missing.qcow2"][..],
        &["compare", "-f", "qcow2", "a.raw", "a.qcow2"],
        &["compare", "-F", "qcow2", "a.qcow2", "a.raw"],
    ] {
        let q = w.qemu_img_may_fail(args);
        let c = w.cowshed(args);
        assert_eq!(q.code, Some(2), "{q}");
        assert_eq!(c.code, q.code, "{c}");
        let named = if args.contains(&"missing.qcow2") {
            "missing.qcow2"
        } else {
            "a.raw"
        };
        assert!(c.stderr.contains(named), "{c}");
    }
}

#[test]
fn progress_goes_to_stderr_and_the_verdict_to_stdout() {
    let w = Work::new("compare-progress");
    qcow2(&w, "a.qcow2", 16 * MIB);
    io(&w, "qcow2", "a.qcow2", &["write -P 7 0 4M"]);
    w.qemu_img(&["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    let c = w.cowshed(&["compare", "-p", "a.qcow2", "a.raw"]);
    assert_eq!(c.code, Some(0), "{c}");
    assert_eq!(c.stdout, "Images are identical.\n", "{c}");
    assert!(c.stderr.contains("100.00/100%"), "{c}");
}
