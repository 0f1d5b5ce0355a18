//! Running the QEMU tools and cowshed in a directory, for the tests that
//! work with paths relative to one (most of them).

use std::path::Path;
use std::process::{Command, Output};

/// Run `prog args` with `cwd` as the working directory.
pub fn run(cwd: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Run and require success (a failing recipe is a broken test); stdout.
pub fn ok(cwd: &Path, prog: &str, args: &[&str]) -> String {
    let out = run(cwd, prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` exit code: 0 clean, 3 leaks only, 2 corruptions.
pub fn check_code(cwd: &Path, img: &str) -> i32 {
    run(cwd, "qemu-img", &["check", img])
        .status
        .code()
        .unwrap_or(-1)
}
