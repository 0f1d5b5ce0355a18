//! Sequential 1 MiB writes through cowshed's allocating writer into a fresh
//! qcow2 (made by cowshed create), flushed at the end: the counterpart of
//! `qemu-img bench -w -s 1M -c N -d 1 -t writeback` for benches/compare.py.
//!
//! usage: bench_write IMAGE COUNT   (IMAGE must not exist; prints seconds)

use std::time::Instant;

use cowshed::engine::qcow2::Qcow2Writer;
use cowshed::engine::{create, CreateOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().ok_or("usage: bench_write IMAGE COUNT")?);
    let count: u64 = args
        .next()
        .ok_or("usage: bench_write IMAGE COUNT")?
        .parse()?;
    const MIB: u64 = 1 << 20;
    create(
        &path,
        &CreateOptions {
            size: Some(count * MIB),
            ..CreateOptions::default()
        },
    )?;
    let buf = vec![0xa5u8; MIB as usize];
    let start = Instant::now();
    let mut w = Qcow2Writer::open(&path)?;
    for i in 0..count {
        w.write(&buf, i * MIB)?;
    }
    w.flush()?;
    println!("{:.6}", start.elapsed().as_secs_f64());
    Ok(())
}
