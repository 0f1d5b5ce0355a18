//! `cowshed resize` against `qemu-img resize`: each case is built once by
//! qemu-img/qemu-io, copied, and resized by both tools with the same
//! arguments. Then: the same exit code; `qemu-img info` equal but for the
//! file name and allocation; `qemu-img compare` identical (the guest view);
//! `qemu-img check` clean without leaks; internal snapshots read the same
//! afterwards; refusals leave the file byte-identical. Kills at every
//! fault point of a shrink leave an image qemu-img finds clean.

mod common;

use common::fault;
use common::{Failures, Work};
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Case {
    name: &'static str,
    build: fn(&Work),
    /// Arguments after `resize` (FILE is `img`, replaced per tool).
    steps: &'static [&'static [&'static str]],
    /// Snapshots whose views must match afterwards.
    snapshots: &'static [&'static str],
}

fn io(w: &Work, file: &str, cmds: &[&str]) {
    w.io(
        "qcow2",
        file,
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

const CASES: &[Case] = &[
    Case {
        name: "grow-within-l1",
        build: |w| {
            w.create("img", "qcow2", "", None, 16 * MIB);
            io(w, "img", &["write -P 1 0 1M", "write -P 2 15M 1M"]);
        },
        steps: &[&["img", "+1M"], &["img", "100M"]],
        snapshots: &[],
    },
    Case {
        name: "grow-l1",
        build: |w| {
            w.create("img", "qcow2", "", None, 16 * MIB);
            io(w, "img", &["write -P 1 0 1M"]);
        },
        steps: &[&["img", "+1G"], &["img", "+100G"]],
        snapshots: &[],
    },
    Case {
        name: "shrink-inside-and-across-l2-tables",
        build: |w| {
            w.create("img", "qcow2", "", None, 1536 * MIB);
            io(
                w,
                "img",
                &[
                    "write -P 1 0 1M",
                    "write -P 2 600M 2M",
                    "write -P 3 1200M 1M",
                    "write -z 1500M 1M",
                ],
            );
        },
        steps: &[
            &["--shrink", "img", "601M"],
            &["--shrink", "img", "600.5M"],
            &["--shrink", "img", "-100M"],
            &["img", "+1G"],
        ],
        snapshots: &[],
    },
    Case {
        name: "snapshots",
        build: |w| {
            w.create("img", "qcow2", "", None, 64 * MIB);
            io(w, "img", &["write -P 1 0 64M"]);
            w.qemu_img(&["snapshot", "-c", "s1", "img"]);
            io(w, "img", &["write -P 2 8M 8M", "write -P 3 40M 1M"]);
        },
        steps: &[&["--shrink", "img", "20M"], &["img", "+1G"]],
        snapshots: &["s1"],
    },
    Case {
        name: "v2-with-snapshots",
        build: |w| {
            w.create("img", "qcow2", "compat=0.10", None, 16 * MIB);
            io(w, "img", &["write -P 1 0 1M"]);
            w.qemu_img(&["snapshot", "-c", "s1", "img"]);
        },
        // qemu-img refuses both; nothing changes.
        steps: &[&["img", "+1M"], &["--shrink", "img", "8M"]],
        snapshots: &["s1"],
    },
    Case {
        name: "cluster-sizes",
        build: |w| {
            w.create("img", "qcow2", "cluster_size=512", None, 8 * MIB);
            io(w, "img", &["write -P 1 0 8M"]);
            w.create(
                "big",
                "qcow2",
                "cluster_size=2M,extended_l2=on",
                None,
                64 * MIB,
            );
            io(w, "big", &["write -P 1 1M 4k", "write -P 2 30M 8M"]);
        },
        steps: &[
            &["--shrink", "img", "3M"],
            &["img", "+64M"],
            &["--shrink", "big", "31M"],
            &["big", "+1G"],
        ],
        snapshots: &[],
    },
    Case {
        name: "overlay-larger-than-its-backing",
        build: |w| {
            w.create("base", "qcow2", "", None, 8 * MIB);
            io(w, "base", &["write -P 1 0 8M"]);
            w.qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img",
            ]);
            io(w, "img", &["write -P 2 1M 1M"]);
        },
        steps: &[&["img", "+8M"], &["--shrink", "img", "4M"], &["img", "32M"]],
        snapshots: &[],
    },
    Case {
        name: "v2-overlay-cannot-hide-its-backing",
        build: |w| {
            w.create("base", "qcow2", "compat=0.10", None, 8 * MIB);
            io(w, "base", &["write -P 1 0 8M"]);
            w.qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base",
                "-F",
                "qcow2",
                "img",
                "4M",
            ]);
        },
        // qemu-img fails on the first, grows the second (the backing is
        // then no longer past the old end).
        steps: &[&["img", "32M"], &["img", "+4M"], &["img", "+4M"]],
        snapshots: &[],
    },
    Case {
        name: "raw",
        build: |w| {
            w.create("img", "raw", "", None, 8 * MIB);
            w.run("sh", &["-c", "head -c 65536 /dev/urandom | dd of=img bs=64k seek=100 conv=notrunc status=none"]);
        },
        steps: &[
            &["-f", "raw", "img", "+8M"],
            &["--shrink", "img", "4M"],
            &["img", "-1M"],
            &["img", "1000001"],
        ],
        snapshots: &[],
    },
];

fn info(w: &Work, file: &str) -> Value {
    let r = w.qemu_img(&["info", "--output", "json", file]);
    let mut v = w.json(&r);
    for key in ["filename", "actual-size", "dirty-flag"] {
        v.as_object_mut().unwrap().remove(key);
    }
    if let Some(c) = v.pointer_mut("/children") {
        *c = Value::Null;
    }
    v
}

#[test]
fn resize_agrees_with_qemu_img() {
    for case in CASES {
        let w = Work::new(case.name);
        (case.build)(&w);
        let mut f = Failures::new(case.name);
        for file in ["img", "big", "base"] {
            if w.path(file).exists() && file != "base" {
                std::fs::copy(w.path(file), w.path(&format!("{file}.q"))).unwrap();
            }
        }
        for step in case.steps {
            let file = step.iter().find(|a| **a == "img" || **a == "big").unwrap();
            let ours: Vec<&str> = std::iter::once("resize")
                .chain(step.iter().copied())
                .collect();
            let theirs_file = format!("{file}.q");
            let theirs: Vec<&str> = ours
                .iter()
                .map(|a| if a == file { theirs_file.as_str() } else { a })
                .collect();
            let before = w.read_file(file);
            let q = w.qemu_img_may_fail(&theirs);
            let c = w.cowshed(&ours);
            let what = ours.join(" ");
            f.check(q.code == c.code, &what, || {
                format!("exit codes differ\n{q}\n{c}")
            });
            if !c.ok() {
                f.check(w.read_file(file) == before, &what, || {
                    "a refusal changed the file".into()
                });
                continue;
            }
            f.check(c.stdout == q.stdout, &what, || format!("{q}\n{c}"));
            let (a, b) = (info(&w, file), info(&w, &theirs_file));
            f.check(a == b, &what, || {
                format!("qemu-img info differs:\nours {a:#}\nqemu {b:#}")
            });
            let cmp = w.qemu_img_may_fail(&["compare", file, &theirs_file]);
            f.check(cmp.ok(), &what, || format!("guest views differ: {cmp}"));
            let chk = w.qemu_img_may_fail(&["check", file]);
            // Raw images have no check (63).
            let raw = w.json(&w.qemu_img(&["info", "--output", "json", file]))["format"] == "raw";
            let clean = if raw { chk.code == Some(63) } else { chk.ok() };
            f.check(clean, &what, || format!("qemu-img check: {chk}"));
            for snap in case.snapshots {
                let view = |img: &str, out: &str| {
                    let opt = format!("snapshot.name={snap}");
                    w.qemu_img(&["convert", "-O", "raw", "-l", &opt, img, out]);
                };
                view(file, "ours.snap");
                view(&theirs_file, "theirs.snap");
                let same = w.read_file("ours.snap") == w.read_file("theirs.snap");
                f.check(same, &what, || format!("snapshot {snap} reads differently"));
            }
        }
        f.finish();
    }
}

#[test]
fn refusals_leave_the_file_byte_identical() {
    let w = Work::new("resize-refusals");
    w.create("img", "qcow2", "", None, 16 * MIB);
    io(&w, "img", &["write -P 1 0 16M"]);
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "img", "-F", "qcow2", "ov",
    ]);
    w.create("bm", "qcow2", "", None, 16 * MIB);
    w.qemu_img(&["bitmap", "--add", "bm", "b0"]);
    let before = w.read_file("img");
    let bm_before = w.read_file("bm");
    for (args, says) in [
        (&["resize", "img", "8M"][..], "--shrink"),
        (&["resize", "img", "-1M"], "--shrink"),
        (&["resize", "img", "+1"], "multiple of 512"),
        // Beyond qemu-img: a base is not shrunk under its overlays.
        (&["resize", "--shrink", "img", "8M"], "'ov'"),
    ] {
        let r = w.cowshed(args);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.stderr.contains(says), "{r}");
        assert_eq!(w.read_file("img"), before, "{args:?} changed the image");
    }
    let r = w.cowshed(&["resize", "bm", "+1M"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("bitmaps"), "{r}");
    assert_eq!(w.read_file("bm"), bm_before);
    // --force shrinks the base anyway; the overlay then reads zeros past it.
    let r = w.cowshed(&["resize", "--shrink", "--force", "img", "8M"]);
    assert!(r.ok(), "{r}");
}

#[test]
fn an_image_a_qemu_holds_is_not_resized() {
    let w = Work::new("resize-held");
    w.create("img", "qcow2", "", None, 16 * MIB);
    w.create("raw", "raw", "", None, 16 * MIB);
    for (file, fmt) in [("img", "qcow2"), ("raw", "raw")] {
        let holder = w.hold_writer(file, fmt);
        let before = w.read_file(file);
        let r = w.cowshed(&["resize", file, "+1M"]);
        common::release_holder(holder);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(
            r.stderr.contains("lock") && r.stderr.contains("qemu-io"),
            "{r}"
        );
        assert_eq!(w.read_file(file), before);
    }
}

#[test]
fn a_killed_shrink_leaves_a_clean_image() {
    let w = Work::new("resize-kill");
    // 4 KiB clusters: an L2 table covers 2 MiB, so the shrink drops whole
    // tables as well as entries in the one it cuts.
    w.create("orig", "qcow2", "cluster_size=4096", None, 24 * MIB);
    io(
        &w,
        "orig",
        &["write -P 1 0 1M", "write -P 2 9M 2M", "write -P 3 18M 1M"],
    );
    w.qemu_img(&["convert", "-O", "raw", "orig", "orig.raw"]);
    std::fs::copy(w.path("orig"), w.path("img")).unwrap();
    let args = ["resize", "--shrink", "img", "10M"];
    let trace = fault::trace(w.root(), &args);
    let chosen = fault::choose(&trace, 4);
    assert!(
        chosen.iter().any(|(p, _)| p == "writer.shrink.l1_cut"),
        "{chosen:?}"
    );
    for (point, hit) in &chosen {
        std::fs::copy(w.path("orig"), w.path("img")).unwrap();
        fault::kill_at(w.root(), &args, point, *hit);
        let what = format!("killed at {point} #{hit}");
        let chk = w.qemu_img_may_fail(&["check", "img"]);
        // Leaks are allowed after a kill; corruption is not.
        assert!(matches!(chk.code, Some(0 | 3)), "{what}: {chk}");
        // The first 10 MiB read as before, whichever size the header has.
        let size = w.json(&w.qemu_img(&["info", "--output", "json", "img"]))["virtual-size"]
            .as_u64()
            .unwrap();
        assert!(size == 10 * MIB || size == 24 * MIB, "{what}: size {size}");
        w.qemu_img(&["convert", "-O", "raw", "img", "img.raw"]);
        let (a, b) = (w.read_file("img.raw"), w.read_file("orig.raw"));
        let n = (10 * MIB) as usize;
        assert!(a[..n] == b[..n], "{what}: the kept part changed");
        // Past it, only zeros or the old data.
        assert!(
            a[n..].iter().zip(&b[n..]).all(|(x, y)| *x == 0 || x == y),
            "{what}: stale bytes past the new end"
        );
        // Running it again finishes the shrink (leaks stay: `check -r leaks`).
        let again = w.cowshed(&args);
        assert!(again.ok(), "{what}: re-run {again}");
        let chk = w.qemu_img_may_fail(&["check", "img"]);
        assert!(
            matches!(chk.code, Some(0 | 3)),
            "{what}: after the re-run {chk}"
        );
        let size = w.json(&w.qemu_img(&["info", "--output", "json", "img"]))["virtual-size"]
            .as_u64()
            .unwrap();
        assert_eq!(size, 10 * MIB, "{what}");
    }
}
