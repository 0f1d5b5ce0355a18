//! Move (`M`): rename or move the selected image, as a job running the
//! engine's `mv`, after a dialog that asks where to and says which images
//! will be re-pointed. What the catalog already knows (a QEMU holding the
//! image or one of its dependents) refuses before the dialog opens; a
//! destination that exists is refused when typed (one `stat`).

use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{
    error, hint_line, in_use, lexical_normalize, on_host, roots_on, usable, Ctx, JobSpec, Outcome,
};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::move_image::destination;
use crate::engine::{self, MoveOptions};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;

pub struct MoveDialog {
    pub source: NodeId,
    pub source_path: PathBuf,
    /// The new name or path; a relative one is taken from the image's
    /// directory. Starts as the current name, to edit.
    pub input: String,
    /// The images the catalog sees using it: re-pointed by the move.
    pub dependents: Vec<PathBuf>,
}

impl MoveDialog {
    /// `M` on `id`: the dialog, or why the image cannot move now.
    pub fn open(f: &Forest, id: NodeId) -> Result<MoveDialog, String> {
        usable(f, id)?;
        let node = &f.nodes[id];
        // Held by any QEMU (a VM reading a base holds it too): the move
        // takes the writer's locks on the image and on every dependent.
        let mut ids = vec![id];
        ids.extend(&node.children);
        in_use(f, &ids, false)?;
        Ok(MoveDialog {
            source: id,
            source_path: node.record.path.clone(),
            input: file_name(&node.record.path),
            dependents: node
                .children
                .iter()
                .map(|&c| f.nodes[c].record.path.clone())
                .collect(),
        })
    }

    pub fn hints(keymap: &Keymap) -> Vec<Hint> {
        vec![
            keymap.hint(Layer::Input, Action::Submit, Some("move")),
            keymap.hint(Layer::Input, Action::Cancel, None),
        ]
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        if let Some(c) = key.typed() {
            self.input.push(c);
            return Outcome::Stay;
        }
        match action {
            Some(Action::Cancel) => {
                Outcome::Close(Status::cancelled("move cancelled: nothing was changed"))
            }
            Some(Action::Delete) => {
                self.input.pop();
                Outcome::Stay
            }
            Some(Action::ClearInput) => {
                self.input.clear();
                Outcome::Stay
            }
            Some(Action::Submit) => match self.job(ctx) {
                Ok(spec) => Outcome::Submit(spec),
                Err(why) => Outcome::Say(error(why)),
            },
            _ => Outcome::Stay,
        }
    }

    /// The move to the typed destination, or why not (it exists: one stat).
    fn job(&self, ctx: &Ctx) -> Result<JobSpec, String> {
        let typed = self.input.trim();
        if typed.is_empty() {
            return Err("type the new name, or a directory to move it into".into());
        }
        let src = self.source_path.clone();
        let dir = src.parent().unwrap_or(Path::new(""));
        let record = &ctx.forest.nodes[self.source].record;
        // On another host the typed path is a path there: no local stat
        // may answer for it. Its agent resolves a directory and refuses a
        // file that exists, as the engine does here.
        let dst = match &record.host {
            Some(_) => lexical_normalize(&dir.join(typed)),
            None => destination(&src, &dir.join(typed)),
        };
        if dst == src {
            return Err("that is where it is already".into());
        }
        let exists =
            match &record.host {
                Some(host) => ctx.forest.nodes.iter().any(|n| {
                    n.record.host.as_deref() == Some(host.as_str()) && n.record.path == dst
                }),
                None => dst.symlink_metadata().is_ok(),
            };
        if exists {
            return Err(format!(
                "{} exists: a move never replaces a file",
                ctx.display_path(&dst)
            ));
        }
        let mut touches = vec![record.key.clone()];
        let mut refresh = vec![src.clone(), dst.clone()];
        for &c in &ctx.forest.nodes[self.source].children {
            let r = &ctx.forest.nodes[c].record;
            touches.push(r.key.clone());
            refresh.push(r.path.clone());
        }
        let label = format!(
            "move {} → {}",
            ctx.display_path(&src),
            ctx.display_path(&dst)
        );
        let work: crate::jobs::Work = match &record.host {
            Some(host) => on_host(
                host,
                JobOp::Move {
                    src,
                    dst,
                    roots: roots_on(host, ctx.roots),
                },
                crate::remote::client::peers([record]),
            ),
            None => {
                let opts = MoveOptions {
                    roots: ctx.roots.to_vec(),
                    vms: ctx.vm_guard(&[&src]),
                };
                Box::new(move |p: &engine::Progress, c: &engine::Cancel| {
                    engine::move_image(&src, &dst, &opts, p, c)?;
                    Ok(Some(dst))
                })
            }
        };
        if let Some(host) = &record.host {
            // Paths there: its agent reads them again when the job ends.
            refresh = refresh
                .iter()
                .map(|p| crate::remote::client::remote_path(host, p))
                .collect();
        }
        Ok(JobSpec {
            kind: "move",
            label,
            touches,
            refresh,
            work,
        })
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let name = app.display_path(&self.source_path);
        let dim = Style::new().fg(app.theme.dim);
        let uses = match self.dependents.len() {
            0 => "no image uses it as backing file".to_string(),
            n => format!(
                "{n} image{} using it will be re-pointed: {}",
                if n == 1 { "" } else { "s" },
                self.dependents
                    .iter()
                    .map(|p| app.display_path(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut lines = vec![
            Line::from(vec![
                Span::raw("to: "),
                Span::raw(format!("{}▏", self.input)),
            ]),
            Line::from(uses),
            Line::from(Span::styled(
                "a new name, or a path from its directory; an existing directory takes it in",
                dim,
            )),
        ];
        // Another host's domains are that host's agent's to check.
        let local = app
            .forest
            .nodes
            .get(self.source)
            .is_some_and(|n| n.record.host.is_none());
        if let Some(w) = local
            .then(|| super::vm_warning(app, &[&self.source_path]))
            .flatten()
        {
            lines.push(w);
        }
        lines.push(hint_line(app, hints));
        super::draw_box(frame, area, &format!("move {name}"), lines, Style::new());
    }
}
