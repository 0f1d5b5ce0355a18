//! Lock state against real QEMU holders: qemu-io read-write and read-only.
//! cowshed only asks (F_OFD_GETLK) and must not disturb the holder.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowshed::engine::{lock_state, LockState};

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img {args:?} failed");
}

/// qemu-io waits for commands on stdin, holding the image open until stdin
/// closes.
fn hold(path: &Path, read_only: bool) -> Child {
    let mut cmd = Command::new("qemu-io");
    if read_only {
        cmd.arg("-r");
    }
    cmd.args(["-f", "qcow2"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io")
}

fn wait_for(path: &Path, want: LockState) -> LockState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = lock_state(path).expect("lock state");
        if got == want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn release(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// A writer must still be able to open the image after we probed it, i.e.
/// our probe left no lock behind: qemu-img refuses to write while any other
/// holder exists.
fn assert_writable_by_qemu(path: &Path) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 4k"])
        .arg(path)
        .output()
        .expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io could not write after cowshed probed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn lock_state_follows_qemu_holders() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);

    assert_eq!(lock_state(&img).unwrap(), LockState::None);
    assert_writable_by_qemu(&img);

    let writer = hold(&img, false);
    assert_eq!(wait_for(&img, LockState::Writer), LockState::Writer);
    // Probing again and again does not take the holder's locks away: a
    // second writer is still refused by QEMU.
    for _ in 0..3 {
        assert_eq!(lock_state(&img).unwrap(), LockState::Writer);
    }
    let second = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        !second.status.success(),
        "QEMU's lock vanished after our probe"
    );
    release(writer);

    assert_eq!(wait_for(&img, LockState::None), LockState::None);

    let reader = hold(&img, true);
    assert_eq!(wait_for(&img, LockState::Reader), LockState::Reader);
    release(reader);
    assert_eq!(wait_for(&img, LockState::None), LockState::None);
    assert_writable_by_qemu(&img);
}

#[test]
fn info_json_reports_lock_state() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("held.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let writer = hold(&img, false);
    assert_eq!(wait_for(&img, LockState::Writer), LockState::Writer);
    let out = Command::new(env!("CARGO_BIN_EXE_cowshed"))
        .args(["info", "--output", "json"])
        .arg(&img)
        .output()
        .unwrap();
    release(writer);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["lock-state"], "writer");
}

use cowshed::engine::lock::{ImageLock, LockMode};

fn qemu_io_write(path: &Path) -> std::process::Output {
    Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x42 0 4k"])
        .arg(path)
        .output()
        .expect("run qemu-io")
}

#[test]
fn our_write_lock_keeps_qemu_out_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let file = std::fs::File::open(&img).unwrap();
    let lock = ImageLock::acquire(&file, &img, LockMode::WRITER).expect("free image locks");
    assert_eq!(
        lock_state(&img).unwrap(),
        LockState::Writer,
        "QEMU's tools see a writer"
    );

    let w = qemu_io_write(&img);
    assert!(!w.status.success(), "qemu-io wrote into an image we hold");
    assert!(
        String::from_utf8_lossy(&w.stderr).contains("Failed to get"),
        "{}",
        String::from_utf8_lossy(&w.stderr)
    );
    let info = Command::new("qemu-img")
        .arg("info")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        !info.status.success(),
        "qemu-img info (which locks for reading) should be refused"
    );
    let info_u = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        info_u.status.success(),
        "qemu-img info -U takes no conflicting lock"
    );

    drop(lock);
    assert_eq!(
        lock_state(&img).unwrap(),
        LockState::None,
        "locks released on drop"
    );
    assert!(
        qemu_io_write(&img).status.success(),
        "QEMU can write once we let go"
    );
    drop(file);
}

#[test]
fn qemu_holders_make_our_lock_fail_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("busy.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
    let before = std::fs::read(&img).unwrap();

    let writer = hold(&img, false);
    assert_eq!(wait_for(&img, LockState::Writer), LockState::Writer);
    let file = std::fs::File::open(&img).unwrap();
    let err =
        ImageLock::acquire(&file, &img, LockMode::WRITER).expect_err("a QEMU writer holds it");
    let msg = err.to_string();
    assert!(
        msg.contains("in use by pid") && msg.contains("qemu-io"),
        "{msg}"
    );
    assert!(msg.contains("busy.qcow2"), "{msg}");
    // A read-only opener conflicts with a writer too (QEMU unshares write).
    assert!(ImageLock::acquire(&file, &img, LockMode::READER).is_err());
    release(writer);
    assert_eq!(
        wait_for(&img, LockState::None),
        LockState::None,
        "our failed attempt left no lock"
    );

    // A QEMU reader: we may read alongside it, but not write.
    let reader = hold(&img, true);
    assert_eq!(wait_for(&img, LockState::Reader), LockState::Reader);
    assert!(ImageLock::acquire(&file, &img, LockMode::WRITER).is_err());
    let shared = ImageLock::acquire(&file, &img, LockMode::READER).expect("readers share");
    drop(shared);
    release(reader);
    assert_eq!(wait_for(&img, LockState::None), LockState::None);
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the image was never written"
    );
}
