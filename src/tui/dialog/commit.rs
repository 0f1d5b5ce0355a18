//! Commit (`m`): copy the overlay into its backing image, as a job, after
//! a dialog that says what happens and, when other overlays share the
//! base, warns loudly and asks for the word `yes`. An overlay on another
//! host is committed there by its agent, with the same engine commit.

use std::path::{Path, PathBuf};

use crate::engine::preflight::VmUsers;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{hint_line, in_use, on_host, space_warning, usable, Ctx, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::{self, Format};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::view::human;

/// What a commit of the selected overlay would do, computed from the forest
/// in memory when `m` is pressed, shown in the dialog and carried out when
/// confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPlan {
    pub top: PathBuf,
    pub top_key: PathBuf,
    pub base: PathBuf,
    pub base_key: PathBuf,
    /// The overlay's allocated bytes: about what gets copied.
    pub allocated: u64,
    /// Other overlays of the base (the top's siblings and everything on
    /// them) among the scanned images: their view changes with the base.
    pub affected: usize,
    /// The base's file system may be too small for what is copied.
    pub space_warning: Option<String>,
    /// The host whose agent commits it (`None`: here).
    pub host: Option<String>,
    /// Other hosts that see the top or the base, asked first.
    pub peers: crate::remote::client::Peers,
}

impl CommitPlan {
    /// With affected overlays the word `yes` is required, so a reflexive
    /// Enter cannot invalidate them.
    pub fn needs_typed_yes(&self) -> bool {
        self.affected > 0
    }

    /// The files a commit changes: the base takes the data, the top is
    /// emptied.
    pub fn paths(&self) -> [&Path; 2] {
        [&self.top, &self.base]
    }
}

pub struct CommitDialog {
    pub plan: CommitPlan,
    /// What the user typed (when `yes` is required).
    pub input: String,
    /// Confirmed without `yes` typed: say what is wanted.
    pub nudge: bool,
}

/// A few letters are enough for `yes`; more is noise.
const MAX_TYPED: usize = 8;

impl CommitDialog {
    pub fn open(f: &Forest, id: NodeId) -> Result<CommitDialog, String> {
        let mut plan = plan(f, id)?;
        // The file system there is not this one's: its agent checks.
        if plan.host.is_none() {
            plan.space_warning = space_warning(&plan.base, plan.allocated);
        }
        Ok(CommitDialog {
            plan,
            input: String::new(),
            nudge: false,
        })
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        let cancelled =
            || Outcome::Close(Status::cancelled("commit cancelled: nothing was changed"));
        if !self.plan.needs_typed_yes() {
            return match action {
                Some(Action::Yes) => {
                    Outcome::Submit(job(&self.plan, ctx.vm_guard(&self.plan.paths())))
                }
                Some(Action::No) => cancelled(),
                _ => Outcome::Stay,
            };
        }
        if let Some(c) = key.typed() {
            // A "no" key cancels unless it is a letter of the word asked
            // for (`n` by default: `yes` has none).
            if action == Some(Action::No) && !"yes".contains(c.to_ascii_lowercase()) {
                return cancelled();
            }
            if self.input.chars().count() < MAX_TYPED {
                self.input.push(c);
            }
            return Outcome::Stay;
        }
        match action.or_else(|| ctx.keymap.action_for(&[Layer::Input], key)) {
            Some(Action::Yes) => {
                if self.input.trim().eq_ignore_ascii_case("yes") {
                    Outcome::Submit(job(&self.plan, ctx.vm_guard(&self.plan.paths())))
                } else {
                    self.input.clear();
                    self.nudge = true;
                    Outcome::Stay
                }
            }
            Some(Action::No) => cancelled(),
            Some(Action::Delete) => {
                self.input.pop();
                Outcome::Stay
            }
            Some(Action::ClearInput) => {
                self.input.clear();
                Outcome::Stay
            }
            _ => Outcome::Stay,
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        vec![
            keymap.hint(Layer::Confirm, Action::Yes, Some("commit")),
            keymap.hint(Layer::Confirm, Action::No, None),
        ]
    }

    /// What will happen, and loudly (colour, glyph and words) how many
    /// other overlays of the base it invalidates.
    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let top = app.display_path(&plan.top);
        let base = app.display_path(&plan.base);
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let dim = Style::new().fg(app.theme.dim);
        let mut lines = vec![
            Line::from(format!(
                "Commit {top} into {base}: copies its {} (allocated size) into the base, \
                 then empties {top}.",
                human(plan.allocated)
            )),
            Line::default(),
        ];
        if let Some(w) = &plan.space_warning {
            lines.push(Line::from(Span::styled(format!("⚠ {w}"), warn)));
            lines.push(Line::default());
        }
        // Another host's domains are that host's agent's to check.
        if let Some(w) = plan
            .host
            .is_none()
            .then(|| super::vm_warning(app, &plan.paths()))
            .flatten()
        {
            lines.extend([w, Line::default()]);
        }
        if plan.affected > 0 {
            let n = plan.affected;
            let (s, verb) = if n == 1 { ("", "sees") } else { ("s", "see") };
            lines.push(Line::from(Span::styled(
                format!(
                    "⚠ WARNING: {n} other overlay{s} of {base} {verb} changed data afterwards: \
                     committing into a shared base invalidates them."
                ),
                warn,
            )));
            lines.push(Line::from(Span::styled(
                "(counted among the scanned images; overlays elsewhere are hit too)",
                dim,
            )));
            lines.push(Line::default());
            lines.push(super::typed_yes_line(app, &self.input, warn));
            let no = app.keymap.keys_text(Layer::Confirm, Action::No);
            if self.nudge {
                lines.push(Line::from(Span::styled(
                    format!("only the word yes commits · {no} cancels"),
                    warn,
                )));
            } else {
                lines.push(Line::from(Span::styled(format!("{no} cancels"), dim)));
            }
        } else {
            lines.push(Line::from(Span::styled(
                "no other overlay of the base was found: nothing else changes",
                dim,
            )));
            lines.push(Line::default());
            lines.push(hint_line(app, hints));
        }
        let border = if plan.affected > 0 {
            warn
        } else {
            Style::new()
        };
        super::draw_box(frame, area, "commit?", lines, border);
    }
}

/// What committing node `id` into its backing would do, or why it cannot.
/// Only the forest is read: this runs on a key press.
pub fn plan(f: &Forest, id: NodeId) -> Result<CommitPlan, String> {
    usable(f, id)?;
    let node = &f.nodes[id];
    let r = &node.record;
    let Some(summary) = &r.summary else {
        return Err("its header could not be read".into());
    };
    if summary.format == Format::Raw {
        return Err("a raw image has no backing image to commit into".into());
    }
    if summary.format != Format::Qcow2 {
        return Err(format!(
            "{} images are not supported",
            summary.format.name()
        ));
    }
    if let Some(flag) = node.flags.iter().find(|fl| fl.is_broken()) {
        return Err(flag.describe());
    }
    let Some(parent) = node.parent else {
        return Err(match &summary.backing_filename {
            None => "it has no backing image: nothing to commit into".into(),
            Some(b) => format!("its backing image {b} was not found"),
        });
    };
    let base = &f.nodes[parent];
    if let Some(flag) = base.flags.iter().find(|fl| fl.is_broken()) {
        return Err(format!("its backing image is broken: {}", flag.describe()));
    }
    // The top is emptied and the base written: a VM on either (or on any
    // overlay of the top, which holds the top as its backing) stops it.
    in_use(f, &[id, parent], false)?;
    let affected = base
        .children
        .iter()
        .filter(|&&c| c != id)
        .map(|&c| f.walk(c).len())
        .sum();
    Ok(CommitPlan {
        top: r.path.clone(),
        top_key: r.key.clone(),
        base: base.record.path.clone(),
        base_key: base.record.key.clone(),
        allocated: r.sizes.allocated,
        affected,
        space_warning: None,
        host: r.host.clone(),
        peers: crate::remote::client::peers([r, &base.record]),
    })
}

/// The confirmed commit. It touches both images, so no other job on either
/// runs meanwhile; the engine takes QEMU's locks itself.
pub(crate) fn job(plan: &CommitPlan, vms: VmUsers) -> JobSpec {
    let top = plan.top.clone();
    let label = format!(
        "commit {} → {}",
        file_name(&plan.top),
        file_name(&plan.base)
    );
    let touches = vec![plan.top_key.clone(), plan.base_key.clone()];
    if let Some(host) = &plan.host {
        return JobSpec {
            kind: "commit",
            label,
            touches,
            // Its agent reads them again when the job ends.
            refresh: vec![
                crate::remote::client::remote_path(host, &plan.top),
                crate::remote::client::remote_path(host, &plan.base),
            ],
            work: on_host(
                host,
                JobOp::Commit {
                    image: top,
                    keep_top: false,
                },
                plan.peers.clone(),
            ),
        };
    }
    JobSpec {
        kind: "commit",
        label,
        touches,
        refresh: vec![plan.top.clone(), plan.base.clone()],
        work: Box::new(move |progress, cancel| {
            let opts = engine::CommitOptions {
                base: None,
                keep_top: false,
                vms,
            };
            engine::commit(&top, &opts, progress, cancel)?;
            Ok(None)
        }),
    }
}
