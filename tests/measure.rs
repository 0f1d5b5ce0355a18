//! `cowshed measure` against `qemu-img measure`: the same JSON (required,
//! fully-allocated, bitmaps), the same human text and the same exit code,
//! for empty disks of many sizes and layouts (--size) and for source images
//! (qcow2 with data, zero and compressed clusters, backing chains measured
//! flattened, extended L2, preallocated metadata, bitmaps, raw files).

mod common;

use common::{random_bytes, Failures, Work, KIB, MIB};
use serde_json::Value;

/// Run both tools with the same measure arguments; compare exit codes, and
/// JSON and human text when they succeed.
fn compare(w: &Work, f: &mut Failures, args: &[&str]) {
    let mut q = vec!["measure", "--output=json"];
    q.extend_from_slice(args);
    let mut c = vec!["measure", "--output", "json"];
    c.extend_from_slice(args);
    let qr = w.qemu_img_may_fail(&q);
    let cr = w.cowshed(&c);
    if qr.code != cr.code {
        f.push(
            &format!("{args:?} exit code"),
            format!("qemu-img:\n{qr}\ncowshed:\n{cr}"),
        );
        return;
    }
    if !qr.ok() {
        return;
    }
    let qj: Value = w.json(&qr);
    let cj: Value = w.json(&cr);
    f.check(qj == cj, &format!("{args:?} JSON"), || {
        format!("qemu-img: {qj}\ncowshed : {cj}")
    });
    let mut qh = vec!["measure"];
    qh.extend_from_slice(args);
    let mut ch = vec!["measure"];
    ch.extend_from_slice(args);
    let (qh, ch) = (w.qemu_img(&qh), w.cowshed(&ch));
    f.check(qh.stdout == ch.stdout, &format!("{args:?} text"), || {
        format!("qemu-img:\n{}cowshed:\n{}", qh.stdout, ch.stdout)
    });
}

#[test]
fn empty_disks_of_every_layout() {
    let w = Work::new("measure-size");
    let mut f = Failures::new("measure-size");
    let sizes = [
        "0",
        "1",
        "1000",
        "65535",
        "1M",
        "1G",
        "1073741825",
        "100G",
        "3T",
    ];
    let layouts = [
        "cluster_size=512",
        "cluster_size=512,refcount_bits=1",
        "cluster_size=4k,refcount_bits=64",
        "cluster_size=16k,extended_l2=on",
        "cluster_size=64k",
        "cluster_size=64k,refcount_bits=8,extended_l2=on",
        "cluster_size=64k,compat=0.10",
        "cluster_size=256k,refcount_bits=2",
        "cluster_size=2M,extended_l2=on,refcount_bits=32",
        "cluster_size=2M,refcount_bits=4",
        "preallocation=full",
    ];
    for size in sizes {
        compare(&w, &mut f, &["-O", "qcow2", "--size", size]);
        for o in layouts {
            compare(&w, &mut f, &["-O", "qcow2", "-o", o, "--size", size]);
        }
    }
    // raw, and refused combinations.
    for size in ["0", "1000", "1G"] {
        compare(&w, &mut f, &["-O", "raw", "--size", size]);
        compare(&w, &mut f, &["--size", size]);
    }
    compare(
        &w,
        &mut f,
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "--size",
            "1G",
        ],
    );
    compare(
        &w,
        &mut f,
        &["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1G"],
    );
    compare(
        &w,
        &mut f,
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
    );
    compare(&w, &mut f, &["-O", "qcow2"]);
    f.finish();
}

/// Target layouts each source image is measured for.
const TARGETS: [&str; 6] = [
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=64k",
    "cluster_size=64k,extended_l2=on,refcount_bits=1",
    "cluster_size=2M",
    "compat=0.10",
];

fn compare_source(w: &Work, f: &mut Failures, file: &str) {
    compare(w, f, &["-O", "qcow2", file]);
    compare(w, f, &["-O", "raw", file]);
    for o in TARGETS {
        compare(w, f, &["-O", "qcow2", "-o", o, file]);
    }
}

#[test]
fn source_images_and_flattened_chains() {
    let w = Work::new("measure-src");
    let mut f = Failures::new("measure-src");
    let io = |file: &str, cmds: &[&str]| {
        w.io(
            "qcow2",
            file,
            &cmds.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };

    // Data, a partial cluster, zero clusters (plain and allocated), a
    // compressed cluster, at 64 KiB clusters.
    w.create("mixed.qcow2", "qcow2", "", None, 8 * MIB);
    io(
        "mixed.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x12 200k 1k",
            "write -z 1M 64k",
            "write -P 0x13 2M 64k",
            "write -z 2M 64k",
            "write -c -P 0x14 3M 64k",
            "write -P 0x15 7M 4k",
        ],
    );
    compare_source(&w, &mut f, "mixed.qcow2");

    // 4 KiB clusters scattered: several source clusters share a target one.
    w.create("small.qcow2", "qcow2", "cluster_size=4k", None, 4 * MIB);
    io(
        "small.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 8k 4k",
            "write -P 3 68k 4k",
            "write -z 72k 4k",
            "write -P 4 1M 512",
            "write -P 5 3M 64k",
        ],
    );
    compare_source(&w, &mut f, "small.qcow2");

    // A chain: base data, overlay data and zero clusters over it, a middle
    // raw layer; measure counts the flattened content.
    w.create("base.qcow2", "qcow2", "", None, 8 * MIB);
    io("base.qcow2", &["write -P 0x21 0 2M", "write -P 0x22 6M 1M"]);
    w.create(
        "mid.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        8 * MIB,
    );
    io("mid.qcow2", &["write -z 0 1M", "write -P 0x23 4M 64k"]);
    w.create(
        "top.qcow2",
        "qcow2",
        "cluster_size=4k",
        Some(("mid.qcow2", "qcow2")),
        8 * MIB,
    );
    io("top.qcow2", &["write -P 0x24 512k 4k", "write -z 6M 512k"]);
    compare_source(&w, &mut f, "top.qcow2");
    compare(
        &w,
        &mut f,
        &["-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2"],
    );
    compare(
        &w,
        &mut f,
        &["-O", "qcow2", "-o", "preallocation=falloc", "top.qcow2"],
    );

    // An overlay larger than its backing: the tail reads as zeros.
    w.create("short.qcow2", "qcow2", "", None, MIB);
    io("short.qcow2", &["write -P 0x31 0 1M"]);
    w.create(
        "long.qcow2",
        "qcow2",
        "",
        Some(("short.qcow2", "qcow2")),
        5 * MIB,
    );
    io("long.qcow2", &["write -P 0x32 4M 4k"]);
    compare_source(&w, &mut f, "long.qcow2");

    // Extended L2: subclusters allocated, zero and unallocated.
    w.create("ext.qcow2", "qcow2", "extended_l2=on", None, 4 * MIB);
    io(
        "ext.qcow2",
        &[
            "write -P 1 0 4k",
            "write -z 8k 4k",
            "write -P 2 130k 2k",
            "write -c -P 3 1M 64k",
        ],
    );
    compare_source(&w, &mut f, "ext.qcow2");

    // Preallocated metadata: data clusters that are holes read as zeros.
    w.create(
        "prealloc.qcow2",
        "qcow2",
        "preallocation=metadata",
        None,
        4 * MIB,
    );
    io("prealloc.qcow2", &["write -P 7 1M 64k"]);
    compare_source(&w, &mut f, "prealloc.qcow2");

    // Bitmaps: counted when the source and target are v3; v2 sources none.
    w.create("bitmaps.qcow2", "qcow2", "", None, 64 * MIB);
    w.qemu_img(&["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    w.qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "512",
        "bitmaps.qcow2",
        "a-longer-bitmap-name",
    ]);
    io("bitmaps.qcow2", &["write -P 9 0 1M"]);
    compare_source(&w, &mut f, "bitmaps.qcow2");
    w.create("v2.qcow2", "qcow2", "compat=0.10", None, 4 * MIB);
    io("v2.qcow2", &["write -P 9 64k 64k"]);
    compare_source(&w, &mut f, "v2.qcow2");

    // Raw: sparse with data islands, an odd size, fully written, empty.
    let mut sparse = vec![0u8; (3 * MIB) as usize];
    sparse[(MIB as usize)..(MIB + 8 * KIB) as usize].copy_from_slice(&random_bytes(1, 8192));
    w.write_file("sparse.raw", &[]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("sparse.raw"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&sparse[MIB as usize..(MIB + 8 * KIB) as usize], MIB)
        .unwrap();
    file.write_all_at(b"tail", 5 * MIB - 4).unwrap();
    drop(file);
    compare_source(&w, &mut f, "sparse.raw");
    w.write_file("odd.raw", &random_bytes(2, 1000));
    compare_source(&w, &mut f, "odd.raw");
    w.write_file("full.raw", &random_bytes(3, 300_000));
    compare(&w, &mut f, &["-f", "raw", "-O", "qcow2", "full.raw"]);
    w.write_file("empty.raw", &[]);
    compare(&w, &mut f, &["-O", "qcow2", "empty.raw"]);

    // More of the oracle matrix: internal snapshots (not measured), an
    // external data file (raw and not), an odd virtual size, zstd
    // compression, a dirty image with lazy refcounts, a relative backing
    // name in a subdirectory.
    w.create("snap.qcow2", "qcow2", "", None, 4 * MIB);
    io("snap.qcow2", &["write -P 1 0 1M"]);
    w.qemu_img(&["snapshot", "-c", "s1", "snap.qcow2"]);
    io("snap.qcow2", &["write -z 0 512k", "write -P 2 2M 64k"]);
    compare_source(&w, &mut f, "snap.qcow2");
    w.create(
        "df.qcow2",
        "qcow2",
        "data_file=df.data,data_file_raw=on",
        None,
        4 * MIB,
    );
    io("df.qcow2", &["write -P 1 64k 64k"]);
    compare_source(&w, &mut f, "df.qcow2");
    w.create("df2.qcow2", "qcow2", "data_file=df2.data", None, 4 * MIB);
    io("df2.qcow2", &["write -P 1 64k 64k", "write -z 1M 64k"]);
    compare_source(&w, &mut f, "df2.qcow2");
    w.create("odd.qcow2", "qcow2", "cluster_size=4k", None, 1_000_000);
    io("odd.qcow2", &["write -P 1 975k 512"]);
    compare_source(&w, &mut f, "odd.qcow2");
    w.create(
        "zstd.qcow2",
        "qcow2",
        "compression_type=zstd",
        None,
        4 * MIB,
    );
    io(
        "zstd.qcow2",
        &["write -c -P 1 0 64k", "write -c -P 2 1M 128k"],
    );
    compare_source(&w, &mut f, "zstd.qcow2");
    w.create("lazy.qcow2", "qcow2", "lazy_refcounts=on", None, 4 * MIB);
    w.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "abort",
            "lazy.qcow2",
        ],
    );
    compare_source(&w, &mut f, "lazy.qcow2");
    w.mkdir("sub");
    w.create("sub/b.qcow2", "qcow2", "", None, 4 * MIB);
    io("sub/b.qcow2", &["write -P 1 0 64k"]);
    w.create(
        "sub/o.qcow2",
        "qcow2",
        "",
        Some(("b.qcow2", "qcow2")),
        4 * MIB,
    );
    io("sub/o.qcow2", &["write -P 2 1M 64k"]);
    compare_source(&w, &mut f, "sub/o.qcow2");

    // A source and a size together, or a missing source.
    compare(&w, &mut f, &["-O", "qcow2", "--size", "1G", "mixed.qcow2"]);
    compare(&w, &mut f, &["-O", "qcow2", "missing.qcow2"]);
    f.finish();
}

#[test]
fn engine_function_matches_the_cli() {
    use cowshed::engine::{measure, MeasureOptions, MeasureSource};
    let w = Work::new("measure-engine");
    w.create("a.qcow2", "qcow2", "", None, 2 * MIB);
    w.io("qcow2", "a.qcow2", &["write -P 1 0 100k".to_string()]);
    let m = measure(
        MeasureSource::Image {
            path: &w.path("a.qcow2"),
            format: None,
        },
        &MeasureOptions::default(),
    )
    .unwrap();
    let q = w.json(&w.qemu_img(&["measure", "--output=json", "-O", "qcow2", "a.qcow2"]));
    assert_eq!(Some(m.required), q["required"].as_u64());
    assert_eq!(Some(m.fully_allocated), q["fully-allocated"].as_u64());
    assert_eq!(m.bitmaps, q["bitmaps"].as_u64());
}
