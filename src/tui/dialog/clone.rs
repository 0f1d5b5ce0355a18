//! Clone: a new qcow2 overlay on the selected image, beside it. `c` makes
//! `<stem>-<n>.qcow2` at once; `C` opens this dialog to ask for the name,
//! and its count field (`N` opens the dialog there) makes N clones at once,
//! `<prefix>01` … `<prefix>NN`, numbered on past names that exist. An
//! image on another host is cloned there by its agent; the names free
//! there are those its forest does not show (its agent never overwrites).

use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{error, hint_line, in_use, on_host, usable, Ctx, JobSpec, Outcome};
use crate::catalog::{Forest, NodeId};
use crate::engine::{self, CreateOptions, Format};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;

/// More clones than this at once is a typing slip, not a fleet.
pub const MAX_CLONES: usize = 999;

pub struct CloneDialog {
    pub source: NodeId,
    pub source_path: PathBuf,
    /// The name, or with a count above one the prefix of the names.
    pub input: String,
    /// How many clones; empty means one.
    pub count: String,
    /// The count field has the keys.
    pub on_count: bool,
}

impl CloneDialog {
    /// `C` on `id`: the dialog, or why there is nothing to ask.
    pub fn open(f: &Forest, id: NodeId) -> Result<CloneDialog, String> {
        check(f, id)?;
        Ok(CloneDialog {
            source: id,
            source_path: f.nodes[id].record.path.clone(),
            input: String::new(),
            count: String::new(),
            on_count: false,
        })
    }

    /// `N` on `id`: the dialog with the count field focused and the prefix
    /// `<stem>-` proposed, so `N 1 0 Enter` makes ten clones.
    pub fn open_many(f: &Forest, id: NodeId) -> Result<CloneDialog, String> {
        let mut d = CloneDialog::open(f, id)?;
        d.input = format!("{}-", stem(&d.source_path));
        d.on_count = true;
        Ok(d)
    }

    /// The count typed, 1 when empty.
    pub fn how_many(&self) -> Result<usize, String> {
        if self.count.is_empty() {
            return Ok(1);
        }
        match self.count.parse::<usize>() {
            Ok(n @ 1..=MAX_CLONES) => Ok(n),
            _ => Err(format!(
                "the count is a number from 1 to {MAX_CLONES}, not {}",
                self.count
            )),
        }
    }

    pub fn hints(&self, keymap: &Keymap) -> Vec<Hint> {
        vec![
            keymap.hint(
                Layer::Input,
                Action::NextField,
                Some(if self.on_count { "name" } else { "count" }),
            ),
            keymap.hint(Layer::Input, Action::Submit, Some("create")),
            keymap.hint(Layer::Input, Action::Cancel, None),
        ]
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        if let Some(c) = key.typed() {
            if !self.on_count {
                self.input.push(c);
            } else if c.is_ascii_digit() && self.count.len() < 4 {
                self.count.push(c);
            }
            return Outcome::Stay;
        }
        let field = if self.on_count {
            &mut self.count
        } else {
            &mut self.input
        };
        match action {
            Some(Action::Cancel) => {
                Outcome::Close(Status::cancelled("clone cancelled: nothing was made"))
            }
            Some(Action::NextField) => {
                self.on_count = !self.on_count;
                Outcome::Stay
            }
            Some(Action::Delete) => {
                field.pop();
                Outcome::Stay
            }
            Some(Action::ClearInput) => {
                field.clear();
                Outcome::Stay
            }
            Some(Action::Submit) => {
                let n = match self.how_many() {
                    Ok(n) => n,
                    Err(why) => return Outcome::Say(error(why)),
                };
                if n > 1 {
                    return many(ctx, self.source, self.input.trim(), n);
                }
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
        let dim = Style::new().fg(app.theme.dim);
        let cursor = |on: bool| if on { "▏" } else { "" };
        let n = self.how_many().unwrap_or(0);
        let (label, note) = if n > 1 {
            let last = numbered(self.input.trim(), n, n);
            (
                "prefix: ",
                format!(
                    "{n} clones, {} … {last} (numbered on past names that exist), \
                     next to it, backing recorded with its format",
                    numbered(self.input.trim(), 1, n)
                ),
            )
        } else {
            (
                "name:   ",
                "created next to it, backing recorded with its format".to_string(),
            )
        };
        let count = if self.count.is_empty() && !self.on_count {
            Span::styled("1", dim)
        } else {
            Span::raw(format!("{}{}", self.count, cursor(self.on_count)))
        };
        let lines = vec![
            Line::from(vec![
                Span::raw(label),
                Span::raw(format!("{}{}", self.input, cursor(!self.on_count))),
            ]),
            Line::from(vec![Span::raw("count:  "), count]),
            Line::from(Span::styled(note, dim)),
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
    let shown = match &record.host {
        Some(_) => record.location(),
        None => ctx.display_path(&record.path),
    };
    let format = check(f, id).map_err(|why| format!("cannot clone {shown}: {why}"))?;
    if name.as_deref().is_some_and(|n| n.contains('/')) {
        return Err(
            "give a file name, not a path: the clone goes next to its backing image".into(),
        );
    }
    let source = record.path.clone();
    if let Some(host) = &record.host {
        let dir = source.parent().unwrap_or(Path::new("/"));
        let new = match name {
            Some(n) => dir.join(n),
            None => (1..100_000u32)
                .map(|n| dir.join(format!("{}-{n}.qcow2", stem(&source))))
                .find(|p| !on_host_exists(f, host, p))
                .ok_or_else(|| format!("cannot clone {shown}: no free name"))?,
        };
        return Ok(JobSpec {
            kind: "clone",
            label: format!("clone {shown}"),
            touches: vec![record.key.clone()],
            // Its agent reads the new image at once when the job ends.
            refresh: vec![crate::remote::client::remote_path(host, &new)],
            // It only reads its base and makes a new file.
            work: on_host(host, JobOp::Clone { base: source, new }, Vec::new()),
        });
    }
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

fn stem(p: &Path) -> String {
    p.file_stem()
        .map_or_else(|| "image".to_string(), |s| s.to_string_lossy().into_owned())
}

/// The `i`th of `n` names with `prefix`: `web-07.qcow2`, zero-padded to
/// the width of `n` (two digits at least, so they sort).
pub fn numbered(prefix: &str, i: usize, n: usize) -> String {
    let width = n.to_string().len().max(2);
    format!("{prefix}{i:0width$}.qcow2")
}

/// The names of `n` new clones beside `dir`: the first `n` numbers whose
/// name is free (`exists`: one stat each, on the key that asks, or a look
/// at another host's forest; `engine::create` refuses to overwrite anyway
/// if a name is taken meanwhile), and the names passed over because they
/// exist.
pub fn free_names(
    dir: &Path,
    prefix: &str,
    n: usize,
    exists: impl Fn(&Path) -> bool,
) -> (Vec<String>, Vec<String>) {
    let (mut free, mut taken) = (Vec::new(), Vec::new());
    let mut i = 1;
    while free.len() < n && i <= n + MAX_CLONES {
        let name = numbered(prefix, i, n);
        if exists(&dir.join(&name)) {
            taken.push(name);
        } else {
            free.push(name);
        }
        i += 1;
    }
    (free, taken)
}

/// `n` clones of `id` named with `prefix` (`<stem>-` when empty), one job
/// each, or why not.
fn many(ctx: &Ctx, id: NodeId, prefix: &str, n: usize) -> Outcome {
    let f = ctx.forest;
    let path = &f.nodes[id].record.path;
    let prefix = if prefix.is_empty() {
        format!("{}-", stem(path))
    } else {
        prefix.to_string()
    };
    if prefix.contains('/') {
        return Outcome::Say(error(
            "give a name prefix, not a path: the clones go next to their backing image",
        ));
    }
    let dir = path.parent().unwrap_or(Path::new(""));
    let (names, taken) = match &f.nodes[id].record.host {
        Some(host) => free_names(dir, &prefix, n, |p| on_host_exists(f, host, p)),
        None => free_names(dir, &prefix, n, |p| p.symlink_metadata().is_ok()),
    };
    if names.len() < n {
        return Outcome::Say(error(format!(
            "not {n} free names with prefix {prefix}: choose another prefix"
        )));
    }
    let mut jobs = Vec::with_capacity(n);
    for name in &names {
        match job(f, id, Some(name.clone()), ctx) {
            Ok(spec) => jobs.push(spec),
            Err(why) => return Outcome::Say(error(why)),
        }
    }
    let mut text = format!(
        "{n} clones of {} started: {} … {}",
        file_name(path),
        names[0],
        names[n - 1]
    );
    if !taken.is_empty() {
        text.push_str(&format!(
            " ({} exist{} and {} kept)",
            taken.join(", "),
            if taken.len() == 1 { "s" } else { "" },
            if taken.len() == 1 { "is" } else { "are" }
        ));
    }
    Outcome::SubmitAll {
        jobs,
        unmark: Vec::new(),
        say: Some(Status::info(text)),
    }
}

/// Whether `host`'s forest shows a file at `path` (a path there).
fn on_host_exists(f: &Forest, host: &str, path: &Path) -> bool {
    f.nodes
        .iter()
        .any(|n| n.record.host.as_deref() == Some(host) && n.record.path == path)
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
