//! Target `rebase`: f0 (qcow2) is rebased, by the selector: 0 safe onto f2,
//! 1 flatten (safe, no backing), 2 unsafe (-u) onto f2, 3 unsafe to no
//! backing. Safe rebases and flatten keep the guest view, on success and on
//! error alike; no other file changes; an image that checked clean still
//! does after a success.

use crate::harness::{
    assert_growth, assert_names_a_file, assert_same_view, assert_still_consistent, cluster_size,
    corruptions, file_len, measured, view, virtual_size, Exec, Input, MAX_FILE,
};
use cowshed::engine::{info, probe, rebase, Cancel, Format, Progress, RebaseOptions};

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    if !exec.confined() {
        return;
    }
    let f0 = exec.path("f0");
    let mode = input.selector & 3;
    let onto_f2 = mode == 0 || mode == 2;
    let unsafe_header_only = mode >= 2;
    let opts = RebaseOptions {
        backing: if onto_f2 { "f2".into() } else { String::new() },
        backing_format: onto_f2.then(|| probe(&exec.path("f2")).unwrap_or(Format::Raw)),
        unsafe_header_only,
        ..Default::default()
    };
    // The image's own external data file changes with it.
    let data_file = info(&f0, None)
        .ok()
        .and_then(|i| i.qcow2)
        .and_then(|q| q.data_file);
    let mut may_change = vec!["f0"];
    if let Some(d) = data_file.as_deref() {
        may_change.push(d);
    }
    let before = exec.fingerprints();
    let view0 = view(&f0, None);
    let pre = corruptions(&f0);
    let len0 = file_len(&f0);
    let cs = cluster_size(&f0);
    let r = measured("rebase", exec.files_bytes, || {
        rebase(&f0, &opts, &Progress::new(), &Cancel::new())
    });
    let what = format!(
        "rebase mode {mode} ({}{})",
        if unsafe_header_only { "-u " } else { "" },
        if onto_f2 { "onto f2" } else { "to no backing" }
    );
    exec.assert_unchanged(&what, &before, &may_change, &[]);
    let size = virtual_size(&f0).min(MAX_FILE);
    assert_growth(&what, &f0, len0, 2 * size + 64 * cs + 4096);
    if let Err(e) = &r {
        assert_names_a_file(&what, e, &exec);
    }
    if !unsafe_header_only {
        if let Some(want) = &view0 {
            match view(&f0, None) {
                Some(now) => assert_same_view(&what, want, &now),
                None => panic!("{what}: the image read before and cannot be read after"),
            }
        }
    }
    if r.is_ok() {
        assert_still_consistent(&what, &f0, pre);
    } else if unsafe_header_only {
        exec.assert_unchanged(&what, &before, &[], &[]);
    }
}
