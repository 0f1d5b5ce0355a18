//! cowshed against QEMU as the oracle.
//!
//! Every image is built at test time with qemu-img / qemu-io in a temporary
//! directory; nothing about the formats is hard-coded here. For each case:
//!
//! 1. `cowshed map --output json` equals `qemu-img map --output=json` (both
//!    merged by qemu's rule), every field compared;
//! 2. `cowshed map` (human) prints the same data lines as `qemu-img map`, or
//!    fails like it when the image has compressed clusters;
//! 3. `cowshed info --output json` agrees with `qemu-img info --output=json`
//!    on every key qemu-img emits (but `children`), with and without
//!    `--backing-chain`;
//! 4. `cowshed convert -O raw` writes a file that `qemu-img compare` finds
//!    identical to the source and that equals `qemu-img convert -O raw`
//!    byte for byte.
//!
//! One `#[test]` per case (see the table at `cases!`), so cases run in
//! parallel and fail separately; within a case all checks run and every
//! failure is reported with the case name.
//!
//! `ORACLE_PEEK=1 cargo test --test oracle -- --nocapture` also prints
//! qemu-img's (merged) map of every case, to see what a recipe produced.

mod common;

use common::{
    extent_diff, extents_text, first_difference, human_map_lines, info_differences, merge_extents,
    mixed_bytes, random_bytes, Failures, Work, KIB, MIB,
};
use serde_json::Value;

/// The image a case checks, and what its recipe must have produced (checked
/// on qemu-img's map, so that a recipe which silently stops exercising its
/// feature fails instead of passing vacuously).
struct Target {
    file: String,
    fmt: &'static str,
    expect: Vec<Expect>,
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Some extent is compressed.
    Compressed,
    /// Some extent reads as zeroes from a present (allocated or zero-flagged)
    /// entry of the top image.
    ZeroAtTop,
    /// Some extent comes from at least this deep in the chain.
    Depth(u64),
    /// Some extent holds data and has a host offset.
    DataWithOffset,
    /// More than this many extents once merged.
    Extents(usize),
}

impl Target {
    fn new(file: &str, fmt: &'static str, expect: &[Expect]) -> Self {
        Target {
            file: file.to_string(),
            fmt,
            expect: expect.to_vec(),
        }
    }
}

fn holds(e: Expect, map: &[Value]) -> bool {
    let flag = |x: &Value, k: &str| x[k].as_bool() == Some(true);
    match e {
        Expect::Compressed => map.iter().any(|x| flag(x, "compressed")),
        Expect::ZeroAtTop => map
            .iter()
            .any(|x| x["depth"] == 0 && flag(x, "present") && flag(x, "zero")),
        Expect::Depth(d) => map.iter().any(|x| x["depth"].as_u64() >= Some(d)),
        Expect::DataWithOffset => map
            .iter()
            .any(|x| flag(x, "data") && x.get("offset").is_some()),
        Expect::Extents(n) => map.len() > n,
    }
}

/// Run every check on one target, then fail with all that went wrong.
fn check(w: &Work, t: &Target) {
    let mut f = Failures::new(&w.case);
    let qemu_map = check_map_json(w, t, &mut f);
    if std::env::var_os("ORACLE_PEEK").is_some() {
        eprintln!("[{}] qemu-img map:\n{}", w.case, extents_text(&qemu_map));
    }
    for &e in &t.expect {
        assert!(
            holds(e, &qemu_map),
            "[{}] broken recipe: qemu-img map shows no {e:?}:\n{}",
            w.case,
            extents_text(&qemu_map)
        );
    }
    check_map_human(w, t, &mut f);
    check_info(w, t, false, &mut f);
    check_info(w, t, true, &mut f);
    check_convert(w, t, &mut f);
    check_check(w, t, &mut f);
    f.finish();
}

/// `cowshed check` gives qemu-img check's JSON (every key) and exit code.
fn check_check(w: &Work, t: &Target, f: &mut Failures) {
    let q = w.qemu_img_may_fail(&["check", "--output=json", "-f", t.fmt, &t.file]);
    let c = w.cowshed(&["check", "--output", "json", "-f", t.fmt, &t.file]);
    f.check(q.code == c.code, "check exit code", || {
        format!("qemu-img: {q}\ncowshed: {c}")
    });
    if q.code == Some(63) {
        return;
    }
    let parse = |r: &common::Run| serde_json::from_str::<Value>(&r.stdout).ok();
    f.check(parse(&q) == parse(&c), "check --output json", || {
        format!("qemu-img: {q}\ncowshed: {c}")
    });
}

fn check_map_json(w: &Work, t: &Target, f: &mut Failures) -> Vec<Value> {
    let q = w.qemu_img(&["map", "--output=json", "-f", t.fmt, &t.file]);
    let qemu = merge_extents(
        w.json(&q)
            .as_array()
            .expect("qemu-img map JSON is an array"),
    );
    let c = w.cowshed(&["map", "--output", "json", "-f", t.fmt, &t.file]);
    if !c.ok() {
        f.push("map --output json", format!("cowshed failed: {c}"));
        return qemu;
    }
    let ours = match serde_json::from_str::<Value>(&c.stdout) {
        Ok(Value::Array(a)) => merge_extents(&a),
        Ok(other) => {
            f.push(
                "map --output json",
                format!("cowshed's JSON is not an array: {other}"),
            );
            return qemu;
        }
        Err(e) => {
            f.push(
                "map --output json",
                format!("cowshed's output is not JSON ({e}): {c}"),
            );
            return qemu;
        }
    };
    f.check(qemu == ours, "map --output json", || {
        format!(
            "extents differ (after merging; `!!` marks differing lines)\n{}",
            extent_diff(&qemu, &ours)
        )
    });
    qemu
}

fn check_map_human(w: &Work, t: &Target, f: &mut Failures) {
    let q = w.qemu_img_may_fail(&["map", "-f", t.fmt, &t.file]);
    let c = w.cowshed(&["map", "-f", t.fmt, &t.file]);
    if q.ok() {
        if !c.ok() {
            f.push(
                "map (human)",
                format!("qemu-img succeeded but cowshed failed: {c}"),
            );
            return;
        }
        let (ql, cl) = (human_map_lines(&q.stdout), human_map_lines(&c.stdout));
        f.check(ql == cl, "map (human)", || {
            format!(
                "data lines differ\n--- qemu-img ---\n{}\n--- cowshed ---\n{}",
                ql.join("\n"),
                cl.join("\n")
            )
        });
    } else {
        // qemu-img refuses images whose data has no single host offset
        // (compressed clusters): cowshed must refuse too, and say why.
        assert!(
            q.stderr.contains("compressed"),
            "[{}] qemu-img map failed for an unexpected reason: {q}",
            w.case
        );
        f.check(!c.ok(), "map (human)", || {
            format!(
                "qemu-img refused ({}) but cowshed succeeded: {c}",
                q.stderr.trim()
            )
        });
        f.check(c.stderr.contains("compressed"), "map (human)", || {
            format!("cowshed's error does not mention compressed clusters: {c}")
        });
    }
}

fn check_info(w: &Work, t: &Target, chain: bool, f: &mut Failures) {
    let what = if chain {
        "info --backing-chain"
    } else {
        "info"
    };
    let mut qargs = vec!["info", "--output=json"];
    let mut cargs = vec!["info", "--output", "json"];
    if chain {
        qargs.push("--backing-chain");
        cargs.push("--backing-chain");
    }
    qargs.push(&t.file);
    cargs.push(&t.file);
    let qemu = w.json(&w.qemu_img(&qargs));
    let c = w.cowshed(&cargs);
    if !c.ok() {
        f.push(what, format!("cowshed failed: {c}"));
        return;
    }
    let ours: Value = match serde_json::from_str(&c.stdout) {
        Ok(v) => v,
        Err(e) => {
            f.push(what, format!("cowshed's output is not JSON ({e}): {c}"));
            return;
        }
    };
    let diffs = if chain {
        match (qemu.as_array(), ours.as_array()) {
            (Some(q), Some(o)) if q.len() == o.len() => q
                .iter()
                .zip(o)
                .enumerate()
                .flat_map(|(i, (q, o))| info_differences(&format!("layer {i}"), q, o))
                .collect(),
            (Some(q), Some(o)) => vec![format!(
                "chain lengths differ: qemu-img {} images, cowshed {}",
                q.len(),
                o.len()
            )],
            _ => vec![format!(
                "not both arrays:\n qemu-img: {qemu}\n cowshed : {ours}"
            )],
        }
    } else {
        info_differences("image", &qemu, &ours)
    };
    for d in diffs {
        f.push(what, d);
    }
}

fn check_convert(w: &Work, t: &Target, f: &mut Failures) {
    let (out, reference) = ("cowshed-out.raw", "qemu-ref.raw");
    w.qemu_img(&["convert", "-f", t.fmt, "-O", "raw", &t.file, reference]);
    let c = w.cowshed(&["convert", "-O", "raw", &t.file, out]);
    if !c.ok() {
        f.push("convert", format!("cowshed failed: {c}"));
        return;
    }
    let cmp = w.qemu_img_may_fail(&["compare", "-f", t.fmt, "-F", "raw", &t.file, out]);
    f.check(cmp.ok(), "convert", || {
        format!("qemu-img compare finds the output different from the source: {cmp}")
    });
    let (ours, theirs) = (w.read_file(out), w.read_file(reference));
    f.check(ours == theirs, "convert", || {
        let at = first_difference(&theirs, &ours).unwrap_or(0);
        format!(
            "output differs from `qemu-img convert -O raw`: sizes {} (cowshed) vs {} (qemu-img), \
             first difference at byte {at} (cowshed {:?}, qemu-img {:?})",
            ours.len(),
            theirs.len(),
            ours.get(at),
            theirs.get(at)
        )
    });
}

// ---------------------------------------------------------------- recipes --

/// Writes that straddle cluster boundaries (and L2-table boundaries where
/// the disk is large enough), with random and patterned data, zero writes
/// (plain and unmapping, aligned and not) and a discard. `c` is the cluster
/// size, `l2` the guest span one L2 table covers, `size` the virtual size
/// (at least 6 clusters).
fn scatter(w: &Work, file: &str, c: u64, l2: u64, size: u64) {
    assert!(size >= 6 * c, "[{}] scatter needs 6 clusters", w.case);
    w.write_file("rand.bin", &random_bytes(c ^ size, (2 * c + 4096) as usize));
    let mut cmds = vec![
        "write -P 0x11 0 1".to_string(),
        format!("write -P 0x22 {} 300", c - 100),
        format!("write -s rand.bin {} {}", c + c / 2 + 7, c + 5),
        format!("write -s rand.bin {} {}", 3 * c - 3, 2 * c + 6),
        format!("write -z {} {}", 2 * c, c / 2),
        format!("write -z -u {} {}", 4 * c, c),
        format!("write -z {} {}", 5 * c - 1000, 1500),
        format!("write -P 0x44 {} 512", size - 512),
        format!("write -P 0x55 {} {}", size - 2 * c - 333, c),
    ];
    if l2 + 4096 < size {
        cmds.push(format!("write -P 0x33 {} 3000", l2 - 1000));
        cmds.push(format!("write -z {} {}", l2 + 2 * c, c));
    }
    if 4 * l2 < size {
        cmds.push(format!(
            "write -s rand.bin {} {}",
            3 * l2 - 5,
            (l2 + 10).min(2 * c)
        ));
    }
    cmds.push(format!("discard {} {}", c, c));
    w.io("qcow2", file, &cmds);
}

/// A plain qcow2 image of `cluster` bytes per cluster with `opts`, filled by
/// `scatter`.
fn plain(case: &str, cluster: u64, opts: &str) -> (Work, Target) {
    let w = Work::new(case);
    let size = (4 * MIB).max(6 * cluster);
    let opts = format!("cluster_size={cluster}{opts}");
    w.create("img.qcow2", "qcow2", &opts, None, size);
    scatter(&w, "img.qcow2", cluster, cluster * (cluster / 8), size);
    // 2 MiB clusters swallow most of the scattered writes.
    let extents = if cluster >= 2 * MIB { 2 } else { 5 };
    let t = Target::new(
        "img.qcow2",
        "qcow2",
        &[Expect::DataWithOffset, Expect::Extents(extents)],
    );
    (w, t)
}

/// Extended L2 entries: writes and zero writes at subcluster granularity,
/// aligned and not, on allocated and unallocated clusters.
fn extended_l2(case: &str, c: u64) -> (Work, Target) {
    let w = Work::new(case);
    let size = (4 * MIB).max(6 * c);
    let sc = c / 32;
    w.create(
        "img.qcow2",
        "qcow2",
        &format!("cluster_size={c},extended_l2=on"),
        None,
        size,
    );
    w.write_file("rand.bin", &random_bytes(c, c as usize));
    w.io(
        "qcow2",
        "img.qcow2",
        &[
            format!("write -P 0x61 {} {}", sc / 2, sc),
            format!("write -P 0x62 {} {}", 5 * sc, 3 * sc),
            format!("write -z {} {}", 10 * sc, 4 * sc),
            format!("write -z {} {}", 20 * sc + 100, sc),
            format!("write -P 0x63 {} {}", c - sc / 2, sc),
            format!("write -z -u {} {}", c + 2 * sc, 2 * sc),
            format!("write -z {} {}", 3 * c + sc, sc),
            format!("write -s rand.bin {} {}", 2 * c - 7, c / 3),
            format!("discard {} {}", c + 8 * sc, 4 * sc),
            format!("write -P 0x64 {} 512", size - 512),
        ],
    );
    let t = Target::new(
        "img.qcow2",
        "qcow2",
        &[
            Expect::DataWithOffset,
            Expect::ZeroAtTop,
            Expect::Extents(8),
        ],
    );
    (w, t)
}

/// `qemu-img convert -c` of a raw disk of mixed content.
fn compressed(case: &str, opts: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("src.raw", &mixed_bytes(7, (3 * MIB + 1536) as usize));
    let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["src.raw", "img.qcow2"]);
    w.qemu_img(&args);
    (w, Target::new("img.qcow2", "qcow2", &[Expect::Compressed]))
}

/// An overlay on a raw base full of data, then zero writes in the overlay
/// (which must hide the base), with `opts` for the overlay.
fn zero_overlay(case: &str, opts: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &random_bytes(11, (2 * MIB) as usize));
    w.create(
        "top.qcow2",
        "qcow2",
        opts,
        Some(("base.raw", "raw")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&[
            "write -z 0 64k",
            "write -z 100k 50k",
            "write -z -u 256k 128k",
            "write -z -u 500k 10k",
            "write -P 0x7a 600k 70k",
            "write -z 610k 10k",
            "write -z 640k 64k",
            "discard 1m 128k",
            "write -z 2040k 8k",
        ]),
    );
    // Version 2 images have no zero flag: qemu writes zeroes as data.
    let expect = if opts.contains("compat=0.10") {
        [Expect::Depth(1), Expect::DataWithOffset]
    } else {
        [Expect::Depth(1), Expect::ZeroAtTop]
    };
    (w, Target::new("top.qcow2", "qcow2", &expect))
}

/// Internal snapshots, each followed by more writes (copy-on-write of
/// shared clusters), zero writes and a discard.
fn snapshots(case: &str, opts: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", opts, None, 3 * MIB);
    let io = |list: &[&str]| w.io("qcow2", "img.qcow2", &cmds(list));
    io(&["write -P 0x01 0 200k", "write -P 0x02 1m 100k"]);
    w.qemu_img(&["snapshot", "-c", "first", "img.qcow2"]);
    io(&["write -P 0x03 60k 10k", "write -P 0x04 2m 64k"]);
    w.qemu_img(&["snapshot", "-c", "second snapshot", "img.qcow2"]);
    io(&[
        "write -P 0x05 1m 4k",
        "write -z 128k 64k",
        "discard 2m 64k",
        "write -P 0x06 3000k 72k",
    ]);
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

/// An external data file, with or without `data_file_raw`.
fn data_file(case: &str, raw: bool) -> (Work, Target) {
    let w = Work::new(case);
    let opts = if raw {
        "data_file=data.raw,data_file_raw=on"
    } else {
        "data_file=data.bin"
    };
    w.create("img.qcow2", "qcow2", opts, None, 4 * MIB);
    w.write_file("rand.bin", &random_bytes(5, 300_000));
    w.io(
        "qcow2",
        "img.qcow2",
        &cmds(&[
            "write -P 0x41 1m 8k",
            "write -s rand.bin 100k 300000",
            "write -P 0x42 65535 3",
            "write -z 1m 4k",
            "write -z -u 192k 64k",
            "write -P 0x43 3m 64k",
            "discard 3m 64k",
            "write -P 0x44 4095k 1k",
        ]),
    );
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

fn cmds(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// raw base <- qcow2 mid (4 KiB clusters) <- qcow2 top (64 KiB clusters).
fn raw_qcow2_qcow2(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &mixed_bytes(21, (4 * MIB) as usize));
    w.create(
        "mid.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("base.raw", "raw")),
        4 * MIB,
    );
    w.io(
        "qcow2",
        "mid.qcow2",
        &cmds(&[
            "write -P 0xa1 4000 200",
            "write -P 0xa2 64k 130k",
            "write -z 1m 100k",
            "write -P 0xa3 2047k 2k",
        ]),
    );
    w.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=65536",
        Some(("mid.qcow2", "qcow2")),
        4 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&[
            "write -P 0xb1 100k 100k",
            "write -z 1088k 64k",
            "write -z 3m 10k",
            "write -P 0xb2 4095k 1k",
        ]),
    );
    (
        w,
        Target::new(
            "top.qcow2",
            "qcow2",
            &[Expect::Depth(2), Expect::ZeroAtTop, Expect::Extents(8)],
        ),
    )
}

/// Four qcow2 layers of different cluster sizes, one with extended L2.
fn four_qcow2_layers(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    let size = 4 * MIB;
    w.create("l0.qcow2", "qcow2", "cluster_size=2097152", None, size);
    w.io(
        "qcow2",
        "l0.qcow2",
        &cmds(&[
            "write -P 0x10 0 3m",
            "write -z 1m 64k",
            "write -P 0x11 3m 1k",
        ]),
    );
    let layers = [
        ("l1.qcow2", "cluster_size=512", "l0.qcow2"),
        ("l2.qcow2", "cluster_size=65536,extended_l2=on", "l1.qcow2"),
        ("l3.qcow2", "cluster_size=4096,compat=0.10", "l2.qcow2"),
    ];
    // Each layer writes at its own offsets (so every depth shows through),
    // all straddling boundaries of some layer's clusters.
    for (i, (file, opts, backing)) in layers.iter().enumerate() {
        w.create(file, "qcow2", opts, Some((backing, "qcow2")), size);
        let (p, i) = (0x20 + 0x10 * i, i as u64);
        w.io(
            "qcow2",
            file,
            &[
                format!("write -P {p:#x} {} 5000", 30 * KIB - 100 + 100 * KIB * i),
                format!(
                    "write -P {:#x} {} 6000",
                    p + 1,
                    2 * MIB - 3000 + 200 * KIB * i
                ),
                format!("write -P {:#x} {} 2048", p + 2, 3 * MIB + 7 + 150 * KIB * i),
                format!("write -z {} 4k", MIB + 64 * KIB * i),
            ],
        );
    }
    (
        w,
        Target::new(
            "l3.qcow2",
            "qcow2",
            &[Expect::Depth(3), Expect::Extents(10)],
        ),
    )
}

/// A 1 MiB base under a 3 MiB overlay, with writes across the end of the
/// base.
fn short_backing(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("base.qcow2", "qcow2", "", None, MIB);
    w.io(
        "qcow2",
        "base.qcow2",
        &cmds(&["write -P 0x51 0 1m", "write -z 64k 64k"]),
    );
    w.create(
        "mid.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "mid.qcow2",
        &cmds(&["write -P 0x52 1020k 8k", "write -P 0x53 1500k 4k"]),
    );
    w.create(
        "top.qcow2",
        "qcow2",
        "",
        Some(("mid.qcow2", "qcow2")),
        3 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&["write -P 0x54 1000k 50k", "write -P 0x55 2040k 16k"]),
    );
    (w, Target::new("top.qcow2", "qcow2", &[Expect::Depth(2)]))
}

/// A short layer in the middle: past its end the disk reads as zeroes even
/// though the base below it is longer and full of data.
fn short_middle(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &random_bytes(31, (3 * MIB) as usize));
    w.create(
        "mid.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("base.raw", "raw")),
        MIB + 4096,
    );
    w.io("qcow2", "mid.qcow2", &cmds(&["write -P 0x61 1m 4k"]));
    w.create(
        "top.qcow2",
        "qcow2",
        "",
        Some(("mid.qcow2", "qcow2")),
        3 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&["write -P 0x62 1000k 100k", "write -P 0x63 2m 1k"]),
    );
    (w, Target::new("top.qcow2", "qcow2", &[Expect::Depth(2)]))
}

/// Relative backing names across subdirectories, opened from the top
/// directory: `sub/deep/top.qcow2` -> `../mid.qcow2` -> `../base.qcow2`.
fn relative_subdir(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.mkdir("sub/deep");
    w.write_file("src.raw", &mixed_bytes(41, (2 * MIB) as usize));
    w.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "src.raw",
        "base.qcow2",
    ]);
    w.create(
        "sub/mid.qcow2",
        "qcow2",
        "",
        Some(("../base.qcow2", "qcow2")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "sub/mid.qcow2",
        &cmds(&["write -P 0x71 60k 10k", "write -z 1m 128k"]),
    );
    w.create(
        "sub/deep/top.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("../mid.qcow2", "qcow2")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "sub/deep/top.qcow2",
        &cmds(&["write -P 0x72 62k 1k", "write -P 0x73 1030k 5k"]),
    );
    (
        w,
        Target::new("sub/deep/top.qcow2", "qcow2", &[Expect::Depth(2)]),
    )
}

/// A raw base whose size is not a multiple of 512, under a longer overlay
/// with writes around its end.
fn odd_raw_base(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &random_bytes(51, 1_000_000));
    w.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("base.raw", "raw")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&["write -P 0x81 995000 2000", "write -P 0x82 1003520 512"]),
    );
    (w, Target::new("top.qcow2", "qcow2", &[Expect::Depth(1)]))
}

/// Compressed clusters written with `qemu-io write -c` into an overlay.
fn compressed_top(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &mixed_bytes(61, (2 * MIB) as usize));
    w.create(
        "top.qcow2",
        "qcow2",
        "compression_type=zstd",
        Some(("base.raw", "raw")),
        2 * MIB,
    );
    w.io(
        "qcow2",
        "top.qcow2",
        &cmds(&[
            "write -c -P 0x91 64k 64k",
            "write -c -P 0x92 128k 64k",
            "write -c -P 0x93 1m 64k",
            "write -P 0x94 1m 4k",
        ]),
    );
    (
        w,
        Target::new(
            "top.qcow2",
            "qcow2",
            &[Expect::Compressed, Expect::Depth(1)],
        ),
    )
}

/// A compressed image later written to: partial rewrites of compressed
/// clusters, zero writes, more compressed writes (v2, 4 KiB clusters).
fn compressed_then_written(case: &str) -> (Work, Target) {
    let (w, _) = compressed(case, "cluster_size=4096,compat=0.10");
    w.io(
        "qcow2",
        "img.qcow2",
        &cmds(&[
            "write -P 0xc1 10000 3000",
            "write -z 40k 8k",
            // Compressed writes need an unallocated cluster.
            "discard 1m 4k",
            "write -c -P 0xc2 1m 4k",
            "write -P 0xc3 3m 1536",
        ]),
    );
    (
        w,
        Target::new(
            "img.qcow2",
            "qcow2",
            &[Expect::Compressed, Expect::DataWithOffset],
        ),
    )
}

/// A raw image with holes.
fn sparse_raw(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.raw", "raw", "", None, 4 * MIB);
    w.io(
        "raw",
        "img.raw",
        &cmds(&[
            "write -P 0xd1 0 1",
            "write -P 0xd2 100k 300k",
            "write -z 200k 64k",
            "write -P 0xd3 4095k 1k",
        ]),
    );
    (w, Target::new("img.raw", "raw", &[Expect::DataWithOffset]))
}

/// A raw image whose size is not a multiple of 512.
fn odd_raw(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("img.raw", &random_bytes(71, 777_777));
    (w, Target::new("img.raw", "raw", &[Expect::DataWithOffset]))
}

/// A lazy-refcounts image whose writer died (`qemu-io abort`): the dirty
/// flag stays set.
fn dirty_lazy_refcounts(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", "lazy_refcounts=on", None, 2 * MIB);
    let r = w.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xe1 60k 200k",
            "-c",
            "write -z 100k 64k",
            "-c",
            "abort",
            "img.qcow2",
        ],
    );
    assert!(!r.ok(), "[{case}] qemu-io abort should have died: {r}");
    let info = w.json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    assert_eq!(
        info["dirty-flag"], true,
        "[{case}] broken recipe: image not dirty: {info}"
    );
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

/// A virtual size that is no multiple of the cluster size (nor of 512:
/// qemu rounds it up to a sector), with writes around the end.
fn odd_virtual_size(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", "", None, 1_000_000);
    let info = w.json(&w.qemu_img(&["info", "--output=json", "img.qcow2"]));
    let size = info["virtual-size"].as_u64().expect("virtual-size");
    w.io(
        "qcow2",
        "img.qcow2",
        &[
            format!("write -P 0xf1 {} 1000", 983_040 - 500),
            format!("write -P 0xf2 {} 512", size - 512),
        ],
    );
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

/// `qemu-img create -o preallocation=...`, then a few writes.
fn preallocated(case: &str, opts: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", opts, None, 2 * MIB);
    w.io(
        "qcow2",
        "img.qcow2",
        &cmds(&[
            "write -P 0xf3 100k 10k",
            "write -z 512k 64k",
            "write -z -u 1m 128k",
        ]),
    );
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

/// Persistent dirty bitmaps (only `info` shows them).
fn bitmaps(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", "", None, 2 * MIB);
    w.qemu_img(&[
        "bitmap",
        "--add",
        "--granularity",
        "65536",
        "img.qcow2",
        "b0",
    ]);
    w.qemu_img(&["bitmap", "--add", "--disable", "img.qcow2", "second bitmap"]);
    w.io("qcow2", "img.qcow2", &cmds(&["write -P 0xf4 1m 100k"]));
    (
        w,
        Target::new("img.qcow2", "qcow2", &[Expect::DataWithOffset]),
    )
}

/// An overlay shorter than its backing file: the map ends with the overlay.
fn long_backing(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &mixed_bytes(81, (4 * MIB) as usize));
    w.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=4096",
        Some(("base.raw", "raw")),
        MIB + 512,
    );
    w.io("qcow2", "top.qcow2", &cmds(&["write -P 0xf5 1020k 4k"]));
    (w, Target::new("top.qcow2", "qcow2", &[Expect::Depth(1)]))
}

/// `qemu-img convert -c -B`: an overlay's own clusters recompressed into a
/// new overlay of the same base.
fn compressed_over_backing(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("base.raw", &mixed_bytes(91, (2 * MIB) as usize));
    w.write_file("rand.bin", &random_bytes(92, 100_000));
    w.create("src.qcow2", "qcow2", "", Some(("base.raw", "raw")), 2 * MIB);
    w.io(
        "qcow2",
        "src.qcow2",
        &cmds(&[
            "write -s rand.bin 300000 100000",
            "write -P 0x3c 700k 200k",
            "write -z 1500000 100000",
        ]),
    );
    w.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-B",
        "base.raw",
        "-F",
        "raw",
        "src.qcow2",
        "top.qcow2",
    ]);
    (
        w,
        Target::new(
            "top.qcow2",
            "qcow2",
            &[Expect::Compressed, Expect::Depth(1)],
        ),
    )
}

/// Compressed clusters in an extended-L2 image, partly rewritten (which
/// turns them into normal clusters with some subclusters allocated).
fn extended_l2_compressed(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", "extended_l2=on", None, 2 * MIB);
    w.io(
        "qcow2",
        "img.qcow2",
        &cmds(&[
            "write -c -P 0x13 0 64k",
            "write -c -P 0x14 256k 64k",
            "write -c -P 0x15 1m 64k",
            "write -P 0x16 260k 2k",
            "write -z 1m 2k",
            "write -P 0x17 128k 3k",
        ]),
    );
    (
        w,
        Target::new(
            "img.qcow2",
            "qcow2",
            &[Expect::Compressed, Expect::DataWithOffset],
        ),
    )
}

/// A raw image of size 0.
fn empty_raw(case: &str) -> (Work, Target) {
    let w = Work::new(case);
    w.write_file("img.raw", b"");
    (w, Target::new("img.raw", "raw", &[]))
}

fn empty(case: &str, size: u64) -> (Work, Target) {
    let w = Work::new(case);
    w.create("img.qcow2", "qcow2", "", None, size);
    (w, Target::new("img.qcow2", "qcow2", &[]))
}

// ------------------------------------------------------------------ cases --

/// The case table: one `#[test]` per line, `case::NAME`, which builds its
/// image with `RECIPE("NAME", ARGS...)`.
macro_rules! cases {
    ($($name:ident => $recipe:ident($($arg:expr),*);)*) => {
        mod case {
            use super::*;
            $(
                #[test]
                fn $name() {
                    let (w, t): (Work, Target) = super::$recipe(stringify!($name) $(, $arg)*);
                    assert_eq!(w.case, stringify!($name), "case name mismatch");
                    check(&w, &t);
                }
            )*
        }
    };
}

cases! {
    cluster_512 => plain(512, "");
    cluster_4k => plain(4096, "");
    cluster_64k => plain(65536, "");
    cluster_2m => plain(2 * MIB, "");
    compat_v2_4k => plain(4096, ",compat=0.10");
    compat_v2_64k => plain(65536, ",compat=0.10");
    refcount_bits_1 => plain(65536, ",refcount_bits=1");
    refcount_bits_64 => plain(512, ",refcount_bits=64");
    extended_l2_64k => extended_l2(65536);
    extended_l2_2m => extended_l2(2 * MIB);
    compressed_zlib => compressed("");
    compressed_zstd => compressed("compression_type=zstd");
    compressed_zlib_512 => compressed("cluster_size=512");
    compressed_zstd_2m => compressed("cluster_size=2097152,compression_type=zstd");
    compressed_zlib_v2 => compressed("compat=0.10");
    compressed_rewritten => compressed_then_written();
    zero_writes_overlay => zero_overlay("");
    zero_writes_overlay_v2 => zero_overlay("compat=0.10");
    zero_writes_overlay_extended_l2 => zero_overlay("extended_l2=on");
    snapshots_v3 => snapshots("");
    snapshots_v2 => snapshots("compat=0.10,cluster_size=4096");
    data_file_raw => data_file(true);
    data_file_not_raw => data_file(false);
    chain_raw_qcow2_qcow2 => raw_qcow2_qcow2();
    chain_qcow2_depth4 => four_qcow2_layers();
    chain_short_backing => short_backing();
    chain_short_middle => short_middle();
    chain_relative_subdir => relative_subdir();
    chain_odd_raw_base => odd_raw_base();
    chain_compressed_top => compressed_top();
    raw_sparse => sparse_raw();
    raw_odd_size => odd_raw();
    empty_qcow2 => empty(3 * MIB);
    empty_qcow2_size_zero => empty(0);
    extended_l2_compressed => extended_l2_compressed();
    lazy_refcounts => plain(65536, ",lazy_refcounts=on");
    odd_virtual_size => odd_virtual_size();
    prealloc_metadata => preallocated("preallocation=metadata");
    prealloc_metadata_extended_l2 => preallocated("preallocation=metadata,extended_l2=on");
    prealloc_falloc => preallocated("preallocation=falloc");
    prealloc_full => preallocated("preallocation=full,cluster_size=4096");
    bitmaps => bitmaps();
    chain_long_backing => long_backing();
    chain_compressed_over_backing => compressed_over_backing();
    raw_empty => empty_raw();
    dirty_lazy_refcounts => dirty_lazy_refcounts();
}

/// `map --start-offset/--max-length` windows, unaligned, across a chain.
#[test]
fn map_windows() {
    let (w, t) = raw_qcow2_qcow2("map_windows");
    let mut f = Failures::new(&w.case);
    for (start, len) in [
        (0, 1),
        (1000, 50_000),
        (4000, 1),
        (65_535, 200_000),
        (3 * MIB, MIB),
    ] {
        let (start, len) = (start.to_string(), len.to_string());
        let q = w.qemu_img(&[
            "map",
            "--output=json",
            "-f",
            t.fmt,
            "--start-offset",
            &start,
            "--max-length",
            &len,
            &t.file,
        ]);
        let c = w.cowshed(&[
            "map",
            "--output",
            "json",
            "-f",
            t.fmt,
            "--start-offset",
            &start,
            "--max-length",
            &len,
            &t.file,
        ]);
        let qemu = merge_extents(w.json(&q).as_array().expect("array"));
        let ours = match serde_json::from_str::<Value>(&c.stdout) {
            Ok(Value::Array(a)) if c.ok() => merge_extents(&a),
            _ => {
                f.push(&format!("map window {start}+{len}"), format!("{c}"));
                continue;
            }
        };
        f.check(qemu == ours, &format!("map window {start}+{len}"), || {
            extent_diff(&qemu, &ours)
        });
    }
    f.finish();
}

/// The other convert flags (explicit source format, cache mode, progress)
/// must not change the bytes written.
#[test]
fn convert_flags() {
    let (w, t) = raw_qcow2_qcow2("convert_flags");
    let reference = "qemu-ref.raw";
    w.qemu_img(&["convert", "-f", t.fmt, "-O", "raw", &t.file, reference]);
    let theirs = w.read_file(reference);
    for flags in [&["-t", "unsafe"][..], &["-t", "writeback", "-p"], &["-p"]] {
        let mut args = vec!["convert", "-f", t.fmt, "-O", "raw"];
        args.extend(flags);
        args.extend([t.file.as_str(), "out.raw"]);
        let c = w.cowshed(&args);
        assert!(c.ok(), "[convert_flags] {flags:?}: cowshed failed: {c}");
        let ours = w.read_file("out.raw");
        assert!(
            ours == theirs,
            "[convert_flags] {flags:?}: output differs from qemu-img's (first at {:?})",
            first_difference(&theirs, &ours)
        );
        std::fs::remove_file(w.path("out.raw")).expect("remove out.raw");
    }
}

// ------------------------------------------- the comparators can fail too --

#[test]
fn merge_rule_follows_qemu() {
    let e = |s: u64, l: u64, zero: bool, off: Option<u64>| {
        let mut v = serde_json::json!({"start": s, "length": l, "depth": 0, "present": true,
                                       "zero": zero, "data": !zero, "compressed": false});
        if let Some(o) = off {
            v["offset"] = o.into();
        }
        v
    };
    // Contiguous guest and host ranges merge; a host gap, a flag change or
    // an offset on one side only does not.
    let merged = merge_extents(&[
        e(0, 512, false, Some(4096)),
        e(512, 512, false, Some(4608)),
        e(1024, 512, false, Some(9000)),
        e(1536, 512, true, Some(9512)),
        e(2048, 512, true, None),
        e(2560, 512, true, None),
    ]);
    assert_eq!(
        merged,
        vec![
            e(0, 1024, false, Some(4096)),
            e(1024, 512, false, Some(9000)),
            e(1536, 512, true, Some(9512)),
            e(2048, 1024, true, None),
        ]
    );
}

#[test]
fn info_comparison_catches_differences() {
    let qemu = serde_json::json!({
        "virtual-size": 1, "filename": "a", "children": [1],
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}},
    });
    let same = serde_json::json!({
        "virtual-size": 1, "filename": "a", "children": [2], "extra": true,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false, "x": 1}},
    });
    assert!(info_differences("t", &qemu, &same).is_empty());
    let mut wrong = same.clone();
    wrong["virtual-size"] = 2.into();
    wrong["format-specific"]["data"]
        .as_object_mut()
        .unwrap()
        .remove("corrupt");
    let d = info_differences("t", &qemu, &wrong);
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d[0].contains("virtual-size") || d[1].contains("virtual-size"));
    assert!(d.iter().any(|m| m.contains("format-specific.data.corrupt")));
}
