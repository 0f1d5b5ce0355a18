//! Delete (`d`): a list of images (the selected one, or several: marks, the
//! reclaim view) and the bytes they free. Into the trash by default
//! (`.cowshed-trash/` beside each image, restorable with `cowshed trash
//! restore`); a key switches to deleting for good. What the catalog can see
//! is refused before asking: an image a QEMU holds, an image that another
//! image outside the list uses as its backing file. A single image with
//! dependents may be streamed out instead (a key): its dependents are
//! rebased onto its backing first, then it goes.
//!
//! One job per image, leaves first: each job waits for the jobs of the
//! listed images that use it (they touch it), and the engine checks the
//! dependents again when it runs, so a base never goes before its overlay
//! did.

use std::collections::HashSet;
use std::path::PathBuf;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{hint_line, in_use, on_host, roots_on, usable, JobSpec, Outcome};
use crate::catalog::{Flag, Forest, NodeId};
use crate::engine::{self, RemoveOptions};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::view::human;

/// Listed images shown at most; the rest are counted.
const SHOWN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteItem {
    pub path: PathBuf,
    pub key: PathBuf,
    /// Bytes on disk: what deleting it frees.
    pub allocated: u64,
    /// Keys of the listed images that use it as backing: its job waits
    /// for theirs.
    pub listed_dependents: Vec<PathBuf>,
}

/// Streaming a single image out of its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlan {
    /// Its direct dependents, rebased onto its backing.
    pub dependents: Vec<PathBuf>,
    pub dependent_keys: Vec<PathBuf>,
    /// Its backing file's name, or `None`: the dependents are flattened.
    pub backing: Option<String>,
    /// Keys of its backing chain (read by the rebases).
    pub chain_keys: Vec<PathBuf>,
    /// Why streaming cannot start, when the catalog can tell.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletePlan {
    /// Leaves first.
    pub items: Vec<DeleteItem>,
    /// Allocated bytes of all of them.
    pub freed: u64,
    /// Offered when a single image has dependents.
    pub stream: Option<StreamPlan>,
    /// Where the engine looks for dependents besides each image's folder.
    pub roots: Vec<PathBuf>,
    /// The host the images are on, when not this one: its agent deletes.
    pub host: Option<String>,
}

pub struct DeleteDialog {
    pub plan: DeletePlan,
    /// Delete for good instead of moving into the trash.
    pub for_good: bool,
    /// Stream the single image out (its dependents rebased first).
    pub streaming: bool,
}

impl DeleteDialog {
    /// The dialog for `ids`, or why they cannot be deleted.
    pub fn open(f: &Forest, ids: &[NodeId], roots: &[PathBuf]) -> Result<DeleteDialog, String> {
        Ok(DeleteDialog {
            plan: plan(f, ids, roots)?,
            for_good: false,
            streaming: false,
        })
    }

    pub fn on_key(&mut self, action: Option<Action>, ctx: &super::Ctx) -> Outcome {
        match action {
            Some(Action::ForGood) => {
                self.for_good = !self.for_good;
                Outcome::Stay
            }
            Some(Action::Stream) => match &self.plan.stream {
                None => Outcome::Say(Status::error(
                    "nothing depends on it: there is nothing to stream, it is simply deleted",
                )),
                Some(s) => match &s.refused {
                    Some(why) => Outcome::Say(Status::error(format!("cannot stream it: {why}"))),
                    None => {
                        self.streaming = !self.streaming;
                        Outcome::Stay
                    }
                },
            },
            Some(Action::Yes) => {
                if self.plan.stream.is_some() && !self.streaming {
                    return Outcome::Say(Status::error(
                        "other images use it as their backing file: deleting it alone would \
                         break them; stream it out instead (its dependents are rebased first)",
                    ));
                }
                Outcome::SubmitAll {
                    jobs: self.jobs(ctx),
                    // Done with: what goes loses its mark.
                    unmark: self.plan.items.iter().map(|i| i.key.clone()).collect(),
                    say: None,
                }
            }
            Some(Action::No) => {
                Outcome::Close(Status::cancelled("delete cancelled: nothing was changed"))
            }
            _ => Outcome::Stay,
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        let yes = if self.streaming {
            "stream out"
        } else if self.for_good {
            "delete for good"
        } else {
            "move to trash"
        };
        let mut v = vec![keymap.hint(Layer::Confirm, Action::Yes, Some(yes))];
        v.push(keymap.hint(
            Layer::Delete,
            Action::ForGood,
            Some(if self.for_good {
                "use the trash"
            } else {
                "delete for good"
            }),
        ));
        if self.plan.stream.is_some() {
            v.push(keymap.hint(
                Layer::Delete,
                Action::Stream,
                Some(if self.streaming {
                    "do not stream"
                } else {
                    "stream out"
                }),
            ));
        }
        v.push(keymap.hint(Layer::Confirm, Action::No, None));
        v
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let warn = Style::new()
            .fg(app.theme.warning)
            .add_modifier(Modifier::BOLD);
        let dim = Style::new().fg(app.theme.dim);
        let n = plan.items.len();
        let what = if n == 1 {
            app.display_path(&plan.items[0].path)
        } else {
            format!("{n} images")
        };
        let mut lines = vec![if self.for_good {
            Line::from(Span::styled(
                format!("Delete {what} for good: this cannot be undone."),
                warn,
            ))
        } else {
            Line::from(format!(
                "Move {what} to the trash (.cowshed-trash/ in {} folder; `cowshed trash \
                 restore` puts {} back, `cowshed trash empty` frees the space).",
                if n == 1 { "its" } else { "each one's" },
                if n == 1 { "it" } else { "them" },
            ))
        }];
        lines.push(Line::default());
        for item in plan.items.iter().take(SHOWN) {
            lines.push(Line::from(format!(
                "  {}  {}",
                app.display_path(&item.path),
                human(item.allocated)
            )));
        }
        if n > SHOWN {
            lines.push(Line::from(Span::styled(
                format!("  … and {} more", n - SHOWN),
                dim,
            )));
        }
        let freed = human(plan.freed);
        lines.push(Line::from(if self.for_good {
            format!("frees {freed} (allocated sizes)")
        } else {
            format!("frees {freed} (allocated sizes) once the trash is emptied")
        }));
        lines.push(Line::default());
        if let Some(s) = &plan.stream {
            let k = s.dependents.len();
            let names: Vec<String> = s
                .dependents
                .iter()
                .take(SHOWN)
                .map(|p| app.display_path(p))
                .collect();
            let (them, are) = if k == 1 {
                (format!("its dependent {}", names.join(", ")), "is")
            } else {
                (format!("its {k} dependents {}", names.join(", ")), "are")
            };
            let onto = match &s.backing {
                Some(b) => format!("rebased onto its backing {b}"),
                None => "flattened (it has no backing)".to_string(),
            };
            if self.streaming {
                lines.push(Line::from(format!(
                    "Stream it out: first {them} {are} {onto}, the guest view unchanged; then \
                     it is deleted."
                )));
            } else {
                lines.push(Line::from(Span::styled(
                    format!(
                        "⚠ {} use{} it as backing file: deleting it alone would break {}. \
                         Stream it out instead: {} {onto} first.",
                        names.join(", "),
                        if k == 1 { "s" } else { "" },
                        if k == 1 { "it" } else { "them" },
                        if k == 1 { "it is" } else { "they are" },
                    ),
                    warn,
                )));
                if let Some(why) = &s.refused {
                    lines.push(Line::from(Span::styled(
                        format!("(streaming is not possible now: {why})"),
                        dim,
                    )));
                }
            }
            lines.push(Line::default());
        }
        let paths: Vec<&std::path::Path> = plan.items.iter().map(|i| i.path.as_path()).collect();
        // Another host's domains are that host's agent's to check.
        let local = plan.host.is_none();
        if let Some(w) = local.then(|| super::vm_warning(app, &paths)).flatten() {
            lines.extend([w, Line::default()]);
        }
        lines.push(hint_line(app, hints));
        let border = if self.for_good { warn } else { Style::new() };
        super::draw_box(frame, area, "delete?", lines, border);
    }

    /// One job per image, leaves first.
    fn jobs(&self, ctx: &super::Ctx) -> Vec<JobSpec> {
        let roots = self.plan.roots.clone();
        let trash = !self.for_good;
        let stream = self.streaming;
        self.plan
            .items
            .iter()
            .map(|item| {
                let path = item.path.clone();
                let opts = RemoveOptions {
                    roots: roots.clone(),
                    stream,
                    trash,
                    vms: ctx.vm_guard(&[&path]),
                };
                let mut touches = vec![item.key.clone()];
                touches.extend(item.listed_dependents.iter().cloned());
                let mut refresh = vec![item.path.clone()];
                let verb = if stream {
                    "stream out"
                } else if trash {
                    "trash"
                } else {
                    "delete"
                };
                if let (true, Some(s)) = (stream, &self.plan.stream) {
                    touches.extend(s.dependent_keys.iter().cloned());
                    touches.extend(s.chain_keys.iter().cloned());
                    refresh.extend(s.dependents.iter().cloned());
                }
                let work: crate::jobs::Work = match &self.plan.host {
                    Some(host) => {
                        // Paths there: its agent reads them again (finds
                        // them gone) when the job ends.
                        refresh = refresh
                            .iter()
                            .map(|p| crate::remote::client::remote_path(host, p))
                            .collect();
                        on_host(
                            host,
                            JobOp::Delete {
                                paths: vec![path],
                                trash,
                            },
                            crate::remote::client::peers(
                                ctx.forest
                                    .get(&item.key)
                                    .map(|id| &ctx.forest.nodes[id].record),
                            ),
                        )
                    }
                    None => Box::new(move |progress, cancel| {
                        engine::remove(&[path], &opts, progress, cancel)?;
                        Ok(None)
                    }),
                };
                JobSpec {
                    kind: "delete",
                    label: format!("{verb} {}", file_name(&item.path)),
                    touches,
                    refresh,
                    work,
                }
            })
            .collect()
    }
}

/// Deleting `ids`: each must be an image, no QEMU may hold it, and nothing
/// outside the list may use it as backing file (but a single image with
/// dependents may be streamed out). Only the forest is read.
pub fn plan(f: &Forest, ids: &[NodeId], roots: &[PathBuf]) -> Result<DeletePlan, String> {
    let mut ids: Vec<NodeId> = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Err("nothing to delete".into());
    }
    for &id in &ids {
        usable(f, id)?;
    }
    let host = f.nodes[ids[0]].record.host.clone();
    if ids.iter().any(|&id| f.nodes[id].record.host != host) {
        return Err("the images are on different hosts: delete those of one host at a time".into());
    }
    in_use(f, &ids, false)?;
    let listed: HashSet<NodeId> = ids.iter().copied().collect();
    let mut stream = None;
    for &id in &ids {
        let outside: Vec<NodeId> = f.nodes[id]
            .children
            .iter()
            .copied()
            .filter(|c| !listed.contains(c))
            .collect();
        if outside.is_empty() {
            continue;
        }
        if ids.len() > 1 {
            let names: Vec<String> = outside
                .iter()
                .map(|&c| file_name(&f.nodes[c].record.path))
                .collect();
            return Err(format!(
                "{} is the backing file of {}, which {} not in the list: deleting it would \
                 break {}",
                file_name(&f.nodes[id].record.path),
                names.join(", "),
                if outside.len() == 1 { "is" } else { "are" },
                if outside.len() == 1 { "it" } else { "them" },
            ));
        }
        let mut s = stream_plan(f, id, &outside);
        if host.is_some() && s.refused.is_none() {
            s.refused = Some(
                "another host's agent does not stream images out yet (it deletes only)".into(),
            );
        }
        stream = Some(s);
    }
    // Deeper images first: an overlay before its base.
    ids.sort_by_key(|&id| std::cmp::Reverse(f.chain(id).len()));
    let items: Vec<DeleteItem> = ids
        .iter()
        .map(|&id| {
            let r = &f.nodes[id].record;
            DeleteItem {
                path: r.path.clone(),
                key: r.key.clone(),
                allocated: r.sizes.allocated,
                listed_dependents: f.nodes[id]
                    .children
                    .iter()
                    .filter(|c| listed.contains(c))
                    .map(|&c| f.nodes[c].record.key.clone())
                    .collect(),
            }
        })
        .collect();
    Ok(DeletePlan {
        freed: items.iter().map(|i| i.allocated).sum(),
        items,
        stream,
        roots: match &host {
            Some(h) => roots_on(h, roots),
            None => roots.to_vec(),
        },
        host,
    })
}

fn stream_plan(f: &Forest, id: NodeId, dependents: &[NodeId]) -> StreamPlan {
    let node = &f.nodes[id];
    let backing = node
        .record
        .summary
        .as_ref()
        .and_then(|s| s.backing_filename.clone());
    let chain = f.chain(id);
    let refused = in_use(f, dependents, false)
        .err()
        .or_else(|| {
            node.flags
                .iter()
                .chain(dependents.iter().flat_map(|&d| &f.nodes[d].flags))
                .find(|fl| fl.is_broken() || matches!(fl, Flag::Skipped { .. }))
                .map(Flag::describe)
        })
        .or_else(|| {
            (backing.is_some() && node.parent.is_none())
                .then(|| "its backing file was not found".to_string())
        });
    StreamPlan {
        dependents: dependents
            .iter()
            .map(|&d| f.nodes[d].record.path.clone())
            .collect(),
        dependent_keys: dependents
            .iter()
            .map(|&d| f.nodes[d].record.key.clone())
            .collect(),
        backing,
        chain_keys: chain
            .iter()
            .skip(1)
            .map(|&c| f.nodes[c].record.key.clone())
            .collect(),
        refused,
    }
}
