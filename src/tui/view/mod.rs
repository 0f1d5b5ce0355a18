//! Drawing: a pure function of [`App`]. No I/O, no decisions that change
//! state; everything shown was computed by `App::update` or a worker.
//! Widths are display widths (`unicode-width`): a CJK character or an
//! emoji takes two cells.

mod details;
mod jobs;
mod reclaim;
mod tree;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::app::{App, Mode, StatusKind};
use super::keymap::{Action, Hint, Layer};

pub use tree::{columns, Columns};

/// Below this the screen says so instead of drawing a mangled tree.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 18;
/// Rows of the bottom pane (details, jobs), its title line included, when
/// the terminal is tall enough.
const DETAILS_HEIGHT: u16 = 10;
/// From this width on, the jobs pane stands beside the details; below, it
/// goes under them, so neither covers the other.
const SIDE_BY_SIDE: u16 = 110;

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
    /// Details and jobs.
    pub bottom: Rect,
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
    // The tree keeps about half of a short screen.
    let bottom = DETAILS_HEIGHT.min(area.height.saturating_sub(4) / 2);
    let [header, tree_head, tree_body, bottom, status, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(bottom),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    Areas {
        too_small: false,
        header,
        tree_head,
        tree_body,
        bottom,
        status,
        footer,
    }
}

/// The details and jobs panes within the bottom area.
fn split_bottom(app: &App, bottom: Rect) -> (Rect, Option<Rect>) {
    if app.jobs.is_empty() {
        return (bottom, None);
    }
    if bottom.width >= SIDE_BY_SIDE {
        let jobs_w = (bottom.width * 2 / 5).clamp(48, 80);
        let [d, j] =
            Layout::horizontal([Constraint::Min(1), Constraint::Length(jobs_w)]).areas(bottom);
        (d, Some(j))
    } else {
        // Two lines a job and a title, at most half the pane.
        let want = (app.jobs.len() as u16 * 2 + 1)
            .min(bottom.height / 2)
            .max(3);
        let [d, j] = Layout::vertical([Constraint::Min(1), Constraint::Length(want)]).areas(bottom);
        (d, Some(j))
    }
}

pub fn draw(app: &App, frame: &mut Frame) {
    let area = frame.area();
    let a = layout(area);
    if a.too_small {
        draw_too_small(frame, area);
        return;
    }
    let alarms = alarms(app);
    if alarms.is_empty() {
        draw_header(app, frame, a.header);
    } else {
        draw_alarm(app, frame, a.header, &alarms);
    }
    tree::draw(app, frame, a.tree_head, a.tree_body);
    let (d, j) = split_bottom(app, a.bottom);
    details::draw(app, frame, d);
    if let Some(j) = j {
        jobs::draw(app, frame, j);
    }
    draw_status(app, frame, a.status);
    draw_footer(app, frame, a.footer);
    if let Some(dialog) = &app.dialog {
        dialog.draw(app, frame, area);
        return;
    }
    match app.mode {
        Mode::Help(at) => draw_scrolled(app, frame, area, "keys", help_lines(app), at, Layer::Help),
        Mode::Log(at) => {
            let w = popup_inner_width(area);
            draw_scrolled(app, frame, area, "log", log_lines(app, w), at, Layer::Log)
        }
        Mode::Job(id) => jobs::draw_job(app, frame, area, id),
        Mode::Reclaim => reclaim::draw(app, frame, area),
        Mode::Tree | Mode::Filter | Mode::Jobs => {}
    }
}

/// Whether image `id` raises the stale-base alarm on screen: a base held
/// for writing while others read through it, unless the writer is one of
/// this UI's own jobs (a commit, whose dialog said what it does to the
/// other overlays before it started).
pub(crate) fn alarmed(app: &App, id: crate::catalog::NodeId) -> bool {
    let node = &app.forest.nodes[id];
    node.flags.iter().any(|f| f.is_alarm())
        && !app
            .jobs
            .iter()
            .any(|j| !j.state.is_finished() && j.touches.contains(&node.record.key))
}

/// The banner's alarms: "base X is open for writing by pid N (cmd): its N
/// overlays will read corrupt data".
pub fn alarms(app: &App) -> Vec<String> {
    (0..app.forest.nodes.len())
        .filter(|&id| alarmed(app, id))
        .flat_map(|id| {
            let n = &app.forest.nodes[id];
            n.flags.iter().filter(|f| f.is_alarm()).map(|f| {
                format!(
                    "base {} is {}",
                    app.display_path(&n.record.path),
                    f.describe()
                )
            })
        })
        .collect()
}

/// The header's place, taken by the alarm: nothing else on screen
/// matters as much.
fn draw_alarm(app: &App, frame: &mut Frame, area: Rect, alarms: &[String]) {
    let more = match alarms.len() {
        0 | 1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    };
    let text = fit(
        &format!(" ✗ ALARM: {}{more}", alarms[0]),
        usize::from(area.width),
    );
    let style = Style::new()
        .fg(app.theme.broken)
        .add_modifier(Modifier::BOLD | Modifier::REVERSED);
    frame.render_widget(Paragraph::new(Line::from(Span::styled(text, style))), area);
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

/// `part` of `whole` as the tree and the details both show it: rounded to
/// the nearest percent, `<1%` for a part too small to round up, nothing
/// without a whole.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return String::new();
    }
    let tenths = u128::from(part) * 1000 / u128::from(whole);
    if part > 0 && tenths < 5 {
        "<1%".to_string()
    } else {
        format!("{}%", ((tenths + 5) / 10).min(999))
    }
}

/// Pad or cut `s` to exactly `w` cells of the terminal; a cut ends in `…`.
pub fn fit(s: &str, w: usize) -> String {
    let width = s.width();
    if width <= w {
        return format!("{s}{}", " ".repeat(w - width));
    }
    if w == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        if used + cw > w - 1 {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('…');
    used += 1;
    out.push_str(&" ".repeat(w.saturating_sub(used)));
    out
}

/// `text` broken into lines of at most `w` cells (at spaces where it can).
pub fn wrap(text: &str, w: usize) -> Vec<String> {
    let w = w.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    let mut used = 0;
    for word in text.split(' ') {
        let ww = word.width();
        if used > 0 && used + 1 + ww > w {
            lines.push(std::mem::take(&mut line));
            used = 0;
        }
        if used > 0 {
            line.push(' ');
            used += 1;
        }
        // A word longer than a line is cut where it must be.
        for c in word.chars() {
            let cw = c.width().unwrap_or(0);
            if used + cw > w {
                lines.push(std::mem::take(&mut line));
                used = 0;
            }
            line.push(c);
            used += cw;
        }
    }
    lines.push(line);
    lines
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
    let (marked, marked_bytes) = app.marked_totals();
    if marked > 0 {
        right = format!("● {marked} marked · {} · {right}", human(marked_bytes));
    }
    let width = usize::from(area.width);
    // The roots give way to the totals, and two spaces always part them.
    let room = width.saturating_sub(" cowshed  ".width() + 2 + right.width());
    let roots = roots.join(", ");
    let roots = if roots.width() > room {
        fit(&roots, room).trim_end().to_string()
    } else {
        roots
    };
    let left = format!(" cowshed  {roots}");
    let pad = width.saturating_sub(left.width() + right.width()).max(2);
    let line = Line::from(vec![
        Span::styled(" cowshed", accent.add_modifier(Modifier::BOLD)),
        Span::raw(format!("  {roots}")),
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
    let line = if app.mode == Mode::Filter && app.dialog.is_none() {
        Line::from(vec![
            Span::styled(" / ", Style::new().fg(app.theme.accent)),
            Span::raw(format!("{}▏", app.filter)),
        ])
    } else if let Some(s) = &app.status {
        let colour = match s.kind {
            StatusKind::Error => app.theme.broken,
            StatusKind::Warning => app.theme.warning,
            StatusKind::Done => app.theme.growing,
            StatusKind::Cancelled | StatusKind::Info => app.theme.dim,
        };
        Line::from(Span::styled(
            format!(" {} {}", s.kind.glyph(), s.text),
            Style::new().fg(colour),
        ))
    } else if !app.filter.is_empty() {
        let clear = app.keymap.keys_text(Layer::Tree, Action::ClearFilter);
        Line::from(Span::styled(
            format!(" filter: {} ({clear} clears)", app.filter),
            dim,
        ))
    } else if let Some((path, msg)) = app.scan_errors.first() {
        let more = app.scan_errors.len() - 1;
        let log = app.keymap.keys_text(Layer::Tree, Action::Log);
        let more = if more > 0 {
            format!(" (and {more} more: {log} shows the log)")
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

/// The hints the footer has room for in `width` cells, in table order;
/// the way to the help is kept whatever else gives way.
pub fn footer_hints(app: &App, width: u16) -> Vec<Hint> {
    let hints = app.hints();
    let cost = |h: &Hint| h.keys.width() + 1 + h.label.width() + 2;
    let mut room = usize::from(width).saturating_sub(1);
    let keep = |h: &Hint| h.action == Action::Help;
    room = room.saturating_sub(hints.iter().filter(|h| keep(h)).map(cost).sum());
    let mut shown = vec![false; hints.len()];
    for (i, h) in hints.iter().enumerate() {
        if keep(h) {
            shown[i] = true;
        } else if cost(h) <= room {
            room -= cost(h);
            shown[i] = true;
        } else {
            room = 0;
        }
    }
    hints
        .into_iter()
        .zip(shown)
        .filter_map(|(h, s)| s.then_some(h))
        .collect()
}

/// The keys of the mode (or the open dialog), from the key table.
fn draw_footer(app: &App, frame: &mut Frame, area: Rect) {
    let key_style = Style::new()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let mut spans = vec![Span::raw(" ")];
    for (i, h) in footer_hints(app, area.width).into_iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::styled(h.keys, key_style));
        spans.push(Span::raw(format!(" {}", h.label)));
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

pub(crate) fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// The help and the log: popups as tall as the screen allows.
fn popup_rect(area: Rect) -> Rect {
    centered(
        area,
        84.min(area.width.saturating_sub(2)),
        area.height.saturating_sub(2),
    )
}

fn popup_inner_width(area: Rect) -> usize {
    usize::from(popup_rect(area).width.saturating_sub(2))
}

/// Lines a popup shows at once: a page for page-up and page-down.
pub fn popup_page(area: Rect) -> usize {
    usize::from(popup_rect(area).height.saturating_sub(2)).max(1)
}

/// The help: every layer of the key table, keys and what they do.
fn help_lines(app: &App) -> Vec<Line<'static>> {
    let key_style = Style::new()
        .fg(app.theme.accent)
        .add_modifier(Modifier::BOLD);
    let title = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = Vec::new();
    for (layer, rows) in app.keymap.help() {
        let key_w = rows.iter().map(|h| h.keys.width()).max().unwrap_or(0);
        if !lines.is_empty() {
            lines.push(Line::default());
        }
        lines.push(Line::from(Span::styled(
            format!(" {}", layer.title()),
            title,
        )));
        for h in rows {
            lines.push(Line::from(vec![
                Span::styled(format!(" {}  ", fit(&h.keys, key_w)), key_style),
                Span::raw(h.label),
            ]));
        }
    }
    lines.push(Line::default());
    lines.push(Line::from(Span::styled(
        " mouse: click selects, wheel scrolls",
        Style::new().fg(app.theme.dim),
    )));
    lines
}

pub fn help_max_scroll(app: &App) -> usize {
    help_lines(app).len().saturating_sub(popup_page(app.area))
}

/// The log, oldest first, each entry wrapped to `width`.
fn log_lines(app: &App, width: usize) -> Vec<Line<'static>> {
    if app.log.is_empty() {
        return vec![Line::from(Span::styled(
            " nothing yet: warnings, refusals and job results will be kept here",
            Style::new().fg(app.theme.dim),
        ))];
    }
    let mut lines = Vec::new();
    for e in &app.log {
        let colour = match e.kind {
            StatusKind::Error => app.theme.broken,
            StatusKind::Warning => app.theme.warning,
            StatusKind::Done => app.theme.growing,
            StatusKind::Cancelled | StatusKind::Info => app.theme.dim,
        };
        let prefix = format!(" {} {} ", e.time, e.kind.glyph());
        let indent = prefix.width();
        for (i, part) in wrap(&e.text, width.saturating_sub(indent + 1))
            .into_iter()
            .enumerate()
        {
            let lead = if i == 0 {
                prefix.clone()
            } else {
                " ".repeat(indent)
            };
            lines.push(Line::from(vec![
                Span::styled(lead, Style::new().fg(colour)),
                Span::raw(part),
            ]));
        }
    }
    lines
}

pub fn log_max_scroll(app: &App) -> usize {
    log_lines(app, popup_inner_width(app.area))
        .len()
        .saturating_sub(popup_page(app.area))
}

fn draw_scrolled(
    app: &App,
    frame: &mut Frame,
    area: Rect,
    title: &str,
    lines: Vec<Line<'static>>,
    at: usize,
    layer: Layer,
) {
    let r = popup_rect(area);
    let page = popup_page(area);
    let max = lines.len().saturating_sub(page);
    let at = at.min(max);
    let total = lines.len();
    let shown: Vec<Line> = lines.into_iter().skip(at).take(page).collect();
    // Where the view is, and the keys that move it and close it.
    let hints: Vec<String> = app
        .keymap
        .footer(layer)
        .into_iter()
        .map(|h| format!("{} {}", h.keys, h.label))
        .collect();
    let position = if max > 0 {
        format!(" {}-{} of {total} · ", at + 1, (at + page).min(total))
    } else {
        " ".to_string()
    };
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(shown).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" {title} "))
                .title_bottom(format!("{position}{} ", hints.join(" · "))),
        ),
        r,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(196 * 1024), "196 KiB");
        assert_eq!(human(2_254_857_830), "2.1 GiB");
        assert_eq!(human(20 << 30), "20 GiB");
    }

    #[test]
    fn percents_round_and_small_parts_say_so() {
        assert_eq!(percent(0, 100), "0%");
        assert_eq!(percent(1, 1000), "<1%");
        assert_eq!(percent(5, 1000), "1%");
        assert_eq!(percent(15, 1000), "2%");
        assert_eq!(percent(100, 100), "100%");
        assert_eq!(percent(3, 0), "");
    }

    /// Issue 11, defect 2: cells, not characters.
    #[test]
    fn fit_measures_display_width() {
        let name = "Übergröße-日本語-🐄.qcow2";
        assert_eq!(fit(name, 40).width(), 40);
        assert_eq!(fit(name, 12).width(), 12);
        assert!(fit(name, 12).contains('…'));
        // A wide character that would straddle the edge is left out.
        assert_eq!(fit("日本語", 4), "日… ");
        assert_eq!(fit("abc", 3), "abc");
    }

    #[test]
    fn wrap_breaks_at_spaces_and_cuts_long_words() {
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), [""]);
    }
}
