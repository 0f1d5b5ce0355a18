//! `bitmap`: a qcow2 image's persistent dirty bitmaps added, removed,
//! cleared, enabled, disabled and merged as `qemu-img bitmap` does: the same
//! checks in the same order and the same messages ("Operation add on
//! bitmap NAME failed: ..."). The writing side and its crash safety are
//! the writer's ([`crate::engine::qcow2::writer::bitmaps`]).

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::engine::error::{Error, IoContext, Result};
use crate::engine::format::{probe_file, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::qcow2::bitmap::{
    merge_into, read_bits, read_directory, table_entries, BitmapEntry, MAX_BITMAPS,
    MAX_GRANULARITY_BITS, MAX_NAME, MAX_TABLE_ENTRIES, MIN_GRANULARITY_BITS,
};
use crate::engine::qcow2::header::autoclear;
use crate::engine::qcow2::{Header, Qcow2Writer};

/// QEMU's cap on the directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    /// Merge the named bitmap (of the source image, or of this one) into
    /// this one.
    Merge(Vec<u8>),
}

impl Action {
    fn verb(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// Where `--merge` takes its bitmaps from when not from the image itself
/// (qemu-img's -b, -F).
#[derive(Debug, Clone)]
pub struct MergeSource {
    pub path: std::path::PathBuf,
    pub format: Option<Format>,
}

/// A source image opened read-only (as qemu-img opens it, without its
/// backing chain): its bitmaps and what reading their bits needs.
struct SourceImage {
    file: File,
    path: std::path::PathBuf,
    bitmaps: Vec<BitmapEntry>,
    disk_size: u64,
    cluster_size: u64,
    _lock: ImageLock,
}

impl SourceImage {
    fn open(src: &MergeSource) -> Result<Self> {
        let path = src.path.clone();
        let file = File::open(&path).at(&path)?;
        let lock = ImageLock::acquire(&file, &path, LockMode::READER)?;
        let format = match src.format {
            Some(f) => f,
            None => probe_file(&file, &path)?,
        };
        let len = file.metadata().at(&path)?.len();
        let (bitmaps, disk_size, cluster_size) = if format == Format::Qcow2 {
            let h = Header::read(&file, &path, len)?;
            let list = match &h.extensions.bitmaps {
                Some(ext) if h.autoclear_features & autoclear::BITMAPS != 0 => {
                    read_directory(&file, &path, ext)?
                }
                _ => Vec::new(),
            };
            (list, h.size & !511, h.cluster_size())
        } else {
            // No other format holds bitmaps.
            (Vec::new(), len, 512)
        };
        Ok(SourceImage {
            file,
            path,
            bitmaps,
            disk_size,
            cluster_size,
            _lock: lock,
        })
    }
}

/// Carry out `actions` on bitmap `name` in order, as qemu-img does: each is
/// durable when the next starts, and the first that fails stops the rest
/// (what was done before it stays). `granularity` (bytes) is for `Add`;
/// `source` is where `Merge` finds its bitmaps (default: this image).
pub fn run(
    path: &Path,
    format: Option<Format>,
    name: &[u8],
    actions: &[Action],
    granularity: Option<u64>,
    source: Option<&MergeSource>,
) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .at(path)?;
    let format = match format {
        Some(f) => f,
        None => probe_file(&file, path)?,
    };
    if format != Format::Qcow2 {
        // A raw image holds no bitmaps; QEMU still opens it for writing.
        let _lock = ImageLock::acquire(&file, path, LockMode::WRITER)?;
        let _source = source.map(SourceImage::open).transpose()?;
        let Some(first) = actions.first() else {
            return Ok(());
        };
        let why = match first {
            Action::Add => add_checks_before_format(name, granularity)
                .err()
                .unwrap_or_else(|| {
                    format!(
                        "Can't store persistent bitmaps to '{}': Operation not supported",
                        path.display()
                    )
                }),
            _ => not_found(name),
        };
        return Err(failed(path, first, name, &why));
    }
    drop(file);
    let mut w = Qcow2Writer::open(path)?;
    let source = source.map(SourceImage::open).transpose()?;
    for action in actions {
        apply(&mut w, action, name, granularity, source.as_ref()).map_err(|e| match e {
            Refusal::Said(why) => failed(path, action, name, &why),
            Refusal::Error(e) => e,
        })?;
    }
    w.flush()
}

enum Refusal {
    Said(String),
    Error(Error),
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        Refusal::Error(e)
    }
}

fn apply(
    w: &mut Qcow2Writer,
    action: &Action,
    name: &[u8],
    granularity: Option<u64>,
    source: Option<&SourceImage>,
) -> std::result::Result<(), Refusal> {
    let list = w.bitmaps()?;
    let found = list.iter().position(|b| b.name == name);
    if *action == Action::Add {
        let bits = add_checks_before_format(name, granularity).map_err(Refusal::Said)?;
        if found.is_some() {
            return Err(Refusal::Said(format!(
                "Bitmap already exists: {}",
                String::from_utf8_lossy(name)
            )));
        }
        let bits = bits.unwrap_or_else(|| default_granularity_bits(w.cluster_size()));
        can_store(w, &list, name, bits).map_err(|why| {
            Refusal::Said(format!(
                "Can't make bitmap '{}' persistent in '{}': {why}",
                String::from_utf8_lossy(name),
                w.path().display()
            ))
        })?;
        w.bitmap_add(name, bits, true)?;
        return Ok(());
    }
    let Some(index) = found else {
        return Err(Refusal::Said(not_found(name)));
    };
    // A merge looks its source up before it checks its destination.
    let checked_later = matches!(action, Action::Remove | Action::Merge(_));
    if !checked_later && list[index].in_use() {
        return Err(Refusal::Said(inconsistent(&list[index])));
    }
    match action {
        Action::Remove => w.bitmap_remove(index)?,
        Action::Clear => w.bitmap_clear(index)?,
        Action::Enable => w.bitmap_set_enabled(index, true)?,
        Action::Disable => w.bitmap_set_enabled(index, false)?,
        Action::Merge(from) => merge(w, index, from, source)?,
        Action::Add => {}
    }
    Ok(())
}

/// Bitmap `from` (of `source`, else of this image) merged into bitmap
/// `index`, with QEMU's checks in its order: the source exists, the
/// destination and then the source are consistent, and they cover disks
/// of the same size.
fn merge(
    w: &mut Qcow2Writer,
    index: usize,
    from: &[u8],
    source: Option<&SourceImage>,
) -> std::result::Result<(), Refusal> {
    let dst = w.bitmaps()?[index].clone();
    let dst_bits = u32::from(dst.granularity_bits);
    let disk_size = w.virtual_size();
    // The source: its entry, and where it is in this image's list when
    // it is one of this image's bitmaps.
    let (src, here) = match source {
        Some(s) => match s.bitmaps.iter().find(|b| b.name == from) {
            Some(bm) => (bm.clone(), None),
            None => return Err(Refusal::Said(not_found(from))),
        },
        None => {
            let list = w.bitmaps()?;
            match list.iter().position(|b| b.name == from) {
                Some(at) => (list[at].clone(), Some(at)),
                None => return Err(Refusal::Said(not_found(from))),
            }
        }
    };
    if dst.in_use() {
        return Err(Refusal::Said(inconsistent(&dst)));
    }
    if src.in_use() {
        return Err(Refusal::Said(inconsistent(&src)));
    }
    let src_size = source.map_or(disk_size, |s| s.disk_size);
    if src_size != disk_size {
        return Err(Refusal::Said(format!(
            "Bitmaps are of different sizes (destination size is {disk_size}, source size is \
             {src_size}) and can't be merged"
        )));
    }

    let src_map = match (source, here) {
        (Some(s), _) => read_bits(&s.file, &s.path, &src, s.disk_size, s.cluster_size)?,
        (None, Some(at)) => w.bitmap_bits(at)?,
        (None, None) => return Err(Refusal::Said(not_found(from))),
    };
    let mut map = w.bitmap_bits(index)?;
    merge_into(
        &mut map,
        dst_bits,
        &src_map,
        u32::from(src.granularity_bits),
        disk_size,
    );
    w.bitmaps_store(&[(index, map)], &[])?;
    Ok(())
}

/// What QEMU checks of a new bitmap before asking the format: the name is
/// not empty, a granularity given is a power of 2 of at least 512 (and
/// fits QEMU's 32 bits). The granularity's bits when one was given.
fn add_checks_before_format(
    name: &[u8],
    granularity: Option<u64>,
) -> std::result::Result<Option<u32>, String> {
    if name.is_empty() {
        return Err("Bitmap name cannot be empty".into());
    }
    match granularity {
        None => Ok(None),
        Some(g) if g < 512 || !g.is_power_of_two() || g > u64::from(u32::MAX) => {
            Err("Granularity must be power of 2 and at least 512".into())
        }
        Some(g) => Ok(Some(g.trailing_zeros())),
    }
}

/// QEMU's default: the cluster size, within 4 KiB..64 KiB.
fn default_granularity_bits(cluster_size: u64) -> u32 {
    cluster_size.clamp(4096, 65536).trailing_zeros()
}

/// qcow2's constraints on a new persistent bitmap, in QEMU's order and
/// words (`qcow2_co_can_store_new_dirty_bitmap`).
fn can_store(
    w: &Qcow2Writer,
    list: &[BitmapEntry],
    name: &[u8],
    bits: u32,
) -> std::result::Result<(), String> {
    if w.header().version < 3 {
        return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    if bits > MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    if table_entries(w.virtual_size(), bits, w.cluster_size()) > MAX_TABLE_ENTRIES {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME} characters)"
        ));
    }
    if list.is_empty() {
        return Ok(());
    }
    if list.len() >= MAX_BITMAPS {
        return Err("Maximum number of persistent bitmaps is already reached".into());
    }
    let dir: u64 = list
        .iter()
        .map(|b| (24 + b.extra.len() + b.name.len()).next_multiple_of(8) as u64)
        .sum();
    if dir + (24 + name.len()).next_multiple_of(8) as u64 > MAX_DIRECTORY_BYTES {
        return Err("Not enough space in the bitmap directory".into());
    }
    Ok(())
}

fn not_found(name: &[u8]) -> String {
    format!("Dirty bitmap '{}' not found", String::from_utf8_lossy(name))
}

fn inconsistent(bm: &BitmapEntry) -> String {
    format!(
        "Bitmap '{}' is inconsistent and cannot be used\nTry --remove to delete this bitmap \
         from disk",
        String::from_utf8_lossy(&bm.name)
    )
}

fn failed(path: &Path, action: &Action, name: &[u8], why: &str) -> Error {
    Error::invalid(
        path,
        format!(
            "Operation {} on bitmap {} failed: {why}",
            action.verb(),
            String::from_utf8_lossy(name)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_granularity_follows_the_cluster_size_within_bounds() {
        assert_eq!(default_granularity_bits(512), 12);
        assert_eq!(default_granularity_bits(65536), 16);
        assert_eq!(default_granularity_bits(2 << 20), 16);
    }
}
