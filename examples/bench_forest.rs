//! Benchmark helper for `benches/scan_live.py`: where the catalog's time
//! goes on a large fleet, piece by piece, in one process.
//!
//! - `scan_all` (the parallel walk + header probes, as `cowshed tree` runs it);
//! - `Forest::build` of a clone of all records: what the TUI's catalog
//!   worker does on every publish (at most every 100 ms while a scan streams
//!   or a file changes);
//! - inserting the records one by one with a linear search for the key, as
//!   the catalog worker's `upsert` does while a scan streams.
//!
//! usage: bench_forest ROOT... [--runs N]
//! Prints one JSON object on stdout (milliseconds).

use std::error::Error;
use std::path::PathBuf;
use std::time::Instant;

use cowshed::catalog::scan::scan_all;
use cowshed::catalog::{Forest, ImageRecord};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut roots = Vec::new();
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            _ => roots.push(PathBuf::from(a)),
        }
    }
    if roots.is_empty() {
        return Err("usage: bench_forest ROOT... [--runs N]".into());
    }
    let runs = runs.max(1);

    let _ = scan_all(&roots); // warm the cache
    let mut scan_ms = Vec::new();
    let mut records = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let (r, _) = scan_all(&roots);
        scan_ms.push(ms(t));
        records = r;
    }

    let mut build_ms = Vec::new();
    let mut nodes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let f = Forest::build(records.clone());
        build_ms.push(ms(t));
        nodes = f.nodes.len();
    }

    let mut clone_ms = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let c = records.clone();
        clone_ms.push(ms(t));
        drop(c);
    }

    // The worker's upsert while a scan streams: a linear search per record.
    let mut upsert_ms = Vec::new();
    for _ in 0..runs.min(3) {
        let t = Instant::now();
        let mut v: Vec<ImageRecord> = Vec::new();
        for r in records.iter().cloned() {
            match v.iter_mut().find(|x| x.key == r.key) {
                Some(slot) => *slot = r,
                None => v.push(r),
            }
        }
        upsert_ms.push(ms(t));
    }

    println!(
        "{{\"images\":{},\"nodes\":{},\"scan_all_ms\":{:.3},\"forest_build_ms\":{:.3},\"records_clone_ms\":{:.3},\"linear_upsert_all_ms\":{:.3},\"runs\":{}}}",
        records.len(),
        nodes,
        median(scan_ms),
        median(build_ms),
        median(clone_ms),
        median(upsert_ms),
        runs
    );
    Ok(())
}
