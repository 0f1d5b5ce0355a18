//! Clone: a new qcow2 overlay on the selected image, beside it. `c` makes
//! `<stem>-<n>.qcow2` at once; `C` opens this dialog to ask for the name.

use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{error, hint_line, in_use, usable, Ctx, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::{self, CreateOptions, Format};
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key};
use crate::tui::rows::file_name;

pub struct CloneDialog {
    pub source: NodeId,
    pub source_path: PathBuf,
    pub input: String,
}

impl CloneDialog {
    /// `C` on `id`: the dialog, or why there is nothing to ask.
    pub fn open(f: &Forest, id: NodeId) -> Result<CloneDialog, String> {
        check(f, id)?;
        Ok(CloneDialog {
            source: id,
            source_path: f.nodes[id].record.path.clone(),
            input: String::new(),
        })
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        if let Some(c) = key.typed() {
            self.input.push(c);
            return Outcome::Stay;
        }
        match action {
            Some(Action::Cancel) => {
                Outcome::Close(Status::cancelled("clone cancelled: nothing was made"))
            }
            Some(Action::Delete) => {
                self.input.pop();
                Outcome::Stay
            }
            Some(Action::ClearInput) => {
                self.input.clear();
                Outcome::Stay
            }
            Some(Action::Submit) => {
                let name = self.input.trim();
                if name.is_empty() {
                    // Issue 11: an empty name used to close the dialog
                    // without a word.
                    return Outcome::Say(error(
                        "type a name for the new image (it is made beside its backing image)",
                    ));
                }
                match job(ctx.forest, self.source, Some(name.to_string()), ctx) {
                    Ok(spec) => Outcome::Submit(spec),
                    Err(why) => Outcome::Say(error(why)),
                }
            }
            _ => Outcome::Stay,
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let name = app.display_path(&self.source_path);
        let lines = vec![
            Line::from(vec![
                Span::raw("name: "),
                Span::raw(format!("{}▏", self.input)),
            ]),
            Line::from(Span::styled(
                "created next to it, backing recorded with its format",
                Style::new().fg(app.theme.dim),
            )),
            hint_line(app, hints),
        ];
        super::draw_box(
            frame,
            area,
            &format!("clone {name} as"),
            lines,
            Style::new(),
        );
    }
}

/// Why `id` cannot be cloned now, from what the catalog knows.
fn check(f: &Forest, id: NodeId) -> Result<Format, String> {
    usable(f, id)?;
    let record = &f.nodes[id].record;
    let Some(format) = record.summary.as_ref().map(|s| s.format) else {
        return Err("its header could not be read".into());
    };
    if !matches!(format, Format::Qcow2 | Format::Raw) {
        return Err(format!("{} images cannot be cloned", format.name()));
    }
    // An overlay on a disk a VM writes would read it changing.
    in_use(f, &[id], true)?;
    Ok(format)
}

/// The job that creates an overlay of `id` next to it: `<stem>-<n>.qcow2`
/// with the first free n, or `name`. The backing name is the file name
/// alone (same directory, so it stays valid when the directory moves) and
/// its format is recorded.
pub fn job(f: &Forest, id: NodeId, name: Option<String>, ctx: &Ctx) -> Result<JobSpec, String> {
    let record = &f.nodes[id].record;
    let shown = ctx.display_path(&record.path);
    let format = check(f, id).map_err(|why| format!("cannot clone {shown}: {why}"))?;
    if name.as_deref().is_some_and(|n| n.contains('/')) {
        return Err(
            "give a file name, not a path: the clone goes next to its backing image".into(),
        );
    }
    let source = record.path.clone();
    let backing = file_name(&source);
    let work = Box::new(move |_: &engine::Progress, cancel: &engine::Cancel| {
        cancel.check()?;
        let dir = source.parent().unwrap_or(Path::new(""));
        let target = match name {
            Some(n) => dir.join(n),
            None => first_free_clone_name(&source)?,
        };
        let opts = CreateOptions {
            format: Format::Qcow2,
            backing: Some(backing),
            backing_format: Some(format),
            ..CreateOptions::default()
        };
        engine::create(&target, &opts)?;
        Ok(Some(target))
    });
    Ok(JobSpec {
        kind: "clone",
        label: format!("clone {shown}"),
        touches: vec![record.key.clone()],
        refresh: Vec::new(),
        work,
    })
}

/// `<stem>-<n>.qcow2` beside `source` with the first n whose name is free.
/// Runs in the job (it stats files); `engine::create` refuses to overwrite
/// anyway if another process takes the name in between.
fn first_free_clone_name(source: &Path) -> engine::Result<PathBuf> {
    let dir = source.parent().unwrap_or(Path::new(""));
    let stem = source
        .file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned());
    for n in 1..100_000u32 {
        let candidate = dir.join(format!("{stem}-{n}.qcow2"));
        match candidate.symlink_metadata() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(candidate),
            Err(e) => return Err(engine::Error::io(candidate, e)),
            Ok(_) => {}
        }
    }
    Err(engine::Error::invalid(
        source,
        "no free clone name: 100000 clones exist already",
    ))
}
