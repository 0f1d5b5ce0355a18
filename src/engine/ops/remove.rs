//! `rm`: delete images nothing depends on, for good or into the trash, and
//! with `stream`, take a layer out of the middle of a chain.
//!
//! Everything is checked before anything is deleted: each file is an image
//! (not a link, not something else), no QEMU holds it (QEMU's writer locks
//! are taken on every file and held until it is gone, so a QEMU starting
//! meanwhile cannot open it), and no image outside the set being deleted
//! uses it as its backing file. One refusal and nothing is touched. Images
//! named together go leaves first, so a kill part way never leaves an
//! image whose backing file is gone.
//!
//! Streaming rebases every direct dependent (safe mode: the guest view is
//! kept) onto the file's own backing, or flattens them when it has none,
//! then deletes it. Every dependent is checked for holders and the free
//! space all the rebases need before the first one starts. At any point a
//! dependent points either at the file, which still exists, or at its
//! backing with the same view; the same command run again finishes the
//! job.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::engine::chain::{classify_backing, relative_backing_name, BackingName};
use crate::engine::dependents::{find_dependents, parent_dir, Dependent, Scope};
use crate::engine::error::{Error, IoContext, Result};
use crate::engine::fault;
use crate::engine::format::{named_like_an_image, open_image_file, probe, probe_file, Format};
use crate::engine::lock::{ImageLock, LockMode};
use crate::engine::ops::rebase::{rebase, rebase_space_needed, RebaseOptions};
use crate::engine::preflight::{ensure_no_vm_users, VmUsers};
use crate::engine::progress::{Cancel, Progress};
use crate::engine::qcow2::header::Header;
use crate::engine::{space, trash};

#[derive(Debug, Clone, Default)]
pub struct RemoveOptions {
    /// Directories searched (recursively) for dependents besides each
    /// file's own directory.
    pub roots: Vec<PathBuf>,
    /// Rebase the dependents onto the file's backing first.
    pub stream: bool,
    /// Move into the trash instead of deleting for good.
    pub trash: bool,
    /// Defined virtual machines: an image one of them uses is refused.
    pub vms: crate::engine::preflight::VmUsers,
}

/// What became of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gone {
    Deleted(PathBuf),
    /// Moved into this trash item.
    Trashed {
        path: PathBuf,
        item: PathBuf,
    },
}

/// A dependent streamed onto the deleted file's backing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    pub dependent: PathBuf,
    /// Its new backing name ("" when flattened).
    pub backing: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    pub streamed: Vec<Streamed>,
    /// In the order they went.
    pub gone: Vec<Gone>,
}

/// A file about to go, with QEMU's locks held on it.
struct Target {
    path: PathBuf,
    id: (u64, u64),
    _lock: ImageLock,
    dependents: Vec<Dependent>,
}

/// Delete `files` as `opts` says; nothing is deleted unless every file
/// passes the checks.
pub fn remove(
    files: &[PathBuf],
    opts: &RemoveOptions,
    progress: &Progress,
    cancel: &Cancel,
) -> Result<Removal> {
    let targets = claim(files, &opts.roots, &opts.vms)?;
    let ids: HashSet<(u64, u64)> = targets.iter().map(|t| t.id).collect();
    // Dependents named in the same command go too.
    let outside = |t: &Target| -> Result<Vec<Dependent>> {
        let mut v = Vec::new();
        for d in &t.dependents {
            let m = std::fs::metadata(&d.path).at(&d.path)?;
            if !ids.contains(&(m.dev(), m.ino())) {
                v.push(d.clone());
            }
        }
        Ok(v)
    };
    let mut plans = Vec::new();
    for t in &targets {
        let deps = outside(t)?;
        if opts.stream {
            if deps.len() != t.dependents.len() {
                return Err(Error::invalid(
                    &t.path,
                    "--stream takes one layer out of a chain at a time: another file named \
                     here uses it as its backing file; stream them in separate commands",
                ));
            }
            plans.push(plan_stream(&t.path, deps)?);
        } else if !deps.is_empty() {
            return Err(has_dependents(&t.path, &deps));
        }
    }
    if opts.stream {
        check_stream_space(&plans)?;
    }

    let mut removal = Removal::default();
    if opts.stream {
        let total: u64 = plans.iter().flat_map(|p| &p.rebases).map(|r| r.size).sum();
        let single = plans.iter().map(|p| p.rebases.len()).sum::<usize>() == 1;
        progress.set_total(total);
        for plan in &plans {
            for r in &plan.rebases {
                cancel.check()?;
                // One rebase reports its own progress; several advance the
                // bar one dependent at a time.
                let own = Progress::new();
                let p = if single { progress } else { &own };
                rebase(&r.dependent, &r.opts, p, cancel)?;
                if !single {
                    progress.advance(r.size);
                    progress.add_copied(own.copied());
                }
                fault::point("rm.stream.rebased");
                removal.streamed.push(Streamed {
                    dependent: r.dependent.clone(),
                    backing: r.opts.backing.clone(),
                });
            }
        }
    }
    for t in leaves_first(targets) {
        cancel.check()?;
        fault::point("rm.before_unlink");
        removal.gone.push(if opts.trash {
            let item = trash::move_in(&t.path)?;
            Gone::Trashed {
                path: t.path.clone(),
                item,
            }
        } else {
            std::fs::remove_file(&t.path).at(&t.path)?;
            let dir = parent_dir(&t.path);
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            File::open(&dir).and_then(|d| d.sync_all()).at(&dir)?;
            Gone::Deleted(t.path.clone())
        });
        // The locks go with the file, not before.
        drop(t);
    }
    Ok(removal)
}

fn has_dependents(path: &Path, deps: &[Dependent]) -> Error {
    let names: Vec<String> = deps
        .iter()
        .map(|d| format!("'{}'", d.path.display()))
        .collect();
    let (them, they) = if deps.len() == 1 {
        ("that image", "it")
    } else {
        ("those images", "them")
    };
    Error::invalid(
        path,
        format!(
            "is the backing file of {}: deleting it would break {them}; name {they} in the same \
             command to delete {they} too, or use --stream to rebase {they} onto this image's \
             backing first",
            names.join(", "),
        ),
    )
}

/// Check each file and take QEMU's writer locks on it (held by the
/// returned targets); find its dependents.
fn claim(files: &[PathBuf], roots: &[PathBuf], vms: &VmUsers) -> Result<Vec<Target>> {
    if files.is_empty() {
        return Err(Error::invalid("rm", "no file given"));
    }
    let mut targets: Vec<Target> = Vec::new();
    for path in files {
        let m = std::fs::symlink_metadata(path).at(path)?;
        if m.file_type().is_symlink() {
            return Err(Error::invalid(
                path,
                "is a symbolic link: deleting it would not delete the image it points to; give \
                 the image's own path",
            ));
        }
        if !m.is_file() {
            return Err(Error::invalid(
                path,
                "is not a regular file: cowshed rm deletes image files only",
            ));
        }
        let file = open_image_file(path)?;
        let format = probe_file(&file, path)?;
        if format == Format::Raw && !named_like_an_image(path) {
            return Err(Error::invalid(
                path,
                "is no disk image cowshed recognises (no image header, and raw images are named \
                 .raw or .img): not deleted",
            ));
        }
        let id = (m.dev(), m.ino());
        if targets.iter().any(|t| t.id == id) {
            continue;
        }
        let lock = ImageLock::acquire(&file, path, LockMode::WRITER).map_err(|e| match e {
            Error::Locked { path, detail } => Error::Locked {
                path,
                detail: format!("{detail}; an image in use is never deleted"),
            },
            e => e,
        })?;
        ensure_no_vm_users(path, vms)?;
        let dependents = find_dependents(path, &Scope::around(path, roots))?;
        targets.push(Target {
            path: path.clone(),
            id,
            _lock: lock,
            dependents,
        });
    }
    Ok(targets)
}

/// Targets ordered so that a file named here that uses another as its
/// backing goes before it. Files in a loop (hostile headers) go in the
/// order given.
fn leaves_first(mut targets: Vec<Target>) -> Vec<Target> {
    let mut out = Vec::with_capacity(targets.len());
    while !targets.is_empty() {
        let ids: HashSet<(u64, u64)> = targets.iter().map(|t| t.id).collect();
        // A target still used by another remaining target waits.
        let used: HashSet<(u64, u64)> = targets
            .iter()
            .filter(|t| {
                t.dependents.iter().any(|d| {
                    std::fs::metadata(&d.path).is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
                })
            })
            .map(|t| t.id)
            .collect();
        let i = targets
            .iter()
            .position(|t| !used.contains(&t.id))
            .unwrap_or(0);
        out.push(targets.remove(i));
    }
    out
}

struct PlannedRebase {
    dependent: PathBuf,
    opts: RebaseOptions,
    /// Its virtual size, for the progress bar.
    size: u64,
    /// The most a safe rebase may add to it.
    needed: u64,
}

struct StreamPlan {
    rebases: Vec<PlannedRebase>,
}

/// How each dependent of `path` is rebased onto its backing, checked: the
/// backing can be opened, no QEMU holds a dependent, and the rebase can
/// keep each dependent's bitmaps.
fn plan_stream(path: &Path, deps: Vec<Dependent>) -> Result<StreamPlan> {
    if deps.is_empty() {
        return Ok(StreamPlan {
            rebases: Vec::new(),
        });
    }
    let (backing_name, backing_format) = match probe(path)? {
        Format::Qcow2 => {
            let file = open_image_file(path)?;
            let len = file.metadata().at(path)?.len();
            let h = Header::read(&file, path, len)?;
            (h.backing_file, h.extensions.backing_format)
        }
        Format::Raw => (None, None),
        Format::Other(o) => {
            return Err(Error::invalid(
                path,
                format!(
                    "is a {} image: cowshed cannot tell what its dependents would be rebased onto",
                    o.name()
                ),
            ))
        }
    };
    let target = match &backing_name {
        None => None,
        Some(name) => {
            let BackingName::Path(resolved) = classify_backing(path, name) else {
                return Err(Error::UnfollowedBacking {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    kind: "json: or protocol",
                });
            };
            let format = match backing_format.as_deref() {
                Some(f) => Format::from_name(f).ok_or_else(|| Error::UnknownFormat {
                    path: path.to_path_buf(),
                    format: f.to_string(),
                })?,
                None => probe(&resolved)
                    .map_err(|e| Error::invalid(path, format!("its backing file '{name}': {e}")))?,
            };
            Some((name.clone(), resolved, format))
        }
    };
    let mut rebases = Vec::new();
    for d in deps {
        let opts = match &target {
            None => RebaseOptions::default(),
            Some((name, resolved, format)) => {
                let backing = if Path::new(name).is_absolute() {
                    name.clone()
                } else {
                    relative_backing_name(&d.path, resolved).ok_or_else(|| {
                        Error::invalid(
                            &d.path,
                            format!(
                                "cannot name '{}' relative to it (a directory is missing, or a \
                                 name is not UTF-8)",
                                resolved.display()
                            ),
                        )
                    })?
                };
                RebaseOptions {
                    backing,
                    backing_format: Some(*format),
                    unsafe_header_only: false,
                    // Streaming keeps each dependent's guest view.
                    vms: Default::default(),
                }
            }
        };
        // Opens it under QEMU's writer locks (so a holder refuses it here,
        // before any rebase), checks its metadata, both chains and the new
        // header, and measures what the copy may add.
        let needed = rebase_space_needed(&d.path, &opts).map_err(|e| match e {
            Error::Locked { path: held, detail } => Error::Locked {
                path: held,
                detail: format!(
                    "{detail}; it uses '{}' as its backing file and would have been rebased: \
                     nothing was changed",
                    path.display()
                ),
            },
            e => e,
        })?;
        let file = open_image_file(&d.path)?;
        let len = file.metadata().at(&d.path)?.len();
        let h = Header::read(&file, &d.path, len)?;
        if needed > 0 && h.extensions.bitmaps.is_some() {
            return Err(Error::invalid(
                &d.path,
                "has persistent bitmaps, which cowshed cannot keep up to date while it copies \
                 data in: it cannot be rebased safely, so its backing file is not streamed out",
            ));
        }
        rebases.push(PlannedRebase {
            dependent: d.path,
            opts,
            size: h.size,
            needed,
        });
    }
    Ok(StreamPlan { rebases })
}

/// Every rebase must fit: what they may add, summed per file system.
fn check_stream_space(plans: &[StreamPlan]) -> Result<()> {
    let mut per_fs: HashMap<u64, (PathBuf, u64)> = HashMap::new();
    for r in plans.iter().flat_map(|p| &p.rebases) {
        let dev = std::fs::metadata(&r.dependent).at(&r.dependent)?.dev();
        per_fs
            .entry(dev)
            .or_insert_with(|| (r.dependent.clone(), 0))
            .1 += r.needed;
    }
    for (path, needed) in per_fs.values() {
        space::ensure_fits(path, *needed)?;
    }
    Ok(())
}
