//! `cowshed amend` against `qemu-img amend`: each case runs on two copies
//! of an image qemu-img built; both tools must agree on success or refusal,
//! a success must leave byte-identical files (for the options cowshed
//! writes), and every refusal must leave cowshed's copy byte-identical.

mod common;

use common::{Failures, Work};

const MIB: u64 = 1 << 20;

/// `-o` lists, in order, applied to a fresh copy each.
const OPTIONS: &[&str] = &[
    "lazy_refcounts=on",
    "lazy_refcounts=yes",
    "lazy_refcounts=off",
    "lazy_refcounts=maybe",
    "compat=1.1",
    "compat=v3",
    "compat=0.10",
    "compat=1.1,lazy_refcounts=on",
    "compat=2.0",
    "refcount_bits=16",
    "refcount_bits=3",
    "refcount_bits=128",
    "backing_file=base",
    "backing_fmt=qcow2",
    "backing_file=base,backing_fmt=qcow2",
    "backing_file=other,backing_fmt=qcow2",
    "cluster_size=4096",
    "preallocation=full",
    "extended_l2=on",
    "compression_type=zstd",
    "foo=bar",
    "data_file=x",
    "size=64M",
    "size=1G,lazy_refcounts=on",
];

#[test]
fn amend_agrees_with_qemu_img() {
    let w = Work::new("amend");
    w.create("base", "qcow2", "", None, 32 * MIB);
    w.io("qcow2", "base", &["write -P 1 0 4M".to_string()]);
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "img",
    ]);
    w.io("qcow2", "img", &["write -P 2 1M 1M".to_string()]);
    w.create("v2", "qcow2", "compat=0.10", None, 32 * MIB);
    w.io(
        "qcow2",
        "v2",
        &["write -P 3 0 2M".to_string(), "write -z 4M 1M".to_string()],
    );
    w.create("v2snap", "qcow2", "compat=0.10", None, 32 * MIB);
    w.qemu_img(&["snapshot", "-c", "s1", "v2snap"]);
    w.create(
        "v2-4k",
        "qcow2",
        "compat=0.10,cluster_size=4096",
        None,
        32 * MIB,
    );
    let mut f = Failures::new("amend");
    for image in ["img", "v2", "v2snap", "v2-4k"] {
        for opts in OPTIONS {
            let (ours, theirs) = (format!("{image}.ours"), format!("{image}.theirs"));
            std::fs::copy(w.path(image), w.path(&ours)).unwrap();
            std::fs::copy(w.path(image), w.path(&theirs)).unwrap();
            let before = w.read_file(&ours);
            let q = w.qemu_img_may_fail(&["amend", "-o", opts, &theirs]);
            let c = w.cowshed(&["amend", "-o", opts, &ours]);
            let what = format!("amend -o {opts} {image}");
            // Options cowshed refuses on purpose (qemu-img amends them).
            let beyond = c.stderr.contains("not supported by cowshed");
            if beyond {
                f.check(q.ok() && c.code == Some(1), &what, || format!("{q}\n{c}"));
            } else {
                f.check(q.code == c.code, &what, || format!("{q}\n{c}"));
            }
            if c.ok() && opts.contains("size=") {
                // A resize frees the old L1 table: qemu-img leaves its
                // bytes, cowshed punches them out. The image is the same.
                let cmp = w.qemu_img_may_fail(&["compare", &ours, &theirs]);
                f.check(cmp.ok(), &what, || format!("{cmp}"));
                let (a, b) = (w.info_json(&ours), w.info_json(&theirs));
                let strip = |mut v: serde_json::Value| {
                    for k in ["filename", "actual-size", "children"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                };
                let (a, b) = (strip(a), strip(b));
                f.check(a == b, &what, || format!("info differs:\n{a:#}\n{b:#}"));
            } else if c.ok() {
                let same = w.read_file(&ours) == w.read_file(&theirs);
                f.check(same, &what, || "the files differ from qemu-img's".into());
                let chk = w.qemu_img_may_fail(&["check", &ours]);
                f.check(chk.ok(), &what, || format!("{chk}"));
            } else {
                f.check(w.read_file(&ours) == before, &what, || {
                    "a refusal changed the file".into()
                });
                // The same reason as qemu-img's first line, when both refuse.
                if !beyond {
                    let first = q
                        .stderr
                        .lines()
                        .next()
                        .unwrap_or("")
                        .replace("qemu-img: ", "");
                    f.check(c.stderr.contains(first.trim()), &what, || {
                        format!("{q}\n{c}")
                    });
                }
            }
        }
    }
    f.finish();
}

#[test]
fn amend_refuses_raw_a_held_image_and_no_options() {
    let w = Work::new("amend-refusals");
    w.create("disk.raw", "raw", "", None, MIB);
    let r = w.cowshed(&["amend", "-o", "size=2M", "disk.raw"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("Format driver 'raw' does not support option amendment"),
        "{r}"
    );
    w.create("img", "qcow2", "", None, MIB);
    let r = w.cowshed(&["amend", "img"]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("Must specify options"), "{r}");
    let holder = w.hold_writer("img", "qcow2");
    let before = w.read_file("img");
    let r = w.cowshed(&["amend", "-o", "lazy_refcounts=on", "img"]);
    common::release_holder(holder);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("qemu-io"), "{r}");
    assert_eq!(w.read_file("img"), before);
}
