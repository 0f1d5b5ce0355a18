//! `cowshed check` on images corrupted on purpose: the same verdict (JSON
//! counters) and exit code as `qemu-img check`. Clean images of the whole
//! oracle matrix are compared in tests/oracle.rs.

mod common;

use common::bytes::{file_be64, poke};

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn qemu(cwd: &Path, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (exit code, parsed JSON) of `check --output json`.
fn run_check(prog: &str, file: &Path) -> (Option<i32>, Value) {
    let args: &[&str] = if prog == "qemu-img" {
        &["check", "--output=json"]
    } else {
        &["check", "--output", "json"]
    };
    let out = Command::new(prog).args(args).arg(file).output().unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code(), v)
}

/// A 4 MiB image, 64 KiB clusters: data in the first cluster, one
/// compressed cluster, a zero cluster. Returns (path, L1 offset, first L2
/// offset, refcount table offset, first refblock offset).
fn image(dir: &Path, name: &str) -> (std::path::PathBuf, u64, u64, u64, u64) {
    qemu(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", name, "4M"],
    );
    qemu(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -c -P 0x22 1M 64k",
            "-c",
            "write -z 2M 64k",
            name,
        ],
    );
    let p = dir.join(name);
    let l1 = file_be64(&p, 40);
    let l2 = file_be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let reftable = file_be64(&p, 48);
    let refblock = file_be64(&p, reftable) & !0x1ff;
    (p, l1, l2, reftable, refblock)
}

fn assert_same_verdict(case: &str, file: &Path, want_code: i32) {
    let (qc, qj) = run_check("qemu-img", file);
    let (cc, cj) = run_check(env!("CARGO_BIN_EXE_cowshed"), file);
    assert_eq!(
        qc,
        Some(want_code),
        "{case}: the corruption recipe did not give qemu-img exit {want_code}: {qj}"
    );
    assert_eq!(
        cc, qc,
        "{case}: exit codes differ; qemu-img {qj}, cowshed {cj}"
    );
    assert_eq!(cj, qj, "{case}: JSON differs");
}

#[test]
fn corrupted_images_get_qemu_img_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Stored refcount above the references: a leak (exit 3).
    let (p, _, _, _, rb) = image(d, "leak.qcow2");
    poke(&p, rb, &2u16.to_be_bytes()); // the header cluster
    assert_same_verdict("leak", &p, 3);

    // Stored refcount below the references: corruption (exit 2), and the
    // data cluster's COPIED flag no longer matches.
    let (p, _, l2, _, rb) = image(d, "low.qcow2");
    let data_cluster = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    poke(&p, rb + 2 * data_cluster, &0u16.to_be_bytes());
    assert_same_verdict("refcount too low", &p, 2);

    // An L2 entry pointing far past the end of the file.
    let (p, _, l2, _, _) = image(d, "pasteof.qcow2");
    poke(&p, l2, &(0x8000_0000_4000_0000u64).to_be_bytes());
    assert_same_verdict("L2 past EOF", &p, 2);

    // An L1 entry pointing at the refcount table: overlapping tables.
    let (p, l1, _, reftable, _) = image(d, "overlap.qcow2");
    poke(&p, l1, &(reftable | 1 << 63).to_be_bytes());
    assert_same_verdict("overlapping tables", &p, 2);

    // A misaligned data cluster and reserved bits in an L2 entry.
    let (p, _, l2, _, _) = image(d, "misaligned.qcow2");
    let e = file_be64(&p, l2);
    poke(&p, l2, &(e + 512).to_be_bytes());
    poke(
        &p,
        l2 + 8 * 40,
        &(0x8000_0000_0000_0100u64 | e).to_be_bytes(),
    );
    assert_same_verdict("misaligned data, reserved bits", &p, 2);

    // Data written then discarded: QEMU frees the cluster, nothing leaks.
    let (p, ..) = image(d, "discarded.qcow2");
    qemu(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 3M 64k",
            "-c",
            "discard 3M 64k",
            "discarded.qcow2",
        ],
    );
    assert_same_verdict("clean after discard", &p, 0);
}

#[test]
fn raw_images_have_no_check_and_clean_ones_pass() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, "qemu-img", &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["check", "-f", "raw", "r.raw"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(63));
    let (p, ..) = image(d, "clean.qcow2");
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .arg("check")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    let q = Command::new("qemu-img")
        .arg("check")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(
        text,
        String::from_utf8_lossy(&q.stdout),
        "human output differs"
    );
}

#[test]
fn repair_leaks_like_qemu_img_and_leave_corrupt_images_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p, _, l2, _, rb) = image(d, "leak.qcow2");
    poke(&p, rb, &2u16.to_be_bytes());
    let data_cluster = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    // A second leak: a data cluster counted twice.
    poke(&p, rb + 2 * data_cluster, &2u16.to_be_bytes());
    std::fs::copy(&p, d.join("qemu.qcow2")).unwrap();
    let q = Command::new("qemu-img")
        .args(["check", "-r", "leaks", "--output=json", "qemu.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    let c = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["check", "-r", "leaks", "--output", "json", "leak.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(
        c.status.code(),
        q.status.code(),
        "{}",
        String::from_utf8_lossy(&c.stderr)
    );
    let qj: Value = serde_json::from_slice(&q.stdout).unwrap();
    let mut cj: Value = serde_json::from_slice(&c.stdout).unwrap();
    cj["filename"] = qj["filename"].clone();
    assert_eq!(cj, qj, "JSON after repair differs");
    assert_eq!(qj["leaks-fixed"], 2, "recipe: two leaks");
    assert_eq!(
        run_check("qemu-img", &p).0,
        Some(0),
        "repaired image is clean for QEMU"
    );

    // A refcount of 0 on a used cluster needs a rebuild: -r leaks repairs
    // nothing, not even the leak, and the check fails (exit 1), as QEMU's.
    let (p, _, l2, _, rb) = image(d, "low.qcow2");
    let data_cluster = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    poke(&p, rb + 2 * data_cluster, &0u16.to_be_bytes());
    poke(&p, rb, &2u16.to_be_bytes());
    std::fs::copy(&p, d.join("q-low.qcow2")).unwrap();
    let before = std::fs::read(&p).unwrap();
    let c = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["check", "-r", "leaks"])
        .arg(&p)
        .output()
        .unwrap();
    let q = Command::new("qemu-img")
        .args(["check", "-r", "leaks", "q-low.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    assert_eq!(q.status.code(), Some(1), "recipe: QEMU needs a rebuild");
    assert_eq!(c.status.code(), q.status.code());
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a corrupt image was written"
    );

    // Corruptions that need no rebuild (a count too low): QEMU frees the
    // leak next to them (exit 2); cowshed, on purpose, writes nothing while
    // corruptions stand (exit 1): a leaked cluster may be the one a corrupt
    // entry meant. `-r all` repairs both.
    let (p, _, l2, _, rb) = image(d, "low2.qcow2");
    qemu(d, "qemu-img", &["snapshot", "-c", "s", "low2.qcow2"]);
    let data_cluster = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    poke(&p, rb + 2 * data_cluster, &1u16.to_be_bytes());
    poke(&p, rb, &2u16.to_be_bytes());
    std::fs::copy(&p, d.join("q-low2.qcow2")).unwrap();
    let run = |prog: &str, file: &str| {
        let json: &[&str] = if prog == "qemu-img" {
            &["--output=json"]
        } else {
            &["--output", "json"]
        };
        let out = Command::new(prog)
            .args(["check", "-r", "leaks"])
            .args(json)
            .arg(file)
            .current_dir(d)
            .output()
            .unwrap();
        let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.remove("filename");
        }
        (out.status.code(), v)
    };
    let (qc, qj) = run("qemu-img", "q-low2.qcow2");
    let before = std::fs::read(&p).unwrap();
    let (cc, _) = run(env!("CARGO_BIN_EXE_cowshed"), "low2.qcow2");
    assert_eq!(qc, Some(2), "recipe: {qj}");
    assert_eq!(cc, Some(1));
    assert!(
        std::fs::read(&p).unwrap() == before,
        "-r leaks wrote into an image with corruptions"
    );
    // An unaligned refblock: the check fails and QEMU marks the image
    // corrupt on its way; so does cowshed (same bytes).
    let (p, _, _, reftable, rb) = image(d, "unaligned.qcow2");
    poke(&p, reftable, &(rb + 512).to_be_bytes());
    std::fs::copy(&p, d.join("q-unaligned.qcow2")).unwrap();
    let (qc, _) = run("qemu-img", "q-unaligned.qcow2");
    let (cc, _) = run(env!("CARGO_BIN_EXE_cowshed"), "unaligned.qcow2");
    assert_eq!((cc, qc), (Some(1), Some(1)));
    assert!(
        std::fs::read(&p).unwrap() == std::fs::read(d.join("q-unaligned.qcow2")).unwrap(),
        "files differ after -r leaks on an unaligned refblock"
    );
}

/// (exit code, JSON without `filename`, stdout) of `check -r all`.
fn repair_all(prog: &str, dir: &Path, file: &str, json: bool) -> (Option<i32>, Value, String) {
    let mut args = vec!["check", "-r", "all"];
    if json {
        args.extend(if prog == "qemu-img" {
            &["--output=json"][..]
        } else {
            &["--output", "json"][..]
        });
    }
    let out = Command::new(prog)
        .args(&args)
        .arg(file)
        .current_dir(dir)
        .output()
        .unwrap();
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("filename");
    }
    (
        out.status.code(),
        v,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Repair one copy with qemu-img and one with cowshed: same exit code, same
/// JSON (repair counters included), same verdict of `qemu-img check`
/// afterwards, same guest content (`qemu-img compare`), and the same bytes:
/// cowshed places a rebuilt refcount structure where QEMU does, so the two
/// files come out identical (QEMU sets the corrupt bit when it stops a
/// write on metadata, and so does cowshed).
fn assert_same_repair(dir: &Path, name: &str, want_code: i32) {
    assert_same_repair_maybe_bytes(dir, name, want_code, true);
}

fn assert_same_repair_maybe_bytes(dir: &Path, name: &str, want_code: i32, same_bytes: bool) {
    let q = format!("q-{name}");
    let c = format!("c-{name}");
    std::fs::copy(dir.join(name), dir.join(&q)).unwrap();
    std::fs::copy(dir.join(name), dir.join(&c)).unwrap();
    let (qc, qj, _) = repair_all("qemu-img", dir, &q, true);
    let (cc, cj, _) = repair_all(env!("CARGO_BIN_EXE_cowshed"), dir, &c, true);
    assert_eq!(
        qc,
        Some(want_code),
        "{name}: recipe did not give qemu-img exit {want_code}: {qj}"
    );
    assert_eq!(
        cc, qc,
        "{name}: exit codes differ; qemu-img {qj}, cowshed {cj}"
    );
    assert_eq!(cj, qj, "{name}: JSON after repair differs");
    let (qa, _) = run_check("qemu-img", &dir.join(&q));
    let (ca, cja) = run_check("qemu-img", &dir.join(&c));
    assert_eq!(ca, qa, "{name}: qemu-img check after repair: {cja}");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", &q, &c])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(cmp.status.code(), Some(0), "{name}: guest content differs");
    if !same_bytes {
        return;
    }
    let (qb, cb) = (
        std::fs::read(dir.join(&q)).unwrap(),
        std::fs::read(dir.join(&c)).unwrap(),
    );
    assert!(
        qb == cb,
        "{name}: repaired files differ (first at byte {:?})",
        qb.iter().zip(&cb).position(|(a, b)| a != b)
    );
}

/// A refblock said to lie at `offset`, past the end of the file: qemu-img
/// grows the file to it and rebuilds; cowshed rebuilds in the file as it
/// is. Both exit 0, both results check clean and read the same.
fn assert_repaired_without_growth(dir: &Path, name: &str, offset: u64) {
    let q = format!("q-{name}");
    let c = format!("c-{name}");
    std::fs::copy(dir.join(name), dir.join(&q)).unwrap();
    std::fs::copy(dir.join(name), dir.join(&c)).unwrap();
    let before = std::fs::metadata(dir.join(name)).unwrap().len();
    let (qc, qj, _) = repair_all("qemu-img", dir, &q, true);
    let (cc, cj, _) = repair_all(env!("CARGO_BIN_EXE_cowshed"), dir, &c, true);
    assert_eq!(
        (qc, cc),
        (Some(0), Some(0)),
        "{name}: qemu-img {qj}, cowshed {cj}"
    );
    let qlen = std::fs::metadata(dir.join(&q)).unwrap().len();
    let clen = std::fs::metadata(dir.join(&c)).unwrap().len();
    assert!(
        qlen > offset,
        "{name}: qemu-img no longer grows the file ({qlen})"
    );
    assert!(
        clen <= before + 4 * 65536,
        "{name}: cowshed grew the file from {before} to {clen}"
    );
    assert_eq!(run_check("qemu-img", &dir.join(&c)).0, Some(0), "{name}");
    let cmp = Command::new("qemu-img")
        .args(["compare", "-q", &q, &c])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_eq!(cmp.status.code(), Some(0), "{name}: guest content differs");
}

#[test]
fn repair_all_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rc = |p: &Path, cluster: u64, v: u16| {
        let reftable = file_be64(p, 48);
        let rb = file_be64(p, reftable) & !0x1ff;
        poke(p, rb + 2 * cluster, &v.to_be_bytes());
    };

    // Leaked cluster (the header counted twice).
    let (p, ..) = image(d, "leak.qcow2");
    rc(&p, 0, 2);
    assert_same_repair(d, "leak.qcow2", 0);

    // Refcount too low: a cluster shared with a snapshot counted once.
    let (p, _, l2, ..) = image(d, "low.qcow2");
    qemu(d, "qemu-img", &["snapshot", "-c", "s1", "low.qcow2"]);
    let data = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    rc(&p, data, 1);
    assert_same_repair(d, "low.qcow2", 0);

    // Refcount zero on a used data cluster: rebuild.
    let (p, _, l2, ..) = image(d, "zero.qcow2");
    rc(&p, (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536, 0);
    assert_same_repair(d, "zero.qcow2", 0);

    // The refblock pointer points into the L2 table: rebuild.
    let (p, _, l2, reftable, _) = image(d, "rb-in-l2.qcow2");
    poke(&p, reftable, &l2.to_be_bytes());
    assert_same_repair(d, "rb-in-l2.qcow2", 0);

    // Reftable entries past the end of the file (the first one, and an
    // unused second one): QEMU grows the file to hold them, then rebuilds;
    // cowshed rebuilds without growing the file (on purpose: see
    // tests/hostile.rs for offsets where QEMU's growth is not sane).
    let (p, _, _, reftable, _) = image(d, "rb-eof0.qcow2");
    poke(&p, reftable, &0x10_0000u64.to_be_bytes());
    assert_repaired_without_growth(d, "rb-eof0.qcow2", 0x10_0000);
    let (p, _, _, reftable, _) = image(d, "rb-eof1.qcow2");
    poke(&p, reftable + 8, &0x100_0000u64.to_be_bytes());
    assert_repaired_without_growth(d, "rb-eof1.qcow2", 0x100_0000);

    // An unaligned refblock offset, and reserved bits in a reftable entry:
    // the rebuilt refblock would land on what the table still names a
    // refblock, so QEMU stops (exit 1) and marks the image corrupt.
    let (p, _, _, reftable, rb) = image(d, "rb-unaligned.qcow2");
    poke(&p, reftable, &(rb + 512).to_be_bytes());
    assert_same_repair(d, "rb-unaligned.qcow2", 1);
    let (p, _, _, reftable, rb) = image(d, "rb-reserved.qcow2");
    poke(&p, reftable, &(rb | 0x100).to_be_bytes());
    assert_same_repair(d, "rb-reserved.qcow2", 1);

    // An unaligned refblock whose rebuild lands elsewhere: QEMU marks the
    // image corrupt, rebuilds, then fails its second check (exit 1) with
    // the last leak repair never written (a leak remains). cowshed exits 1
    // too, with everything repaired but the corrupt bit, which the next
    // `check -r all` clears.
    let (p, _, _, reftable, _) = image(d, "rb-unaligned2.qcow2");
    let l1 = file_be64(&p, 40);
    poke(&p, reftable, &(l1 + 512).to_be_bytes());
    std::fs::copy(&p, d.join("q-rb-unaligned2.qcow2")).unwrap();
    let (qc, ..) = repair_all("qemu-img", d, "q-rb-unaligned2.qcow2", true);
    let (cc, ..) = repair_all(
        env!("CARGO_BIN_EXE_cowshed"),
        d,
        "rb-unaligned2.qcow2",
        true,
    );
    assert_eq!((cc, qc), (Some(1), Some(1)));
    assert_eq!(
        run_check("qemu-img", &d.join("q-rb-unaligned2.qcow2")).0,
        Some(3)
    );
    assert_eq!(run_check("qemu-img", &p).0, Some(0));
    let (cc, ..) = repair_all(
        env!("CARGO_BIN_EXE_cowshed"),
        d,
        "rb-unaligned2.qcow2",
        true,
    );
    assert_eq!(cc, Some(0));
    assert_eq!(
        file_be64(&p, 72) & 2,
        0,
        "corrupt bit cleared by the second run"
    );

    // An L2 entry pointing past the end of the file cannot be repaired: the
    // cluster it owned is freed, its COPIED flag cleared, exit 2.
    let (p, _, l2, ..) = image(d, "l2-eof.qcow2");
    poke(&p, l2, &0x8000_0000_4000_0000u64.to_be_bytes());
    assert_same_repair(d, "l2-eof.qcow2", 2);

    // Overlapping tables: an L1 entry pointing at the refcount table.
    let (p, l1, _, reftable, _) = image(d, "overlap.qcow2");
    poke(&p, l1, &(reftable | 1 << 63).to_be_bytes());
    assert_same_repair(d, "overlap.qcow2", 0);

    // A preallocated (zero) cluster at an unaligned offset becomes a zero
    // cluster; a wrong COPIED flag is set right.
    let (p, _, l2, ..) = image(d, "prealloc.qcow2");
    poke(&p, l2 + 8 * 32, &0x8000_0000_0007_0201u64.to_be_bytes());
    assert_same_repair(d, "prealloc.qcow2", 0);
    let (p, l1, ..) = image(d, "copied.qcow2");
    let e = file_be64(&p, l1);
    poke(&p, l1, &(e & !(1 << 63)).to_be_bytes());
    assert_same_repair(d, "copied.qcow2", 0);

    // Dirty and corrupt bits with a leak: repaired, bits cleared.
    let (p, ..) = image(d, "bits.qcow2");
    rc(&p, 0, 2);
    poke(&p, 72, &3u64.to_be_bytes());
    assert_same_repair(d, "bits.qcow2", 0);

    // Clean: nothing written.
    image(d, "clean.qcow2");
    assert_same_repair(d, "clean.qcow2", 0);
}

#[test]
fn repair_all_rebuilds_other_layouts_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let refblock = |p: &Path| file_be64(p, file_be64(p, 48)) & !0x1ff;

    // 512-byte clusters, 1-bit refcounts, data over many refblocks; the
    // first refblock dropped from the table: 4095 corruptions, one rebuild
    // with many refblocks.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            "small.qcow2",
            "8M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 2M",
            "-c",
            "write -c -P 2 3M 64k",
            "small.qcow2",
        ],
    );
    let p = d.join("small.qcow2");
    poke(&p, file_be64(&p, 48), &0u64.to_be_bytes());
    assert_same_repair(d, "small.qcow2", 0);

    // 4 KiB clusters, 64-bit refcounts, a data cluster's count zeroed.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=64",
            "w64.qcow2",
            "8M",
        ],
    );
    qemu(d, "qemu-io", &["-c", "write -P 1 0 100k", "w64.qcow2"]);
    let p = d.join("w64.qcow2");
    poke(&p, refblock(&p) + 8 * 5, &0u64.to_be_bytes());
    assert_same_repair(d, "w64.qcow2", 0);

    // Extended L2 and a snapshot: a leak and a count too low.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "ext.qcow2",
            "4M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-c",
            "write -P 1 0 4k",
            "-c",
            "write -P 2 64k 64k",
            "ext.qcow2",
        ],
    );
    qemu(d, "qemu-img", &["snapshot", "-c", "s", "ext.qcow2"]);
    let p = d.join("ext.qcow2");
    let rb = refblock(&p);
    poke(&p, rb, &3u16.to_be_bytes());
    poke(&p, rb + 2 * 5, &1u16.to_be_bytes());
    assert_same_repair(d, "ext.qcow2", 0);

    // A snapshot's L2 table with its refcount zeroed: the rebuild counts
    // snapshot tables too.
    let (p, ..) = image(d, "snap.qcow2");
    qemu(d, "qemu-img", &["snapshot", "-c", "s1", "snap.qcow2"]);
    qemu(d, "qemu-io", &["-c", "write -P 9 0 64k", "snap.qcow2"]);
    poke(&p, refblock(&p) + 2 * 4, &0u16.to_be_bytes());
    assert_same_repair(d, "snap.qcow2", 0);

    // v2 image; lazy refcounts left dirty.
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "4M",
        ],
    );
    qemu(d, "qemu-io", &["-c", "write -P 1 0 64k", "v2.qcow2"]);
    let p = d.join("v2.qcow2");
    poke(&p, refblock(&p) + 2, &0u16.to_be_bytes());
    assert_same_repair(d, "v2.qcow2", 0);
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "lazy.qcow2",
            "4M",
        ],
    );
    qemu(d, "qemu-io", &["-c", "write -P 1 0 64k", "lazy.qcow2"]);
    let p = d.join("lazy.qcow2");
    poke(&p, refblock(&p) + 8, &0u16.to_be_bytes());
    poke(&p, 72, &1u64.to_be_bytes());
    assert_same_repair(d, "lazy.qcow2", 0);

    // 512-byte clusters, 10 MiB of data: the reftable takes two clusters,
    // so the rebuild's reftable must grow and be placed again. One refblock
    // dropped from the table; one data cluster's count zeroed.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let raw: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(d.join("r.raw"), raw).unwrap();
    for name in ["wide1.qcow2", "wide2.qcow2"] {
        qemu(
            d,
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=512",
                "r.raw",
                name,
            ],
        );
    }
    let p = d.join("wide1.qcow2");
    assert_eq!(file_be64(&p, 56) >> 32, 2, "recipe: a two-cluster reftable");
    poke(&p, file_be64(&p, 48) + 8 * 3, &0u64.to_be_bytes());
    assert_same_repair(d, "wide1.qcow2", 0);
    let p = d.join("wide2.qcow2");
    poke(&p, refblock(&p) + 2 * 7, &0u16.to_be_bytes());
    assert_same_repair(d, "wide2.qcow2", 0);

    // Persistent bitmaps: QEMU's read-write open marks them in use and
    // stores them again on close, at new offsets; cowshed leaves them where
    // they are (repairing refcounts changes no guest data, so they stay
    // valid). Same verdicts and content, different layout.
    let (p, ..) = image(d, "bitmap.qcow2");
    qemu(d, "qemu-img", &["bitmap", "--add", "bitmap.qcow2", "b0"]);
    qemu(d, "qemu-io", &["-c", "write -P 3 128k 64k", "bitmap.qcow2"]);
    poke(&p, refblock(&p) + 8, &0u16.to_be_bytes());
    assert_same_repair_maybe_bytes(d, "bitmap.qcow2", 0, false);
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", "c-bitmap.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
        "bitmap kept: {info}"
    );
}

#[test]
fn repair_all_human_text_and_locks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p, _, l2, reftable, _) = image(d, "h.qcow2");
    let data = (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    poke(&p, file_be64(&p, reftable) + 2 * data, &0u16.to_be_bytes());
    std::fs::copy(&p, d.join("q.qcow2")).unwrap();
    let (qc, _, qt) = repair_all("qemu-img", d, "q.qcow2", false);
    let (cc, _, ct) = repair_all(env!("CARGO_BIN_EXE_cowshed"), d, "h.qcow2", false);
    assert_eq!((cc, ct.as_str()), (qc, qt.as_str()), "human output differs");

    // A running QEMU holds the image: refused, nothing written.
    let (p, ..) = image(d, "busy.qcow2");
    poke(&p, file_be64(&p, file_be64(&p, 48)), &2u16.to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 600000", "busy.qcow2"])
        .current_dir(d)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cowshed::engine::lock_state(&p).unwrap() != cowshed::engine::LockState::Writer {
        assert!(std::time::Instant::now() < deadline, "qemu-io never locked");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["check", "-r", "all", "busy.qcow2"])
        .current_dir(d)
        .output()
        .unwrap();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a locked image was written"
    );
}

/// SIGKILL `cowshed check -r` between its repair steps (and before the
/// rebuilt refcount structure is switched in), for a leak (`-r leaks` and
/// `-r all`), a count too low and a count of zero (a rebuild): every kill
/// leaves an image that reads as before and that `qemu-img check -r all`
/// still repairs to clean.
#[test]
fn sigkill_during_repair_leaves_a_repairable_image() {
    use common::fault;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rc = |p: &Path, cluster: u64, v: u16| {
        let reftable = file_be64(p, 48);
        let rb = file_be64(p, reftable) & !0x1ff;
        poke(p, rb + 2 * cluster, &v.to_be_bytes());
    };
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let (p, ..) = image(&src, "leak.qcow2");
    rc(&p, 0, 2);
    let (p, _, l2, ..) = image(&src, "low.qcow2");
    qemu(&src, "qemu-img", &["snapshot", "-c", "s1", "low.qcow2"]);
    rc(&p, (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536, 1);
    let (p, _, l2, ..) = image(&src, "zero.qcow2");
    rc(&p, (file_be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536, 0);
    for name in ["leak.qcow2", "low.qcow2", "zero.qcow2"] {
        let view = format!("{name}.raw");
        qemu(&src, "qemu-img", &["convert", "-O", "raw", name, &view]);
    }
    let cases = [
        ("leak.qcow2", "leaks", &["check.repair.refcounts_fixed"][..]),
        ("leak.qcow2", "all", &["check.repair.refcounts_fixed"][..]),
        ("low.qcow2", "all", &["check.repair.refcounts_fixed"][..]),
        (
            "zero.qcow2",
            "all",
            &[
                "check.rebuild.before_switch",
                "check.repair.rebuilt",
                "check.repair.refcounts_fixed",
            ][..],
        ),
    ];
    let mut n = 0;
    for (name, mode, must) in cases {
        let args = ["check", "-r", mode, name];
        let full = d.join(format!("full{n}"));
        std::fs::create_dir(&full).unwrap();
        std::fs::copy(src.join(name), full.join(name)).unwrap();
        let trace = fault::trace(&full, &args);
        for p in must.iter().chain(&["check.repair.copied_flags_fixed"]) {
            assert!(
                trace.hits(p) > 0,
                "{name} -r {mode} never passed {p}: {:?}",
                trace.counts()
            );
        }
        for (point, hit) in fault::choose(&trace, 4) {
            n += 1;
            let t = d.join(format!("t{n}"));
            std::fs::create_dir(&t).unwrap();
            std::fs::copy(src.join(name), t.join(name)).unwrap();
            fault::kill_at(&t, &args, &point, hit);
            let what = format!("{name} -r {mode} killed at {point} #{hit}");
            let view = format!("../src/{name}.raw");
            common::run::ok(&t, "qemu-img", &["compare", name, &view]);
            let out = common::run::run(&t, "qemu-img", &["check", "-r", "all", name]);
            assert!(
                out.status.success(),
                "{what}: qemu-img check -r all: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_eq!(common::run::check_code(&t, name), 0, "{what}");
            common::run::ok(&t, "qemu-img", &["compare", name, &view]);
            std::fs::remove_dir_all(&t).unwrap();
        }
        n += 1;
    }
}
