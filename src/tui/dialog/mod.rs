//! One module per dialog (gitui's popups): each owns its state, its key
//! handling (returning an [`Outcome`]: stay, close, submit, ...), its hints
//! (from the key table) and its drawing. `App` holds at most one
//! [`Dialog`], routes keys to it, and carries out what it returns; every
//! dialog that starts work hands a [`JobSpec`] to the app's one submit
//! path.
//!
//! Plans are built from the forest in memory when a key opens a dialog (no
//! I/O on the key path beyond a `statvfs` or a `stat`), and refusals the
//! catalog can already see (a QEMU holding the image, a broken chain) are
//! said then, instead of after "yes". The engine checks everything again
//! when the job runs.

pub mod batch;
pub mod bitmaps;
pub mod clone;
pub mod commit;
pub mod convert;
pub mod delete;
pub mod doctor;
pub mod flatten;
pub mod move_image;
pub mod protect;
pub mod rebase;
pub mod reset;
pub mod snapshot;

use crate::engine::preflight::VmUsers;
use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Padding, Paragraph, Wrap};
use ratatui::Frame;

use super::app::{App, Status};
use super::keymap::{Action, Hint, Key, Keymap, Layer};
use super::worker::BackingProbe;
use crate::catalog::{Flag, Forest, NodeId};
use crate::engine::{Format, LockState};
use crate::jobs::Work;

/// What the app needs to queue a job: the one way work starts.
pub struct JobSpec {
    /// `clone`, `commit`, ...: the tree's badge says it.
    pub kind: &'static str,
    pub label: String,
    /// Keys of the images it works on: no other job on them runs
    /// meanwhile, and the tree marks them.
    pub touches: Vec<PathBuf>,
    /// Paths the catalog re-reads when it ends, whatever the outcome.
    pub refresh: Vec<PathBuf>,
    pub work: Work,
}

/// What a dialog's key (or answer) asks of the app.
pub enum Outcome {
    /// The key was used, or means nothing here: the dialog stays.
    Stay,
    /// The dialog stays and the status line says this (a refusal).
    Say(Status),
    /// The dialog closes, saying why.
    Close(Status),
    /// The dialog closes and the job starts.
    Submit(JobSpec),
    /// The dialog closes and every job starts (a batch, N clones); the
    /// images of `unmark` lose their marks (done with), and the status
    /// line says `say` after the jobs' own words.
    SubmitAll {
        jobs: Vec<JobSpec>,
        unmark: Vec<PathBuf>,
        say: Option<Status>,
    },
    /// Another dialog takes its place (the picker opens the rebase dialog).
    Open(Dialog),
    /// Move in the tree (the picker picks there).
    Tree(Action),
    /// The picker's filter changed: the rows must be built again.
    Refilter,
    /// Probe a typed backing path on the inspector thread; the answer comes
    /// back to the dialog as [`Dialog::on_probe`].
    Probe {
        image_key: PathBuf,
        name: String,
        resolved: PathBuf,
    },
}

/// What dialogs may read of the app.
pub struct Ctx<'a> {
    pub forest: &'a Forest,
    pub keymap: &'a Keymap,
    pub roots: &'a [PathBuf],
    /// The image selected in the tree.
    pub selected: Option<NodeId>,
    /// The defined virtual machines, as last read.
    pub vms: &'a VmUsers,
}

impl Ctx<'_> {
    /// What a confirmed job hands the engine's VM check: the dialog named
    /// the machines using these files, with [`vm_warning`], and the user
    /// said yes, so it goes ahead; otherwise the engine checks again.
    pub fn vm_guard(&self, paths: &[&Path]) -> VmUsers {
        let warned =
            !self.vms.unreadable.is_empty() || paths.iter().any(|p| !self.vms.of(p).is_empty());
        VmUsers {
            force: warned,
            ..self.vms.clone()
        }
    }
    pub fn display_path(&self, p: &Path) -> String {
        super::rows::relative_to_roots(self.roots, p)
    }
}

pub enum Dialog {
    /// `C`: the new overlay's name.
    Clone(clone::CloneDialog),
    Commit(commit::CommitDialog),
    /// `b`: the new backing, picked in the tree or typed.
    Pick(rebase::Picker),
    Rebase(rebase::RebaseDialog),
    Flatten(flatten::FlattenDialog),
    Convert(convert::ConvertDialog),
    /// `f`, `v`, `m`, `b` with marks: every marked image in one list.
    Batch(batch::BatchDialog),
    /// `d`: one image or many, into the trash or for good.
    Delete(delete::DeleteDialog),
    Reset(reset::ResetDialog),
    /// `!`: the image's chain problems and their fixes.
    Doctor(doctor::DoctorDialog),
    /// `S`: the image's internal snapshots.
    Snapshot(snapshot::SnapshotDialog),
    /// `B`: the image's persistent bitmaps.
    Bitmaps(bitmaps::BitmapDialog),
    /// `M`: where to move the image.
    Move(move_image::MoveDialog),
}

impl Dialog {
    /// The key layers this dialog reads now, first match wins.
    pub fn layers(&self) -> &'static [Layer] {
        match self {
            Dialog::Clone(_) | Dialog::Move(_) => &[Layer::Input],
            Dialog::Commit(_) | Dialog::Flatten(_) => &[Layer::Confirm],
            Dialog::Pick(p) => p.layers(),
            Dialog::Rebase(_) => &[Layer::Rebase, Layer::Confirm],
            Dialog::Convert(_) => &[Layer::Convert],
            Dialog::Batch(d) => d.layers(),
            Dialog::Delete(_) => &[Layer::Delete, Layer::Confirm],
            Dialog::Reset(_) => &[Layer::Confirm],
            Dialog::Doctor(_) => &[Layer::Doctor],
            Dialog::Snapshot(d) => d.layers(),
            Dialog::Bitmaps(d) => d.layers(),
        }
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        match self {
            Dialog::Clone(d) => d.on_key(key, action, ctx),
            Dialog::Commit(d) => d.on_key(key, action, ctx),
            Dialog::Pick(d) => d.on_key(key, action, ctx),
            Dialog::Rebase(d) => d.on_key(action, ctx),
            Dialog::Flatten(d) => d.on_key(action, ctx),
            Dialog::Convert(d) => d.on_key(key, action, ctx),
            Dialog::Batch(d) => d.on_key(key, action, ctx),
            Dialog::Delete(d) => d.on_key(action, ctx),
            Dialog::Reset(d) => d.on_key(action, ctx),
            Dialog::Doctor(d) => d.on_key(action, ctx),
            Dialog::Snapshot(d) => d.on_key(key, action),
            Dialog::Bitmaps(d) => d.on_key(key, action),
            Dialog::Move(d) => d.on_key(key, action, ctx),
        }
    }

    /// A typed backing path was probed (only the picker asks).
    pub fn on_probe(&mut self, p: BackingProbe, ctx: &Ctx) -> Outcome {
        match self {
            Dialog::Pick(d) => d.on_probe(p, ctx),
            _ => Outcome::Stay,
        }
    }

    /// Another host's agent listed an image's snapshots and bitmaps (only
    /// those dialogs ask, when they open on a remote image).
    pub fn on_listing(
        &mut self,
        key: &Path,
        listing: Result<crate::remote::protocol::WireListing, String>,
    ) -> Outcome {
        match self {
            Dialog::Snapshot(d) => d.on_listing(key, listing),
            Dialog::Bitmaps(d) => d.on_listing(key, listing),
            _ => Outcome::Stay,
        }
    }

    /// The keys the dialog offers now, as its hint line (and the footer)
    /// shows them.
    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        match self {
            Dialog::Clone(d) => d.hints(keymap),
            Dialog::Commit(d) => d.hints(keymap),
            Dialog::Pick(d) => d.hints(keymap),
            Dialog::Rebase(d) => d.hints(keymap),
            Dialog::Flatten(_) => vec![
                keymap.hint(Layer::Confirm, Action::Yes, Some("flatten")),
                keymap.hint(Layer::Confirm, Action::No, None),
            ],
            Dialog::Convert(_) => convert::hints(keymap),
            Dialog::Batch(d) => d.hints(keymap),
            Dialog::Delete(d) => d.hints(keymap),
            Dialog::Reset(_) => vec![
                keymap.hint(Layer::Confirm, Action::Yes, Some("reset")),
                keymap.hint(Layer::Confirm, Action::No, None),
            ],
            Dialog::Doctor(d) => d.hints(keymap),
            Dialog::Snapshot(d) => d.hints(keymap),
            Dialog::Bitmaps(d) => d.hints(keymap),
            Dialog::Move(_) => move_image::MoveDialog::hints(keymap),
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect) {
        let hints = self.hints(&app.keymap);
        match self {
            Dialog::Clone(d) => d.draw(app, frame, area, &hints),
            Dialog::Commit(d) => d.draw(app, frame, area, &hints),
            Dialog::Pick(d) => d.draw(app, frame, area, &hints),
            Dialog::Rebase(d) => d.draw(app, frame, area, &hints),
            Dialog::Flatten(d) => d.draw(app, frame, area, &hints),
            Dialog::Convert(d) => d.draw(app, frame, area, &hints),
            Dialog::Batch(d) => d.draw(app, frame, area, &hints),
            Dialog::Delete(d) => d.draw(app, frame, area, &hints),
            Dialog::Reset(d) => d.draw(app, frame, area, &hints),
            Dialog::Doctor(d) => d.draw(app, frame, area, &hints),
            Dialog::Snapshot(d) => d.draw(app, frame, area, &hints),
            Dialog::Bitmaps(d) => d.draw(app, frame, area, &hints),
            Dialog::Move(d) => d.draw(app, frame, area, &hints),
        }
    }
}

/// Work that the agent of `host` runs there, on its own files (the
/// image's paths are paths on that host): the job list shows its
/// progress and cancels it like a local job. `peers`: the other hosts
/// that see the files it changes (`remote::client::peers`), asked first.
pub(crate) fn on_host(
    host: &str,
    op: crate::remote::protocol::JobOp,
    peers: crate::remote::client::Peers,
) -> Work {
    crate::remote::client::remote_work(
        host.to_string(),
        crate::remote::client::SshOptions::from_env(),
        op,
        peers,
    )
}

/// The roots the user named on `host`, as paths there: where its agent
/// looks for the images that use one it moves.
pub(crate) fn roots_on(host: &str, roots: &[PathBuf]) -> Vec<PathBuf> {
    crate::remote::split_roots(roots)
        .1
        .into_iter()
        .find(|(h, _)| h == host)
        .map(|(_, paths)| paths)
        .unwrap_or_default()
}

/// A status line message of one kind.
pub(crate) fn error(text: impl Into<String>) -> Status {
    Status::error(text)
}

/// The qcow2 image at `id`, or why the operation cannot start from it.
pub(crate) fn qcow2_node(f: &Forest, id: NodeId) -> Result<(), String> {
    let node = &f.nodes[id];
    usable(f, id)?;
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

/// A row that is no image at all (a file the scan could not use) is
/// refused with its reason.
pub(crate) fn usable(f: &Forest, id: NodeId) -> Result<(), String> {
    match f.nodes[id].flags.iter().find_map(|fl| match fl {
        Flag::Skipped { reason } => Some(reason),
        _ => None,
    }) {
        Some(reason) => Err(format!("it is no image cowshed can use ({reason})")),
        None => Ok(()),
    }
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
            super::rows::file_name(&r.path),
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
            super::view::human(needed),
            super::view::human(free)
        )
    })
}

pub(crate) use crate::engine::chain::lexical_normalize;

/// `y/Enter commit · n/Esc cancel`: keys in the accent colour.
pub(crate) fn hint_line(app: &App, hints: &[Hint]) -> Line<'static> {
    let mut spans = Vec::new();
    for (i, h) in hints.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw(" · "));
        }
        spans.push(Span::styled(
            h.keys.clone(),
            Style::new().fg(app.theme.accent),
        ));
        spans.push(Span::raw(format!(" {}", h.label)));
    }
    Line::from(spans)
}

/// A centred, word-wrapped box sized to its lines.
pub(crate) fn draw_box(
    frame: &mut Frame,
    area: Rect,
    title: &str,
    lines: Vec<Line>,
    border: Style,
) {
    let width = area.width.saturating_sub(4).min(80);
    // Borders and a column of padding on each side.
    let inner = usize::from(width.saturating_sub(4)).max(1);
    // Wrapped height: each line takes its width over the inner width,
    // rounded up (word wrapping may need one more now and then).
    let height: usize = lines
        .iter()
        .map(|l| l.width().div_ceil(inner).max(1))
        .sum::<usize>()
        + 3;
    let r = super::view::centered(area, width, height.min(usize::from(u16::MAX)) as u16);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::new()
                .borders(Borders::ALL)
                .border_style(border)
                .padding(Padding::horizontal(1))
                .title(format!(" {title} ")),
        ),
        r,
    );
}

/// The line that asks for the word `yes` (a commit into a shared base):
/// only keys that are not letters confirm there, since letters type.
pub(crate) fn typed_yes_line(app: &App, input: &str, warn: Style) -> Line<'static> {
    let enter: Vec<String> = app
        .keymap
        .keys(Layer::Confirm, Action::Yes)
        .iter()
        .filter(|k| k.typed().is_none())
        .map(|k| k.to_string())
        .collect();
    Line::from(vec![
        Span::raw("type "),
        Span::styled("yes", warn),
        Span::raw(format!(" and {} to commit: ", enter.join("/"))),
        Span::styled(format!("{input}▏"), warn),
    ])
}

/// The dialog's warning when defined virtual machines use the files it
/// changes (or when a connection the user named could not be read): the
/// user's yes then goes ahead in spite of them.
pub fn vm_warning(app: &App, paths: &[&Path]) -> Option<Line<'static>> {
    let mut users: Vec<String> = Vec::new();
    for p in paths {
        for u in app.vms.of(p) {
            let s = format!("'{}' ({}, {})", u.name, u.state, u.connection);
            if !users.contains(&s) {
                users.push(s);
            }
        }
    }
    let text = if !users.is_empty() {
        format!(
            "⚠ Used by libvirt domain {}: a defined domain, even shut off, boots from the \
             changed image. Yes goes ahead anyway.",
            users.join(", ")
        )
    } else if !app.vms.unreadable.is_empty() {
        let uris: Vec<&str> = app.vms.unreadable.iter().map(|(u, _)| u.as_str()).collect();
        format!(
            "⚠ libvirt connection {} could not be read: whether a domain uses this is unknown. \
             Yes goes ahead anyway.",
            uris.join(", ")
        )
    } else {
        return None;
    };
    Some(Line::from(Span::styled(
        text,
        Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD),
    )))
}
