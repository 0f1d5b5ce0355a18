//! The move's journal: a small JSON file beside SRC that says what the move
//! is (source, destination, how the bytes get there, every backing name it
//! rewrites and into what) and how far it got. Written before the first
//! change and after each step, always durably (temporary file, fsync,
//! rename, fsync of the directory), removed at the end. A later run of
//! the same command reads it and carries the move on from its step.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::fsutil::{fsync_dir, parent_or_dot};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;

/// Bumped when the layout changes: an older cowshed then refuses the
/// journal instead of misreading it.
const VERSION: u32 = 1;

/// How far a move got. Each step is recorded once everything before it is
/// durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The journal exists; the layout is the old one (with, at most, the
    /// moved images' own backing names spelled absolutely).
    Started,
    /// The copy (or the tree of links) under the temporary name is
    /// complete and verified; only its rename to DST is left.
    Verified,
    /// DST exists and holds the same bytes as SRC; dependents are being
    /// re-pointed (some may point at DST already, all resolve).
    Placed,
    /// Every dependent points at DST; SRC is being removed.
    Repointed,
    /// SRC is gone; the moved images' own names get their final spelling.
    Removed,
    /// A cancel or an error before any dependent changed: the move is
    /// being undone. A later run finishes the undo, then moves afresh.
    RollingBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    File,
    Dir,
}

/// How DST comes to hold SRC's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// Hard links: the same inodes under new names (one file system).
    Link,
    /// A copy, verified byte for byte (across file systems).
    Copy,
}

/// When a backing name is written during the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Before DST exists (moved images sharing their inode with DST: a name
    /// that resolves from both places).
    BeforePlace,
    /// After DST exists, before SRC goes: the re-pointing.
    Repoint,
    /// After SRC is gone: the moved images' final names.
    AfterRemove,
}

/// One name a rewrite stores, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub phase: Phase,
    pub name: String,
}

/// A backing name the move changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrite {
    /// The image whose header changes, where it is before the move.
    pub image: PathBuf,
    /// Where it is after the move: itself, unless it is one of the moved
    /// files.
    pub image_after: PathBuf,
    /// The name stored before the move.
    pub old: String,
    /// The names stored, in order (the last one is the final name).
    pub stages: Vec<Stage>,
    /// The backing file the name leads to, before the move (through
    /// canonical directories).
    pub target: PathBuf,
    /// Where that backing file is after the move.
    pub target_after: PathBuf,
    /// The backing format recorded in the header, kept as it is.
    pub format: Option<String>,
}

impl Rewrite {
    pub fn moved(&self) -> bool {
        self.image != self.image_after
    }

    pub fn final_name(&self) -> &str {
        self.stages.last().map_or(self.old.as_str(), |s| &s.name)
    }

    /// The name this image stores once `phase` is done.
    pub fn name_after(&self, phase: Phase) -> &str {
        self.stages
            .iter()
            .rev()
            .find(|s| s.phase <= phase)
            .map_or(self.old.as_str(), |s| &s.name)
    }

    /// Every name the header may hold during the move.
    pub fn known(&self, name: &str) -> bool {
        name == self.old || self.stages.iter().any(|s| s.name == name)
    }
}

/// A moved entry, relative to SRC (empty for a single file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub rel: PathBuf,
    pub what: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    Dir,
    File,
    /// A symbolic link, recreated with this target.
    Symlink(PathBuf),
}

/// What SRC's file was when it was copied: a copy-mode move re-checks it
/// before deleting, since between a kill and the re-run someone may have
/// written into SRC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub rel: PathBuf,
    pub len: u64,
    pub mtime_ns: i128,
    pub ino: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journal {
    pub version: u32,
    /// Absolute, through SRC's canonical directory.
    pub src: PathBuf,
    /// Absolute, through DST's canonical directory: the final name.
    pub dst: PathBuf,
    /// DST as given on the command line, made absolute: a re-run names the
    /// same move with it even once DST is a directory that exists.
    pub dst_given: PathBuf,
    pub kind: Kind,
    pub how: How,
    /// Where the copy (or the tree of links) is built before its rename.
    pub temp: PathBuf,
    pub step: Step,
    pub entries: Vec<Entry>,
    pub rewrites: Vec<Rewrite>,
    /// Copy mode: SRC's files as copied (recorded with [`Step::Verified`]).
    #[serde(default)]
    pub stamps: Vec<Stamp>,
    /// Set when the undo begins: DST was made by this move (not an
    /// existing file the move ran into), so the undo removes it.
    #[serde(default)]
    pub undo_removes_dst: bool,
}

/// `.NAME.cowshed-mv-tmp` beside DST: where the copy, or the tree of
/// links, is built before its rename to DST.
pub fn temp_name(abs_dst: &Path) -> PathBuf {
    let name = abs_dst
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    parent_or_dot(abs_dst).join(format!(".{name}.cowshed-mv-tmp"))
}

/// `.NAME.cowshed-mv.json` beside SRC: found again from SRC's name alone,
/// also once SRC is gone.
pub fn journal_path(src: &Path) -> PathBuf {
    let name = src
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    parent_or_dot(src).join(format!(".{name}.cowshed-mv.json"))
}

impl Journal {
    pub fn new_version() -> u32 {
        VERSION
    }

    pub fn path(&self) -> PathBuf {
        journal_path(&self.src)
    }

    /// The journal of a move of `src` (absolute, through its canonical
    /// directory), if one is pending.
    pub fn load(src: &Path) -> Result<Option<Journal>> {
        let path = journal_path(src);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let unreadable = |why: String| {
            Error::invalid(
                &path,
                format!(
                    "the journal of an interrupted move is unreadable ({why}); look at it, put \
                     the files where they belong and remove it"
                ),
            )
        };
        // The journal is small; anything big is not ours.
        if text.len() > 64 << 20 {
            return Err(unreadable("larger than 64 MiB".into()));
        }
        let j: Journal = serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
        if j.version != VERSION {
            return Err(unreadable(format!(
                "version {} where this cowshed writes {VERSION}",
                j.version
            )));
        }
        // What the move deletes is named by the user's command: SRC (the
        // journal's own name says which), DST (the re-run must name it)
        // and the temporary name derived from DST. A journal saying
        // otherwise is not this move's.
        if j.src != src {
            return Err(unreadable(format!("it is about '{}'", j.src.display())));
        }
        if !j.dst.is_absolute() || j.temp != temp_name(&j.dst) {
            return Err(unreadable("its destination names do not match".into()));
        }
        let bad_rel = |p: &Path| {
            p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        };
        if j.entries.iter().any(|e| bad_rel(&e.rel)) {
            return Err(unreadable("an entry leaves the moved tree".into()));
        }
        Ok(Some(j))
    }

    /// Write the journal durably with `step`.
    pub fn save(&mut self, step: Step) -> Result<()> {
        self.step = step;
        let path = self.path();
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::invalid(&path, format!("cannot write the move's journal: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).at(&tmp)?;
            f.write_all(&text).at(&tmp)?;
            f.sync_all().at(&tmp)?;
        }
        std::fs::rename(&tmp, &path).at(&path)?;
        fsync_dir(&parent_or_dot(&path))?;
        fault::point("mv.journal.saved");
        Ok(())
    }

    /// The move is over: the journal goes.
    pub fn remove(&self) -> Result<()> {
        let path = self.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
        fsync_dir(&parent_or_dot(&path))
    }

    /// Where a moved entry is before the move.
    pub fn old_of(&self, rel: &Path) -> PathBuf {
        join_rel(&self.src, rel)
    }

    /// Where a moved entry is after the move.
    pub fn new_of(&self, rel: &Path) -> PathBuf {
        join_rel(&self.dst, rel)
    }

    /// Where a moved entry is in the temporary tree.
    pub fn temp_of(&self, rel: &Path) -> PathBuf {
        join_rel(&self.temp, rel)
    }
}

/// `base/rel`, and `base` itself for the empty `rel` (where `join` would
/// add a trailing slash).
pub fn join_rel(base: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}
