//! convert -O raw behaviour beyond byte equality (which tests/oracle.rs
//! checks): cancel leaves nothing behind, the source is never overwritten.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let result = std::thread::scope(|s| {
        let h =
            s.spawn(|| convert_to_raw(&src, &dst, &ConvertOptions::default(), &progress, &cancel));
        // Cancel as soon as the first bytes moved.
        while progress.snapshot().0 == 0 && !h.is_finished() {
            std::thread::yield_now();
        }
        cancel.cancel();
        h.join().unwrap()
    });
    assert!(matches!(result, Err(Error::Cancelled)), "got {result:?}");
    assert_eq!(names(dir.path()), vec!["src.qcow2".to_string()]);
}

#[test]
fn sigint_leaves_no_destination_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = data_image(dir.path(), 256);
    let dst = dir.path().join("out.raw");
    let child = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["convert", "-O", "raw"])
        .arg(&src)
        .arg(&dst)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the temporary file exists, i.e. mid-copy.
    let deadline = Instant::now() + Duration::from_secs(20);
    while names(dir.path()).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let interrupted = names(dir.path()).len() == 2;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(interrupted, "the temporary file never appeared");
    if out.status.code() == Some(130) {
        assert_eq!(names(dir.path()), vec!["src.qcow2".to_string()]);
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains("cancelled"), "stderr: {msg}");
    } else {
        // The copy won the race: then DST must be complete and no temp left.
        assert!(out.status.success());
        assert_eq!(
            names(dir.path()),
            vec!["out.raw".to_string(), "src.qcow2".to_string()]
        );
        let cmp = Command::new("qemu-img")
            .arg("compare")
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        assert!(cmp.status.success());
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
