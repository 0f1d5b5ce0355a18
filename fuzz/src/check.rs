//! Target `check`: the read-only check. No file may change.

use crate::harness::{measured, Exec, Input};
use cowshed::engine::check;

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let before = exec.fingerprints();
    let f0 = exec.path("f0");
    measured("check", exec.files_bytes, || {
        if let Ok(r) = check(&f0, None) {
            // The exit code follows from the counters.
            let code = r.exit_code();
            assert!(
                (0..=3).contains(&code),
                "check: exit code {code} out of range"
            );
        }
    });
    exec.assert_unchanged("check (read-only)", &before, &[], &[]);
}
