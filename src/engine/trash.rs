//! The trash: a deleted image moved into `.cowshed-trash/` in its own
//! directory (the same file system by construction, so the move is one
//! `rename`, atomic and free), with a small record of where it came from,
//! so that it can be put back. Scans, the watcher and the dependents
//! search skip the trash: an image in it is gone as far as the tree and
//! every operation are concerned.
//!
//! Layout: `DIR/.cowshed-trash/<item>/` holds the image under its own file
//! name and `record.json` (`path`, `deleted` in seconds since the epoch,
//! `size` in bytes, `allocated` bytes on disk). Each step is ordered so
//! that a crash leaves the image either where it was or whole in its item:
//! the record is written and flushed first, then the image renamed in. An
//! item whose image never arrived is listed as incomplete and removed by
//! `empty`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Error, IoContext, Result};

/// The trash directory's name, in each image's own directory.
pub const TRASH_DIR: &str = ".cowshed-trash";
const RECORD: &str = "record.json";

/// Is this directory entry name the trash? (Walks skip it.)
pub fn is_trash_name(name: &OsStr) -> bool {
    name == TRASH_DIR
}

/// Is `path` inside a trash directory (or the trash itself)?
pub fn in_trash(path: &Path) -> bool {
    path.components()
        .any(|c| matches!(c, Component::Normal(n) if is_trash_name(n)))
}

/// What the trash remembers of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Where the image was, made absolute when it was moved in.
    pub path: PathBuf,
    /// When it was moved in, in seconds since the epoch.
    pub deleted: u64,
    /// Its length in bytes.
    pub size: u64,
    /// What it took on disk.
    pub allocated: u64,
}

/// One item of a trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The item's directory (what `restore` takes).
    pub dir: PathBuf,
    pub record: Option<Record>,
    /// The image inside, if it arrived (a crash while moving in leaves an
    /// item with a record only).
    pub image: Option<PathBuf>,
    /// What the item takes on disk now.
    pub allocated: u64,
}

impl Item {
    /// Where a restore puts the image back: its own name in the directory
    /// that holds the trash (the record's path is for people; the trash
    /// moves with its directory).
    pub fn restore_path(&self) -> Option<PathBuf> {
        let name = self.image.as_ref()?.file_name()?;
        Some(self.dir.parent()?.parent()?.join(name))
    }
}

fn dir_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Move the image at `path` into the trash of its directory and return the
/// item's directory. The caller has checked that nothing depends on it and
/// holds QEMU's locks on it.
pub fn move_in(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::symlink_metadata(path).at(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(path, "has no file name"))?;
    let dir = dir_of(path);
    let trash = dir.join(TRASH_DIR);
    match std::fs::create_dir(&trash) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(&trash, e)),
    }
    let deleted = now_secs();
    let item = new_item_dir(&trash, deleted, name)?;
    let record = Record {
        path: std::path::absolute(path).at(path)?,
        deleted,
        size: meta.len(),
        allocated: meta.blocks() * 512,
    };
    let record_path = item.join(RECORD);
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::invalid(&record_path, e.to_string()))?;
    std::fs::write(&record_path, json).at(&record_path)?;
    File::open(&record_path)
        .and_then(|f| f.sync_all())
        .at(&record_path)?;
    sync_dir(&item)?;
    sync_dir(&trash)?;
    super::fault::point("trash.before_rename");
    std::fs::rename(path, item.join(name)).at(path)?;
    sync_dir(&item)?;
    sync_dir(dir)?;
    Ok(item)
}

/// A new, empty item directory: `<seconds>-<name>`, `-2`, `-3`, ... when
/// taken.
fn new_item_dir(trash: &Path, deleted: u64, name: &OsStr) -> Result<PathBuf> {
    for n in 1u32.. {
        let mut item = OsString::from(format!("{deleted}-"));
        item.push(name);
        if n > 1 {
            item.push(format!("-{n}"));
        }
        let item = trash.join(item);
        match std::fs::create_dir(&item) {
            Ok(()) => return Ok(item),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => {}
            Err(e) => return Err(Error::io(&item, e)),
        }
    }
    Err(Error::invalid(trash, "no free item name"))
}

/// Read one item directory.
pub fn read_item(dir: &Path) -> Result<Item> {
    let m = std::fs::symlink_metadata(dir).at(dir)?;
    let inside = dir.parent().and_then(Path::file_name).map(is_trash_name);
    if !m.is_dir() || inside != Some(true) {
        return Err(Error::invalid(
            dir,
            format!("is not an item of a {TRASH_DIR} directory (`cowshed trash list` names them)"),
        ));
    }
    let record = std::fs::read(dir.join(RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
    let mut image = None;
    let mut allocated = 0;
    for e in std::fs::read_dir(dir).at(dir)?.flatten() {
        let Ok(em) = e.metadata() else { continue };
        allocated += em.blocks() * 512;
        if e.file_name() != RECORD && em.is_file() {
            image = Some(e.path());
        }
    }
    Ok(Item {
        dir: dir.to_path_buf(),
        record,
        image,
        allocated,
    })
}

/// Every item in the trashes under `dirs` (each walked, not following
/// links), sorted by directory.
pub fn list(dirs: &[PathBuf]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for d in dirs {
        if !d.is_dir() {
            return Err(Error::invalid(d, "is not a directory"));
        }
        let mut walk = walkdir::WalkDir::new(d).into_iter();
        while let Some(entry) = walk.next() {
            let Ok(entry) = entry else { continue };
            if !(entry.file_type().is_dir() && is_trash_name(entry.file_name())) {
                continue;
            }
            walk.skip_current_dir();
            let trash = entry.path();
            let mut found: Vec<PathBuf> = std::fs::read_dir(trash)
                .at(trash)?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            found.sort();
            for item in found {
                items.push(read_item(&item)?);
            }
        }
    }
    Ok(items)
}

/// Put an item's image back where it was (its own name in the directory
/// holding the trash) and return that path. An existing file there is
/// never replaced.
pub fn restore(item_dir: &Path) -> Result<PathBuf> {
    let item = read_item(item_dir)?;
    let (Some(image), Some(to)) = (&item.image, item.restore_path()) else {
        return Err(Error::invalid(
            item_dir,
            "holds no image (a move into the trash that did not finish); `cowshed trash empty` \
             removes it",
        ));
    };
    rename_no_replace(image, &to)?;
    sync_dir(dir_of(&to))?;
    super::fault::point("trash.restored");
    remove_item(&item.dir)?;
    Ok(to)
}

/// `rename`, refused when `to` exists (RENAME_NOREPLACE; a link and an
/// unlink where the file system lacks it: the link fails on an existing
/// name too).
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    let exists = || {
        Error::invalid(
            to,
            "exists: a restore never replaces a file; move it away first",
        )
    };
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Err(exists()),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOSYS) => {
            match std::fs::hard_link(from, to) {
                Ok(()) => std::fs::remove_file(from).at(from),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
                Err(e) => Err(Error::io(to, e)),
            }
        }
        Err(e) => Err(Error::io(to, e.into())),
    }
}

/// Delete an item for good: what it holds, then the directory.
fn remove_item(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).at(dir)?.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p).at(&p)?;
        } else {
            std::fs::remove_file(&p).at(&p)?;
        }
    }
    std::fs::remove_dir(dir).at(dir)?;
    if let Some(trash) = dir.parent() {
        sync_dir(trash)?;
    }
    Ok(())
}

/// Delete every item in the trashes under `dirs` for good, then the empty
/// trash directories. Returns the items and the bytes they took.
pub fn empty(dirs: &[PathBuf]) -> Result<(usize, u64)> {
    let items = list(dirs)?;
    let mut freed = 0;
    for item in &items {
        remove_item(&item.dir)?;
        freed += item.allocated;
    }
    let mut trashes: Vec<&Path> = items.iter().filter_map(|i| i.dir.parent()).collect();
    trashes.dedup();
    for t in trashes {
        // Something else put there stays, and so does the directory.
        if std::fs::remove_dir(t).is_ok() {
            sync_dir(dir_of(t))?;
        }
    }
    Ok((items.len(), freed))
}

/// `2024-05-01 12:34:56 UTC` for seconds since the epoch (the record's
/// time, shown by `trash list`).
pub fn utc_text(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let s = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_matches_known_dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_text(1_714_566_896), "2024-05-01 12:34:56 UTC");
    }

    #[test]
    fn move_in_list_restore_and_empty() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.qcow2");
        std::fs::write(&img, b"image bytes").unwrap();
        let item = move_in(&img).unwrap();
        assert!(!img.exists());
        assert!(in_trash(&item));
        let items = list(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(items.len(), 1);
        let rec = items[0].record.clone().unwrap();
        assert_eq!(rec.size, 11);
        assert_eq!(rec.path, img);
        assert_eq!(items[0].restore_path(), Some(img.clone()));
        // A file in the way is never replaced.
        std::fs::write(&img, b"other").unwrap();
        let err = restore(&item).unwrap_err().to_string();
        assert!(err.contains("exists"), "{err}");
        assert_eq!(std::fs::read(&img).unwrap(), b"other");
        std::fs::remove_file(&img).unwrap();
        assert_eq!(restore(&item).unwrap(), img);
        assert_eq!(std::fs::read(&img).unwrap(), b"image bytes");
        assert!(list(&[d.path().to_path_buf()]).unwrap().is_empty());
        // Twice in, then emptied.
        move_in(&img).unwrap();
        std::fs::write(&img, b"again").unwrap();
        let second = move_in(&img).unwrap();
        assert!(second.to_string_lossy().ends_with("-2") || second.exists());
        let (n, _) = empty(&[d.path().to_path_buf()]).unwrap();
        assert_eq!(n, 2);
        assert!(!d.path().join(TRASH_DIR).exists());
    }
}
