//! Target `open_info`: probe, info, info of the chain, the header summary
//! and a chain open on the first file. Read-only: no file may change.

use crate::harness::{assert_names_a_file, measured, Exec, Input};
use cowshed::engine::{info, info_chain, inspect, probe, Chain};

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let before = exec.fingerprints();
    let f0 = exec.path("f0");
    measured("open_info", exec.files_bytes, || {
        let _ = probe(&f0);
        if let Err(e) = info(&f0, None) {
            assert_names_a_file("info", &e, &exec);
        }
        if let Ok(infos) = info_chain(&f0, None) {
            assert!(!infos.is_empty(), "info_chain: an empty chain");
        }
        let _ = inspect(&f0);
        if let Ok(chain) = Chain::open(&f0, None) {
            assert!(!chain.layers().is_empty());
        }
    });
    exec.assert_unchanged("open_info (read-only)", &before, &[], &[]);
}
