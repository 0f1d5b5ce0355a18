//! `cowshed check` on images corrupted on purpose: the same verdict (JSON
//! counters) and exit code as `qemu-img check`. Clean images of the whole
//! oracle matrix are compared in tests/oracle.rs.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
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

fn be64(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn poke(path: &Path, at: u64, bytes: &[u8]) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
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
    let l1 = be64(&p, 40);
    let l2 = be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let reftable = be64(&p, 48);
    let refblock = be64(&p, reftable) & !0x1ff;
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
    let data_cluster = (be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
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
    let e = be64(&p, l2);
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
    let data_cluster = (be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
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

    // Corruptions: -r leaks repairs nothing and says so by its exit code.
    let (p, _, l2, _, rb) = image(d, "low.qcow2");
    let data_cluster = (be64(&p, l2) & 0x00ff_ffff_ffff_fe00) / 65536;
    poke(&p, rb + 2 * data_cluster, &0u16.to_be_bytes());
    poke(&p, rb, &2u16.to_be_bytes());
    let before = std::fs::read(&p).unwrap();
    let c = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["check", "-r", "leaks"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(c.status.code(), Some(2));
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a corrupt image was written"
    );
}
