//! Batches (`f`, `v`, `m`, `b`, `R` while images are marked): one confirm list
//! of every marked image, each with what will be done to it or, when the
//! single-image dialog would refuse it (a QEMU holds it, its chain is
//! broken, it has nothing to commit into, ...), why it is skipped. Yes
//! starts one job per image that is not skipped, through the app's one
//! submit path; the skipped ones stay marked.
//!
//! The plans are the single-image dialogs' own (`flatten::plan`,
//! `commit::plan`, `convert::plan`, `rebase::plan`, `reset::plan`), so a
//! batch refuses
//! exactly what one image at a time would. Images of another host (the
//! app batches those of one host) are planned from that host's forest and
//! their jobs run there by its agent, as the plans say.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::commit::CommitPlan;
use super::convert::ConvertPlan;
use super::flatten::FlattenPlan;
use super::rebase::RebasePlan;
use super::reset::ResetPlan;
use super::{hint_line, in_use, space_warning, Ctx, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::Format;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::view::{human, wrap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Flatten,
    Commit,
    Convert,
    Rebase,
    Reset,
}

impl Op {
    pub fn verb(self) -> &'static str {
        match self {
            Op::Flatten => "flatten",
            Op::Commit => "commit",
            Op::Convert => "convert",
            Op::Rebase => "rebase",
            Op::Reset => "reset",
        }
    }
}

/// What one image of the batch gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Flatten(FlattenPlan),
    Commit(CommitPlan),
    Convert(ConvertPlan),
    Rebase(RebasePlan),
    Reset(ResetPlan),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: PathBuf,
    pub path: PathBuf,
    /// The image's host (`None`: here).
    pub host: Option<String>,
    /// The plan, or why the image is skipped.
    pub plan: Result<Plan, String>,
}

pub struct BatchDialog {
    pub op: Op,
    pub items: Vec<Item>,
    /// Rebase: the new backing as the tree shows it.
    pub backing: Option<PathBuf>,
    /// Rebase: header only, for every image.
    pub unsafe_mode: bool,
    /// Typed so far, when the word `yes` is required (a commit into a
    /// base that other overlays share).
    pub input: String,
    /// Confirmed without `yes` typed: say what is wanted.
    pub nudge: bool,
    /// The first image of the list shown.
    pub scroll: usize,
    /// The space the batch may need does not look free.
    pub space_warning: Option<String>,
}

/// Scrolled by this many images a page.
const PAGE: usize = 10;
/// A few letters are enough for `yes`; more is noise.
const MAX_TYPED: usize = 8;

impl BatchDialog {
    fn new(op: Op, items: Vec<Item>) -> BatchDialog {
        BatchDialog {
            op,
            items,
            backing: None,
            unsafe_mode: false,
            input: String::new(),
            nudge: false,
            scroll: 0,
            space_warning: None,
        }
    }

    /// `f` on the marked images `ids`.
    pub fn flatten(f: &Forest, ids: &[NodeId]) -> BatchDialog {
        let items = items(f, ids, |id| super::flatten::plan(f, id).map(Plan::Flatten));
        let mut d = BatchDialog::new(Op::Flatten, items);
        let below = d
            .plans()
            .map(|p| match p {
                Plan::Flatten(p) => p.below,
                _ => 0,
            })
            .sum();
        d.space_warning = d.first_path().and_then(|p| space_warning(&p, below));
        d
    }

    /// `R` on the marked images `ids`.
    pub fn reset(f: &Forest, ids: &[NodeId], roots: &[PathBuf]) -> BatchDialog {
        let items = items(f, ids, |id| {
            super::reset::plan(f, id, roots).map(Plan::Reset)
        });
        BatchDialog::new(Op::Reset, items)
    }

    /// `m` on the marked images `ids`.
    pub fn commit(f: &Forest, ids: &[NodeId]) -> BatchDialog {
        let mut items = items(f, ids, |id| super::commit::plan(f, id).map(Plan::Commit));
        // Two marked overlays where one is the other's base: committing
        // the upper one rewrites the lower one, whose own commit would
        // then carry data it did not have when asked.
        let bases: Vec<PathBuf> = items
            .iter()
            .filter_map(|i| match &i.plan {
                Ok(Plan::Commit(p)) => Some(p.base_key.clone()),
                _ => None,
            })
            .collect();
        for item in &mut items {
            if let Ok(Plan::Commit(p)) = &item.plan {
                if bases.contains(&p.top_key) {
                    item.plan =
                        Err("an overlay marked too commits into it: commit it alone, after".into());
                }
            }
        }
        let mut d = BatchDialog::new(Op::Commit, items);
        let first_base = d.plans().find_map(|p| match p {
            Plan::Commit(p) if p.host.is_none() => Some(p.base.clone()),
            _ => None,
        });
        let total = d
            .plans()
            .map(|p| match p {
                Plan::Commit(p) => p.allocated,
                _ => 0,
            })
            .sum();
        d.space_warning = first_base.and_then(|b| space_warning(&b, total));
        d
    }

    /// `v` on the marked images `ids`, with the choices of the convert
    /// dialog (`template`) and its destination field as the suffix each
    /// new name gets: `<stem><suffix>.<format>` beside its image. A name
    /// that exists, or that two images of the batch would both get, skips
    /// the image: nothing is ever replaced.
    pub fn convert(f: &Forest, ids: &[NodeId], template: &ConvertPlan) -> BatchDialog {
        let suffix = template.dest.trim();
        let mut taken: HashMap<PathBuf, PathBuf> = HashMap::new();
        let items = items(f, ids, |id| {
            let mut p = super::convert::plan(f, id)?;
            let stem = p
                .source
                .file_stem()
                .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
            p.dest = format!("{stem}{suffix}.{}", template.format.name());
            p.format = template.format;
            p.compression = template.compression;
            p.cluster_size = template.cluster_size;
            p.keep_backing = template.keep_backing && p.backing.is_some();
            let dest = p.source.parent().unwrap_or(Path::new("")).join(&p.dest);
            // One stat per image, on the key that submits the form (for
            // another host's image, its forest answers); the job refuses
            // too if the name appears meanwhile.
            let exists = match &p.host {
                Some(host) => f.nodes.iter().any(|n| {
                    n.record.host.as_deref() == Some(host.as_str()) && n.record.path == dest
                }),
                None => dest.symlink_metadata().is_ok(),
            };
            if exists {
                return Err(format!(
                    "{} exists: an existing file is never replaced",
                    p.dest
                ));
            }
            if let Some(other) = taken.insert(dest, p.source.clone()) {
                return Err(format!(
                    "{} is the new name of {} too",
                    p.dest,
                    crate::tui::rows::file_name(&other)
                ));
            }
            Ok(Plan::Convert(p))
        });
        let mut d = BatchDialog::new(Op::Convert, items);
        let total = d
            .plans()
            .map(|p| match p {
                Plan::Convert(p) => p.allocated,
                _ => 0,
            })
            .sum();
        d.space_warning = d.first_path().and_then(|p| space_warning(&p, total));
        d
    }

    /// `b` on the marked images `keys`, onto the image `backing` picked in
    /// the tree. Safe by default; images whose old chain is broken can
    /// only be rebased unsafe, and are skipped in safe mode.
    pub fn rebase(f: &Forest, keys: &[PathBuf], backing: NodeId) -> BatchDialog {
        let ids: Vec<NodeId> = keys.iter().filter_map(|k| f.get(k)).collect();
        let items = items(f, &ids, |id| {
            in_use(f, &[id], false)?;
            super::rebase::plan(f, id, backing).map(Plan::Rebase)
        });
        let mut d = BatchDialog::new(Op::Rebase, items);
        d.backing = Some(f.nodes[backing].record.path.clone());
        d
    }

    fn plans(&self) -> impl Iterator<Item = &Plan> {
        self.items.iter().filter_map(|i| i.plan.as_ref().ok())
    }

    /// Another host's file system is not this one's: its agent checks.
    fn first_path(&self) -> Option<PathBuf> {
        self.items
            .iter()
            .find(|i| i.plan.is_ok() && i.host.is_none())
            .map(|i| i.path.clone())
    }

    /// What the image gets, or why it is skipped, with the batch's current
    /// choices (safe or unsafe rebase).
    pub fn verdict(&self, item: &Item) -> Result<String, String> {
        let plan = item.plan.as_ref().map_err(Clone::clone)?;
        Ok(match plan {
            Plan::Flatten(p) => format!(
                "copies up to {} from {}, then stands alone",
                human(p.below),
                p.backing
            ),
            Plan::Commit(p) => {
                let mut s = format!(
                    "{} into {}",
                    human(p.allocated),
                    crate::tui::rows::file_name(&p.base)
                );
                if p.affected > 0 {
                    s.push_str(&format!(
                        " ⚠ {} other overlay{} of it change",
                        p.affected,
                        if p.affected == 1 { "" } else { "s" }
                    ));
                }
                s
            }
            Plan::Convert(p) => format!("→ {}", p.dest),
            Plan::Reset(p) => format!("{} of its own changes lost", human(p.allocated)),
            Plan::Rebase(p) => {
                if !self.unsafe_mode {
                    if let Some(why) = &p.safe_refused {
                        return Err(format!("no safe rebase: {why}"));
                    }
                }
                format!(
                    "→ {} ({})",
                    p.backing_name,
                    if self.unsafe_mode { "unsafe" } else { "safe" }
                )
            }
        })
    }

    /// Images that will get a job.
    pub fn accepted(&self) -> usize {
        self.items
            .iter()
            .filter(|i| self.verdict(i).is_ok())
            .count()
    }

    /// A commit into a base other overlays share needs the word `yes`, as
    /// the single commit dialog does.
    pub fn needs_typed_yes(&self) -> bool {
        self.op == Op::Commit
            && self
                .plans()
                .any(|p| matches!(p, Plan::Commit(p) if p.needs_typed_yes()))
    }

    pub fn layers(&self) -> &'static [Layer] {
        if self.op == Op::Rebase {
            &[Layer::Batch, Layer::Rebase, Layer::Confirm]
        } else {
            &[Layer::Batch, Layer::Confirm]
        }
    }

    fn cancelled(&self) -> Outcome {
        Outcome::Close(Status::cancelled(format!(
            "{} of {} marked images cancelled: nothing was changed",
            self.op.verb(),
            self.items.len()
        )))
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        if self.needs_typed_yes() {
            if let Some(c) = key.typed() {
                if action == Some(Action::No) && !"yes".contains(c.to_ascii_lowercase()) {
                    return self.cancelled();
                }
                if self.input.chars().count() < MAX_TYPED {
                    self.input.push(c);
                }
                return Outcome::Stay;
            }
            match ctx.keymap.action_for(&[Layer::Input], key) {
                Some(Action::Delete) => {
                    self.input.pop();
                    return Outcome::Stay;
                }
                Some(Action::ClearInput) => {
                    self.input.clear();
                    return Outcome::Stay;
                }
                _ => {}
            }
        }
        let last = self.items.len().saturating_sub(1);
        match action {
            Some(Action::Up) => self.scroll = self.scroll.saturating_sub(1),
            Some(Action::Down) => self.scroll = (self.scroll + 1).min(last),
            Some(Action::PageUp) => self.scroll = self.scroll.saturating_sub(PAGE),
            Some(Action::PageDown) => self.scroll = (self.scroll + PAGE).min(last),
            Some(Action::Top) => self.scroll = 0,
            Some(Action::Bottom) => self.scroll = last,
            Some(Action::Safe) => self.unsafe_mode = false,
            Some(Action::Unsafe) => self.unsafe_mode = true,
            Some(Action::No) => return self.cancelled(),
            Some(Action::Yes) => {
                if self.needs_typed_yes() && !self.input.trim().eq_ignore_ascii_case("yes") {
                    self.input.clear();
                    self.nudge = true;
                    return Outcome::Stay;
                }
                return self.submit(ctx);
            }
            _ => {}
        }
        Outcome::Stay
    }

    /// One job per image that is not skipped.
    fn submit(&mut self, ctx: &Ctx) -> Outcome {
        let verb = self.op.verb();
        let skipped = self.items.len() - self.accepted();
        if skipped == self.items.len() {
            return Outcome::Say(Status::error(format!(
                "nothing to {verb}: every marked image is skipped (the list says why)"
            )));
        }
        let mut jobs: Vec<JobSpec> = Vec::new();
        let mut unmark = Vec::new();
        for item in &self.items {
            if self.verdict(item).is_err() {
                continue;
            }
            let Ok(plan) = &item.plan else { continue };
            jobs.push(match plan {
                Plan::Flatten(p) => super::flatten::job(p, ctx.vm_guard(&[&p.image])),
                Plan::Commit(p) => super::commit::job(p, ctx.vm_guard(&p.paths())),
                Plan::Convert(p) => super::convert::job(p),
                Plan::Reset(p) => super::reset::job(p, ctx.vm_guard(&[&p.image])),
                Plan::Rebase(p) => {
                    let mut p = p.clone();
                    p.unsafe_mode = self.unsafe_mode;
                    super::rebase::job(&p, ctx.vm_guard(&[&p.image]))
                }
            });
            unmark.push(item.key.clone());
        }
        let n = jobs.len();
        let mut text = format!("{verb}: {n} job{} started", if n == 1 { "" } else { "s" });
        if skipped > 0 {
            text.push_str(&format!(
                ", {skipped} image{} skipped (still marked)",
                if skipped == 1 { "" } else { "s" }
            ));
        }
        Outcome::SubmitAll {
            jobs,
            unmark,
            say: Some(Status::info(text)),
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        let yes = format!("{} {}", self.op.verb(), self.accepted());
        let mut h = vec![keymap.hint(Layer::Batch, Action::Down, Some("scroll"))];
        if self.op == Op::Rebase {
            h.push(keymap.hint(Layer::Rebase, Action::Safe, None));
            h.push(keymap.hint(Layer::Rebase, Action::Unsafe, None));
        }
        h.push(keymap.hint(Layer::Confirm, Action::Yes, Some(&yes)));
        h.push(keymap.hint(Layer::Confirm, Action::No, None));
        h
    }

    /// The summary lines above the list.
    fn summary(&self, app: &App) -> Vec<String> {
        let n = self.items.len();
        let s = if n == 1 { "" } else { "s" };
        let mut lines = Vec::new();
        lines.push(match self.op {
            Op::Flatten => format!(
                "Flatten {n} marked image{s}: each gets everything its backing chain \
                 provides, then drops its backing file. The guests see the same disks."
            ),
            Op::Commit => format!(
                "Commit {n} marked overlay{s} into their backing images: each one's data \
                 is copied into its base, then the overlay is emptied."
            ),
            Op::Convert => {
                let first = self.plans().find_map(|p| match p {
                    Plan::Convert(p) => Some(p),
                    _ => None,
                });
                match first {
                    Some(p) => format!(
                        "Convert {n} marked image{s} into new images beside them: {}, \
                         compression {}{}. Existing files are never replaced.",
                        p.format.name(),
                        p.compression_name(),
                        if p.format == Format::Qcow2 {
                            format!(", {} clusters", human(p.cluster_size))
                        } else {
                            String::new()
                        }
                    ),
                    None => format!("Convert {n} marked image{s} into new images beside them."),
                }
            }
            Op::Reset => format!(
                "Reset {n} marked overlay{s}: each goes back to its backing file; what its \
                 guest wrote is lost."
            ),
            Op::Rebase => format!(
                "Rebase {n} marked image{s} onto {}: {}",
                self.backing
                    .as_ref()
                    .map_or_else(String::new, |b| app.display_path(b)),
                if self.unsafe_mode {
                    "unsafe: only the headers change; the guests then see the new \
                     backing's data."
                } else {
                    "safe: where the old and the new backing differ, the old data is \
                     copied in first; the guests see the same disks."
                }
            ),
        });
        let skipped = n - self.accepted();
        if skipped > 0 {
            lines.push(format!(
                "{skipped} skipped, with the reason: nothing is done to {}.",
                if skipped == 1 { "it" } else { "them" }
            ));
        }
        lines
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        // As wide as draw_box makes it.
        let width = area.width.saturating_sub(4).min(80);
        // Borders and a column of padding on each side.
        let inner = usize::from(width.saturating_sub(4)).max(10);
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let dim = Style::new().fg(app.theme.dim);
        let mut head: Vec<Line> = Vec::new();
        for s in self.summary(app) {
            head.extend(wrap(&s, inner).into_iter().map(Line::from));
        }
        if let Some(w) = &self.space_warning {
            head.extend(
                wrap(&format!("⚠ {w}"), inner)
                    .into_iter()
                    .map(|l| Line::from(Span::styled(l, warn))),
            );
        }
        head.push(Line::default());

        let mut tail: Vec<Line> = vec![Line::default()];
        // Another host's domains are that host's agent's to check.
        let paths: Vec<&std::path::Path> = self
            .items
            .iter()
            .filter(|i| i.host.is_none())
            .map(|i| i.path.as_path())
            .collect();
        if let Some(w) = super::vm_warning(app, &paths) {
            tail.extend([w, Line::default()]);
        }
        if self.needs_typed_yes() {
            tail.push(Line::from(Span::styled(
                "⚠ WARNING: committing into a shared base invalidates its other overlays",
                warn,
            )));
            tail.push(super::typed_yes_line(app, &self.input, warn));
            if self.nudge {
                tail.push(Line::from(Span::styled("only the word yes commits", warn)));
            }
        }
        let hint = hint_line(app, hints);
        let hint_rows = hint.width().div_ceil(inner).max(1);
        tail.push(hint);

        // Each image on its own lines: its name, then what it gets or why
        // it is skipped, wrapped, so a holder's pid is never cut off.
        let name_w = self
            .items
            .iter()
            .map(|i| unicode_width::UnicodeWidthStr::width(app.display_path(&i.path).as_str()))
            .max()
            .unwrap_or(0)
            .min(inner / 2);
        let item_lines = |item: &Item| -> Vec<Line<'static>> {
            let name = crate::tui::view::fit(&app.display_path(&item.path), name_w);
            let (glyph, text, style) = match self.verdict(item) {
                Ok(t) => ("✓", t, Style::new()),
                Err(why) => ("–", format!("skipped: {why}"), dim),
            };
            let lead = format!("{glyph} {name}  ");
            let indent = unicode_width::UnicodeWidthStr::width(lead.as_str());
            wrap(&text, inner.saturating_sub(indent))
                .into_iter()
                .enumerate()
                .map(|(k, part)| {
                    let l = if k == 0 {
                        lead.clone()
                    } else {
                        " ".repeat(indent)
                    };
                    Line::from(vec![Span::styled(l, style), Span::styled(part, style)])
                })
                .collect()
        };
        // draw_box adds its borders and a spare line; one more line says
        // which images are shown when they do not all fit.
        let fixed = head.len() + tail.len() + (hint_rows - 1) + 3 + 1;
        let room = usize::from(area.height).saturating_sub(fixed).max(1);
        let start = self.scroll.min(self.items.len().saturating_sub(1));
        let mut list: Vec<Line> = Vec::new();
        let mut shown = 0;
        for item in &self.items[start..] {
            let lines = item_lines(item);
            if !list.is_empty() && list.len() + lines.len() > room {
                break;
            }
            list.extend(lines);
            shown += 1;
        }
        list.truncate(room);
        let more = start > 0 || start + shown < self.items.len();
        let mut lines = head;
        lines.extend(list);
        if more {
            lines.push(Line::from(Span::styled(
                format!(
                    "images {}-{} of {}",
                    start + 1,
                    start + shown,
                    self.items.len()
                ),
                dim,
            )));
        }
        lines.extend(tail);
        let border = if self.needs_typed_yes() || self.unsafe_mode {
            warn
        } else {
            Style::new()
        };
        let title = format!(
            "{} {} marked image{}?",
            self.op.verb(),
            self.items.len(),
            if self.items.len() == 1 { "" } else { "s" }
        );
        super::draw_box(frame, area, &title, lines, border);
    }
}

/// The batch's items, in the order given (the marks' order).
fn items(
    f: &Forest,
    ids: &[NodeId],
    mut plan: impl FnMut(NodeId) -> Result<Plan, String>,
) -> Vec<Item> {
    ids.iter()
        .map(|&id| {
            let r = &f.nodes[id].record;
            Item {
                key: r.key.clone(),
                path: r.path.clone(),
                host: r.host.clone(),
                plan: plan(id),
            }
        })
        .collect()
}
