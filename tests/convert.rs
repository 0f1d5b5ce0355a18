//! convert -O raw behaviour beyond byte equality (which tests/oracle.rs
//! checks): cancel, Ctrl-C and SIGKILL leave nothing behind, the source is
//! never overwritten. Interruptions land at named fault points
//! (src/engine/fault.rs), not after a delay.

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::fault::{self, HANG_GUARD};
use cowshed::engine::fault::Plan;
use cowshed::engine::{convert_to_raw, Cancel, ConvertOptions, Error, Progress};

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img {args:?} failed");
}

/// A qcow2 with `mib` MiB of non-zero data, so a convert has real work.
fn data_image(dir: &Path, mib: usize) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    let mut f = fs::File::create(&raw).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let img = dir.join("src.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    fs::remove_file(&raw).unwrap();
    img
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn cancel_leaves_no_destination_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = data_image(dir.path(), 64);
    let dst = dir.path().join("out.raw");
    let progress = Progress::new();
    let cancel = Cancel::new();
    // Held after its second chunk while the cancel is requested: the
    // reader sees it before reading a third.
    let plan = Plan::new().pause_at("convert.raw.batch", 2);
    let result = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let _faults = plan.enter();
            convert_to_raw(&src, &dst, &ConvertOptions::default(), &progress, &cancel)
        });
        let paused = plan.wait_paused(HANG_GUARD);
        cancel.cancel();
        plan.release();
        let r = h.join().unwrap();
        assert!(paused.is_some(), "never paused: {r:?}");
        r
    });
    assert!(matches!(result, Err(Error::Cancelled)), "got {result:?}");
    assert_eq!(plan.hits("convert.raw.batch"), 2);
    assert_eq!(plan.hits("convert.before_rename"), 0);
    assert_eq!(names(dir.path()), vec!["src.qcow2".to_string()]);
}

/// Ctrl-C while the copy is held at its third chunk: the handler's cancel
/// is seen (the trace shows it ran) before the copy goes on, so the exit is
/// 130 with nothing left behind.
#[test]
fn sigint_leaves_no_destination_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("w");
    fs::create_dir(&d).unwrap();
    data_image(&d, 16);
    let args = ["convert", "-O", "raw", "src.qcow2", "out.raw"];
    let mut paused = fault::pause_at(&d, &args, "convert.raw.batch", 3);
    nix::sys::signal::kill(paused.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    paused.wait_for_trace("the Ctrl-C handler", |t| t.hits("cli.interrupted") == 1);
    let (out, trace) = paused.release();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr: {msg}");
    assert!(msg.contains("cancelled"), "stderr: {msg}");
    assert_eq!(trace.hits("convert.raw.batch"), 3);
    assert_eq!(names(&d), vec!["src.qcow2".to_string()]);
}

/// SIGKILL at each chunk, before and after the rename: DST appears only
/// once complete; a kill leaves at most the temporary file, under its
/// telling name.
#[test]
fn sigkill_never_leaves_a_partial_destination() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("w");
    fs::create_dir(&d).unwrap();
    data_image(&d, 4);
    let args = ["convert", "-O", "raw", "src.qcow2", "out.raw"];
    let trace = fault::trace(&d, &args);
    fs::remove_file(d.join("out.raw")).unwrap();
    for p in [
        "convert.raw.batch",
        "convert.before_rename",
        "convert.renamed",
    ] {
        assert!(trace.hits(p) > 0, "never passed {p}: {:?}", trace.counts());
    }
    for (point, hit) in fault::choose(&trace, 4) {
        fault::kill_at(&d, &args, &point, hit);
        let complete = point == "convert.renamed";
        if complete {
            let cmp = Command::new("qemu-img")
                .args(["compare", "src.qcow2", "out.raw"])
                .current_dir(&d)
                .output()
                .unwrap();
            assert!(cmp.status.success(), "killed at {point} #{hit}");
            fs::remove_file(d.join("out.raw")).unwrap();
        }
        for n in names(&d) {
            if n.starts_with(".out.raw.cowshed-tmp-") {
                fs::remove_file(d.join(n)).unwrap();
            }
        }
        assert_eq!(
            names(&d),
            vec!["src.qcow2".to_string()],
            "killed at {point} #{hit}"
        );
    }
}

#[test]
fn refuses_to_overwrite_its_own_source() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let before = fs::read(&base).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["convert", "-O", "raw"])
        .arg(&top)
        .arg(&base)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("same file"), "stderr: {msg}");
    assert_eq!(
        fs::read(&base).unwrap(),
        before,
        "the backing file was changed"
    );
}

#[test]
fn progress_flag_reports_and_output_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let src = data_image(dir.path(), 8);
    let dst = dir.path().join("out.raw");
    fs::write(&dst, b"old contents are replaced").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["convert", "-p", "-t", "unsafe", "-O", "raw"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("100.00/100%"));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}
