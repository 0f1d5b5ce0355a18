//! Rebase (`b`): first the [`Picker`] (the new backing is picked in the
//! tree, with a filter of its own, or its path typed and probed), then the
//! [`RebaseDialog`] (safe or unsafe, the format), then the job.

use std::path::{Path, PathBuf};

use crate::engine::preflight::VmUsers;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;

use super::{
    error, hint_line, in_use, lexical_normalize, on_host, qcow2_node, Ctx, Dialog, JobSpec, Outcome,
};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::rebase::{rebase, RebaseOptions};
use crate::engine::Format;
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::worker::BackingProbe;

/// `b` pressed: the user picks the new backing in the tree, or types a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picker {
    pub image: PathBuf,
    pub image_key: PathBuf,
    /// The picker's own filter: the tree's filter is set aside while
    /// picking, so the new backing is never hidden by it.
    pub filter: String,
    /// The filter is being typed.
    pub filtering: bool,
    /// Some while a path is being typed.
    pub typed: Option<String>,
    /// A typed name being probed on the inspector thread: the dialog opens
    /// when the answer says it is an image cowshed can use.
    pub probing: Option<String>,
    /// The marked images when `b` rebases a batch (empty for one image):
    /// the choice then opens the batch's confirm list.
    pub batch: Vec<PathBuf>,
}

impl Picker {
    pub fn open(f: &Forest, id: NodeId) -> Result<Picker, String> {
        qcow2_node(f, id)?;
        in_use(f, &[id], false)?;
        let r = &f.nodes[id].record;
        Ok(Picker {
            image: r.path.clone(),
            image_key: r.key.clone(),
            filter: String::new(),
            filtering: false,
            typed: None,
            probing: None,
            batch: Vec::new(),
        })
    }

    /// `b` with images marked: one new backing, picked in the tree, for
    /// all of them. Refusals are listed per image after the choice.
    pub fn open_batch(f: &Forest, ids: &[NodeId]) -> Result<Picker, String> {
        let &first = ids.first().ok_or("no image is marked")?;
        let r = &f.nodes[first].record;
        Ok(Picker {
            image: r.path.clone(),
            image_key: r.key.clone(),
            filter: String::new(),
            filtering: false,
            typed: None,
            probing: None,
            batch: ids
                .iter()
                .map(|&id| f.nodes[id].record.key.clone())
                .collect(),
        })
    }

    pub fn layers(&self) -> &'static [Layer] {
        if self.typed.is_some() {
            &[Layer::Input]
        } else if self.filtering {
            &[Layer::Filter]
        } else {
            &[Layer::Pick]
        }
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        if let Some(typed) = &mut self.typed {
            if self.probing.is_some() {
                return Outcome::Stay;
            }
            if let Some(c) = key.typed() {
                typed.push(c);
                return Outcome::Stay;
            }
            return match action {
                Some(Action::Cancel) => {
                    self.typed = None;
                    Outcome::Stay
                }
                Some(Action::Delete) => {
                    typed.pop();
                    Outcome::Stay
                }
                Some(Action::ClearInput) => {
                    typed.clear();
                    Outcome::Stay
                }
                Some(Action::Submit) => {
                    let name = typed.trim().to_string();
                    if name.is_empty() {
                        return Outcome::Say(error("type the new backing file's path"));
                    }
                    if let Some(image) = ctx.forest.get(&self.image_key) {
                        if let Some(host) = ctx.forest.nodes[image].record.host.clone() {
                            return typed_on_host(ctx.forest, image, &host, &name);
                        }
                    }
                    // Probing reads the file: the inspector thread does it
                    // and the dialog opens on its answer.
                    let dir = self.image_key.parent().unwrap_or(Path::new("/"));
                    let resolved = lexical_normalize(&dir.join(&name));
                    self.probing = Some(name.clone());
                    Outcome::Probe {
                        image_key: self.image_key.clone(),
                        name,
                        resolved,
                    }
                }
                _ => Outcome::Stay,
            };
        }
        if self.filtering {
            if let Some(c) = key.typed() {
                self.filter.push(c);
                return Outcome::Refilter;
            }
            return match action {
                Some(Action::Keep) => {
                    self.filtering = false;
                    Outcome::Stay
                }
                Some(Action::Clear) => {
                    self.filtering = false;
                    self.filter.clear();
                    Outcome::Refilter
                }
                Some(Action::Delete) => {
                    self.filter.pop();
                    Outcome::Refilter
                }
                Some(a @ (Action::Up | Action::Down)) => Outcome::Tree(a),
                _ => Outcome::Stay,
            };
        }
        match action {
            Some(
                a @ (Action::Up
                | Action::Down
                | Action::Left
                | Action::Right
                | Action::Fold
                | Action::Top
                | Action::Bottom
                | Action::PageUp
                | Action::PageDown),
            ) => Outcome::Tree(a),
            Some(Action::Filter) => {
                self.filtering = true;
                Outcome::Stay
            }
            // A typed name is stored as typed: relative to each image's
            // directory it would name a different file for each.
            Some(Action::TypePath) if !self.batch.is_empty() => Outcome::Say(error(
                "a batch's new backing is picked in the tree: each image then records \
                 the name that reaches it from its own directory",
            )),
            Some(Action::TypePath) => {
                self.typed = Some(String::new());
                Outcome::Stay
            }
            // Esc peels: first the picker's filter, then the rebase.
            Some(Action::Cancel) if !self.filter.is_empty() => {
                self.filter.clear();
                Outcome::Refilter
            }
            Some(Action::Cancel) => {
                Outcome::Close(Status::cancelled("rebase cancelled: nothing was changed"))
            }
            Some(Action::Choose) if !self.batch.is_empty() => {
                match ctx.selected {
                    Some(backing) => Outcome::Open(Dialog::Batch(
                        super::batch::BatchDialog::rebase(ctx.forest, &self.batch, backing),
                    )),
                    None => Outcome::Stay,
                }
            }
            Some(Action::Choose) => {
                let (Some(image), Some(backing)) = (ctx.forest.get(&self.image_key), ctx.selected)
                else {
                    return Outcome::Stay;
                };
                match plan(ctx.forest, image, backing) {
                    Ok(plan) => Outcome::Open(Dialog::Rebase(RebaseDialog { plan })),
                    Err(why) => {
                        Outcome::Say(error(format!("cannot rebase onto that image: {why}")))
                    }
                }
            }
            _ => Outcome::Stay,
        }
    }

    /// The answer about a typed backing: the rebase dialog with the format
    /// found, or why that file cannot be a backing file.
    pub fn on_probe(&mut self, p: BackingProbe, ctx: &Ctx) -> Outcome {
        if self.image_key != p.image_key || self.probing.as_deref() != Some(p.name.as_str()) {
            return Outcome::Stay;
        }
        self.probing = None;
        let format = match p.result {
            Ok(format) => format,
            Err(why) => {
                return Outcome::Say(error(format!("cannot rebase onto {}: {why}", p.name)))
            }
        };
        let f = ctx.forest;
        let dir = self.image_key.parent().unwrap_or(Path::new("/"));
        let resolved = lexical_normalize(&dir.join(&p.name));
        let backing_key = f
            .nodes
            .iter()
            .find(|n| n.record.key == resolved || n.record.path == resolved)
            .map(|n| n.record.key.clone());
        if let (Some(image), Some(b)) = (
            f.get(&self.image_key),
            backing_key.as_ref().and_then(|k| f.get(k)),
        ) {
            if let Err(why) = plan(f, image, b) {
                return Outcome::Say(error(format!("cannot rebase onto {}: {why}", p.name)));
            }
        }
        let safe_refused = f
            .get(&self.image_key)
            .and_then(|id| safe_rebase_refused(f, id));
        Outcome::Open(Dialog::Rebase(RebaseDialog {
            plan: RebasePlan {
                image: self.image.clone(),
                image_key: self.image_key.clone(),
                backing_name: p.name,
                backing_key,
                format,
                unsafe_mode: safe_refused.is_some(),
                safe_refused,
                host: None,
                peers: Vec::new(),
            },
        }))
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        if self.typed.is_some() {
            vec![
                keymap.hint(
                    Layer::Input,
                    Action::Submit,
                    Some("use it (stored as typed)"),
                ),
                keymap.hint(Layer::Input, Action::Cancel, Some("back to the tree")),
            ]
        } else if self.filtering {
            keymap.footer(Layer::Filter)
        } else {
            keymap.footer(Layer::Pick)
        }
    }

    /// A bar at the bottom of the tree says what is asked, so the tree
    /// stays visible to pick from; typing a path gets a prompt.
    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let image = if self.batch.is_empty() {
            app.display_path(&self.image)
        } else {
            format!("{} marked images", self.batch.len())
        };
        let dim = Style::new().fg(app.theme.dim);
        let first = match (&self.typed, &self.probing) {
            (Some(_), Some(probing)) => Line::from(format!("new backing of {image}: {probing}")),
            (Some(typed), None) => Line::from(format!("new backing of {image}: {typed}▏")),
            (None, _) if self.filtering => Line::from(vec![
                Span::raw(format!("rebase {image}: pick among images matching ")),
                Span::styled(
                    format!("{}▏", self.filter),
                    Style::new().fg(app.theme.accent),
                ),
            ]),
            (None, _) if !self.filter.is_empty() => Line::from(format!(
                "rebase {image}: select its new backing image (matching '{}')",
                self.filter
            )),
            (None, _) => Line::from(format!(
                "rebase {image}: select its new backing image in the tree"
            )),
        };
        let second = if self.probing.is_some() {
            Line::from(Span::styled("checking that it is an image…", dim))
        } else {
            hint_line(app, hints)
        };
        let h = 4.min(area.height);
        let r = Rect::new(
            area.x,
            area.y + area.height.saturating_sub(h + 2),
            area.width,
            h,
        );
        frame.render_widget(Clear, r);
        frame.render_widget(
            Paragraph::new(vec![first, second]).block(
                Block::new()
                    .borders(Borders::ALL)
                    .border_style(Style::new().fg(app.theme.accent))
                    .title(" rebase "),
            ),
            r,
        );
    }
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
    /// is then the default and the safe key says this instead.
    pub safe_refused: Option<String>,
    /// The host the image is on, when not this one: its agent rebases.
    pub host: Option<String>,
    /// The other hosts that see the image (shared storage): asked first.
    pub peers: crate::remote::client::Peers,
}

pub struct RebaseDialog {
    pub plan: RebasePlan,
}

impl RebaseDialog {
    pub fn on_key(&mut self, action: Option<Action>, ctx: &Ctx) -> Outcome {
        let plan = &mut self.plan;
        match action {
            Some(Action::No) => {
                Outcome::Close(Status::cancelled("rebase cancelled: nothing was changed"))
            }
            Some(Action::Unsafe) => {
                plan.unsafe_mode = true;
                Outcome::Stay
            }
            Some(Action::Safe) => match &plan.safe_refused {
                Some(why) => Outcome::Say(error(format!("no safe rebase: {why}"))),
                None => {
                    plan.unsafe_mode = false;
                    Outcome::Stay
                }
            },
            Some(Action::SwitchFormat) => {
                plan.format = if plan.format == Format::Qcow2 {
                    Format::Raw
                } else {
                    Format::Qcow2
                };
                Outcome::Stay
            }
            Some(Action::Yes) => Outcome::Submit(job(plan, ctx.vm_guard(&[&plan.image]))),
            _ => Outcome::Stay,
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        let mut h = vec![
            keymap.hint(Layer::Rebase, Action::Safe, None),
            keymap.hint(Layer::Rebase, Action::Unsafe, None),
        ];
        if self.plan.backing_key.is_none() {
            h.push(keymap.hint(Layer::Rebase, Action::SwitchFormat, None));
        }
        h.push(keymap.hint(Layer::Confirm, Action::Yes, Some("rebase")));
        h.push(keymap.hint(Layer::Confirm, Action::No, None));
        h
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let image = app.display_path(&plan.image);
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let dim = Style::new().fg(app.theme.dim);
        let mark = |on: bool| if on { "(•)" } else { "( )" };
        let safe = match &plan.safe_refused {
            None => Line::from(format!(
                "{} safe: where the old and the new backing differ, the old data is \
                 copied into {image} first; the guest sees the same disk.",
                mark(!plan.unsafe_mode)
            )),
            Some(why) => Line::from(Span::styled(format!("    safe: not possible: {why}"), dim)),
        };
        let mut lines = vec![
            Line::from(format!(
                "Rebase {image} onto {} (format {}).",
                plan.backing_name,
                plan.format.name()
            )),
            Line::default(),
            safe,
            Line::from(vec![
                Span::raw(format!("{} unsafe: ", mark(plan.unsafe_mode))),
                Span::styled(
                    "only the header changes; the guest then sees the new backing's data. \
                     Use it only when the new backing holds the same content (a moved or \
                     copied base).",
                    if plan.unsafe_mode { warn } else { Style::new() },
                ),
            ]),
            Line::default(),
        ];
        if plan.backing_key.is_none() {
            let keys = app.keymap.keys_text(Layer::Rebase, Action::SwitchFormat);
            lines.push(Line::from(Span::styled(
                format!(
                    "the new backing is not among the scanned images: {keys} switches its format"
                ),
                dim,
            )));
        }
        // Another host's domains are that host's agent's to check.
        let local = plan.host.is_none();
        if let Some(w) = local
            .then(|| super::vm_warning(app, &[&plan.image]))
            .flatten()
        {
            lines.extend([w, Line::default()]);
        }
        lines.push(hint_line(app, hints));
        let border = if plan.unsafe_mode { warn } else { Style::new() };
        super::draw_box(frame, area, "rebase?", lines, border);
    }
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
pub fn plan(f: &Forest, image: NodeId, backing: NodeId) -> Result<RebasePlan, String> {
    qcow2_node(f, image)?;
    if image == backing {
        return Err("an image cannot be its own backing file".into());
    }
    if f.walk(image).iter().any(|&(n, _)| n == backing) {
        return Err("that image grows on this one: the chain would loop".into());
    }
    super::usable(f, backing)?;
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
    if b.record.host != r.host {
        return Err(format!(
            "it is on {}, the image on {}: a backing file must be on the image's host",
            b.record.host.as_deref().unwrap_or("this host"),
            r.host.as_deref().unwrap_or("this host"),
        ));
    }
    let safe_refused = safe_rebase_refused(f, image);
    Ok(RebasePlan {
        image: r.path.clone(),
        image_key: r.key.clone(),
        backing_name: backing_name_for(&key_there(r), &key_there(&b.record)),
        backing_key: Some(b.record.key.clone()),
        format,
        unsafe_mode: safe_refused.is_some(),
        safe_refused,
        host: r.host.clone(),
        peers: crate::remote::client::peers([r]),
    })
}

/// A record's key as a path on its own host: another host's keys carry
/// its name (`host1:/srv/a.qcow2`), which no header may store.
fn key_there(r: &crate::catalog::ImageRecord) -> PathBuf {
    let Some(host) = &r.host else {
        return r.key.clone();
    };
    r.key
        .to_str()
        .and_then(|k| k.strip_prefix(host.as_str()))
        .and_then(|k| k.strip_prefix(':'))
        .map_or_else(|| r.path.clone(), PathBuf::from)
}

/// A path typed for an image on `host`: a path there, which no local
/// probe may answer for. It must be an image the host's agent shows.
fn typed_on_host(f: &Forest, image: NodeId, host: &str, name: &str) -> Outcome {
    let r = &f.nodes[image].record;
    let dir = r.path.parent().unwrap_or(Path::new("/"));
    let resolved = lexical_normalize(&dir.join(name));
    let found = f.nodes.iter().position(|n| {
        n.record.host.as_deref() == Some(host)
            && (n.record.path == resolved || key_there(&n.record) == resolved)
    });
    let Some(backing) = found else {
        return Outcome::Say(error(format!(
            "cannot rebase onto {name}: {} is no image {host} shows under its roots (on \
             another host a new backing is picked among them)",
            resolved.display()
        )));
    };
    match plan(f, image, backing) {
        Ok(mut plan) => {
            // Stored as typed, as for a local image.
            plan.backing_name = name.to_string();
            Outcome::Open(Dialog::Rebase(RebaseDialog { plan }))
        }
        Err(why) => Outcome::Say(error(format!("cannot rebase onto {name}: {why}"))),
    }
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

pub(crate) fn job(plan: &RebasePlan, vms: VmUsers) -> JobSpec {
    let image = plan.image.clone();
    let opts = RebaseOptions {
        backing: plan.backing_name.clone(),
        backing_format: Some(plan.format),
        unsafe_header_only: plan.unsafe_mode,
        vms,
    };
    // The old chain is read too, but it is the image's own backing:
    // another job on it would already touch this image's parent.
    let mut touches = vec![plan.image_key.clone()];
    touches.extend(plan.backing_key.clone());
    JobSpec {
        kind: "rebase",
        label: format!(
            "rebase{} {} → {}",
            if plan.unsafe_mode { " -u" } else { "" },
            file_name(&plan.image),
            plan.backing_name
        ),
        touches,
        // Another host's agent reads it again when the job ends.
        refresh: match &plan.host {
            Some(host) => vec![crate::remote::client::remote_path(host, &plan.image)],
            None => vec![plan.image.clone()],
        },
        work: match &plan.host {
            Some(host) => on_host(
                host,
                JobOp::Rebase {
                    image,
                    backing: opts.backing,
                    backing_format: opts.backing_format.map(|f| f.name().to_string()),
                    unsafe_header_only: opts.unsafe_header_only,
                },
                plan.peers.clone(),
            ),
            None => Box::new(move |progress, cancel| {
                rebase(&image, &opts, progress, cancel)?;
                Ok(None)
            }),
        },
    }
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
    }
}
