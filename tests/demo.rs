//! `cowshed demo --no-tui DIR`: the fleet it builds has the promised shape
//! (seen through `cowshed tree --output json`), QEMU finds every image
//! clean and readable, and DIR is guarded: a user's non-empty directory is
//! refused, a previous demo fleet is reused.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const COWSHED: &str = env!("CARGO_BIN_EXE_cowshed");

fn cowshed(args: &[&str]) -> Output {
    Command::new(COWSHED)
        .args(args)
        .output()
        .expect("run cowshed")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn build(dir: &Path) -> String {
    let out = cowshed(&["demo", "--no-tui", dir.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tree(dir: &Path) -> Value {
    let out = cowshed(&["tree", "--output", "json", dir.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("tree JSON")
}

fn name(v: &Value) -> String {
    Path::new(v.as_str().expect("a file name"))
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// Images by file name.
fn images(tree: &Value) -> HashMap<String, Value> {
    tree["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| (name(&i["filename"]), i.clone()))
        .collect()
}

/// Backing links from `image` up to its root.
fn depth(images: &HashMap<String, Value>, image: &str) -> usize {
    let mut d = 0;
    let mut at = image.to_string();
    while let Some(p) = images[&at]["parent"].as_str() {
        at = name(&Value::from(p));
        d += 1;
        assert!(d < 16, "parent loop at {image}");
    }
    d
}

fn qemu_img_check(file: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "--output", "json", file])
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img check {file}: {}",
        text(&out)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("check JSON");
    for field in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(v[field].as_u64().unwrap_or(0), 0, "{file}: {v}");
    }
}

#[test]
fn demo_builds_the_promised_fleet() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("fleet");
    let printed = build(&dir);
    assert!(printed.contains(&dir.display().to_string()), "{printed}");
    assert!(dir.join(".cowshed-demo").is_file());

    let t = tree(&dir);
    assert_eq!(t["errors"], Value::Array(vec![]), "{t:#}");
    let imgs = images(&t);

    // A base with at least three overlays.
    let base = imgs
        .values()
        .find(|i| i["parent"].is_null() && i["children"].as_array().is_some_and(|c| c.len() >= 3))
        .unwrap_or_else(|| panic!("no base with 3 overlays: {t:#}"));
    assert_eq!(base["format"], "qcow2");
    assert!(base["flags"].as_array().expect("flags").is_empty());
    // It holds data: the overlays have something to share.
    assert!(
        base["actual-size"].as_u64().expect("size") > 8 << 20,
        "{base:#}"
    );

    // A chain of depth 3 (three backing links), nothing flagged on it.
    let deepest = imgs
        .keys()
        .map(|k| (depth(&imgs, k), k.clone()))
        .max()
        .expect("images");
    assert_eq!(deepest.0, 3, "{t:#}");
    let mut at = deepest.1.clone();
    for _ in 0..3 {
        let i = &imgs[&at];
        assert!(i["flags"].as_array().expect("flags").is_empty(), "{i:#}");
        assert_eq!(i["backing-filename-format"], "qcow2");
        // Relative names, as a user would make them beside each other.
        assert!(!i["backing-filename"]
            .as_str()
            .expect("name")
            .starts_with('/'));
        at = name(&i["parent"]);
    }

    // A broken overlay, flagged, wanting a file that is not there.
    let broken: Vec<&Value> = imgs
        .values()
        .filter(|i| {
            i["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .any(|f| f["kind"] == "missing-backing")
        })
        .collect();
    assert_eq!(broken.len(), 1, "{t:#}");
    let wanted = broken[0]["backing-filename"].as_str().expect("backing");
    assert!(!dir.join(wanted).exists());
    assert!(broken[0]["parent"].is_null());

    // A raw image with data.
    let raw: Vec<&Value> = imgs.values().filter(|i| i["format"] == "raw").collect();
    assert_eq!(raw.len(), 1, "{t:#}");
    assert!(raw[0]["actual-size"].as_u64().expect("size") > 0);

    // QEMU agrees: every qcow2 is clean. The broken one is checked on its
    // own, with its (missing) backing switched off.
    let mut checked = 0;
    for i in imgs.values().filter(|i| i["format"] == "qcow2") {
        let file = i["filename"].as_str().expect("filename");
        if i["flags"].as_array().expect("flags").is_empty() {
            qemu_img_check(file);
        } else {
            qemu_img_check(&format!(
                r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{file}"}},"backing":null}}"#
            ));
        }
        checked += 1;
    }
    assert!(checked >= 6, "{checked}");

    // And reads through the deep chain: the guest data of every layer.
    let deep = dir.join(&deepest.1);
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2"])
        .args(["-c", "read -P 0x11 0 1M"]) // the base's
        .args(["-c", "read -P 0x31 64M 1M"]) // db-1's
        .args(["-c", "read -P 0x33 72M 1M"]) // its own
        .arg(&deep)
        .output()
        .expect("run qemu-io");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !said.contains("Pattern verification failed"),
        "{}",
        text(&out)
    );
}

#[test]
fn demo_refuses_a_users_directory_and_reuses_its_own() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).expect("mkdir");
    std::fs::write(mine.join("thesis.tex"), "precious\n").expect("write");
    let out = cowshed(&["demo", "--no-tui", mine.to_str().expect("utf-8")]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not empty"),
        "{}",
        text(&out)
    );
    let left: Vec<_> = std::fs::read_dir(&mine).expect("ls").collect();
    assert_eq!(left.len(), 1, "the demo wrote into a user's directory");

    // A previous fleet: kept as it is, a missing image rebuilt.
    let fleet = tmp.path().join("fleet");
    build(&fleet);
    let before = tree(&fleet);
    std::fs::remove_file(fleet.join("web-2.qcow2")).expect("rm");
    let printed = build(&fleet);
    assert!(printed.contains("1 images built, 7 kept"), "{printed}");
    let after = tree(&fleet);
    let (a, b) = (images(&before), images(&after));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(v["parent"], b[k]["parent"], "{k}");
        assert_eq!(v["actual-size"], b[k]["actual-size"], "{k}");
    }
}

#[test]
fn demo_without_dir_uses_a_fresh_temporary_directory() {
    // Only the path is learnt from the output; the fleet is removed after.
    let out = cowshed(&["demo", "--build-only"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().expect("a line");
    let path = first
        .strip_prefix("cowshed demo fleet in ")
        .and_then(|r| r.split(" (").next())
        .unwrap_or_else(|| panic!("{stdout}"));
    let dir = Path::new(path);
    let exists = dir.join(".cowshed-demo").is_file();
    let fleet_file = dir.join("debian-12.qcow2").is_file();
    std::fs::remove_dir_all(dir).expect("clean up");
    assert!(exists && fleet_file, "{stdout}");
    assert!(
        dir.starts_with(std::env::temp_dir()),
        "{path} is not a temporary directory"
    );
}
