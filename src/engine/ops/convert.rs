//! `convert`: flatten a whole chain into a new image. This file holds what
//! every output format shares (options, the temporary output file, zero
//! detection) and the raw output; `convert_qcow2` writes qcow2.
//!
//! The output is written to a temporary file beside the destination and
//! renamed into place only when complete, so an interrupted convert leaves
//! no partial destination; the temporary file is removed on error and on
//! cancel (a SIGKILL can leave it behind, under a name that says what it is).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tempfile::NamedTempFile;

use crate::engine::buf::AlignedBuf;
use crate::engine::chain::Chain;
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::Format;
use crate::engine::ops::create::CreateOptions;
use crate::engine::preflight::{self, DestinationClaim, ReplaceOptions};
use crate::engine::progress::{Cancel, Progress};

/// Durability of the output, as qemu-img's `-t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Flush the data (and the rename) before returning.
    #[default]
    Writeback,
    /// No flush: the page cache writes it back later (qemu-img convert's own
    /// default).
    Unsafe,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub src_format: Option<Format>,
    pub cache: CacheMode,
    /// Output format and, for qcow2, its creation options (`-O`, `-o`,
    /// `-B` as `backing`, `-F` as `backing_format`). `size` is ignored: the
    /// output has the source's size.
    pub target: CreateOptions,
    /// `-c`: compress every cluster that shrinks (qcow2 only).
    pub compress: bool,
    /// `-S`: zero runs at least this long are not written; 0 writes
    /// everything. Rounded down to 512-byte sectors.
    pub min_sparse: u64,
    /// An existing destination is replaced (as by qemu-img) after the
    /// checks of [`preflight::claim_destination`]; `None`: an existing
    /// destination is refused, even if it appears while converting.
    pub replace: Option<ReplaceOptions>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            src_format: None,
            cache: CacheMode::default(),
            target: CreateOptions {
                format: Format::Raw,
                ..CreateOptions::default()
            },
            compress: false,
            min_sparse: ZERO_GRAIN as u64,
            replace: Some(ReplaceOptions::default()),
        }
    }
}

/// `qemu-img convert`: the output format is `opts.target.format`.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    match opts.target.format {
        Format::Raw => {
            let bad = |m: &str| Err(Error::invalid(dst, m.to_string()));
            if opts.compress {
                return bad("Compression not supported for this file format");
            }
            if opts.target.backing.is_some() {
                return bad("raw output cannot have a backing file (-B)");
            }
            convert_to_raw(src, dst, opts, progress, cancel)
        }
        Format::Qcow2 => super::convert_qcow2::convert_to_qcow2(src, dst, opts, progress, cancel),
        Format::Other(o) => Err(Error::UnsupportedFormat {
            path: dst.to_path_buf(),
            format: o.name(),
        }),
    }
}

/// The output under construction: a temporary file beside the destination,
/// removed when dropped unless `persist` renamed it into place.
pub(crate) struct TempOutput {
    tmp: NamedTempFile,
    dir: PathBuf,
    dst: PathBuf,
}

impl TempOutput {
    pub(crate) fn new(dst: &Path) -> Result<Self> {
        let dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dst
            .file_name()
            .ok_or_else(|| Error::invalid(dst, "destination has no file name"))?;
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.cowshed-tmp-", name.to_string_lossy()))
            // 0666 less the umask, like any new file (tempfile's default is 0600).
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(dir)
            .at(dst)?;
        Ok(TempOutput {
            tmp,
            dir: dir.to_path_buf(),
            dst: dst.to_path_buf(),
        })
    }

    pub(crate) fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// Rename into place, unless cancel was requested; with `Writeback`,
    /// flush the data first and the directory after. An existing DST is
    /// replaced only when `opts.replace` says so (and then it was claimed).
    pub(crate) fn persist(self, opts: &ConvertOptions, cancel: &Cancel) -> Result<()> {
        let cache = opts.cache;
        cancel.check()?;
        if cache == CacheMode::Writeback {
            self.tmp.as_file().sync_data().at(&self.dst)?;
        }
        fault::point("convert.before_rename");
        let TempOutput { tmp, dir, dst } = self;
        if opts.replace.is_some() {
            tmp.persist(&dst).map_err(|e| Error::io(&dst, e.error))?;
        } else {
            tmp.persist_noclobber(&dst)
                .map_err(|e| Error::io(&dst, e.error))?;
        }
        fault::point("convert.renamed");
        if cache == CacheMode::Writeback {
            File::open(&dir).and_then(|d| d.sync_all()).at(&dir)?;
        }
        Ok(())
    }
}

/// Bytes moved per read/write. Measured on the 2 GiB fixture: 4 MiB chunks
/// made the kernel's copy into the page cache 3x slower per byte (the
/// buffers in flight no longer fit in cache); 256 KiB to 2 MiB are equally
/// fast. Small enough that cancel is seen within a few ms.
const CHUNK: usize = 1 << 20;
/// qemu-img's default `-S`: runs of zeros this long are left as holes.
const ZERO_GRAIN: usize = 4096;
/// Buffers in flight between the reading and the writing thread.
const BUFFERS: usize = 4;

pub fn convert_to_raw(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let chain = Chain::open(src, opts.src_format)?;
    let _claim = claim_destination(dst, &[&chain], opts)?;
    let size = chain.virtual_size();
    crate::engine::space::ensure_fits(dst, data_bytes(&chain, cancel)?)?;
    progress.set_total(size);

    let tmp = TempOutput::new(dst)?;
    let out = tmp.file();
    out.set_len(size).at(dst)?;

    copy_pipelined(&chain, out, dst, opts.min_sparse, progress, cancel)?;
    tmp.persist(opts, cancel)
}

/// What the chain provides as data: at most what a sparse copy allocates.
fn data_bytes(chain: &Chain, cancel: &Cancel) -> Result<u64> {
    let size = chain.virtual_size();
    let (mut pos, mut data) = (0u64, 0u64);
    while pos < size {
        cancel.check()?;
        let st = chain.block_status(pos, size - pos)?;
        if st.data {
            data += st.length;
        }
        pos += st.length;
    }
    Ok(data)
}

/// Read on this thread, write on another: reads from the page cache and
/// writes into it each keep one core busy.
fn copy_pipelined(
    chain: &Chain,
    out: &File,
    dst: &Path,
    min_sparse: u64,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<()> {
    let size = chain.virtual_size();
    // -S counts whole sectors, as in qemu-img.
    let grain = (min_sparse / 512 * 512) as usize;
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, AlignedBuf, usize)>(BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    for _ in 0..BUFFERS {
        // The channel lives as long as free_rx, which is in scope.
        let _ = free_tx.send(AlignedBuf::zeroed(CHUNK));
    }
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> Result<()> {
            for (offset, buf, len) in full_rx {
                write_skipping_zeros(out, dst, &buf[..len], offset, grain)?;
                if free_tx.send(buf).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let read = (|| -> Result<()> {
            let mut pos = 0u64;
            while pos < size {
                cancel.check()?;
                let st = chain.block_status(pos, (size - pos).min(CHUNK as u64))?;
                // -S 0 writes zeros too: the output is fully allocated.
                if st.data || min_sparse == 0 {
                    // Err: the writer stopped; its own error is reported.
                    let Ok(mut buf) = free_rx.recv() else {
                        return Ok(());
                    };
                    let len = st.length as usize;
                    poison_reused(&mut buf[..len]);
                    chain.read_extent(&st, &mut buf[..len])?;
                    if st.data {
                        progress.add_copied(st.length);
                    }
                    if full_tx.send((pos, buf, len)).is_err() {
                        return Ok(());
                    }
                    fault::point("convert.raw.batch");
                }
                pos += st.length;
                progress.advance(st.length);
            }
            Ok(())
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::invalid(dst, "writer thread panicked")));
        read.and(written)
    })
}

/// Write `data` at `offset`, leaving aligned all-zero blocks of `grain`
/// bytes as holes (the file was just extended, so holes read as zeros);
/// `grain` 0 writes everything.
fn write_skipping_zeros(
    out: &File,
    path: &Path,
    data: &[u8],
    offset: u64,
    grain: usize,
) -> Result<()> {
    if grain == 0 {
        return out.write_all_at(data, offset).at(path);
    }
    let mut run_start: Option<usize> = None;
    let mut i = 0usize;
    // Align grains to the guest offset so holes fall on block boundaries.
    let first = grain - (offset as usize % grain);
    let mut grain_end = first.min(data.len());
    while i < data.len() {
        let block = &data[i..grain_end];
        let zero = block.len() == grain && is_zero(block);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                out.write_all_at(&data[s..i], offset + s as u64).at(path)?;
                run_start = None;
            }
            _ => {}
        }
        i = grain_end;
        grain_end = (grain_end + grain).min(data.len());
    }
    if let Some(s) = run_start {
        out.write_all_at(&data[s..], offset + s as u64).at(path)?;
    }
    Ok(())
}

/// Debug builds (the tests) fill a reused buffer with a pattern before it is
/// refilled, so a path that hands the writer bytes it never defined writes
/// the pattern, which a guest-view comparison sees at once, instead of a
/// stale copy of some earlier data that may happen to look right.
pub(crate) fn poison_reused(buf: &mut [u8]) {
    if cfg!(debug_assertions) {
        buf.fill(0xa5);
    }
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    // Data is rarely zero: look at the first bytes before scanning it all.
    if b.iter().take(16).any(|&x| x != 0) {
        return false;
    }
    // OR-fold without early exit over a 4 KiB grain: vectorises well.
    let words = b.chunks_exact(16);
    let tail = words.remainder().iter().fold(0u8, |a, &x| a | x);
    let acc = words.fold(0u128, |a, w| {
        let mut x = [0u8; 16];
        x.copy_from_slice(w);
        a | u128::from_ne_bytes(x)
    });
    acc == 0 && tail == 0
}

/// The checks before a destination is written (see
/// [`preflight::claim_destination`]); with `opts.replace` unset, an
/// existing destination is refused outright.
pub(crate) fn claim_destination(
    dst: &Path,
    sources: &[&Chain],
    opts: &ConvertOptions,
) -> Result<DestinationClaim> {
    match &opts.replace {
        Some(r) => preflight::claim_destination(dst, sources, r),
        None if dst.symlink_metadata().is_ok() => Err(Error::invalid(
            dst,
            "already exists; choose another name (nothing was written)",
        )),
        None => preflight::claim_destination(dst, sources, &ReplaceOptions::default()),
    }
}
