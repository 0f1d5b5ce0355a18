//! Flatten (`f`): copy into the image everything its backing chain
//! provides, then drop the backing file (`rebase -b ""`), after a yes/no.
//! An image on another host is flattened there by its agent, with the same
//! engine rebase.

use std::path::PathBuf;

use crate::engine::preflight::VmUsers;

use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{hint_line, in_use, on_host, qcow2_node, space_warning, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::rebase::{rebase, RebaseOptions};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint};
use crate::tui::rows::file_name;
use crate::tui::view::human;

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
    /// The host whose agent flattens it (`None`: here).
    pub host: Option<String>,
    /// Other hosts that see the file, asked first.
    pub peers: crate::remote::client::Peers,
}

pub struct FlattenDialog {
    pub plan: FlattenPlan,
}

impl FlattenDialog {
    pub fn open(f: &Forest, id: NodeId) -> Result<FlattenDialog, String> {
        let mut plan = plan(f, id)?;
        // The file system there is not this one's: its agent checks.
        if plan.host.is_none() {
            plan.space_warning = space_warning(&plan.image, plan.below);
        }
        Ok(FlattenDialog { plan })
    }

    pub fn on_key(&mut self, action: Option<Action>, ctx: &super::Ctx) -> Outcome {
        match action {
            Some(Action::Yes) => {
                Outcome::Submit(job(&self.plan, ctx.vm_guard(&[&self.plan.image])))
            }
            Some(Action::No) => {
                Outcome::Close(Status::cancelled("flatten cancelled: nothing was changed"))
            }
            _ => Outcome::Stay,
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let image = app.display_path(&plan.image);
        let mut lines = vec![
            Line::from(format!(
                "Flatten {image}: copy into it everything its backing chain ({}, {} \
                 allocated below it) provides, then drop the backing file. The guest \
                 sees the same disk; {image} grows and stands alone.",
                plan.backing,
                human(plan.below)
            )),
            Line::default(),
        ];
        if let Some(w) = &plan.space_warning {
            lines.push(Line::from(Span::styled(
                format!("⚠ {w}"),
                Style::new().fg(app.theme.warning),
            )));
            lines.push(Line::default());
        }
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
        super::draw_box(frame, area, "flatten?", lines, Style::new());
    }
}

/// Flattening `image`: it must have a readable chain to copy from.
pub fn plan(f: &Forest, image: NodeId) -> Result<FlattenPlan, String> {
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
        host: node.record.host.clone(),
        peers: crate::remote::client::peers([&node.record]),
    })
}

pub(crate) fn job(plan: &FlattenPlan, vms: VmUsers) -> JobSpec {
    let image = plan.image.clone();
    let label = format!("flatten {}", file_name(&plan.image));
    if let Some(host) = &plan.host {
        return JobSpec {
            kind: "flatten",
            label,
            touches: plan.chain_keys.clone(),
            // Its agent reads it again when the job ends.
            refresh: vec![crate::remote::client::remote_path(host, &plan.image)],
            work: on_host(
                host,
                JobOp::Rebase {
                    image,
                    backing: String::new(),
                    backing_format: None,
                    unsafe_header_only: false,
                },
                plan.peers.clone(),
            ),
        };
    }
    JobSpec {
        kind: "flatten",
        label,
        touches: plan.chain_keys.clone(),
        refresh: vec![plan.image.clone()],
        work: Box::new(move |progress, cancel| {
            let opts = RebaseOptions {
                backing: String::new(),
                backing_format: None,
                unsafe_header_only: false,
                vms,
            };
            rebase(&image, &opts, progress, cancel)?;
            Ok(None)
        }),
    }
}
