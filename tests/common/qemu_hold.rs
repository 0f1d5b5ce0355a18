//! A QEMU holding an image, as a running VM would: `qemu-io` sleeping with
//! the image open, started in the background and waited for until
//! cowshed's own lock probe sees its lock (never a sleep and a hope).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowshed::engine::{lock_state, LockState};

/// The holder; killed when dropped.
pub struct Held {
    child: Child,
    pub file: PathBuf,
}

impl Held {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// qemu-io with `file` (in `dir`) open read-write, its backing chain
/// opened too (each backing file then held as a reader).
pub fn hold_writer(dir: &Path, file: &str) -> Held {
    hold(dir, &["-f", "qcow2", file], file, LockState::Writer)
}

/// qemu-io with the qcow2 image `file` open read-write and its backing
/// file not opened at all (`backing: null`): only `file` is held.
pub fn hold_writer_alone(dir: &Path, file: &str) -> Held {
    let spec = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{file}"}},"backing":null}}"#
    );
    hold(dir, &[&spec], file, LockState::Writer)
}

fn hold(dir: &Path, args: &[&str], file: &str, want: LockState) -> Held {
    let child = Command::new("qemu-io")
        .args(args)
        .args(["-c", "sleep 600000"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");
    let mut held = Held {
        child,
        file: dir.join(file),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if lock_state(&held.file).expect("lock state") == want {
            return held;
        }
        if let Some(st) = held.child.try_wait().expect("try_wait") {
            panic!("qemu-io ended ({st}) before it held {file}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-io does not hold {file} after 120 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
