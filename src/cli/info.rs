//! `cowshed info`: qemu-img info's fields (same JSON names), plus our own
//! under names qemu-img does not use (`apparent-size`, `lock-state`,
//! `backing-format-recorded`, `backing-format-probed`).

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Map, Value};

use super::{display, human_size, parse_format, Output};
use crate::engine::chain::FormatSource;
use crate::engine::ops::info::{ImageInfo, Qcow2Info};
use crate::engine::qcow2::header::CryptMethod;
use crate::engine::{self, Format};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Also show every image under FILE in its backing chain (top first).
    #[arg(long)]
    backing_chain: bool,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Accepted for qemu-img compatibility: cowshed never locks images it
    /// only reads, so it always works next to a running QEMU.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// One or more images. With several, JSON output is an array (of arrays
    /// with --backing-chain).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(a: InfoArgs) -> color_eyre::Result<i32> {
    let _ = a.force_share;
    let mut json_out = Vec::new();
    let mut failed = 0;
    let many = a.files.len() > 1;
    for (i, file) in a.files.iter().enumerate() {
        let result = if a.backing_chain {
            engine::info_chain(file, a.format)
        } else {
            engine::info(file, a.format).map(|i| vec![i])
        };
        let infos = match result {
            Ok(v) => v,
            Err(e) if many => {
                eprintln!("cowshed: {e}");
                failed += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match a.output {
            Output::Json => {
                let values: Vec<Value> = infos.iter().map(to_json).collect();
                json_out.push(if a.backing_chain {
                    Value::Array(values)
                } else {
                    values.into_iter().next().unwrap_or(Value::Null)
                });
            }
            Output::Human => {
                if i > 0 {
                    println!();
                }
                for (j, info) in infos.iter().enumerate() {
                    if j > 0 {
                        println!();
                    }
                    print!("{}", to_human(info));
                }
            }
        }
    }
    if a.output == Output::Json {
        let doc = if many {
            Value::Array(json_out)
        } else {
            json_out.into_iter().next().unwrap_or(Value::Null)
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn to_json(i: &ImageInfo) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(display(&i.filename)));
    m.insert("format".into(), json!(i.format.name()));
    m.insert("virtual-size".into(), json!(i.virtual_size));
    m.insert("actual-size".into(), json!(i.actual_size));
    m.insert(
        "dirty-flag".into(),
        json!(i.qcow2.as_ref().is_some_and(|q| q.dirty)),
    );
    m.insert(
        "children".into(),
        json!([{
            "name": "file",
            "info": {
                "children": [],
                "virtual-size": i.apparent_size.next_multiple_of(512),
                "filename": display(&i.filename),
                "format": "file",
                "actual-size": i.actual_size,
                "format-specific": {"type": "file", "data": {}},
                "dirty-flag": false,
            }
        }]),
    );
    if let Some(q) = &i.qcow2 {
        qcow2_json(&mut m, q);
    }
    m.insert("apparent-size".into(), json!(i.apparent_size));
    m.insert("lock-state".into(), json!(i.lock.name()));
    if i.format_source == FormatSource::Probed {
        m.insert("format-probed".into(), json!(true));
    }
    Value::Object(m)
}

fn qcow2_json(m: &mut Map<String, Value>, q: &Qcow2Info) {
    m.insert("cluster-size".into(), json!(q.cluster_size));
    if let Some(b) = &q.backing_filename {
        m.insert("backing-filename".into(), json!(b));
        if let Some(full) = &q.full_backing_filename {
            m.insert("full-backing-filename".into(), json!(display(full)));
        }
        m.insert(
            "backing-format-recorded".into(),
            json!(q.backing_format.is_some()),
        );
    }
    if let Some(f) = &q.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    if !q.snapshots.is_empty() {
        let snaps: Vec<Value> = q
            .snapshots
            .iter()
            .map(super::snapshot::snapshot_json)
            .collect();
        m.insert("snapshots".into(), Value::Array(snaps));
    }
    if q.encryption != CryptMethod::None {
        m.insert("encrypted".into(), json!(true));
    }
    let mut data = Map::new();
    data.insert("compat".into(), json!(q.compat()));
    data.insert("compression-type".into(), json!(q.compression_type.name()));
    if q.version >= 3 {
        data.insert("lazy-refcounts".into(), json!(q.lazy_refcounts));
    }
    data.insert("refcount-bits".into(), json!(q.refcount_bits));
    if q.version >= 3 {
        if !q.bitmaps.is_empty() {
            let bitmaps: Vec<Value> = q
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.in_use {
                        flags.push("in-use");
                    }
                    if b.auto {
                        flags.push("auto");
                    }
                    json!({"flags": flags, "name": b.name, "granularity": b.granularity})
                })
                .collect();
            data.insert("bitmaps".into(), Value::Array(bitmaps));
        }
        if let Some(df) = &q.data_file {
            data.insert("data-file".into(), json!(df));
            data.insert("data-file-raw".into(), json!(q.data_file_raw));
        }
        if q.encryption == CryptMethod::Luks {
            data.insert("encrypt".into(), json!({"format": "luks"}));
        }
        data.insert("corrupt".into(), json!(q.corrupt));
        data.insert("extended-l2".into(), json!(q.extended_l2));
    }
    m.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": data}),
    );
}

fn to_human(i: &ImageInfo) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", display(&i.filename));
    let _ = writeln!(s, "file format: {}", i.format.name());
    let _ = writeln!(
        s,
        "virtual size: {} ({} bytes)",
        human_size(i.virtual_size),
        i.virtual_size
    );
    let _ = writeln!(s, "disk size: {}", human_size(i.actual_size));
    let _ = writeln!(s, "apparent size: {}", human_size(i.apparent_size));
    if let Some(q) = &i.qcow2 {
        if q.encryption != CryptMethod::None {
            let _ = writeln!(s, "encrypted: yes ({})", q.encryption.name());
        }
        let _ = writeln!(s, "cluster_size: {}", q.cluster_size);
        if let Some(b) = &q.backing_filename {
            match &q.full_backing_filename {
                Some(full) if display(full) != *b => {
                    let _ = writeln!(s, "backing file: {b} (actual path: {})", display(full));
                }
                _ => {
                    let _ = writeln!(s, "backing file: {b}");
                }
            }
            match &q.backing_format {
                Some(f) => {
                    let _ = writeln!(s, "backing file format: {f}");
                }
                None => {
                    let _ = writeln!(
                        s,
                        "backing file format: not recorded (probed on open; record it with \
                         `qemu-img rebase -u -b {b} -F FMT`)"
                    );
                }
            }
        }
        if !q.snapshots.is_empty() {
            s.push_str(&String::from_utf8_lossy(&super::snapshot::snapshot_table(
                &q.snapshots,
            )));
        }
        let _ = writeln!(s, "Format specific information:");
        let _ = writeln!(s, "    compat: {}", q.compat());
        let _ = writeln!(s, "    compression type: {}", q.compression_type.name());
        if q.version >= 3 {
            let _ = writeln!(s, "    lazy refcounts: {}", q.lazy_refcounts);
        }
        let _ = writeln!(s, "    refcount bits: {}", q.refcount_bits);
        if q.version >= 3 {
            for b in &q.bitmaps {
                let _ = writeln!(s, "    bitmap: {} (granularity {})", b.name, b.granularity);
            }
            if let Some(df) = &q.data_file {
                let _ = writeln!(s, "    data file: {df}");
                let _ = writeln!(s, "    data file raw: {}", q.data_file_raw);
            }
            let _ = writeln!(s, "    corrupt: {}", q.corrupt);
            let _ = writeln!(s, "    extended l2: {}", q.extended_l2);
        }
        if q.dirty {
            let _ = writeln!(
                s,
                "dirty: yes (refcounts may be stale; `qemu-img check -r all` repairs)"
            );
        }
    }
    let _ = writeln!(
        s,
        "in use: {}",
        match i.lock {
            engine::LockState::None => "no",
            engine::LockState::Reader => "read by a QEMU process",
            engine::LockState::Writer => "written by a QEMU process",
        }
    );
    if i.format_source == FormatSource::Probed {
        let _ = writeln!(s, "format: probed (the overlay above does not record it)");
    }
    s
}
