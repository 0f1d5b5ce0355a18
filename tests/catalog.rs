//! The forest of backing chains built from real images (made by qemu-img):
//! siblings, broken links, cycles, bases outside the roots, relative and
//! absolute names, symlinked directories, and the tree CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use cowshed::catalog::scan::scan_all;
use cowshed::catalog::{Flag, Forest};

fn qemu_img(cwd: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build(roots: &[PathBuf]) -> Forest {
    let (records, errors) = scan_all(roots);
    assert!(errors.is_empty(), "scan errors: {errors:?}");
    Forest::build(records)
}

fn id(f: &Forest, p: &Path) -> usize {
    f.get(&p.canonicalize().unwrap())
        .unwrap_or_else(|| panic!("{} not in forest", p.display()))
}

fn name(f: &Forest, id: usize) -> String {
    f.nodes[id]
        .record
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn siblings_chains_and_relative_absolute_names() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("vms")).unwrap();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "vms/b.qcow2",
        ],
    );
    let abs = d.join("base.qcow2");
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            abs.to_str().unwrap(),
            "-F",
            "qcow2",
            "vms/c.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            "vms/b1.qcow2",
        ],
    );
    qemu_img(d, &["create", "-q", "-f", "raw", "disk.raw", "1M"]);
    std::fs::write(d.join("notes.txt"), "not an image").unwrap();

    let f = build(&[d.to_path_buf()]);
    assert_eq!(f.nodes.len(), 6, "txt file must be skipped");
    let base = id(&f, &d.join("base.qcow2"));
    let kids: Vec<String> = f.nodes[base]
        .children
        .iter()
        .map(|&c| name(&f, c))
        .collect();
    assert_eq!(
        kids,
        ["a.qcow2", "b.qcow2", "c.qcow2"],
        "all overlays, relative and absolute, are children"
    );
    let b = id(&f, &d.join("vms/b.qcow2"));
    assert_eq!(f.nodes[b].children, vec![id(&f, &d.join("vms/b1.qcow2"))]);
    assert_eq!(
        f.chain(id(&f, &d.join("vms/b1.qcow2"))),
        vec![id(&f, &d.join("vms/b1.qcow2")), b, base]
    );
    let mut roots: Vec<String> = f.roots.iter().map(|&r| name(&f, r)).collect();
    roots.sort();
    assert_eq!(roots, ["base.qcow2", "disk.raw"]);
    assert!(
        f.nodes.iter().all(|n| n.flags.is_empty()),
        "no flags expected"
    );
    let space = f.space(base);
    assert!(
        space.full_copies > space.used,
        "overlays save space: {space:?}"
    );
}

#[test]
fn broken_links_cycles_and_outside_roots_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("scan")).unwrap();
    std::fs::create_dir_all(d.join("elsewhere")).unwrap();
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "elsewhere/outer.qcow2",
            "64M",
        ],
    );
    let s = d.join("scan");
    qemu_img(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../elsewhere/outer.qcow2",
            "-F",
            "qcow2",
            "out.qcow2",
        ],
    );
    qemu_img(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "broken.qcow2",
            "64M",
        ],
    );
    qemu_img(&s, &["create", "-q", "-f", "qcow2", "x.qcow2", "64M"]);
    qemu_img(
        &s,
        &[
            "create", "-q", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "y.qcow2",
        ],
    );
    qemu_img(
        &s,
        &[
            "rebase", "-q", "-u", "-b", "y.qcow2", "-F", "qcow2", "x.qcow2",
        ],
    );
    // -u and a size: qemu-img itself recurses without end opening a cycle.
    qemu_img(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "x.qcow2",
            "-F",
            "qcow2",
            "into.qcow2",
            "64M",
        ],
    );
    qemu_img(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd://127.0.0.1:10809/x",
            "-F",
            "raw",
            "nbd.qcow2",
            "64M",
        ],
    );
    qemu_img(&s, &["create", "-q", "-f", "raw", "plain.raw", "1M"]);
    qemu_img(
        &s,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "plain.raw",
            "-F",
            "qcow2",
            "mismatch.qcow2",
            "1M",
        ],
    );

    let f = build(std::slice::from_ref(&s));
    let flags = |p: &str| f.nodes[id(&f, &s.join(p))].flags.clone();
    assert_eq!(
        flags("broken.qcow2"),
        vec![Flag::MissingBacking {
            wanted: "gone.qcow2".into()
        }]
    );
    assert_eq!(flags("x.qcow2"), vec![Flag::Cycle]);
    assert_eq!(flags("y.qcow2"), vec![Flag::Cycle]);
    assert!(
        f.nodes[id(&f, &s.join("x.qcow2"))].parent.is_none(),
        "cycle is cut"
    );
    assert_eq!(
        f.nodes[id(&f, &s.join("into.qcow2"))].parent,
        Some(id(&f, &s.join("x.qcow2")))
    );
    assert!(
        matches!(&flags("nbd.qcow2")[..], [Flag::UnfollowedBacking { name }] if name.starts_with("nbd://"))
    );
    assert!(matches!(
        &flags("mismatch.qcow2")[..],
        [Flag::BackingFormatMismatch { .. }]
    ));
    let outer = id(&f, &d.join("elsewhere/outer.qcow2"));
    assert_eq!(f.nodes[outer].flags, vec![Flag::OutsideRoots]);
    assert_eq!(f.nodes[id(&f, &s.join("out.qcow2"))].parent, Some(outer));
    // Every node is reachable from exactly one root: drawing terminates.
    let drawn: usize = f.roots.iter().map(|&r| f.walk(r).len()).sum();
    assert_eq!(drawn, f.nodes.len());
}

#[test]
fn symlinked_dirs_show_images_once_and_loops_do_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("real")).unwrap();
    qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "real/base.qcow2", "64M"],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "real/ov.qcow2",
        ],
    );
    std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
    std::os::unix::fs::symlink(d, d.join("real/loop")).unwrap();
    let (records, errors) = scan_all(&[d.to_path_buf()]);
    assert_eq!(records.len(), 2, "each image once: {records:?}");
    assert!(
        errors.iter().any(|(_, m)| m.contains("loop")),
        "loop reported: {errors:?}"
    );
    let f = Forest::build(records);
    assert_eq!(f.roots.len(), 1);
    assert_eq!(f.nodes[f.roots[0]].children.len(), 1);
}

#[test]
fn tree_cli_json_lists_parents_children_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    );
    qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nope.qcow2",
            "-F",
            "qcow2",
            "lost.qcow2",
            "64M",
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["tree", "--output", "json", "."])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let images = v["images"].as_array().unwrap();
    let find = |n: &str| {
        images
            .iter()
            .find(|i| i["filename"].as_str().unwrap().ends_with(n))
            .unwrap()
    };
    assert_eq!(find("ov.qcow2")["parent"], "./base.qcow2");
    assert_eq!(find("base.qcow2")["children"][0], "./ov.qcow2");
    assert_eq!(find("lost.qcow2")["flags"][0]["kind"], "missing-backing");
    assert_eq!(find("ov.qcow2")["backing-filename-format"], "qcow2");
    let trees = v["trees"].as_array().unwrap();
    assert_eq!(trees.len(), 2);
    let human = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["tree", "."])
        .current_dir(d)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("└─ ./ov.qcow2"), "{text}");
    assert!(text.contains("✗ ./lost.qcow2"), "{text}");
}

/// A root that cannot be scanned is an error: what could be scanned is
/// still shown, the error is named, and the exit status says so.
#[test]
fn tree_exits_1_when_a_root_cannot_be_scanned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    for output in ["human", "json"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
            .args(["tree", "--output", output, ".", "missing-dir"])
            .current_dir(d)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{output}: {stdout}{stderr}");
        assert!(stdout.contains("base.qcow2"), "{output}: {stdout}");
        assert!(
            stderr.contains("missing-dir") || stdout.contains("missing-dir"),
            "{output}: the root is named: {stdout}{stderr}"
        );
    }
}
