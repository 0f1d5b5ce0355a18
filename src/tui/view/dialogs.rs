//! The rebase, flatten and convert dialogs (see `tui::chainops`).

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Padding, Paragraph, Wrap};
use ratatui::Frame;

use super::{centered, human};
use crate::engine::Format;
use crate::tui::app::App;
use crate::tui::chainops::{BackingPick, ConvertPlan, FlattenPlan, RebasePlan, CONVERT_FIELDS};

/// A centred, word-wrapped box sized to its lines.
pub(super) fn draw_dialog(
    frame: &mut Frame,
    area: Rect,
    title: &str,
    lines: Vec<Line>,
    border: Style,
) {
    let width = area.width.saturating_sub(4).min(80);
    // Borders and a column of padding on each side.
    let inner = usize::from(width.saturating_sub(4)).max(1);
    // Wrapped height: each line takes its length over the inner width,
    // rounded up (word wrapping may need one more now and then).
    let height: usize = lines
        .iter()
        .map(|l| l.width().div_ceil(inner).max(1))
        .sum::<usize>()
        + 3;
    let r = centered(area, width, height as u16);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: false }).block(
            Block::new()
                .borders(Borders::ALL)
                .border_style(border)
                .padding(Padding::horizontal(1))
                .title(format!(" {title} ")),
        ),
        r,
    );
}

fn keys<'a>(app: &App, parts: &[(&'a str, &'a str)]) -> Line<'a> {
    let mut spans = Vec::new();
    for (i, (key, what)) in parts.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw(" · "));
        }
        spans.push(Span::styled(*key, Style::new().fg(app.theme.accent)));
        spans.push(Span::raw(format!(" {what}")));
    }
    Line::from(spans)
}

/// While picking: a bar at the bottom of the tree says what is asked, so
/// the tree stays visible to pick from; typing a path gets a prompt.
pub(super) fn draw_pick(app: &App, frame: &mut Frame, area: Rect, pick: &BackingPick) {
    let image = app.display_path(&pick.image);
    let lines = match (&pick.typed, &pick.probing) {
        (Some(_), Some(probing)) => vec![
            Line::from(format!("new backing of {image}: {probing}")),
            Line::from(Span::styled(
                "checking that it is an image…",
                Style::new().fg(app.theme.dim),
            )),
        ],
        (Some(typed), None) => vec![
            Line::from(format!("new backing of {image}: {typed}▏")),
            keys(
                app,
                &[
                    ("Enter", "use it (stored as typed)"),
                    ("Esc", "back to the tree"),
                ],
            ),
        ],
        (None, _) => vec![
            Line::from(format!(
                "rebase {image}: select its new backing image in the tree"
            )),
            keys(
                app,
                &[
                    ("↑↓", "select"),
                    ("Enter", "choose"),
                    ("t", "type a path"),
                    ("Esc", "cancel"),
                ],
            ),
        ],
    };
    let h = 4.min(area.height);
    let r = Rect::new(
        area.x,
        area.y + area.height.saturating_sub(h + 2),
        area.width,
        h,
    );
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .border_style(Style::new().fg(app.theme.accent))
                .title(" rebase "),
        ),
        r,
    );
}

pub(super) fn draw_rebase(app: &App, frame: &mut Frame, area: Rect, plan: &RebasePlan) {
    let image = app.display_path(&plan.image);
    let warn = Style::new()
        .fg(app.theme.warning)
        .add_modifier(Modifier::BOLD);
    let dim = Style::new().fg(app.theme.dim);
    let mark = |on: bool| if on { "(•)" } else { "( )" };
    let safe = match &plan.safe_refused {
        None => Line::from(format!(
            "{} safe: where the old and the new backing differ, the old data is \
             copied into {image} first; the guest sees the same disk.",
            mark(!plan.unsafe_mode)
        )),
        Some(why) => Line::from(Span::styled(format!("    safe: not possible: {why}"), dim)),
    };
    let mut lines = vec![
        Line::from(format!(
            "Rebase {image} onto {} (format {}).",
            plan.backing_name,
            plan.format.name()
        )),
        Line::default(),
        safe,
        Line::from(vec![
            Span::raw(format!("{} unsafe: ", mark(plan.unsafe_mode))),
            Span::styled(
                "only the header changes; the guest then sees the new backing's data. \
                 Use it only when the new backing holds the same content (a moved or \
                 copied base).",
                if plan.unsafe_mode { warn } else { Style::new() },
            ),
        ]),
        Line::default(),
    ];
    if plan.backing_key.is_none() {
        lines.push(Line::from(Span::styled(
            "the new backing is not among the scanned images: F switches its format",
            dim,
        )));
    }
    lines.push(keys(
        app,
        &[
            ("s", "safe"),
            ("u", "unsafe"),
            ("Enter", "rebase"),
            ("Esc", "cancel"),
        ],
    ));
    let border = if plan.unsafe_mode { warn } else { Style::new() };
    draw_dialog(frame, area, "rebase?", lines, border);
}

pub(super) fn draw_flatten(app: &App, frame: &mut Frame, area: Rect, plan: &FlattenPlan) {
    let image = app.display_path(&plan.image);
    let mut lines = vec![
        Line::from(format!(
            "Flatten {image}: copy into it everything its backing chain ({}, {} \
             allocated below it) provides, then drop the backing file. The guest \
             sees the same disk; {image} grows and stands alone.",
            plan.backing,
            human(plan.below)
        )),
        Line::default(),
    ];
    if let Some(w) = &plan.space_warning {
        lines.push(Line::from(Span::styled(
            format!("⚠ {w}"),
            Style::new().fg(app.theme.warning),
        )));
        lines.push(Line::default());
    }
    lines.push(keys(app, &[("y/Enter", "flatten"), ("Esc/n", "cancel")]));
    draw_dialog(frame, area, "flatten?", lines, Style::new());
}

pub(super) fn draw_convert(app: &App, frame: &mut Frame, area: Rect, plan: &ConvertPlan) {
    let source = app.display_path(&plan.source);
    let dim = Style::new().fg(app.theme.dim);
    let focus = Style::new()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let backing = match &plan.backing {
        Some((name, _)) if plan.keep_backing => {
            format!("on: backed by {name}, only {source}'s own data")
        }
        Some(_) => "off: the whole chain, flattened".to_string(),
        None => "— (no backing file)".to_string(),
    };
    let values = [
        format!("{}▏", plan.dest),
        format!(
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
        plan.compression_name().to_string(),
        human(plan.cluster_size),
        backing,
    ];
    let mut lines = vec![
        Line::from(format!("Convert {source} into a new image beside it.")),
        Line::default(),
    ];
    for (i, (name, value)) in CONVERT_FIELDS.iter().zip(values).enumerate() {
        let style = if i == plan.field {
            focus
        } else if plan.applies(i) {
            Style::new()
        } else {
            dim
        };
        let pointer = if i == plan.field { "▸ " } else { "  " };
        lines.push(Line::from(Span::styled(
            format!(
                "{pointer}{name:<18} {}",
                if plan.applies(i) { value } else { "—".into() }
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
    lines.push(keys(
        app,
        &[
            ("↑↓", "field"),
            ("←→", "change"),
            ("Enter", "convert"),
            ("Esc", "cancel"),
        ],
    ));
    draw_dialog(frame, area, "convert", lines, Style::new());
}
