//! Target `convert`: f0 (and its chain) converted by the selector's low
//! bits to raw, qcow2, qcow2 -c (zlib) or qcow2 -c (zstd), with a cluster
//! size from bits 2-3. The output reads as the source did and checks clean;
//! the source files do not change; an error leaves no output behind.

use crate::harness::{
    assert_names_a_file, assert_same_view, cluster_size, file_len, measured, view, Exec, Input,
    VIEW_BUDGET,
};
use cowshed::engine::qcow2::header::CompressionType;
use cowshed::engine::{
    check, convert, CacheMode, Cancel, Chain, ConvertOptions, CreateOptions, Format, Progress,
};

pub fn run(data: &[u8]) {
    let input = Input::parse(data);
    let exec = Exec::new(&input);
    let f0 = exec.path("f0");
    let out = exec.path("out");
    let mode = input.selector & 3;
    let cluster_size = [65536u64, 4096, 512, 2 << 20][usize::from((input.selector >> 2) & 3)];
    // Converting a huge empty disk takes time, not metadata.
    if Chain::open(&f0, None).is_ok_and(|c| c.virtual_size() > VIEW_BUDGET) {
        return;
    }
    let opts = ConvertOptions {
        target: CreateOptions {
            format: if mode == 0 {
                Format::Raw
            } else {
                Format::Qcow2
            },
            cluster_size,
            compression: if mode == 3 {
                CompressionType::Zstd
            } else {
                CompressionType::Deflate
            },
            ..CreateOptions::default()
        },
        compress: mode >= 2,
        // No fsync: durability is not what this target looks at.
        cache: CacheMode::Unsafe,
        ..ConvertOptions::default()
    };
    let before = exec.fingerprints();
    let view0 = view(&f0, None);
    let r = measured("convert", exec.files_bytes, || {
        convert(&f0, &out, &opts, &Progress::new(), &Cancel::new())
    });
    let what = format!("convert mode {mode}, {cluster_size}-byte clusters");
    match r {
        Ok(()) => {
            exec.assert_unchanged(&what, &before, &[], &["out"]);
            let fmt = if mode == 0 {
                Format::Raw
            } else {
                Format::Qcow2
            };
            let Some(want) = &view0 else {
                return;
            };
            let Some(got) = view(&out, Some(fmt)) else {
                panic!("{what}: the output cannot be read");
            };
            // qcow2 sizes are whole sectors.
            let got = if got.len() > want.len() && got[want.len()..].iter().all(|&b| b == 0) {
                &got[..want.len()]
            } else {
                &got[..]
            };
            assert_same_view(&what, want, got);
            if mode != 0 {
                match check(&out, Some(Format::Qcow2)) {
                    Ok(c) => assert_eq!(
                        c.exit_code(),
                        0,
                        "{what}: the output does not check clean: {:?}",
                        c.findings.iter().take(5).collect::<Vec<_>>()
                    ),
                    Err(e) => panic!("{what}: the output cannot be checked: {e}"),
                }
            }
            let cs = cluster_size.max(self::cluster_size(&out));
            let bound = 2 * want.len() as u64 + 64 * cs + 4096;
            assert!(
                file_len(&out) <= bound,
                "{what}: a {}-byte output for a {}-byte disk",
                file_len(&out),
                want.len()
            );
        }
        Err(e) => {
            assert_names_a_file(&what, &e, &exec);
            exec.assert_unchanged(&what, &before, &[], &[]);
        }
    }
}
