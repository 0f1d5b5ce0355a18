//! The chain doctor (`cowshed doctor [--fix]`), `cowshed protect`, the
//! stale-base guard of `cowshed tree`, and tree JSON's space figures, with
//! qemu-img and qemu-io as the oracle: fixtures are made by them, fixed
//! headers are read back by them, guest views are compared by them, and a
//! protected base is tried by an unprivileged qemu-io.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{release_holder, Work};
use serde_json::Value;

/// Remove the backing-format header extension of a qcow2 image made by
/// qemu-img, as images made before QEMU required -F have none: its magic
/// becomes one QEMU does not know, which it skips. (QEMU 10 itself no
/// longer makes such images.)
fn forget_backing_format(w: &Work, file: &str) {
    let bytes = w.read_file(file);
    let first_cluster = &bytes[..bytes.len().min(65536)];
    let at = first_cluster
        .windows(4)
        .position(|b| b == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap_or_else(|| panic!("[{}] {file} has no backing-format extension", w.case));
    common::bytes::poke(&w.path(file), at as u64, &[0x0b, 0xad, 0xf0, 0x0d]);
    let info = w.info_json(file);
    assert!(
        info.get("backing-filename-format").is_none(),
        "[{}] the format is still recorded: {info}",
        w.case
    );
}

fn overlay(w: &Work, file: &str, backing: &str, fmt: &str) {
    w.qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, file,
    ]);
}

fn doctor(w: &Work, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["doctor", "--output", "json"];
    all.extend(args);
    let r = w.cowshed(&all);
    let code = r.code.unwrap_or(-1);
    (code, w.json(&r))
}

/// The problem kinds doctor lists per image, by file name.
fn kinds(doc: &Value) -> HashMap<String, Vec<String>> {
    doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| {
            let name = Path::new(i["filename"].as_str().expect("filename"))
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let kinds = i["problems"]
                .as_array()
                .expect("problems")
                .iter()
                .map(|p| p["kind"].as_str().expect("kind").to_string())
                .collect();
            (name, kinds)
        })
        .collect()
}

fn file_bytes(w: &Work, names: &[&str]) -> Vec<Vec<u8>> {
    names.iter().map(|n| w.read_file(n)).collect()
}

#[test]
fn doctor_fix_records_the_probed_format_and_makes_absolute_names_relative() {
    let w = Work::new("doctor-fix");
    w.mkdir("vms");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 4M".into()]);
    w.create("disk.raw", "raw", "", None, 32 << 20);
    w.io("raw", "disk.raw", &["write -P 2 1M 2M".into()]);
    // An overlay whose qcow2 backing format is not recorded, one on a raw
    // backing likewise, and one with an absolute name in a sub-directory.
    overlay(&w, "noformat.qcow2", "base.qcow2", "qcow2");
    forget_backing_format(&w, "noformat.qcow2");
    overlay(&w, "onraw.qcow2", "disk.raw", "raw");
    forget_backing_format(&w, "onraw.qcow2");
    let absolute = w.path("base.qcow2").display().to_string();
    overlay(&w, "vms/abs.qcow2", &absolute, "qcow2");
    for (img, at) in [
        ("noformat.qcow2", "0"),
        ("onraw.qcow2", "2M"),
        ("vms/abs.qcow2", "3M"),
    ] {
        w.io("qcow2", img, &[format!("write -P 7 {at} 64k")]);
    }
    let fixed = ["noformat.qcow2", "onraw.qcow2", "vms/abs.qcow2"];
    for f in fixed {
        w.copy(f, &format!("{f}.before"));
    }
    // The copies live beside the originals: vms/abs.qcow2.before has the
    // same absolute name, and is no image the doctor should fix (it is
    // scanned: the listing below names it too).
    let (code, doc) = doctor(
        &w,
        &[
            "base.qcow2",
            "disk.raw",
            "noformat.qcow2",
            "onraw.qcow2",
            "vms/abs.qcow2",
        ],
    );
    assert_eq!(code, 1, "problems found: {doc}");
    let k = kinds(&doc);
    assert_eq!(k["noformat.qcow2"], ["backing-format-not-recorded"]);
    assert_eq!(k["onraw.qcow2"], ["backing-format-not-recorded"]);
    assert_eq!(k["abs.qcow2"], ["absolute-backing-name"]);
    assert_eq!(k.len(), 3, "{doc}");
    // Without --fix nothing changes.
    for f in fixed {
        assert_eq!(
            w.read_file(f),
            w.read_file(&format!("{f}.before")),
            "{f} changed"
        );
    }

    let r = w.cowshed(&[
        "doctor",
        "--fix",
        "base.qcow2",
        "disk.raw",
        "noformat.qcow2",
        "onraw.qcow2",
        "vms/abs.qcow2",
    ]);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("fixed: cowshed rebase -u"), "{r}");
    let info = w.info_json("noformat.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    let info = w.info_json("onraw.qcow2");
    assert_eq!(info["backing-filename-format"], "raw", "{info}");
    let info = w.info_json("vms/abs.qcow2");
    assert_eq!(info["backing-filename"], "../base.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    for f in fixed {
        w.same_view(&format!("{f}.before"), f)
            .unwrap_or_else(|e| panic!("{f}: guest view changed: {e}"));
        w.check_clean(f).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    // Nothing is left, and the chain still works when its directory moves
    // (what the relative name is for).
    let (code, doc) = doctor(&w, &["."]);
    let k = kinds(&doc);
    assert!(
        !k.contains_key("abs.qcow2") && !k.contains_key("noformat.qcow2"),
        "{doc}"
    );
    assert!(
        code == 0 || k.keys().all(|n| n.ends_with(".before")),
        "{doc}"
    );
    let moved = Work::new("doctor-fix-moved");
    for f in ["base.qcow2", "vms/abs.qcow2"] {
        std::fs::create_dir_all(moved.path(f).parent().expect("dir")).expect("mkdir");
        std::fs::copy(w.path(f), moved.path(f)).expect("copy");
    }
    moved.qemu_img(&["check", "vms/abs.qcow2"]);
    moved
        .same_view(
            "vms/abs.qcow2",
            &w.path("vms/abs.qcow2.before").display().to_string(),
        )
        .expect("the moved chain reads the same");
}

#[test]
fn an_image_a_process_holds_is_skipped_and_left_byte_identical() {
    let w = Work::new("doctor-held");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    overlay(&w, "vm.qcow2", "base.qcow2", "qcow2");
    forget_backing_format(&w, "vm.qcow2");
    let before = file_bytes(&w, &["vm.qcow2", "base.qcow2"]);
    let vm = w.hold_writer("vm.qcow2", "qcow2");
    let pid = vm.id();
    let r = w.cowshed(&["doctor", "--fix", "."]);
    let after = file_bytes(&w, &["vm.qcow2", "base.qcow2"]);
    release_holder(vm);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stdout.contains("skipped") && r.stdout.contains(&format!("pid {pid}")),
        "{r}"
    );
    assert!(before == after, "a held image was written");
    // Released, the same command fixes it.
    let r = w.cowshed(&["doctor", "--fix", "."]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(w.info_json("vm.qcow2")["backing-filename-format"], "qcow2");
}

/// `base.qcow2` ← `d1` ← … ← `dN`.
fn chain(w: &Work, n: usize) {
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 1M".into()]);
    let mut prev = "base.qcow2".to_string();
    for i in 1..=n {
        let name = format!("d{i}.qcow2");
        overlay(w, &name, &prev, "qcow2");
        w.io("qcow2", &name, &[format!("write -P {} {}M 64k", i + 1, i)]);
        prev = name;
    }
}

#[test]
fn deep_chains_are_reported_with_commands_that_fix_never_runs() {
    let w = Work::new("doctor-deep");
    chain(&w, 10);
    let names: Vec<String> = (1..=10).map(|i| format!("d{i}.qcow2")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let before = file_bytes(&w, &refs);
    let (code, doc) = doctor(&w, &["--fix", "--max-depth", "8", "."]);
    assert_eq!(code, 1, "{doc}");
    let k = kinds(&doc);
    let deep: Vec<&String> = {
        let mut v: Vec<&String> = k.keys().collect();
        v.sort();
        v
    };
    assert_eq!(deep, ["d10.qcow2", "d9.qcow2"], "{doc}");
    assert!(k.values().all(|v| v == &["chain-too-deep"]), "{doc}");
    assert!(before == file_bytes(&w, &refs), "--fix copied data");
    // The commands offered are real: the flatten one is run here.
    let d10 = doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| {
            i["filename"]
                .as_str()
                .is_some_and(|f| f.ends_with("d10.qcow2"))
        })
        .expect("d10");
    let fixes = &d10["problems"][0]["fixes"];
    let commands: Vec<&str> = fixes
        .as_array()
        .expect("fixes")
        .iter()
        .map(|f| {
            assert_eq!(f["header-only"], false, "{f}");
            f["command"].as_str().expect("command")
        })
        .collect();
    assert_eq!(
        commands,
        [
            "cowshed rebase -b \"\" ./d10.qcow2",
            "cowshed commit ./d10.qcow2"
        ]
    );
    w.copy("d10.qcow2", "d10.before");
    let r = w.run(common::COWSHED, &["rebase", "-b", "", "./d10.qcow2"]);
    assert!(r.ok(), "{r}");
    w.same_view("d10.before", "d10.qcow2")
        .expect("flatten kept the view");
    std::fs::remove_file(w.path("d10.before")).expect("rm");
    let (_, doc) = doctor(&w, &["--max-depth", "8", "."]);
    assert_eq!(
        kinds(&doc).keys().collect::<Vec<_>>(),
        ["d9.qcow2"],
        "{doc}"
    );
    // The limit: the flag, else the config file, else 8.
    let (code, doc) = doctor(&w, &["--max-depth", "9", "."]);
    assert_eq!((code, doc["remaining"].as_u64()), (0, Some(0)), "{doc}");
    w.write_file("cowshed.toml", b"[doctor]\nmax_depth = 5\n");
    let (_, doc) = doctor(&w, &["--config", "cowshed.toml", "."]);
    assert_eq!(doc["max-depth"], 5);
    assert_eq!(kinds(&doc).len(), 4, "d6 to d9: {doc}");
    let (_, doc) = doctor(&w, &["--config", "cowshed.toml", "--max-depth", "7", "."]);
    assert_eq!(kinds(&doc).len(), 2, "d8, d9: {doc}");
    let r = w.cowshed(&["doctor", "--max-depth", "0", "."]);
    assert_eq!(r.code, Some(2), "{r}");
    w.write_file("bad.toml", b"[doctor]\nmax_depth = \"deep\"\n");
    let r = w.cowshed(&["doctor", "--config", "bad.toml", "."]);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("bad.toml"), "{r}");
}

#[test]
fn broken_chains_and_outside_bases_are_listed_without_a_fix() {
    let w = Work::new("doctor-broken");
    w.mkdir("scan");
    w.mkdir("elsewhere");
    w.create("elsewhere/outer.qcow2", "qcow2", "", None, 64 << 20);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../elsewhere/outer.qcow2",
        "-F",
        "qcow2",
        "scan/inner.qcow2",
    ]);
    w.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "scan/orphan.qcow2",
        "64M",
    ]);
    w.create("scan/x.qcow2", "qcow2", "", None, 64 << 20);
    overlay(&w, "scan/y.qcow2", "x.qcow2", "qcow2");
    w.qemu_img(&[
        "rebase",
        "-q",
        "-u",
        "-b",
        "y.qcow2",
        "-F",
        "qcow2",
        "scan/x.qcow2",
    ]);
    let names = [
        "scan/inner.qcow2",
        "scan/orphan.qcow2",
        "scan/x.qcow2",
        "scan/y.qcow2",
    ];
    let before = file_bytes(&w, &names);
    let (code, doc) = doctor(&w, &["--fix", "scan"]);
    assert_eq!(code, 1, "{doc}");
    let k = kinds(&doc);
    assert_eq!(k["inner.qcow2"], ["backing-outside-roots"]);
    assert_eq!(k["orphan.qcow2"], ["missing-backing"]);
    assert_eq!(k["x.qcow2"], ["cycle"]);
    assert_eq!(k["y.qcow2"], ["cycle"]);
    assert!(
        !k.contains_key("outer.qcow2"),
        "a base outside the roots is not diagnosed: {doc}"
    );
    for i in doc["images"].as_array().expect("images") {
        for p in i["problems"].as_array().expect("problems") {
            assert_eq!(p["fixes"], serde_json::json!([]), "{p}");
            assert_eq!(p["status"], "open", "{p}");
        }
    }
    assert!(before == file_bytes(&w, &names), "an image changed");
    let r = w.cowshed(&["doctor", "scan"]);
    assert!(r.stdout.contains("no fix"), "{r}");
    // A root that cannot be scanned is a usage error, never "all clear".
    let r = w.cowshed(&["doctor", "no-such-dir"]);
    assert_eq!(r.code, Some(2), "{r}");
    let r = w.cowshed(&["doctor", "--help"]);
    assert!(r.stdout.contains("Exit codes:"), "{r}");
}

// ---- protect ----

fn mode(w: &Work, f: &str) -> u32 {
    std::fs::metadata(w.path(f)).expect("stat").mode() & 0o7777
}

fn chmod(w: &Work, f: &str, m: u32) {
    std::fs::set_permissions(w.path(f), std::fs::Permissions::from_mode(m)).expect("chmod");
}

/// `qemu-io` as an unprivileged user (nobody), so that mode bits count
/// (the tests run as root, which they do not stop).
fn nobody_io(w: &Work, args: &[&str]) -> common::Run {
    let mut all = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "qemu-io",
    ];
    all.extend(args);
    w.run("setpriv", &all)
}

#[test]
fn protect_makes_bases_read_only_and_off_restores_their_mode() {
    let w = Work::new("protect");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 1M".into()]);
    overlay(&w, "vm.qcow2", "base.qcow2", "qcow2");
    w.create("alone.qcow2", "qcow2", "", None, 64 << 20);
    chmod(&w, "base.qcow2", 0o664);
    let r = w.cowshed(&["protect", "."]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(mode(&w, "base.qcow2"), 0o444);
    assert!(
        r.stdout.contains("base.qcow2: protected: mode 664 → 444"),
        "{r}"
    );
    assert_eq!(mode(&w, "vm.qcow2"), 0o644, "an overlay is no base");
    assert_eq!(mode(&w, "alone.qcow2"), 0o644, "nothing depends on it");
    // QEMU reads through a protected base as before.
    let r = w.qemu_img(&["info", "--backing-chain", "vm.qcow2"]);
    assert!(r.stdout.contains("base.qcow2"), "{r}");
    w.io(
        "qcow2",
        "vm.qcow2",
        &["write -P 3 2M 64k".into(), "read -P 1 0 64k".into()],
    );
    // The tree marks it.
    let tree = w.cowshed(&["tree", "--output", "json", "."]);
    let doc = w.json(&tree);
    let protected: Vec<&str> = doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .filter(|i| i["protected"] == true)
        .map(|i| i["filename"].as_str().expect("name"))
        .collect();
    assert_eq!(protected, ["./base.qcow2"], "{doc}");
    // Again: nothing to do, said so.
    let r = w.cowshed(&["protect", "."]);
    assert!(r.stdout.contains("already read-only"), "{r}");
    let r = w.cowshed(&["protect", "--off", "."]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(mode(&w, "base.qcow2"), 0o664, "the recorded mode: {r}");
    assert!(
        r.stdout.contains("the mode recorded when protecting"),
        "{r}"
    );
    // Read-only by other means (no record): the owner gets write back.
    chmod(&w, "base.qcow2", 0o440);
    let r = w.cowshed(&["protect", "--off", "."]);
    assert_eq!(mode(&w, "base.qcow2"), 0o640, "{r}");
    assert!(r.stdout.contains("owner write permission"), "{r}");
    // Overlays elsewhere make a base too, with --root.
    w.mkdir("bases");
    w.mkdir("vms");
    w.create("bases/gold.qcow2", "qcow2", "", None, 64 << 20);
    overlay(&w, "vms/web.qcow2", "../bases/gold.qcow2", "qcow2");
    let r = w.cowshed(&["protect", "bases"]);
    assert_eq!(mode(&w, "bases/gold.qcow2"), 0o644, "{r}");
    assert!(r.stdout.contains("nothing to protect"), "{r}");
    let r = w.cowshed(&["protect", "--root", "vms", "bases"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(mode(&w, "bases/gold.qcow2"), 0o444, "{r}");
}

#[test]
fn a_protected_base_cannot_be_opened_for_writing_but_its_overlays_still_write() {
    let w = Work::new("protect-qemu");
    // nobody must reach the files: the scratch directory is 0700.
    std::fs::set_permissions(w.root(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 1M".into()]);
    overlay(&w, "vm.qcow2", "base.qcow2", "qcow2");
    overlay(&w, "vm2.qcow2", "base.qcow2", "qcow2");
    for f in ["base.qcow2", "vm.qcow2", "vm2.qcow2"] {
        let r = w.run("chown", &["65534", f]);
        assert!(r.ok(), "{r}");
    }
    // Before: nobody, the owner, may open the base for writing.
    let r = nobody_io(&w, &["-c", "read -P 1 0 64k", "base.qcow2"]);
    assert!(r.ok(), "{r}");
    let r = nobody_io(&w, &["-f", "qcow2", "-c", "write -P 1 0 64k", "base.qcow2"]);
    assert!(r.ok(), "the base was writable before: {r}");

    // A VM (qemu-io) running on an overlay while its base is protected.
    let mut vm = Command::new("qemu-io")
        .args(["-f", "qcow2", "vm.qcow2"])
        .current_dir(w.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    assert!(w.writer_lock_seen("vm.qcow2"), "qemu-io took no lock");
    let r = w.cowshed(&["protect", "."]);
    assert_eq!(r.code, Some(0), "{r}");
    assert_eq!(mode(&w, "base.qcow2") & 0o222, 0, "{r}");

    // The base refuses a writer...
    let r = nobody_io(&w, &["-f", "qcow2", "-c", "write -P 9 0 64k", "base.qcow2"]);
    assert!(!r.ok(), "a protected base was opened for writing: {r}");
    assert!(
        format!("{}{}", r.stdout, r.stderr).contains("Permission denied"),
        "{r}"
    );
    // ...while overlays open it read-only as always: a new VM starts, and
    // the running one goes on writing into its overlay.
    let r = nobody_io(&w, &["-f", "qcow2", "-c", "write -P 5 2M 64k", "vm2.qcow2"]);
    assert!(r.ok(), "{r}");
    {
        use std::io::Write;
        let mut stdin = vm.stdin.take().expect("stdin");
        stdin
            .write_all(b"write -P 6 3M 64k\nquit\n")
            .expect("send commands");
    }
    let out = vm.wait_with_output().expect("qemu-io ends");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("wrote 65536/65536"), "{said}");
    for (img, pattern, at) in [
        ("vm.qcow2", 6, "3M"),
        ("vm2.qcow2", 5, "2M"),
        ("vm.qcow2", 1, "0"),
    ] {
        let r = w.run(
            "qemu-io",
            &[
                "-r",
                "-f",
                "qcow2",
                "-c",
                &format!("read -P {pattern} {at} 64k"),
                img,
            ],
        );
        assert!(
            r.ok() && !r.stdout.contains("Pattern verification failed"),
            "{r}"
        );
    }
    w.check_clean("vm.qcow2").expect("vm.qcow2 clean");
    let r = w.cowshed(&["protect", "--off", "."]);
    assert_eq!(r.code, Some(0), "{r}");
    let r = nobody_io(&w, &["-f", "qcow2", "-c", "write -P 1 0 64k", "base.qcow2"]);
    assert!(r.ok(), "writable again: {r}");
}

// ---- the stale-base guard in `tree` ----

fn flags_of(doc: &Value, name: &str) -> Vec<Value> {
    doc["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["filename"] == name)
        .unwrap_or_else(|| panic!("{name} not in {doc}"))["flags"]
        .as_array()
        .expect("flags")
        .clone()
}

#[test]
fn a_base_open_for_writing_is_an_alarm_and_a_reader_is_not() {
    let w = Work::new("stale-writer");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    overlay(&w, "web-1.qcow2", "base.qcow2", "qcow2");
    overlay(&w, "web-2.qcow2", "base.qcow2", "qcow2");
    overlay(&w, "web-2-1.qcow2", "web-2.qcow2", "qcow2");
    // A VM on an overlay holds the base read-only: no alarm.
    let vm = w.hold_writer("web-1.qcow2", "qcow2");
    let r = w.cowshed(&["tree", "."]);
    assert!(!r.stdout.contains("ALARM"), "{r}");
    release_holder(vm);
    // The base itself opened for writing, as a VM booted on it would.
    let writer = w.hold_writer("base.qcow2", "qcow2");
    let pid = writer.id();
    let human = w.cowshed(&["tree", "."]);
    let json = w.cowshed(&["tree", "--output", "json", "."]);
    release_holder(writer);
    assert!(
        human.stdout.contains(&format!(
            "ALARM: base ./base.qcow2 is open for writing by pid {pid} (qemu-io): its 3 \
             overlays will read corrupt data"
        )),
        "{human}"
    );
    let doc = w.json(&json);
    let flags = flags_of(&doc, "./base.qcow2");
    let alarm = flags
        .iter()
        .find(|f| f["kind"] == "open-for-writing")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(alarm["writers"], serde_json::json!([pid]), "{alarm}");
    let after = w.cowshed(&["tree", "."]);
    assert!(!after.stdout.contains("ALARM"), "{after}");
}

/// Whether the file system of `w` records birth times (statx btime):
/// ext4, xfs and btrfs do; some do not, and then nothing may be said.
fn records_birth_times(w: &Work) -> bool {
    std::fs::metadata(w.root()).expect("stat").created().is_ok()
}

#[test]
fn a_base_written_after_its_overlays_were_made_is_warned_of() {
    let w = Work::new("stale-modified");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 1M".into()]);
    overlay(&w, "web-1.qcow2", "base.qcow2", "qcow2");
    overlay(&w, "web-2.qcow2", "base.qcow2", "qcow2");
    // Untouched since its overlays were made: no warning.
    let doc = w.json(&w.cowshed(&["tree", "--output", "json", "."]));
    assert_eq!(flags_of(&doc, "./base.qcow2"), Vec::<Value>::new(), "{doc}");
    // Another base, written into after its overlay was made: exactly
    // the corruption the warning is about.
    w.create("gold.qcow2", "qcow2", "", None, 64 << 20);
    overlay(&w, "db.qcow2", "gold.qcow2", "qcow2");
    w.io("qcow2", "gold.qcow2", &["write -P 9 0 64k".into()]);
    let json = w.cowshed(&["tree", "--output", "json", "."]);
    let human = w.cowshed(&["tree", "."]);
    let doc = w.json(&json);
    let flags = flags_of(&doc, "./gold.qcow2");
    if records_birth_times(&w) {
        assert_eq!(flags.len(), 1, "{doc}");
        assert_eq!(flags[0]["kind"], "modified-after-dependents");
        assert_eq!(flags[0]["images"], serde_json::json!(["./db.qcow2"]));
        assert!(
            human
                .stdout
                .contains("modified after db.qcow2 was created on it: it may read changed data"),
            "{human}"
        );
    } else {
        // No birth time, no guess.
        assert_eq!(flags, Vec::<Value>::new(), "{doc}");
    }
    assert_eq!(flags_of(&doc, "./base.qcow2"), Vec::<Value>::new(), "{doc}");
}

// ---- tree JSON's space figures ----

#[test]
fn subtree_size_is_what_deleting_an_image_and_its_dependents_frees() {
    let w = Work::new("subtree");
    w.create("base.qcow2", "qcow2", "", None, 64 << 20);
    w.io("qcow2", "base.qcow2", &["write -P 1 0 8M".into()]);
    overlay(&w, "a.qcow2", "base.qcow2", "qcow2");
    w.io("qcow2", "a.qcow2", &["write -P 2 0 3M".into()]);
    overlay(&w, "a-1.qcow2", "a.qcow2", "qcow2");
    w.io("qcow2", "a-1.qcow2", &["write -P 3 4M 1M".into()]);
    overlay(&w, "a-2.qcow2", "a.qcow2", "qcow2");
    overlay(&w, "b.qcow2", "base.qcow2", "qcow2");
    w.io("qcow2", "b.qcow2", &["write -P 4 16M 2M".into()]);
    w.create("alone.raw", "raw", "", None, 4 << 20);
    w.io("raw", "alone.raw", &["write -P 5 0 1M".into()]);
    // st_blocks of each file, as stat(2) reports them.
    let blocks = |f: &str| std::fs::metadata(w.path(f)).expect("stat").blocks() * 512;
    let below: [(&str, &[&str]); 6] = [
        (
            "base.qcow2",
            &["base.qcow2", "a.qcow2", "a-1.qcow2", "a-2.qcow2", "b.qcow2"],
        ),
        ("a.qcow2", &["a.qcow2", "a-1.qcow2", "a-2.qcow2"]),
        ("a-1.qcow2", &["a-1.qcow2"]),
        ("a-2.qcow2", &["a-2.qcow2"]),
        ("b.qcow2", &["b.qcow2"]),
        ("alone.raw", &["alone.raw"]),
    ];
    let doc = w.json(&w.cowshed(&["tree", "--output", "json", "."]));
    let images = doc["images"].as_array().expect("images");
    assert_eq!(images.len(), below.len(), "{doc}");
    for (name, subtree) in below {
        let i = images
            .iter()
            .find(|i| i["filename"] == format!("./{name}"))
            .unwrap_or_else(|| panic!("{name}: {doc}"));
        let want: u64 = subtree.iter().map(|f| blocks(f)).sum();
        assert_eq!(i["subtree-size"].as_u64(), Some(want), "{name}: {i}");
        assert_eq!(
            i["dependents"].as_u64(),
            Some(subtree.len() as u64 - 1),
            "{name}: {i}"
        );
        assert_eq!(i["actual-size"].as_u64(), Some(blocks(name)), "{name}: {i}");
        // qemu-img's own figure for the file.
        assert_eq!(
            Some(w.actual_size(name)),
            i["actual-size"].as_u64(),
            "{name}"
        );
    }
}
