//! `compare`: do two images show the guest the same bytes? Walks both
//! chains by block status as `qemu-img compare` does (QEMU 10's
//! `img_compare`), so it answers the same question with the same offsets:
//! ranges that read as zeros in both are skipped unread; where both hold
//! data, or only one does, the first 512-byte sector that differs is
//! reported (QEMU 10 rounds a lone non-zero byte down to its sector too). A longer image's tail must read as zeros
//! unless strict mode asks for equal sizes.
//!
//! Beyond qemu-img: a range both chains answer from the same file at the
//! same place (an overlay compared with its own base, where the overlay
//! does not allocate) is equal without being read.

use std::os::unix::fs::MetadataExt;

use crate::engine::buf::AlignedBuf;
use crate::engine::chain::{BlockStatus, Chain};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::progress::{Cancel, Progress};

/// QEMU's IO_BUF_SIZE: the most read from each side at once.
const CHUNK: u64 = 2 << 20;
const SECTOR: usize = 512;
/// What is read of each side before comparing: two pieces fit a core's L2.
const PIECE: u64 = 256 << 10;

#[derive(Debug, Clone, Copy, Default)]
pub struct CompareOptions {
    /// qemu-img's `-s`: images of different sizes, or whose block status
    /// differs anywhere (allocated, zero, data, at the end of the image),
    /// differ even where their bytes are equal.
    pub strict: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Identical,
    /// The guest reads different bytes from this offset on.
    ContentMismatch(u64),
    /// Strict mode: the virtual sizes differ.
    SizeMismatch,
    /// Strict mode: the block status differs in the range starting here.
    StatusMismatch(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub verdict: Verdict,
    /// The sizes differ (not strict): the longer tail was checked against
    /// zeros, as far as the comparison went.
    pub sizes_differ: bool,
}

/// What failed, for qemu-img's exit codes (3: block status, 4: read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Status,
    Read,
}

#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct CompareError {
    pub stage: Stage,
    #[source]
    pub source: Error,
}

type Outcome<T> = std::result::Result<T, CompareError>;

fn at(stage: Stage) -> impl Fn(Error) -> CompareError {
    move |source| CompareError { stage, source }
}

/// Compare the guest views of `a` and `b`.
pub fn compare(
    a: &Chain,
    b: &Chain,
    opts: CompareOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Outcome<Comparison> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    let sizes_differ = size_a != size_b;
    let done = |verdict| {
        Ok(Comparison {
            verdict,
            sizes_differ,
        })
    };
    if opts.strict && sizes_differ {
        return done(Verdict::SizeMismatch);
    }
    let common = size_a.min(size_b);
    progress.set_total(size_a.max(size_b));
    let sides = [
        Side::new(a).map_err(at(Stage::Status))?,
        Side::new(b).map_err(at(Stage::Status))?,
    ];
    let mut bufs = [
        AlignedBuf::zeroed(CHUNK as usize),
        AlignedBuf::zeroed(CHUNK as usize),
    ];
    let mut pos = 0;
    while pos < common {
        cancel.check().map_err(at(Stage::Read))?;
        let sa = a
            .block_status(pos, size_a - pos)
            .map_err(at(Stage::Status))?;
        let sb = b
            .block_status(pos, size_b - pos)
            .map_err(at(Stage::Status))?;
        let mut len = sa.length.min(sb.length).min(common - pos);
        if opts.strict && status_word(&sa, size_a) != status_word(&sb, size_b) {
            return done(Verdict::StatusMismatch(pos));
        }
        if sa.zero && sb.zero {
            // Nothing to read: both read zeros.
        } else if sa.present == sb.present {
            // Both unallocated throughout their chains read zeros too.
            if sa.present && !sides[0].same_bytes(&sa, &sides[1], &sb) {
                len = len.min(CHUNK);
                let [ba, bb] = &mut bufs;
                let (ba, bb) = (&mut ba[..len as usize], &mut bb[..len as usize]);
                // Piece by piece, so both pieces are still in this core's
                // cache when they are compared (two reader threads cost
                // more CPU than they saved, and lost on a busy machine).
                let mut at = 0;
                while at < len {
                    let n = PIECE.min(len - at);
                    let (pa, pb) = (
                        &mut ba[at as usize..][..n as usize],
                        &mut bb[at as usize..][..n as usize],
                    );
                    read(a, &part(&sa, at, n), pa)?;
                    read(b, &part(&sb, at, n), pb)?;
                    if let Some(sector) = first_different_sector(pa, pb) {
                        return done(Verdict::ContentMismatch(
                            pos + at + (sector * SECTOR) as u64,
                        ));
                    }
                    at += n;
                }
            }
        } else {
            len = len.min(CHUNK);
            let (chain, st) = if sa.present { (a, &sa) } else { (b, &sb) };
            let buf = &mut bufs[0][..len as usize];
            read(chain, &part(st, 0, len), buf)?;
            if let Some(i) = first_nonzero(buf) {
                return done(Verdict::ContentMismatch(pos + (i / SECTOR * SECTOR) as u64));
            }
        }
        pos += len;
        progress.advance(len);
    }
    if sizes_differ {
        let (longer, size) = if size_a > size_b {
            (a, size_a)
        } else {
            (b, size_b)
        };
        while pos < size {
            cancel.check().map_err(at(Stage::Read))?;
            let st = longer
                .block_status(pos, size - pos)
                .map_err(at(Stage::Status))?;
            let mut len = st.length;
            if st.present && !st.zero {
                len = len.min(CHUNK);
                let buf = &mut bufs[0][..len as usize];
                read(longer, &part(&st, 0, len), buf)?;
                if let Some(i) = first_nonzero(buf) {
                    return done(Verdict::ContentMismatch(pos + (i / SECTOR * SECTOR) as u64));
                }
            }
            pos += len;
            progress.advance(len);
        }
    }
    done(Verdict::Identical)
}

/// Read the guest bytes `st` covers into `buf` (its length).
fn read(chain: &Chain, st: &BlockStatus, buf: &mut [u8]) -> Outcome<()> {
    chain.read_extent(st, buf).map_err(at(Stage::Read))
}

/// `len` bytes of `st`, `skip` bytes in.
fn part(st: &BlockStatus, skip: u64, len: u64) -> BlockStatus {
    BlockStatus {
        start: st.start + skip,
        length: len,
        offset: st.offset.map(|o| o + skip),
        ..*st
    }
}

/// The bits of QEMU's block status word that strict mode compares:
/// allocated, zero, data, offset valid, and whether the range reaches the
/// end of the image.
fn status_word(st: &BlockStatus, size: u64) -> (bool, bool, bool, bool, bool) {
    (
        st.present,
        st.zero,
        st.data,
        st.offset.is_some(),
        st.start + st.length == size,
    )
}

/// Index of the first 512-byte sector that differs (QEMU's
/// `compare_buffers` granularity).
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<usize> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    // OR-folding fixed blocks vectorises; only the block with a set bit is
    // searched byte by byte.
    let block = buf
        .chunks(64)
        .position(|c| c.iter().fold(0u8, |acc, &b| acc | b) != 0)?;
    let from = block * 64;
    buf[from..].iter().position(|&b| b != 0).map(|i| from + i)
}

/// Where a chain's data bytes come from, per layer: the file data host
/// offsets point into (its own, or an external data file).
struct Side {
    files: Vec<Option<(u64, u64)>>,
}

impl Side {
    fn new(chain: &Chain) -> Result<Side> {
        let files = chain
            .layers()
            .iter()
            .map(|l| {
                let f = l.image.data_file()?;
                let m = f.metadata().at(&l.path)?;
                Ok(Some((m.dev(), m.ino())))
            })
            .collect::<Result<_>>()?;
        Ok(Side { files })
    }

    /// Both statuses read uncompressed data from the same place of the
    /// same file.
    fn same_bytes(&self, st: &BlockStatus, other: &Side, other_st: &BlockStatus) -> bool {
        st.data
            && other_st.data
            && !st.compressed
            && !other_st.compressed
            && st.offset.is_some()
            && st.offset == other_st.offset
            && self.files[st.depth].is_some()
            && self.files[st.depth] == other.files[other_st.depth]
    }
}
