//! Power cuts, not only kills: each operation runs on a FUSE pass-through
//! mount that records every change it makes (writes, copy_file_range,
//! fallocate, truncate, fsync/fdatasync, create, rename, link, unlink,
//! directory fsync), then the states a power cut may leave, as drawn by
//! the crash model of `common/powercut/states.rs`, are laid out on real
//! files and judged by qemu-img:
//! - `qemu-img check` finds no corruption in any image (leaks are allowed);
//! - the guest view is unchanged (commit: the top's, read through the top;
//!   rebase and flatten: the image's), by `qemu-img compare` against a raw
//!   copy taken before;
//! - a convert destination is absent, or complete and equal to the source;
//!   a created image is absent or valid;
//! - `check -r` on a spoilt image: no state holds more corruptions than the
//!   image started with, and the view is unchanged;
//! - the allocating writer: every sector reads as it did after the last
//!   completed flush or as the workload left it after the next one.
//!
//! The same harness runs `qemu-img commit` and `qemu-img rebase` (default
//! cache modes) as a control: it must find their known ordering faults, or
//! it is blind.
//!
//! `cargo test --test powercut` runs small workloads (a few MiB). The full
//! set (64 MiB workloads, about 11,700 states, a table per operation):
//! `POWERCUT=full cargo test --release --test powercut -- --nocapture --test-threads=1`

mod common;

use common::bytes::file_be64;
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
            max_points: 240,
        }
    } else {
        Budget {
            per_point: 6,
            random: 3,
            between: 1,
            max_points: 40,
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
            cmds.push(format!(
                "write -P {} {off} {len}",
                (seed as u64 + k) % 250 + 1
            ));
        }
        off += step + 512 * (k % 7);
        k += 1;
    }
    cmds
}

/// base.qcow2 (half written) <- top.qcow2 (scattered writes); the top's
/// view is saved as refs/top.raw.
fn commit_images_v(s: &Session, cluster: u64, base_compat: &str) {
    let b = &s.backing;
    let size = disk().to_string();
    let cs = format!("cluster_size={cluster},compat={base_compat}");
    ok(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "base.qcow2",
            &size,
        ],
    );
    qemu_io(
        b,
        "base.qcow2",
        &[format!("write -P 0x5b 0 {}", disk() / 2)],
    );
    let cs = format!("cluster_size={cluster}");
    ok(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            &size,
        ],
    );
    qemu_io(b, "top.qcow2", &scattered_writes(disk(), cluster, 7));
    raw_view(b, "top.qcow2", &s.refs.join("top.raw"));
}

fn commit_images(s: &Session, cluster: u64) {
    commit_images_v(s, cluster, "1.1");
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
    commit_case_in(Session::new(name), cluster, base_compat, prog, args)
}

fn commit_case_in(s: Session, cluster: u64, base_compat: &str, prog: &str, args: &[&str]) -> Tally {
    commit_images_v(&s, cluster, base_compat);
    let reference = s.refs.join("top.raw");
    record_and_judge(&s, prog, args, &|d, _| {
        images_sound_and_view(d, &["base.qcow2", "top.qcow2"], "top.qcow2", &reference)
    })
}

/// A commit whose zeros cover whole clusters the base owns: the base
/// gives them back (zero clusters without an offset; v2: unallocated), so
/// the power cut may fall between the L2 tables that drop them and the
/// refcounts that free them.
fn commit_zeroing_case(name: &str, base_compat: &str) -> Tally {
    let s = Session::new(name);
    commit_images_v(&s, 64 * KIB, base_compat);
    let b = &s.backing;
    let zeros: Vec<String> = [(0, 4), (6, 1), (9, 5), (20, 3)]
        .iter()
        .map(|&(c, n)| format!("write -z {} {}", c * 64 * KIB, n * 64 * KIB))
        .collect();
    qemu_io(b, "top.qcow2", &zeros);
    raw_view(b, "top.qcow2", &s.refs.join("top.raw"));
    let reference = s.refs.join("top.raw");
    record_and_judge(&s, COWSHED, &["commit", "top.qcow2"], &|d, _| {
        images_sound_and_view(d, &["base.qcow2", "top.qcow2"], "top.qcow2", &reference)
    })
}

/// Print the table and fail on any violation in cowshed's rows.
fn report(rows: &[Tally]) {
    println!("\n{}", table(rows));
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| {
            format!(
                "{}: {} violations\n{}",
                r.name,
                r.violations.len(),
                r.examples(4)
            )
        })
        .collect();
    assert!(bad.is_empty(), "power-cut violations:\n{}", bad.join("\n"));
}

#[test]
fn commit_survives_power_cuts() {
    let rows = vec![
        commit_case("commit", 64 * KIB, "1.1", COWSHED, &["commit", "top.qcow2"]),
        commit_case(
            "commit -d",
            64 * KIB,
            "1.1",
            COWSHED,
            &["commit", "-d", "top.qcow2"],
        ),
        commit_case(
            "commit, v2 base",
            64 * KIB,
            "0.10",
            COWSHED,
            &["commit", "top.qcow2"],
        ),
        commit_case(
            "commit, 4 KiB clusters",
            4 * KIB,
            "1.1",
            COWSHED,
            &["commit", "top.qcow2"],
        ),
        commit_zeroing_case("commit, zeroed base clusters freed", "1.1"),
        commit_zeroing_case("commit, zeroed v2 base clusters discarded", "0.10"),
        // The kernel's own fallback (splice through the mount) when the
        // file system has no copy_file_range.
        commit_case_in(
            Session::new("commit, no copy_file_range").refusing_copy_file_range(),
            64 * KIB,
            "1.1",
            COWSHED,
            &["commit", "top.qcow2"],
        ),
    ];
    report(&rows);
}

/// old.qcow2 <- top.qcow2, and new.qcow2 with different data; the top's
/// view is saved as refs/top.raw.
fn rebase_images(s: &Session, cluster: u64) {
    let b = &s.backing;
    let size = disk().to_string();
    let cs = format!("cluster_size={cluster}");
    for (name, pattern) in [("old.qcow2", 0x11), ("new.qcow2", 0x22)] {
        ok(
            b,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &cs, name, &size],
        );
        qemu_io(b, name, &[format!("write -P {pattern} 0 {}", disk() / 2)]);
    }
    qemu_io(
        b,
        "new.qcow2",
        &[format!("write -P 0x33 {} {}", disk() * 3 / 4, disk() / 8)],
    );
    ok(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &cs,
            "-b",
            "old.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            &size,
        ],
    );
    qemu_io(b, "top.qcow2", &scattered_writes(disk(), cluster, 3));
    raw_view(b, "top.qcow2", &s.refs.join("top.raw"));
}

fn rebase_case(name: &str, prog: &str, args: &[&str]) -> Tally {
    let s = Session::new(name);
    rebase_images(&s, 64 * KIB);
    let reference = s.refs.join("top.raw");
    record_and_judge(&s, prog, args, &|d, _| {
        images_sound_and_view(
            d,
            &["old.qcow2", "new.qcow2", "top.qcow2"],
            "top.qcow2",
            &reference,
        )
    })
}

#[test]
fn rebase_and_flatten_survive_power_cuts() {
    let rows = vec![
        rebase_case(
            "rebase (safe)",
            COWSHED,
            &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
        ),
        rebase_case(
            "flatten (rebase -b '')",
            COWSHED,
            &["rebase", "-b", "", "top.qcow2"],
        ),
    ];
    report(&rows);
}

/// The destination is absent, or passes check and reads as the source.
fn convert_case(name: &str, args: &[&str], dst: &str, fmt: &'static str) -> Tally {
    let s = Session::new(name);
    commit_images(&s, 64 * KIB);
    let reference = s.refs.join("top.raw");
    let mut full_args = vec!["convert"];
    full_args.extend(args);
    full_args.extend(["top.qcow2", dst]);
    record_and_judge(&s, COWSHED, &full_args, &|d, _| {
        images_sound_and_view(d, &["base.qcow2", "top.qcow2"], "top.qcow2", &reference)?;
        if !d.join(dst).exists() {
            return Ok(());
        }
        if fmt == "qcow2" {
            no_corruption(d, dst)?;
        }
        same_view(d, &reference, dst, fmt)
    })
}

#[test]
fn convert_survives_power_cuts() {
    let rows = vec![
        convert_case("convert -O qcow2", &["-O", "qcow2"], "out.qcow2", "qcow2"),
        convert_case("convert -O raw", &["-O", "raw"], "out.raw", "raw"),
        convert_case("convert -c", &["-O", "qcow2", "-c"], "out.qcow2", "qcow2"),
    ];
    report(&rows);
}

/// Set the 16-bit refcount of cluster `c` of a 64 KiB-cluster image whose
/// first refcount block covers it.
fn set_refcount(path: &Path, c: u64, rc: u16) {
    use std::os::unix::fs::FileExt;
    let refblock = file_be64(path, file_be64(path, 48)) & !0x1ff;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&rc.to_be_bytes(), refblock + 2 * c)
        .unwrap();
}

/// The host cluster of the first data cluster the image maps.
fn first_data_cluster(path: &Path) -> u64 {
    let l2 = file_be64(path, file_be64(path, 40)) & 0x00ff_ffff_ffff_fe00;
    (file_be64(path, l2) & 0x00ff_ffff_ffff_fe00) / (64 * KIB)
}

/// `check -r MODE` on img.qcow2 spoilt by `spoil`: no state may hold more
/// corruptions than the image started with, nor read differently.
fn check_case(name: &str, mode: &str, snapshot: bool, spoil: impl Fn(&Path)) -> Tally {
    let want_before = if mode == "leaks" { 3 } else { 2 };
    let s = Session::new(name);
    let b = &s.backing;
    ok(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "img.qcow2",
            &disk().to_string(),
        ],
    );
    let mut cmds = vec![format!("write -P 0x44 0 {}", disk() / 8)];
    cmds.extend(scattered_writes(disk(), 64 * KIB, 9));
    qemu_io(b, "img.qcow2", &cmds);
    if snapshot {
        ok(b, "qemu-img", &["snapshot", "-c", "s1", "img.qcow2"]);
    }
    spoil(&b.join("img.qcow2"));
    let code = tool(b, "qemu-img", &["check", "img.qcow2"]).0;
    assert_eq!(code, want_before, "[{name}] the spoilt image's check exit");
    let before = powercut::corruptions(b, "img.qcow2").unwrap();
    raw_view(b, "img.qcow2", &s.refs.join("img.raw"));
    let reference = s.refs.join("img.raw");
    let tally = record_and_judge(&s, COWSHED, &["check", "-r", mode, "img.qcow2"], &|d, _| {
        let now = powercut::corruptions(d, "img.qcow2")?;
        if now > before {
            return Err(format!("{now} corruptions, {before} before the repair"));
        }
        same_view(d, &reference, "img.qcow2", "qcow2")
    });
    let code = tool(b, "qemu-img", &["check", "img.qcow2"]).0;
    assert_eq!(code, 0, "[{name}] the repaired image's check exit");
    tally
}

#[test]
fn check_repair_survives_power_cuts() {
    let rows = vec![
        check_case("check -r leaks", "leaks", false, |p| {
            // The header's and the refcount table's clusters.
            set_refcount(p, 0, 2);
            set_refcount(p, file_be64(p, 48) / (64 * KIB), 2);
        }),
        check_case("check -r all (refcount too low)", "all", true, |p| {
            let c = first_data_cluster(p);
            set_refcount(p, c, 1);
        }),
        check_case("check -r all (rebuild)", "all", false, |p| {
            let c = first_data_cluster(p);
            set_refcount(p, c, 0);
        }),
    ];
    report(&rows);
}

/// `cowshed create`: the new image is absent, or valid with the size and
/// backing asked for.
fn create_case(
    name: &str,
    args: &[&str],
    img: &'static str,
    backing: Option<&'static str>,
) -> Tally {
    let s = Session::new(name);
    ok(
        &s.backing,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "base.qcow2",
            &disk().to_string(),
        ],
    );
    let mut full_args = vec!["create"];
    full_args.extend(args);
    record_and_judge(&s, COWSHED, &full_args, &|d, _| {
        if !d.join(img).exists() {
            return Ok(());
        }
        let (code, out) = tool(d, "qemu-img", &["check", img]);
        if code != 0 {
            return Err(format!(
                "{img} present but qemu-img check exited {code}: {out}"
            ));
        }
        let (_, out) = tool(d, "qemu-img", &["info", "--output=json", img]);
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("{img}: info not JSON ({e}): {out}"))?;
        if v["virtual-size"].as_u64() != Some(disk()) {
            return Err(format!(
                "{img}: virtual size {} (want {})",
                v["virtual-size"],
                disk()
            ));
        }
        if v["backing-filename"].as_str() != backing {
            return Err(format!(
                "{img}: backing {} (want {backing:?})",
                v["backing-filename"]
            ));
        }
        Ok(())
    })
}

#[test]
fn create_survives_power_cuts() {
    let size = disk().to_string();
    let rows = vec![
        create_case(
            "create",
            &["-f", "qcow2", "new.qcow2", &size],
            "new.qcow2",
            None,
        ),
        create_case(
            "create -b (clone)",
            &[
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "clone.qcow2",
            ],
            "clone.qcow2",
            Some("base.qcow2"),
        ),
    ];
    report(&rows);
}

/// One step of the writer workload.
#[derive(Clone, Copy)]
enum WriterOp {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// Batches of writer operations; within a batch no two touch the same
/// sector (so after a crash each sector holds one of two known values).
/// Regions are revisited across batches: in-place rewrites, copy on write
/// from the backing, zeroing allocated clusters, discards of them.
fn writer_batches(
    size: u64,
    cluster: u64,
    batches: usize,
    per_batch: u64,
    seed: u64,
) -> Vec<Vec<WriterOp>> {
    let region = 3 * cluster + 4 * KIB;
    let regions = size / region;
    let mut rng = seed;
    let mut next = move || {
        rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    (0..batches)
        .map(|b| {
            let mut ops = Vec::new();
            for r in 0..regions {
                if next() % regions >= per_batch {
                    continue;
                }
                let start = r * region;
                let jitter = (next() % (cluster / 512).max(1)) * 512;
                let len = (cluster + (next() % 3) * cluster / 2).max(512) / 512 * 512;
                let off = start + jitter;
                ops.push(match next() % 6 {
                    0 => WriterOp::Zero(off, len),
                    1 => {
                        let c = start.div_ceil(cluster) * cluster;
                        WriterOp::Discard(c, cluster)
                    }
                    _ => WriterOp::Write(off, len, (b as u64 * 31 + r) as u8 | 1),
                });
            }
            ops
        })
        .collect()
}

/// The allocating writer (the demo guest's path), driven from this
/// process through the library. After each batch it flushes and the view
/// is saved; a state whose crash point lies after flush `c` (and before
/// `c + 1`) must read, sector by sector, as view `c` or view `c + 1`.
fn writer_case(name: &str, opts: &str, size: u64, cluster: u64, big_first: bool) -> Tally {
    use cowshed::engine::qcow2::Qcow2Writer;
    let s = Session::new(name);
    let b = &s.backing;
    let sz = size.to_string();
    ok(
        b,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", &sz],
    );
    qemu_io(b, "base.qcow2", &[format!("write -P 0x5b 0 {}", size / 2)]);
    ok(
        b,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            &sz,
        ],
    );
    raw_view(b, "top.qcow2", &s.refs.join("view-0.raw"));
    let (batches, per_batch) = if full() { (6, 40) } else { (3, 10) };
    let mut plan = writer_batches(size, cluster, batches, per_batch, 0xc0ff_ee00 ^ cluster);
    if big_first {
        // One long write first: the file outgrows what its first refcount
        // table covers.
        plan.insert(0, vec![WriterOp::Write(0, size * 5 / 8, 0x77)]);
    }
    let reftable_clusters = |p: &Path| file_be64(p, 56) >> 32;
    let reftable_before = reftable_clusters(&b.join("top.qcow2"));
    let (rec, marks) = s.record(|mnt, recorder| {
        let mut w = Qcow2Writer::open(&mnt.join("top.qcow2")).unwrap();
        let mut marks = Vec::new();
        for (c, ops) in plan.iter().enumerate() {
            for op in ops {
                match *op {
                    WriterOp::Write(off, len, p) => w.write(&vec![p; len as usize], off),
                    WriterOp::Zero(off, len) => w.write_zeroes(off, len),
                    WriterOp::Discard(off, len) => w.discard(off, len),
                }
                .unwrap_or_else(|e| panic!("[{name}] writer: {e}"));
            }
            w.flush().unwrap();
            marks.push(recorder.log_len());
            raw_view(
                mnt,
                "top.qcow2",
                &s.refs.join(format!("view-{}.raw", c + 1)),
            );
        }
        drop(w);
        marks
    });
    let views: Vec<Vec<u8>> = (0..=plan.len())
        .map(|c| std::fs::read(s.refs.join(format!("view-{c}.raw"))).unwrap())
        .collect();
    let scratch = s.refs.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    if big_first {
        assert!(
            reftable_clusters(&b.join("top.qcow2")) > reftable_before,
            "[{name}] the refcount table did not grow"
        );
    }
    let tally = s.judge(&rec, budget(), &|d, st| {
        no_corruption(d, "base.qcow2")?;
        no_corruption(d, "top.qcow2")?;
        let c = marks.partition_point(|&m| m <= st.point);
        let out = scratch.join(format!("crashed-{:?}.raw", std::thread::current().id()));
        let o = out.to_string_lossy();
        let (code, text) = tool(d, "qemu-img", &["convert", "-O", "raw", "top.qcow2", &o]);
        if code != 0 {
            return Err(format!("qemu-img convert top.qcow2: {text}"));
        }
        let seen = std::fs::read(&out).unwrap();
        let (old, new) = (&views[c], &views[(c + 1).min(plan.len())]);
        for (i, sector) in seen.chunks(512).enumerate() {
            let r = i * 512..(i * 512 + 512).min(seen.len());
            if sector != &old[r.clone()] && sector != &new[r] {
                return Err(format!(
                    "sector at {} reads neither as after flush {c} nor as after flush {}",
                    i * 512,
                    c + 1
                ));
            }
        }
        Ok(())
    });
    tally
}

#[test]
fn writer_survives_power_cuts() {
    let size = if full() { 16 * MIB } else { 4 * MIB };
    let rows = vec![
        // 4 KiB clusters: an L2 table maps 2 MiB, so the workload crosses tables.
        writer_case(
            "writer, 4 KiB clusters",
            "cluster_size=4k",
            size,
            4 * KIB,
            false,
        ),
        writer_case(
            "writer, 64 KiB clusters",
            "cluster_size=64k",
            size,
            64 * KIB,
            false,
        ),
        // 512-byte clusters of 64-bit refcounts: a refblock covers 32 KiB
        // and the first refcount table 2 MiB of file, so it must grow.
        writer_case(
            "writer, refcount table growth",
            "cluster_size=512,refcount_bits=64",
            size,
            512,
            true,
        ),
    ];
    report(&rows);
}

/// The control: the harness must see what qemu-img gets wrong.
#[test]
fn control_finds_qemu_img_faults() {
    let commit = commit_case(
        "qemu-img commit (control)",
        64 * KIB,
        "1.1",
        "qemu-img",
        &["commit", "top.qcow2"],
    );
    let rebase = rebase_case(
        "qemu-img rebase (control)",
        "qemu-img",
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    let rows = [commit, rebase];
    println!("\n{}", table(&rows));
    // What each is known to get wrong: commit empties the top with
    // refcounts dropped before the L2 entries that use them; rebase
    // switches the backing before the copied data is mapped for good.
    for (r, fault) in rows
        .iter()
        .zip(["refcount=0 reference=1", "qemu-img compare (view before)"])
    {
        let found = r
            .violations
            .iter()
            .filter(|v| v.what.contains(fault))
            .count();
        println!(
            "{}: {found} of {} states show `{fault}`\n{}",
            r.name,
            r.states,
            r.examples(2)
        );
        assert!(
            found > 0,
            "the harness found no `{fault}` in {}: it is blind",
            r.name
        );
    }
}
