//! What every writing operation checks before its first write: a
//! destination is never replaced under a QEMU that holds it or under the
//! images that grow on it, and no write lands on corrupt metadata. Each
//! refusal exits 1, names the file and the reason, and leaves every file
//! byte-identical.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use common::bytes::{be64, poke};
use common::{dir_names, release_holder, Failures, Work};

/// Every file of the scratch directory and its bytes.
fn snapshot(w: &Work) -> BTreeMap<String, Vec<u8>> {
    dir_names(w.root())
        .into_iter()
        .filter(|n| w.path(n).is_file())
        .map(|n| {
            let b = w.read_file(&n);
            (n, b)
        })
        .collect()
}

fn unchanged(f: &mut Failures, what: &str, before: &BTreeMap<String, Vec<u8>>, w: &Work) {
    let after = snapshot(w);
    f.check(
        &after == before,
        &format!("{what}: files unchanged"),
        || {
            let names = |m: &BTreeMap<String, Vec<u8>>| m.keys().cloned().collect::<Vec<_>>();
            let changed: Vec<_> = after
                .iter()
                .filter(|(n, b)| before.get(*n) != Some(b))
                .map(|(n, _)| n.clone())
                .collect();
            format!(
                "before {:?}, after {:?}, changed {changed:?}",
                names(before),
                names(&after)
            )
        },
    );
}

fn source(w: &Work) {
    w.qemu_img(&["create", "-q", "-f", "qcow2", "src.qcow2", "16M"]);
    w.io(
        "qcow2",
        "src.qcow2",
        &["write -P 7 0 64k".into(), "write -P 9 5M 1M".into()],
    );
}

/// A reader holder, as a VM holds its backing file.
fn hold_reader(w: &Work, img: &str) -> std::process::Child {
    use std::process::{Command, Stdio};
    let child = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", img])
        .current_dir(w.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while cowshed::engine::lock_state(&w.path(img)).ok() != Some(cowshed::engine::LockState::Reader)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-io -r never locked {img}"
        );
        std::thread::yield_now();
    }
    child
}

#[test]
fn a_destination_a_qemu_holds_is_never_replaced() {
    let w = Work::new("preflight-held-dst");
    source(&w);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "vm.qcow2", "16M"]);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "backing.qcow2", "16M"]);
    let mut f = Failures::new(&w.case);
    for (holder_kind, img) in [("writer", "vm.qcow2"), ("reader", "backing.qcow2")] {
        let holder = if holder_kind == "writer" {
            w.hold_writer(img, "qcow2")
        } else {
            hold_reader(&w, img)
        };
        let pid = holder.id().to_string();
        let ino = std::fs::metadata(w.path(img)).unwrap().ino();
        // The oracle refuses too.
        let q = w.run("qemu-img", &["convert", "-O", "qcow2", "src.qcow2", img]);
        f.check(
            !q.ok() && q.stderr.contains("lock"),
            &format!("{holder_kind}: qemu-img refuses"),
            || q.to_string(),
        );
        let before = snapshot(&w);
        for (name, args) in [
            ("qcow2", &["-O", "qcow2"][..]),
            ("raw", &["-O", "raw"][..]),
            (
                "zstd",
                &["-O", "qcow2", "-c", "-o", "compression_type=zstd"][..],
            ),
            ("force", &["-O", "qcow2", "--force"][..]),
        ] {
            let what = format!("{holder_kind} holds {img}, convert {name}");
            let mut a = vec!["convert"];
            a.extend_from_slice(args);
            a.extend(["src.qcow2", img]);
            let r = w.cowshed(&a);
            f.check(
                r.code == Some(1)
                    && r.stderr.contains(img)
                    && r.stderr.contains(&format!("pid {pid}"))
                    && r.stderr.contains("qemu-io")
                    && r.stderr.contains("lock"),
                &format!("{what}: refused naming the holder"),
                || r.to_string(),
            );
            unchanged(&mut f, &what, &before, &w);
            f.check(
                std::fs::metadata(w.path(img)).unwrap().ino() == ino,
                &format!("{what}: same inode"),
                || "the file was replaced".into(),
            );
        }
        release_holder(holder);
    }
    // Not held any more: replaced as by qemu-img.
    let r = w.cowshed(&["convert", "-O", "qcow2", "src.qcow2", "vm.qcow2"]);
    f.check(r.ok(), "released: replaced", || r.to_string());
    f.check(
        w.same_view("src.qcow2", "vm.qcow2").is_ok(),
        "released: the new content",
        || "views differ".into(),
    );
    f.finish();
}

/// While a convert is under way, QEMU's locks on the destination it will
/// replace stop a QEMU that starts meanwhile, as with qemu-img.
#[test]
fn a_destination_stays_locked_until_it_is_replaced() {
    use cowshed::engine::preflight::{claim_destination, ReplaceOptions};
    let w = Work::new("preflight-claim");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "dst.qcow2", "1M"]);
    let claim = claim_destination(&w.path("dst.qcow2"), &[], &ReplaceOptions::default())
        .expect("an idle destination is claimed");
    let r = w.run("qemu-io", &["-c", "read 0 512", "dst.qcow2"]);
    assert!(
        !r.ok() && r.stderr.contains("lock"),
        "QEMU opened a claimed destination: {r}"
    );
    drop(claim);
    let r = w.run("qemu-io", &["-c", "read 0 512", "dst.qcow2"]);
    assert!(r.ok(), "released, QEMU opens it: {r}");
    // A new destination needs no lock.
    claim_destination(&w.path("new.qcow2"), &[], &ReplaceOptions::default())
        .expect("a new name is free");
}

#[test]
fn a_base_is_not_replaced_under_its_overlays() {
    let w = Work::new("preflight-dependents");
    source(&w);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    w.io("qcow2", "base.qcow2", &["write -P 3 0 1M".into()]);
    w.create(
        "vm-1.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        16 << 20,
    );
    w.mkdir("sub");
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        "sub/vm-2.qcow2",
    ]);
    let mut f = Failures::new(&w.case);
    let before = snapshot(&w);
    for dst in ["base.qcow2", "./base.qcow2"] {
        for out in ["qcow2", "raw"] {
            let what = format!("convert -O {out} onto {dst}");
            let r = w.cowshed(&["convert", "-O", out, "src.qcow2", dst]);
            f.check(
                r.code == Some(1)
                    && r.stderr.contains("vm-1.qcow2")
                    && r.stderr.contains("backing file")
                    && r.stderr.contains("--force"),
                &format!("{what}: refused naming the overlay"),
                || r.to_string(),
            );
            unchanged(&mut f, &what, &before, &w);
        }
    }
    // Part of the source's own chain: refused even with --force.
    for dst in ["base.qcow2", "vm-1.qcow2"] {
        let what = format!("convert vm-1.qcow2 onto {dst} --force");
        let r = w.cowshed(&["convert", "--force", "-O", "qcow2", "vm-1.qcow2", dst]);
        f.check(
            r.code == Some(1) && r.stderr.contains("source chain"),
            &format!("{what}: refused"),
            || r.to_string(),
        );
        unchanged(&mut f, &what, &before, &w);
    }
    // --force replaces it: the operator said the overlays may go.
    let r = w.cowshed(&[
        "convert",
        "--force",
        "-O",
        "qcow2",
        "src.qcow2",
        "base.qcow2",
    ]);
    f.check(r.ok(), "--force replaces", || r.to_string());
    f.check(
        w.same_view("src.qcow2", "base.qcow2").is_ok(),
        "--force: new content",
        || "views differ".into(),
    );
    // Renaming over a link or a device node would replace it, not the
    // image behind it: refused.
    std::os::unix::fs::symlink("spare-target.qcow2", w.path("link.qcow2")).unwrap();
    w.qemu_img(&["create", "-q", "-f", "qcow2", "spare-target.qcow2", "1M"]);
    let before = snapshot(&w);
    let r = w.cowshed(&["convert", "-O", "qcow2", "src.qcow2", "link.qcow2"]);
    f.check(
        r.code == Some(1) && r.stderr.contains("symbolic link"),
        "a symlink destination is refused",
        || r.to_string(),
    );
    unchanged(&mut f, "a symlink destination", &before, &w);
    f.check(
        std::fs::symlink_metadata(w.path("link.qcow2")).is_ok_and(|m| m.file_type().is_symlink()),
        "the link stays a link",
        || "replaced".into(),
    );
    // A FIFO stands for any special file (a device node is the same case).
    let mk = w.run("mkfifo", &["pipe.img"]);
    assert!(mk.ok(), "{mk}");
    let r = w.cowshed(&["convert", "-O", "raw", "src.qcow2", "pipe.img"]);
    f.check(
        r.code == Some(1) && r.stderr.contains("not a regular file"),
        "a special-file destination is refused",
        || r.to_string(),
    );
    f.check(
        std::fs::symlink_metadata(w.path("pipe.img")).is_ok_and(|m| !m.is_file()),
        "the special file stays",
        || "replaced".into(),
    );
    // An image nothing uses is replaced, as by qemu-img.
    w.qemu_img(&["create", "-q", "-f", "qcow2", "spare.qcow2", "1M"]);
    let r = w.cowshed(&["convert", "-O", "qcow2", "src.qcow2", "spare.qcow2"]);
    f.check(r.ok(), "an unused image is replaced", || r.to_string());
    f.finish();
}

/// Byte offsets of a qcow2 file's tables (v3, 64 KiB clusters).
struct Layout {
    l1: u64,
    l1_entry: u64,
    l2_entry: u64,
    reftable: u64,
}

fn layout(w: &Work, img: &str) -> Layout {
    let b = w.read_file(img);
    let l1 = be64(&b, 40);
    let l1_entry = be64(&b, l1 as usize);
    let l2 = l1_entry & 0x00ff_ffff_ffff_fe00;
    // The first allocated entry of the first L2 table.
    let first = (0..8192)
        .map(|i| l2 as usize + 8 * i)
        .find(|&at| be64(&b, at) != 0)
        .expect("recipe: a data cluster");
    Layout {
        l1,
        l1_entry,
        l2_entry: first as u64,
        reftable: be64(&b, 48),
    }
}

fn poke64(w: &Work, img: &str, at: u64, v: u64) {
    poke(&w.path(img), at, &v.to_be_bytes());
}

#[test]
fn no_write_lands_on_corrupt_metadata() {
    let w = Work::new("preflight-corrupt");
    w.qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 8M".into()]);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "other.qcow2", "64M"]);
    w.io("qcow2", "other.qcow2", &["write -P 5 0 4M".into()]);
    w.create(
        "clean-top.qcow2",
        "qcow2",
        "",
        Some(("base.qcow2", "qcow2")),
        64 << 20,
    );
    w.io(
        "qcow2",
        "clean-top.qcow2",
        &["write -P 2 1M 1M".into(), "write -P 3 20M 64k".into()],
    );
    w.copy("base.qcow2", "clean-base.qcow2");
    let l = layout(&w, "clean-top.qcow2");
    let file_len = std::fs::metadata(w.path("clean-top.qcow2")).unwrap().len();
    let data = be64(&w.read_file("clean-top.qcow2"), l.l2_entry as usize);
    let flags = data & !0x00ff_ffff_ffff_fe00;
    let corruptions: [(&str, u64, u64); 6] = [
        ("L1 entry unaligned", l.l1, l.l1_entry + 0x200),
        ("L1 entry reserved bit", l.l1, l.l1_entry | 1 << 56),
        (
            "L2 table past the end",
            l.l1,
            (1 << 63) | (file_len + (1 << 30)),
        ),
        (
            "data cluster past the end",
            l.l2_entry,
            flags | (file_len + (1 << 30)),
        ),
        ("data cluster on the L1 table", l.l2_entry, flags | l.l1),
        (
            "data cluster on the refcount table",
            l.l2_entry,
            flags | l.reftable,
        ),
    ];
    let mut f = Failures::new(&w.case);
    for (kind, at, value) in corruptions {
        for (op, args) in [
            ("flatten", &["rebase", "-b", "", "top.qcow2"][..]),
            (
                "rebase",
                &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"][..],
            ),
            (
                "rebase -u",
                &[
                    "rebase",
                    "-u",
                    "-b",
                    "other.qcow2",
                    "-F",
                    "qcow2",
                    "top.qcow2",
                ][..],
            ),
            ("commit", &["commit", "top.qcow2"][..]),
            ("commit -d", &["commit", "-d", "top.qcow2"][..]),
            ("check -r leaks", &["check", "-r", "leaks", "top.qcow2"][..]),
        ] {
            w.copy("clean-top.qcow2", "top.qcow2");
            w.copy("clean-base.qcow2", "base.qcow2");
            poke64(&w, "top.qcow2", at, value);
            let what = format!("{kind}: {op}");
            let before = snapshot(&w);
            let r = w.cowshed(args);
            f.check(
                r.code == Some(1)
                    && r.stderr.contains("top.qcow2")
                    && r.stderr.contains("corrupt")
                    && r.stderr.contains("cowshed check"),
                &format!("{what}: refused, pointing to check"),
                || r.to_string(),
            );
            unchanged(&mut f, &what, &before, &w);
        }
        // The base of a commit is checked as well as the top.
        w.copy("clean-top.qcow2", "top.qcow2");
        w.copy("clean-base.qcow2", "base.qcow2");
        let lb = layout(&w, "base.qcow2");
        let (at, value) = match at {
            a if a == l.l1 => (lb.l1, value - l.l1_entry + lb.l1_entry),
            _ => (lb.l2_entry, value),
        };
        if !kind.contains("past the end") {
            poke64(&w, "base.qcow2", at, value);
            let before = snapshot(&w);
            let r = w.cowshed(&["commit", "top.qcow2"]);
            f.check(
                r.code == Some(1)
                    && r.stderr.contains("base.qcow2")
                    && r.stderr.contains("corrupt"),
                &format!("{kind} in the base: commit refused"),
                || r.to_string(),
            );
            unchanged(&mut f, &format!("{kind} in the base: commit"), &before, &w);
        }
    }
    // The library's writer refuses the same way (the demo guest's path).
    w.copy("clean-top.qcow2", "top.qcow2");
    poke64(&w, "top.qcow2", l.l1, l.l1_entry + 0x200);
    let before = w.read_file("top.qcow2");
    let e = cowshed::engine::qcow2::Qcow2Writer::open(&w.path("top.qcow2")).err();
    f.check(
        matches!(e, Some(cowshed::engine::Error::Corrupt { .. })),
        "the writer refuses to open a corrupt image",
        || format!("{e:?}"),
    );
    f.check(
        w.read_file("top.qcow2") == before,
        "the writer wrote nothing",
        || "bytes changed".into(),
    );
    // Leaks alone are harmless: the writer works on a leaky image.
    w.copy("clean-top.qcow2", "top.qcow2");
    w.copy("clean-base.qcow2", "base.qcow2");
    let rb = be64(&w.read_file("top.qcow2"), l.reftable as usize);
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(w.path("top.qcow2"))
        .unwrap()
        .write_all_at(&2u16.to_be_bytes(), rb)
        .unwrap();
    f.check(w.check_code("top.qcow2") == 3, "recipe: a leak", || {
        "qemu-img check is not 3".into()
    });
    let r = w.cowshed(&["rebase", "-b", "", "top.qcow2"]);
    f.check(r.ok(), "a leaky image is flattened", || r.to_string());
    f.finish();
}

/// A raw external data file is a complete disk by itself: the qcow2 spec
/// forbids a backing file beside it, and QEMU refuses to set one.
#[test]
fn an_image_with_a_raw_data_file_takes_no_backing() {
    let w = Work::new("preflight-data-file-raw");
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=img.data,data_file_raw=on",
        "img.qcow2",
        "16M",
    ]);
    w.io("qcow2", "img.qcow2", &["write -P 4 0 1M".into()]);
    w.qemu_img(&["create", "-q", "-f", "qcow2", "b.qcow2", "16M"]);
    let mut f = Failures::new(&w.case);
    for args in [
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "img.qcow2"][..],
        &["rebase", "-b", "b.qcow2", "-F", "qcow2", "img.qcow2"][..],
    ] {
        let what = args.join(" ");
        let before = snapshot(&w);
        let q = w.run("qemu-img", args);
        f.check(!q.ok(), &format!("{what}: qemu-img refuses"), || {
            q.to_string()
        });
        unchanged(&mut f, &format!("{what} (qemu-img)"), &before, &w);
        let r = w.cowshed(args);
        f.check(
            r.code == Some(1) && r.stderr.contains("data_file_raw"),
            &format!("{what}: refused"),
            || r.to_string(),
        );
        unchanged(&mut f, &what, &before, &w);
    }
    f.finish();
}
