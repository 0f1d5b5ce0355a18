//! Snapshots (`S`): the selected qcow2 image's internal snapshots, one to
//! pick; `c` creates one (asks for its name), `a` applies the picked one and
//! `d` deletes it, each after a yes/no that says what it changes (apply:
//! the current state is lost). Each runs as a job through the one submit
//! path, as `cowshed snapshot` would. The list comes from the details the
//! inspector already read; refusals the catalog can see (not qcow2, a QEMU
//! holding it, an external data file) are said when the key is pressed.
//! For an image on another host the dialog opens reading: the list comes
//! from that host's agent (`list`), and the jobs run there.

use std::path::PathBuf;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{error, hint_line, in_use, on_host, usable, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::snapshot;
use crate::engine::qcow2::snapshot::Snapshot;
use crate::engine::Format;
use crate::remote::protocol::{JobOp, SnapshotAction, WireListing, WireSnapshot};
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::worker::Details;

/// Rows of the list shown at once around the selection.
const LIST_ROWS: usize = 10;

pub struct SnapshotDialog {
    pub image: PathBuf,
    pub key: PathBuf,
    /// The host whose agent lists and changes the image (`None`: here).
    pub host: Option<String>,
    /// Where it is, as a user names it (`host1:/srv/a.qcow2`).
    location: String,
    /// Other hosts that see the file, asked first.
    peers: crate::remote::client::Peers,
    pub snapshots: Vec<WireSnapshot>,
    pub selected: usize,
    /// QEMU refuses to apply a snapshot to an image with persistent
    /// bitmaps; so does cowshed.
    has_bitmaps: bool,
    pub state: State,
}

pub enum State {
    /// Waiting for the host's agent to list them.
    Reading,
    List,
    /// `c`: the new snapshot's name, as typed.
    Naming(String),
    /// Asking before applying or deleting the snapshot at this index.
    Confirm {
        apply: bool,
        index: usize,
    },
}

impl SnapshotDialog {
    /// `S` on `id`, with the details the inspector read for it (if they
    /// are its own and read).
    pub fn open(f: &Forest, id: NodeId, details: Option<&Details>) -> Result<Self, String> {
        usable(f, id)?;
        let record = &f.nodes[id].record;
        match record.summary.as_ref().map(|s| s.format) {
            Some(Format::Qcow2) => {}
            Some(other) => {
                return Err(format!(
                    "only qcow2 images have internal snapshots ({} image)",
                    other.name()
                ))
            }
            None => return Err("its header could not be read".into()),
        }
        in_use(f, &[id], false)?;
        let mut dialog = SnapshotDialog {
            image: record.path.clone(),
            key: record.key.clone(),
            host: record.host.clone(),
            location: record.location(),
            peers: crate::remote::client::peers([record]),
            snapshots: Vec::new(),
            selected: 0,
            has_bitmaps: false,
            state: State::Reading,
        };
        // Another host's file is listed by its agent: see `on_listing`.
        if dialog.host.is_some() {
            return Ok(dialog);
        }
        let info = match details.filter(|d| d.key == record.key).map(|d| &d.info) {
            Some(Ok(info)) => info,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err("its details are still being read: try again in a moment".into()),
        };
        let Some(q) = info.qcow2.as_ref() else {
            return Err("its details are not those of a qcow2 image".into());
        };
        dialog.fill(WireListing::from_qcow2(q))?;
        Ok(dialog)
    }

    fn fill(&mut self, listing: WireListing) -> Result<(), String> {
        if listing.data_file {
            return Err("images with an external data file have no internal snapshots".into());
        }
        self.snapshots = listing.snapshots;
        self.has_bitmaps = !listing.bitmaps.is_empty();
        self.selected = 0;
        self.state = State::List;
        Ok(())
    }

    /// The host's agent listed the image `key` (or said why not).
    pub fn on_listing(
        &mut self,
        key: &std::path::Path,
        listing: Result<WireListing, String>,
    ) -> Outcome {
        if key != self.key || !matches!(self.state, State::Reading) {
            return Outcome::Stay;
        }
        match listing.and_then(|l| self.fill(l)) {
            Ok(()) => Outcome::Stay,
            Err(why) => Outcome::Close(error(format!(
                "cannot list the snapshots of {}: {why}",
                self.location
            ))),
        }
    }

    pub fn layers(&self) -> &'static [Layer] {
        match self.state {
            State::Reading | State::List => &[Layer::Snapshot],
            State::Naming(_) => &[Layer::Input],
            State::Confirm { .. } => &[Layer::Confirm],
        }
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>) -> Outcome {
        match &mut self.state {
            State::Reading => match action {
                Some(Action::Close) => {
                    Outcome::Close(Status::cancelled("snapshots: nothing was changed"))
                }
                _ => Outcome::Stay,
            },
            State::List => self.list_key(action),
            State::Naming(name) => {
                if let Some(c) = key.typed() {
                    name.push(c);
                    return Outcome::Stay;
                }
                match action {
                    Some(Action::Delete) => {
                        name.pop();
                    }
                    Some(Action::ClearInput) => name.clear(),
                    Some(Action::Cancel) => self.state = State::List,
                    Some(Action::Submit) => {
                        let name = name.trim().to_string();
                        if name.is_empty() {
                            return Outcome::Say(error("type a name for the snapshot"));
                        }
                        return Outcome::Submit(self.job(Job::Create(name)));
                    }
                    _ => {}
                }
                Outcome::Stay
            }
            State::Confirm { apply, index } => {
                let (apply, index) = (*apply, *index);
                match action {
                    Some(Action::Yes) => {
                        let id = self.snapshots[index].id.clone();
                        let name = self.snapshots[index].name.clone();
                        Outcome::Submit(self.job(if apply {
                            Job::Apply { id, name }
                        } else {
                            Job::Delete { id, name }
                        }))
                    }
                    Some(Action::No) => {
                        self.state = State::List;
                        Outcome::Stay
                    }
                    _ => Outcome::Stay,
                }
            }
        }
    }

    fn list_key(&mut self, action: Option<Action>) -> Outcome {
        let n = self.snapshots.len();
        match action {
            Some(Action::Up) => self.selected = self.selected.saturating_sub(1),
            Some(Action::Down) => self.selected = (self.selected + 1).min(n.saturating_sub(1)),
            Some(Action::NewSnapshot) => self.state = State::Naming(String::new()),
            Some(Action::ApplySnapshot | Action::DeleteSnapshot) if n == 0 => {
                return Outcome::Say(error("the image has no snapshots"));
            }
            Some(Action::ApplySnapshot) if self.has_bitmaps => {
                return Outcome::Say(error(
                    "the image has persistent bitmaps: applying a snapshot would make them \
                     wrong (qemu-img refuses too)",
                ));
            }
            Some(Action::ApplySnapshot) => {
                self.state = State::Confirm {
                    apply: true,
                    index: self.selected,
                }
            }
            Some(Action::DeleteSnapshot) => {
                self.state = State::Confirm {
                    apply: false,
                    index: self.selected,
                }
            }
            Some(Action::Close) => {
                return Outcome::Close(Status::cancelled("snapshots: nothing was changed"))
            }
            _ => {}
        }
        Outcome::Stay
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        match self.state {
            State::Reading => vec![keymap.hint(Layer::Snapshot, Action::Close, None)],
            State::List => vec![
                keymap.hint(Layer::Snapshot, Action::Up, None),
                keymap.hint(Layer::Snapshot, Action::NewSnapshot, None),
                keymap.hint(Layer::Snapshot, Action::ApplySnapshot, None),
                keymap.hint(Layer::Snapshot, Action::DeleteSnapshot, None),
                keymap.hint(Layer::Snapshot, Action::Close, None),
            ],
            State::Naming(_) => vec![
                keymap.hint(Layer::Input, Action::Submit, Some("create")),
                keymap.hint(Layer::Input, Action::Cancel, Some("back")),
            ],
            State::Confirm { apply, .. } => vec![
                keymap.hint(
                    Layer::Confirm,
                    Action::Yes,
                    Some(if apply { "apply" } else { "delete" }),
                ),
                keymap.hint(Layer::Confirm, Action::No, Some("back")),
            ],
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let image = app.display_path(&self.image);
        let dim = Style::new().fg(app.theme.dim);
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let mut lines: Vec<Line> = Vec::new();
        let mut border = Style::new();
        match &self.state {
            State::Reading => lines.push(Line::from(Span::styled(
                format!(
                    "reading them on {}…",
                    self.host.as_deref().unwrap_or("this host")
                ),
                dim,
            ))),
            State::List => {
                if self.snapshots.is_empty() {
                    lines.push(Line::from(Span::styled("no snapshots yet", dim)));
                }
                let first = self.selected.saturating_sub(LIST_ROWS - 1);
                for (i, s) in self
                    .snapshots
                    .iter()
                    .enumerate()
                    .skip(first)
                    .take(LIST_ROWS)
                {
                    let text = format!(
                        "{} {:<4} {} · {}",
                        if i == self.selected { "▸" } else { " " },
                        s.id,
                        s.name,
                        taken_at(s.date_sec)
                    );
                    lines.push(if i == self.selected {
                        Line::from(Span::styled(text, Style::new().fg(app.theme.accent)))
                    } else {
                        Line::from(text)
                    });
                }
            }
            State::Naming(name) => {
                lines.push(Line::from(format!("name: {name}▏")));
                lines.push(Line::from(Span::styled(
                    "a disk-only snapshot of the image as it is now (no VM state)",
                    dim,
                )));
            }
            State::Confirm { apply: true, index } => {
                let s = &self.snapshots[*index];
                lines.push(Line::from(format!(
                    "Apply snapshot '{}' (id {}, {}) to {image}: it then reads as it did \
                     when the snapshot was taken.",
                    s.name,
                    s.id,
                    taken_at(s.date_sec)
                )));
                lines.push(Line::default());
                lines.push(Line::from(Span::styled(
                    "⚠ The current state is lost (what no other snapshot keeps).",
                    warn,
                )));
                border = warn;
            }
            State::Confirm {
                apply: false,
                index,
            } => {
                let s = &self.snapshots[*index];
                lines.push(Line::from(format!(
                    "Delete snapshot '{}' (id {}, {}) of {image}: the clusters only it \
                     keeps are freed; the image itself does not change.",
                    s.name,
                    s.id,
                    taken_at(s.date_sec)
                )));
                border = warn;
            }
        }
        // Every step here writes the image: a domain that uses it is named
        // while the dialog is open (the engine's snapshot and bitmap steps
        // leave that check to the caller). Another host's agent checks its
        // own domains.
        let vm = self
            .host
            .is_none()
            .then(|| super::vm_warning(app, &[&self.image]));
        if let (Some(Some(w)), false) = (vm, matches!(self.state, State::Reading)) {
            lines.push(Line::default());
            lines.push(w);
        }
        lines.push(Line::default());
        lines.push(hint_line(app, hints));
        super::draw_box(
            frame,
            area,
            &format!("snapshots of {}", file_name(&self.image)),
            lines,
            border,
        );
    }

    fn job(&self, job: Job) -> JobSpec {
        let image = self.image.clone();
        let (verb, name) = match &job {
            Job::Create(n) => ("create", n.clone()),
            Job::Apply { name, .. } => ("apply", name.clone()),
            Job::Delete { name, .. } => ("delete", name.clone()),
        };
        let label = format!("snapshot {verb} '{name}' {}", file_name(&self.image));
        if let Some(host) = &self.host {
            let action = match job {
                Job::Create(name) => SnapshotAction::Create { name },
                Job::Apply { id, .. } => SnapshotAction::Apply { id },
                Job::Delete { id, .. } => SnapshotAction::Delete { id },
            };
            return JobSpec {
                kind: "snapshot",
                label,
                touches: vec![self.key.clone()],
                // Its agent reads it again when the job ends.
                refresh: vec![crate::remote::client::remote_path(host, &self.image)],
                work: on_host(host, JobOp::Snapshot { image, action }, self.peers.clone()),
            };
        }
        JobSpec {
            kind: "snapshot",
            label,
            touches: vec![self.key.clone()],
            refresh: vec![self.image.clone()],
            work: Box::new(move |_progress, _cancel| {
                match job {
                    Job::Create(name) => snapshot::create(&image, name.as_bytes(), None).map(drop),
                    // By id: ids are unique, names need not be.
                    Job::Apply { id, .. } => snapshot::apply(&image, id.as_bytes(), None),
                    Job::Delete { id, .. } => snapshot::delete_id(&image, id.as_bytes(), None),
                }?;
                Ok(None)
            }),
        }
    }
}

enum Job {
    Create(String),
    Apply { id: String, name: String },
    Delete { id: String, name: String },
}

/// How long ago a snapshot was taken (`5 h ago`).
pub fn taken(s: &Snapshot) -> String {
    taken_at(s.date_sec)
}

/// How long ago `date_sec` (seconds since the epoch) was.
pub fn taken_at(date_sec: u32) -> String {
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(date_sec));
    let age = std::time::SystemTime::now()
        .duration_since(then)
        .unwrap_or_default();
    format!("{} ago", crate::tui::reclaim::age_text(age))
}
