//! The details pane (the selected image: header facts, chain, which layer
//! serves how much of the disk, snapshots, features, holders, the space its
//! tree saves).

use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;

use super::{human, percent};
use crate::catalog::Flag;
use crate::engine::ops::info::BitmapInfo;
use crate::engine::qcow2::snapshot::Snapshot;
use crate::engine::LockState;
use crate::tui::app::{file_name, App};
use crate::tui::dialog::snapshot::taken;
use crate::tui::keymap::{Action, Layer};
use crate::tui::worker::Details;

/// One glyph per layer depth (top first), then the empty part: the bar
/// says with shapes what the colours say.
const LAYER_GLYPHS: [char; 4] = ['█', '▓', '▒', '▚'];
const EMPTY_GLYPH: char = '░';
const LAYER_COLOURS: [Color; 4] = [Color::Green, Color::Cyan, Color::Magenta, Color::Blue];

fn pane(title: String) -> Block<'static> {
    Block::new().borders(Borders::TOP).title(title)
}

pub fn draw(app: &App, frame: &mut Frame, area: Rect) {
    let dim = Style::new().fg(app.theme.dim);
    let Some(id) = app.selected_node() else {
        frame.render_widget(pane(" details ".into()), area);
        return;
    };
    let node = &app.forest.nodes[id];
    let r = &node.record;
    // The whole path, its root as given: the tree may show only the
    // file name.
    let block = pane(format!(" {} ", r.location()));
    let inner_w = usize::from(area.width).saturating_sub(1);
    let mut lines: Vec<Line> = Vec::new();
    if let Some(reason) = node.flags.iter().find_map(|f| match f {
        Flag::Skipped { reason } => Some(reason),
        _ => None,
    }) {
        lines.push(Line::from(Span::styled(
            format!(" · not shown as an image: {reason}"),
            dim,
        )));
        lines.push(Line::from(format!(
            " {} on disk, {} long",
            human(r.sizes.allocated),
            human(r.sizes.apparent)
        )));
        frame.render_widget(Paragraph::new(lines).block(block), area);
        return;
    }

    let d = app.details.as_ref().filter(|d| d.key == r.key);
    match d.map(|d| &d.info) {
        Some(Ok(info)) => {
            let mut facts = vec![info.format.name().to_string()];
            if let Some(q) = &info.qcow2 {
                facts[0] = format!("qcow2 v{}", q.version);
                facts.push(format!("{} clusters", human(q.cluster_size)));
                facts.push(q.compression_type.name().to_string());
            }
            facts.push(format!("virtual {}", human(info.virtual_size)));
            // The tree's own figure, with its words: the file's size on
            // disk over the virtual size (metadata included), not the
            // share of the disk the image serves (the bar below).
            facts.push(format!(
                "on disk {} ({} of virtual)",
                human(r.sizes.allocated),
                percent(r.sizes.allocated, r.sizes.virtual_size)
            ));
            lines.push(Line::from(format!(" {}", facts.join(" · "))));
        }
        Some(Err(e)) => lines.push(Line::from(Span::styled(
            format!(" ✗ {}", app.relativize(e)),
            Style::new().fg(app.theme.broken),
        ))),
        // Another host's chain is not read from here (only the catalog's
        // facts come over the connection).
        None if r.host.is_some() => lines.push(Line::from(Span::styled(
            format!(
                " on {}: {} · virtual {} · on disk {}",
                r.host.as_deref().unwrap_or_default(),
                r.summary.as_ref().map_or("?", |s| s.format.name()),
                human(r.sizes.virtual_size),
                human(r.sizes.allocated)
            ),
            dim,
        ))),
        None => lines.push(Line::from(Span::styled(" reading…", dim))),
    }
    if let Some(d) = d {
        chain_lines(app, d, inner_w, &mut lines);
        if let Some(Ok(info)) = Some(&d.info) {
            let features = info.qcow2.as_ref().map_or_else(Vec::new, |q| {
                let mut f = Vec::new();
                if q.lazy_refcounts {
                    f.push("lazy_refcounts".to_string());
                }
                if q.extended_l2 {
                    f.push("extended_l2".to_string());
                }
                if q.dirty {
                    f.push("dirty".to_string());
                }
                if q.corrupt {
                    f.push("corrupt".to_string());
                }
                if q.data_file.is_some() {
                    f.push("data_file".to_string());
                }
                if !q.bitmaps.is_empty() {
                    f.push(format!("{} bitmaps", q.bitmaps.len()));
                }
                if q.refcount_bits != 16 {
                    f.push(format!("refcount_bits={}", q.refcount_bits));
                }
                f
            });
            let features = if features.is_empty() {
                "features none".to_string()
            } else {
                format!("features {}", features.join(", "))
            };
            lines.push(Line::from(format!(" {features}")));
        }
    }
    // From the catalog record: no need to wait for the inspector.
    let held = match (r.lock, r.holders.as_slice()) {
        (LockState::None, _) => "held by nobody".to_string(),
        (l, []) => format!("held by an unknown process ({})", lock_word(l)),
        (l, hs) => {
            let who: Vec<String> = hs
                .iter()
                .map(|h| format!("{} (pid {})", h.command, h.pid))
                .collect();
            format!("held by {}, {}", who.join(", "), lock_word(l))
        }
    };
    let held_style = if r.lock == LockState::None {
        Style::new()
    } else {
        Style::new().fg(app.theme.in_use)
    };
    lines.push(Line::from(Span::styled(format!(" {held}"), held_style)));
    if !r.seen_on.is_empty() {
        let also: Vec<String> = r
            .seen_on
            .iter()
            .map(|(h, p)| format!("{h}:{}", p.display()))
            .collect();
        lines.push(Line::from(format!(
            " shared: also {} (jobs run on {}, after asking the others)",
            also.join(", "),
            r.host.as_deref().unwrap_or("this machine")
        )));
    }
    // Another host's domains came with the image (their disks did not).
    for v in &r.vms {
        lines.push(Line::from(Span::styled(
            format!(" vm {} ({}, {})", v.name, v.state, v.connection),
            Style::new().fg(app.theme.in_use),
        )));
    }
    // The domains using it, each with its disks (this file marked).
    for d in app
        .inventory
        .users_of(r.dev_ino)
        .filter(|_| r.host.is_none())
    {
        lines.push(Line::from(Span::styled(
            format!(" vm {} ({}, {})", d.name, d.state, d.connection),
            Style::new().fg(app.theme.in_use),
        )));
        for disk in &d.disks {
            let files: Vec<String> = disk
                .chain
                .iter()
                .map(|f| {
                    let mark = if f.id == Some(r.dev_ino) { "▸" } else { "" };
                    format!("{mark}{}", app.display_path(&f.path))
                })
                .collect();
            lines.push(Line::from(format!(
                "    {} {}: {}",
                disk.device,
                disk.target,
                if files.is_empty() {
                    "empty".to_string()
                } else {
                    files.join(" → ")
                }
            )));
        }
    }
    if app.forest.is_protected(id) {
        lines.push(Line::from(format!(
            " ⊘ protected: no write bit on disk, so nothing opens it for writing by mistake ({} \
             toggles)",
            app.keymap.keys_text(
                crate::tui::keymap::Layer::Tree,
                crate::tui::keymap::Action::Protect
            )
        )));
    }
    let root = app.forest.root_of(id);
    let space = app.forest.space(root);
    let count = app.forest.walk(root).len();
    lines.push(Line::from(format!(
        " tree of {}: {} image{} · {} used · {} as full copies · {} saved",
        file_name(&app.forest.nodes[root].record.path),
        count,
        if count == 1 { "" } else { "s" },
        human(space.used),
        human(space.full_copies),
        human(space.saved()),
    )));
    // Last: the pane's other lines stay in view when it is short.
    if let Some(Ok(info)) = d.map(|d| &d.info) {
        if let Some(q) = &info.qcow2 {
            snapshot_lines(app, &q.snapshots, &mut lines);
            bitmap_lines(app, &q.bitmaps, &mut lines);
        }
    }
    for f in &node.flags {
        let red = f.is_broken() || f.is_alarm();
        let style = if red {
            Style::new().fg(app.theme.broken)
        } else {
            Style::new().fg(app.theme.warning)
        };
        let glyph = if red { "✗" } else { "!" };
        lines.insert(
            1,
            Line::from(Span::styled(format!(" {glyph} {}", f.describe()), style)),
        );
    }
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// Snapshots shown in the pane; the dialog (`S`) lists them all.
const SNAPSHOT_ROWS: usize = 3;

/// The snapshots section: how many, the key that opens the dialog, the
/// newest few (id, name, age).
fn snapshot_lines(app: &App, snaps: &[Snapshot], lines: &mut Vec<Line<'static>>) {
    let key = app
        .keymap
        .keys(Layer::Tree, Action::Snapshots)
        .first()
        .map_or_else(String::new, |k| format!(" ({k}: create, apply, delete)"));
    if snaps.is_empty() {
        lines.push(Line::from(format!(" snapshots none{key}")));
        return;
    }
    lines.push(Line::from(format!(" snapshots {}{key}", snaps.len())));
    let shown = snaps.len().saturating_sub(SNAPSHOT_ROWS);
    if shown > 0 {
        lines.push(Line::from(Span::styled(
            format!("   … {shown} older"),
            Style::new().fg(app.theme.dim),
        )));
    }
    for s in &snaps[shown..] {
        lines.push(Line::from(format!(
            "   {:<4} {} · {}",
            s.id,
            s.name,
            taken(s)
        )));
    }
}

/// The persistent bitmaps (only when there are some), on one line: the
/// pane is short. Each: name, granularity, whether it records writes,
/// and the in-use flag of one QEMU did not store back (its contents
/// cannot be trusted; it can only be removed).
fn bitmap_lines(app: &App, bitmaps: &[BitmapInfo], lines: &mut Vec<Line<'static>>) {
    if bitmaps.is_empty() {
        return;
    }
    let mut spans = vec![Span::raw(format!(" bitmaps {}:", bitmaps.len()))];
    for (i, b) in bitmaps.iter().enumerate() {
        let recording = if b.auto { "enabled" } else { "disabled" };
        let sep = if i == 0 { " " } else { " · " };
        spans.push(Span::raw(format!(
            "{sep}{} {} {recording}",
            b.name,
            human(b.granularity)
        )));
        if b.in_use {
            spans.push(Span::styled(
                ", in use (inconsistent)",
                Style::new().fg(app.theme.warning),
            ));
        }
    }
    lines.push(Line::from(spans));
}

fn lock_word(l: LockState) -> &'static str {
    match l {
        LockState::None => "not in use",
        LockState::Reader => "read-only",
        LockState::Writer => "read-write",
    }
}

/// `chain a → b`, the bar of who serves the disk, and its legend.
fn chain_lines(app: &App, d: &Details, width: usize, lines: &mut Vec<Line<'static>>) {
    if let Some(e) = &d.chain_error {
        lines.push(Line::from(Span::styled(
            format!(" ✗ chain: {}", app.relativize(e)),
            Style::new().fg(app.theme.broken),
        )));
    }
    if d.chain.is_empty() {
        return;
    }
    let names: Vec<String> = d.chain.iter().map(|p| file_name(p)).collect();
    lines.push(Line::from(format!(" chain  {}", names.join(" → "))));
    let total: u64 = d.served.iter().sum::<u64>() + d.empty;
    if total == 0 {
        return;
    }
    let bar_w = width.saturating_sub(9).max(10);
    // Every part with bytes gets at least one cell, so a small top layer
    // still shows; the empty part absorbs rounding.
    let mut cells: Vec<(usize, usize)> = Vec::new();
    let mut used = 0;
    for (depth, &bytes) in d.served.iter().enumerate() {
        if bytes > 0 {
            let n = ((bytes as u128 * bar_w as u128 / total as u128) as usize).max(1);
            cells.push((depth, n));
            used += n;
        }
    }
    let mut spans = vec![Span::raw(" serves ")];
    for &(depth, n) in &cells {
        let i = depth.min(LAYER_GLYPHS.len() - 1);
        spans.push(Span::styled(
            LAYER_GLYPHS[i].to_string().repeat(n),
            Style::new().fg(LAYER_COLOURS[i]),
        ));
    }
    let empty_n = bar_w.saturating_sub(used);
    spans.push(Span::styled(
        EMPTY_GLYPH.to_string().repeat(empty_n),
        Style::new().fg(app.theme.dim),
    ));
    lines.push(Line::from(spans));
    let pct = |b: u64| percent(b, total);
    let mut legend = vec![Span::raw("        ")];
    for (depth, &bytes) in d.served.iter().enumerate() {
        let i = depth.min(LAYER_GLYPHS.len() - 1);
        legend.push(Span::styled(
            format!("{} ", LAYER_GLYPHS[i]),
            Style::new().fg(LAYER_COLOURS[i]),
        ));
        legend.push(Span::raw(format!(
            "{} {} · ",
            names.get(depth).map_or("?", String::as_str),
            pct(bytes)
        )));
    }
    legend.push(Span::styled(
        format!("{EMPTY_GLYPH} "),
        Style::new().fg(app.theme.dim),
    ));
    legend.push(Span::raw(format!("empty {} of the disk", pct(d.empty))));
    lines.push(Line::from(legend));
}
