//! Decompression of compressed clusters: raw deflate (QEMU's "zlib") and
//! zstd frames. The input span may carry a neighbour's bytes after the
//! payload; decoding stops once a whole cluster is produced.

use flate2::{Decompress, FlushDecompress, Status};

use super::header::CompressionType;

/// Fill `out` (exactly one cluster) from `input`. `Err` carries a short reason.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate_raw(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = Decompress::new(false);
    loop {
        let (i, o) = (d.total_in() as usize, d.total_out() as usize);
        if o == out.len() {
            return Ok(());
        }
        let status = d
            .decompress(&input[i..], &mut out[o..], FlushDecompress::Finish)
            .map_err(|e| format!("deflate: {e}"))?;
        let progressed = d.total_in() as usize != i || d.total_out() as usize != o;
        match status {
            Status::StreamEnd if (d.total_out() as usize) < out.len() => {
                return Err("deflate stream ended before a whole cluster".into())
            }
            Status::StreamEnd => return Ok(()),
            _ if !progressed => return Err("deflate stream truncated".into()),
            _ => {}
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};
    let mut ctx = DCtx::create();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        ctx.decompress_stream(&mut outb, &mut inb)
            .map_err(|code| format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if (inb.pos(), outb.pos()) == before {
            return Err("zstd stream ended before a whole cluster".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_with_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAA; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Deflate, &c[..c.len() / 4], &mut out).is_err());
    }

    #[test]
    fn zstd_with_trailing_bytes() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0x55; 64]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &c[..8], &mut out).is_err());
    }
}
