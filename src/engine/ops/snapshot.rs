//! `snapshot`: a qcow2 image's internal snapshots, listed, created, applied
//! and deleted as `qemu-img snapshot -l | -c | -a | -d` does it: the same
//! names and ids, the same lookups (apply: by id, then by name; delete: by
//! name), the same refusals and messages. The writing side and its crash
//! safety are the writer's ([`crate::engine::qcow2::writer::snapshots`]).

use std::path::Path;

use crate::engine::error::{Error, Result};
use crate::engine::format::{open_image_file, probe_file, Format};
use crate::engine::qcow2::snapshot::Snapshot;
use crate::engine::qcow2::{Qcow2Image, Qcow2Writer};

/// QEMU keeps a name in a 256-byte buffer: longer ones are cut to 255 bytes.
const MAX_NAME: usize = 255;

/// What to do, as qemu-img's -c, -a, -d name it in its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Apply,
    Delete,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Apply => "apply",
            Action::Delete => "delete",
        }
    }
}

/// The image's snapshots, read without locks (like `info`: safe beside a
/// running QEMU). A raw image has none.
pub fn list(path: &Path, format: Option<Format>) -> Result<Vec<Snapshot>> {
    let file = open_image_file(path)?;
    match resolve(path, &file, format)? {
        Format::Qcow2 => Ok(Qcow2Image::open(path, file)?.snapshots().to_vec()),
        _ => Ok(Vec::new()),
    }
}

/// Take a disk-only snapshot named `name` (ids as QEMU numbers them; a name
/// already taken is allowed, as in QEMU). QEMU's writer locks are taken
/// first: a running QEMU makes this fail with the file untouched.
pub fn create(path: &Path, name: &[u8], format: Option<Format>) -> Result<Snapshot> {
    let name = &name[..name.len().min(MAX_NAME)];
    let mut w = open_writer(path, name, format, Action::Create)?;
    let snaps = w.snapshots()?;
    let id = next_id(&snaps);
    let sn = w
        .snapshot_create(id.as_bytes(), name, now())
        .map_err(|e| failed(e, Action::Create, name))?;
    w.flush()?;
    Ok(sn)
}

/// Make the image read as snapshot `name` (an id, else a name) reads; the
/// current state is lost unless another snapshot keeps it.
pub fn apply(path: &Path, name: &[u8], format: Option<Format>) -> Result<()> {
    let mut w = open_writer(path, name, format, Action::Apply)?;
    let snaps = w.snapshots()?;
    let index = snaps
        .iter()
        .position(|s| s.id_bytes() == name)
        .or_else(|| snaps.iter().position(|s| s.name_bytes() == name))
        .ok_or_else(|| {
            refusal(
                path,
                Action::Apply,
                name,
                "Failed to load snapshot: No such file or directory",
            )
        })?;
    // QEMU 10.0.2 refuses whatever bitmaps it loads: enabled, disabled or
    // in use; those behind a cleared autoclear bit it drops, and applies.
    if !w.bitmaps()?.is_empty() {
        return Err(refusal(
            path,
            Action::Apply,
            name,
            "Device has active dirty bitmaps",
        ));
    }
    w.snapshot_apply(index)
        .map_err(|e| failed(e, Action::Apply, name))?;
    w.flush()
}

/// Delete the first snapshot named `name` (by name only, as qemu-img -d).
pub fn delete(path: &Path, name: &[u8], format: Option<Format>) -> Result<()> {
    delete_where(path, name, format, |s| s.name_bytes() == name)
}

/// Delete the snapshot with id `id` (ids are unique where names need not
/// be: what a list to pick from deletes).
pub fn delete_id(path: &Path, id: &[u8], format: Option<Format>) -> Result<()> {
    delete_where(path, id, format, |s| s.id_bytes() == id)
}

fn delete_where(
    path: &Path,
    name: &[u8],
    format: Option<Format>,
    matches: impl Fn(&Snapshot) -> bool,
) -> Result<()> {
    let mut w = open_writer(path, name, format, Action::Delete)?;
    let snaps = w.snapshots()?;
    let index = snaps
        .iter()
        .position(matches)
        .ok_or_else(|| refusal(path, Action::Delete, name, "snapshot not found"))?;
    w.snapshot_delete(index)
        .map_err(|e| failed(e, Action::Delete, name))?;
    w.flush()
}

fn resolve(path: &Path, file: &std::fs::File, format: Option<Format>) -> Result<Format> {
    match format {
        Some(f) => Ok(f),
        None => probe_file(file, path),
    }
}

/// The writer for a snapshot change; formats without internal snapshots
/// are refused as QEMU refuses them.
fn open_writer(
    path: &Path,
    name: &[u8],
    format: Option<Format>,
    action: Action,
) -> Result<Qcow2Writer> {
    let file = open_image_file(path)?;
    let format = resolve(path, &file, format)?;
    drop(file);
    if format != Format::Qcow2 {
        return Err(refusal(path, action, name, "Operation not supported"));
    }
    Qcow2Writer::open(path)
}

fn refusal(path: &Path, action: Action, name: &[u8], why: &str) -> Error {
    Error::invalid(
        path,
        format!(
            "Could not {} snapshot '{}': {why}",
            action.verb(),
            String::from_utf8_lossy(name)
        ),
    )
}

/// qemu-img's message around an error the writer gave.
fn failed(e: Error, action: Action, name: &[u8]) -> Error {
    match e {
        Error::Invalid { path, msg } => refusal(&path, action, name, &msg),
        other => other,
    }
}

/// QEMU's next id: one more than the largest numeric id (`strtoul` of
/// each: leading digits, else 0).
fn next_id(snaps: &[Snapshot]) -> String {
    let max = snaps
        .iter()
        .map(|s| {
            s.id_bytes()
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .fold(0u64, |n, &c| {
                    n.saturating_mul(10).saturating_add(u64::from(c - b'0'))
                })
        })
        .max()
        .unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// The wall clock as qemu-img records it: microseconds, as nanoseconds.
fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_id(id: &str) -> Snapshot {
        Snapshot::disk_only(id.as_bytes(), b"n", (0, 0), 0, (0, 0))
    }

    #[test]
    fn ids_follow_the_largest_numeric_one() {
        assert_eq!(next_id(&[]), "1");
        assert_eq!(next_id(&[with_id("3"), with_id("1")]), "4");
        assert_eq!(next_id(&[with_id("7abc"), with_id("x")]), "8");
    }
}
