//! `cowshed check`: qemu-img check's verdict, counters, JSON and exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 no check for
//! this format).

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Map, Value};

use super::{display, parse_format, Output};
use crate::engine::{self, CheckReport, Format};

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Image format (qcow2 or raw); probed from the file's magic if absent.
    #[arg(short = 'f', value_parser = parse_format)]
    format: Option<Format>,
    /// Accepted for qemu-img compatibility: the check only reads and takes
    /// no lock.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Repair (takes QEMU's writer locks; refused while a QEMU holds the
    /// image): `leaks` lowers leaked clusters' refcounts; `all` also raises
    /// refcounts that are too low, fixes COPIED flags and rebuilds a broken
    /// refcount structure, as `qemu-img check -r all` does. Beyond qemu-img,
    /// on purpose: `leaks` writes nothing (exit 1) on an image with
    /// corruptions, since a "leaked" cluster may then be the one a corrupt
    /// entry was meant to point at; and `all` treats a refcount block said
    /// to lie past the end of the file as a broken structure, rebuilt for
    /// the clusters the file holds, never by growing the file to that
    /// offset (where qemu-img turns a hostile 13 KB image into a 210 GB
    /// file and takes gigabytes of memory).
    #[arg(short = 'r', value_parser = ["leaks", "all"])]
    repair: Option<String>,
    file: PathBuf,
}

impl CheckArgs {
    pub(super) fn file(&self) -> &std::path::Path {
        &self.file
    }

    pub(super) fn repairs(&self) -> bool {
        self.repair.is_some()
    }
}

pub fn run(a: CheckArgs) -> color_eyre::Result<i32> {
    let _ = a.force_share;
    let result = match a.repair.as_deref() {
        Some("all") => engine::check_repair_all(&a.file, a.format),
        Some(_) => engine::check_repair_leaks(&a.file, a.format),
        None => engine::check(&a.file, a.format),
    };
    let report = match result {
        Ok(r) => r,
        Err(e @ engine::Error::CheckUnsupported { .. }) => {
            eprintln!("cowshed: {e}");
            return Ok(63);
        }
        Err(e) => {
            if a.repair.is_some() {
                // What made the repair stop, as qemu-img lists it before
                // "Check failed" (a read-only check sees the same).
                if let Ok(r) = engine::check(&a.file, a.format) {
                    for f in &r.findings {
                        eprintln!("{f}");
                    }
                }
            }
            return Err(e.into());
        }
    };
    for f in &report.findings {
        eprintln!("{f}");
    }
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&to_json(&report))?),
        Output::Human => print!("{}", to_human(&report)),
    }
    Ok(report.exit_code())
}

fn to_json(r: &CheckReport) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(display(&r.filename)));
    m.insert("format".into(), json!(r.format));
    m.insert("check-errors".into(), json!(r.check_errors));
    // qemu-img leaves zero counters out.
    for (key, v) in [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("leaks-fixed", r.leaks_fixed),
        ("corruptions-fixed", r.corruptions_fixed),
    ] {
        if v > 0 {
            m.insert(key.into(), json!(v));
        }
    }
    Value::Object(m)
}

fn to_human(r: &CheckReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        let _ = writeln!(
            s,
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        let _ = writeln!(s, "No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            let _ = writeln!(
                s,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            let _ = writeln!(
                s,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            let _ = writeln!(
                s,
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        // As qemu-img: allocated of all, the others of the allocated.
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        let _ = writeln!(
            s,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    if r.image_end_offset > 0 {
        let _ = writeln!(s, "Image end offset: {}", r.image_end_offset);
    }
    s
}
