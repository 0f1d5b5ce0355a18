//! The jobs pane: two lines per job, newest first. The first names the job
//! and its state; the second shows a progress bar with percent, rate and
//! time left while it runs, or how it ended (a failed job's error text).

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use super::human;
use crate::jobs::JobState;
use crate::tui::app::{App, JobView};

/// Cells of the progress bar.
const BAR_W: usize = 10;

pub fn draw(app: &App, frame: &mut Frame, area: Rect) {
    let t = &app.theme;
    // Two lines per job, below the pane's top border.
    let fits = usize::from(area.height.saturating_sub(1)) / 2;
    // Which job `x` acts on: the selected one, else the newest unfinished.
    let target = app.job_selected.filter(|_| app.jobs_focus).or_else(|| {
        app.jobs
            .iter()
            .rev()
            .find(|j| !j.state.is_finished())
            .map(|j| j.id)
    });
    let mut lines = Vec::new();
    for j in app.jobs.iter().rev().take(fits.max(1)) {
        let (glyph, style) = match &j.state {
            JobState::Queued => ("…", Style::new().fg(t.dim)),
            JobState::Running => ("⟳", Style::new().fg(t.accent)),
            JobState::Done => ("✓", Style::new().fg(t.growing)),
            JobState::Failed(_) => ("✗", Style::new().fg(t.broken)),
            JobState::Cancelled => ("–", Style::new().fg(t.dim)),
        };
        let cursor = if app.jobs_focus && Some(j.id) == target {
            "›"
        } else {
            " "
        };
        // The state before the label, so a long label is what gets cut.
        let mut first = Line::from(vec![
            Span::raw(cursor),
            Span::styled(format!("{glyph} {:<9} {}", j.state.name(), j.label), style),
        ]);
        if app.jobs_focus && Some(j.id) == target {
            first = first.style(Style::new().bg(t.selected).add_modifier(Modifier::BOLD));
        }
        lines.push(first);
        lines.push(second_line(app, j, style));
    }
    let title = if app.jobs_focus {
        " jobs · ↑↓ select · x cancel · Tab/Esc tree ".to_string()
    } else {
        " jobs · x cancel · Tab select ".to_string()
    };
    let title_style = if app.jobs_focus {
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

/// `███░░░░░░░  31% · 410 MiB/s · ETA 2 s`, or how the job ended.
fn second_line(app: &App, j: &JobView, style: Style) -> Line<'static> {
    let (done, total) = j.progress;
    let bar = |pct: u64| {
        let full = (pct as usize * BAR_W / 100).min(BAR_W);
        format!(
            "   {}{} {pct:>3}%",
            "█".repeat(full),
            "░".repeat(BAR_W - full)
        )
    };
    let pct = if total > 0 {
        (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
    } else {
        0
    };
    match &j.state {
        JobState::Running => {
            let mut text = bar(pct);
            if j.rate > 0.0 {
                text.push_str(&format!(" · {}/s", human(j.rate as u64)));
            }
            if let Some(eta) = j.eta {
                text.push_str(&format!(" · ETA {}", eta_text(eta.as_secs())));
            }
            Line::from(Span::styled(text, style))
        }
        JobState::Done if total > 0 => Line::from(Span::styled(
            format!("{} · {} copied", bar(pct), human(done)),
            style,
        )),
        JobState::Failed(msg) => {
            Line::from(Span::styled(format!("   {}", app.relativize(msg)), style))
        }
        JobState::Cancelled if total > 0 => Line::from(Span::styled(
            format!("   stopped at {pct}%, images left valid"),
            style,
        )),
        JobState::Queued => Line::from(Span::styled(
            "   waits for a worker or its images",
            Style::new().fg(app.theme.dim),
        )),
        JobState::Done | JobState::Cancelled => Line::default(),
    }
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
