//! Reset (`R`): throw away an overlay's own changes, so that its guest sees
//! its backing file again, after a yes/no that says what is lost. Refused
//! before asking when the catalog can see why: no backing file, images
//! that use it as their backing file, a QEMU holding it, internal
//! snapshots. An image on another host is reset there by its agent, with
//! the same engine reset, against the roots named on that host.

use std::path::PathBuf;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{hint_line, in_use, on_host, qcow2_node, roots_on, Ctx, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::preflight::VmUsers;
use crate::engine::{self, ResetOptions};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint};
use crate::tui::rows::file_name;
use crate::tui::view::human;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPlan {
    pub image: PathBuf,
    pub key: PathBuf,
    pub backing: String,
    /// Its own data, lost: the allocated size.
    pub allocated: u64,
    /// Where images that use it would be found (paths on `host`).
    pub roots: Vec<PathBuf>,
    /// The host whose agent resets it (`None`: here).
    pub host: Option<String>,
    /// Other hosts that see the file, asked first.
    pub peers: crate::remote::client::Peers,
}

pub struct ResetDialog {
    pub plan: ResetPlan,
}

impl ResetDialog {
    pub fn open(f: &Forest, id: NodeId, roots: &[PathBuf]) -> Result<ResetDialog, String> {
        Ok(ResetDialog {
            plan: plan(f, id, roots)?,
        })
    }

    pub fn on_key(&mut self, action: Option<Action>, ctx: &Ctx) -> Outcome {
        match action {
            Some(Action::Yes) => {
                Outcome::Submit(job(&self.plan, ctx.vm_guard(&[&self.plan.image])))
            }
            Some(Action::No) => {
                Outcome::Close(Status::cancelled("reset cancelled: nothing was changed"))
            }
            _ => Outcome::Stay,
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let image = app.display_path(&plan.image);
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let lines = vec![
            Line::from(format!(
                "Reset {image}: a fresh empty overlay on {} (same size and options) \
                 replaces it; its guest sees {} again.",
                plan.backing, plan.backing
            )),
            Line::default(),
            Line::from(Span::styled(
                format!(
                    "⚠ Its own changes ({} on disk) are lost for good.",
                    human(plan.allocated)
                ),
                warn,
            )),
            Line::default(),
        ];
        let mut lines = lines;
        // Another host's domains are that host's agent's to check.
        if let Some(w) = plan
            .host
            .is_none()
            .then(|| super::vm_warning(app, &[&plan.image]))
            .flatten()
        {
            lines.extend([w, Line::default()]);
        }
        lines.push(hint_line(app, hints));
        super::draw_box(frame, area, "reset?", lines, warn);
    }
}

/// Resetting `id`: a qcow2 overlay with a backing file, no dependents, no
/// holder, no internal snapshots. Only the forest is read.
pub fn plan(f: &Forest, id: NodeId, roots: &[PathBuf]) -> Result<ResetPlan, String> {
    qcow2_node(f, id)?;
    let node = &f.nodes[id];
    let summary = node.record.summary.as_ref();
    let Some(backing) = summary.and_then(|s| s.backing_filename.clone()) else {
        return Err("it has no backing file: there is nothing to go back to".into());
    };
    if !node.children.is_empty() {
        let names: Vec<String> = node
            .children
            .iter()
            .map(|&c| file_name(&f.nodes[c].record.path))
            .collect();
        return Err(format!(
            "{} use{} it as backing file: resetting it would change what {}",
            names.join(", "),
            if names.len() == 1 { "s" } else { "" },
            if names.len() == 1 {
                "it reads"
            } else {
                "they read"
            },
        ));
    }
    in_use(f, &[id], false)?;
    if let Some(n) = summary.map(|s| s.snapshots).filter(|&n| n > 0) {
        return Err(format!(
            "it has {n} internal snapshot(s), which a reset would lose"
        ));
    }
    Ok(ResetPlan {
        image: node.record.path.clone(),
        key: node.record.key.clone(),
        backing,
        allocated: node.record.sizes.allocated,
        roots: match &node.record.host {
            Some(host) => roots_on(host, roots),
            None => roots.to_vec(),
        },
        host: node.record.host.clone(),
        peers: crate::remote::client::peers([&node.record]),
    })
}

pub(crate) fn job(plan: &ResetPlan, vms: VmUsers) -> JobSpec {
    let image = plan.image.clone();
    if let Some(host) = &plan.host {
        return JobSpec {
            kind: "reset",
            label: format!("reset {}", file_name(&plan.image)),
            touches: vec![plan.key.clone()],
            // Its agent reads it again when the job ends.
            refresh: vec![crate::remote::client::remote_path(host, &plan.image)],
            work: on_host(
                host,
                JobOp::Reset {
                    image,
                    roots: plan.roots.clone(),
                },
                plan.peers.clone(),
            ),
        };
    }
    let opts = ResetOptions {
        roots: plan.roots.clone(),
        vms,
    };
    JobSpec {
        kind: "reset",
        label: format!("reset {}", file_name(&plan.image)),
        touches: vec![plan.key.clone()],
        refresh: vec![plan.image.clone()],
        work: Box::new(move |_progress, _cancel| {
            engine::reset(&image, &opts)?;
            Ok(None)
        }),
    }
}
