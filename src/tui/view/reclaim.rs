//! The reclaim view (`D`): images nothing depends on and no process
//! holds, the biggest and longest untouched first, with what they take in
//! all and what the marked ones take.

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;

use super::{fit, human, popup_page, popup_rect};
use crate::tui::app::App;
use crate::tui::keymap::Layer;
use crate::tui::reclaim::age_text;

const SIZE_W: usize = 9;
const AGE_W: usize = 11;

pub fn draw(app: &App, frame: &mut Frame, area: Rect) {
    let r = popup_rect(area);
    let inner = usize::from(r.width.saturating_sub(2));
    // Two lines of totals and titles above the rows.
    let page = popup_page(area).saturating_sub(3).max(1);
    let view = &app.reclaim;
    let dim = Style::new().fg(app.theme.dim);
    let accent = Style::new().fg(app.theme.accent);
    let n = view.rows.len();
    let marked: Vec<_> = view
        .rows
        .iter()
        .filter(|c| app.marks.contains(&c.key))
        .collect();
    let marked_bytes: u64 = marked.iter().map(|c| c.allocated).sum();
    let mut lines = vec![Line::from(vec![
        Span::raw(format!(
            " {n} image{} · {} in all",
            if n == 1 { "" } else { "s" },
            human(view.total())
        )),
        Span::styled(
            if marked.is_empty() {
                String::new()
            } else {
                format!(" · ● {} marked · {}", marked.len(), human(marked_bytes))
            },
            accent,
        ),
    ])];
    // Cursor, mark and a space before the name.
    let name_w = inner.saturating_sub(3 + 1 + SIZE_W + 2 + AGE_W + 1);
    lines.push(Line::from(Span::styled(
        format!(
            "   {} {:>SIZE_W$}  {:>AGE_W$}",
            fit("IMAGE", name_w),
            "ON DISK",
            "LAST WRITE"
        ),
        dim.add_modifier(Modifier::BOLD),
    )));
    if view.rows.is_empty() {
        lines.push(Line::from(Span::styled(
            " nothing to reclaim: every image has overlays or is in use",
            dim,
        )));
    }
    let offset = view.selected.saturating_sub(page - 1);
    for (i, c) in view.rows.iter().enumerate().skip(offset).take(page) {
        let selected = i == view.selected;
        let mark = app.marks.contains(&c.key);
        let path = &app.forest.nodes[c.id].record.path;
        let mut line = Line::from(vec![
            Span::raw(if selected { "›" } else { " " }),
            Span::styled(if mark { "●" } else { " " }, accent),
            Span::raw(format!(
                " {} {:>SIZE_W$}  {:>AGE_W$}",
                fit(&app.display_path(path), name_w),
                human(c.allocated),
                format!("{} ago", age_text(c.age)),
            )),
        ]);
        if selected {
            line = line.style(
                Style::new()
                    .bg(app.theme.selected)
                    .add_modifier(Modifier::BOLD),
            );
        }
        lines.push(line);
    }
    let hints: Vec<String> = app
        .keymap
        .footer(Layer::Reclaim)
        .into_iter()
        .map(|h| format!("{} {}", h.keys, h.label))
        .collect();
    let position = if n > page {
        format!(" {}-{} of {n} · ", offset + 1, (offset + page).min(n))
    } else {
        " ".to_string()
    };
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(" reclaim: nothing depends on them, nobody holds them · by size × age ")
                .title_bottom(format!("{position}{} ", hints.join(" · "))),
        ),
        r,
    );
}
