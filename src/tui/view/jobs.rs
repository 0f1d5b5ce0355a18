//! The jobs pane: two lines per job, newest first. The first names the job
//! and its state; the second shows a progress bar with percent, rate and
//! time left while it runs, or how it ended. A line too long for the pane
//! is cut; Enter on the job (in the pane's mode) opens it whole.

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;

use super::{centered, fit, human, wrap};
use crate::jobs::{JobId, JobState};
use crate::tui::app::{App, JobView, Mode};
use crate::tui::keymap::{Action, Layer};

/// Cells of the progress bar.
const BAR_W: usize = 10;

fn glyph(app: &App, state: &JobState) -> (&'static str, Style) {
    let t = &app.theme;
    match state {
        JobState::Queued => ("…", Style::new().fg(t.dim)),
        JobState::Running => ("⟳", Style::new().fg(t.accent)),
        JobState::Done => ("✓", Style::new().fg(t.growing)),
        JobState::Failed(_) => ("✗", Style::new().fg(t.broken)),
        JobState::Cancelled => ("–", Style::new().fg(t.dim)),
    }
}

pub fn draw(app: &App, frame: &mut Frame, area: Rect) {
    let t = &app.theme;
    let focused = app.mode == Mode::Jobs;
    // Two lines per job, below the pane's top border.
    let fits = usize::from(area.height.saturating_sub(1)) / 2;
    let width = usize::from(area.width.saturating_sub(2));
    // Which job the pane's keys act on: the selected one, else the newest.
    let target = app.job_selected.or_else(|| app.jobs.last().map(|j| j.id));
    let mut lines = Vec::new();
    for j in app.jobs.iter().rev().take(fits.max(1)) {
        let (glyph, style) = glyph(app, &j.state);
        let selected = focused && Some(j.id) == target;
        let cursor = if selected { "›" } else { " " };
        // The state before the label, so a long label is what gets cut.
        let text = format!("{glyph} {:<9} {}", j.state.name(), j.label);
        let mut first = Line::from(vec![
            Span::raw(cursor),
            Span::styled(fit(&text, width).trim_end().to_string(), style),
        ]);
        if selected {
            first = first.style(Style::new().bg(t.selected).add_modifier(Modifier::BOLD));
        }
        lines.push(first);
        let second = second_line(app, j);
        lines.push(Line::from(Span::styled(
            fit(&second, width).trim_end().to_string(),
            style,
        )));
    }
    // How to get there; once there, the footer says what the keys do.
    let title = if focused {
        " jobs ".to_string()
    } else {
        format!(
            " jobs · {} cancel · {} select ",
            app.keymap.keys_text(Layer::Tree, Action::CancelJob),
            app.keymap.keys_text(Layer::Tree, Action::FocusJobs)
        )
    };
    let title_style = if focused {
        Style::new().fg(t.accent).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::TOP | Borders::LEFT)
                .title(Span::styled(title, title_style)),
        ),
        area,
    );
}

fn pct(j: &JobView) -> u64 {
    let p = j.progress;
    if p.total > 0 {
        (u128::from(p.done.min(p.total)) * 100 / u128::from(p.total)) as u64
    } else {
        0
    }
}

/// `███░░░░░░░  31% · 410 MiB/s · ETA 2 s`, or how the job ended.
fn second_line(app: &App, j: &JobView) -> String {
    let bar = |pct: u64| {
        let full = (pct as usize * BAR_W / 100).min(BAR_W);
        format!(
            "   {}{} {pct:>3}%",
            "█".repeat(full),
            "░".repeat(BAR_W - full)
        )
    };
    match &j.state {
        JobState::Running => {
            let mut text = bar(pct(j));
            if j.rate > 0.0 {
                text.push_str(&format!(" · {}/s", human(j.rate as u64)));
            }
            if let Some(eta) = j.eta {
                text.push_str(&format!(" · ETA {}", eta_text(eta.as_secs())));
            }
            text
        }
        // The bytes moved, not the disk gone through: committing a small
        // overlay reads a large disk and copies little.
        JobState::Done if j.progress.total > 0 => {
            format!("{} · {} copied", bar(pct(j)), human(j.progress.copied))
        }
        JobState::Failed(msg) => format!("   {}", app.relativize(msg)),
        JobState::Cancelled if j.progress.total > 0 => format!(
            "   stopped at {}% ({} copied), images left valid",
            pct(j),
            human(j.progress.copied)
        ),
        JobState::Queued => "   waits for a worker or its images".to_string(),
        JobState::Done | JobState::Cancelled => String::new(),
    }
}

/// One job, whole: its label, state, progress and error, wrapped.
pub fn draw_job(app: &App, frame: &mut Frame, area: Rect, id: JobId) {
    let Some(j) = app.jobs.iter().find(|j| j.id == id) else {
        return;
    };
    let width = usize::from(area.width.saturating_sub(6)).min(90);
    let (glyph, style) = glyph(app, &j.state);
    let mut lines = vec![Line::from(Span::styled(
        format!("{glyph} {}", j.state.name()),
        style,
    ))];
    for l in wrap(&j.label, width) {
        lines.push(Line::from(l));
    }
    lines.push(Line::default());
    let p = j.progress;
    if p.total > 0 {
        lines.push(Line::from(format!(
            "{}% of {} gone through · {} copied",
            pct(j),
            human(p.total),
            human(p.copied)
        )));
    }
    if let JobState::Failed(msg) = &j.state {
        lines.push(Line::default());
        for l in wrap(&app.relativize(msg), width) {
            lines.push(Line::from(Span::styled(l, style)));
        }
    }
    let hints: Vec<String> = app
        .keymap
        .footer(Layer::Job)
        .into_iter()
        .map(|h| format!("{} {}", h.keys, h.label))
        .collect();
    let height = (lines.len() as u16 + 2).min(area.height);
    let r = centered(area, width as u16 + 4, height);
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::new()
                .borders(Borders::ALL)
                .title(format!(" job {} ", j.kind))
                .title_bottom(format!(" {} ", hints.join(" · "))),
        ),
        r,
    );
}

fn eta_text(secs: u64) -> String {
    if secs == 0 {
        "<1 s".to_string()
    } else if secs < 60 {
        format!("{secs} s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs / 60 % 60)
    }
}
