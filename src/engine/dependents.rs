//! Which images use a file as their backing file: the one search that
//! every operation replacing, deleting, moving or rewriting an image runs
//! before it writes. Matching is by device and inode, so every spelling of
//! the name (relative, absolute, through a link) counts.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::chain::{classify_backing, BackingName};
use super::error::{IoContext, Result};
use super::format::{open_image_file, probe_file, Format};
use super::qcow2::header::Header;

/// Where to look for dependents.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Directories listed one level deep (the target's own directory).
    pub dirs: Vec<PathBuf>,
    /// Directories walked recursively (the user's `--root`s), following
    /// links as the catalog's scan does.
    pub roots: Vec<PathBuf>,
}

impl Scope {
    /// The target's own directory, plus `roots` walked recursively.
    pub fn around(target: &Path, roots: &[PathBuf]) -> Scope {
        Scope {
            dirs: vec![parent_dir(target)],
            roots: roots.to_vec(),
        }
    }
}

/// An image whose backing file is the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependent {
    /// As reached from the scope's directory (bare for a bare directory).
    pub path: PathBuf,
    /// The backing name stored in its header, as written there.
    pub backing_name: String,
    /// The backing format stored in its header, if any.
    pub backing_format: Option<String>,
}

/// The images in `scope` whose backing file is `target` (direct dependents
/// only: an overlay of an overlay depends on the target through its
/// parent). Sorted by path; each file once however often it is reached.
/// Files that are not qcow2 images, or cannot be read, are skipped: they
/// use nothing.
pub fn find_dependents(target: &Path, scope: &Scope) -> Result<Vec<Dependent>> {
    Ok(find_dependents_of_any(&[target], scope)?
        .into_iter()
        .map(|(_, d)| d)
        .collect())
}

/// [`find_dependents`] for several targets in one pass over the scope (a
/// directory being moved): each dependent with the index of the target it
/// uses. The targets themselves are never counted as dependents.
pub fn find_dependents_of_any(targets: &[&Path], scope: &Scope) -> Result<Vec<(usize, Dependent)>> {
    let mut wanted = std::collections::HashMap::new();
    for (i, t) in targets.iter().enumerate() {
        let m = std::fs::metadata(t).at(t)?;
        wanted.insert((m.dev(), m.ino()), i);
    }
    let mut found = Vec::new();
    let mut seen: HashSet<(u64, u64)> = wanted.keys().copied().collect();
    let mut consider = |path: PathBuf, m: &std::fs::Metadata| {
        if !m.is_file() || !seen.insert((m.dev(), m.ino())) {
            return;
        }
        if let Some((backing_name, backing_format, resolved)) = backing_of(&path) {
            let target = std::fs::metadata(resolved)
                .ok()
                .and_then(|bm| wanted.get(&(bm.dev(), bm.ino())).copied());
            if let Some(i) = target {
                found.push((
                    i,
                    Dependent {
                        path,
                        backing_name,
                        backing_format,
                    },
                ));
            }
        }
    };
    for dir in &scope.dirs {
        // A bare name has the empty directory: its dependents are named
        // bare too, as the user would.
        let listed = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir.as_path()
        };
        let Ok(entries) = std::fs::read_dir(listed) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(m) = std::fs::metadata(entry.path()) {
                consider(dir.join(entry.file_name()), &m);
            }
        }
    }
    for root in &scope.roots {
        // Images in the trash are deleted: they depend on nothing.
        for entry in walkdir::WalkDir::new(root)
            .follow_links(true)
            .into_iter()
            .filter_entry(|e| !super::trash::is_trash_name(e.file_name()))
            .flatten()
        {
            if let Ok(m) = entry.metadata() {
                consider(entry.into_path(), &m);
            }
        }
    }
    found.sort_by(|a, b| a.1.path.cmp(&b.1.path));
    Ok(found)
}

/// The backing name and format stored in the qcow2 image at `path`, and
/// the file the name resolves to, if it names a file.
fn backing_of(path: &Path) -> Option<(String, Option<String>, PathBuf)> {
    let file = open_image_file(path).ok()?;
    if probe_file(&file, path).ok()? != Format::Qcow2 {
        return None;
    }
    let len = file.metadata().ok()?.len();
    let header = Header::read(&file, path, len).ok()?;
    let name = header.backing_file?;
    match classify_backing(path, &name) {
        BackingName::Path(p) => Some((name, header.extensions.backing_format, p)),
        _ => None,
    }
}

/// The directory a path's file is in, as spelled in it (empty for a bare
/// name).
pub fn parent_dir(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}
