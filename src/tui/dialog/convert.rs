//! Convert (`v`): a new image beside the source, with the destination
//! name, format, compression, cluster size and `-B` chosen in a dialog.

use std::path::{Path, PathBuf};

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::Frame;

use super::{
    error, hint_line, in_use, on_host, space_warning, usable, Ctx, Dialog, JobSpec, Outcome,
};
use crate::catalog::{Forest, NodeId};
use crate::engine::ops::convert::{convert, ConvertOptions};
use crate::engine::qcow2::header::CompressionType;
use crate::engine::{CreateOptions, Format};
use crate::remote::protocol::JobOp;
use crate::tui::app::{App, Status};
use crate::tui::keymap::{Action, Hint, Key, Keymap, Layer};
use crate::tui::rows::file_name;
use crate::tui::view::human;

/// The dialog's fields, in the order the field keys visit them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Destination,
    Format,
    Compression,
    ClusterSize,
    KeepBacking,
}

impl Field {
    pub const ALL: [Field; 5] = [
        Field::Destination,
        Field::Format,
        Field::Compression,
        Field::ClusterSize,
        Field::KeepBacking,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Field::Destination => "destination",
            Field::Format => "format",
            Field::Compression => "compression",
            Field::ClusterSize => "cluster size",
            Field::KeepBacking => "keep backing (-B)",
        }
    }
}

pub const CLUSTER_SIZES: [u64; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertPlan {
    pub source: PathBuf,
    pub source_key: PathBuf,
    /// The source's backing name and format, when it has one (-B keeps it).
    pub backing: Option<(String, Format)>,
    pub dest: String,
    pub format: Format,
    pub compression: Option<CompressionType>,
    pub cluster_size: u64,
    pub keep_backing: bool,
    pub field: Field,
    /// What the chain allocates: what a copy needs at most.
    pub allocated: u64,
    /// The destination's file system may be too small for that.
    pub space_warning: Option<String>,
    /// The host the image is on, when not this one: its agent converts.
    pub host: Option<String>,
}

impl ConvertPlan {
    /// Whether `field` means anything with the current choices.
    pub fn applies(&self, field: Field) -> bool {
        match field {
            Field::Compression | Field::ClusterSize => self.format == Format::Qcow2,
            Field::KeepBacking => self.format == Format::Qcow2 && self.backing.is_some(),
            Field::Destination | Field::Format => true,
        }
    }

    pub fn compression_name(&self) -> &'static str {
        match self.compression {
            None => "none",
            Some(CompressionType::Deflate) => "zlib",
            Some(CompressionType::Zstd) => "zstd",
        }
    }

    /// The next field that applies, down or up, wrapping around.
    fn move_field(&mut self, down: bool) {
        let n = Field::ALL.len();
        let mut i = Field::ALL
            .iter()
            .position(|&f| f == self.field)
            .unwrap_or(0);
        loop {
            i = if down { (i + 1) % n } else { (i + n - 1) % n };
            if self.applies(Field::ALL[i]) {
                break;
            }
        }
        self.field = Field::ALL[i];
    }

    /// The next (or previous) value of the focused field.
    fn cycle(&mut self, forward: bool) {
        let step = |i: usize, n: usize| {
            if forward {
                (i + 1) % n
            } else {
                (i + n - 1) % n
            }
        };
        match self.field {
            Field::Format => {
                let (old, new) = match self.format {
                    Format::Qcow2 => (".qcow2", Format::Raw),
                    _ => (".raw", Format::Qcow2),
                };
                self.format = new;
                // A name still ending as the default did follows the format.
                if let Some(stem) = self.dest.strip_suffix(old) {
                    self.dest = format!("{stem}.{}", new.name());
                }
            }
            Field::Compression => {
                let all = [
                    None,
                    Some(CompressionType::Deflate),
                    Some(CompressionType::Zstd),
                ];
                let i = all.iter().position(|c| *c == self.compression).unwrap_or(0);
                self.compression = all[step(i, all.len())];
            }
            Field::ClusterSize => {
                let i = CLUSTER_SIZES
                    .iter()
                    .position(|&c| c == self.cluster_size)
                    .unwrap_or(2);
                self.cluster_size = CLUSTER_SIZES[step(i, CLUSTER_SIZES.len())];
            }
            Field::KeepBacking => self.keep_backing = !self.keep_backing,
            Field::Destination => {}
        }
    }
}

pub struct ConvertDialog {
    pub plan: ConvertPlan,
    /// The marked images when `v` converts a batch (empty for one image):
    /// the destination field is then the suffix of every new name.
    pub batch: Vec<PathBuf>,
}

/// What a batch's new names get after their image's stem.
const BATCH_SUFFIX: &str = "-conv";

/// Every hinted action with all its keys (`↓/Tab field`).
pub fn hints(keymap: &Keymap) -> Vec<Hint> {
    keymap
        .footer(Layer::Convert)
        .into_iter()
        .map(|h| keymap.hint(Layer::Convert, h.action, Some(&h.label)))
        .collect()
}

impl ConvertDialog {
    pub fn open(f: &Forest, id: NodeId) -> Result<ConvertDialog, String> {
        let mut plan = plan(f, id)?;
        // The file system there is not this one's: its agent checks.
        if plan.host.is_none() {
            plan.space_warning = space_warning(&plan.source, plan.allocated);
        }
        Ok(ConvertDialog {
            plan,
            batch: Vec::new(),
        })
    }

    /// `v` with images marked: the same choices, asked once for all of
    /// them; what each image gets (or why it is skipped) is listed next,
    /// in the batch's confirm list.
    pub fn open_batch(f: &Forest, ids: &[NodeId]) -> Result<ConvertDialog, String> {
        let &first = ids.first().ok_or("no image is marked")?;
        let r = &f.nodes[first].record;
        // -B applies when one of them has a backing to keep.
        let backing = ids.iter().find_map(|&id| {
            let n = &f.nodes[id];
            let name = n.record.summary.as_ref()?.backing_filename.clone()?;
            let fmt = f.nodes[n.parent?].record.summary.as_ref()?.format;
            Some((name, fmt))
        });
        Ok(ConvertDialog {
            plan: ConvertPlan {
                source: r.path.clone(),
                source_key: r.key.clone(),
                backing,
                dest: BATCH_SUFFIX.to_string(),
                format: Format::Qcow2,
                compression: None,
                cluster_size: 64 << 10,
                keep_backing: false,
                field: Field::Destination,
                allocated: 0,
                space_warning: None,
                host: r.host.clone(),
            },
            batch: ids
                .iter()
                .map(|&id| f.nodes[id].record.key.clone())
                .collect(),
        })
    }

    pub fn on_key(&mut self, key: Key, action: Option<Action>, ctx: &Ctx) -> Outcome {
        let plan = &mut self.plan;
        // The destination is a text field: characters are typed there.
        if plan.field == Field::Destination {
            if let Some(c) = key.typed() {
                plan.dest.push(c);
                return Outcome::Stay;
            }
        }
        match action {
            Some(Action::Cancel) => {
                Outcome::Close(Status::cancelled("convert cancelled: nothing was written"))
            }
            Some(Action::NextField) => {
                plan.move_field(true);
                Outcome::Stay
            }
            Some(Action::PrevField) => {
                plan.move_field(false);
                Outcome::Stay
            }
            Some(Action::Change) => {
                plan.cycle(true);
                Outcome::Stay
            }
            Some(Action::ChangeBack) => {
                plan.cycle(false);
                Outcome::Stay
            }
            Some(Action::Delete) if plan.field == Field::Destination => {
                plan.dest.pop();
                Outcome::Stay
            }
            Some(Action::Submit) if !self.batch.is_empty() => {
                let suffix = plan.dest.trim();
                if suffix.is_empty() || suffix.contains('/') {
                    return Outcome::Say(error(
                        "give a suffix for the new names (web-1.qcow2 → web-1<suffix>.qcow2): \
                         the copies go next to their images",
                    ));
                }
                let ids: Vec<NodeId> = self
                    .batch
                    .iter()
                    .filter_map(|k| ctx.forest.get(k))
                    .collect();
                Outcome::Open(Dialog::Batch(super::batch::BatchDialog::convert(
                    ctx.forest, &ids, plan,
                )))
            }
            Some(Action::Submit) => {
                let dest = plan.dest.trim();
                if dest.is_empty() || dest.contains('/') {
                    return Outcome::Say(error(
                        "give a file name: the copy goes next to the image",
                    ));
                }
                // A new file only: an existing one (an image a VM may use,
                // a base with overlays) is never replaced from here. One
                // stat; the job refuses too if the name appears meanwhile.
                let dir = plan.source.parent().unwrap_or(Path::new(""));
                let exists = match &plan.host {
                    // A path there: the host's forest answers, and its
                    // agent refuses a file the forest does not show.
                    Some(host) => {
                        let there = dir.join(dest);
                        ctx.forest.nodes.iter().any(|n| {
                            n.record.host.as_deref() == Some(host.as_str())
                                && n.record.path == there
                        })
                    }
                    None => dir.join(dest).symlink_metadata().is_ok(),
                };
                if exists {
                    return Outcome::Say(error(format!(
                        "{dest} exists: choose another name (an existing file is never replaced)"
                    )));
                }
                Outcome::Submit(job(plan))
            }
            _ => Outcome::Stay,
        }
    }

    pub fn draw(&self, app: &App, frame: &mut Frame, area: Rect, hints: &[Hint]) {
        let plan = &self.plan;
        let source = app.display_path(&plan.source);
        let dim = Style::new().fg(app.theme.dim);
        let focus = Style::new()
            .fg(app.theme.accent)
            .add_modifier(Modifier::BOLD);
        let batch = !self.batch.is_empty();
        let first = if batch {
            format!(
                "Convert {} marked images, each into a new image beside it named \
                 <its name>{}.{}",
                self.batch.len(),
                plan.dest.trim(),
                plan.format.name()
            )
        } else {
            format!("Convert {source} into a new image beside it.")
        };
        let mut lines = vec![Line::from(first), Line::default()];
        for field in Field::ALL {
            let value = match field {
                Field::Destination => format!("{}▏", plan.dest),
                Field::Format => format!(
                    "{} / {}",
                    if plan.format == Format::Qcow2 {
                        "[qcow2]"
                    } else {
                        "qcow2"
                    },
                    if plan.format == Format::Raw {
                        "[raw]"
                    } else {
                        "raw"
                    }
                ),
                Field::Compression => plan.compression_name().to_string(),
                Field::ClusterSize => human(plan.cluster_size),
                Field::KeepBacking => match &plan.backing {
                    Some(_) if batch && plan.keep_backing => {
                        "on: each keeps its backing, only its own data".to_string()
                    }
                    Some(_) if batch => "off: each chain, flattened".to_string(),
                    Some((name, _)) if plan.keep_backing => {
                        format!("on: backed by {name}, only {source}'s own data")
                    }
                    Some(_) => "off: the whole chain, flattened".to_string(),
                    None => "— (no backing file)".to_string(),
                },
            };
            let focused = field == plan.field;
            let style = if focused {
                focus
            } else if plan.applies(field) {
                Style::new()
            } else {
                dim
            };
            let pointer = if focused { "▸ " } else { "  " };
            lines.push(Line::from(Span::styled(
                format!(
                    "{pointer}{:<18} {}",
                    if batch && field == Field::Destination {
                        "name suffix"
                    } else {
                        field.label()
                    },
                    if plan.applies(field) {
                        value
                    } else {
                        "—".into()
                    }
                ),
                style,
            )));
        }
        lines.push(Line::default());
        if let Some(w) = &plan.space_warning {
            lines.push(Line::from(Span::styled(
                format!("⚠ {w}"),
                Style::new().fg(app.theme.warning),
            )));
        }
        lines.push(hint_line(app, hints));
        super::draw_box(frame, area, "convert", lines, Style::new());
    }
}

/// The convert dialog for `source`, with defaults: qcow2, no compression,
/// 64 KiB clusters, `<stem>-conv.qcow2` beside it.
pub fn plan(f: &Forest, source: NodeId) -> Result<ConvertPlan, String> {
    usable(f, source)?;
    let node = &f.nodes[source];
    let Some(summary) = &node.record.summary else {
        return Err("its header could not be read".into());
    };
    if !matches!(summary.format, Format::Qcow2 | Format::Raw) {
        return Err(format!(
            "{} images are not supported",
            summary.format.name()
        ));
    }
    if let Some(flag) = node.flags.iter().find(|fl| fl.is_broken()) {
        return Err(flag.describe());
    }
    let chain = f.chain(source);
    in_use(f, &chain, true)?;
    let allocated = chain
        .iter()
        .map(|&n| f.nodes[n].record.sizes.allocated)
        .sum();
    let backing = node.parent.and_then(|p| {
        let name = summary.backing_filename.clone()?;
        let fmt = f.nodes[p].record.summary.as_ref()?.format;
        Some((name, fmt))
    });
    let stem = node
        .record
        .path
        .file_stem()
        .map_or_else(|| "image".into(), |s| s.to_string_lossy().into_owned());
    Ok(ConvertPlan {
        source: node.record.path.clone(),
        source_key: node.record.key.clone(),
        backing,
        dest: format!("{stem}-conv.qcow2"),
        format: Format::Qcow2,
        compression: None,
        cluster_size: 64 << 10,
        keep_backing: false,
        field: Field::Destination,
        allocated,
        space_warning: None,
        host: node.record.host.clone(),
    })
}

pub(crate) fn job(plan: &ConvertPlan) -> JobSpec {
    let dir = plan.source.parent().unwrap_or(Path::new("")).to_path_buf();
    let dest = dir.join(plan.dest.trim());
    let (backing, backing_format) = match (&plan.backing, plan.keep_backing) {
        (Some((name, fmt)), true) if plan.format == Format::Qcow2 => {
            (Some(name.clone()), Some(*fmt))
        }
        _ => (None, None),
    };
    let opts = ConvertOptions {
        target: CreateOptions {
            format: plan.format,
            cluster_size: plan.cluster_size,
            compression: plan.compression.unwrap_or(CompressionType::Deflate),
            backing,
            backing_format,
            ..CreateOptions::default()
        },
        compress: plan.compression.is_some() && plan.format == Format::Qcow2,
        // The dialog offers new names only; a name taken meanwhile is
        // refused, never replaced.
        replace: None,
        ..ConvertOptions::default()
    };
    let source = plan.source.clone();
    let label = format!("convert {} → {}", file_name(&plan.source), file_name(&dest));
    let work: crate::jobs::Work = match &plan.host {
        Some(host) => on_host(
            host,
            JobOp::Convert {
                src: source,
                dst: dest,
                format: plan.format.name().to_string(),
                compress: opts.compress,
                cluster_size: Some(opts.target.cluster_size),
                compression_type: Some(opts.target.compression.name().to_string()),
                backing: opts.target.backing.clone(),
                backing_format: opts.target.backing_format.map(|f| f.name().to_string()),
            },
            // It only reads its source and makes a new file.
            Vec::new(),
        ),
        None => Box::new(move |progress, cancel| {
            convert(&source, &dest, &opts, progress, cancel)?;
            Ok(Some(dest))
        }),
    };
    JobSpec {
        kind: "convert",
        label,
        touches: vec![plan.source_key.clone()],
        refresh: Vec::new(),
        work,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(backing: bool) -> ConvertPlan {
        ConvertPlan {
            source: "/vm/a.qcow2".into(),
            source_key: "/vm/a.qcow2".into(),
            backing: backing.then(|| ("base.qcow2".to_string(), Format::Qcow2)),
            dest: "a-conv.qcow2".into(),
            format: Format::Qcow2,
            compression: None,
            cluster_size: 64 << 10,
            keep_backing: false,
            field: Field::Destination,
            allocated: 0,
            space_warning: None,
            host: None,
        }
    }

    #[test]
    fn fields_that_do_not_apply_are_skipped() {
        let mut p = plan(false);
        p.move_field(true);
        assert_eq!(p.field, Field::Format);
        // To raw: the qcow2-only fields go, and the name follows.
        p.cycle(true);
        assert_eq!((p.format, p.dest.as_str()), (Format::Raw, "a-conv.raw"));
        p.move_field(true);
        assert_eq!(p.field, Field::Destination);
        p.move_field(false);
        assert_eq!(p.field, Field::Format);
        // Back to qcow2 without a backing: -B is skipped.
        p.cycle(true);
        p.move_field(true);
        p.move_field(true);
        p.move_field(true);
        assert_eq!(p.field, Field::Destination);
        let mut p = plan(true);
        p.field = Field::ClusterSize;
        p.move_field(true);
        assert_eq!(p.field, Field::KeepBacking);
    }
}
