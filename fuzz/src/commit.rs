//! Target `commit`: f0 (qcow2) commits into its backing f1, or with the
//! selector's bit 1 into f2 further down (`-b`); bit 0 keeps the top
//! (`-d`). On success the top reads as before, the base reads what the top
//! read, both check without new corruptions, and nothing outside the chain
//! from top to base changed. On an error the top is as it was.

use crate::harness::{
    assert_growth, assert_names_a_file, assert_same_view, assert_still_consistent, cluster_size,
    corruptions, file_len, measured, view, view_prefix, virtual_size, Exec, Input, MAX_FILE,
};
use cowshed::engine::{commit, Cancel, Chain, CommitOptions, Format, Progress};

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    if !exec.confined() {
        return;
    }
    let f0 = exec.path("f0");
    let keep_top = input.selector & 1 != 0;
    let explicit_base = (input.selector & 2 != 0).then(|| exec.path("f2"));
    let before = exec.fingerprints();
    let layers: Vec<String> = Chain::open(&f0, Some(Format::Qcow2))
        .map(|c| {
            c.layers()
                .iter()
                .filter_map(|l| l.path.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let base_name = match &explicit_base {
        Some(_) => "f2".to_string(),
        None => layers.get(1).cloned().unwrap_or_default(),
    };
    let base = exec.path(&base_name);
    let top_view = view(&f0, Some(Format::Qcow2));
    let top_size = virtual_size(&f0).min(MAX_FILE);
    let pre_top = corruptions(&f0);
    let pre_base = corruptions(&base);
    let (top_len, base_len) = (file_len(&f0), file_len(&base));
    let cs = cluster_size(&base).max(cluster_size(&f0));

    let opts = CommitOptions {
        base: explicit_base.clone(),
        keep_top: keep_top || explicit_base.is_some(),
        ..Default::default()
    };
    let r = measured("commit", exec.files_bytes, || {
        commit(&f0, &opts, &Progress::new(), &Cancel::new())
    });
    match r {
        Ok(done) => {
            assert_eq!(
                done.file_name().map(|n| n.to_string_lossy().into_owned()),
                Some(base_name.clone()),
                "commit: committed into an unexpected base"
            );
            let mut may_change = vec![base_name.as_str()];
            if !opts.keep_top {
                may_change.push("f0");
            }
            exec.assert_unchanged("commit", &before, &may_change, &[]);
            if let Some(want) = &top_view {
                let Some(now) = view(&f0, Some(Format::Qcow2)) else {
                    panic!("commit: the top cannot be read after a successful commit");
                };
                assert_same_view("commit: the top", want, &now);
                let Some(b) = view_prefix(&base, None, want.len() as u64) else {
                    panic!("commit: the base cannot be read (or is smaller than the top) after a successful commit");
                };
                assert_same_view("commit: the base", want, &b);
            }
            assert_still_consistent("commit: the top", &f0, pre_top);
            assert_still_consistent("commit: the base", &base, pre_base);
            // The base takes at most the top's disk, twice over (data and
            // zeros written as data in a v2 or raw base), and metadata.
            assert_growth("commit: the base", &base, base_len, 2 * top_size + 64 * cs);
            assert_growth("commit: the top", &f0, top_len, 16 * cs);
        }
        Err(e) => {
            assert_names_a_file("commit", &e, &exec);
            // The top is not touched until the base holds everything.
            exec.assert_unchanged("commit (failed)", &before, &[&base_name], &[]);
            if base.is_file() {
                assert_growth(
                    "commit (failed): the base",
                    &base,
                    base_len,
                    2 * top_size + 64 * cs,
                );
            }
        }
    }
}
