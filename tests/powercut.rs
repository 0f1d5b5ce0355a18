//! Power cuts, not only kills: each operation runs on a FUSE pass-through
//! mount that records every change it makes (writes, copy_file_range,
//! fallocate, truncate, fsync/fdatasync, create, rename, link, unlink,
//! directory fsync), then every state the crash model of
//! `common/powercut/states.rs` allows is laid out on real files and judged
//! by qemu-img:
//! - `qemu-img check` finds no corruption in any image (leaks are allowed);
//! - the guest view is unchanged (commit: the top's, read through the top;
//!   rebase and flatten: the image's), by `qemu-img compare` against a raw
//!   copy taken before;
//! - a convert destination is absent, or complete and equal to the source;
//!   a created image is absent or valid;
//! - the allocating writer: every sector reads as it did after the last
//!   completed flush or as the workload left it after the next one.
//!
//! The same harness runs `qemu-img commit` and `qemu-img rebase` (default
//! cache modes) as a control: it must find their known ordering faults, or
//! it is blind.
//!
//! `cargo test --test powercut` runs small workloads (a few MiB). The full
//! set (64 MiB workloads, thousands of states, a table per operation):
//! `POWERCUT=full cargo test --release --test powercut -- --nocapture --test-threads=1`

mod common;
#[path = "common/powercut/mod.rs"]
mod powercut;

use std::path::Path;

use common::COWSHED;
use powercut::states::{Budget, CrashState};
use powercut::{no_corruption, raw_view, same_view, table, tool, Session, Tally};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

fn full() -> bool {
    std::env::var("POWERCUT").is_ok_and(|v| v == "full")
}

/// Disk size of the workloads.
fn disk() -> u64 {
    if full() {
        64 * MIB
    } else {
        4 * MIB
    }
}

fn budget() -> Budget {
    if full() {
        Budget {
            per_point: 48,
            random: 12,
            between: 2,
        }
    } else {
        Budget {
            per_point: 6,
            random: 3,
            between: 1,
        }
    }
}

fn ok(dir: &Path, prog: &str, args: &[&str]) {
    let (code, out) = tool(dir, prog, args);
    assert_eq!(code, 0, "{prog} {args:?} in {}: {out}", dir.display());
}

fn qemu_io(dir: &Path, img: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(img);
    ok(dir, "qemu-io", &args);
}

/// Writes spread over the disk: patterned runs of a few clusters, some
/// crossing cluster boundaries, and zero writes; about a third of the disk.
fn scattered_writes(size: u64, cluster: u64, seed: u8) -> Vec<String> {
    let mut cmds = Vec::new();
    let step = (size / 24).max(cluster * 4) / 512 * 512;
    let mut off = cluster / 2;
    let mut k = 0u64;
    while off + 2 * cluster < size {
        let len = (step / 3).max(cluster) / 512 * 512;
        let len = len.min(size - off);
        if k % 5 == 4 {
            cmds.push(format!("write -z {off} {len}"));
        } else {
            cmds.push(format!("write -P {} {off} {len}", (seed as u64 + k) % 250 + 1));
        }
        off += step + 512 * (k % 7);
        k += 1;
    }
    cmds
}

/// base.qcow2 (half written) <- top.qcow2 (scattered writes); the top's
/// view is saved as refs/top.raw.
fn commit_images(s: &Session, cluster: u64, base_compat: &str) {
    let b = &s.backing;
    let size = disk().to_string();
    let cs = format!("cluster_size={cluster},compat={base_compat}");
    ok(b, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &cs, "base.qcow2", &size]);
    qemu_io(b, "base.qcow2", &[format!("write -P 0x5b 0 {}", disk() / 2)]);
    let cs = format!("cluster_size={cluster}");
    ok(
        b,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-o", &cs, "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", &size,
        ],
    );
    qemu_io(b, "top.qcow2", &scattered_writes(disk(), cluster, 7));
    raw_view(b, "top.qcow2", &s.refs.join("top.raw"));
}

/// Every image present passes check, and `img` reads as `reference`.
fn images_sound_and_view(
    dir: &Path,
    images: &[&str],
    img: &str,
    reference: &Path,
) -> Result<(), String> {
    for i in images {
        if !dir.join(i).exists() {
            return Err(format!("{i} is missing"));
        }
        no_corruption(dir, i)?;
    }
    same_view(dir, reference, img, "qcow2")
}

/// Record `prog args` run in the mount (it must succeed) and judge it.
fn record_and_judge(
    s: &Session,
    prog: &str,
    args: &[&str],
    judge: &(dyn Fn(&Path, &CrashState) -> Result<(), String> + Sync),
) -> Tally {
    let (rec, ()) = s.record(|mnt, _| ok(mnt, prog, args));
    s.judge(&rec, budget(), judge)
}

fn commit_case(name: &str, cluster: u64, base_compat: &str, prog: &str, args: &[&str]) -> Tally {
    let s = Session::new(name);
    commit_images(&s, cluster, base_compat);
    let reference = s.refs.join("top.raw");
    record_and_judge(&s, prog, args, &|d, _| {
        images_sound_and_view(d, &["base.qcow2", "top.qcow2"], "top.qcow2", &reference)
    })
}

/// Print the table and fail on any violation in cowshed's rows.
fn report(rows: &[Tally]) {
    println!("\n{}", table(rows));
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| format!("{}: {} violations\n{}", r.name, r.violations.len(), r.examples(4)))
        .collect();
    assert!(bad.is_empty(), "power-cut violations:\n{}", bad.join("\n"));
}

#[test]
fn commit_survives_power_cuts() {
    let rows = vec![
        commit_case("commit", 64 * KIB, "1.1", COWSHED, &["commit", "top.qcow2"]),
        commit_case("commit -d", 64 * KIB, "1.1", COWSHED, &["commit", "-d", "top.qcow2"]),
        commit_case("commit, v2 base", 64 * KIB, "0.10", COWSHED, &["commit", "top.qcow2"]),
        commit_case("commit, 4 KiB clusters", 4 * KIB, "1.1", COWSHED, &["commit", "top.qcow2"]),
    ];
    report(&rows);
}

/// The control: the harness must see what qemu-img gets wrong.
#[test]
fn control_finds_qemu_img_faults() {
    let commit = commit_case("qemu-img commit (control)", 64 * KIB, "1.1", "qemu-img", &["commit", "top.qcow2"]);
    println!("\n{}", table(std::slice::from_ref(&commit)));
    println!("{}", commit.examples(3));
    assert!(
        !commit.violations.is_empty(),
        "the harness found nothing wrong with qemu-img commit: it is blind"
    );
}
