//! The doctor (`!`): the selected image's chain problems, one line per
//! fix (a problem without a fix is listed too, to be read). Enter applies
//! the selected fix: a header-only one as a job (`rebase -u`, planned on
//! the job's thread, where the disk may be read), flatten and commit by
//! opening their own dialogs. For an image on another host the problems
//! come from that host's forest, and the fixes run there by its agent.

use std::path::PathBuf;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{hint_line, in_use, on_host, Dialog, JobSpec, Outcome};
use crate::catalog::doctor::{diagnose, plan_header_fix, DoctorOptions, Fix, Problem};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::rebase::rebase;
use crate::remote::protocol::{HeaderFixKind, JobOp};
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Keymap, Layer};
use crate::tui::rows::file_name;

/// One line of the list: a problem and one of its fixes, if it has any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub problem: Problem,
    pub fix: Option<Fix>,
}

pub struct DoctorDialog {
    /// The image's key: the forest may be rebuilt while the dialog is
    /// open, and node ids with it.
    pub key: PathBuf,
    pub path: PathBuf,
    pub entries: Vec<Entry>,
    pub selected: usize,
    opts: DoctorOptions,
    /// The host whose agent applies the fixes (`None`: here).
    host: Option<String>,
    /// Other hosts that see the file, asked first.
    peers: crate::remote::client::Peers,
}

impl DoctorDialog {
    /// The doctor on image `id`: `None` when it has no problem (said on
    /// the status line, not shown as an empty box), `Err` when it is no
    /// image.
    pub fn open(
        f: &Forest,
        id: NodeId,
        opts: DoctorOptions,
    ) -> Result<Option<DoctorDialog>, String> {
        super::usable(f, id)?;
        let r = &f.nodes[id].record;
        let entries = entries(&diagnose(f, id, &opts));
        if entries.is_empty() {
            return Ok(None);
        }
        // The first line with a fix is where Enter helps first.
        let selected = entries.iter().position(|e| e.fix.is_some()).unwrap_or(0);
        Ok(Some(DoctorDialog {
            key: r.key.clone(),
            path: r.path.clone(),
            entries,
            selected,
            opts,
            host: r.host.clone(),
            peers: crate::remote::client::peers([r]),
        }))
    }

    pub fn on_key(&mut self, action: Option<Action>, ctx: &super::Ctx) -> Outcome {
        match action {
            Some(Action::Up) => {
                self.selected = self.selected.saturating_sub(1);
                Outcome::Stay
            }
            Some(Action::Down) => {
                self.selected = (self.selected + 1).min(self.entries.len().saturating_sub(1));
                Outcome::Stay
            }
            Some(Action::Submit) => self.apply(ctx.forest),
            Some(Action::Close) => {
                Outcome::Close(Status::cancelled("doctor closed: nothing was changed"))
            }
            _ => Outcome::Stay,
        }
    }

    fn apply(&self, f: &Forest) -> Outcome {
        let Some(entry) = self.entries.get(self.selected) else {
            return Outcome::Stay;
        };
        let Some(fix) = entry.fix else {
            return Outcome::Say(super::error(
                "this problem has no fix here: repair or remove the image by hand",
            ));
        };
        let Some(id) = f.get(&self.key) else {
            return Outcome::Say(super::error(format!("{} is gone", file_name(&self.path))));
        };
        // The list may be older than the forest: the fix must still be
        // wanted.
        if !entries(&diagnose(f, id, &self.opts)).contains(entry) {
            return Outcome::Say(super::error(
                "that problem is gone (the image changed): close and open the doctor again",
            ));
        }
        match fix {
            Fix::Flatten => match super::flatten::FlattenDialog::open(f, id) {
                Ok(d) => Outcome::Open(Dialog::Flatten(d)),
                Err(why) => Outcome::Say(super::error(format!("cannot flatten: {why}"))),
            },
            Fix::Commit => match super::commit::CommitDialog::open(f, id) {
                Ok(d) => Outcome::Open(Dialog::Commit(d)),
                Err(why) => Outcome::Say(super::error(format!("cannot commit: {why}"))),
            },
            Fix::RecordFormat | Fix::MakeRelative => match in_use(f, &[id], false) {
                Err(why) => Outcome::Say(super::error(why)),
                Ok(()) => Outcome::Submit(header_job(
                    &self.path,
                    &self.key,
                    fix,
                    self.host.as_deref().map(|h| (h, self.peers.clone())),
                )),
            },
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        let mut h = vec![keymap.hint(Layer::Doctor, Action::Up, None)];
        if self
            .entries
            .get(self.selected)
            .is_some_and(|e| e.fix.is_some())
        {
            h.push(keymap.hint(Layer::Doctor, Action::Submit, None));
        }
        h.push(keymap.hint(Layer::Doctor, Action::Close, None));
        h
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let t = &app.theme;
        let mut problems: Vec<&Problem> = self.entries.iter().map(|e| &e.problem).collect();
        problems.dedup();
        let mut lines = vec![
            Line::from(format!(
                "{}: {} problem{} (a chain may be {} backing files deep)",
                app.display_path(&self.path),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                self.opts.max_depth
            )),
            Line::default(),
        ];
        for (i, e) in self.entries.iter().enumerate() {
            let selected = i == self.selected;
            let (glyph, colour) = if e.fix.is_some() {
                ("!", t.warning)
            } else {
                ("✗", t.broken)
            };
            let fix = match e.fix {
                Some(f) if f.is_header_only() => format!("fix: {} (header only)", f.describe()),
                Some(f) => format!("fix: {} (opens its dialog)", f.describe()),
                None => "no fix here".to_string(),
            };
            let mut style = Style::new();
            if selected {
                style = style.bg(t.selected).add_modifier(Modifier::BOLD);
            }
            lines.push(
                Line::from(vec![
                    Span::raw(if selected { "› " } else { "  " }),
                    Span::styled(format!("{glyph} "), Style::new().fg(colour)),
                    Span::raw(e.problem.describe()),
                ])
                .style(style),
            );
            lines.push(Line::from(Span::styled(
                format!("    → {fix}"),
                Style::new().fg(t.dim),
            )));
        }
        lines.push(Line::default());
        lines.push(hint_line(app, hints));
        super::draw_box(frame, area, "doctor", lines, Style::new());
    }
}

/// A line per fix of each problem; a problem without one gets a line.
fn entries(problems: &[Problem]) -> Vec<Entry> {
    problems
        .iter()
        .flat_map(|p| {
            let fixes = p.fixes();
            if fixes.is_empty() {
                vec![Entry {
                    problem: p.clone(),
                    fix: None,
                }]
            } else {
                fixes
                    .into_iter()
                    .map(|f| Entry {
                        problem: p.clone(),
                        fix: Some(f),
                    })
                    .collect()
            }
        })
        .collect()
}

/// The header-only fix as a job: planned against the disk on the job's
/// thread, then `rebase -u` (QEMU's locks, metadata checked first).
fn header_job(
    path: &std::path::Path,
    key: &std::path::Path,
    fix: Fix,
    host: Option<(&str, crate::remote::client::Peers)>,
) -> JobSpec {
    let image = path.to_path_buf();
    if let Some((host, peers)) = host {
        let fix_kind = match fix {
            Fix::MakeRelative => HeaderFixKind::MakeBackingNameRelative,
            // The caller passes header-only fixes: this is RecordFormat.
            _ => HeaderFixKind::RecordBackingFormat,
        };
        return JobSpec {
            kind: "doctor",
            label: format!("{} of {}", fix.describe(), file_name(path)),
            touches: vec![key.to_path_buf()],
            // Its agent reads it again when the job ends.
            refresh: vec![crate::remote::client::remote_path(host, path)],
            work: on_host(
                host,
                JobOp::HeaderFix {
                    image,
                    fix: fix_kind,
                },
                peers,
            ),
        };
    }
    JobSpec {
        kind: "doctor",
        label: format!("{} of {}", fix.describe(), file_name(path)),
        touches: vec![key.to_path_buf()],
        refresh: vec![path.to_path_buf()],
        work: Box::new(move |progress, cancel| {
            let plan = plan_header_fix(&image, &[fix])
                .map_err(|why| crate::engine::Error::invalid(&image, why))?;
            rebase(&image, &plan.rebase_options(), progress, cancel)?;
            Ok(None)
        }),
    }
}
