//! `cowshed snapshot` against `qemu-img snapshot`. Each variant (cluster
//! sizes, refcount widths, extended L2, compressed and zero clusters, an
//! overlay, compat=0.10) runs one sequence of writes, creates, applies and
//! deletes twice: on `img`, where cowshed and qemu-img take turns (each
//! applies and deletes snapshots the other made), and on `ref`, where
//! qemu-img does everything. After every step: `qemu-img check` finds
//! `img` clean (no leaks either), both read the same (`qemu-img compare`),
//! every snapshot of both reads the same (`qemu-img convert -l`), and the
//! listings agree. Then the details: the table entry next to qemu-img's,
//! the listing byte for byte (and its JSON next to `qemu-img info`'s),
//! refusals where qemu-img refuses (refcount overflow, bitmaps, locks,
//! formats without snapshots) with the file byte-identical, and kills at
//! every fault point leaving the image as before or as after.

mod common;

use common::fault;
use common::{Failures, Work, MIB};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Cowshed,
    Qemu,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// The variant's write set N, on both images.
    Write(usize),
    Create(&'static str, Tool),
    Apply(&'static str, Tool),
    Delete(&'static str, Tool),
}

use Step::{Apply, Create, Delete, Write};
use Tool::{Cowshed as C, Qemu as Q};

/// Each tool creates, applies and deletes snapshots the other made.
const STEPS: &[Step] = &[
    Write(0),
    Create("s1", C),
    Write(1),
    Create("s2", Q),
    Write(2),
    Create("s3", C),
    Apply("s1", C),
    Write(3),
    Apply("s3", Q),
    Apply("s2", C),
    Delete("s1", Q),
    Delete("s2", C),
    Create("s4", C),
    Write(4),
    Delete("s3", C),
    Apply("s4", C),
    Delete("s4", C),
];

struct Variant {
    name: &'static str,
    /// `qemu-img create -o` options of `img`.
    opts: &'static str,
    /// Whether `img` is an overlay of a `base` with data.
    overlay: bool,
    /// qemu-io commands of each write set. Compressed writes go where the
    /// image has no cluster yet (qemu-io cannot compress into one).
    writes: [&'static [&'static str]; 5],
}

const PLAIN_WRITES: [&[&str]; 5] = [
    &["write -P 1 0 1M", "write -P 2 3M 128k"],
    &["write -P 3 512k 1M", "write -P 4 3200k 8k"],
    &["write -z 0 64k", "write -P 5 6M 64k", "write -P 6 100k 10k"],
    &["write -P 7 2M 300k", "write -z 3M 64k"],
    &["write -P 8 1M 4k", "write -P 9 7M 1M"],
];

const VARIANTS: &[Variant] = &[
    Variant {
        name: "64k",
        opts: "",
        overlay: false,
        writes: PLAIN_WRITES,
    },
    Variant {
        name: "512b-clusters",
        opts: "cluster_size=512",
        overlay: false,
        writes: PLAIN_WRITES,
    },
    Variant {
        name: "refcount-bits-64",
        opts: "refcount_bits=64",
        overlay: false,
        writes: PLAIN_WRITES,
    },
    Variant {
        name: "extended-l2",
        opts: "extended_l2=on",
        overlay: false,
        writes: [
            &["write -P 1 0 4k", "write -P 2 70k 12k", "write -P 3 1M 1M"],
            &["write -P 3 4k 4k", "write -z 1M 4k"],
            &["write -P 5 6M 64k", "write -z 72k 2k"],
            &["write -P 7 2M 3k"],
            &["write -P 8 1M 8k", "write -P 9 7M 1M"],
        ],
    },
    Variant {
        name: "compressed",
        opts: "",
        overlay: false,
        writes: [
            &[
                "write -c -P 1 1M 64k",
                "write -c -P 2 1088k 64k",
                "write -P 3 0 64k",
            ],
            &["write -c -P 4 2M 64k", "write -P 5 0 4k"],
            &["write -c -P 6 3M 128k"],
            &["write -c -P 7 4M 64k"],
            &["write -c -P 8 5M 64k", "write -P 9 1M 4k"],
        ],
    },
    Variant {
        name: "zero-clusters",
        opts: "",
        overlay: false,
        writes: [
            &["write -P 1 0 1M", "write -z 2M 1M"],
            &["write -z 0 128k", "write -z -u 512k 64k"],
            &["write -P 2 2M 64k", "write -z 7M 1M"],
            &["write -z -u 0 1M"],
            &["write -P 3 1M 4k", "write -z 1M 64k"],
        ],
    },
    Variant {
        name: "overlay",
        opts: "",
        overlay: true,
        writes: [
            &["write -P 1 10k 4k", "write -P 2 3M 128k"],
            &["write -P 3 512k 1M", "write -z 6M 64k"],
            &["write -P 4 6M 100"],
            &["write -P 5 2M 300k"],
            &["write -P 6 7M 1M", "write -z 0 64k"],
        ],
    },
    Variant {
        name: "compat-0.10",
        opts: "compat=0.10",
        overlay: false,
        writes: PLAIN_WRITES,
    },
];

const DISK: u64 = 8 * MIB;

fn io(w: &Work, file: &str, cmds: &[&str]) {
    w.io(
        "qcow2",
        file,
        &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
    );
}

/// The snapshots `qemu-img info` lists: (id, name).
fn listed(w: &Work, img: &str) -> Vec<(String, String)> {
    let info = w.info_json(img);
    info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or("").to_string(),
                        s["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A snapshot's guest view, as raw bytes, read by qemu-img.
fn snapshot_view(w: &Work, img: &str, name: &str) -> Vec<u8> {
    let out = format!("{img}.{name}.raw");
    let sel = format!("snapshot.name={name}");
    w.qemu_img(&["convert", "-f", "qcow2", "-O", "raw", "-l", &sel, img, &out]);
    let bytes = w.read_file(&out);
    std::fs::remove_file(w.path(&out)).unwrap();
    bytes
}

fn snapshot_op(w: &Work, tool: Tool, flag: &str, name: &str, img: &str) {
    let r = match tool {
        Tool::Cowshed => w.cowshed(&["snapshot", flag, name, img]),
        Tool::Qemu => w.qemu_img_may_fail(&["snapshot", flag, name, img]),
    };
    assert!(r.ok(), "[{}] {r}", w.case);
}

#[test]
fn snapshots_cross_between_cowshed_and_qemu_img() {
    for v in VARIANTS {
        let w = Work::new(&format!("snapshot-{}", v.name));
        let mut f = Failures::new(v.name);
        if v.overlay {
            w.create("base.qcow2", "qcow2", "", None, DISK);
            io(&w, "base.qcow2", &["write -P 0xb0 0 8M"]);
            w.create("img", "qcow2", v.opts, Some(("base.qcow2", "qcow2")), DISK);
        } else {
            w.create("img", "qcow2", v.opts, None, DISK);
        }
        w.copy("img", "ref");
        for (n, step) in STEPS.iter().enumerate() {
            match *step {
                Write(i) => {
                    io(&w, "img", v.writes[i]);
                    io(&w, "ref", v.writes[i]);
                }
                Create(name, tool) => {
                    snapshot_op(&w, tool, "-c", name, "img");
                    snapshot_op(&w, Tool::Qemu, "-c", name, "ref");
                }
                Apply(name, tool) => {
                    snapshot_op(&w, tool, "-a", name, "img");
                    snapshot_op(&w, Tool::Qemu, "-a", name, "ref");
                }
                Delete(name, tool) => {
                    snapshot_op(&w, tool, "-d", name, "img");
                    snapshot_op(&w, Tool::Qemu, "-d", name, "ref");
                }
            }
            let at = format!("step {n} {step:?}");
            if let Err(e) = w.check_clean("img") {
                f.push(&at, format!("check: {e}"));
            }
            if let Err(e) = w.same_view("img", "ref") {
                f.push(&at, format!("view: {e}"));
            }
            let (ours, theirs) = (listed(&w, "img"), listed(&w, "ref"));
            f.check(ours == theirs, &at, || {
                format!("snapshots {ours:?} vs {theirs:?}")
            });
            for (_, name) in &ours {
                let (a, b) = (
                    snapshot_view(&w, "img", name),
                    snapshot_view(&w, "ref", name),
                );
                f.check(a == b, &at, || {
                    format!(
                        "snapshot {name} reads differently from offset {:?}",
                        common::first_difference(&a, &b)
                    )
                });
            }
            let (l1, l2) = (
                w.cowshed(&["snapshot", "-l", "img"]),
                w.qemu_img(&["snapshot", "-l", "img"]),
            );
            f.check(l1.ok() && l1.stdout == l2.stdout, &at, || {
                format!("listing:\n{l1}\nqemu-img:\n{l2}")
            });
        }
        f.finish();
    }
}

/// The table entry of snapshot `index` as stored: its bytes from the
/// fixed part on (l1 offset and date zeroed: where and when differ).
fn entry_bytes(w: &Work, img: &str, index: usize) -> Vec<u8> {
    let b = w.read_file(img);
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let be16 = |at: usize| u16::from_be_bytes(b[at..at + 2].try_into().unwrap()) as usize;
    let mut off = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    for i in 0.. {
        let len = 40 + be32(off + 36) + be16(off + 12) + be16(off + 14);
        if i == index {
            let mut e = b[off..off + len].to_vec();
            e[0..8].fill(0);
            e[16..24].fill(0);
            return e;
        }
        off += len.next_multiple_of(8);
    }
    unreachable!()
}

#[test]
fn the_table_entry_is_the_one_qemu_img_writes() {
    for (case, opts) in [
        ("default", ""),
        ("v2", "compat=0.10"),
        ("extl2-512", "extended_l2=on"),
        ("small", "cluster_size=512"),
    ] {
        let w = Work::new(&format!("snapshot-entry-{case}"));
        w.create("a", "qcow2", opts, None, 3 * MIB + 512);
        io(&w, "a", &["write -P 1 0 100k"]);
        w.copy("a", "b");
        for name in ["first", "", &"n".repeat(300)] {
            snapshot_op(&w, Tool::Cowshed, "-c", name, "a");
            snapshot_op(&w, Tool::Qemu, "-c", name, "b");
        }
        for i in 0..3 {
            assert_eq!(
                entry_bytes(&w, "a", i),
                entry_bytes(&w, "b", i),
                "[{case}] entry {i}"
            );
        }
        let (ia, ib) = (w.info_json("a"), w.info_json("b"));
        for (sa, sb) in ia["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .zip(ib["snapshots"].as_array().unwrap())
        {
            for key in ["id", "name", "vm-state-size", "vm-clock-sec", "icount"] {
                assert_eq!(sa[key], sb[key], "[{case}] {key}");
            }
        }
    }
}

#[test]
fn the_listing_is_qemu_imgs_byte_for_byte() {
    let w = Work::new("snapshot-listing");
    w.create("img", "qcow2", "", None, MIB);
    io(&w, "img", &["write -P 1 0 64k"]);
    // Nothing at all for an image without snapshots.
    let empty = w.cowshed(&["snapshot", "-l", "img"]);
    assert!(empty.ok() && empty.stdout.is_empty(), "{empty}");
    let json = w.cowshed(&["snapshot", "-l", "--output", "json", "img"]);
    assert_eq!(w.json(&json), Value::Array(vec![]));
    for name in ["a", "a much longer name than sixteen", "x", "y", "z"] {
        snapshot_op(&w, Tool::Qemu, "-c", name, "img");
    }
    // What qemu-img shows beyond what it writes itself: VM state sizes
    // around the unit changes, VM clocks, an icount of -1 (not recorded).
    let patches: [(u64, u64, i64); 5] = [
        (1000, 3_723_456_789_012, 5),
        (1_023_999, 59_999_000_000, -1),
        (123_456_789_012, 1, 42),
        (5 << 32, 359_999_999_999_999, -1),
        (0, 0, 0),
    ];
    let b = w.read_file("img");
    let mut off = u64::from_be_bytes(b[64..72].try_into().unwrap());
    for (vm_state, clock, icount) in patches {
        let at = |rel: u64| off + rel;
        common::bytes::poke(&w.path("img"), at(24), &clock.to_be_bytes());
        let small = u32::try_from(vm_state).unwrap_or(0);
        common::bytes::poke(&w.path("img"), at(32), &small.to_be_bytes());
        common::bytes::poke(&w.path("img"), at(40), &vm_state.to_be_bytes());
        common::bytes::poke(&w.path("img"), at(56), &icount.to_be_bytes());
        let b = w.read_file("img");
        let o = off as usize;
        let be16 = |a: usize| u64::from(u16::from_be_bytes(b[a..a + 2].try_into().unwrap()));
        let be32 = |a: usize| u64::from(u32::from_be_bytes(b[a..a + 4].try_into().unwrap()));
        off += (40 + be32(o + 36) + be16(o + 12) + be16(o + 14)).next_multiple_of(8);
    }
    assert_eq!(w.check_code("img"), 0);
    for tz in ["UTC", "Asia/Kolkata", "America/New_York"] {
        let run = |prog: &str, args: &[&str]| {
            let out = std::process::Command::new(prog)
                .args(args)
                .current_dir(w.root())
                .env("TZ", tz)
                .output()
                .unwrap();
            assert!(out.status.success(), "{prog} {args:?}: {out:?}");
            out.stdout
        };
        let ours = run(common::COWSHED, &["snapshot", "-l", "img"]);
        let theirs = run("qemu-img", &["snapshot", "-l", "img"]);
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs),
            "TZ={tz}"
        );
        // `info` prints the same table.
        let info = String::from_utf8_lossy(&run(common::COWSHED, &["info", "img"])).into_owned();
        assert!(
            info.contains(&*String::from_utf8_lossy(&theirs)),
            "TZ={tz}: info:\n{info}"
        );
    }
    let ours = w.json(&w.cowshed(&["snapshot", "-l", "--output", "json", "img"]));
    let theirs = w.info_json("img")["snapshots"].clone();
    assert_eq!(ours, theirs);
    let info = w.json(&w.cowshed(&["info", "--output", "json", "img"]));
    assert_eq!(info["snapshots"], theirs);
}

#[test]
fn lookups_and_duplicate_names_as_in_qemu_img() {
    let w = Work::new("snapshot-lookups");
    w.create("a", "qcow2", "", None, MIB);
    w.copy("a", "b");
    // qemu-img takes a name twice, and a name that is another's id.
    let steps: &[(&str, &str, &[&str])] = &[
        ("-c", "x", &["write -P 1 0 64k"]),
        ("-c", "x", &["write -P 2 0 64k"]),
        ("-c", "1", &["write -P 3 0 64k"]),
        // By id first: snapshot 1 (the first x), not the one named "1".
        ("-a", "1", &[]),
        // By name only: the first "x" (id 1).
        ("-d", "x", &[]),
        // "3" is an id: the snapshot named "1".
        ("-a", "3", &[]),
        ("-d", "1", &[]),
    ];
    for (flag, name, writes) in steps {
        for (img, tool) in [("a", Tool::Cowshed), ("b", Tool::Qemu)] {
            snapshot_op(&w, tool, flag, name, img);
            if !writes.is_empty() {
                io(&w, img, writes);
            }
        }
        assert_eq!(listed(&w, "a"), listed(&w, "b"), "after {flag} {name}");
        w.same_view("a", "b").unwrap();
        w.check_clean("a").unwrap();
    }
    // -d does not take an id.
    let before = w.read_file("a");
    let r = w.cowshed(&["snapshot", "-d", "2", "a"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("Could not delete snapshot '2': snapshot not found"),
        "{r}"
    );
    let q = w.qemu_img_may_fail(&["snapshot", "-d", "2", "b"]);
    assert_eq!(q.code, Some(1), "{q}");
    let r = w.cowshed(&["snapshot", "-a", "nosuch", "a"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains(
            "Could not apply snapshot 'nosuch': Failed to load snapshot: No such file or directory"
        ),
        "{r}"
    );
    assert_eq!(w.read_file("a"), before);
}

#[test]
fn apply_restores_the_snapshots_disk_size() {
    for (case, resize) in [
        ("grown", &["3M"][..]),
        ("shrunk", &["--shrink", "512K"][..]),
    ] {
        let w = Work::new(&format!("snapshot-size-{case}"));
        w.create("a", "qcow2", "cluster_size=512", None, MIB);
        io(&w, "a", &["write -P 1 0 1M"]);
        snapshot_op(&w, Tool::Qemu, "-c", "s", "a");
        let mut args = vec!["resize", "-q"];
        args.extend(resize.iter().take(resize.len() - 1));
        args.push("a");
        args.push(resize[resize.len() - 1]);
        w.qemu_img(&args);
        io(&w, "a", &["write -P 2 0 512k"]);
        w.copy("a", "b");
        snapshot_op(&w, Tool::Cowshed, "-a", "s", "a");
        snapshot_op(&w, Tool::Qemu, "-a", "s", "b");
        assert_eq!(
            w.info_json("a")["virtual-size"],
            w.info_json("b")["virtual-size"],
            "[{case}]"
        );
        w.same_view("a", "b").unwrap();
        w.check_clean("a").unwrap();
    }
}

#[test]
fn refcount_overflow_is_refused_where_qemu_refuses_it() {
    let w = Work::new("snapshot-overflow");
    // refcount_bits=1: no cluster can be shared. An image without any L2
    // table can still be snapshot; one with a table cannot (QEMU says
    // "Invalid argument" and leaks a cluster; cowshed leaks nothing).
    w.create("empty", "qcow2", "refcount_bits=1", None, MIB);
    w.copy("empty", "empty-q");
    snapshot_op(&w, Tool::Cowshed, "-c", "s", "empty");
    snapshot_op(&w, Tool::Qemu, "-c", "s", "empty-q");
    w.check_clean("empty").unwrap();
    for (case, opts, ok_first) in [("rb1", "refcount_bits=1", 0), ("rb2", "refcount_bits=2", 2)] {
        let (a, b) = (format!("{case}-a"), format!("{case}-b"));
        w.create(&a, "qcow2", opts, None, MIB);
        io(&w, &a, &["write -z 0 64k", "write -P 1 64k 64k"]);
        w.copy(&a, &b);
        for k in 0..ok_first {
            let name = format!("s{k}");
            snapshot_op(&w, Tool::Cowshed, "-c", &name, &a);
            snapshot_op(&w, Tool::Qemu, "-c", &name, &b);
        }
        let before = w.read_file(&a);
        let ours = w.cowshed(&["snapshot", "-c", "over", &a]);
        let theirs = w.qemu_img_may_fail(&["snapshot", "-c", "over", &b]);
        assert_eq!(theirs.code, Some(1), "[{case}] {theirs}");
        assert!(
            theirs
                .stderr
                .contains("Could not create snapshot 'over': Invalid argument"),
            "[{case}] {theirs}"
        );
        assert_eq!(ours.code, Some(1), "[{case}] {ours}");
        assert!(
            ours.stderr
                .contains("Could not create snapshot 'over': Invalid argument"),
            "[{case}] {ours}"
        );
        assert!(w.read_file(&a) == before, "[{case}] the refusal wrote");
        w.check_clean(&a).unwrap();
    }
}

#[test]
fn persistent_bitmaps_are_kept_and_apply_is_refused_as_qemu_refuses_it() {
    let w = Work::new("snapshot-bitmaps");
    w.create("img", "qcow2", "", None, MIB);
    io(&w, "img", &["write -P 1 0 64k"]);
    w.qemu_img(&["bitmap", "--add", "img", "b0"]);
    snapshot_op(&w, Tool::Cowshed, "-c", "s", "img");
    let bitmaps = |w: &Work| w.info_json("img")["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(bitmaps(&w)[0]["name"], "b0");
    w.check_clean("img").unwrap();
    let before = w.read_file("img");
    let r = w.cowshed(&["snapshot", "-a", "s", "img"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("Could not apply snapshot 's': Device has active dirty bitmaps"),
        "{r}"
    );
    assert!(w.read_file("img") == before);
    snapshot_op(&w, Tool::Cowshed, "-d", "s", "img");
    assert_eq!(bitmaps(&w)[0]["name"], "b0");
    assert!(listed(&w, "img").is_empty());
    w.check_clean("img").unwrap();
    // QEMU still takes the bitmap as consistent: it can remove it.
    w.qemu_img(&["bitmap", "--remove", "img", "b0"]);
    w.check_clean("img").unwrap();
}

/// What QEMU 10.0.2 does with bitmaps on `snapshot -a`, measured: it
/// refuses whatever bitmaps it loads, disabled and in-use ones too
/// ("Device has active dirty bitmaps"); bitmaps behind a cleared autoclear
/// bit (a program without bitmap support wrote past them) it drops with
/// their extension, and applies. cowshed the same, on a twin copy: the
/// same exit code and message, its refusal leaving the file
/// byte-identical; where both apply, the same info (no bitmaps, the
/// extension gone), the same `qemu-img check` verdict (the dropped
/// bitmaps' clusters leak in both), the same guest view; then qemu-img
/// takes cowshed's result on.
#[test]
fn apply_refuses_every_bitmap_qemu_loads_and_applies_past_stale_ones() {
    for case in ["disabled", "in-use", "stale"] {
        let w = Work::new(&format!("snapshot-apply-bitmaps-{case}"));
        w.create("img", "qcow2", "", None, MIB);
        io(&w, "img", &["write -P 1 0 64k"]);
        w.qemu_img(&["snapshot", "-c", "s", "img"]);
        w.qemu_img(&["bitmap", "--add", "img", "b0"]);
        io(&w, "img", &["write -P 2 128k 64k"]);
        match case {
            "disabled" => {
                w.qemu_img(&["bitmap", "--disable", "img", "b0"]);
            }
            "in-use" => common::bitmaps::mark_in_use(&w, "img", "b0"),
            _ => {
                let mut bytes = w.read_file("img");
                bytes[95] &= !1;
                w.write_file("img", &bytes);
            }
        }
        w.copy("img", "ref");
        let before = w.read_file("img");
        let r = w.cowshed(&["snapshot", "-a", "s", "img"]);
        let q = w.qemu_img_may_fail(&["snapshot", "-a", "s", "ref"]);
        assert_eq!(r.code, q.code, "[{case}] {r}\n{q}");
        if case != "stale" {
            assert_eq!(r.code, Some(1), "[{case}] {r}");
            let says = "Could not apply snapshot 's': Device has active dirty bitmaps";
            assert!(q.stderr.contains(says), "[{case}] {q}");
            assert!(r.stderr.contains(says), "[{case}] {r}");
            assert!(w.read_file("img") == before, "[{case}] the refusal wrote");
            continue;
        }
        assert!(r.ok(), "{r}");
        let strip = |mut v: Value| {
            for k in ["filename", "actual-size", "children"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        };
        assert_eq!(strip(w.info_json("img")), strip(w.info_json("ref")));
        assert_eq!(w.check_code("img"), w.check_code("ref"));
        // Nothing warns of stale bitmaps any more: the extension is gone.
        let chk = w.qemu_img_may_fail(&["check", "img"]);
        assert!(!chk.stderr.contains("bitmap"), "{chk}");
        w.same_view("img", "ref").unwrap();
        assert!(snapshot_view(&w, "img", "s") == snapshot_view(&w, "ref", "s"));
        for img in ["img", "ref"] {
            w.qemu_img(&["bitmap", "--add", img, "new"]);
            w.qemu_img(&["snapshot", "-d", "s", img]);
            w.qemu_img(&["check", "-r", "leaks", "-q", img]);
            w.check_clean(img).unwrap();
        }
        assert_eq!(strip(w.info_json("img")), strip(w.info_json("ref")));
    }
}

#[test]
fn refusals_leave_the_file_byte_identical() {
    let w = Work::new("snapshot-refusals");
    w.create("img", "qcow2", "", None, MIB);
    io(&w, "img", &["write -P 1 0 64k"]);
    snapshot_op(&w, Tool::Cowshed, "-c", "s", "img");
    // A QEMU holding the image: writes refused, naming the lock; listing
    // works (no lock taken).
    let before = w.read_file("img");
    let holder = w.hold_writer("img", "qcow2");
    for (flag, name) in [("-c", "t"), ("-a", "s"), ("-d", "s")] {
        let r = w.cowshed(&["snapshot", flag, name, "img"]);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(r.stderr.contains("Failed to get \"write\" lock"), "{r}");
    }
    let l = w.cowshed(&["snapshot", "-l", "-U", "img"]);
    assert!(l.ok() && l.stdout.contains(" s "), "{l}");
    common::release_holder(holder);
    assert!(w.read_file("img") == before, "a refused snapshot wrote");
    // Formats and images without internal snapshots, as qemu-img says.
    w.create("disk.raw", "raw", "", None, MIB);
    w.create("ext.qcow2", "qcow2", "data_file=ext.data", None, MIB);
    for img in ["disk.raw", "ext.qcow2"] {
        let before = w.read_file(img);
        let r = w.cowshed(&["snapshot", "-c", "x", img]);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(
            r.stderr
                .contains("Could not create snapshot 'x': Operation not supported"),
            "{r}"
        );
        let q = w.qemu_img_may_fail(&["snapshot", "-c", "x", img]);
        assert_eq!(q.code, Some(1), "{q}");
        assert!(w.read_file(img) == before);
        let l = w.cowshed(&["snapshot", "-l", img]);
        assert!(l.ok() && l.stdout.is_empty(), "{l}");
    }
}

/// Kills at every step of each operation: `qemu-img check` finds the
/// image clean (not even leaks: the old metadata is never written), the
/// snapshot list is the one before or the one after, and the image reads
/// as before or (apply, once switched) as the snapshot.
#[test]
fn kills_leave_the_image_as_before_or_after() {
    let w = Work::new("snapshot-kill");
    w.create("orig", "qcow2", "cluster_size=4096", None, 4 * MIB);
    io(&w, "orig", &["write -P 1 0 1M", "write -c -P 2 2M 64k"]);
    w.qemu_img(&["snapshot", "-c", "old", "orig"]);
    io(&w, "orig", &["write -P 3 512k 1M", "write -z 3M 64k"]);
    w.qemu_img(&["convert", "-O", "raw", "orig", "orig.raw"]);
    let old_view = snapshot_view(&w, "orig", "old");
    for (flag, name) in [("-c", "new"), ("-a", "old"), ("-d", "old")] {
        w.copy("orig", "img");
        let args = ["snapshot", flag, name, "img"];
        let trace = fault::trace(w.root(), &args);
        let after = listed(&w, "img");
        let chosen = fault::choose(&trace, 3);
        assert!(
            chosen.iter().any(|(p, _)| p == "snapshot.before_switch"),
            "{chosen:?}"
        );
        let before = listed(&w, "orig");
        for (point, hit) in &chosen {
            w.copy("orig", "img");
            fault::kill_at(w.root(), &args, point, *hit);
            let what = format!("{flag} {name} killed at {point} #{hit}");
            if let Err(e) = w.check_clean("img") {
                panic!("{what}: {e}");
            }
            // Killed at "switched" or later: the header points at the new
            // metadata; before it, at the old.
            let switched_at = trace
                .position("snapshot.switched", 1)
                .expect("switch point");
            let done = trace.position(point, *hit).expect("kill point") >= switched_at;
            let now = listed(&w, "img");
            let expected = if done { &after } else { &before };
            assert!(now == *expected, "{what}: {now:?}");
            w.qemu_img(&["convert", "-O", "raw", "img", "img.raw"]);
            let view = w.read_file("img.raw");
            if done && flag == "-a" {
                assert!(view == old_view, "{what}: does not read as the snapshot");
            } else {
                assert!(view == w.read_file("orig.raw"), "{what}: the image changed");
            }
            for (_, s) in &now {
                if s == "old" {
                    assert!(snapshot_view(&w, "img", s) == old_view, "{what}: {s}");
                }
            }
        }
    }
}

#[path = "common/powercut/mod.rs"]
mod powercut;

/// An image with a snapshot "old" and writes since, 4 KiB clusters (many
/// L2 tables and refcount entries to get wrong), on a recorded mount;
/// `prog snapshot flag name` runs there and every state a power cut may
/// leave is judged: `qemu-img check` clean (no leaks either), the listing
/// before or after, the image reading as before or (apply) as "old", and
/// every snapshot reading as it did.
fn powercut_case(name: &str, prog: &str, flag: &str, snap: &str) -> powercut::Tally {
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
            "4M",
        ],
    );
    let io = |cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push("img");
        must(b, "qemu-io", &args);
    };
    io(&[
        "write -P 1 0 1M",
        "write -c -P 2 2M 64k",
        "write -P 3 3M 8k",
    ]);
    must(b, "qemu-img", &["snapshot", "-c", "old", "img"]);
    io(&["write -P 4 512k 1M", "write -z 3M 64k"]);
    raw_view(b, "img", &s.refs.join("now.raw"));
    let old_raw = s.refs.join("old.raw");
    let o = old_raw.to_string_lossy().into_owned();
    must(
        b,
        "qemu-img",
        &["convert", "-O", "raw", "-l", "snapshot.name=old", "img", &o],
    );
    let before = must(b, "qemu-img", &["snapshot", "-l", "img"]);
    let (rec, ()) = s.record(|mnt, _| {
        must(mnt, prog, &["snapshot", flag, snap, "img"]);
    });
    let after = must(b, "qemu-img", &["snapshot", "-l", "img"]);
    let now_raw = s.refs.join("now.raw");
    let apply = flag == "-a";
    let budget = powercut::states::Budget::METADATA_SWITCH;
    s.judge(&rec, budget, &|d, _| {
        powercut::clean_check(d, "img")?;
        let list = tool(d, "qemu-img", &["snapshot", "-l", "img"]).1;
        if list != before && list != after {
            return Err(format!("listing neither before nor after:\n{list}"));
        }
        let reads = |img_args: &[&str], reference: &std::path::Path| {
            let out = d.join("view.raw");
            let o = out.to_string_lossy().into_owned();
            let mut args = vec!["convert", "-O", "raw"];
            args.extend(img_args);
            args.extend(["img", &o]);
            let (code, text) = tool(d, "qemu-img", &args);
            let same = code == 0 && std::fs::read(&out).ok() == std::fs::read(reference).ok();
            let _ = std::fs::remove_file(&out);
            if code != 0 {
                return Err(text);
            }
            Ok(same)
        };
        let as_now = reads(&[], &now_raw)?;
        if !(as_now || apply && reads(&[], &old_raw)?) {
            return Err("the image reads neither as before nor as the snapshot".into());
        }
        if list.contains(" old ") && !reads(&["-l", "snapshot.name=old"], &old_raw)? {
            return Err("snapshot old reads differently".into());
        }
        if list.contains(" new ") && !reads(&["-l", "snapshot.name=new"], &now_raw)? {
            return Err("snapshot new reads differently".into());
        }
        Ok(())
    })
}

#[test]
fn snapshots_survive_power_cuts_where_qemu_imgs_do_not() {
    let rows = vec![
        powercut_case("snapshot -c", common::COWSHED, "-c", "new"),
        powercut_case("snapshot -a", common::COWSHED, "-a", "old"),
        powercut_case("snapshot -d", common::COWSHED, "-d", "old"),
        // The control: QEMU raises refcounts, then clears the COPIED flags
        // of the shared L2 tables in place; a power cut between the two
        // leaves flags `qemu-img check` counts as corruption. The harness
        // must see it, or it is blind.
        powercut_case("qemu-img snapshot -c (control)", "qemu-img", "-c", "new"),
    ];
    println!("\n{}", powercut::table(&rows));
    let control = &rows[3];
    let copied = control
        .violations
        .iter()
        .filter(|v| v.what.contains("ERROR OFLAG_COPIED"))
        .count();
    println!(
        "{}: {copied} of {} states show `ERROR OFLAG_COPIED`\n{}",
        control.name,
        control.states,
        control.examples(2)
    );
    assert!(
        copied > 0,
        "the harness found no COPIED fault in qemu-img's run"
    );
    for r in &rows[..3] {
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
