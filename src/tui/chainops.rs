//! Rebase (`b`), flatten (`f`) and convert (`v`) from the tree: the plans
//! their dialogs show, built from the forest in memory on a key press (no
//! I/O on the key path), the dialogs' key handling, and the jobs they
//! queue. The engine does the work, takes QEMU's locks and checks free
//! space; these only decide what to ask it.

use std::path::{Path, PathBuf};

use ratatui::crossterm::event::KeyCode;

use super::app::{file_name, App, JobView, Mode, Status};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::convert::{convert, ConvertOptions};
use crate::engine::ops::rebase::{rebase, RebaseOptions};
use crate::engine::qcow2::header::CompressionType;
use crate::engine::LockState;
use crate::engine::{CreateOptions, Format};
use crate::jobs::Work;

/// `b` pressed: the user picks the new backing in the tree, or types a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingPick {
    pub image: PathBuf,
    pub image_key: PathBuf,
    /// Some while a path is being typed (`t`).
    pub typed: Option<String>,
    /// A typed name being probed on the inspector thread: the dialog opens
    /// when the answer says it is an image cowshed can use.
    pub probing: Option<String>,
}

/// The rebase dialog: what will be written into the header, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebasePlan {
    pub image: PathBuf,
    pub image_key: PathBuf,
    /// Stored in the header as is (relative to the image's directory when
    /// the backing is beside or below it).
    pub backing_name: String,
    /// The new backing's key when it is a scanned image.
    pub backing_key: Option<PathBuf>,
    pub format: Format,
    /// `-u`: the header only.
    pub unsafe_mode: bool,
    /// Why safe mode cannot work here (the old backing is missing): unsafe
    /// is then the default and `s` says this instead.
    pub safe_refused: Option<String>,
}

/// The flatten confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlattenPlan {
    pub image: PathBuf,
    /// The image and every image of its chain (read, so no job may change
    /// them meanwhile).
    pub chain_keys: Vec<PathBuf>,
    pub backing: String,
    /// What the chain below allocates: about what gets copied, at most.
    pub below: u64,
    /// The file system may be too small for that.
    pub space_warning: Option<String>,
}

/// The convert dialog's fields, in the order Up/Down visits them.
pub const CONVERT_FIELDS: [&str; 5] = [
    "destination",
    "format",
    "compression",
    "cluster size",
    "keep backing (-B)",
];
pub const CLUSTER_SIZES: [u64; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertPlan {
    pub source: PathBuf,
    pub source_key: PathBuf,
    /// The source's backing name and format, when it has one (-B keeps it).
    pub backing: Option<(String, Format)>,
    pub dest: String,
    pub format: Format,
    pub compression: Option<CompressionType>,
    pub cluster_size: u64,
    pub keep_backing: bool,
    /// Index into [`CONVERT_FIELDS`].
    pub field: usize,
    /// What the chain allocates: what a copy needs at most.
    pub allocated: u64,
    /// The destination's file system may be too small for that.
    pub space_warning: Option<String>,
}

impl ConvertPlan {
    /// Whether field `i` means anything with the current choices.
    pub fn applies(&self, i: usize) -> bool {
        match i {
            2 | 3 => self.format == Format::Qcow2,
            4 => self.format == Format::Qcow2 && self.backing.is_some(),
            _ => true,
        }
    }

    pub fn compression_name(&self) -> &'static str {
        match self.compression {
            None => "none",
            Some(CompressionType::Deflate) => "zlib",
            Some(CompressionType::Zstd) => "zstd",
        }
    }

    /// Left/Right/Space on the focused field.
    fn cycle(&mut self, forward: bool) {
        let step = |i: usize, n: usize| {
            if forward {
                (i + 1) % n
            } else {
                (i + n - 1) % n
            }
        };
        match self.field {
            1 => {
                let (old, new) = match self.format {
                    Format::Qcow2 => (".qcow2", Format::Raw),
                    _ => (".raw", Format::Qcow2),
                };
                self.format = new;
                // A name still ending as the default did follows the format.
                if let Some(stem) = self.dest.strip_suffix(old) {
                    self.dest = format!("{stem}.{}", new.name());
                }
            }
            2 => {
                let all = [
                    None,
                    Some(CompressionType::Deflate),
                    Some(CompressionType::Zstd),
                ];
                let i = all.iter().position(|c| *c == self.compression).unwrap_or(0);
                self.compression = all[step(i, all.len())];
            }
            3 => {
                let i = CLUSTER_SIZES
                    .iter()
                    .position(|&c| c == self.cluster_size)
                    .unwrap_or(2);
                self.cluster_size = CLUSTER_SIZES[step(i, CLUSTER_SIZES.len())];
            }
            4 => self.keep_backing = !self.keep_backing,
            _ => {}
        }
    }
}

/// The qcow2 image at `id`, or why the operation cannot start from it.
fn qcow2_node(f: &Forest, id: NodeId) -> Result<(), String> {
    let node = &f.nodes[id];
    let Some(summary) = &node.record.summary else {
        return Err("its header could not be read".into());
    };
    if summary.format != Format::Qcow2 {
        return Err(format!(
            "only qcow2 images have a backing file to change ({} image)",
            summary.format.name()
        ));
    }
    Ok(())
}

/// Why the images `ids` may not be written (`writers_only`: read) now,
/// from QEMU's locks as the catalog last saw them, naming the holders. The
/// job takes the locks itself and refuses again if a QEMU came meanwhile;
/// this only lets the dialog say so before asking.
pub fn in_use(f: &Forest, ids: &[NodeId], writers_only: bool) -> Result<(), String> {
    for &id in ids {
        let r = &f.nodes[id].record;
        let held = match r.lock {
            LockState::None => false,
            LockState::Reader => !writers_only,
            LockState::Writer => true,
        };
        if !held {
            continue;
        }
        let who = if r.holders.is_empty() {
            "another process".to_string()
        } else {
            r.holders
                .iter()
                .map(|h| format!("pid {} ({})", h.pid, h.command))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let how = if r.lock == LockState::Writer {
            "writing"
        } else {
            "reading"
        };
        return Err(format!(
            "{} is in use by {who}, {how}: an image a QEMU holds is never written{}",
            file_name(&r.path),
            if writers_only {
                ", nor copied while it changes"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// A warning when `needed` bytes (an upper bound) may not fit beside
/// `path`. `statvfs` reads the file system's counters, like a `stat`,
/// never an image; the job checks the exact need before it writes.
pub fn space_warning(path: &Path, needed: u64) -> Option<String> {
    let free = crate::engine::space::available(path).ok()?;
    (needed > free).then(|| {
        format!(
            "may not fit: up to {} to write, {} free there (the job checks exactly before writing)",
            crate::tui::view::human(needed),
            crate::tui::view::human(free)
        )
    })
}

/// The name to store for `backing` in `image`'s header: relative when the
/// backing is in the image's directory or below, else absolute.
fn backing_name_for(image_key: &Path, backing_key: &Path) -> String {
    let dir = image_key.parent().unwrap_or(Path::new("/"));
    match backing_key.strip_prefix(dir) {
        Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
        _ => backing_key.display().to_string(),
    }
}

/// The rebase of `image` onto the scanned image `backing`, or why not.
pub fn rebase_plan(f: &Forest, image: NodeId, backing: NodeId) -> Result<RebasePlan, String> {
    qcow2_node(f, image)?;
    if image == backing {
        return Err("an image cannot be its own backing file".into());
    }
    if f.walk(image).iter().any(|&(n, _)| n == backing) {
        return Err("that image grows on this one: the chain would loop".into());
    }
    let b = &f.nodes[backing];
    let Some(format) = b.record.summary.as_ref().map(|s| s.format) else {
        return Err("the new backing's header could not be read".into());
    };
    if !matches!(format, Format::Qcow2 | Format::Raw) {
        return Err(format!(
            "{} images cannot be backing files here",
            format.name()
        ));
    }
    if let Some(flag) = b.flags.iter().find(|fl| fl.is_broken()) {
        return Err(format!("the new backing is broken: {}", flag.describe()));
    }
    let r = &f.nodes[image].record;
    let safe_refused = safe_rebase_refused(f, image);
    Ok(RebasePlan {
        image: r.path.clone(),
        image_key: r.key.clone(),
        backing_name: backing_name_for(&r.key, &b.record.key),
        backing_key: Some(b.record.key.clone()),
        format,
        unsafe_mode: safe_refused.is_some(),
        safe_refused,
    })
}

/// A safe rebase reads the old chain; when it is broken only the header
/// can change.
fn safe_rebase_refused(f: &Forest, image: NodeId) -> Option<String> {
    let broken = f
        .chain(image)
        .into_iter()
        .flat_map(|n| f.nodes[n].flags.iter())
        .find(|fl| fl.is_broken())?;
    Some(format!(
        "a safe rebase copies from the old backing chain, which is broken ({}): only the \
         header can change (unsafe), e.g. to point at a moved base",
        broken.describe()
    ))
}

/// Flattening `image`: it must have a readable chain to copy from.
pub fn flatten_plan(f: &Forest, image: NodeId) -> Result<FlattenPlan, String> {
    qcow2_node(f, image)?;
    in_use(f, &[image], false)?;
    let node = &f.nodes[image];
    if let Some(flag) = node.flags.iter().find(|fl| fl.is_broken()) {
        return Err(flag.describe());
    }
    let Some(backing) = node
        .record
        .summary
        .as_ref()
        .and_then(|s| s.backing_filename.clone())
    else {
        return Err("it has no backing file: it is standalone already".into());
    };
    if node.parent.is_none() {
        return Err(format!("its backing image {backing} was not found"));
    }
    let chain = f.chain(image);
    let below = chain
        .iter()
        .filter(|&&n| n != image)
        .map(|&n| f.nodes[n].record.sizes.allocated)
        .sum();
    Ok(FlattenPlan {
        image: node.record.path.clone(),
        chain_keys: chain
            .iter()
            .map(|&n| f.nodes[n].record.key.clone())
            .collect(),
        backing,
        below,
        space_warning: None,
    })
}

/// The convert dialog for `source`, with defaults: qcow2, no compression,
/// 64 KiB clusters, `<stem>-conv.qcow2` beside it.
pub fn convert_plan(f: &Forest, source: NodeId) -> Result<ConvertPlan, String> {
    let node = &f.nodes[source];
    let Some(summary) = &node.record.summary else {
        return Err("its header could not be read".into());
    };
    if !matches!(summary.format, Format::Qcow2 | Format::Raw) {
        return Err(format!(
            "{} images are not supported",
            summary.format.name()
        ));
    }
    if let Some(flag) = node.flags.iter().find(|fl| fl.is_broken()) {
        return Err(flag.describe());
    }
    let chain = f.chain(source);
    in_use(f, &chain, true)?;
    let allocated = chain
        .iter()
        .map(|&n| f.nodes[n].record.sizes.allocated)
        .sum();
    let backing = node.parent.and_then(|p| {
        let name = summary.backing_filename.clone()?;
        let fmt = f.nodes[p].record.summary.as_ref()?.format;
        Some((name, fmt))
    });
    let stem = node
        .record
        .path
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    Ok(ConvertPlan {
        source: node.record.path.clone(),
        source_key: node.record.key.clone(),
        backing,
        dest: format!("{stem}-conv.qcow2"),
        format: Format::Qcow2,
        compression: None,
        cluster_size: 64 << 10,
        keep_backing: false,
        field: 0,
        allocated,
        space_warning: None,
    })
}

impl App {
    fn refuse(&mut self, what: &str, id: NodeId, why: String) {
        let name = self.display_path(&self.forest.nodes[id].record.path);
        self.status = Some(Status {
            text: format!("cannot {what} {name}: {why}"),
            error: true,
        });
    }

    /// `b`: start picking the new backing in the tree.
    pub(crate) fn ask_rebase(&mut self) {
        let Some(id) = self.selected_node() else {
            return;
        };
        if let Err(why) =
            qcow2_node(&self.forest, id).and_then(|()| in_use(&self.forest, &[id], false))
        {
            return self.refuse("rebase", id, why);
        }
        let r = &self.forest.nodes[id].record;
        self.mode = Mode::PickBacking(Box::new(BackingPick {
            image: r.path.clone(),
            image_key: r.key.clone(),
            typed: None,
            probing: None,
        }));
    }

    /// `f`: ask before flattening.
    pub(crate) fn ask_flatten(&mut self) {
        let Some(id) = self.selected_node() else {
            return;
        };
        match flatten_plan(&self.forest, id) {
            Ok(mut plan) => {
                plan.space_warning = space_warning(&plan.image, plan.below);
                self.mode = Mode::ConfirmFlatten(Box::new(plan));
            }
            Err(why) => self.refuse("flatten", id, why),
        }
    }

    /// `v`: open the convert dialog.
    pub(crate) fn ask_convert(&mut self) {
        let Some(id) = self.selected_node() else {
            return;
        };
        match convert_plan(&self.forest, id) {
            Ok(mut plan) => {
                plan.space_warning = space_warning(&plan.source, plan.allocated);
                self.mode = Mode::Convert(Box::new(plan));
            }
            Err(why) => self.refuse("convert", id, why),
        }
    }

    /// Keys while picking a backing. Returns true when the key was used;
    /// otherwise it moves through the tree as usual.
    pub(crate) fn pick_backing_key(&mut self, code: KeyCode, plain_char: Option<char>) -> bool {
        let Mode::PickBacking(pick) = &mut self.mode else {
            return false;
        };
        if let Some(typed) = &mut pick.typed {
            match code {
                KeyCode::Esc => {
                    pick.typed = None;
                    pick.probing = None;
                }
                KeyCode::Backspace => {
                    typed.pop();
                }
                KeyCode::Enter => {
                    let name = typed.trim().to_string();
                    if !name.is_empty() {
                        // Probing reads the file: the inspector thread does
                        // it and the dialog opens on its answer.
                        let dir = pick.image_key.parent().unwrap_or(Path::new("/"));
                        let resolved = lexical_normalize(&dir.join(&name));
                        pick.probing = Some(name.clone());
                        self.inspector
                            .probe_backing(pick.image_key.clone(), name, resolved);
                    }
                }
                _ => {
                    if let Some(c) = plain_char {
                        typed.push(c);
                    }
                }
            }
            return true;
        }
        match (code, plain_char) {
            (KeyCode::Esc, _) => {
                self.mode = Mode::Normal;
                self.status = Some(Status {
                    text: "rebase cancelled: nothing was changed".into(),
                    error: false,
                });
                true
            }
            (_, Some('t')) => {
                pick.typed = Some(String::new());
                true
            }
            (KeyCode::Enter, _) => {
                let image_key = pick.image_key.clone();
                let (Some(image), Some(backing)) =
                    (self.forest.get(&image_key), self.selected_node())
                else {
                    return true;
                };
                match rebase_plan(&self.forest, image, backing) {
                    Ok(plan) => {
                        self.status = None;
                        self.mode = Mode::ConfirmRebase(Box::new(plan));
                    }
                    Err(why) => {
                        self.status = Some(Status {
                            text: format!("cannot rebase onto that image: {why}"),
                            error: true,
                        })
                    }
                }
                true
            }
            _ => false,
        }
    }

    /// The answer about a typed backing: open the rebase dialog with the
    /// format found, or say why that file cannot be a backing file.
    pub(crate) fn on_backing_probe(&mut self, p: crate::tui::worker::BackingProbe) {
        let Mode::PickBacking(pick) = &mut self.mode else {
            return;
        };
        if pick.image_key != p.image_key || pick.probing.as_deref() != Some(p.name.as_str()) {
            return;
        }
        pick.probing = None;
        match p.result {
            Ok(format) => {
                let pick = (**pick).clone();
                self.typed_backing(pick, p.name, format);
            }
            Err(why) => {
                self.status = Some(Status {
                    text: format!("cannot rebase onto {}: {why}", p.name),
                    error: true,
                });
            }
        }
    }

    /// A typed backing name, probed: stored as typed, with the format the
    /// probe found (`F` in the dialog changes it).
    fn typed_backing(&mut self, pick: BackingPick, name: String, format: Format) {
        let dir = pick.image_key.parent().unwrap_or(Path::new("/"));
        let resolved = lexical_normalize(&dir.join(&name));
        let scanned = self
            .forest
            .nodes
            .iter()
            .find(|n| n.record.key == resolved || n.record.path == resolved);
        let backing_key = scanned.map(|n| n.record.key.clone());
        if let (Some(image), Some(key)) = (self.forest.get(&pick.image_key), &backing_key) {
            if let Some(b) = self.forest.get(key) {
                if let Err(why) = rebase_plan(&self.forest, image, b) {
                    self.status = Some(Status {
                        text: format!("cannot rebase onto {name}: {why}"),
                        error: true,
                    });
                    return;
                }
            }
        }
        let safe_refused = self
            .forest
            .get(&pick.image_key)
            .and_then(|id| safe_rebase_refused(&self.forest, id));
        self.status = None;
        self.mode = Mode::ConfirmRebase(Box::new(RebasePlan {
            image: pick.image,
            image_key: pick.image_key,
            backing_name: name,
            backing_key,
            format,
            unsafe_mode: safe_refused.is_some(),
            safe_refused,
        }));
    }

    pub(crate) fn confirm_rebase_key(&mut self, code: KeyCode, plain_char: Option<char>) {
        let Mode::ConfirmRebase(plan) = &mut self.mode else {
            return;
        };
        match (code, plain_char) {
            (KeyCode::Esc, _) | (_, Some('n')) => {
                self.mode = Mode::Normal;
                self.status = Some(Status {
                    text: "rebase cancelled: nothing was changed".into(),
                    error: false,
                });
            }
            (_, Some('u')) => plan.unsafe_mode = true,
            (_, Some('s')) => match &plan.safe_refused {
                Some(why) => {
                    let text = format!("no safe rebase: {why}");
                    self.status = Some(Status { text, error: true });
                }
                None => plan.unsafe_mode = false,
            },
            (_, Some('F')) => {
                plan.format = if plan.format == Format::Qcow2 {
                    Format::Raw
                } else {
                    Format::Qcow2
                }
            }
            (KeyCode::Enter, _) | (_, Some('y')) => {
                let plan = (**plan).clone();
                self.mode = Mode::Normal;
                self.submit_rebase(plan);
            }
            _ => {}
        }
    }

    pub(crate) fn confirm_flatten_key(&mut self, code: KeyCode, plain_char: Option<char>) {
        let Mode::ConfirmFlatten(plan) = &self.mode else {
            return;
        };
        match (code, plain_char) {
            (KeyCode::Esc, _) | (_, Some('n')) => {
                self.mode = Mode::Normal;
                self.status = Some(Status {
                    text: "flatten cancelled: nothing was changed".into(),
                    error: false,
                });
            }
            (KeyCode::Enter, _) | (_, Some('y')) => {
                let plan = (**plan).clone();
                self.mode = Mode::Normal;
                self.submit_flatten(plan);
            }
            _ => {}
        }
    }

    pub(crate) fn convert_key(&mut self, code: KeyCode, plain_char: Option<char>) {
        let Mode::Convert(plan) = &mut self.mode else {
            return;
        };
        let move_field = |plan: &mut ConvertPlan, down: bool| {
            let n = CONVERT_FIELDS.len();
            let mut i = plan.field;
            loop {
                i = if down { (i + 1) % n } else { (i + n - 1) % n };
                if plan.applies(i) {
                    break;
                }
            }
            plan.field = i;
        };
        match code {
            KeyCode::Esc => {
                self.mode = Mode::Normal;
                self.status = Some(Status {
                    text: "convert cancelled: nothing was written".into(),
                    error: false,
                });
            }
            KeyCode::Enter => {
                let plan = (**plan).clone();
                if plan.dest.trim().is_empty() || plan.dest.contains('/') {
                    self.status = Some(Status {
                        text: "give a file name: the copy goes next to the image".into(),
                        error: true,
                    });
                    return;
                }
                // A new file only: an existing one (an image a VM may use,
                // a base with overlays) is never replaced from here. One
                // stat; the job refuses too if the name appears meanwhile.
                let dir = plan.source.parent().unwrap_or(Path::new(""));
                if dir.join(plan.dest.trim()).symlink_metadata().is_ok() {
                    self.status = Some(Status {
                        text: format!(
                            "{} exists: choose another name (an existing file is never replaced)",
                            plan.dest.trim()
                        ),
                        error: true,
                    });
                    return;
                }
                self.mode = Mode::Normal;
                self.submit_convert(plan);
            }
            KeyCode::Up | KeyCode::BackTab => move_field(plan, false),
            KeyCode::Down | KeyCode::Tab => move_field(plan, true),
            KeyCode::Left => plan.cycle(false),
            KeyCode::Right => plan.cycle(true),
            KeyCode::Backspace if plan.field == 0 => {
                plan.dest.pop();
            }
            _ => match plain_char {
                Some(c) if plan.field == 0 => plan.dest.push(c),
                Some(' ') => plan.cycle(true),
                _ => {}
            },
        }
    }

    fn submit_rebase(&mut self, plan: RebasePlan) {
        let label = format!(
            "rebase{} {} → {}",
            if plan.unsafe_mode { " -u" } else { "" },
            file_name(&plan.image),
            plan.backing_name
        );
        let image = plan.image.clone();
        let opts = RebaseOptions {
            backing: plan.backing_name.clone(),
            backing_format: Some(plan.format),
            unsafe_header_only: plan.unsafe_mode,
        };
        let work: Work = Box::new(move |progress, cancel| {
            rebase(&image, &opts, progress, cancel)?;
            Ok(None)
        });
        // The old chain is read too, but it is the image's own backing:
        // another job on it would already touch this image's parent.
        let mut touches = vec![plan.image_key.clone()];
        touches.extend(plan.backing_key.clone());
        self.queue(work, "rebase", label, touches, vec![plan.image]);
    }

    fn submit_flatten(&mut self, plan: FlattenPlan) {
        let label = format!("flatten {}", file_name(&plan.image));
        let image = plan.image.clone();
        let work: Work = Box::new(move |progress, cancel| {
            let opts = RebaseOptions {
                backing: String::new(),
                backing_format: None,
                unsafe_header_only: false,
            };
            rebase(&image, &opts, progress, cancel)?;
            Ok(None)
        });
        self.queue(work, "flatten", label, plan.chain_keys, vec![plan.image]);
    }

    fn submit_convert(&mut self, plan: ConvertPlan) {
        let dir = plan.source.parent().unwrap_or(Path::new("")).to_path_buf();
        let dest = dir.join(plan.dest.trim());
        let label = format!("convert {} → {}", file_name(&plan.source), file_name(&dest));
        let (backing, backing_format) = match (&plan.backing, plan.keep_backing) {
            (Some((name, fmt)), true) if plan.format == Format::Qcow2 => {
                (Some(name.clone()), Some(*fmt))
            }
            _ => (None, None),
        };
        let opts = ConvertOptions {
            target: CreateOptions {
                format: plan.format,
                cluster_size: plan.cluster_size,
                compression: plan.compression.unwrap_or(CompressionType::Deflate),
                backing,
                backing_format,
                ..CreateOptions::default()
            },
            compress: plan.compression.is_some() && plan.format == Format::Qcow2,
            // The dialog offers new names only; a name taken meanwhile is
            // refused, never replaced.
            replace: None,
            ..ConvertOptions::default()
        };
        let source = plan.source.clone();
        let work: Work = Box::new(move |progress, cancel| {
            convert(&source, &dest, &opts, progress, cancel)?;
            Ok(Some(dest))
        });
        self.queue(work, "convert", label, vec![plan.source_key], Vec::new());
    }

    fn queue(
        &mut self,
        work: Work,
        kind: &'static str,
        label: String,
        touches: Vec<PathBuf>,
        refresh: Vec<PathBuf>,
    ) {
        let id = self.pool.submit(touches.clone(), work);
        let mut view = JobView::new(id, kind, label.clone(), touches);
        view.refresh = refresh;
        self.jobs.push(view);
        self.status = Some(Status {
            text: format!("{label}: started (x cancels)"),
            error: false,
        });
    }
}

/// `a/./b/../c` → `a/c`, without touching the disk (a key press may not).
fn lexical_normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_are_relative_beside_or_below_else_absolute() {
        let img = Path::new("/vm/web-1.qcow2");
        assert_eq!(
            backing_name_for(img, Path::new("/vm/base.qcow2")),
            "base.qcow2"
        );
        assert_eq!(
            backing_name_for(img, Path::new("/vm/bases/b.qcow2")),
            "bases/b.qcow2"
        );
        assert_eq!(
            backing_name_for(img, Path::new("/other/b.qcow2")),
            "/other/b.qcow2"
        );
        assert_eq!(
            lexical_normalize(Path::new("/vm/./x/../base.qcow2")),
            Path::new("/vm/base.qcow2")
        );
    }
}
