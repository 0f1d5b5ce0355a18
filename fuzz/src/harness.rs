//! What every fuzz target shares: the input's container format (several
//! sparse files and trailing bytes), the per-exec directory in tmpfs, the
//! counting allocator and its limits, file fingerprints, the guest-view
//! oracle and the confinement guard that keeps writing operations inside
//! the exec directory.
//!
//! The same file is compiled into the fuzz crate and, through `#[path]`,
//! into `tests/fuzz_regressions.rs`, so the committed regression cases are
//! replayed by plain `cargo test` through exactly these checks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use cowshed::engine::chain::{classify_backing, combine_path, data_file_path, BackingName};
use cowshed::engine::{info, Chain, Error, Format};

// ---------------------------------------------------------------------------
// Allocation limits.

/// The allocator every fuzz binary and the regression test install: counts
/// live bytes and the largest single request while an operation runs.
pub struct CountingAlloc;

static ARMED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

/// Never hand out more than this, whatever the limit of the exec: a request
/// this large already fails the check, and granting it could take the
/// machine's memory.
const REFUSE_ABOVE: usize = 1 << 30;

/// No single allocation may exceed this, whatever the input.
pub const HARD_SINGLE_LIMIT: usize = 256 << 20;

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
    if size > REFUSE_ABOVE {
        say_refused(size);
    }
}

/// Say why the process is about to abort (the allocation error handler
/// only gives the size), without allocating: we are inside the allocator.
fn say_refused(size: usize) {
    let mut buf = [0u8; 96];
    let head = b"fuzz harness: refused one allocation of ";
    let tail = b" bytes (the limit is 256 MiB)\n";
    buf[..head.len()].copy_from_slice(head);
    let mut digits = [0u8; 20];
    let mut n = size;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut at = head.len();
    buf[at..at + digits.len() - i].copy_from_slice(&digits[i..]);
    at += digits.len() - i;
    buf[at..at + tail.len()].copy_from_slice(tail);
    at += tail.len();
    // SAFETY: writing an initialised buffer to stderr.
    unsafe { libc::write(2, buf.as_ptr().cast(), at) };
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    if ARMED.load(Ordering::Relaxed) {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

fn shrank(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        if layout.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        if new_size > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

/// Run `op` with the allocator watching; fail when one allocation is larger
/// than the files justify (an offset or size read from them was trusted) or
/// than [`HARD_SINGLE_LIMIT`].
pub fn measured<T>(what: &str, files_bytes: u64, op: impl FnOnce() -> T) -> T {
    // Legitimate buffers: one L1 table (QEMU's limit, 32 MiB), a refcount
    // table (8 MiB), a few clusters of 2 MiB, batch buffers; and what is
    // proportional to the files themselves.
    let limit = ((48u64 << 20) + 16 * files_bytes).min(HARD_SINGLE_LIMIT as u64) as usize;
    let peak_limit = ((192u64 << 20) + 32 * files_bytes) as usize;
    LARGEST.store(0, Ordering::Relaxed);
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
    let base = LIVE.load(Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let out = op();
    ARMED.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        largest <= limit,
        "{what}: one allocation of {largest} bytes (limit {limit} for {files_bytes} bytes of files)"
    );
    assert!(
        peak <= peak_limit,
        "{what}: {peak} bytes live at once (limit {peak_limit} for {files_bytes} bytes of files)"
    );
    out
}

// ---------------------------------------------------------------------------
// The input: a few sparse files and trailing bytes.
//
// selector:u8 nfiles:u8 { len:u32 nchunks:u16 { offset:u32 n:u16 bytes[n] }* }*
// rest...   (little-endian; a truncated input just ends early)

/// Files are clamped to this length (sparse in tmpfs, so cheap).
pub const MAX_FILE: u64 = 64 << 20;
/// At most this many files: f0 (the image), f1, f2.
pub const MAX_FILES: usize = 3;

pub struct Input<'a> {
    pub selector: u8,
    pub files: Vec<SparseFile<'a>>,
    /// What follows the files: operations for the writer target.
    pub rest: &'a [u8],
}

pub struct SparseFile<'a> {
    pub len: u64,
    pub chunks: Vec<(u64, &'a [u8])>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.pos.min(self.data.len())..]
    }
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Input<'a> {
        let mut r = Reader { data, pos: 0 };
        let selector = r.u8().unwrap_or(0);
        let nfiles = (r.u8().unwrap_or(1) as usize % (MAX_FILES + 1)).max(1);
        let mut files = Vec::new();
        'files: for _ in 0..nfiles {
            let Some(len) = r.u32() else { break };
            let mut f = SparseFile {
                len: u64::from(len).min(MAX_FILE),
                chunks: Vec::new(),
            };
            let nchunks = r.u16().unwrap_or(0);
            for _ in 0..nchunks {
                let (Some(off), Some(n)) = (r.u32(), r.u16()) else {
                    files.push(f);
                    break 'files;
                };
                let bytes = match r.take(n as usize) {
                    Some(b) => b,
                    None => {
                        let b = r.rest();
                        r.pos = data.len();
                        b
                    }
                };
                let off = u64::from(off);
                if off < MAX_FILE {
                    let n = (bytes.len() as u64).min(MAX_FILE - off) as usize;
                    f.chunks.push((off, &bytes[..n]));
                }
            }
            files.push(f);
        }
        Input {
            selector,
            files,
            rest: r.rest(),
        }
    }

    /// Bytes the files hold on disk (chunks), what allocation limits scale
    /// with; and their lengths.
    pub fn files_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| f.chunks.iter().map(|c| c.1.len() as u64).sum::<u64>() + f.len.min(1 << 20))
            .sum()
    }
}

// ---------------------------------------------------------------------------
// The exec directory.

static SERIAL: Mutex<()> = Mutex::new(());

/// One execution: its files written into a fresh directory in tmpfs, the
/// process's working directory set to it (external data file names are
/// relative to it, as in QEMU), everything serialized (the allocator counts
/// for the whole process).
pub struct Exec {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub files_bytes: u64,
    old_cwd: Option<PathBuf>,
    _serial: MutexGuard<'static, ()>,
}

fn exec_root() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("cowshed-fuzz-{}", std::process::id()))
}

impl Exec {
    pub fn new(input: &Input) -> Exec {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = exec_root();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("exec directory");
        let dir = dir.canonicalize().expect("exec directory");
        let mut files = Vec::new();
        for (i, f) in input.files.iter().enumerate() {
            let path = dir.join(format!("f{i}"));
            let file = File::create(&path).expect("create input file");
            for &(off, bytes) in &f.chunks {
                file.write_all_at(bytes, off).expect("write input file");
            }
            let end = f
                .chunks
                .iter()
                .map(|&(o, b)| o + b.len() as u64)
                .max()
                .unwrap_or(0);
            file.set_len(f.len.max(end)).expect("size input file");
            files.push(path);
        }
        let old_cwd = std::env::current_dir().ok();
        std::env::set_current_dir(&dir).expect("enter exec directory");
        Exec {
            dir,
            files,
            files_bytes: input.files_bytes(),
            old_cwd,
            _serial: serial,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Fingerprints of every file in the directory, by name.
    pub fn fingerprints(&self) -> Vec<(String, Fingerprint)> {
        let mut v: Vec<_> = fs::read_dir(&self.dir)
            .expect("list exec directory")
            .filter_map(|e| e.ok())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, Fingerprint::of(&e.path()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every file but `except` is as `before` recorded it (and no file
    /// appeared but those in `may_appear`).
    pub fn assert_unchanged(
        &self,
        what: &str,
        before: &[(String, Fingerprint)],
        except: &[&str],
        may_appear: &[&str],
    ) {
        let after = self.fingerprints();
        for (name, fp) in before {
            if except.contains(&name.as_str()) {
                continue;
            }
            let now = after.iter().find(|(n, _)| n == name).map(|(_, f)| f);
            assert!(
                now == Some(fp),
                "{what}: {name} changed ({fp:?} -> {now:?}) though it must not"
            );
        }
        for (name, _) in &after {
            let known = before.iter().any(|(n, _)| n == name);
            assert!(
                known || may_appear.contains(&name.as_str()),
                "{what}: {name} appeared in the directory"
            );
        }
    }

    /// Every backing and data-file name of every file here leads back into
    /// this directory (or nowhere): only then may a writing operation run,
    /// since a mutated name could otherwise make it write into any file of
    /// the machine.
    pub fn confined(&self) -> bool {
        for f in &self.files {
            let Ok(i) = info(f, None) else { continue };
            let Some(q) = i.qcow2 else { continue };
            if let Some(name) = &q.backing_filename {
                if let BackingName::Path(p) = classify_backing(f, name) {
                    if !self.inside_or_absent(&p) {
                        return false;
                    }
                }
                let _ = combine_path(f, name);
            }
            if let Some(name) = &q.data_file {
                if !self.inside_or_absent(&data_file_path(name)) {
                    return false;
                }
            }
        }
        true
    }

    fn inside_or_absent(&self, p: &Path) -> bool {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        };
        match p.canonicalize() {
            Ok(c) => c.parent() == Some(self.dir.as_path()) && c.is_file(),
            Err(_) => fs::symlink_metadata(&p).is_err(),
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if let Some(c) = &self.old_cwd {
            let _ = std::env::set_current_dir(c);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Granularity of [`Fingerprint`]'s hashing (tmpfs's page).
const BLOCK: u64 = 4096;

/// A file's length and a hash of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub len: u64,
    pub hash: u64,
}

impl Fingerprint {
    /// Hashes the data regions only (tmpfs knows its holes): a 64 MiB
    /// sparse file costs what its few written clusters cost.
    pub fn of(path: &Path) -> Fingerprint {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .expect("open to fingerprint");
        let len = file.metadata().expect("stat").len();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let fd = file.as_raw_fd();
        let mut pos = 0u64;
        while pos < len {
            // SAFETY: plain lseek on a descriptor this function owns.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                break;
            }
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            // Aligned blocks, so that the same bytes hash the same however
            // the file system splits them into regions.
            let start = data as u64 / BLOCK * BLOCK;
            let end = (hole.max(data) as u64).min(len);
            let mut off = start;
            while off < end {
                let want = ((end - off).next_multiple_of(BLOCK) as usize).min(buf.len());
                let n = file
                    .read_at(&mut buf[..want], off)
                    .expect("read to fingerprint");
                if n == 0 {
                    break;
                }
                for (i, block) in buf[..n].chunks(BLOCK as usize).enumerate() {
                    // Zeros hash like a hole.
                    if block.iter().any(|&b| b != 0) {
                        h.write_u64(off + i as u64 * BLOCK);
                        h.write(block);
                    }
                }
                off += n as u64;
            }
            pos = end.max(start + 1);
        }
        Fingerprint {
            len,
            hash: h.finish(),
        }
    }
}

pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Oracles.

/// Disks larger than this are not read whole (the time would be spent
/// on zeros, not on metadata).
pub const VIEW_BUDGET: u64 = 16 << 20;

/// The guest view of the chain at `path`, read whole; None when it cannot
/// be opened or read, or is over the budget.
pub fn view(path: &Path, format: Option<Format>) -> Option<Vec<u8>> {
    let chain = Chain::open(path, format).ok()?;
    view_of(&chain)
}

/// The first `len` bytes of the guest view at `path` (None when the disk is
/// shorter or cannot be read).
pub fn view_prefix(path: &Path, format: Option<Format>, len: u64) -> Option<Vec<u8>> {
    let chain = Chain::open(path, format).ok()?;
    if chain.virtual_size() < len || len > VIEW_BUDGET {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    chain.read_at(&mut buf, 0).ok()?;
    Some(buf)
}

pub fn view_of(chain: &Chain) -> Option<Vec<u8>> {
    let size = chain.virtual_size();
    if size > VIEW_BUDGET {
        return None;
    }
    let mut buf = vec![0u8; size as usize];
    chain.read_at(&mut buf, 0).ok()?;
    Some(buf)
}

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.chunks(4096)
        .zip(b.chunks(4096))
        .position(|(x, y)| x != y)
        .map(|i| {
            let base = i * 4096;
            base + a[base..]
                .iter()
                .zip(&b[base..])
                .position(|(x, y)| x != y)
                .unwrap_or(0)
        })
}

pub fn assert_same_view(what: &str, want: &[u8], got: &[u8]) {
    if let Some(at) = first_difference(want, got) {
        panic!(
            "{what}: the guest view changed (lengths {} -> {}, first difference at byte {at:#x})",
            want.len(),
            got.len()
        );
    }
}

/// An error must name a file of the exec directory (the one at fault).
pub fn assert_names_a_file(what: &str, e: &Error, exec: &Exec) {
    let msg = e.to_string();
    assert!(
        msg.contains(&*exec.dir.to_string_lossy())
            || exec
                .files
                .iter()
                .any(|f| msg.contains(&*f.file_name().unwrap_or_default().to_string_lossy())),
        "{what}: the error names no file: {msg}"
    );
}

/// Corruptions found by `check` (None when it cannot check the image).
pub fn corruptions(path: &Path) -> Option<u64> {
    let r = cowshed::engine::check(path, Some(Format::Qcow2)).ok()?;
    Some(r.corruptions + r.check_errors)
}

/// After a successful write into an image that checked without corruption,
/// it still does (leaks are allowed: a crash-safe order may leak).
pub fn assert_still_consistent(what: &str, path: &Path, before: Option<u64>) {
    if before != Some(0) {
        return;
    }
    let r = cowshed::engine::check(path, Some(Format::Qcow2));
    match r {
        Ok(r) => assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{what}: {} was consistent before and has {} corruptions, {} check errors after: {:?}",
            path.display(),
            r.corruptions,
            r.check_errors,
            r.findings.iter().take(5).collect::<Vec<_>>()
        ),
        Err(e) => panic!(
            "{what}: {} checked clean before and cannot be checked after: {e}",
            path.display()
        ),
    }
}

/// A cluster size that bounds what metadata an operation may add, from
/// the image's header (64 KiB when it has none).
pub fn cluster_size(path: &Path) -> u64 {
    info(path, None)
        .ok()
        .and_then(|i| i.qcow2.map(|q| q.cluster_size))
        .unwrap_or(65536)
        .clamp(512, 2 << 20)
}

/// The disk size the header of `path` states (0 when it has none): what
/// growth bounds scale with, readable even when the data is not.
pub fn virtual_size(path: &Path) -> u64 {
    info(path, None).map_or(0, |i| i.virtual_size)
}

pub fn assert_growth(what: &str, path: &Path, before: u64, allowed: u64) {
    let after = file_len(path);
    assert!(
        after <= before.saturating_add(allowed),
        "{what}: {} grew from {before} to {after} bytes (at most {allowed} more allowed)",
        path.display()
    );
}
