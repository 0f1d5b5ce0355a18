//! `cowshed create` against `qemu-img create`: identical bytes for a matrix
//! of options, `qemu-img check` clean, and QEMU can write into the result
//! and read the backing through it.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn run(cmd: &str, args: &[&str], cwd: &Path) -> Output {
    Command::new(cmd)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("spawn")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cowshed(args: &[&str], cwd: &Path) -> Output {
    run(env!("CARGO_BIN_EXE_cowshed"), args, cwd)
}

const OPTIONS: &[&str] = &[
    "",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "compat=0.10",
    "compression_type=zstd",
    "lazy_refcounts=on",
    "extended_l2=on",
    "extended_l2=on,cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=64",
    "refcount_bits=64,cluster_size=512",
];
const SIZES: &[&str] = &["0", "1000", "1M", "1G", "3G", "20G"];

#[test]
fn fresh_images_equal_qemu_img_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut compared = 0;
    for opt in OPTIONS {
        for size in SIZES {
            let case = format!("-o '{opt}' size {size}");
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !opt.is_empty() {
                args.extend(["-o", opt]);
            }
            let _ = fs::remove_file(d.join("q.qcow2"));
            let _ = fs::remove_file(d.join("c.qcow2"));
            let q = run("qemu-img", &[&args[..], &["q.qcow2", size]].concat(), d);
            let c = cowshed(&[&args[..], &["c.qcow2", size]].concat(), d);
            if !q.status.success() {
                assert!(
                    !c.status.success(),
                    "{case}: qemu-img refuses, cowshed accepted"
                );
                continue;
            }
            if !c.status.success() {
                // The one layout not written yet: a refcount table that must
                // grow past one cluster (tiny clusters, huge disks).
                let err = String::from_utf8_lossy(&c.stderr);
                assert!(err.contains("refcount table larger"), "{case}: {err}");
                assert!(
                    opt.contains("cluster_size=512"),
                    "{case}: unexpected refusal: {err}"
                );
                continue;
            }
            let (qb, cb) = (
                fs::read(d.join("q.qcow2")).unwrap(),
                fs::read(d.join("c.qcow2")).unwrap(),
            );
            assert_eq!(qb.len(), cb.len(), "{case}: file sizes differ");
            if let Some(i) = qb.iter().zip(&cb).position(|(a, b)| a != b) {
                panic!("{case}: first differing byte at offset {i:#x}");
            }
            ok(
                run("qemu-img", &["check", "-q", "c.qcow2"], d),
                &format!("{case}: check"),
            );
            compared += 1;
        }
    }
    assert!(compared >= 60, "only {compared} cases compared");
}

#[test]
fn overlays_equal_qemu_img_and_qemu_reads_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("sub")).unwrap();
    ok(
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"],
            d,
        ),
        "base",
    );
    ok(
        run("qemu-io", &["-c", "write -P 0xab 0 1M", "base.qcow2"], d),
        "fill base",
    );
    ok(
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", "base.raw", "2M"],
            d,
        ),
        "raw base",
    );
    ok(
        run(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0xcd 64k 64k", "base.raw"],
            d,
        ),
        "fill raw",
    );
    let cases: &[(&str, &[&str])] = &[
        ("top.qcow2", &["-b", "base.qcow2", "-F", "qcow2"]),
        ("sub/top.qcow2", &["-b", "../base.qcow2", "-F", "qcow2"]),
        (
            "bigger.qcow2",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=4k"],
        ),
        ("onraw.qcow2", &["-b", "base.raw", "-F", "raw"]),
        (
            "v2.qcow2",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10"],
        ),
        (
            "ext.qcow2",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on"],
        ),
    ];
    for (name, opts) in cases {
        let size: &[&str] = if *name == "bigger.qcow2" {
            &["5M"]
        } else {
            &[]
        };
        let qname = format!("{name}.qemu");
        let base_args = [&["create", "-q", "-f", "qcow2"][..], opts].concat();
        ok(
            run(
                "qemu-img",
                &[&base_args[..], &[qname.as_str()], size].concat(),
                d,
            ),
            "qemu-img create",
        );
        ok(
            cowshed(&[&base_args[..], &[*name], size].concat(), d),
            "cowshed create",
        );
        assert_eq!(
            fs::read(d.join(&qname)).unwrap(),
            fs::read(d.join(name)).unwrap(),
            "{name}: bytes differ"
        );
        ok(run("qemu-img", &["check", "-q", name], d), "check");
        // QEMU writes into it and reads the backing through it.
        ok(
            run("qemu-io", &["-c", "write -P 0x11 128k 4k", name], d),
            "qemu-io write",
        );
        let expect_base = if opts.contains(&"base.raw") {
            "read -P 0xcd 64k 64k"
        } else {
            "read -P 0xab 0 64k"
        };
        let out = ok(
            run(
                "qemu-io",
                &["-r", "-c", expect_base, "-c", "read -P 0x11 128k 4k", name],
                d,
            ),
            "qemu-io read",
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "{name}: {out}"
        );
        ok(
            run("qemu-img", &["check", "-q", name], d),
            "check after write",
        );
    }
}

#[test]
fn refuses_what_qemu_img_refuses_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
            d,
        ),
        "base",
    );
    let before = fs::read(d.join("base.qcow2")).unwrap();
    let out = cowshed(&["create", "-f", "qcow2", "base.qcow2", "1M"], d);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    assert_eq!(fs::read(d.join("base.qcow2")).unwrap(), before);

    for (args, qemu_too) in [
        (
            &["create", "-f", "qcow2", "-b", "base.qcow2", "x.qcow2"][..],
            true,
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=1000",
                "x.qcow2",
                "1M",
            ][..],
            true,
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=4k",
                "x.qcow2",
                "1M",
            ][..],
            true,
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=1",
                "x.qcow2",
                "1M",
            ][..],
            true,
        ),
        (
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "x.qcow2",
            ][..],
            true,
        ),
    ] {
        let c = cowshed(args, d);
        assert!(!c.status.success(), "cowshed accepted {args:?}");
        assert!(
            String::from_utf8_lossy(&c.stderr).contains("x.qcow2"),
            "{args:?}: error does not name the file"
        );
        if qemu_too {
            let q = run("qemu-img", args, d);
            assert!(!q.status.success(), "qemu-img accepted {args:?}");
        }
        assert!(!d.join("x.qcow2").exists(), "{args:?} left a file");
    }
    // Nothing but the base is left: no temporary files either.
    assert_eq!(fs::read_dir(d).unwrap().count(), 1);
}

#[test]
fn raw_images_have_the_size_and_read_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        cowshed(&["create", "-q", "-f", "raw", "r.raw", "1000"], d),
        "create raw",
    );
    assert_eq!(fs::metadata(d.join("r.raw")).unwrap().len(), 1024);
    ok(
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", "q.raw", "1000"],
            d,
        ),
        "qemu raw",
    );
    ok(
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", "r.raw", "q.raw"],
            d,
        ),
        "compare",
    );
}

/// SIGKILL just before the new image is linked into place: no image at
/// the name (at most the flushed temporary file, under its telling name),
/// so a later create of the same name still works.
#[test]
fn sigkill_before_the_link_leaves_no_image() {
    use common::fault;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("w");
    fs::create_dir(&d).unwrap();
    let args = ["create", "-q", "-f", "qcow2", "new.qcow2", "1G"];
    let trace = fault::trace(&d, &args);
    assert_eq!(trace.counts(), [("create.before_link".to_string(), 1)]);
    fs::remove_file(d.join("new.qcow2")).unwrap();
    fault::kill_at(&d, &args, "create.before_link", 1);
    let left = common::dir_names(&d);
    assert!(
        left.len() == 1 && left[0].starts_with(".cowshed-create-"),
        "{left:?}"
    );
    let out = cowshed(&args, &d);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(common::run::check_code(&d, "new.qcow2"), 0);
}
