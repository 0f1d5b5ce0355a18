//! `cowshed bitmap` against `qemu-img bitmap`. Each variant (cluster
//! sizes, refcount widths, extended L2, an overlay, a disk large enough
//! for several bitmap data clusters) runs one sequence of adds, removes,
//! clears, enables and disables twice: on `img`, where cowshed and
//! qemu-img take turns (each changes bitmaps the other made, with guest
//! writes in between that QEMU records), and on `ref`, where qemu-img does
//! everything. After every step: `qemu-img check` finds `img` clean (no
//! leaks either), `qemu-img info` lists the same bitmaps for both (and
//! `cowshed info` agrees), the same bitmaps hold data, and both read the
//! same. Then refusals where qemu-img refuses (same exit code, same
//! message, the file byte-identical), the order of several actions, and
//! kills at every fault point leaving the bitmaps as before or as after.

mod common;

use common::fault;
use common::{Work, MIB};
use serde_json::Value;

use common::bitmaps::{dirty_by_qemu, holding_data, holding_data_at, listed, mark_in_use};
use cowshed::engine::qcow2::bitmap::read_directory;
use cowshed::engine::qcow2::Header;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Cowshed,
    Qemu,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// `bitmap ARGS NAME` by a tool (on `ref` always by qemu-img).
    Op(Tool, &'static [&'static str], &'static str),
    /// qemu-io writes, recorded in the enabled bitmaps of both images.
    Write(&'static [&'static str]),
}

use Step::{Op, Write};
use Tool::{Cowshed as C, Qemu as Q};

const STEPS: &[Step] = &[
    Op(C, &["--add"], "b1"),
    Op(Q, &["--add", "-g", "512"], "b2"),
    Op(C, &["--add", "-g", "1M", "--disable"], "b3"),
    Write(&["write -P 1 0 1M", "write -P 2 5M 64k"]),
    Op(C, &["--disable"], "b1"),
    Op(Q, &["--enable"], "b3"),
    Write(&["write -P 3 2M 512k"]),
    Op(C, &["--clear"], "b2"),
    Op(C, &["--enable"], "b1"),
    Op(Q, &["--add"], "b4"),
    Write(&["write -P 4 7M 1M"]),
    Op(C, &["--remove"], "b3"),
    Op(Q, &["--clear"], "b1"),
    Op(C, &["--remove"], "b4"),
    Op(Q, &["--remove"], "b1"),
    Op(C, &["--remove"], "b2"),
    Op(C, &["--add", "--disable"], "last"),
];

struct Variant {
    name: &'static str,
    opts: &'static str,
    size: u64,
    overlay: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "64k",
        opts: "",
        size: 8 * MIB,
        overlay: false,
    },
    Variant {
        name: "512b-clusters",
        opts: "cluster_size=512",
        size: 8 * MIB,
        overlay: false,
    },
    Variant {
        // One 4 KiB bitmap cluster covers 16 MiB at granularity 512:
        // several table entries and data clusters.
        name: "4k-clusters-large",
        opts: "cluster_size=4096,refcount_bits=1",
        size: 64 * MIB,
        overlay: false,
    },
    Variant {
        name: "2m-extended-l2",
        opts: "cluster_size=2M,extended_l2=on",
        size: 8 * MIB,
        overlay: false,
    },
    Variant {
        name: "overlay",
        opts: "refcount_bits=64",
        size: 8 * MIB,
        overlay: true,
    },
];

fn bitmap(w: &Work, tool: Tool, args: &[&str], name: &str, img: &str) {
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    all.extend([img, name]);
    match tool {
        Tool::Cowshed => {
            let r = w.cowshed(&all);
            assert!(r.ok(), "{r}");
        }
        Tool::Qemu => {
            w.qemu_img(&all);
        }
    }
}

#[test]
fn both_tools_take_turns_and_agree_with_qemu() {
    for v in VARIANTS {
        let w = Work::new(&format!("bitmap-{}", v.name));
        if v.overlay {
            w.create("base", "qcow2", "", None, v.size);
            w.io("qcow2", "base", &["write -P 9 0 3M".to_string()]);
            w.create("img", "qcow2", v.opts, Some(("base", "qcow2")), v.size);
        } else {
            w.create("img", "qcow2", v.opts, None, v.size);
        }
        w.copy("img", "ref");
        for (i, step) in STEPS.iter().enumerate() {
            let what = format!("[{}] step {i} {step:?}", v.name);
            match *step {
                Op(tool, args, name) => {
                    bitmap(&w, tool, args, name, "img");
                    bitmap(&w, Tool::Qemu, args, name, "ref");
                }
                Write(cmds) => {
                    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
                    w.io("qcow2", "img", &cmds);
                    w.io("qcow2", "ref", &cmds);
                }
            }
            if let Err(e) = w.check_clean("img") {
                panic!("{what}: {e}");
            }
            assert_eq!(listed(&w, "img"), listed(&w, "ref"), "{what}");
            assert_eq!(holding_data(&w, "img"), holding_data(&w, "ref"), "{what}");
            let ours = w.cowshed(&["info", "--output", "json", "img"]);
            assert!(ours.ok(), "{what}: {ours}");
            let ours = w.json(&ours);
            assert_eq!(
                ours["format-specific"]["data"]
                    .get("bitmaps")
                    .cloned()
                    .unwrap_or(Value::Array(Vec::new())),
                listed(&w, "ref"),
                "{what}: cowshed info"
            );
            w.same_view("img", "ref")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        // After the last remove the extension and its autoclear bit go,
        // as qemu-img leaves them; "last" was added again since.
        assert_eq!(listed(&w, "img").as_array().map(Vec::len), Some(1));
    }
}

/// `--merge` into each bitmap from each other (granularities 512, the
/// default and 1 MiB, one disabled), several at once, and from another
/// image: cowshed on one copy, qemu-img on another; the same exit code,
/// `qemu-img check` clean, the same bitmaps listed, and every bitmap's
/// dirty ranges as QEMU reads them the same.
#[test]
fn merge_agrees_with_qemu_img() {
    for (opts, size) in [("cluster_size=4096", 40 * MIB), ("", 8 * MIB)] {
        let w = Work::new("bitmap-merge");
        w.create("img", "qcow2", opts, None, size);
        w.qemu_img(&["bitmap", "--add", "img", "d"]);
        w.qemu_img(&["bitmap", "--add", "-g", "512", "img", "fine"]);
        w.qemu_img(&["bitmap", "--add", "-g", "1M", "--disable", "img", "coarse"]);
        let writes = |cmds: &[&str]| {
            let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
            w.io("qcow2", "img", &cmds);
        };
        writes(&["write 1000 10", "write 3M 600k", "write 6M 100k"]);
        w.qemu_img(&["bitmap", "--clear", "img", "d"]);
        w.qemu_img(&["bitmap", "--enable", "img", "coarse"]);
        writes(&["write 7M 513", "write 5M 4k"]);
        w.create("other", "qcow2", "", None, size);
        w.qemu_img(&["bitmap", "--add", "-g", "2M", "other", "o"]);
        w.io("qcow2", "other", &["write 1M 1".to_string()]);
        let cases: [&[&str]; 6] = [
            &["--merge", "fine"],
            &["--merge", "coarse"],
            &["--merge", "d"],
            &["--merge", "fine", "--merge", "coarse"],
            &["--merge", "o", "-b", "other"],
            &["--merge", "o", "-b", "other", "-F", "qcow2", "--disable"],
        ];
        for case in cases {
            for dst in ["d", "fine", "coarse"] {
                let what = format!("[{opts}] {case:?} into {dst}");
                w.copy("img", "x");
                w.copy("img", "y");
                let args = |img: &'static str| {
                    let mut a = vec!["bitmap"];
                    a.extend_from_slice(case);
                    a.extend([img, dst]);
                    a
                };
                let r = w.cowshed(&args("x"));
                let q = w.qemu_img(&args("y"));
                assert_eq!(r.code, q.code, "{what}: {r}");
                if let Err(e) = w.check_clean("x") {
                    panic!("{what}: {e}");
                }
                assert_eq!(listed(&w, "x"), listed(&w, "y"), "{what}");
                assert_eq!(holding_data(&w, "x"), holding_data(&w, "y"), "{what}");
                let merged = dirty_by_qemu(&w, "y", dst);
                assert!(!merged.is_empty(), "{what}: nothing dirty");
                assert_eq!(dirty_by_qemu(&w, "x", dst), merged, "{what}");
                w.same_view("x", "y")
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }
}

/// `--merge`'s refusals, as qemu-img's: the file byte-identical.
#[test]
fn merge_refusals_match_qemu_img() {
    let w = Work::new("bitmap-merge-refusals");
    w.create("img", "qcow2", "", None, 4 * MIB);
    w.qemu_img(&["bitmap", "--add", "img", "have"]);
    w.qemu_img(&["bitmap", "--add", "img", "broken"]);
    mark_in_use(&w, "img", "broken");
    w.create("bigger", "qcow2", "", None, 8 * MIB);
    w.qemu_img(&["bitmap", "--add", "bigger", "have"]);
    w.create("disk.raw", "raw", "", None, 4 * MIB);
    let cases: [&[&str]; 11] = [
        &["--merge", "missing"],
        &["--merge", ""],
        &["--merge", "broken"],
        &["--merge", "have", "-b", "bigger"],
        &["--merge", "have", "-b", "disk.raw"],
        &["--merge", "have", "-b", "bigger", "-F", "raw"],
        &["-F", "qcow2", "--merge", "have"],
        &["-b", "bigger", "--add"],
        &["--merge", "have", "--merge", "missing"],
        &["--disable", "--merge", "broken"],
        &["--merge", "have", "-b", "nofile"],
    ];
    let before = w.read_file("img");
    for (case, dst) in cases
        .iter()
        .flat_map(|c| [(c, "have"), (c, "broken"), (c, "missing")])
    {
        w.copy("img", "a");
        w.copy("img", "b");
        let args = |img: &'static str| {
            let mut a = vec!["bitmap"];
            a.extend_from_slice(case);
            a.extend([img, dst]);
            a
        };
        let r = w.cowshed(&args("a"));
        let q = w.qemu_img_may_fail(&args("b"));
        let what = format!("{case:?} into {dst}");
        assert_eq!(r.code, q.code, "{what}: {r}\nqemu-img: {q}");
        if q.code == Some(0) {
            // `--merge have` into "have": done by both, the same.
            assert_eq!(listed(&w, "a"), listed(&w, "b"), "{what}");
            continue;
        }
        let qline = qemu_message(&q);
        let qline = node_named(qline.lines().next().unwrap_or(""), "a");
        // "Could not open 'nofile': ..." is said in cowshed's words.
        let expected = if qline.starts_with("Could not open") {
            "nofile".to_string()
        } else {
            qline
        };
        assert!(r.stderr.contains(&expected), "{what}: {r}\nqemu-img: {q}");
        assert_eq!(listed(&w, "a"), listed(&w, "b"), "{what}");
        // What a refused first action leaves: the file as it was (a
        // merge done before a refused one stays, as in qemu-img).
        if case.iter().filter(|a| a.starts_with("--")).count() == 1 {
            assert!(w.read_file("a") == before, "{what} wrote");
        }
    }
    // The image itself named as the source file: its own write lock
    // refuses the read-only open, as in qemu-img.
    let r = w.cowshed(&["bitmap", "--merge", "have", "-b", "img", "img", "have"]);
    assert!(w.read_file("img") == before, "the refused merge wrote");
    let q = w.qemu_img_may_fail(&["bitmap", "--merge", "have", "-b", "b", "b", "have"]);
    assert_eq!((r.code, q.code), (Some(1), Some(1)), "{r} / {q}");
    let lock = "Failed to get shared \"write\" lock";
    assert!(q.stderr.contains(lock), "{q}");
    assert!(r.stderr.contains(lock), "{r}");
}

/// The autoclear features word (header bytes 88..96).
fn autoclear(w: &Work, img: &str) -> u64 {
    let b = w.read_file(img);
    u64::from_be_bytes(b[88..96].try_into().unwrap())
}

#[test]
fn removing_the_last_bitmap_drops_the_extension_as_qemu_does() {
    let w = Work::new("bitmap-last");
    w.create("img", "qcow2", "", None, 4 * MIB);
    w.copy("img", "ref");
    for img in ["img", "ref"] {
        w.qemu_img(&["bitmap", "--add", img, "x"]);
    }
    assert_eq!(autoclear(&w, "img"), 1);
    bitmap(&w, Tool::Cowshed, &["--remove"], "x", "img");
    bitmap(&w, Tool::Qemu, &["--remove"], "x", "ref");
    assert_eq!(autoclear(&w, "img"), autoclear(&w, "ref"));
    assert_eq!(listed(&w, "img"), listed(&w, "ref"));
    w.check_clean("img").unwrap();
    // The header as qemu-img leaves it, no extension left behind; only
    // where the refcount table lies differs (cowshed moved it to a new
    // generation).
    let (a, b) = (w.read_file("img"), w.read_file("ref"));
    assert!(a[..48] == b[..48], "headers differ");
    assert!(a[60..4096] == b[60..4096], "header extensions differ");
}

/// Several actions run in the order given; the first that fails stops
/// the rest with what came before kept, as in qemu-img.
#[test]
fn several_actions_run_in_order() {
    let w = Work::new("bitmap-order");
    w.create("img", "qcow2", "", None, 4 * MIB);
    for args in [
        &["--add", "--disable"][..],
        &["--disable", "--add"],
        &["--add", "--clear", "--remove"],
        &["--add", "--add"],
    ] {
        w.copy("img", "a");
        w.copy("img", "b");
        let mut ours = vec!["bitmap"];
        ours.extend_from_slice(args);
        ours.extend(["a", "n"]);
        let mut theirs = vec!["bitmap"];
        theirs.extend_from_slice(args);
        theirs.extend(["b", "n"]);
        let r = w.cowshed(&ours);
        let q = w.qemu_img_may_fail(&theirs);
        assert_eq!(r.code, q.code, "{args:?}: {r} / {q}");
        assert_eq!(listed(&w, "a"), listed(&w, "b"), "{args:?}");
        w.check_clean("a").unwrap();
    }
}

/// `qemu-img`'s message without its program name.
fn qemu_message(r: &common::Run) -> String {
    r.stderr
        .trim_end()
        .strip_prefix("qemu-img: ")
        .unwrap_or(&r.stderr)
        .to_string()
}

#[test]
fn refusals_leave_the_file_byte_identical() {
    let w = Work::new("bitmap-refusals");
    w.create("img", "qcow2", "", None, 4 * MIB);
    w.qemu_img(&["bitmap", "--add", "img", "have"]);
    w.qemu_img(&["bitmap", "--add", "img", "broken"]);
    mark_in_use(&w, "img", "broken");
    let long = "x".repeat(1024);
    let cases: Vec<Vec<&str>> = vec![
        vec!["--add", "have"],
        vec!["--add", ""],
        vec!["--add", "-g", "1000", "n"],
        vec!["--add", "-g", "256", "n"],
        vec!["--add", "-g", "4G", "n"],
        vec!["--add", &long],
        vec!["--remove", "missing"],
        vec!["--clear", "missing"],
        vec!["--enable", "missing"],
        vec!["--disable", "missing"],
        vec!["--clear", "broken"],
        vec!["--enable", "broken"],
        vec!["--disable", "broken"],
        vec!["have"],
        vec!["--remove", "-g", "64k", "have"],
    ];
    let before = w.read_file("img");
    for case in &cases {
        let (flags, name) = case.split_at(case.len() - 1);
        let mut args = vec!["bitmap"];
        args.extend_from_slice(flags);
        args.extend(["img", name[0]]);
        let r = w.cowshed(&args);
        w.copy("img", "q");
        let mut qargs = args.clone();
        let n = qargs.len();
        qargs[n - 2] = "q";
        let q = w.qemu_img_may_fail(&qargs);
        assert_eq!(q.code, Some(1), "oracle {case:?}: {q}");
        assert_eq!(r.code, Some(1), "{case:?}: {r}");
        // The first line means the same (the hint on a second line is
        // about QMP in qemu-img).
        let qline = qemu_message(&q);
        let qline = node_named(qline.lines().next().unwrap_or(""), "img");
        assert!(
            r.stderr.contains(&qline),
            "{case:?}: {r}\nqemu-img: {qline}"
        );
        assert!(w.read_file("img") == before, "{case:?} wrote");
    }
    // An inconsistent bitmap can be removed, by both.
    w.copy("img", "q");
    bitmap(&w, Tool::Cowshed, &["--remove"], "broken", "img");
    bitmap(&w, Tool::Qemu, &["--remove"], "broken", "q");
    assert_eq!(listed(&w, "img"), listed(&w, "q"));
    w.check_clean("img").unwrap();

    // A QEMU holding the image: refused, naming the lock.
    // (QEMU marks the bitmaps in use when it opens the image: the file
    // is compared from then on.)
    let holder = w.hold_writer("img", "qcow2");
    // The lock is taken before the flags are written: wait for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !all_in_use(&w, "img") {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU never marked the bitmaps in use"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = w.read_file("img");
    let r = w.cowshed(&["bitmap", "--add", "img", "n"]);
    let after = w.read_file("img");
    common::release_holder(holder);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("Failed to get \"write\" lock"), "{r}");
    assert!(
        after == before,
        "a refused add wrote (first difference at {:?}, {} -> {} bytes)",
        common::first_difference(&before, &after),
        before.len(),
        after.len()
    );

    // Images that cannot store bitmaps, with qemu-img's reason.
    w.create("disk.raw", "raw", "", None, MIB);
    w.create("v2.qcow2", "qcow2", "compat=0.10", None, MIB);
    for (img, fmt) in [
        ("disk.raw", None),
        ("disk.raw", Some("raw")),
        ("v2.qcow2", None),
    ] {
        let before = w.read_file(img);
        let mut args = vec!["bitmap", "--add"];
        if let Some(f) = fmt {
            args.extend(["-f", f]);
        }
        args.extend([img, "n"]);
        let r = w.cowshed(&args);
        let q = w.qemu_img_may_fail(&args);
        assert_eq!((r.code, q.code), (Some(1), Some(1)), "{r} / {q}");
        let reason = qemu_message(&q);
        let reason = reason.rsplit(": ").next().unwrap_or("");
        assert!(r.stderr.contains(reason), "{r}\nqemu-img: {q}");
        assert!(w.read_file(img) == before, "{img} written");
    }
}

/// `line` with QEMU's node name ('#block123') replaced by the file name
/// cowshed says in its place.
fn node_named(line: &str, file: &str) -> String {
    match line.find("'#block") {
        Some(start) => {
            let end = line[start + 1..]
                .find('\'')
                .map_or(line.len(), |e| start + 2 + e);
            format!("{}'{file}'{}", &line[..start], &line[end..])
        }
        None => line.to_string(),
    }
}

/// Whether every bitmap of `img` is marked in use.
fn all_in_use(w: &Work, img: &str) -> bool {
    let path = w.path(img);
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let Ok(h) = Header::read(&file, &path, len) else {
        return false;
    };
    let Some(ext) = &h.extensions.bitmaps else {
        return false;
    };
    read_directory(&file, &path, ext).is_ok_and(|d| d.iter().all(|b| b.in_use()))
}

/// Killed at each fault point: `qemu-img check` finds the image clean (no
/// leaks either), and the bitmaps are as before the command or as after
/// it.
#[test]
fn kills_leave_the_bitmaps_as_before_or_after() {
    let w = Work::new("bitmap-kill");
    w.create("orig", "qcow2", "cluster_size=4096", None, 64 * MIB);
    w.qemu_img(&["bitmap", "--add", "-g", "512", "orig", "a"]);
    w.qemu_img(&["bitmap", "--add", "orig", "b"]);
    w.io(
        "qcow2",
        "orig",
        &[
            "write -P 1 0 1M".to_string(),
            "write -P 2 40M 64k".to_string(),
        ],
    );
    // Empty, so that merging into it changes what it holds.
    w.qemu_img(&["bitmap", "--add", "orig", "m"]);
    let ops: [&[&str]; 7] = [
        &["--merge", "a", "orig", "m"],
        &["--add", "-g", "4k", "orig", "c"],
        &["--remove", "orig", "a"],
        &["--clear", "orig", "a"],
        &["--disable", "orig", "b"],
        &["--add", "--disable", "orig", "d"],
        &["--remove", "orig", "b"],
    ];
    for op in ops {
        w.copy("orig", "img");
        let mut args = vec!["bitmap"];
        args.extend(op.iter().map(|a| if *a == "orig" { "img" } else { a }));
        let trace = fault::trace(w.root(), &args);
        let after = (listed(&w, "img"), holding_data(&w, "img"));
        w.copy("orig", "img");
        let before = (listed(&w, "img"), holding_data(&w, "img"));
        let chosen = fault::choose(&trace, 3);
        assert!(
            chosen.iter().any(|(p, _)| p == "bitmap.before_switch"),
            "{chosen:?}"
        );
        for (point, hit) in &chosen {
            w.copy("orig", "img");
            let killed = fault::kill_at(w.root(), &args, point, *hit);
            let what = format!("{args:?} killed at {point} #{hit}");
            if let Err(e) = w.check_clean("img") {
                panic!("{what}: {e}");
            }
            let now = (listed(&w, "img"), holding_data(&w, "img"));
            // The last switch passed decides: as many switches as actions
            // done.
            let switches = killed.hits("bitmap.switched");
            let expected = if switches as usize == trace.hits("bitmap.switched") as usize {
                &after
            } else if switches == 0 {
                &before
            } else {
                // In between two actions: not compared here.
                &now
            };
            assert!(now == *expected, "{what}: {now:?}");
            w.same_view("img", "orig")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}

/// Bitmaps a program without bitmap support wrote past (the autoclear bit
/// off, the extension left): QEMU drops them as inconsistent and stores a
/// new directory without them, their clusters leaked; so does cowshed.
#[test]
fn bitmaps_behind_a_cleared_autoclear_bit_are_dropped_as_qemu_drops_them() {
    let w = Work::new("bitmap-stale");
    w.create("img", "qcow2", "", None, 4 * MIB);
    w.qemu_img(&["bitmap", "--add", "img", "old"]);
    let mut bytes = w.read_file("img");
    bytes[95] &= !1;
    w.write_file("img", &bytes);
    w.copy("img", "ref");
    bitmap(&w, Tool::Cowshed, &["--add"], "new", "img");
    bitmap(&w, Tool::Qemu, &["--add"], "new", "ref");
    assert_eq!(listed(&w, "img"), listed(&w, "ref"));
    assert_eq!(autoclear(&w, "img"), autoclear(&w, "ref"));
    // The old directory and table leaked in both, nothing worse.
    assert_eq!((w.check_code("img"), w.check_code("ref")), (3, 3));
    let r = w.cowshed(&["bitmap", "--remove", "img", "old"]);
    let q = w.qemu_img_may_fail(&["bitmap", "--remove", "ref", "old"]);
    assert_eq!((r.code, q.code), (Some(1), Some(1)), "{r} / {q}");
}

#[path = "common/powercut/mod.rs"]
mod powercut;

/// An image with two bitmaps holding data, 4 KiB clusters, on a recorded
/// mount; `cowshed bitmap ARGS img NAME` runs there and every state a
/// power cut may leave is judged: `qemu-img check` clean (no leaks either),
/// the bitmaps listed as before or as after, the guest view unchanged.
fn powercut_case(name: &str, args: &[&str], bitmap: &str) -> powercut::Tally {
    use powercut::{must, raw_view, tool, Session};
    let s = Session::new(name);
    let b = &s.backing;
    must(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "img",
            "64M",
        ],
    );
    must(b, "qemu-img", &["bitmap", "--add", "-g", "512", "img", "a"]);
    must(b, "qemu-img", &["bitmap", "--add", "img", "b"]);
    must(
        b,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 2 40M 64k",
            "img",
        ],
    );
    // Empty, so that merging into it changes what it holds.
    must(b, "qemu-img", &["bitmap", "--add", "img", "m"]);
    raw_view(b, "img", &s.refs.join("now.raw"));
    let list = |d: &std::path::Path| {
        let (code, out) = tool(d, "qemu-img", &["info", "--output", "json", "img"]);
        if code != 0 {
            return Err(out);
        }
        let v: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        Ok((
            v["format-specific"]["data"].get("bitmaps").cloned(),
            holding_data_at(&d.join("img")),
        ))
    };
    let before = list(b).unwrap();
    let mut all = vec!["bitmap"];
    all.extend_from_slice(args);
    all.extend(["img", bitmap]);
    let (rec, ()) = s.record(|mnt, _| {
        must(mnt, common::COWSHED, &all);
    });
    let after = list(b).unwrap();
    assert_ne!(before, after, "{name} changed nothing");
    let now_raw = s.refs.join("now.raw");
    let budget = powercut::states::Budget::METADATA_SWITCH;
    s.judge(&rec, budget, &|d, _| {
        powercut::clean_check(d, "img")?;
        let now = list(d)?;
        if now != before && now != after {
            return Err(format!("bitmaps neither before nor after: {now:?}"));
        }
        powercut::same_view(d, &now_raw, "img", "qcow2")
    })
}

#[test]
fn bitmap_changes_survive_power_cuts() {
    let rows = vec![
        powercut_case("bitmap --add", &["--add", "-g", "4k"], "c"),
        powercut_case("bitmap --clear", &["--clear"], "a"),
        powercut_case("bitmap --disable", &["--disable"], "b"),
        powercut_case("bitmap --remove", &["--remove"], "a"),
        powercut_case("bitmap --merge", &["--merge", "a"], "m"),
    ];
    println!("\n{}", powercut::table(&rows));
    for r in &rows {
        assert!(
            r.violations.is_empty(),
            "{}: {} of {} states fail:\n{}",
            r.name,
            r.violations.len(),
            r.states,
            r.examples(3)
        );
    }
}

/// A chain base <- mid <- top in `dir`, with bitmaps in every image:
/// enabled and disabled, granularities 512 to 1 MiB, one in use (as a
/// QEMU that died leaves it), written to after they were made.
fn chain_with_bitmaps(w: &Work, dir: &str, top_size: u64) {
    w.mkdir(dir);
    let p = |name: &str| format!("{dir}/{name}");
    w.create(&p("base"), "qcow2", "", None, 8 * MIB);
    w.io("qcow2", &p("base"), &["write -P 1 0 2M".to_string()]);
    w.create(
        &p("mid"),
        "qcow2",
        "cluster_size=4096",
        Some(("base", "qcow2")),
        8 * MIB,
    );
    w.create(&p("top"), "qcow2", "", Some(("mid", "qcow2")), top_size);
    for img in ["base", "mid", "top"] {
        let img = p(img);
        w.qemu_img(&["bitmap", "--add", &img, "en"]);
        w.qemu_img(&["bitmap", "--add", "-g", "512", &img, "fine"]);
        w.qemu_img(&["bitmap", "--add", "-g", "1M", &img, "coarse"]);
        w.qemu_img(&["bitmap", "--add", "--disable", &img, "off"]);
        w.qemu_img(&["bitmap", "--add", &img, "broken"]);
    }
    w.io(
        "qcow2",
        &p("mid"),
        &["write -P 3 3M 8k".to_string(), "write -z 5M 4k".to_string()],
    );
    w.io(
        "qcow2",
        &p("top"),
        &[
            "write -P 2 1M 128k".to_string(),
            "write -z 6M 4k".to_string(),
            "write -P 4 7M 1".to_string(),
        ],
    );
    // Bits set before the operation stay; the ones it adds show.
    for img in ["base", "mid", "top"] {
        w.qemu_img(&["bitmap", "--clear", &p(img), "fine"]);
        mark_in_use(w, &p(img), "broken");
    }
}

/// `c/IMG` (cowshed's result) and `q/IMG` (qemu-img's): the same bitmaps
/// listed, the same holding data, each consistent one the same as QEMU
/// reads it; `qemu-img check` clean and the same guest view.
fn same_bitmaps(w: &Work, img: &str, what: &str) {
    let (c, q) = (format!("c/{img}"), format!("q/{img}"));
    if let Err(e) = w.check_clean(&c) {
        panic!("{what}: {c}: {e}");
    }
    assert_eq!(listed(w, &c), listed(w, &q), "{what}: {img}");
    assert_eq!(holding_data(w, &c), holding_data(w, &q), "{what}: {img}");
    for bm in listed(w, &q).as_array().unwrap() {
        let in_use = bm["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "in-use");
        if in_use {
            continue;
        }
        let name = bm["name"].as_str().unwrap();
        assert_eq!(
            dirty_by_qemu(w, &c, name),
            dirty_by_qemu(w, &q, name),
            "{what}: {img} bitmap {name}"
        );
    }
    w.same_view(&c, &q)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Commit as qemu-img commits with bitmaps: the ranges committed are
/// marked in the base's enabled bitmaps (disabled and in-use ones
/// untouched), the emptied top keeps its bitmaps as they were, -d and -b
/// leave the top alone, a base that grows has its bitmaps grown; but a
/// base that must grow with an in-use bitmap is refused, by both.
#[test]
fn commit_keeps_bitmaps_as_qemu_img_does() {
    // (flags, the top's size, the base's in-use bitmap removed first)
    let cases: [(&[&str], u64, bool); 5] = [
        (&[], 8 * MIB, false),
        (&["-d"], 8 * MIB, false),
        (&["-b", "base"], 8 * MIB, false),
        (&[], 12 * MIB, true),
        (&[], 12 * MIB, false),
    ];
    for (flags, top_size, consistent) in cases {
        let what = format!("commit {flags:?}, top of {top_size}, consistent {consistent}");
        let w = Work::new("bitmap-commit");
        chain_with_bitmaps(&w, "c", top_size);
        if consistent {
            w.qemu_img(&["bitmap", "--remove", "c/mid", "broken"]);
        }
        // Growing a base with an in-use bitmap fails in QEMU's job.
        let refused = top_size > 8 * MIB && !consistent;
        w.mkdir("q");
        for img in ["base", "mid", "top"] {
            w.copy(&format!("c/{img}"), &format!("q/{img}"));
        }
        for dir in ["c", "q"] {
            // qemu-img finds -b's base by its full path.
            let args: Vec<String> = ["commit"]
                .iter()
                .chain(flags)
                .map(|a| match *a {
                    "base" => w.path(&format!("{dir}/base")).display().to_string(),
                    a => a.to_string(),
                })
                .chain([format!("{dir}/top")])
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = if dir == "c" {
                w.cowshed(&args)
            } else {
                w.qemu_img_may_fail(&args)
            };
            assert_eq!(r.code, Some(if refused { 1 } else { 0 }), "{what}: {r}");
        }
        for img in ["base", "mid", "top"] {
            same_bitmaps(&w, img, &what);
        }
    }
}

/// Rebase as qemu-img rebases with bitmaps: a safe rebase marks what it
/// copies into the image in its enabled bitmaps; -u changes no bitmap.
#[test]
fn rebase_keeps_bitmaps_as_qemu_img_does() {
    for flags in [&[][..], &["-u"]] {
        let what = format!("rebase {flags:?}");
        let w = Work::new("bitmap-rebase");
        chain_with_bitmaps(&w, "c", 8 * MIB);
        w.create("c/new", "qcow2", "", None, 8 * MIB);
        w.io(
            "qcow2",
            "c/new",
            &[
                "write -P 1 0 1M".to_string(),
                "write -P 5 4M 64k".to_string(),
            ],
        );
        w.mkdir("q");
        for img in ["base", "mid", "top", "new"] {
            w.copy(&format!("c/{img}"), &format!("q/{img}"));
        }
        for dir in ["c", "q"] {
            let top = format!("{dir}/top");
            let mut args = vec!["rebase"];
            args.extend_from_slice(flags);
            args.extend(["-b", "new", "-F", "qcow2", &top]);
            if dir == "c" {
                let r = w.cowshed(&args);
                assert!(r.ok(), "{what}: {r}");
            } else {
                w.qemu_img(&args);
            }
        }
        for img in ["top", "mid", "base"] {
            same_bitmaps(&w, img, &what);
        }
    }
}

/// Killed at each fault point of a commit into a base with bitmaps (and
/// a top with some): `qemu-img check` finds no corruption (the data
/// writes may leak at worst, as tests/crash.rs allows), and each bitmap
/// is as before, as after, or marked in use (what a QEMU killed in its
/// job leaves: QEMU will not use it); one not in use holds what it held
/// before or after.
#[test]
fn kills_during_commit_leave_bitmaps_as_before_after_or_in_use() {
    let w = Work::new("bitmap-commit-kill");
    chain_with_bitmaps(&w, "o", 8 * MIB);
    let imgs = ["base", "mid", "top"];
    let state = |dir: &str| -> Vec<(Value, Vec<(u64, u64)>)> {
        imgs.iter()
            .map(|img| {
                let p = format!("{dir}/{img}");
                let l = listed(&w, &p);
                let in_use = l.as_array().unwrap().iter().any(|b| {
                    b["name"] == "en"
                        && b["flags"].as_array().unwrap().iter().any(|f| f == "in-use")
                });
                let en = if in_use {
                    Vec::new()
                } else {
                    dirty_by_qemu(&w, &p, "en")
                };
                (l, en)
            })
            .collect()
    };
    let fresh = |dir: &str| {
        let _ = std::fs::remove_dir_all(w.path(dir));
        w.mkdir(dir);
        for img in imgs {
            w.copy(&format!("o/{img}"), &format!("{dir}/{img}"));
        }
    };
    let args = ["commit", "top"];
    fresh("c");
    let before = state("c");
    let trace = fault::trace(&w.path("c"), &args);
    let after = state("c");
    assert_ne!(before, after, "the commit changed no bitmap");
    let chosen = fault::choose(&trace, 3);
    assert!(
        chosen.iter().any(|(p, _)| p == "bitmap.session.marked"),
        "{chosen:?}"
    );
    for (point, hit) in &chosen {
        fresh("c");
        fault::kill_at(&w.path("c"), &args, point, *hit);
        let what = format!("commit killed at {point} #{hit}");
        for img in imgs {
            let code = w.check_code(&format!("c/{img}"));
            assert!(code == 0 || code == 3, "{what}: {img}: check exited {code}");
        }
        let now = state("c");
        for (i, img) in imgs.iter().enumerate() {
            let (b, a, n) = (&before[i], &after[i], &now[i]);
            if n == b || n == a {
                continue;
            }
            // Marked in use: the same bitmaps, each as before or with the
            // in-use flag added.
            let (bl, nl) = (b.0.as_array().unwrap(), n.0.as_array().unwrap());
            assert_eq!(bl.len(), nl.len(), "{what}: {img}: {:?}", n.0);
            for (bb, nb) in bl.iter().zip(nl) {
                let mut flags = bb["flags"].as_array().unwrap().clone();
                if !flags.iter().any(|f| f == "in-use") {
                    flags.insert(0, Value::from("in-use"));
                }
                assert!(
                    nb == bb || (nb["name"] == bb["name"] && nb["flags"] == Value::Array(flags)),
                    "{what}: {img}: {nb} (before: {bb})"
                );
            }
        }
    }
}
