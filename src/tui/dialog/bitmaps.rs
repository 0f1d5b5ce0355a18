//! Bitmaps (`B`): the selected qcow2 image's persistent dirty bitmaps, one
//! to pick; `a` adds one (asks for its name), `d` removes the picked one and
//! `c` clears it (each after a yes/no that says what is lost), `e` enables
//! or disables it, `m` merges another bitmap of the image into it (picked
//! from the list). Each runs as a job through the one submit path, as
//! `cowshed bitmap` would; the job re-reads the image when it ends, and the
//! list comes from the details the inspector reads in the background, as
//! the snapshots dialog's does. Refusals the catalog can see (not qcow2, a
//! QEMU holding it, a name taken) are said when the key is pressed. For an
//! image on another host the dialog opens reading: the list comes from
//! that host's agent (`list`), and the jobs run there.

use std::path::PathBuf;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{error, hint_line, in_use, on_host, usable, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::bitmap;
use crate::engine::Format;
use crate::remote::protocol::{BitmapAction, JobOp, WireBitmap, WireListing};
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::worker::Details;

/// Rows of the list shown at once around the selection.
const LIST_ROWS: usize = 10;

pub struct BitmapDialog {
    pub image: PathBuf,
    pub key: PathBuf,
    /// The host whose agent lists and changes the image (`None`: here).
    pub host: Option<String>,
    /// Where it is, as a user names it (`host1:/srv/a.qcow2`).
    location: String,
    /// Other hosts that see the file, asked first.
    peers: crate::remote::client::Peers,
    pub bitmaps: Vec<WireBitmap>,
    pub selected: usize,
    pub state: State,
}

pub enum State {
    /// Waiting for the host's agent to list them.
    Reading,
    List,
    /// `a`: the new bitmap's name, as typed.
    Naming(String),
    /// Asking before removing (`clear: false`) or clearing the bitmap at
    /// this index.
    Confirm {
        clear: bool,
        index: usize,
    },
    /// `m`: picking the bitmap merged into the one at `into`.
    MergeFrom {
        into: usize,
        from: usize,
    },
}

impl BitmapDialog {
    /// `B` on `id`, with the details the inspector read for it (if they
    /// are its own and read).
    pub fn open(f: &Forest, id: NodeId, details: Option<&Details>) -> Result<Self, String> {
        usable(f, id)?;
        let record = &f.nodes[id].record;
        match record.summary.as_ref().map(|s| s.format) {
            Some(Format::Qcow2) => {}
            Some(other) => {
                return Err(format!(
                    "only qcow2 images have persistent bitmaps ({} image)",
                    other.name()
                ))
            }
            None => return Err("its header could not be read".into()),
        }
        in_use(f, &[id], false)?;
        let mut dialog = BitmapDialog {
            image: record.path.clone(),
            key: record.key.clone(),
            host: record.host.clone(),
            location: record.location(),
            peers: crate::remote::client::peers([record]),
            bitmaps: Vec::new(),
            selected: 0,
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
        if listing.version < 3 {
            return Err("a compat=0.10 image cannot hold persistent bitmaps".into());
        }
        self.bitmaps = listing.bitmaps;
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
                "cannot list the bitmaps of {}: {why}",
                self.location
            ))),
        }
    }

    pub fn layers(&self) -> &'static [Layer] {
        match self.state {
            State::Reading | State::List | State::MergeFrom { .. } => &[Layer::Bitmap],
            State::Naming(_) => &[Layer::Input],
            State::Confirm { .. } => &[Layer::Confirm],
        }
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>) -> Outcome {
        match &mut self.state {
            State::Reading => match action {
                Some(Action::Close) => {
                    Outcome::Close(Status::cancelled("bitmaps: nothing was changed"))
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
                            return Outcome::Say(error("type a name for the bitmap"));
                        }
                        if self.bitmaps.iter().any(|b| b.name == name) {
                            return Outcome::Say(error(format!(
                                "the image has a bitmap named '{name}' already"
                            )));
                        }
                        return Outcome::Submit(self.job(name, bitmap::Action::Add));
                    }
                    _ => {}
                }
                Outcome::Stay
            }
            State::Confirm { clear, index } => {
                let (clear, index) = (*clear, *index);
                match action {
                    Some(Action::Yes) => {
                        let name = self.bitmaps[index].name.clone();
                        Outcome::Submit(self.job(
                            name,
                            if clear {
                                bitmap::Action::Clear
                            } else {
                                bitmap::Action::Remove
                            },
                        ))
                    }
                    Some(Action::No) => {
                        self.state = State::List;
                        Outcome::Stay
                    }
                    _ => Outcome::Stay,
                }
            }
            State::MergeFrom { into, from } => {
                let (into, n) = (*into, self.bitmaps.len());
                match action {
                    // The bitmap merged into is never its own source.
                    Some(Action::Up) => {
                        *from = (0..*from).rev().find(|&i| i != into).unwrap_or(*from)
                    }
                    Some(Action::Down) => {
                        *from = (*from + 1..n).find(|&i| i != into).unwrap_or(*from)
                    }
                    Some(Action::Choose) => {
                        let source = self.bitmaps[*from].name.clone().into_bytes();
                        let name = self.bitmaps[into].name.clone();
                        return Outcome::Submit(self.job(name, bitmap::Action::Merge(source)));
                    }
                    Some(Action::Close) => self.state = State::List,
                    _ => {}
                }
                Outcome::Stay
            }
        }
    }

    fn list_key(&mut self, action: Option<Action>) -> Outcome {
        let n = self.bitmaps.len();
        match action {
            Some(Action::Up) => self.selected = self.selected.saturating_sub(1),
            Some(Action::Down) => self.selected = (self.selected + 1).min(n.saturating_sub(1)),
            Some(Action::AddBitmap) => self.state = State::Naming(String::new()),
            Some(
                Action::RemoveBitmap
                | Action::ClearBitmap
                | Action::ToggleBitmap
                | Action::MergeBitmap,
            ) if n == 0 => return Outcome::Say(error("the image has no bitmaps")),
            Some(Action::RemoveBitmap | Action::ClearBitmap) => {
                self.state = State::Confirm {
                    clear: action == Some(Action::ClearBitmap),
                    index: self.selected,
                }
            }
            Some(Action::ToggleBitmap) => {
                let b = &self.bitmaps[self.selected];
                let act = if b.auto {
                    bitmap::Action::Disable
                } else {
                    bitmap::Action::Enable
                };
                return Outcome::Submit(self.job(b.name.clone(), act));
            }
            Some(Action::MergeBitmap) if n < 2 => {
                return Outcome::Say(error(
                    "merging needs another bitmap of the image to merge from",
                ))
            }
            Some(Action::MergeBitmap) => {
                let into = self.selected;
                self.state = State::MergeFrom {
                    into,
                    from: usize::from(into == 0),
                }
            }
            Some(Action::Close) => {
                return Outcome::Close(Status::cancelled("bitmaps: nothing was changed"))
            }
            _ => {}
        }
        Outcome::Stay
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        match self.state {
            State::Reading => vec![keymap.hint(Layer::Bitmap, Action::Close, None)],
            State::List => vec![
                keymap.hint(Layer::Bitmap, Action::Up, None),
                keymap.hint(Layer::Bitmap, Action::AddBitmap, None),
                keymap.hint(Layer::Bitmap, Action::RemoveBitmap, None),
                keymap.hint(Layer::Bitmap, Action::ClearBitmap, None),
                keymap.hint(Layer::Bitmap, Action::ToggleBitmap, None),
                keymap.hint(Layer::Bitmap, Action::MergeBitmap, None),
                keymap.hint(Layer::Bitmap, Action::Close, None),
            ],
            State::Naming(_) => vec![
                keymap.hint(Layer::Input, Action::Submit, Some("add")),
                keymap.hint(Layer::Input, Action::Cancel, Some("back")),
            ],
            State::Confirm { clear, .. } => vec![
                keymap.hint(
                    Layer::Confirm,
                    Action::Yes,
                    Some(if clear { "clear" } else { "remove" }),
                ),
                keymap.hint(Layer::Confirm, Action::No, Some("back")),
            ],
            State::MergeFrom { .. } => vec![
                keymap.hint(Layer::Bitmap, Action::Up, None),
                keymap.hint(Layer::Bitmap, Action::Choose, Some("merge")),
                keymap.hint(Layer::Bitmap, Action::Close, Some("back")),
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
                if self.bitmaps.is_empty() {
                    lines.push(Line::from(Span::styled("no bitmaps yet", dim)));
                }
                self.list_lines(app, self.selected, None, &mut lines);
            }
            State::Naming(name) => {
                lines.push(Line::from(format!("name: {name}▏")));
                lines.push(Line::from(Span::styled(
                    "an empty bitmap that records the guest's writes from now on",
                    dim,
                )));
            }
            State::Confirm { clear, index } => {
                let b = &self.bitmaps[*index];
                if *clear {
                    lines.push(Line::from(format!(
                        "Clear bitmap '{}' of {image}: it then records no writes so far.",
                        b.name
                    )));
                    lines.push(Line::default());
                    lines.push(Line::from(Span::styled(
                        "⚠ The recorded changes are lost (an incremental backup from it \
                         would miss them).",
                        warn,
                    )));
                } else {
                    lines.push(Line::from(format!(
                        "Remove bitmap '{}' of {image} and free its clusters.",
                        b.name
                    )));
                    lines.push(Line::default());
                    lines.push(Line::from(Span::styled(
                        "⚠ The recorded changes are lost with it.",
                        warn,
                    )));
                }
                border = warn;
            }
            State::MergeFrom { into, from } => {
                lines.push(Line::from(format!(
                    "Merge into '{}' the writes another bitmap recorded:",
                    self.bitmaps[*into].name
                )));
                self.list_lines(app, *from, Some(*into), &mut lines);
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
            &format!("bitmaps of {}", file_name(&self.image)),
            lines,
            border,
        );
    }

    /// The bitmaps around `selected`, `skip` (the merge's target) left out.
    fn list_lines(
        &self,
        app: &App,
        selected: usize,
        skip: Option<usize>,
        lines: &mut Vec<Line<'static>>,
    ) {
        let first = selected.saturating_sub(LIST_ROWS - 1);
        for (i, b) in self
            .bitmaps
            .iter()
            .enumerate()
            .skip(first)
            .take(LIST_ROWS)
            .filter(|(i, _)| Some(*i) != skip)
        {
            let text = format!(
                "{} {} · {} · {}{}",
                if i == selected { "▸" } else { " " },
                b.name,
                crate::tui::view::human(b.granularity),
                if b.auto { "enabled" } else { "disabled" },
                if b.in_use { " · in use" } else { "" },
            );
            lines.push(if i == selected {
                Line::from(Span::styled(text, Style::new().fg(app.theme.accent)))
            } else {
                Line::from(text)
            });
        }
    }

    fn job(&self, name: String, action: bitmap::Action) -> JobSpec {
        let image = self.image.clone();
        let what = match &action {
            bitmap::Action::Merge(from) => {
                format!("merge '{}' into", String::from_utf8_lossy(from))
            }
            bitmap::Action::Add => "add".into(),
            bitmap::Action::Remove => "remove".into(),
            bitmap::Action::Clear => "clear".into(),
            bitmap::Action::Enable => "enable".into(),
            bitmap::Action::Disable => "disable".into(),
        };
        let label = format!("bitmap {what} '{name}' {}", file_name(&self.image));
        if let Some(host) = &self.host {
            let action = match action {
                bitmap::Action::Add => BitmapAction::Add { granularity: None },
                bitmap::Action::Remove => BitmapAction::Remove,
                bitmap::Action::Clear => BitmapAction::Clear,
                bitmap::Action::Enable => BitmapAction::Enable,
                bitmap::Action::Disable => BitmapAction::Disable,
                bitmap::Action::Merge(from) => BitmapAction::Merge {
                    from: String::from_utf8_lossy(&from).into_owned(),
                },
            };
            return JobSpec {
                kind: "bitmap",
                label,
                touches: vec![self.key.clone()],
                // Its agent reads it again when the job ends.
                refresh: vec![crate::remote::client::remote_path(host, &self.image)],
                work: on_host(
                    host,
                    JobOp::Bitmap {
                        image,
                        name,
                        action,
                    },
                    self.peers.clone(),
                ),
            };
        }
        JobSpec {
            kind: "bitmap",
            label,
            touches: vec![self.key.clone()],
            refresh: vec![self.image.clone()],
            work: Box::new(move |_progress, _cancel| {
                bitmap::run(
                    &image,
                    Some(Format::Qcow2),
                    name.as_bytes(),
                    &[action],
                    None,
                    None,
                )?;
                Ok(None)
            }),
        }
    }
}
