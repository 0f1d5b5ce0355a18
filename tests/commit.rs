//! `cowshed commit` against `qemu-img commit` run on copies of the same
//! images: bases and tops read the same afterwards (`qemu-img compare`),
//! every qcow2 passes `qemu-img check`, and a running QEMU holding either
//! image makes commit refuse without changing a byte.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::run::{ok, run};

fn cowshed(cwd: &Path, args: &[&str]) -> Output {
    run(cwd, env!("CARGO_BIN_EXE_cowshed"), args)
}

/// Copy `names` from `from` into fresh dirs `ours/` and `qemu/`.
fn twin(d: &Path, names: &[&str]) {
    for side in ["ours", "qemu"] {
        std::fs::create_dir_all(d.join(side)).unwrap();
        for n in names {
            std::fs::copy(d.join("src").join(n), d.join(side).join(n)).unwrap();
        }
    }
}

fn same(d: &Path, a: &str, b: &str, what: &str) {
    let out = run(d, "qemu-img", &["compare", a, b]);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn clean(d: &Path, img: &str) {
    ok(d, "qemu-img", &["check", img]);
}

/// base (qcow2 or raw, smaller than the top) <- top with data, zeros,
/// compressed clusters, a write straddling the base's end.
fn fixture(d: &Path, base_fmt: &str) -> String {
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let base = format!("base.{}", if base_fmt == "raw" { "raw" } else { "qcow2" });
    ok(
        &src,
        "qemu-img",
        &["create", "-q", "-f", base_fmt, &base, "1M"],
    );
    ok(
        &src,
        "qemu-io",
        &["-f", base_fmt, "-c", "write -P 0x0b 0 1M", &base],
    );
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &base,
            "-F",
            base_fmt,
            "top.qcow2",
            "3M",
        ],
    );
    ok(
        &src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 4k 8k",
            "-c",
            "write -z 128k 64k",
            "-c",
            "write -c -P 0x22 256k 64k",
            "-c",
            "write -P 0x33 960k 128k",
            "-c",
            "write -P 0x44 2M 64k",
            "top.qcow2",
        ],
    );
    base
}

#[test]
fn commit_into_qcow2_and_raw_bases_equals_qemu_img() {
    for base_fmt in ["qcow2", "raw"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = fixture(d, base_fmt);
        ok(
            &d.join("src"),
            "qemu-img",
            &["convert", "-O", "raw", "top.qcow2", "view.raw"],
        );
        twin(d, &[&base, "top.qcow2"]);
        ok(&d.join("qemu"), "qemu-img", &["commit", "-q", "top.qcow2"]);
        let out = cowshed(&d.join("ours"), &["commit", "top.qcow2"]);
        assert!(
            out.status.success(),
            "{base_fmt}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ob, qb) = (format!("ours/{base}"), format!("qemu/{base}"));
        same(d, &ob, &qb, &format!("{base_fmt}: bases after commit"));
        same(
            d,
            "ours/top.qcow2",
            "qemu/top.qcow2",
            &format!("{base_fmt}: tops after commit"),
        );
        same(
            d,
            "ours/top.qcow2",
            "src/view.raw",
            &format!("{base_fmt}: top's view unchanged"),
        );
        clean(d, "ours/top.qcow2");
        if base_fmt == "qcow2" {
            clean(d, &ob);
        }
        // The top was emptied: nothing of its own left.
        let map = ok(d, "qemu-img", &["map", "--output=json", "ours/top.qcow2"]);
        let v: serde_json::Value = serde_json::from_str(&map).unwrap();
        assert!(
            v.as_array()
                .unwrap()
                .iter()
                .all(|e| e["depth"] != 0 || e["present"] == false),
            "{map}"
        );
        // The base grew to the top's size.
        let info = ok(
            d,
            "qemu-img",
            &["info", "--output=json", "-f", base_fmt, &ob],
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["virtual-size"], 3 << 20, "{base_fmt}: base not grown");
        if base_fmt == "raw" {
            // Zeros committed into a raw base are holes, as QEMU makes them.
            let blocks = |p: &str| {
                std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(d.join(p)).unwrap())
            };
            assert!(
                blocks(&ob) <= blocks(&qb),
                "raw base allocates {} blocks, qemu-img's {}",
                blocks(&ob),
                blocks(&qb)
            );
        }
    }
}

#[test]
fn keep_top_and_deeper_base_equal_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    ok(
        &src,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"],
    );
    ok(&src, "qemu-io", &["-c", "write -P 0x0a 0 2M", "base.qcow2"]);
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    );
    ok(
        &src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x1a 100k 300k",
            "-c",
            "write -z 1M 64k",
            "mid.qcow2",
        ],
    );
    ok(
        &src,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    ok(
        &src,
        "qemu-io",
        &[
            "-c",
            "write -P 0x2a 200k 64k",
            "-c",
            "write -P 0x2b 1500k 100k",
            "top.qcow2",
        ],
    );
    ok(
        &src,
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "view.raw"],
    );

    // -d: the top keeps its data, byte for byte.
    twin(d, &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let top_before = std::fs::read(d.join("ours/top.qcow2")).unwrap();
    ok(
        &d.join("qemu"),
        "qemu-img",
        &["commit", "-q", "-d", "top.qcow2"],
    );
    let out = cowshed(&d.join("ours"), &["commit", "-d", "top.qcow2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(d.join("ours/top.qcow2")).unwrap(),
        top_before,
        "-d changed the top"
    );
    same(d, "ours/mid.qcow2", "qemu/mid.qcow2", "-d: mid");
    same(d, "ours/top.qcow2", "src/view.raw", "-d: top view");
    clean(d, "ours/mid.qcow2");

    // -b base: top and mid both go down into base; the top is kept.
    for side in ["ours", "qemu"] {
        std::fs::remove_dir_all(d.join(side)).unwrap();
    }
    twin(d, &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    ok(
        &d.join("qemu"),
        "qemu-img",
        &["commit", "-q", "-b", "base.qcow2", "top.qcow2"],
    );
    let out = cowshed(
        &d.join("ours"),
        &["commit", "-b", "base.qcow2", "top.qcow2"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    same(d, "ours/base.qcow2", "qemu/base.qcow2", "-b: base");
    same(
        d,
        "ours/base.qcow2",
        "src/view.raw",
        "-b: base holds the top's view",
    );
    same(d, "ours/top.qcow2", "qemu/top.qcow2", "-b: top");
    clean(d, "ours/base.qcow2");
    clean(d, "ours/top.qcow2");

    // A base that is not in the chain, and an image without backing.
    let out = cowshed(
        &d.join("ours"),
        &["commit", "-b", "../src/view.raw", "top.qcow2"],
    );
    assert!(!out.status.success());
    let out = cowshed(&d.join("ours"), &["commit", "base.qcow2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not have a backing file"));
}

#[test]
fn refuses_while_qemu_holds_the_base_or_the_top() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = fixture(d, "qcow2");
    let s = d.join("src");
    for held in [base.as_str(), "top.qcow2"] {
        let before: Vec<Vec<u8>> = [base.as_str(), "top.qcow2"]
            .iter()
            .map(|n| std::fs::read(s.join(n)).unwrap())
            .collect();
        let mut holder = Command::new("qemu-io")
            .args(["-f", "qcow2", held])
            .current_dir(&s)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while cowshed::engine::lock_state(&s.join(held)).unwrap()
            != cowshed::engine::LockState::Writer
        {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-io never locked {held}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let out = cowshed(&s, &["commit", "top.qcow2"]);
        drop(holder.stdin.take());
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(
            !out.status.success(),
            "commit ran while qemu-io held {held}"
        );
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains("in use by pid"), "{msg}");
        let after: Vec<Vec<u8>> = [base.as_str(), "top.qcow2"]
            .iter()
            .map(|n| std::fs::read(s.join(n)).unwrap())
            .collect();
        assert!(
            before == after,
            "an image changed although commit was refused ({held} held)"
        );
    }
}

/// A commit whose new clusters will not fit in the base's file system is
/// refused before anything is written, naming both numbers; one that needs
/// no new space (the base already owns the clusters) runs there.
#[test]
fn refuses_when_the_base_file_system_is_too_small() {
    for (base_fmt, base_full) in [
        ("qcow2", false),
        ("raw", false),
        ("qcow2", true),
        ("raw", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = if base_fmt == "raw" {
            "base.raw"
        } else {
            "base.qcow2"
        };
        ok(
            d,
            "qemu-img",
            &["create", "-q", "-f", base_fmt, base, "32M"],
        );
        if base_full {
            ok(
                d,
                "qemu-io",
                &["-f", base_fmt, "-c", "write -P 0x11 0 12M", base],
            );
        }
        ok(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base,
                "-F",
                base_fmt,
                "big.qcow2",
            ],
        );
        ok(d, "qemu-io", &["-c", "write -P 0x5a 0 12M", "big.qcow2"]);
        let cow = env!("CARGO_BIN_EXE_cowshed");
        // 6-8 MiB free once the images are in: less than the 12 MiB a base
        // without those clusters needs.
        let script = format!(
            "cp --sparse=always {base} big.qcow2 small/\n\
             cd small\n\
             sha256sum {base} big.qcow2 > ../before\n\
             {cow} commit big.qcow2 > ../out 2>&1 || echo $? > ../rc\n\
             sha256sum {base} big.qcow2 > ../after\n\
             qemu-io -f {base_fmt} -c 'read -P 0x5a 0 12M' {base} > ../read 2>&1 || true\n"
        );
        let mib = if base_full { 32 } else { 20 };
        let Some(out) = common::small_fs::run_with_small_fs(d, mib, &script) else {
            return;
        };
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let msg = std::fs::read_to_string(d.join("out")).unwrap();
        let rc = std::fs::read_to_string(d.join("rc")).unwrap_or_default();
        if base_full {
            assert_eq!(rc.trim(), "", "{base_fmt}: needs no new space: {msg}");
            let read = std::fs::read_to_string(d.join("read")).unwrap();
            assert!(read.contains("read 12582912/12582912"), "{read}");
            continue;
        }
        assert_eq!(rc.trim(), "1", "{base_fmt}: {msg}");
        assert!(msg.contains(base), "names the file: {msg}");
        assert!(
            msg.contains("not enough free space") && msg.contains("MiB"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read(d.join("before")).unwrap(),
            std::fs::read(d.join("after")).unwrap(),
            "{base_fmt}: the images changed"
        );
    }
}

/// A base on another file system than the top: the kernel will not
/// `copy_file_range` between them (EXDEV), and commit copies through a
/// buffer instead of failing.
#[test]
fn commits_into_a_base_on_another_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
    );
    // The clusters of 1M..2M laid out in reverse, so that one extent of the
    // top lands in many separate runs of the base.
    let mut writes = vec!["write -P 0x11 0 1M".to_string()];
    writes.extend(
        (0..16)
            .rev()
            .map(|i| format!("write -P 0x11 {} 64k", (1 << 20) + i * 65536)),
    );
    writes.push("write -P 0x11 2M 6M".into());
    let mut args = Vec::new();
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push("base.qcow2");
    ok(d, "qemu-io", &args);
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "8M",
        ],
    );
    let cow = env!("CARGO_BIN_EXE_cowshed");
    let script = format!(
        "cp top.qcow2 small/\n\
         cd small\n\
         qemu-io -c 'write -P 0x5a 1M 4M' top.qcow2 > /dev/null\n\
         {cow} commit top.qcow2 > ../out 2>&1 || echo $? > ../rc\n\
         qemu-io -c 'read -P 0x5a 1M 4M' top.qcow2 > ../read-top 2>&1 || true\n"
    );
    let Some(out) = common::small_fs::run_with_small_fs(d, 16, &script) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = std::fs::read_to_string(d.join("out")).unwrap();
    let rc = std::fs::read_to_string(d.join("rc")).unwrap_or_default();
    assert_eq!(rc.trim(), "", "commit failed: {msg}");
    let read = std::fs::read_to_string(d.join("read-top")).unwrap();
    assert!(
        read.contains("read 4194304/4194304"),
        "top after commit: {read}"
    );
    for (cmd, what) in [
        ("read -P 0x5a 1M 4M", "committed data"),
        ("read -P 0x11 0 1M", "base data before"),
        ("read -P 0x11 5M 3M", "base data after"),
    ] {
        let r = run(d, "qemu-io", &["-c", cmd, "base.qcow2"]);
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(
            r.status.success() && !text.contains("Pattern verification failed"),
            "{what}: {text}"
        );
    }
    assert_eq!(common::run::check_code(d, "base.qcow2"), 0);
}

/// The base's allocation as `qemu-img map` shows it: extents with their
/// data and zero flags and whether a host cluster backs them (a zero
/// cluster keeping its space has an offset, a freed one none); the host
/// offsets themselves aside (each image places its clusters where it
/// likes), so extents that differ only by them are merged.
fn allocation(d: &Path, img: &str) -> Vec<(u64, u64, bool, bool, bool)> {
    let map = ok(d, "qemu-img", &["map", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut out: Vec<(u64, u64, bool, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let kind = (
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
            e.get("offset").is_some(),
        );
        match out.last_mut() {
            Some(last) if (last.2, last.3, last.4) == kind && last.0 + last.1 == start => {
                last.1 += len
            }
            _ => out.push((start, len, kind.0, kind.1, kind.2)),
        }
    }
    out
}

/// Clusters `qemu-img check` counts as allocated in the image.
fn allocated_clusters(d: &Path, img: &str) -> u64 {
    let out = run(d, "qemu-img", &["check", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["allocated-clusters"].as_u64().unwrap()
}

/// Zeros committed over whole clusters the base owns give those clusters
/// back, as qemu-img's commit (write-zeroes with MAY_UNMAP) does: v3 zero
/// clusters without an offset (preallocated, extended-L2 and
/// snapshot-shared clusters too), v2 clusters unallocated when the base
/// has no backing, zero bytes when it has one; partial clusters get zero
/// bytes (issue #13). Same view, `check` clean, same `qemu-img map`
/// flags and the same count of allocated clusters as qemu-img's base.
#[test]
fn zeroed_clusters_are_freed_in_the_base_as_qemu_img_frees_them() {
    // (case, base options, the base gets a snapshot, the base has a backing)
    let cases: &[(&str, &str, bool, bool)] = &[
        ("64k", "cluster_size=64k", false, false),
        ("512", "cluster_size=512", false, false),
        ("2M", "cluster_size=2M", false, false),
        (
            "extended-l2",
            "cluster_size=64k,extended_l2=on",
            false,
            false,
        ),
        (
            "prealloc-metadata",
            "cluster_size=64k,preallocation=metadata",
            false,
            false,
        ),
        ("snapshot", "cluster_size=64k", true, false),
        ("v2", "cluster_size=64k,compat=0.10", false, false),
        (
            "v2-over-backing",
            "cluster_size=64k,compat=0.10",
            false,
            true,
        ),
    ];
    for &(case, opts, snapshot, backed) in cases {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let src = d.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let q = |args: &[&str]| ok(&src, args[0], &args[1..]);
        let mut create = vec!["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts];
        let mut names = vec!["base.qcow2", "top.qcow2"];
        if backed {
            q(&[
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "under.qcow2",
                "8M",
            ]);
            q(&["qemu-io", "-c", "write -P 0x33 0 8M", "under.qcow2"]);
            create.extend(["-b", "under.qcow2", "-F", "qcow2"]);
            names.push("under.qcow2");
        }
        create.extend(["base.qcow2", "8M"]);
        q(&create);
        q(&["qemu-io", "-c", "write -P 0xaa 0 6M", "base.qcow2"]);
        if snapshot {
            q(&["qemu-img", "snapshot", "-c", "before", "base.qcow2"]);
        }
        q(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        q(&[
            "qemu-io",
            // Whole clusters of every size here, partial 512 B and 64 KiB
            // ones, zeros beside data, zeros past the base's data.
            "-c",
            "write -z 0 2M",
            "-c",
            "write -z 2176k 64k",
            "-c",
            "write -P 0x11 2304k 64k",
            "-c",
            "write -z 2368k 192k",
            "-c",
            "write -z 4M 2M",
            "-c",
            "write -z 7M 1M",
            "top.qcow2",
        ]);
        q(&["qemu-img", "convert", "-O", "raw", "top.qcow2", "view.raw"]);
        twin(d, &names);
        ok(&d.join("qemu"), "qemu-img", &["commit", "-q", "top.qcow2"]);
        let out = cowshed(&d.join("ours"), &["commit", "top.qcow2"]);
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        same(
            d,
            "ours/top.qcow2",
            "src/view.raw",
            &format!("{case}: view"),
        );
        same(
            d,
            "ours/base.qcow2",
            "qemu/base.qcow2",
            &format!("{case}: bases after commit"),
        );
        clean(d, "ours/base.qcow2");
        assert_eq!(
            allocation(d, "ours/base.qcow2"),
            allocation(d, "qemu/base.qcow2"),
            "{case}: qemu-img map of the bases (cowshed's, then qemu-img's)"
        );
        assert_eq!(
            allocated_clusters(d, "ours/base.qcow2"),
            allocated_clusters(d, "qemu/base.qcow2"),
            "{case}: allocated clusters (cowshed's, then qemu-img's)"
        );
    }
}

/// A zeroed range covering whole 2 MiB clusters of the base becomes zero
/// clusters there, as qemu-img makes it, not zero bytes (issue #13).
#[test]
fn zeros_over_2m_clusters_stay_zero_clusters_as_qemu_img_makes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let q = |args: &[&str]| ok(&src, args[0], &args[1..]);
    q(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "base.qcow2",
        "8M",
    ]);
    q(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xaa 0 8M",
        "base.qcow2",
    ]);
    q(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    q(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -z 2M 2M",
        "-c",
        "write -P 0 4M 128k",
        "-c",
        "write -z -u 6M 64k",
        "top.qcow2",
    ]);
    twin(d, &["base.qcow2", "top.qcow2"]);
    ok(&d.join("qemu"), "qemu-img", &["commit", "-q", "top.qcow2"]);
    let out = cowshed(&d.join("ours"), &["commit", "top.qcow2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    same(
        d,
        "ours/base.qcow2",
        "qemu/base.qcow2",
        "bases after commit",
    );
    clean(d, "ours/base.qcow2");
    let theirs = allocation(d, "qemu/base.qcow2");
    assert!(
        theirs.iter().any(|e| e.3 && !e.2),
        "no zero cluster: {theirs:?}"
    );
    assert_eq!(allocation(d, "ours/base.qcow2"), theirs);
}
