//! The tree pane: one row per image, overlays under their base. Columns
//! are laid out in display cells; on a narrow terminal the name is
//! shortened and the growth and virtual columns give way, but the IN USE
//! column never goes: an image a VM holds must never look free.

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::{fit, human, percent};
use crate::catalog::{Flag, Node};
use crate::engine::LockState;
use crate::jobs::JobState;
use crate::tui::app::{App, Growth, JobView, Row};

const FMT_W: usize = 6;
const SIZE_W: usize = 8;
const PCT_W: usize = 4;
/// Sparkline and rate; the rate alone when narrow.
const GROWTH_W: usize = 19;
const RATE_W: usize = 11;
/// IN USE at least: `write qemu…`, `job: commit`.
const IN_USE_MIN: usize = 12;
/// Names are shortened to this before columns give way.
const NAME_MIN: usize = 22;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
const SPARK_W: usize = 6;
/// The VM column (`web-1 shut off`), shown while a domain uses an image.
const VM_W: usize = 18;

/// Cells the VM column takes: none while no domain uses a scanned image.
fn vm_width(app: &App) -> usize {
    let used = app.forest.nodes.iter().any(|n| {
        !n.record.vms.is_empty()
            || (n.record.host.is_none() && app.vms.by_file.contains_key(&n.record.dev_ino))
    });
    if used {
        2 + VM_W
    } else {
        0
    }
}

/// The VM column: the domain using the image and its state, `+N` for more.
fn vm_cell(app: &App, node: &Node) -> String {
    // A remote image's device and inode are another host's: its domains
    // came with it from there (as did those of the other hosts that see a
    // file of this machine's).
    let users: Vec<(&str, &str)> = app
        .inventory
        .users_of(node.record.dev_ino)
        .filter(|_| node.record.host.is_none())
        .map(|d| (d.name.as_str(), d.state.as_str()))
        .chain(
            node.record
                .vms
                .iter()
                .map(|v| (v.name.as_str(), v.state.as_str())),
        )
        .collect();
    let Some((name, state)) = users.first() else {
        return String::new();
    };
    let more = users.len() - 1;
    let text = format!("{name} {state}");
    if more > 0 {
        format!("{text} +{more}")
    } else {
        text
    }
}

/// Widths of the tree's columns for a terminal width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Columns {
    pub name: usize,
    /// The VIRTUAL column is shown.
    pub virtual_size: bool,
    /// Cells of the GROWTH column: sparkline and rate, the rate, or none.
    pub growth: usize,
    pub in_use: usize,
}

/// Lay the columns out in `width` cells.
pub fn columns(width: u16) -> Columns {
    let width = usize::from(width);
    // cursor, then " FMT", " ON DISK", " %".
    let fixed = 1 + (1 + FMT_W) + (1 + SIZE_W) + (1 + PCT_W);
    for (virtual_size, growth) in [
        (true, GROWTH_W),
        (true, RATE_W),
        (false, RATE_W),
        (false, 0),
    ] {
        let used = fixed
            + if virtual_size { 1 + SIZE_W } else { 0 }
            + if growth > 0 { 2 + growth } else { 0 }
            + 2;
        let rest = width.saturating_sub(used + IN_USE_MIN);
        if rest >= NAME_MIN || growth == 0 {
            // The name gets about two thirds of what is left over.
            let name = (NAME_MIN + rest.saturating_sub(NAME_MIN) * 2 / 3).min(rest.max(8));
            return Columns {
                name,
                virtual_size,
                growth,
                in_use: width.saturating_sub(used + name).max(IN_USE_MIN),
            };
        }
    }
    // The last layout above always fits; this keeps the function total.
    Columns {
        name: width / 3,
        virtual_size: false,
        growth: 0,
        in_use: IN_USE_MIN,
    }
}

fn right(s: &str, w: usize) -> String {
    let pad = w.saturating_sub(unicode_width::UnicodeWidthStr::width(s));
    format!("{}{s}", " ".repeat(pad))
}

pub fn draw(app: &App, frame: &mut Frame, head: Rect, body: Rect) {
    let vm_w = vm_width(app);
    let c = columns(head.width.saturating_sub(vm_w as u16));
    let dim = Style::new().fg(app.theme.dim);
    let mut title = format!(" {} {}", fit("IMAGE", c.name), fit("FMT", FMT_W));
    if c.virtual_size {
        title.push_str(&format!(" {}", right("VIRTUAL", SIZE_W)));
    }
    title.push_str(&format!(
        " {} {}",
        right("ON DISK", SIZE_W),
        right("%", PCT_W)
    ));
    if vm_w > 0 {
        title.push_str(&format!("  {}", fit("VM", VM_W)));
    }
    if c.growth > 0 {
        title.push_str(&format!("  {}", fit("GROWTH", c.growth)));
    }
    title.push_str("  IN USE");
    frame.render_widget(
        Paragraph::new(Line::from(Span::styled(
            title,
            dim.add_modifier(Modifier::BOLD),
        ))),
        head,
    );
    if app.rows.is_empty() {
        let filter = app.effective_filter();
        let text = if app.scanning {
            " scanning…".to_string()
        } else if !filter.is_empty() {
            format!(" no image matches '{filter}'")
        } else {
            " no images found under the roots".to_string()
        };
        frame.render_widget(Paragraph::new(Span::styled(text, dim)), body);
        return;
    }
    let height = usize::from(body.height);
    let lines: Vec<Line> = app
        .rows
        .iter()
        .enumerate()
        .skip(app.offset)
        .take(height)
        .map(|(i, row)| row_line(app, row, i == app.selected, c))
        .collect();
    frame.render_widget(Paragraph::new(lines), body);
}

fn row_line(app: &App, row: &Row, selected: bool, c: Columns) -> Line<'static> {
    let t = &app.theme;
    let node: &Node = &app.forest.nodes[row.id];
    let r = &node.record;
    // Files that are no images, and images of a host out of reach, are
    // greyed: what is shown is not (or no longer) something to act on.
    let skipped = node
        .flags
        .iter()
        .any(|f| matches!(f, Flag::Skipped { .. } | Flag::Stale { .. }));
    let broken = node.flags.iter().any(|f| f.is_broken()) || super::alarmed(app, row.id);
    let warned = !broken && !skipped && !node.flags.is_empty();

    let marker = if row.folded {
        "▸ "
    } else if row.has_children {
        "▾ "
    } else {
        ""
    };
    let glyph = if broken {
        "✗ "
    } else if warned {
        "! "
    } else if skipped {
        "· "
    } else {
        ""
    };
    // Protected: read-only on disk (`p`, `cowshed protect`).
    let protected = if app.forest.is_protected(row.id) {
        "⊘ "
    } else {
        ""
    };
    let shown = crate::tui::rows::row_name(&app.forest, &app.roots, row);
    // Each tree of another host starts with the host's name; a file
    // several hosts see (shared storage) names them all, where that
    // differs from its parent.
    let label = r.hosts_label();
    let host = match (&label, node.parent) {
        (Some(h), None) => format!("{h}: "),
        (Some(h), Some(p)) if app.forest.nodes[p].record.hosts_label() != label => {
            format!("{h}: ")
        }
        _ => String::new(),
    };
    let name = format!("{}{marker}{glyph}{protected}{host}{shown}", row.guides);
    let name_style = if broken {
        Style::new().fg(t.broken)
    } else if warned {
        Style::new().fg(t.warning)
    } else if skipped {
        Style::new().fg(t.dim)
    } else {
        Style::new()
    };
    let fmt = match &r.summary {
        Some(s) => s.format.name(),
        None if skipped => "-",
        None => "?",
    };
    let mut cells = format!(" {}", fit(fmt, FMT_W));
    if c.virtual_size {
        let v = if skipped {
            String::new()
        } else {
            human(r.sizes.virtual_size)
        };
        cells.push_str(&format!(" {}", right(&v, SIZE_W)));
    }
    cells.push_str(&format!(
        " {} {}  ",
        right(&human(r.sizes.allocated), SIZE_W),
        right(&percent(r.sizes.allocated, r.sizes.virtual_size), PCT_W),
    ));
    // The cursor's cell shows a mark instead: a column of its own would
    // cost the name a cell on every terminal, and the selected row keeps
    // its highlight.
    let cursor = if app.marks.contains(&r.key) {
        Span::styled("●", Style::new().fg(t.accent))
    } else {
        Span::raw(if selected { "›" } else { " " })
    };
    let mut spans = vec![
        cursor,
        Span::styled(fit(&name, c.name), name_style),
        Span::styled(cells, if skipped { name_style } else { Style::new() }),
    ];
    if vm_width(app) > 0 {
        spans.push(Span::styled(
            format!("  {}", fit(&vm_cell(app, node), VM_W)),
            Style::new().fg(t.in_use),
        ));
    }

    let growth = app.growth.get(&r.key).filter(|g| g.rate > 0.0);
    let in_use = in_use_badge(app, node);
    match (growth, &in_use) {
        // Nothing moves and nothing holds it: the flag's words take the
        // space, as the colour alone would not say what is wrong.
        (None, None) if !node.flags.is_empty() => {
            let text: Vec<String> = node.flags.iter().map(|f| f.describe()).collect();
            spans.push(Span::styled(text.join("; "), name_style));
        }
        _ => {
            if c.growth > 0 {
                let g = growth.map(|g| growth_cell(g, c.growth)).unwrap_or_default();
                spans.push(Span::styled(fit(&g, c.growth), Style::new().fg(t.growing)));
                spans.push(Span::raw("  "));
            }
            if let Some((text, style)) = in_use {
                spans.push(Span::styled(
                    fit(&text, c.in_use).trim_end().to_string(),
                    style,
                ));
            }
        }
    }
    let mut line = Line::from(spans);
    if selected {
        line = line.style(Style::new().bg(t.selected).add_modifier(Modifier::BOLD));
    }
    line
}

/// `▁▂▄▆█ 12.0 MiB/s`: the last seconds' growth, scaled to the largest;
/// the rate alone in a narrow column.
fn growth_cell(g: &Growth, width: usize) -> String {
    let rate = format!("{}/s", human(g.rate as u64));
    if width < GROWTH_W {
        return rate;
    }
    let tail = &g.history[g.history.len().saturating_sub(SPARK_W)..];
    let max = tail.iter().copied().max().unwrap_or(0).max(1);
    let spark: String = tail
        .iter()
        .map(|&d| SPARK[(d.saturating_mul(SPARK.len() as u64 - 1) / max) as usize])
        .collect();
    format!("{spark} {rate}")
}

/// The IN USE column: a running job, else QEMU's lock with its holder.
fn in_use_badge(app: &App, node: &Node) -> Option<(String, Style)> {
    let r = &node.record;
    // A running job first: it is what changes the image right now.
    let mine = |j: &&JobView| j.touches.contains(&r.key);
    if let Some(j) = app
        .jobs
        .iter()
        .filter(mine)
        .find(|j| j.state == JobState::Running)
    {
        return Some((
            format!("job: {}", j.kind),
            Style::new().fg(app.theme.accent),
        ));
    }
    if let Some(j) = app
        .jobs
        .iter()
        .filter(mine)
        .find(|j| j.state == JobState::Queued)
    {
        return Some((
            format!("job: {} (queued)", j.kind),
            Style::new().fg(app.theme.dim),
        ));
    }
    let lock = match r.lock {
        LockState::None => return None,
        LockState::Reader => "read",
        LockState::Writer => "write",
    };
    let style = Style::new().fg(app.theme.in_use);
    let text = match r.holders.as_slice() {
        [] => lock.to_string(),
        [h] => format!("{lock} {} {}", h.command, h.pid),
        many => format!("{lock} ×{}", many.len()),
    };
    Some((text, style))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11, defect 3: IN USE keeps its room however narrow.
    #[test]
    fn narrow_terminals_shorten_names_and_keep_in_use() {
        let wide = columns(120);
        assert!(wide.virtual_size && wide.growth == GROWTH_W);
        assert!(wide.name >= NAME_MIN && wide.in_use >= IN_USE_MIN);
        for w in 60..=200u16 {
            let c = columns(w);
            let used = 1
                + (1 + FMT_W)
                + (1 + SIZE_W)
                + (1 + PCT_W)
                + if c.virtual_size { 1 + SIZE_W } else { 0 }
                + if c.growth > 0 { 2 + c.growth } else { 0 }
                + 2
                + c.name;
            assert!(c.in_use >= IN_USE_MIN, "{w}: {c:?}");
            assert!(used + c.in_use <= usize::from(w), "{w}: {c:?} overflows");
            assert!(c.name >= 16, "{w}: {c:?}");
        }
    }
}
