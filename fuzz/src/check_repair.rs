//! Target `check_repair`: `check -r all`, then a check of the result and a
//! second repair. A repair that says it left the image clean must be
//! believed by the check that follows; the file never grows beyond what
//! the refcount structure of the clusters it holds needs; no other file
//! changes.

use crate::harness::{
    assert_growth, assert_names_a_file, cluster_size, file_len, measured, Exec, Input,
};
use cowshed::engine::{check, check_repair_all, Format};

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let before = exec.fingerprints();
    let f0 = exec.path("f0");
    let len0 = file_len(&f0);
    let cs = cluster_size(&f0);
    // A rebuilt refcount structure: refblocks for every cluster of the
    // file (at least 64 counters a block) and a table for them, twice
    // over (old and new), plus a few clusters.
    let allowed = len0 / 16 + 16 * cs;
    for round in 0..2 {
        let what = format!("check -r all (round {round})");
        let r = measured(&what, exec.files_bytes, || check_repair_all(&f0, None));
        assert_growth(&what, &f0, len0, allowed);
        match r {
            Ok(report) => {
                if report.exit_code() == 0 {
                    let again = measured("check after repair", exec.files_bytes, || {
                        check(&f0, Some(Format::Qcow2))
                    });
                    match again {
                        Ok(c) => assert!(
                            c.corruptions == 0 && c.check_errors == 0,
                            "{what} reported a clean image, but check finds {} corruptions, {} errors: {:?}",
                            c.corruptions,
                            c.check_errors,
                            c.findings.iter().take(5).collect::<Vec<_>>()
                        ),
                        Err(e) => panic!("{what} reported a clean image that check cannot open: {e}"),
                    }
                }
            }
            Err(e) => {
                assert_names_a_file(&what, &e, &exec);
                break;
            }
        }
    }
    exec.assert_unchanged("check -r all", &before, &["f0"], &[]);
}
