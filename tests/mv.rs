//! `cowshed mv` with qemu-img as the oracle: after every move each
//! dependent's `qemu-img info` shows the new backing name (relative where
//! it was relative), `qemu-img compare` with its guest view taken before
//! the move finds it identical and `qemu-img check` finds it clean; every
//! refusal leaves every file byte-identical; a kill at any of the move's
//! fault points leaves chains that open and read the same, and running
//! the same command again completes the move.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fault::{self, Trace};
use common::run::{check_code, ok, run};
use common::{release_holder, Work, COWSHED};

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tempdir(case: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("cowshed-mv-{case}-"))
        .tempdir()
        .expect("tempdir")
}

/// The chain the cases move: base ← mid ← top, relative names, and
/// top-abs over mid by its absolute path; each layer writes its own
/// pattern, so a wrong backing shows in the guest view.
fn chain(dir: &Path) {
    let img = |args: &[&str]| {
        ok(dir, "qemu-img", args);
    };
    let io = |file: &str, cmd: &str| {
        ok(dir, "qemu-io", &["-f", "qcow2", "-c", cmd, file]);
    };
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    io("base.qcow2", "write -P 1 0 4M");
    let over = |name: &str, backing: &str| {
        img(&[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
        ])
    };
    over("mid.qcow2", "base.qcow2");
    io("mid.qcow2", "write -P 2 1M 1M");
    over("top.qcow2", "mid.qcow2");
    io("top.qcow2", "write -P 3 2M 512k");
    let abs = canon(dir).join("mid.qcow2");
    over("top-abs.qcow2", abs.to_str().expect("utf-8 path"));
    io("top-abs.qcow2", "write -P 4 3M 64k");
}

/// Guest views taken before a move, as raw files in a directory of their
/// own (outside every tree a move or a scan looks at).
struct Views {
    dir: tempfile::TempDir,
}

impl Views {
    fn take(dir: &Path, images: &[&str]) -> Views {
        let v = Views {
            dir: tempdir("views"),
        };
        for img in images {
            let out = v.of(img);
            ok(
                dir,
                "qemu-img",
                &["convert", "-O", "raw", img, out.to_str().expect("utf-8")],
            );
        }
        v
    }

    fn of(&self, img: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.raw", img.replace('/', "_")))
    }

    /// `img` (relative to `dir`, or absolute) reads as `view_of` did.
    fn same(&self, dir: &Path, img: &str, view_of: &str) -> Result<(), String> {
        let view = self.of(view_of);
        let out = run(
            dir,
            "qemu-img",
            &["compare", img, view.to_str().expect("utf-8")],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{img} does not read as {view_of} did: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// The backing name stored in `img`, as qemu-img reads it.
fn backing_name(dir: &Path, img: &str) -> Option<String> {
    let out = ok(dir, "qemu-img", &["info", "-U", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["backing-filename"].as_str().map(str::to_string)
}

/// After a move: `img` stores `name`, its whole chain opens, it reads as
/// before and qemu-img check finds nothing.
fn assert_dependent(dir: &Path, views: &Views, img: &str, view_of: &str, name: &str) {
    assert_eq!(
        backing_name(dir, img).as_deref(),
        Some(name),
        "{img}'s backing name"
    );
    ok(dir, "qemu-img", &["info", "--backing-chain", img]);
    views.same(dir, img, view_of).unwrap();
    assert_eq!(check_code(dir, img), 0, "qemu-img check {img}");
}

fn cowshed(dir: &Path, args: &[&str]) -> std::process::Output {
    run(dir, COWSHED, args)
}

fn cowshed_ok(dir: &Path, args: &[&str]) -> String {
    ok(dir, COWSHED, args)
}

/// Every file under `dir` (links as their targets' text), for
/// byte-identical checks.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in walk(dir) {
        let m = e.symlink_metadata().unwrap();
        let bytes = if m.file_type().is_symlink() {
            std::fs::read_link(&e)
                .unwrap()
                .to_string_lossy()
                .into_owned()
                .into_bytes()
        } else if m.is_dir() {
            b"<dir>".to_vec()
        } else {
            std::fs::read(&e).unwrap()
        };
        out.insert(e.strip_prefix(dir).unwrap().to_path_buf(), bytes);
    }
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.symlink_metadata().unwrap().is_dir() {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out.sort();
    out
}

fn assert_refused(out: &std::process::Output, words: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "not refused: {err}");
    for w in words {
        assert!(err.contains(w), "the refusal does not say '{w}': {err}");
    }
    err
}

fn no_journal_left(dir: &Path) {
    let left: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".cowshed-mv"))
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn renaming_in_place_repoints_relative_and_absolute_names() {
    let t = tempdir("rename");
    let d = t.path();
    chain(d);
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let out = cowshed_ok(d, &["mv", "mid.qcow2", "middle.qcow2"]);
    assert!(
        out.contains("re-pointed top.qcow2: 'mid.qcow2' -> 'middle.qcow2'"),
        "{out}"
    );
    assert!(!d.join("mid.qcow2").exists());
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "middle.qcow2");
    let abs = canon(d).join("middle.qcow2");
    assert_dependent(
        d,
        &views,
        "top-abs.qcow2",
        "top-abs.qcow2",
        abs.to_str().unwrap(),
    );
    // Same directory: its own relative name still leads to base.
    assert_dependent(d, &views, "middle.qcow2", "mid.qcow2", "base.qcow2");
    no_journal_left(d);
}

#[test]
fn the_middle_of_a_chain_moves_into_a_subdirectory_and_back() {
    let t = tempdir("subdir");
    let d = t.path();
    chain(d);
    std::fs::create_dir(d.join("sub")).unwrap();
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let ino = std::fs::metadata(d.join("mid.qcow2")).unwrap().ino();
    cowshed_ok(d, &["mv", "mid.qcow2", "sub"]);
    // One file system: the same file under its new name, not a copy.
    assert_eq!(
        std::fs::metadata(d.join("sub/mid.qcow2")).unwrap().ino(),
        ino
    );
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "sub/mid.qcow2");
    let abs = canon(d).join("sub/mid.qcow2");
    assert_dependent(
        d,
        &views,
        "top-abs.qcow2",
        "top-abs.qcow2",
        abs.to_str().unwrap(),
    );
    // Its own name was relative and still is, from its new place.
    assert_dependent(d, &views, "sub/mid.qcow2", "mid.qcow2", "../base.qcow2");
    // Back out: the dependents are not in sub/, so they are found
    // through --root.
    cowshed_ok(d, &["mv", "--root", ".", "sub/mid.qcow2", "."]);
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "mid.qcow2");
    let abs = canon(d).join("mid.qcow2");
    assert_dependent(
        d,
        &views,
        "top-abs.qcow2",
        "top-abs.qcow2",
        abs.to_str().unwrap(),
    );
    assert_dependent(d, &views, "mid.qcow2", "mid.qcow2", "base.qcow2");
    no_journal_left(d);
}

#[test]
fn moving_a_base_keeps_a_recorded_raw_format_and_moves_the_base_itself() {
    let t = tempdir("raw");
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "disk.raw", "16M"],
    );
    ok(
        d,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 1M", "disk.raw"],
    );
    ok(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", "ov.qcow2",
        ],
    );
    let views = Views::take(d, &["ov.qcow2"]);
    cowshed_ok(d, &["mv", "disk.raw", "disk-1.raw"]);
    assert_dependent(d, &views, "ov.qcow2", "ov.qcow2", "disk-1.raw");
    let out = ok(d, "qemu-img", &["info", "--output", "json", "ov.qcow2"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backing-filename-format"], "raw");
}

#[test]
fn an_image_held_by_qemu_is_not_moved() {
    let w = Work::new("mv-held-src");
    let d = w.root();
    chain(d);
    let before = snapshot(d);
    let holder = w.hold_writer_alone("mid.qcow2");
    let pid = format!("pid {}", holder.id());
    let out = cowshed(d, &["mv", "mid.qcow2", "moved.qcow2"]);
    release_holder(holder);
    assert_refused(&out, &["mid.qcow2", &pid, "qemu-io"]);
    assert_eq!(snapshot(d), before, "a refused move changed files");
}

#[test]
fn a_dependent_held_by_qemu_stops_the_move() {
    let w = Work::new("mv-held-dep");
    let d = w.root();
    chain(d);
    let before = snapshot(d);
    // Only the dependent is held: the refusal is about it, not about the
    // backing file a VM would also hold.
    let holder = w.hold_writer_alone("top.qcow2");
    let pid = format!("pid {}", holder.id());
    let out = cowshed(d, &["mv", "mid.qcow2", "moved.qcow2"]);
    release_holder(holder);
    assert_refused(&out, &["top.qcow2", &pid, "not moved"]);
    assert_eq!(snapshot(d), before, "a refused move changed files");
    // A VM running the overlay holds the whole chain: refused too.
    let vm = w.hold_writer("top.qcow2", "qcow2");
    let pid = format!("pid {}", vm.id());
    let out = cowshed(d, &["mv", "mid.qcow2", "moved.qcow2"]);
    release_holder(vm);
    assert_refused(&out, &[&pid]);
    assert_eq!(snapshot(d), before, "a refused move changed files");
}

#[test]
fn an_existing_destination_is_never_replaced() {
    let t = tempdir("exists");
    let d = t.path();
    chain(d);
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/mid.qcow2"), b"someone else's").unwrap();
    let before = snapshot(d);
    for dst in ["top.qcow2", "sub", "sub/mid.qcow2"] {
        let out = cowshed(d, &["mv", "mid.qcow2", dst]);
        assert_refused(&out, &["exists", "never replaces"]);
        assert_eq!(snapshot(d), before, "mv mid.qcow2 {dst} changed files");
    }
    let out = cowshed(d, &["mv", "sub", "sub/deeper"]);
    assert_refused(&out, &["cannot move into itself"]);
    assert_eq!(snapshot(d), before);
}

#[test]
fn a_dependent_that_cannot_take_the_new_name_stops_the_move() {
    let t = tempdir("no-fit");
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"],
    );
    // 512-byte clusters: the header cluster has little room after
    // QEMU's feature table.
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "small.qcow2",
        ],
    );
    // About 380 bytes are left for the name: two directories of 200.
    let long = format!("{}/{}", "a".repeat(200), "b".repeat(200));
    std::fs::create_dir_all(d.join(&long)).unwrap();
    let long = long.as_str();
    let before = snapshot(d);
    let out = cowshed(d, &["mv", "base.qcow2", long]);
    assert_refused(&out, &["small.qcow2", "does not fit", "nothing was moved"]);
    assert_eq!(snapshot(d), before);

    // A dependent marked dirty (a QEMU died with it open) is refused too.
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "dirty.qcow2",
        ],
    );
    std::fs::remove_file(d.join("small.qcow2")).unwrap();
    // incompatible_features, bit 0: dirty.
    common::bytes::poke(&d.join("dirty.qcow2"), 72 + 7, &[1]);
    let before = snapshot(d);
    let out = cowshed(d, &["mv", "base.qcow2", "base-2.qcow2"]);
    assert_refused(&out, &["dirty.qcow2", "dirty"]);
    assert_eq!(snapshot(d), before);
}

/// A directory on another file system than `dir`, when the machine has
/// one (/dev/shm is a tmpfs on most).
fn other_fs(dir: &Path) -> Option<tempfile::TempDir> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let shm = Path::new("/dev/shm");
    if std::fs::metadata(shm).ok()?.dev() == dev {
        return None;
    }
    tempfile::Builder::new()
        .prefix("cowshed-mv-other-fs-")
        .tempdir_in(shm)
        .ok()
}

fn skip(why: &str) {
    eprintln!("cannot run: {why}; test skipped");
}

#[test]
fn across_file_systems_the_image_is_copied_verified_and_removed() {
    let t = tempdir("cross");
    let d = t.path();
    chain(d);
    let Some(other) = other_fs(d) else {
        return skip("no second file system (/dev/shm) here");
    };
    let far = canon(other.path());
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let src_meta = std::fs::metadata(d.join("mid.qcow2")).unwrap();
    let out = cowshed_ok(d, &["mv", "mid.qcow2", far.to_str().unwrap()]);
    assert!(out.contains("copied across file systems"), "{out}");
    assert!(!d.join("mid.qcow2").exists());
    let moved = far.join("mid.qcow2");
    let m = std::fs::metadata(&moved).unwrap();
    // Kept as mv keeps them.
    assert_eq!(m.mode(), src_meta.mode());
    // The trees share nothing but `/`: absolute names.
    let moved_s = moved.to_str().unwrap();
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", moved_s);
    assert_dependent(d, &views, "top-abs.qcow2", "top-abs.qcow2", moved_s);
    let base = canon(d).join("base.qcow2");
    assert_dependent(d, &views, moved_s, "mid.qcow2", base.to_str().unwrap());
    // And back, found through --root; absolute names stay absolute.
    cowshed_ok(d, &["mv", "--root", ".", moved_s, "."]);
    let back = canon(d).join("mid.qcow2");
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", back.to_str().unwrap());
    assert_dependent(d, &views, "mid.qcow2", "mid.qcow2", base.to_str().unwrap());
    assert!(!moved.exists());
    no_journal_left(d);
    no_journal_left(&far);
}

#[test]
fn a_copy_that_would_not_fit_is_refused() {
    let t = tempdir("no-room");
    let d = t.path();
    ok(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "big.qcow2", "64M"],
    );
    ok(d, "qemu-io", &["-c", "write -P 5 0 24M", "big.qcow2"]);
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "big.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    );
    let before = snapshot(d);
    let script = format!(
        "code=0; {COWSHED} mv big.qcow2 small/ 2>err.txt || code=$?; echo $code > code.txt"
    );
    let Some(out) = common::small_fs::run_with_small_fs(d, 8, &script) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = std::fs::read_to_string(d.join("code.txt")).unwrap();
    let err = std::fs::read_to_string(d.join("err.txt")).unwrap();
    assert_eq!(code.trim(), "1", "{err}");
    assert!(err.contains("not enough free space"), "{err}");
    std::fs::remove_file(d.join("code.txt")).unwrap();
    std::fs::remove_file(d.join("err.txt")).unwrap();
    let mut after = snapshot(d);
    // The mount point was made by the helper.
    after.remove(Path::new("small"));
    assert_eq!(after, before, "a refused move changed files");
}

/// A directory of images: inside, names that lead inside (relative),
/// outside (relative and absolute), a non-image file and a link; outside,
/// images that use images inside.
fn tree(d: &Path) {
    let img = |args: &[&str]| {
        ok(d, "qemu-img", args);
    };
    std::fs::create_dir_all(d.join("vms/sub")).unwrap();
    std::fs::create_dir(d.join("elsewhere")).unwrap();
    img(&["create", "-q", "-f", "qcow2", "shared.qcow2", "32M"]);
    ok(d, "qemu-io", &["-c", "write -P 7 0 1M", "shared.qcow2"]);
    img(&["create", "-q", "-f", "qcow2", "vms/base.qcow2", "32M"]);
    ok(d, "qemu-io", &["-c", "write -P 1 0 2M", "vms/base.qcow2"]);
    let over = |name: &str, backing: &str| {
        img(&[
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name,
        ])
    };
    over("vms/sub/in.qcow2", "../base.qcow2");
    ok(
        d,
        "qemu-io",
        &["-c", "write -P 2 1M 64k", "vms/sub/in.qcow2"],
    );
    over("vms/on-shared.qcow2", "../shared.qcow2");
    let abs = canon(d).join("vms/base.qcow2");
    over("vms/abs.qcow2", abs.to_str().unwrap());
    over("out.qcow2", "vms/base.qcow2");
    ok(d, "qemu-io", &["-c", "write -P 3 1M 64k", "out.qcow2"]);
    over("elsewhere/far.qcow2", "../vms/sub/in.qcow2");
    std::fs::write(d.join("vms/README"), b"the web fleet").unwrap();
    std::os::unix::fs::symlink("base.qcow2", d.join("vms/current")).unwrap();
}

const TREE_IMAGES: [&str; 6] = [
    "vms/base.qcow2",
    "vms/sub/in.qcow2",
    "vms/on-shared.qcow2",
    "vms/abs.qcow2",
    "out.qcow2",
    "elsewhere/far.qcow2",
];

/// After `vms` moved to `to` (relative to `d`, or absolute): every name
/// as expected and every image reads as before.
fn assert_tree_moved(d: &Path, views: &Views, to: &str, relative: bool) {
    let at = |rel: &str| format!("{to}/{rel}");
    let abs_to = canon(&d.join(to));
    let abs = |rel: &str| abs_to.join(rel).to_str().unwrap().to_string();
    assert!(!d.join("vms").exists(), "vms is still there");
    // Inside, leading inside, relative: unchanged.
    assert_dependent(
        d,
        views,
        &at("sub/in.qcow2"),
        "vms/sub/in.qcow2",
        "../base.qcow2",
    );
    // Inside, absolute: the new absolute path.
    assert_dependent(
        d,
        views,
        &at("abs.qcow2"),
        "vms/abs.qcow2",
        &abs("base.qcow2"),
    );
    let shared = canon(d).join("shared.qcow2");
    let (out_name, far_name, shared_name) = if relative {
        (
            format!("{to}/base.qcow2"),
            format!("../{to}/sub/in.qcow2"),
            format!(
                "{}shared.qcow2",
                "../".repeat(Path::new(to).components().count())
            ),
        )
    } else {
        (
            abs("base.qcow2"),
            abs("sub/in.qcow2"),
            shared.to_str().unwrap().to_string(),
        )
    };
    assert_dependent(
        d,
        views,
        &at("on-shared.qcow2"),
        "vms/on-shared.qcow2",
        &shared_name,
    );
    assert_dependent(d, views, "out.qcow2", "out.qcow2", &out_name);
    assert_dependent(
        d,
        views,
        "elsewhere/far.qcow2",
        "elsewhere/far.qcow2",
        &far_name,
    );
    assert_eq!(
        std::fs::read(d.join(at("README"))).unwrap(),
        b"the web fleet"
    );
    assert_eq!(
        std::fs::read_link(d.join(at("current"))).unwrap(),
        Path::new("base.qcow2")
    );
}

#[test]
fn a_directory_moves_with_everything_in_it_and_what_uses_it_is_repointed() {
    let t = tempdir("dir");
    let d = t.path();
    tree(d);
    std::fs::create_dir(d.join("new")).unwrap();
    let views = Views::take(d, &TREE_IMAGES);
    cowshed_ok(d, &["mv", "--root", ".", "vms", "new/"]);
    assert_tree_moved(d, &views, "new/vms", true);
    no_journal_left(d);
}

#[test]
fn a_directory_moves_across_file_systems() {
    let t = tempdir("dir-cross");
    let d = t.path();
    tree(d);
    let Some(other) = other_fs(d) else {
        return skip("no second file system (/dev/shm) here");
    };
    let far = canon(other.path());
    let views = Views::take(d, &TREE_IMAGES);
    let to = far.join("fleet");
    cowshed_ok(d, &["mv", "--root", ".", "vms", to.to_str().unwrap()]);
    assert_tree_moved(d, &views, to.to_str().unwrap(), false);
    no_journal_left(d);
    no_journal_left(&far);
}

#[test]
fn a_pending_move_must_be_completed_before_another() {
    let t = tempdir("pending");
    let d = t.path();
    chain(d);
    std::fs::create_dir(d.join("sub")).unwrap();
    fault::kill_at(d, &["mv", "mid.qcow2", "sub"], "mv.rewrite.repoint", 1);
    let out = cowshed(d, &["mv", "mid.qcow2", "elsewhere.qcow2"]);
    assert_refused(&out, &["pending", "sub/mid.qcow2"]);
    // The same command completes it, with DST now an existing directory.
    cowshed_ok(d, &["mv", "mid.qcow2", "sub"]);
    assert_eq!(
        backing_name(d, "top.qcow2").as_deref(),
        Some("sub/mid.qcow2")
    );
    assert!(!d.join("sub/mid.qcow2/mid.qcow2").exists());
    no_journal_left(d);
}

// ------------------------------------------------------------- kills --

/// Given the case's directory and the other file system's: each image
/// (relative, or absolute) and the backing name it must store in the end.
type Expect = dyn Fn(&Path, &Path) -> Vec<(String, String)>;

/// One kill case: a fresh fixture, the command run with a kill at
/// (point, hit), then the checks.
struct KillCase<'a> {
    /// Builds the fixture in the directory.
    setup: &'a dyn Fn(&Path),
    /// The command, relative to the directory (`{far}` is the other file
    /// system's directory).
    args: Vec<String>,
    /// Images (relative) whose chains must open and read as before at
    /// every moment: the dependents.
    dependents: &'a [&'a str],
    /// After the completing re-run: each dependent's expected name.
    expect: &'a Expect,
    /// What must be gone in the end (relative to the directory).
    gone: &'a [&'a str],
}

fn hits_per_point() -> usize {
    std::env::var("CRASH_HITS_PER_POINT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

fn run_kill_cases(case: &str, kc: &KillCase, far_fs: bool, must_pass: &[&str]) {
    let fresh = |label: &str| {
        let t = tempdir(&format!("{case}-{label}"));
        (kc.setup)(t.path());
        let far = if far_fs {
            match other_fs(t.path()) {
                Some(f) => Some(f),
                None => return None,
            }
        } else {
            None
        };
        Some((t, far))
    };
    let args_for = |far: &Option<tempfile::TempDir>| -> Vec<String> {
        let f = far
            .as_ref()
            .map(|f| canon(f.path()).to_string_lossy().into_owned())
            .unwrap_or_default();
        kc.args.iter().map(|a| a.replace("{far}", &f)).collect()
    };
    let Some((t, far)) = fresh("trace") else {
        return skip("no second file system (/dev/shm) here");
    };
    let args = args_for(&far);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let views = Views::take(t.path(), kc.dependents);
    let trace = fault::trace(t.path(), &argv);
    for p in must_pass {
        assert!(
            trace.hits(p) > 0,
            "{case}: the move never passes {p}; it passed {:?}",
            trace.counts()
        );
    }
    drop((t, far));
    let chosen = fault::choose(&trace, hits_per_point());
    for (point, hit) in chosen {
        let (t, far) = fresh(&format!("{point}-{hit}")).expect("other fs");
        let d = t.path();
        let args = args_for(&far);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let killed: Trace = fault::kill_at(d, &argv, &point, hit);
        let at = format!(
            "{case}: killed at {point} #{hit} (after {:?})",
            killed.counts()
        );
        // Every chain opens and reads as before, whatever the step.
        for dep in kc.dependents.iter().filter(|dep| d.join(dep).exists()) {
            let open = run(d, "qemu-img", &["info", "--backing-chain", dep]);
            assert!(
                open.status.success(),
                "{at}: {dep}'s chain does not open: {}",
                String::from_utf8_lossy(&open.stderr)
            );
            views
                .same(d, dep, dep)
                .unwrap_or_else(|e| panic!("{at}: {e}"));
        }
        // The same command completes the move.
        let out = cowshed(d, &argv);
        assert!(
            out.status.success(),
            "{at}: the re-run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let far_path = far.as_ref().map(|f| canon(f.path())).unwrap_or_default();
        for (img, name) in (kc.expect)(d, &far_path) {
            assert_eq!(
                backing_name(d, &img).as_deref(),
                Some(name.as_str()),
                "{at}: {img}"
            );
            assert_eq!(check_code(d, &img), 0, "{at}: qemu-img check {img}");
        }
        for dep in kc.dependents.iter().filter(|dep| d.join(dep).exists()) {
            views
                .same(d, dep, dep)
                .unwrap_or_else(|e| panic!("{at}, re-run: {e}"));
        }
        for g in kc.gone {
            assert!(!d.join(g).exists(), "{at}: {g} is still there");
        }
        no_journal_left(d);
        if let Some(f) = &far {
            no_journal_left(f.path());
        }
    }
}

fn chain_with_sub(d: &Path) {
    chain(d);
    std::fs::create_dir(d.join("sub")).unwrap();
}

#[test]
fn sigkill_at_every_step_of_a_move_on_one_file_system() {
    let expect = |d: &Path, _: &Path| {
        let abs = canon(d).join("sub/mid.qcow2");
        vec![
            ("top.qcow2".into(), "sub/mid.qcow2".into()),
            ("top-abs.qcow2".into(), abs.to_string_lossy().into_owned()),
            ("sub/mid.qcow2".into(), "../base.qcow2".into()),
        ]
    };
    run_kill_cases(
        "kill-same-fs",
        &KillCase {
            setup: &chain_with_sub,
            args: vec!["mv".into(), "mid.qcow2".into(), "sub".into()],
            dependents: &["top.qcow2", "top-abs.qcow2"],
            expect: &expect,
            gone: &["mid.qcow2"],
        },
        false,
        &[
            "mv.journal.saved",
            "mv.rewrite.before_place",
            "mv.linked",
            "mv.placed",
            "mv.rewrite.repoint",
            "mv.removed",
            "mv.rewrite.final",
        ],
    );
}

#[test]
fn sigkill_at_every_step_of_a_move_across_file_systems() {
    let expect = |d: &Path, far: &Path| {
        let moved = far.join("mid.qcow2").to_string_lossy().into_owned();
        let base = canon(d).join("base.qcow2").to_string_lossy().into_owned();
        vec![
            ("top.qcow2".into(), moved.clone()),
            ("top-abs.qcow2".into(), moved.clone()),
            (moved, base),
        ]
    };
    run_kill_cases(
        "kill-cross-fs",
        &KillCase {
            setup: &chain,
            args: vec!["mv".into(), "mid.qcow2".into(), "{far}".into()],
            dependents: &["top.qcow2", "top-abs.qcow2"],
            expect: &expect,
            gone: &["mid.qcow2"],
        },
        true,
        &[
            "mv.journal.saved",
            "mv.copied",
            "mv.verified",
            "mv.placed",
            "mv.rewrite.repoint",
            "mv.removed",
        ],
    );
}

#[test]
fn sigkill_at_every_step_of_a_directory_move() {
    let expect = |d: &Path, _: &Path| {
        let abs = canon(d).join("new/vms/base.qcow2");
        vec![
            ("out.qcow2".into(), "new/vms/base.qcow2".into()),
            (
                "elsewhere/far.qcow2".into(),
                "../new/vms/sub/in.qcow2".into(),
            ),
            (
                "new/vms/abs.qcow2".into(),
                abs.to_string_lossy().into_owned(),
            ),
            (
                "new/vms/on-shared.qcow2".into(),
                "../../shared.qcow2".into(),
            ),
            ("new/vms/sub/in.qcow2".into(), "../base.qcow2".into()),
        ]
    };
    let setup = |d: &Path| {
        tree(d);
        std::fs::create_dir(d.join("new")).unwrap();
    };
    run_kill_cases(
        "kill-dir",
        &KillCase {
            setup: &setup,
            args: ["mv", "--root", ".", "vms", "new"]
                .map(String::from)
                .to_vec(),
            dependents: &["out.qcow2", "elsewhere/far.qcow2"],
            expect: &expect,
            gone: &["vms"],
        },
        false,
        &[
            "mv.journal.saved",
            "mv.rewrite.before_place",
            "mv.linked",
            "mv.placed",
            "mv.rewrite.repoint",
            "mv.removed",
            "mv.rewrite.final",
        ],
    );
}

// ------------------------------------------------------------ cancel --

fn interrupt(paused: &mut fault::Paused) {
    nix::sys::signal::kill(paused.pid(), nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    paused.wait_for_trace("the Ctrl-C handler", |t| t.hits("cli.interrupted") > 0);
}

#[test]
fn ctrl_c_before_any_dependent_changed_leaves_the_old_layout() {
    // Across file systems, during the copy: SRC is never touched, so
    // the old layout is the old bytes.
    let t = tempdir("cancel-copy");
    let d = t.path();
    chain(d);
    if let Some(other) = other_fs(d) {
        let far = canon(other.path());
        let before = snapshot(d);
        let mut p = fault::pause_at(
            d,
            &["mv", "mid.qcow2", far.to_str().unwrap()],
            "mv.copied",
            1,
        );
        interrupt(&mut p);
        let (out, _) = p.release();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(snapshot(d), before, "a cancelled move changed files");
        assert!(
            walk(&far).is_empty(),
            "left on the other side: {:?}",
            walk(&far)
        );
    } else {
        skip("no second file system (/dev/shm) here");
    }

    // One file system, after DST was linked and the moved image's own
    // name spelled absolutely: undone, the old names back.
    let t = tempdir("cancel-link");
    let d = t.path();
    chain_with_sub(d);
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let mut p = fault::pause_at(d, &["mv", "mid.qcow2", "sub"], "mv.placed", 1);
    interrupt(&mut p);
    let (out, t2) = p.release();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t2.hits("mv.rollback") > 0);
    assert!(!d.join("sub/mid.qcow2").exists());
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "mid.qcow2");
    assert_dependent(d, &views, "mid.qcow2", "mid.qcow2", "base.qcow2");
    no_journal_left(d);
}

#[test]
fn ctrl_c_after_a_dependent_changed_finishes_the_move() {
    let t = tempdir("cancel-late");
    let d = t.path();
    chain_with_sub(d);
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let mut p = fault::pause_at(d, &["mv", "mid.qcow2", "sub"], "mv.rewrite.repoint", 1);
    interrupt(&mut p);
    let (out, _) = p.release();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "sub/mid.qcow2");
    assert_dependent(d, &views, "sub/mid.qcow2", "mid.qcow2", "../base.qcow2");
    assert!(!d.join("mid.qcow2").exists());
    no_journal_left(d);
}

#[test]
fn a_kill_while_undoing_is_finished_by_the_same_command() {
    let t = tempdir("kill-undo");
    let d = t.path();
    chain_with_sub(d);
    let views = Views::take(d, &["top.qcow2", "top-abs.qcow2", "mid.qcow2"]);
    let side = |what: &str| {
        d.with_file_name(format!(
            "{}.{what}",
            d.file_name().unwrap().to_string_lossy()
        ))
    };
    let (trace, release) = (side("trace"), side("release"));
    let mut child = Command::new(COWSHED)
        .args(["mv", "mid.qcow2", "sub"])
        .current_dir(d)
        // Paused once DST is linked; cancelled there; killed half way
        // through undoing it (DST gone, the moved image's own name still
        // spelled absolutely).
        .env("COWSHED_FAULT", "mv.placed:1:pause,mv.rollback:2:kill")
        .env("COWSHED_FAULT_TRACE", &trace)
        .env("COWSHED_FAULT_RELEASE", &release)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let wait_for = |child: &mut std::process::Child, what: &str| {
        let deadline = std::time::Instant::now() + fault::HANG_GUARD;
        while Trace::read(&trace).hits(what) == 0 {
            assert!(child.try_wait().unwrap().is_none(), "ended before {what}");
            assert!(std::time::Instant::now() < deadline, "no {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for(&mut child, "mv.placed");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    wait_for(&mut child, "cli.interrupted");
    std::fs::write(&release, b"").unwrap();
    let st = child.wait().unwrap();
    let killed = Trace::read(&trace);
    let _ = std::fs::remove_file(&release);
    let _ = std::fs::remove_file(&trace);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(nix::sys::signal::Signal::SIGKILL as i32));
    assert_eq!(killed.last(), Some(&("mv.rollback".to_string(), 2)));
    for dep in ["top.qcow2", "top-abs.qcow2"] {
        ok(d, "qemu-img", &["info", "--backing-chain", dep]);
        views.same(d, dep, dep).unwrap();
    }
    // The undo is finished, then the move made afresh.
    cowshed_ok(d, &["mv", "mid.qcow2", "sub"]);
    assert_dependent(d, &views, "top.qcow2", "top.qcow2", "sub/mid.qcow2");
    assert_dependent(d, &views, "sub/mid.qcow2", "mid.qcow2", "../base.qcow2");
    no_journal_left(d);
}

#[test]
fn a_journal_that_is_not_this_moves_is_refused_and_nothing_is_deleted() {
    let t = tempdir("hostile-journal");
    let d = t.path();
    chain_with_sub(d);
    std::fs::create_dir(d.join("victim")).unwrap();
    std::fs::write(d.join("victim/data"), b"keep me").unwrap();
    // Killed at the repoint, the journal is real; then its temporary
    // name is pointed at another directory, which an undo would delete.
    fault::kill_at(d, &["mv", "mid.qcow2", "sub"], "mv.linked", 1);
    let journal = d.join(".mid.qcow2.cowshed-mv.json");
    let mut j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&journal).unwrap()).unwrap();
    j["temp"] = canon(&d.join("victim")).to_string_lossy().into();
    j["step"] = "rolling-back".into();
    std::fs::write(&journal, serde_json::to_vec(&j).unwrap()).unwrap();
    let out = cowshed(d, &["mv", "mid.qcow2", "sub"]);
    assert_refused(&out, &["unreadable", ".mid.qcow2.cowshed-mv.json"]);
    assert_eq!(std::fs::read(d.join("victim/data")).unwrap(), b"keep me");
    std::fs::write(&journal, b"{ not json").unwrap();
    let out = cowshed(d, &["mv", "mid.qcow2", "sub"]);
    assert_refused(&out, &["unreadable"]);
}

#[test]
fn a_dependent_that_cannot_be_written_stops_the_move() {
    let t = tempdir("read-only-dep");
    let d = t.path();
    chain(d);
    // Immutable: not even root may open it for writing.
    let set = |flag: &str| {
        Command::new("chattr")
            .args([flag, "top.qcow2"])
            .current_dir(d)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !set("+i") {
        return skip("chattr +i is not available here");
    }
    let before = snapshot(d);
    let out = cowshed(d, &["mv", "mid.qcow2", "moved.qcow2"]);
    let undo = set("-i");
    assert!(undo, "chattr -i failed");
    assert_refused(
        &out,
        &["top.qcow2", "cannot be re-pointed", "nothing was moved"],
    );
    assert_eq!(snapshot(d), before, "a refused move changed files");
}

#[test]
fn sigkill_at_every_step_of_a_directory_move_across_file_systems() {
    let expect = |d: &Path, far: &Path| {
        let to = far.join("fleet");
        let at = |rel: &str| to.join(rel).to_string_lossy().into_owned();
        let shared = canon(d).join("shared.qcow2");
        vec![
            ("out.qcow2".into(), at("base.qcow2")),
            ("elsewhere/far.qcow2".into(), at("sub/in.qcow2")),
            (at("abs.qcow2"), at("base.qcow2")),
            (at("on-shared.qcow2"), shared.to_string_lossy().into_owned()),
            (at("sub/in.qcow2"), "../base.qcow2".into()),
        ]
    };
    run_kill_cases(
        "kill-dir-cross-fs",
        &KillCase {
            setup: &tree,
            args: ["mv", "--root", ".", "vms", "{far}/fleet"]
                .map(String::from)
                .to_vec(),
            dependents: &["out.qcow2", "elsewhere/far.qcow2"],
            expect: &expect,
            gone: &["vms"],
        },
        true,
        &[
            "mv.journal.saved",
            "mv.copied",
            "mv.verified",
            "mv.placed",
            "mv.rewrite.repoint",
            "mv.removed",
        ],
    );
}
