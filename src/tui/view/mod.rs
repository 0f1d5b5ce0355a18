//! Drawing: a pure function of [`App`]. No I/O, no decisions that change
//! state; everything shown was computed by `App::update` or a worker.

mod details;
mod dialogs;
mod jobs;
mod tree;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;

use super::app::{App, CommitPlan, Mode};

/// Below this the screen says so instead of drawing a mangled tree.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 18;
/// Rows of the details pane, its title line included.
const DETAILS_HEIGHT: u16 = 10;
/// Width of the jobs pane when there are jobs.
const JOBS_WIDTH: u16 = 48;

/// Where each part of the screen goes. Shared with `App` so mouse clicks
/// and scrolling agree with what is drawn.
#[derive(Debug, Clone, Copy, Default)]
pub struct Areas {
    pub too_small: bool,
    pub header: Rect,
    /// The column titles.
    pub tree_head: Rect,
    /// The rows.
    pub tree_body: Rect,
    pub details: Rect,
    pub status: Rect,
    pub footer: Rect,
}

pub fn layout(area: Rect) -> Areas {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return Areas {
            too_small: true,
            ..Areas::default()
        };
    }
    let [header, tree_head, tree_body, details, status, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(DETAILS_HEIGHT),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    Areas {
        too_small: false,
        header,
        tree_head,
        tree_body,
        details,
        status,
        footer,
    }
}

pub fn draw(app: &App, frame: &mut Frame) {
    let area = frame.area();
    let a = layout(area);
    if a.too_small {
        draw_too_small(frame, area);
        return;
    }
    draw_header(app, frame, a.header);
    tree::draw(app, frame, a.tree_head, a.tree_body);
    if app.jobs.is_empty() {
        details::draw(app, frame, a.details);
    } else {
        let [d, j] = Layout::horizontal([Constraint::Min(1), Constraint::Length(JOBS_WIDTH)])
            .areas(a.details);
        details::draw(app, frame, d);
        jobs::draw(app, frame, j);
    }
    draw_status(app, frame, a.status);
    draw_footer(app, frame, a.footer);
    match &app.mode {
        Mode::Help => draw_help(app, frame, area),
        Mode::CloneName { source, input } => draw_clone_prompt(app, frame, area, source, input),
        Mode::ConfirmCommit(plan) => draw_commit_confirm(app, frame, area, plan),
        Mode::PickBacking(pick) => dialogs::draw_pick(app, frame, area, pick),
        Mode::ConfirmRebase(plan) => dialogs::draw_rebase(app, frame, area, plan),
        Mode::ConfirmFlatten(plan) => dialogs::draw_flatten(app, frame, area, plan),
        Mode::Convert(plan) => dialogs::draw_convert(app, frame, area, plan),
        Mode::Normal | Mode::Filter => {}
    }
}

fn draw_too_small(frame: &mut Frame, area: Rect) {
    let text = vec![
        Line::from("terminal too small"),
        Line::from(format!(
            "need {MIN_WIDTH}×{MIN_HEIGHT}, have {}×{}",
            area.width, area.height
        )),
    ];
    let y = area.height.saturating_sub(2) / 2;
    let r = Rect::new(area.x, area.y + y, area.width, area.height.min(2));
    frame.render_widget(Paragraph::new(text).centered(), r);
}

/// Sizes in binary units, short enough for a column: `812 MiB`, `2.1 GiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v < 10.0 && v.fract() != 0.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

fn draw_header(app: &App, frame: &mut Frame, area: Rect) {
    let accent = Style::new().fg(app.theme.accent);
    let roots: Vec<String> = app.roots.iter().map(|r| r.display().to_string()).collect();
    let t = app.totals;
    let mut right = format!(
        "{} image{} · {} base{} · {} saved ",
        t.images,
        plural(t.images),
        t.bases,
        plural(t.bases),
        human(t.saved)
    );
    if app.scanning {
        right = format!("scanning… · {right}");
    }
    let left = format!(" cowshed  {}", roots.join(", "));
    let pad = usize::from(area.width).saturating_sub(left.chars().count() + right.chars().count());
    let line = Line::from(vec![
        Span::styled(" cowshed", accent.add_modifier(Modifier::BOLD)),
        Span::raw(format!("  {}", roots.join(", "))),
        Span::raw(" ".repeat(pad)),
        Span::styled(right, accent),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn draw_status(app: &App, frame: &mut Frame, area: Rect) {
    let dim = Style::new().fg(app.theme.dim);
    let line = if app.mode == Mode::Filter {
        Line::from(vec![
            Span::styled(" / ", Style::new().fg(app.theme.accent)),
            Span::raw(format!("{}▏", app.filter)),
            Span::styled("  type to filter · Enter keeps · Esc clears", dim),
        ])
    } else if let Some(s) = &app.status {
        let style = if s.error {
            Style::new().fg(app.theme.broken)
        } else {
            Style::new().fg(app.theme.growing)
        };
        let glyph = if s.error { "✗ " } else { "✓ " };
        Line::from(Span::styled(format!(" {glyph}{}", s.text), style))
    } else if !app.filter.is_empty() {
        Line::from(Span::styled(
            format!(" filter: {} (Esc clears)", app.filter),
            dim,
        ))
    } else if let Some((path, msg)) = app.scan_errors.first() {
        let more = app.scan_errors.len() - 1;
        let more = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        Line::from(Span::styled(
            format!(" ! {}: {msg}{more}", app.display_path(path)),
            Style::new().fg(app.theme.warning),
        ))
    } else {
        Line::default()
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_footer(app: &App, frame: &mut Frame, area: Rect) {
    let key_style = Style::new()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let mut spans = vec![Span::raw(" ")];
    for (i, (key, label)) in app.keymap.footer().into_iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(key, key_style));
        spans.push(Span::raw(format!(" {label}")));
    }
    let mut line = Line::from(spans);
    if app.sort != super::app::SortKey::Name {
        line.push_span(Span::styled(
            format!("   sorted by {}", app.sort.name()),
            Style::new().fg(app.theme.dim),
        ));
    }
    frame.render_widget(Paragraph::new(line), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn draw_help(app: &App, frame: &mut Frame, area: Rect) {
    let help = app.keymap.help();
    let key_w = help
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let key_style = Style::new()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let mut lines: Vec<Line> = help
        .into_iter()
        .map(|(k, d)| {
            Line::from(vec![
                Span::styled(format!(" {k:<key_w$}  "), key_style),
                Span::raw(d),
            ])
        })
        .collect();
    lines.push(Line::default());
    lines.push(Line::from(Span::styled(
        " mouse: click selects, wheel scrolls · any key closes",
        Style::new().fg(app.theme.dim),
    )));
    let r = centered(area, 72, lines.len() as u16 + 2);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(Block::new().borders(Borders::ALL).title(" keys ")),
        r,
    );
}

fn draw_clone_prompt(
    app: &App,
    frame: &mut Frame,
    area: Rect,
    source: &std::path::Path,
    input: &str,
) {
    let name = app
        .forest
        .get(source)
        .map(|id| app.display_path(&app.forest.nodes[id].record.path))
        .unwrap_or_default();
    let lines = vec![
        Line::from(vec![Span::raw(" name: "), Span::raw(format!("{input}▏"))]),
        Line::from(Span::styled(
            " created next to it · Enter creates · Esc cancels",
            Style::new().fg(app.theme.dim),
        )),
    ];
    let r = centered(area, 60, 4);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" clone {name} as ")),
        ),
        r,
    );
}

/// The commit confirmation: what will happen, and loudly (colour, glyph
/// and words) how many other overlays of the base it invalidates.
fn draw_commit_confirm(app: &App, frame: &mut Frame, area: Rect, plan: &CommitPlan) {
    let top = app.display_path(&plan.top);
    let base = app.display_path(&plan.base);
    let warn = Style::new()
        .fg(app.theme.warning)
        .add_modifier(Modifier::BOLD);
    let dim = Style::new().fg(app.theme.dim);
    let mut lines = vec![
        Line::from(format!(
            "Commit {top} into {base}: copies its {} (allocated size) into the base, \
             then empties {top}.",
            human(plan.allocated)
        )),
        Line::default(),
    ];
    if let Some(w) = &plan.space_warning {
        lines.push(Line::from(Span::styled(format!("⚠ {w}"), warn)));
        lines.push(Line::default());
    }
    if plan.affected > 0 {
        let n = plan.affected;
        let (s, verb) = if n == 1 { ("", "sees") } else { ("s", "see") };
        lines.push(Line::from(Span::styled(
            format!(
                "⚠ WARNING: {n} other overlay{s} of {base} {verb} changed data afterwards: \
                 committing into a shared base invalidates them."
            ),
            warn,
        )));
        lines.push(Line::from(Span::styled(
            "(counted among the scanned images; overlays elsewhere are hit too)",
            dim,
        )));
        lines.push(Line::default());
        lines.push(Line::from(vec![
            Span::raw("type "),
            Span::styled("yes", warn),
            Span::raw(" and Enter to commit: "),
            Span::styled(format!("{}▏", plan.input), warn),
        ]));
        if plan.nudge {
            lines.push(Line::from(Span::styled(
                "only the word yes commits · Esc or n cancels",
                warn,
            )));
        } else {
            lines.push(Line::from(Span::styled("Esc or n cancels", dim)));
        }
    } else {
        lines.push(Line::from(Span::styled(
            "no other overlay of the base was found: nothing else changes",
            dim,
        )));
        lines.push(Line::default());
        lines.push(Line::from(vec![
            Span::styled("y", Style::new().fg(app.theme.accent)),
            Span::raw(" or "),
            Span::styled("Enter", Style::new().fg(app.theme.accent)),
            Span::raw(" commits · "),
            Span::styled("Esc", Style::new().fg(app.theme.accent)),
            Span::raw(" or "),
            Span::styled("n", Style::new().fg(app.theme.accent)),
            Span::raw(" cancels"),
        ]));
    }
    let border = if plan.affected > 0 {
        warn
    } else {
        Style::new()
    };
    dialogs::draw_dialog(frame, area, "commit?", lines, border);
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(196 * 1024), "196 KiB");
        assert_eq!(human(2_254_857_830), "2.1 GiB");
        assert_eq!(human(20 << 30), "20 GiB");
    }
}
