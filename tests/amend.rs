//! `cowshed amend` against `qemu-img amend`: each case runs on two copies
//! of an image qemu-img built; both tools must agree on success or refusal,
//! a success must leave byte-identical files (for the options cowshed
//! writes), and every refusal must leave cowshed's copy byte-identical.

mod common;

use common::{fault, Failures, Work};

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
            if c.ok() && (opts.contains("size=") || opts.contains("compat=0.10")) {
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

/// The images the metadata-rewriting amends (compat=0.10, refcount_bits)
/// run on: zero clusters of both kinds (plain and holding a host cluster)
/// in the active disk, in an internal snapshot and in tables both share,
/// with and without a backing file, compressed clusters, and the features
/// QEMU refuses to downgrade.
fn metadata_images(w: &Work) -> Vec<&'static str> {
    let io = |img: &str, cmds: &[&str]| {
        w.io(
            "qcow2",
            img,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    w.create("base", "qcow2", "", None, 32 * MIB);
    io("base", &["write -P 1 0 8M"]);
    // Zero clusters over a backing file: expanded into zeroed clusters.
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "over",
    ]);
    io(
        "over",
        &[
            "write -P 2 1M 1M",
            "write -z 2M 512k",
            "write -z -u 3M 256k",
        ],
    );
    // No backing: plain zero clusters go, allocated ones are zeroed.
    w.create("zeros", "qcow2", "", None, 32 * MIB);
    io(
        "zeros",
        &[
            "write -P 3 0 2M",
            "write -z 512k 256k",
            "write -z -u 1M 128k",
            "write -z 8M 1M",
            "write -c -P 4 16M 64k",
        ],
    );
    // Zero clusters only a snapshot sees, and zero clusters in tables the
    // snapshot and the disk share (small clusters: many tables).
    w.create("snap", "qcow2", "cluster_size=4096", None, 16 * MIB);
    io(
        "snap",
        &["write -P 5 0 1M", "write -z 64k 64k", "write -z -u 2M 8k"],
    );
    w.qemu_img(&["snapshot", "-c", "s1", "snap"]);
    io("snap", &["write -P 6 32k 64k", "write -z 512k 16k"]);
    w.qemu_img(&["snapshot", "-c", "s2", "snap"]);
    io("snap", &["write -z -u 4M 1M"]);
    // A snapshot over a backing file, its zero clusters expanded too.
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", "snapover",
    ]);
    io("snapover", &["write -z 0 128k", "write -P 7 1M 64k"]);
    w.qemu_img(&["snapshot", "-c", "s1", "snapover"]);
    io("snapover", &["write -P 8 0 64k"]);
    w.create("r8", "qcow2", "refcount_bits=8", None, 32 * MIB);
    io("r8", &["write -P 9 0 1M", "write -z 4M 1M"]);
    w.create("lazy", "qcow2", "lazy_refcounts=on", None, 32 * MIB);
    io("lazy", &["write -P 10 0 1M"]);
    w.create("extl2", "qcow2", "extended_l2=on", None, 32 * MIB);
    w.create("zstd", "qcow2", "compression_type=zstd", None, 32 * MIB);
    io("zstd", &["write -P 11 0 1M"]);
    w.create("zstdc", "qcow2", "compression_type=zstd", None, 32 * MIB);
    io("zstdc", &["write -c -P 12 0 64k"]);
    w.create("grown", "qcow2", "", None, 16 * MIB);
    w.qemu_img(&["snapshot", "-c", "s1", "grown"]);
    w.qemu_img(&["resize", "-q", "grown", "32M"]);
    w.create(
        "datafile",
        "qcow2",
        "data_file=datafile.data",
        None,
        16 * MIB,
    );
    // Left dirty: lazy refcounts, killed after writing (QEMU repairs it on
    // open, then amends).
    w.create("dirty", "qcow2", "lazy_refcounts=on", None, 16 * MIB);
    let killed = w.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -z 0 64k",
            "-c",
            "write -P 13 1M 128k",
            "-c",
            "sigraise 9",
            "dirty",
        ],
    );
    assert!(!killed.ok(), "{killed}");
    assert_eq!(w.info_json("dirty")["dirty-flag"], true);
    vec![
        "over", "zeros", "snap", "snapover", "r8", "lazy", "extl2", "zstd", "zstdc", "grown",
        "datafile", "dirty",
    ]
}

const METADATA_OPTIONS: &[&str] = &[
    "compat=0.10",
    "compat=0.10,lazy_refcounts=off",
    "compat=0.10,lazy_refcounts=on",
    "compat=0.10,refcount_bits=16",
    "compat=0.10,refcount_bits=8",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "refcount_bits=64,size=48M",
    "compat=0.10,size=48M",
];

/// compat=0.10 and refcount_bits against qemu-img: the same success or
/// refusal (with qemu-img's reason); a success leaves an image qemu-img
/// checks clean (no leaks either), with the guest view of the original and
/// of qemu-img's result, and `qemu-img info` the same but for the file's
/// allocation, which is reported.
#[test]
fn downgrade_and_refcount_width_agree_with_qemu_img() {
    let w = Work::new("amend-metadata");
    let images = metadata_images(&w);
    let mut f = Failures::new("amend-metadata");
    let mut sizes = Vec::new();
    for image in images {
        for opts in METADATA_OPTIONS {
            let (ours, theirs) = (format!("{image}.ours"), format!("{image}.theirs"));
            w.copy(image, &ours);
            w.copy(image, &theirs);
            let before = w.read_file(&ours);
            let q = w.qemu_img_may_fail(&["amend", "-o", opts, &theirs]);
            let c = w.cowshed(&["amend", "-o", opts, &ours]);
            let what = format!("amend -o {opts} {image}");
            f.check(q.code == c.code, &what, || format!("{q}\n{c}"));
            if !c.ok() {
                f.check(w.read_file(&ours) == before, &what, || {
                    "a refusal changed the file".into()
                });
                // Its reason, past what its repair of a dirty image says.
                let first = q.stderr.lines().find(|l| l.starts_with("qemu-img: "));
                let first = first.unwrap_or("");
                let first = first.replace("qemu-img: ", "");
                f.check(c.stderr.contains(first.trim()), &what, || {
                    format!("{q}\n{c}")
                });
                continue;
            }
            if let Err(e) = w.check_clean(&ours) {
                f.push(&what, format!("not clean: {e}"));
            }
            for other in [image, theirs.as_str()] {
                if let Err(e) = w.same_view(&ours, other) {
                    f.push(&what, format!("view differs from {other}: {e}"));
                }
            }
            let strip = |mut v: serde_json::Value| {
                for k in ["filename", "actual-size", "children"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            };
            let (a, b) = (strip(w.info_json(&ours)), strip(w.info_json(&theirs)));
            f.check(a == b, &what, || format!("info differs:\n{a:#}\n{b:#}"));
            if opts.starts_with("compat=0.10") {
                let h = w.read_file(&ours);
                f.check(h[4..8] == [0, 0, 0, 2], &what, || "not version 2".into());
            }
            let (a, b) = (w.actual_size(&ours), w.actual_size(&theirs));
            // Not more than qemu-img's result, but for a cluster of slack.
            f.check(a <= b + 64 * 1024, &what, || {
                format!("{a} bytes allocated, qemu-img {b}")
            });
            sizes.push((what, a, b));
        }
    }
    println!("allocation after amend (bytes): cowshed / qemu-img");
    for (what, a, b) in &sizes {
        println!("  {what}: {a} / {b}");
    }
    f.finish();
}

/// Rewrite the snapshot table of the compat=0.10 image at `path` in place
/// with only the first `keep` bytes of each entry's extra data (none, as
/// QEMU wrote v2 tables before v3 existed; 16, without the icount QEMU
/// added later).
fn strip_snapshot_extra(path: &std::path::Path, keep: usize) {
    let mut f = std::fs::read(path).unwrap();
    let be = |b: &[u8], at: usize, n: usize| {
        b[at..at + n]
            .iter()
            .fold(0usize, |v, &x| v << 8 | usize::from(x))
    };
    let (nb, start) = (be(&f, 60, 4), be(&f, 64, 8));
    let mut table = Vec::new();
    let mut at = start;
    for _ in 0..nb {
        let (id, name, extra) = (be(&f, at + 12, 2), be(&f, at + 14, 2), be(&f, at + 36, 4));
        let kept = extra.min(keep);
        table.resize(table.len().next_multiple_of(8), 0);
        let mut fixed = f[at..at + 40].to_vec();
        fixed[36..40].copy_from_slice(&(kept as u32).to_be_bytes());
        table.extend_from_slice(&fixed);
        table.extend_from_slice(&f[at + 40..at + 40 + kept]);
        table.extend_from_slice(&f[at + 40 + extra..at + 40 + extra + id + name]);
        at += (40 + extra + id + name).next_multiple_of(8);
    }
    table.resize(at - start, 0);
    f[start..at].copy_from_slice(&table);
    std::fs::write(path, f).unwrap();
}

/// The snapshot table entries of `img` as cowshed's reader decodes them
/// (every field, the extra data QEMU knows included).
fn snapshot_entries(w: &Work, img: &str) -> Vec<cowshed::engine::qcow2::snapshot::Snapshot> {
    let path = w.path(img);
    let file = std::fs::File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let h = cowshed::engine::qcow2::Header::read(&file, &path, len).unwrap();
    cowshed::engine::qcow2::snapshot::read_snapshots(&file, &path, &h, len).unwrap()
}

/// A compat=0.10 image with two internal snapshots (4 KiB clusters: the
/// table and L1 tables in clusters of their own), their entries carrying
/// `extra` bytes of extra data.
fn v2_with_snapshots(w: &Work, name: &str, extra: usize) {
    w.create(
        name,
        "qcow2",
        "compat=0.10,cluster_size=4096",
        None,
        8 * MIB,
    );
    let io = |cmd: &str| w.io("qcow2", name, &[cmd.to_string()]);
    io("write -P 1 0 1M");
    w.qemu_img(&["snapshot", "-c", "one", name]);
    io("write -P 2 512k 1M");
    w.qemu_img(&["snapshot", "-c", "a-longer-name", name]);
    io("write -P 3 6M 64k");
    strip_snapshot_extra(&w.path(name), extra);
}

/// compat=1.1 on compat=0.10 images with internal snapshots, as qemu-img
/// amend upgrades them (measured with 10.0.2): entries whose extra data
/// lacks the 64-bit VM state size or the disk size (under 16 bytes) make
/// QEMU write the table anew, each entry with its 24 bytes of extra data
/// (the disk's size, icount -1); otherwise only the header changes. On
/// twin copies: the same exit code; the same table entries, field by
/// field; the same info; `qemu-img check` clean; the same guest view and
/// snapshot views; byte-identical files where QEMU rewrites no table.
/// Then qemu-img takes cowshed's result on (a snapshot made, one applied,
/// one deleted) and cowshed takes qemu-img's.
#[test]
fn upgrade_with_snapshots_agrees_with_qemu_img() {
    let w = Work::new("amend-upgrade-snapshots");
    let mut f = Failures::new("amend-upgrade-snapshots");
    for extra in [0, 8, 16, 24] {
        let image = format!("v2-extra{extra}");
        v2_with_snapshots(&w, &image, extra);
        for opts in [
            "compat=1.1",
            "compat=1.1,lazy_refcounts=on",
            "compat=1.1,refcount_bits=64",
            "compat=1.1,size=16M",
        ] {
            let what = format!("amend -o {opts} {image}");
            let (ours, theirs) = (format!("{image}.ours"), format!("{image}.theirs"));
            w.copy(&image, &ours);
            w.copy(&image, &theirs);
            let q = w.qemu_img_may_fail(&["amend", "-o", opts, &theirs]);
            let c = w.cowshed(&["amend", "-o", opts, &ours]);
            f.check(q.ok() && c.ok(), &what, || format!("{q}\n{c}"));
            if !c.ok() {
                continue;
            }
            let rewritten = extra < 16;
            if !rewritten && !opts.contains("size=") && !opts.contains("refcount_bits") {
                let same = w.read_file(&ours) == w.read_file(&theirs);
                f.check(same, &what, || "the files differ from qemu-img's".into());
            }
            let (a, b) = (snapshot_entries(&w, &ours), snapshot_entries(&w, &theirs));
            let fields = |v: &[cowshed::engine::qcow2::snapshot::Snapshot]| {
                v.iter()
                    .map(|s| {
                        let mut s = s.clone();
                        // Where the L1 tables sit is layout.
                        s.l1_table_offset = 0;
                        s
                    })
                    .collect::<Vec<_>>()
            };
            f.check(fields(&a) == fields(&b), &what, || {
                format!("snapshot entries differ:\n{a:#?}\n{b:#?}")
            });
            let strip = |mut v: serde_json::Value| {
                for k in ["filename", "actual-size", "children"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            };
            let (ia, ib) = (strip(w.info_json(&ours)), strip(w.info_json(&theirs)));
            f.check(ia == ib, &what, || format!("info differs:\n{ia:#}\n{ib:#}"));
            let chk = w.check_clean(&ours);
            f.check(chk.is_ok(), &what, || format!("{chk:?}"));
            let cmp = w.qemu_img_may_fail(&["compare", &ours, &theirs]);
            f.check(cmp.ok(), &what, || format!("{cmp}"));
            for snap in ["one", "a-longer-name"] {
                for img in [&ours, &theirs] {
                    let out = format!("{img}.{snap}.raw");
                    w.qemu_img(&["convert", "-O", "raw", "-l", snap, img, &out]);
                }
                let same = w.read_file(&format!("{ours}.{snap}.raw"))
                    == w.read_file(&format!("{theirs}.{snap}.raw"));
                f.check(same, &what, || format!("snapshot {snap} reads otherwise"));
            }
            // Each tool goes on with the other's result.
            for (img, tool) in [(&ours, "qemu-img"), (&theirs, "cowshed")] {
                let run = |args: &[&str]| match tool {
                    "qemu-img" => w.qemu_img_may_fail(args),
                    _ => w.cowshed(args),
                };
                for args in [
                    &["snapshot", "-c", "three", img.as_str()][..],
                    &["snapshot", "-a", "one", img],
                    &["snapshot", "-d", "a-longer-name", img],
                ] {
                    let r = run(args);
                    f.check(r.ok(), &what, || format!("{r}"));
                }
                let chk = w.check_clean(img);
                f.check(chk.is_ok(), &what, || format!("{tool} on: {chk:?}"));
            }
            let cmp = w.qemu_img_may_fail(&["compare", &ours, &theirs]);
            f.check(cmp.ok(), &what, || format!("after crossing: {cmp}"));
        }
    }
    f.finish();
}

/// The compat level and refcount width `qemu-img info` reports.
fn level(w: &Work, img: &str) -> (String, u64) {
    let v = w.info_json(img);
    let data = &v["format-specific"]["data"];
    (
        data["compat"].as_str().unwrap_or("").to_string(),
        data["refcount-bits"].as_u64().unwrap_or(0),
    )
}

/// An image with a backing file, two internal snapshots and zero
/// clusters of both kinds in tables they share and tables they do not,
/// 4 KiB clusters (many tables to expand).
fn rich_image(w: &Work, name: &str) {
    let io = |cmds: &[&str]| {
        w.io(
            "qcow2",
            name,
            &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        )
    };
    w.create("rich-base", "qcow2", "cluster_size=4096", None, 8 * MIB);
    w.io("qcow2", "rich-base", &["write -P 1 0 4M".to_string()]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        "-b",
        "rich-base",
        "-F",
        "qcow2",
        name,
    ]);
    io(&["write -P 2 0 1M", "write -z 64k 64k", "write -z -u 1M 32k"]);
    w.qemu_img(&["snapshot", "-c", "s1", name]);
    io(&["write -P 3 32k 64k", "write -z 2M 64k", "write -z -u 3M 1M"]);
    w.qemu_img(&["snapshot", "-c", "s2", name]);
    io(&["write -z 512k 16k"]);
}

/// Killed at each of its fault points, a downgrade, width change or
/// upgrade that writes the snapshot table anew leaves the image `qemu-img
/// check` clean (no leaks either), with the guest view it had, its
/// snapshots intact, and the old or the new level.
#[test]
fn kills_leave_the_old_or_the_new_metadata() {
    let w = Work::new("amend-kill");
    rich_image(&w, "rich");
    for (opts, point) in [
        ("compat=0.10", "amend.downgrade.before_switch"),
        ("refcount_bits=2", "amend.refcount.before_switch"),
        ("refcount_bits=64", "amend.refcount.before_switch"),
        ("compat=1.1", "amend.upgrade.before_switch"),
    ] {
        let upgrade = opts == "compat=1.1";
        if upgrade {
            v2_with_snapshots(&w, "orig", 0);
        } else {
            w.copy("rich", "orig");
        }
        let snaps = if upgrade {
            ["one", "a-longer-name"]
        } else {
            ["s1", "s2"]
        };
        let before = level(&w, "orig");
        w.copy("orig", "img");
        let args = ["amend", "-o", opts, "img"];
        let trace = fault::trace(w.root(), &args);
        let after = level(&w, "img");
        assert_ne!(before, after, "{opts} changed nothing");
        let chosen = fault::choose(&trace, 3);
        assert!(chosen.iter().any(|(p, _)| p == point), "{chosen:?}");
        for (p, hit) in &chosen {
            w.copy("orig", "img");
            fault::kill_at(w.root(), &args, p, *hit);
            let what = format!("amend -o {opts} killed at {p} #{hit}");
            if let Err(e) = w.check_clean("img") {
                panic!("{what}: {e}");
            }
            let now = level(&w, "img");
            assert!(now == before || now == after, "{what}: {now:?}");
            w.same_view("img", "orig")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            for snap in snaps {
                for img in ["img", "orig"] {
                    let out = format!("{img}.{snap}.raw");
                    w.qemu_img(&["convert", "-O", "raw", "-l", snap, img, &out]);
                }
                let same = w.read_file(&format!("img.{snap}.raw"))
                    == w.read_file(&format!("orig.{snap}.raw"));
                assert!(same, "{what}: snapshot {snap} reads otherwise");
            }
        }
    }
}

#[path = "common/powercut/mod.rs"]
mod powercut;

/// `cowshed amend -o OPTS` on a recorded mount, every state a power cut
/// may leave judged: `qemu-img check` clean (no leaks either), the old or
/// the new level, the guest view unchanged.
fn powercut_case(name: &str, opts: &str) -> powercut::Tally {
    use powercut::{must, raw_view, tool, Session};
    let s = Session::new(name);
    let b = &s.backing;
    let c4k = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"];
    must(b, "qemu-img", &[&c4k[..], &["base", "4M"]].concat());
    // An upgrade starts from compat=0.10 (no zero clusters then).
    let upgrade = opts.starts_with("compat=1.1");
    let img_opts = if upgrade {
        "cluster_size=4096,compat=0.10"
    } else {
        "cluster_size=4096"
    };
    must(
        b,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 2M", "base"],
    );
    must(
        b,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-o", img_opts, "-b", "base", "-F", "qcow2", "img", "4M",
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
        "write -P 2 0 512k",
        "write -z 64k 64k",
        "write -z -u 1M 32k",
    ]);
    must(b, "qemu-img", &["snapshot", "-c", "s1", "img"]);
    io(&["write -P 3 32k 64k", "write -z 2M 64k"]);
    if upgrade {
        // The table as QEMU wrote v2 tables before v3 existed: the
        // upgrade writes it anew.
        strip_snapshot_extra(&b.join("img"), 0);
    }
    raw_view(b, "img", &s.refs.join("now.raw"));
    let level = |d: &std::path::Path| {
        let (code, out) = tool(d, "qemu-img", &["info", "--output", "json", "img"]);
        if code != 0 {
            return Err(out);
        }
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        let data = &v["format-specific"]["data"];
        Ok((data["compat"].clone(), data["refcount-bits"].clone()))
    };
    let before = level(b).unwrap();
    let (rec, ()) = s.record(|mnt, _| {
        must(mnt, common::COWSHED, &["amend", "-o", opts, "img"]);
    });
    let after = level(b).unwrap();
    assert_ne!(before, after, "{name} changed nothing");
    let now_raw = s.refs.join("now.raw");
    let budget = powercut::states::Budget::METADATA_SWITCH;
    s.judge(&rec, budget, &|d, _| {
        powercut::clean_check(d, "img")?;
        let now = level(d)?;
        if now != before && now != after {
            return Err(format!("level neither before nor after: {now:?}"));
        }
        powercut::same_view(d, &now_raw, "img", "qcow2")
    })
}

#[test]
fn downgrade_refcount_width_and_upgrade_survive_power_cuts() {
    let rows = vec![
        powercut_case("amend compat=0.10", "compat=0.10"),
        powercut_case("amend refcount_bits=2", "refcount_bits=2"),
        powercut_case("amend refcount_bits=64", "refcount_bits=64"),
        powercut_case("amend compat=1.1 (snapshot table)", "compat=1.1"),
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

/// Metadata a downgrade or width change would walk, spoilt (a snapshot's
/// L1 table past the end of the file, or not aligned): refused before
/// anything is written, with an error naming the file, never a panic.
#[test]
fn spoilt_metadata_is_refused_naming_the_file() {
    let w = Work::new("amend-hostile");
    w.create("good", "qcow2", "", None, 16 * MIB);
    w.io(
        "qcow2",
        "good",
        &["write -z 0 64k".to_string(), "write 1M 64k".to_string()],
    );
    w.qemu_img(&["snapshot", "-c", "s1", "good"]);
    let good = w.read_file("good");
    let table = u64::from_be_bytes(good[64..72].try_into().unwrap()) as usize;
    for (name, l1_offset) in [("far", 1u64 << 32), ("unaligned", 0x10200)] {
        let mut bytes = good.clone();
        bytes[table..table + 8].copy_from_slice(&l1_offset.to_be_bytes());
        w.write_file(name, &bytes);
        for opts in ["compat=0.10", "refcount_bits=4"] {
            let r = w.cowshed(&["amend", "-o", opts, name]);
            assert_eq!(r.code, Some(1), "{opts} {name}: {r}");
            assert!(r.stderr.contains(&format!("{name}:")), "{r}");
            assert!(!r.stderr.contains("panicked"), "{r}");
            assert_eq!(w.read_file(name), bytes, "{opts} {name} changed the file");
        }
    }
}
