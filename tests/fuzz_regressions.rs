//! Every input the fuzz targets (fuzz/) once failed on, replayed under plain
//! stable `cargo test` through the very same target bodies and checks
//! (counting allocator, unchanged files, growth bounds, oracles): the
//! modules below are the fuzz crate's own files. An input lives in
//! `fuzz/regressions/TARGET/NAME`, named after what it found.

#[path = "../fuzz/src/harness.rs"]
mod harness;

#[path = "../fuzz/src/check.rs"]
mod check;
#[path = "../fuzz/src/check_repair.rs"]
mod check_repair;
#[path = "../fuzz/src/commit.rs"]
mod commit;
#[path = "../fuzz/src/convert.rs"]
mod convert;
#[path = "../fuzz/src/map.rs"]
mod map;
#[path = "../fuzz/src/open_info.rs"]
mod open_info;
#[path = "../fuzz/src/read.rs"]
mod read;
#[path = "../fuzz/src/rebase.rs"]
mod rebase;
#[path = "../fuzz/src/writer.rs"]
mod writer;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[global_allocator]
static ALLOCATOR: harness::CountingAlloc = harness::CountingAlloc;

/// Run every committed input of `target`; report all that fail, by name.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    paths.sort();
    let mut failed = Vec::new();
    for p in &paths {
        let data = std::fs::read(p).unwrap();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", p.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} {target} regression inputs fail:\n{}",
        failed.len(),
        paths.len(),
        failed.join("\n")
    );
}

#[test]
fn open_info_regressions() {
    replay("open_info", open_info::run);
}

#[test]
fn map_regressions() {
    replay("map", map::run);
}

#[test]
fn read_regressions() {
    replay("read", read::run);
}

#[test]
fn check_regressions() {
    replay("check", check::run);
}

#[test]
fn check_repair_regressions() {
    replay("check_repair", check_repair::run);
}

#[test]
fn commit_regressions() {
    replay("commit", commit::run);
}

#[test]
fn rebase_regressions() {
    replay("rebase", rebase::run);
}

#[test]
fn convert_regressions() {
    replay("convert", convert::run);
}

#[test]
fn writer_regressions() {
    replay("writer", writer::run);
}

/// The harness itself catches what it is there to catch: a trusted huge
/// size, a changed file, a changed view. (A harness that cannot fail would
/// make every replay above pass.)
#[test]
fn harness_catches_what_it_checks() {
    // One file, later changed behind the harness's back. The execution
    // holds the harness's lock throughout: the allocator counts for the
    // whole process, and a 200 MiB probe must not land in a replay
    // running beside this test.
    let mut input = vec![0u8, 1];
    input.extend_from_slice(&4096u32.to_le_bytes());
    input.extend_from_slice(&1u16.to_le_bytes());
    input.extend_from_slice(&0u32.to_le_bytes());
    input.extend_from_slice(&3u16.to_le_bytes());
    input.extend_from_slice(b"abc");
    let parsed = harness::Input::parse(&input);
    let exec = harness::Exec::new(&parsed);

    let huge = catch_unwind(|| {
        harness::measured("probe", 1000, || {
            let v = vec![0u8; 200 << 20];
            std::hint::black_box(&v);
        })
    });
    assert!(
        huge.is_err(),
        "a 200 MiB allocation for 1000 bytes of files passed"
    );
    harness::measured("probe", 1000, || {
        let v = vec![0u8; 1 << 20];
        std::hint::black_box(&v);
    });

    assert_eq!(std::fs::read(exec.path("f0")).unwrap()[..3], *b"abc");
    assert_eq!(harness::file_len(&exec.path("f0")), 4096);
    let before = exec.fingerprints();
    exec.assert_unchanged("untouched", &before, &[], &[]);
    std::fs::write(exec.path("f0"), b"abd").unwrap();
    let changed = catch_unwind(AssertUnwindSafe(|| {
        exec.assert_unchanged("changed", &before, &[], &[])
    }));
    assert!(changed.is_err(), "a changed file passed as unchanged");
    let view = catch_unwind(|| harness::assert_same_view("view", b"abc", b"abd"));
    assert!(view.is_err(), "a changed view passed");
}
