//! `mv`: rename or move an image, or a directory of images, and rewrite
//! the backing name of every image that uses one of them (its dependents)
//! so that every chain still opens, and reads the same, afterwards.
//!
//! The order of the steps is chosen so that no image ever names a backing
//! file that is not there, whenever the process is killed:
//!
//! 1. Plan, refuse, lock: every dependent (in SRC's directory and the
//!    roots) and every moved file is locked as QEMU's writer for the whole
//!    move, so a QEMU holding one refuses the move and none can start
//!    meanwhile; every new name is checked to fit its header. Nothing has
//!    changed when this refuses.
//! 2. The journal is written beside SRC (fsync'd): from here on a re-run
//!    of the same command finds it and carries the move on.
//! 3. Same file system: the moved images' own relative backing names,
//!    where the move changes what they lead to, are first spelled
//!    absolutely (valid from the old place and the new one, which share
//!    the header), then DST is hard-linked to SRC (a whole tree is linked
//!    under a temporary name and renamed into place): both names are now
//!    the same file. Across file systems: SRC is copied under a temporary
//!    name beside DST, made durable, read back and compared, and renamed
//!    to DST; SRC is untouched.
//! 4. Re-point: first the moved images whose names must change (in a copy
//!    nothing uses yet, or through the shared header), then every
//!    dependent, one header write each, each name checked to lead to the
//!    moved file before it is written. Both SRC and DST exist throughout.
//! 5. SRC is removed (each file only if it is still the file moved, or,
//!    for a copy, unchanged since it was copied), then the moved images'
//!    own names get their final, relative spelling, and the journal goes.
//!
//! Cancel: before the first dependent is re-pointed, a cancel (or an
//! error) undoes what was done and leaves the old layout. After it, the
//! rest is a few header writes and unlinks: the move finishes rather than
//! leave two layouts side by side (an error there keeps the journal, and
//! the same command completes the move).

mod copy;
mod fsutil;
pub mod journal;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use self::fsutil::{
    absolute_through_dir, exists, file_id, fsync_dir, parent_or_dot, remove_if_present,
    rename_noreplace,
};
pub use self::journal::journal_path;
use self::journal::temp_name;
use self::journal::{
    join_rel, Entry, EntryKind, How, Journal, Kind, Phase, Rewrite, Stage, Stamp, Step,
};
use crate::engine::chain::{
    classify_backing, combine_path, lexical_normalize, relative_path, BackingName,
};
use crate::engine::dependents::{find_dependents_of_any, Scope};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::{open_image_file, probe_file, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::preflight::{ensure_no_vm_users, VmUsers};
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::header::Header;
use crate::engine::qcow2::writer::backing::{check_fits, HeaderEditor};
use crate::engine::space;

#[derive(Debug, Clone, Default)]
pub struct MoveOptions {
    /// Directories searched recursively for dependents, besides SRC's own
    /// directory.
    pub roots: Vec<PathBuf>,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
}

/// What a move did.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub src: PathBuf,
    /// Where SRC is now.
    pub dst: PathBuf,
    /// Across file systems: copied, verified, then removed.
    pub copied: bool,
    /// An interrupted move was carried on.
    pub resumed: bool,
    pub rewritten: Vec<Renamed>,
    /// A directory move leaves in SRC what appeared there meanwhile.
    pub left_behind: Vec<PathBuf>,
    /// What the move left as it was, and why.
    pub notes: Vec<String>,
}

/// A backing name the move rewrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renamed {
    /// The image, where it is after the move.
    pub image: PathBuf,
    pub old: String,
    pub new: String,
    /// One of the moved images (its own backing name), not a dependent.
    pub moved: bool,
}

/// Where `mv SRC DST` puts SRC: DST, or DST/NAME when DST is a directory.
pub fn destination(src: &Path, dst: &Path) -> PathBuf {
    match (std::fs::metadata(dst), src.file_name()) {
        (Ok(m), Some(name)) if m.is_dir() => dst.join(name),
        _ => dst.to_path_buf(),
    }
}

/// Move `src` to `dst` (see the module's documentation). A journal left by
/// an interrupted run of the same move is found and the move carried on.
pub fn move_image(
    src: &Path,
    dst: &Path,
    opts: &MoveOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<MoveReport> {
    let abs_src = absolute_through_dir(src)?;
    let mut resumed = false;
    if let Some(j) = Journal::load(&abs_src)? {
        if !names_same_move(&j, dst) {
            return Err(Error::invalid(
                src,
                format!(
                    "an interrupted move of it to '{}' is pending (journal '{}'): run the same \
                     command again, `cowshed mv {} {}`, to complete it first",
                    j.dst.display(),
                    j.path().display(),
                    src.display(),
                    j.dst.display()
                ),
            ));
        }
        resumed = true;
        let mut run = Run::new(j, opts, true);
        run.acquire_all(false)?;
        if run.j.step != Step::RollingBack {
            return run.execute(progress, cancel);
        }
        // Finish the undo, then move afresh.
        run.rollback()?;
    }
    ensure_no_vm_users_under(src, &opts.vms)?;
    let (j, notes) = plan(src, &abs_src, dst, opts)?;
    let mut run = Run::new(j, opts, false);
    run.notes = notes;
    run.resumed = resumed;
    run.acquire_all(true)?;
    if run.j.how == How::Copy {
        ensure_room_for_copy(&run.j)?;
    }
    cancel.check()?;
    run.j.save(Step::Started)?;
    run.execute(progress, cancel)
}

/// A moved file vanishes from where a defined machine's disk points: every
/// file moved (all of a directory's) is checked. A resumed move is not: it
/// was checked when it began, and stopping half way helps no one.
fn ensure_no_vm_users_under(src: &Path, vms: &VmUsers) -> Result<()> {
    if vms.by_file.is_empty() && vms.unreadable.is_empty() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(src).into_iter().flatten() {
        if entry.file_type().is_file() {
            ensure_no_vm_users(entry.path(), vms)?;
        }
    }
    Ok(())
}

/// Does `dst` (as given now) name the destination of the journal's move?
fn names_same_move(j: &Journal, dst: &Path) -> bool {
    std::path::absolute(dst).is_ok_and(|d| d == j.dst_given)
        || absolute_through_dir(dst).is_ok_and(|d| d == j.dst)
}

// ---------------------------------------------------------------- plan --

/// The whole move, decided before anything changes.
fn plan(
    src: &Path,
    abs_src: &Path,
    dst: &Path,
    opts: &MoveOptions,
) -> Result<(Journal, Vec<String>)> {
    let meta = abs_src.symlink_metadata().at(src)?;
    let kind = if meta.file_type().is_symlink() {
        return Err(Error::invalid(
            src,
            "is a symbolic link: move the image it points to (images that use the link's name \
             as backing would not be re-pointed)",
        ));
    } else if meta.is_dir() {
        Kind::Dir
    } else if meta.is_file() {
        Kind::File
    } else {
        return Err(Error::invalid(src, "is not a regular file or a directory"));
    };
    let final_dst = destination(src, dst);
    let abs_dst = absolute_through_dir(&final_dst)?;
    if exists(&abs_dst)? {
        return Err(Error::invalid(
            &final_dst,
            "exists: cowshed mv never replaces a file; remove it or choose another name",
        ));
    }
    if kind == Kind::Dir && abs_dst.starts_with(abs_src) {
        return Err(Error::invalid(
            &final_dst,
            format!(
                "is inside '{}': a directory cannot move into itself",
                src.display()
            ),
        ));
    }
    let entries = list_entries(abs_src, kind)?;
    let temp = temp_name(&abs_dst);
    if exists(&temp)? {
        return Err(Error::invalid(
            &temp,
            "exists (left by a move that did not finish?): cowshed builds the moved copy under \
             this name; look at it and remove it",
        ));
    }
    let how = decide_how(abs_src, &entries, &abs_dst)?;
    let dst_given = std::path::absolute(dst).at(dst)?;
    let mut j = Journal {
        version: Journal::new_version(),
        src: abs_src.to_path_buf(),
        dst: abs_dst,
        dst_given,
        kind,
        how,
        temp,
        step: Step::Started,
        entries,
        rewrites: Vec::new(),
        stamps: Vec::new(),
        undo_removes_dst: false,
    };
    let mut notes = Vec::new();
    j.rewrites = own_rewrites(&j, &mut notes)?;
    j.rewrites
        .extend(dependent_rewrites(&j, &opts.roots, &HashSet::new())?);
    Ok((j, notes))
}

/// What moves: the file, or the tree (directories first, then what is in
/// them), without following links.
fn list_entries(abs_src: &Path, kind: Kind) -> Result<Vec<Entry>> {
    if kind == Kind::File {
        return Ok(vec![Entry {
            rel: PathBuf::new(),
            what: EntryKind::File,
        }]);
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(abs_src)
        .follow_links(false)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let p = e.path().unwrap_or(abs_src).to_path_buf();
            Error::io(&p, e.into())
        })?;
        let path = entry.path();
        let rel = path
            .strip_prefix(abs_src)
            .map_err(|_| Error::invalid(path, "internal: outside the moved directory"))?
            .to_path_buf();
        let ty = entry.file_type();
        let what = if ty.is_dir() {
            EntryKind::Dir
        } else if ty.is_file() {
            EntryKind::File
        } else if ty.is_symlink() {
            EntryKind::Symlink(std::fs::read_link(path).at(path)?)
        } else {
            return Err(Error::invalid(
                path,
                "is not a regular file, a directory or a link: cowshed does not move it",
            ));
        };
        out.push(Entry { rel, what });
    }
    Ok(out)
}

/// Hard links if the file system allows one from SRC to beside DST (tried
/// on a probe name), else a copy.
fn decide_how(abs_src: &Path, entries: &[Entry], abs_dst: &Path) -> Result<How> {
    let Some(first) = entries.iter().find(|e| e.what == EntryKind::File) else {
        return Ok(How::Link);
    };
    let from = join_rel(abs_src, &first.rel);
    let name = abs_dst
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy().into_owned());
    let probe = parent_or_dot(abs_dst).join(format!(".{name}.cowshed-mv-probe"));
    // A probe left by a killed run is a link to SRC: it goes.
    if file_id(&probe)?.is_some() && file_id(&probe)? == file_id(&from)? {
        remove_if_present(&probe)?;
    }
    match std::fs::hard_link(&from, &probe) {
        Ok(()) => {
            std::fs::remove_file(&probe).at(&probe)?;
            Ok(How::Link)
        }
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
            ) =>
        {
            Ok(How::Copy)
        }
        Err(e) => Err(Error::io(&probe, e)),
    }
}

/// What a moved qcow2 image's header says about the files it uses.
struct Stored {
    backing: Option<String>,
    format: Option<String>,
    data_file: bool,
}

/// None: no qcow2 image (nothing it uses by name).
fn stored_backing(path: &Path) -> Result<Option<Stored>> {
    let file = open_image_file(path)?;
    if probe_file(&file, path)? != Format::Qcow2 {
        return Ok(None);
    }
    let len = file.metadata().at(path)?.len();
    let h = Header::read(&file, path, len)?;
    Ok(Some(Stored {
        data_file: h.has_data_file(),
        backing: h.backing_file,
        format: h.extensions.backing_format,
    }))
}

/// The name an image that will be in `image_dir_after` stores for its
/// backing file, which will be `target_after`, given the name `old` it
/// stores now. None: `old` still leads there. A relative name stays
/// relative, an absolute one absolute.
fn new_name(
    image: &Path,
    image_dir_after: &Path,
    old: &str,
    target_after: &Path,
    target_moves: bool,
) -> Result<Option<String>> {
    let new = if Path::new(old).is_absolute() {
        if !target_moves {
            return Ok(None);
        }
        target_after.to_path_buf()
    } else {
        if lexical_normalize(&image_dir_after.join(old)) == target_after {
            return Ok(None);
        }
        // Sharing no directory but `/`, the two are in unrelated trees
        // (another file system, say): a name that climbs to the root
        // would break as soon as either tree moves, which is what a
        // relative name is for.
        if shares_only_root(image_dir_after, target_after) {
            target_after.to_path_buf()
        } else {
            relative_path(image_dir_after, target_after)
        }
    };
    new.into_os_string().into_string().map(Some).map_err(|_| {
        Error::invalid(
            image,
            "its new backing name would not be UTF-8 text, which a qcow2 header stores",
        )
    })
}

fn shares_only_root(a: &Path, b: &Path) -> bool {
    // Both absolute: the first component is `/`, the second the top
    // directory.
    a.components().nth(1) != b.components().nth(1)
}

/// The names a rewrite stores, and when: see the module's documentation.
fn stages(
    how: How,
    image_moves: bool,
    target_moves: bool,
    target: &Path,
    target_after: &Path,
    final_name: String,
) -> Vec<Stage> {
    let stage = |phase, name: String| Stage { phase, name };
    if !image_moves || how == How::Copy {
        return vec![stage(Phase::Repoint, final_name)];
    }
    // The header is shared by the old name and the new one: a name that
    // leads to the backing file from both, first.
    let (phase, mid) = if target_moves {
        (Phase::Repoint, target_after)
    } else {
        (Phase::BeforePlace, target)
    };
    let mid = mid.to_string_lossy().into_owned();
    if mid == final_name {
        vec![stage(phase, final_name)]
    } else {
        vec![stage(phase, mid), stage(Phase::AfterRemove, final_name)]
    }
}

/// The moved images whose own backing name must change.
fn own_rewrites(j: &Journal, notes: &mut Vec<String>) -> Result<Vec<Rewrite>> {
    let moved: HashSet<&Path> = j
        .entries
        .iter()
        .filter(|e| e.what != EntryKind::Dir)
        .map(|e| e.rel.as_path())
        .collect();
    let mut out = Vec::new();
    for e in j.entries.iter().filter(|e| e.what == EntryKind::File) {
        let (image, image_after) = (j.old_of(&e.rel), j.new_of(&e.rel));
        let Some(Stored {
            backing: name,
            format,
            data_file,
        }) = stored_backing(&image)?
        else {
            continue;
        };
        if data_file && j.kind == Kind::Dir {
            return Err(Error::invalid(
                &image,
                "has an external data file, which cowshed does not re-point: move this image \
                 on its own (its data file stays where it is)",
            ));
        }
        let Some(name) = name else {
            continue;
        };
        let BackingName::Path(p) = classify_backing(&image, &name) else {
            continue;
        };
        let target = match absolute_through_dir(&p) {
            Ok(t) if exists(&t)? => t,
            _ => {
                notes.push(format!(
                    "{}: its backing file '{name}' is missing; its name is left as it was",
                    image_after.display()
                ));
                continue;
            }
        };
        let inside = target
            .strip_prefix(&j.src)
            .ok()
            .filter(|rel| j.kind == Kind::Dir && moved.contains(rel));
        let target_after = inside.map_or_else(|| target.clone(), |rel| j.new_of(rel));
        let dir_after = parent_or_dot(&image_after);
        let Some(final_name) =
            new_name(&image, &dir_after, &name, &target_after, inside.is_some())?
        else {
            continue;
        };
        out.push(Rewrite {
            stages: stages(
                j.how,
                true,
                inside.is_some(),
                &target,
                &target_after,
                final_name,
            ),
            image,
            image_after,
            old: name,
            target,
            target_after,
            format,
        });
    }
    Ok(out)
}

/// The dependents outside the moved tree (in SRC's directory and the
/// roots) and their new names; those whose file ids are in `known` are
/// left out (a re-run looking for dependents that appeared meanwhile).
fn dependent_rewrites(
    j: &Journal,
    roots: &[PathBuf],
    known: &HashSet<(u64, u64)>,
) -> Result<Vec<Rewrite>> {
    let mut files = Vec::new();
    for e in j.entries.iter().filter(|e| e.what == EntryKind::File) {
        let old = j.old_of(&e.rel);
        if exists(&old)? {
            files.push((old, j.new_of(&e.rel)));
        }
    }
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let targets: Vec<&Path> = files.iter().map(|f| f.0.as_path()).collect();
    let scope = Scope {
        dirs: vec![parent_or_dot(&j.src)],
        roots: roots.to_vec(),
    };
    let mut out = Vec::new();
    for (i, d) in find_dependents_of_any(&targets, &scope)? {
        let image = absolute_through_dir(&d.path)?;
        let ours = |p: &Path| {
            (j.kind == Kind::Dir && p.starts_with(&j.src))
                || p.starts_with(&j.temp)
                || p.starts_with(&j.dst)
        };
        if ours(&image) || file_id(&image)?.is_some_and(|id| known.contains(&id)) {
            continue;
        }
        let (target, target_after) = &files[i];
        let dir = parent_or_dot(&image);
        let Some(final_name) = new_name(&image, &dir, &d.backing_name, target_after, true)? else {
            continue;
        };
        out.push(Rewrite {
            image: image.clone(),
            image_after: image,
            old: d.backing_name,
            stages: stages(j.how, false, true, target, target_after, final_name),
            target: target.clone(),
            target_after: target_after.clone(),
            format: d.backing_format,
        });
    }
    Ok(out)
}

/// Refuse a copy that would not fit on DST's file system.
fn ensure_room_for_copy(j: &Journal) -> Result<()> {
    let mut needed = 0u64;
    for e in j.entries.iter().filter(|e| e.what == EntryKind::File) {
        let old = j.old_of(&e.rel);
        if exists(&old)? {
            needed += copy::data_bytes(&old)?;
        }
    }
    space::ensure_fits(&j.dst, needed)
}

// ----------------------------------------------------------------- run --

/// QEMU's writer locks on every file the move touches, held until it ends;
/// header editors for those whose backing name changes.
#[derive(Default)]
struct Held {
    editors: HashMap<(u64, u64), HeaderEditor>,
    locks: HashMap<(u64, u64), ImageLock>,
}

impl Held {
    fn lock(&mut self, path: &Path) -> Result<()> {
        let Some(id) = file_id(path)? else {
            return Ok(());
        };
        if self.editors.contains_key(&id) || self.locks.contains_key(&id) {
            return Ok(());
        }
        let file = File::open(path).at(path)?;
        let lock = ImageLock::acquire(&file, path, LockMode::WRITER)?;
        self.locks.insert(id, lock);
        Ok(())
    }

    fn editor(&mut self, path: &Path) -> Result<&mut HeaderEditor> {
        let id = file_id(path)?
            .ok_or_else(|| Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)))?;
        match self.editors.entry(id) {
            std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::hash_map::Entry::Vacant(v) => {
                // Our own plain lock would make the editor's look like a
                // QEMU's: it goes first.
                self.locks.remove(&id);
                Ok(v.insert(HeaderEditor::open(path)?))
            }
        }
    }
}

struct Run {
    j: Journal,
    held: Held,
    roots: Vec<PathBuf>,
    resumed: bool,
    /// A dependent may have been re-pointed: no undoing from here.
    repointing_began: bool,
    left_behind: Vec<PathBuf>,
    notes: Vec<String>,
}

impl Run {
    fn new(j: Journal, opts: &MoveOptions, resumed: bool) -> Run {
        let roots = opts
            .roots
            .iter()
            .map(|r| std::path::absolute(r).unwrap_or_else(|_| r.clone()))
            .collect();
        // A killed run may have re-pointed some dependents already.
        let repointing_began = j.step >= Step::Placed && j.step != Step::RollingBack;
        Run {
            j,
            held: Held::default(),
            roots,
            resumed,
            repointing_began,
            left_behind: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Lock every file the move touches; check each header still stores
    /// what the plan expects and (`check_names`) that every new name fits.
    fn acquire_all(&mut self, check_names: bool) -> Result<()> {
        let src = self.j.src.clone();
        for rw in &self.j.rewrites {
            let mut places = vec![rw.image.clone()];
            if rw.moved() {
                places.push(rw.image_after.clone());
            }
            for at in places {
                if !exists(&at)? {
                    continue;
                }
                let editor = self
                    .held
                    .editor(&at)
                    .map_err(|e| cannot_rewrite(&at, rw, &src, e))?;
                let h = editor.header();
                match h.backing_file.as_deref() {
                    Some(name) if rw.known(name) => {}
                    other => {
                        return Err(Error::invalid(
                            &at,
                            format!(
                                "its backing name changed while the move was prepared (it is \
                                 {}, the move expected '{}'): nothing was moved; try again",
                                other.map_or("none".into(), |n| format!("'{n}'")),
                                rw.old
                            ),
                        ))
                    }
                }
                if check_names {
                    for s in &rw.stages {
                        check_fits(h, &at, Some(&s.name), rw.format.as_deref())
                            .map_err(|e| cannot_rewrite(&at, rw, &src, e))?;
                    }
                }
            }
        }
        for e in &self.j.entries {
            if e.what == EntryKind::File {
                self.held.lock(&self.j.old_of(&e.rel))?;
                self.held.lock(&self.j.new_of(&e.rel))?;
            }
        }
        Ok(())
    }

    fn execute(mut self, progress: &Progress, cancel: &Cancel) -> Result<MoveReport> {
        match self.forward(progress, cancel) {
            Ok(()) => Ok(self.report()),
            Err(e) if !self.repointing_began => match self.rollback() {
                Ok(()) => Err(e),
                Err(undo) => Err(Error::invalid(
                    self.j.path(),
                    format!(
                        "{e}; undoing the move failed too ({undo}): every image still opens; run \
                         the same command again to finish"
                    ),
                )),
            },
            Err(e) => Err(Error::invalid(
                self.j.path(),
                format!(
                    "{e}. The move is half done: every image still opens and reads as before; \
                     run the same command again to complete it"
                ),
            )),
        }
    }

    fn forward(&mut self, progress: &Progress, cancel: &Cancel) -> Result<()> {
        loop {
            match self.j.step {
                Step::Started => {
                    self.apply_phase(Phase::BeforePlace, Some(cancel))?;
                    self.place(progress, cancel)?;
                }
                Step::Verified => self.rename_into_place()?,
                Step::Placed => {
                    if self.resumed {
                        self.add_new_dependents()?;
                    }
                    cancel.check()?;
                    self.repointing_began = true;
                    self.apply_phase(Phase::Repoint, None)?;
                    self.j.save(Step::Repointed)?;
                }
                Step::Repointed => {
                    if self.resumed && self.add_new_dependents()? {
                        self.j.save(Step::Placed)?;
                        continue;
                    }
                    self.remove_src()?;
                    self.j.save(Step::Removed)?;
                }
                Step::Removed => {
                    self.apply_phase(Phase::AfterRemove, None)?;
                    return self.j.remove();
                }
                Step::RollingBack => {
                    return Err(Error::invalid(
                        self.j.path(),
                        "internal: a move being undone was carried on",
                    ))
                }
            }
        }
    }

    /// Put DST in place: a hard link (or a tree of them), or a verified
    /// copy, under a temporary name first where it is more than one link.
    fn place(&mut self, progress: &Progress, cancel: &Cancel) -> Result<()> {
        let j = &self.j;
        if j.how == How::Link && j.kind == Kind::File {
            match std::fs::hard_link(&j.src, &j.dst) {
                Ok(()) => {}
                // Linked by a run killed before it said so.
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        && file_id(&j.dst)? == file_id(&j.src)? => {}
                Err(e) => return Err(Error::io(&j.dst, e)),
            }
            fault::point("mv.linked");
            fsync_dir(&parent_or_dot(&j.dst))?;
            fault::point("mv.placed");
            return self.j.save(Step::Placed);
        }
        if exists(&j.dst)? {
            return Err(Error::invalid(
                &j.dst,
                "appeared while the move was under way: it is not replaced; nothing was moved",
            ));
        }
        remove_tree(&j.temp)?;
        if j.how == How::Copy {
            ensure_room_for_copy(j)?;
            let mut total = 0;
            for e in j.entries.iter().filter(|e| e.what == EntryKind::File) {
                total += copy::data_bytes(&j.old_of(&e.rel))?;
            }
            progress.set_total(2 * total);
        }
        let stamps = self.build_temp(progress, cancel)?;
        self.j.stamps = stamps;
        self.j.save(Step::Verified)?;
        self.rename_into_place()
    }

    /// The tree (or file) under the temporary name, complete and durable.
    fn build_temp(&self, progress: &Progress, cancel: &Cancel) -> Result<Vec<Stamp>> {
        let j = &self.j;
        let mut stamps = Vec::new();
        let mut dirs = Vec::new();
        for e in &j.entries {
            cancel.check()?;
            let (from, to) = (j.old_of(&e.rel), j.temp_of(&e.rel));
            match &e.what {
                EntryKind::Dir => {
                    std::fs::create_dir(&to).at(&to)?;
                    dirs.push((from, to));
                }
                EntryKind::Symlink(target) => {
                    std::os::unix::fs::symlink(target, &to).at(&to)?;
                }
                EntryKind::File if j.how == How::Link => {
                    std::fs::hard_link(&from, &to).at(&to)?;
                    fault::point("mv.linked");
                }
                EntryKind::File => {
                    let m = std::fs::metadata(&from).at(&from)?;
                    copy::copy_verified(&from, &to, progress, cancel)?;
                    stamps.push(Stamp {
                        rel: e.rel.clone(),
                        len: m.len(),
                        mtime_ns: mtime_ns(&m),
                        ino: m.ino(),
                    });
                }
            }
        }
        // Deepest first: a read-only directory is filled before it is made
        // read-only.
        for (from, to) in dirs.iter().rev() {
            fsync_dir(to)?;
            let perms = std::fs::metadata(from).at(from)?.permissions();
            std::fs::set_permissions(to, perms).at(to)?;
        }
        fsync_dir(&parent_or_dot(&j.temp))?;
        Ok(stamps)
    }

    fn rename_into_place(&mut self) -> Result<()> {
        let j = &self.j;
        if exists(&j.temp)? {
            rename_noreplace(&j.temp, &j.dst)?;
            fsync_dir(&parent_or_dot(&j.dst))?;
        } else if !exists(&j.dst)? {
            return Err(Error::invalid(
                &j.dst,
                format!(
                    "the move's journal says its copy was complete, but neither '{}' nor this \
                     exists: look at the journal '{}'",
                    j.temp.display(),
                    j.path().display()
                ),
            ));
        }
        fault::point("mv.placed");
        self.j.save(Step::Placed)
    }

    /// On a re-run: images that started using a moved file since the
    /// journal was written get re-pointed too (true if there were any).
    fn add_new_dependents(&mut self) -> Result<bool> {
        let mut known = HashSet::new();
        for rw in &self.j.rewrites {
            if let Some(id) = file_id(&rw.image)? {
                known.insert(id);
            }
        }
        let new = dependent_rewrites(&self.j, &self.roots, &known)?;
        if new.is_empty() {
            return Ok(false);
        }
        for rw in &new {
            let editor = self
                .held
                .editor(&rw.image)
                .map_err(|e| cannot_rewrite(&rw.image, rw, &self.j.src, e))?;
            for s in &rw.stages {
                check_fits(
                    editor.header(),
                    &rw.image,
                    Some(&s.name),
                    rw.format.as_deref(),
                )?;
            }
        }
        self.j.rewrites.extend(new);
        self.j.save(self.j.step)?;
        Ok(true)
    }

    /// Every rewrite that has a stage in `phase`: the moved images first
    /// (nothing may point at a moved image whose own chain does not open
    /// yet from its new place), then the dependents. `cancel` is looked at
    /// between writes where the move can still be undone.
    fn apply_phase(&mut self, phase: Phase, cancel: Option<&Cancel>) -> Result<()> {
        let mut order: Vec<usize> = (0..self.j.rewrites.len()).collect();
        order.sort_by_key(|&i| !self.j.rewrites[i].moved());
        for i in order {
            if let Some(c) = cancel {
                c.check()?;
            }
            let rw = self.j.rewrites[i].clone();
            if !rw.stages.iter().any(|s| s.phase == phase) {
                continue;
            }
            let at = if rw.moved() && phase == Phase::BeforePlace {
                rw.image.clone()
            } else {
                rw.image_after.clone()
            };
            if !exists(&at)? {
                if rw.moved() {
                    return Err(Error::invalid(
                        &at,
                        "is missing: the moved image was removed?",
                    ));
                }
                // A dependent deleted meanwhile uses nothing.
                continue;
            }
            let want = rw.name_after(phase).to_string();
            self.write_name(&rw, &at, &want)?;
            fault::point(match phase {
                Phase::BeforePlace => "mv.rewrite.before_place",
                Phase::Repoint => "mv.rewrite.repoint",
                Phase::AfterRemove => "mv.rewrite.final",
            });
        }
        Ok(())
    }

    /// Store `want` as `rw`'s backing name in the image at `at`, unless it
    /// is there already; only over a name the move knows, and only if it
    /// leads to the backing file from every name the image has now.
    fn write_name(&mut self, rw: &Rewrite, at: &Path, want: &str) -> Result<()> {
        let editor = self.held.editor(at)?;
        let current = editor.header().backing_file.clone();
        if current.as_deref() == Some(want) {
            return Ok(());
        }
        if !current.as_deref().is_some_and(|c| rw.known(c)) {
            return Err(Error::invalid(
                at,
                format!(
                    "its backing name is now {}, which the move did not write: left as it is",
                    current.map_or("none".into(), |c| format!("'{c}'"))
                ),
            ));
        }
        let expected = match file_id(&rw.target_after)? {
            Some(id) => id,
            None => file_id(&rw.target)?.ok_or_else(|| {
                Error::invalid(
                    at,
                    format!("its backing file '{}' is gone", rw.target.display()),
                )
            })?,
        };
        let mut places = vec![at.to_path_buf()];
        if rw.moved() && self.j.how == How::Link {
            places.extend([rw.image.clone(), rw.image_after.clone()]);
        }
        for p in places {
            if !exists(&p)? {
                continue;
            }
            if file_id(&combine_path(&p, want))? != Some(expected) {
                return Err(Error::invalid(
                    &p,
                    format!(
                        "internal: the backing name '{want}' would not lead to '{}' from here; \
                         not written",
                        rw.target_after.display()
                    ),
                ));
            }
        }
        let editor = self.held.editor(at)?;
        check_fits(editor.header(), at, Some(want), rw.format.as_deref())?;
        editor.set_backing(Some(want), rw.format.as_deref())
    }

    /// Remove SRC: each file only if it is still what was moved.
    fn remove_src(&mut self) -> Result<()> {
        let j = &self.j;
        let stamps: HashMap<&Path, &Stamp> =
            j.stamps.iter().map(|s| (s.rel.as_path(), s)).collect();
        let mut left = Vec::new();
        for e in j.entries.iter().rev() {
            let (old, new) = (j.old_of(&e.rel), j.new_of(&e.rel));
            match &e.what {
                EntryKind::File => {
                    let Some(id) = file_id(&old)? else {
                        continue;
                    };
                    let same = match j.how {
                        How::Link => file_id(&new)? == Some(id),
                        How::Copy => {
                            let m = std::fs::metadata(&old).at(&old)?;
                            stamps.get(e.rel.as_path()).is_some_and(|s| {
                                s.len == m.len() && s.mtime_ns == mtime_ns(&m) && s.ino == m.ino()
                            })
                        }
                    };
                    if !same {
                        return Err(Error::invalid(
                            &old,
                            format!(
                                "changed since it was moved to '{}' (written or replaced \
                                 meanwhile): it is not deleted; every image now uses '{}'",
                                new.display(),
                                new.display()
                            ),
                        ));
                    }
                    std::fs::remove_file(&old).at(&old)?;
                    fault::point("mv.removed");
                }
                EntryKind::Symlink(target) => {
                    if std::fs::read_link(&old).ok().as_ref() == Some(target) {
                        std::fs::remove_file(&old).at(&old)?;
                    }
                }
                EntryKind::Dir => match std::fs::remove_dir(&old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                        fsync_dir(&old)?;
                        left.push(old);
                    }
                    Err(e) => return Err(Error::io(&old, e)),
                },
            }
        }
        fsync_dir(&parent_or_dot(&j.src))?;
        left.reverse();
        self.left_behind = left;
        Ok(())
    }

    /// Undo a move no dependent was re-pointed for: DST (or the temporary
    /// copy) goes, the moved images get their old names back.
    fn rollback(&mut self) -> Result<()> {
        if self.j.step != Step::RollingBack {
            // DST is this move's once renamed into place; before, a DST
            // that exists is someone else's (only a single file's hard
            // link is made in place, and it is told by its inode).
            self.j.undo_removes_dst = self.j.step >= Step::Placed
                || (self.j.step == Step::Verified && !exists(&self.j.temp)?);
            self.j.save(Step::RollingBack)?;
        }
        let j = &self.j;
        remove_tree(&j.temp)?;
        fault::point("mv.rollback");
        if exists(&j.dst)? {
            let ours = j.undo_removes_dst;
            for e in j.entries.iter().rev() {
                let (old, new) = (j.old_of(&e.rel), j.new_of(&e.rel));
                match &e.what {
                    // No image uses DST yet: nothing was re-pointed.
                    EntryKind::File => {
                        let id = file_id(&new)?;
                        let remove = match j.how {
                            How::Link => id.is_some() && id == file_id(&old)?,
                            How::Copy => ours && id.is_some(),
                        };
                        if remove {
                            std::fs::remove_file(&new).at(&new)?;
                        }
                    }
                    EntryKind::Symlink(_) if ours => remove_if_present(&new)?,
                    EntryKind::Dir if ours => match std::fs::remove_dir(&new) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        // Something else was put there: it stays.
                        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                        Err(e) => return Err(Error::io(&new, e)),
                    },
                    _ => {}
                }
            }
            fsync_dir(&parent_or_dot(&j.dst))?;
            fault::point("mv.rollback");
        }
        for rw in self.j.rewrites.clone() {
            if rw.moved() && rw.stages.iter().any(|s| s.phase == Phase::BeforePlace) {
                self.write_old_name(&rw)?;
                fault::point("mv.rollback");
            }
        }
        self.j.remove()
    }

    fn write_old_name(&mut self, rw: &Rewrite) -> Result<()> {
        let editor = self.held.editor(&rw.image)?;
        match editor.header().backing_file.as_deref() {
            Some(c) if c == rw.old => Ok(()),
            Some(c) if rw.known(c) => editor.set_backing(Some(&rw.old), rw.format.as_deref()),
            _ => Err(Error::invalid(
                &rw.image,
                "its backing name was changed by someone else meanwhile: left as it is",
            )),
        }
    }

    fn report(self) -> MoveReport {
        MoveReport {
            copied: self.j.how == How::Copy,
            resumed: self.resumed,
            rewritten: self
                .j
                .rewrites
                .iter()
                .map(|rw| Renamed {
                    image: rw.image_after.clone(),
                    old: rw.old.clone(),
                    new: rw.final_name().to_string(),
                    moved: rw.moved(),
                })
                .collect(),
            left_behind: self.left_behind,
            notes: self.notes,
            src: self.j.src,
            dst: self.j.dst,
        }
    }
}

/// A dependent (or moved image) whose header cannot take its new name:
/// the error says which move needed it.
fn cannot_rewrite(at: &Path, rw: &Rewrite, src: &Path, e: Error) -> Error {
    let why = if rw.moved() {
        "its own backing name must change with the move".to_string()
    } else {
        format!("it uses '{}' as backing file", rw.target.display())
    };
    match e {
        Error::Locked { path, detail } => Error::Locked {
            path,
            detail: format!("{detail}; {why}, so '{}' is not moved", src.display()),
        },
        e => Error::invalid(
            at,
            format!("cannot be re-pointed ({why}): {e}; nothing was moved"),
        ),
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// Remove what the move built under its temporary name, if anything.
fn remove_tree(p: &Path) -> Result<()> {
    match p.symlink_metadata() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(p, e)),
        Ok(m) if m.is_dir() => {
            // A read-only directory copied from SRC cannot be emptied as
            // it is.
            for entry in walkdir::WalkDir::new(p).follow_links(false) {
                let entry = entry.map_err(|e| Error::io(p, e.into()))?;
                if entry.file_type().is_dir() {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(
                        entry.path(),
                        std::fs::Permissions::from_mode(0o700),
                    );
                }
            }
            std::fs::remove_dir_all(p).at(p)?;
            fsync_dir(&parent_or_dot(p))
        }
        Ok(_) => {
            std::fs::remove_file(p).at(p)?;
            fsync_dir(&parent_or_dot(p))
        }
    }
}
