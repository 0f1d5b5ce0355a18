//! The tree pane: one row per image, overlays under their base.

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;
use ratatui::Frame;

use super::human;
use crate::catalog::Node;
use crate::engine::LockState;
use crate::jobs::JobState;
use crate::tui::app::{file_name, App, Growth, Row};

const FMT_W: usize = 6;
const SIZE_W: usize = 8;
const PCT_W: usize = 4;
const GROWTH_W: usize = 19;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
const SPARK_W: usize = 6;

fn fixed_width() -> usize {
    // cursor + (space + column) for fmt, virtual, on disk, %, growth.
    1 + (1 + FMT_W) + (1 + SIZE_W) + (1 + SIZE_W) + (1 + PCT_W) + (2 + GROWTH_W) + 2
}

/// Width of the name column; the IN USE column takes what is left.
fn name_width(total: u16) -> usize {
    let total = usize::from(total);
    let rest = total.saturating_sub(fixed_width());
    // The name gets about two thirds of what the fixed columns leave.
    (rest * 2 / 3).max(16)
}

/// Pad or cut `s` to exactly `w` characters.
fn fit(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n <= w {
        format!("{s}{}", " ".repeat(w - n))
    } else if w == 0 {
        String::new()
    } else {
        let mut out: String = s.chars().take(w - 1).collect();
        out.push('…');
        out
    }
}

fn right(s: &str, w: usize) -> String {
    format!("{s:>w$}")
}

pub fn draw(app: &App, frame: &mut Frame, head: Rect, body: Rect) {
    let name_w = name_width(head.width);
    let dim = Style::new().fg(app.theme.dim);
    let title = format!(
        " {} {} {} {} {}  {}  IN USE",
        fit("IMAGE", name_w),
        fit("FMT", FMT_W),
        right("VIRTUAL", SIZE_W),
        right("ON DISK", SIZE_W),
        right("%", PCT_W),
        fit("GROWTH", GROWTH_W),
    );
    frame.render_widget(
        Paragraph::new(Line::from(Span::styled(
            title,
            dim.add_modifier(Modifier::BOLD),
        ))),
        head,
    );
    if app.rows.is_empty() {
        let text = if app.scanning {
            " scanning…".to_string()
        } else if !app.filter.is_empty() {
            format!(" no image matches '{}'", app.filter)
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
        .map(|(i, row)| row_line(app, row, i == app.selected, name_w))
        .collect();
    frame.render_widget(Paragraph::new(lines), body);
}

fn row_line(app: &App, row: &Row, selected: bool, name_w: usize) -> Line<'static> {
    let t = &app.theme;
    let node: &Node = &app.forest.nodes[row.id];
    let r = &node.record;
    let broken = node.flags.iter().any(|f| f.is_broken());
    let warned = !broken && !node.flags.is_empty();

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
    } else {
        ""
    };
    let name = format!("{}{marker}{glyph}{}", row.guides, file_name(&r.path));
    let name_style = if broken {
        Style::new().fg(t.broken)
    } else if warned {
        Style::new().fg(t.warning)
    } else {
        Style::new()
    };
    let fmt = r.summary.as_ref().map_or("?", |s| s.format.name());
    let pct = if r.sizes.virtual_size > 0 {
        format!(
            "{}%",
            (r.sizes.allocated as u128 * 100 / u128::from(r.sizes.virtual_size)).min(999)
        )
    } else {
        String::new()
    };
    let mut spans = vec![
        Span::raw(if selected { "›" } else { " " }),
        Span::styled(fit(&name, name_w), name_style),
        Span::raw(format!(
            " {} {} {} {}  ",
            fit(fmt, FMT_W),
            right(&human(r.sizes.virtual_size), SIZE_W),
            right(&human(r.sizes.allocated), SIZE_W),
            right(&pct, PCT_W),
        )),
    ];

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
            let g = growth.map(growth_cell).unwrap_or_default();
            spans.push(Span::styled(fit(&g, GROWTH_W), Style::new().fg(t.growing)));
            if let Some((text, style)) = in_use {
                spans.push(Span::raw("  "));
                spans.push(Span::styled(text, style));
            }
        }
    }
    let mut line = Line::from(spans);
    if selected {
        line = line.style(Style::new().bg(t.selected).add_modifier(Modifier::BOLD));
    }
    line
}

/// `▁▂▄▆█ 12.0 MiB/s`: the last seconds' growth, scaled to the largest.
fn growth_cell(g: &Growth) -> String {
    let tail = &g.history[g.history.len().saturating_sub(SPARK_W)..];
    let max = tail.iter().copied().max().unwrap_or(0).max(1);
    let spark: String = tail
        .iter()
        .map(|&d| SPARK[(d.saturating_mul(SPARK.len() as u64 - 1) / max) as usize])
        .collect();
    format!("{spark} {}/s", human(g.rate as u64))
}

/// The IN USE column: a running job, else QEMU's lock with its holder.
fn in_use_badge(app: &App, node: &Node) -> Option<(String, Style)> {
    let r = &node.record;
    // A running job first: it is what changes the image right now.
    let mine = |j: &&crate::tui::app::JobView| j.touches.contains(&r.key);
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
