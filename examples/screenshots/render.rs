//! A ratatui buffer as SVG, and SVG as PNG, with the DejaVu Sans Mono fonts
//! shipped in `assets/fonts/` and nothing else: no system font is ever
//! looked up (resvg is built without its `system-fonts` feature), so the
//! same buffer gives the same PNG bytes on any machine.
//!
//! Shared by `examples/screenshots` and `tests/screenshots.rs` (by path).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use ratatui::buffer::{Buffer, Cell};
use ratatui::style::{Color, Modifier};
use resvg::{tiny_skia, usvg};
use skrifa::prelude::{FontRef, LocationRef, MetadataProvider, Size};

/// The font's family name, as written into the SVG.
pub const FAMILY: &str = "DejaVu Sans Mono";
/// Pixels per em. With DejaVu Sans Mono's advance (1233/2048 em) a cell is
/// about 10 px wide, readable at the size a README shows it.
pub const FONT_SIZE: f32 = 16.6;

/// The terminal's default colours: what `Color::Reset` means here.
const DEFAULT_FG: &str = "#d8dadc";
const DEFAULT_BG: &str = "#1c1e22";

pub fn fonts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/fonts")
}

/// The shipped fonts: regular and bold.
pub struct Fonts {
    pub regular: Vec<u8>,
    pub bold: Vec<u8>,
}

/// The grid, from the regular face's metrics: every cell is one advance
/// wide and one line (ascent + descent) high, so box-drawing and block
/// glyphs, which span exactly that box, join up across cells.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub cell_w: f32,
    pub cell_h: f32,
    /// From a cell's top to the text baseline.
    pub baseline: f32,
}

impl Fonts {
    pub fn load() -> std::io::Result<Fonts> {
        let dir = fonts_dir();
        Ok(Fonts {
            regular: std::fs::read(dir.join("DejaVuSansMono.ttf"))?,
            bold: std::fs::read(dir.join("DejaVuSansMono-Bold.ttf"))?,
        })
    }

    pub fn grid(&self) -> Grid {
        let font = FontRef::new(&self.regular).expect("DejaVuSansMono.ttf parses");
        let size = Size::new(FONT_SIZE);
        let m = font.metrics(size, LocationRef::default());
        let gid = font.charmap().map('M').expect("the font has an M");
        let advance = font
            .glyph_metrics(size, LocationRef::default())
            .advance_width(gid)
            .expect("M has an advance");
        Grid {
            cell_w: advance,
            cell_h: m.ascent - m.descent,
            baseline: m.ascent,
        }
    }

    /// Symbols in `buf` that a face (regular, or bold for bold cells) has
    /// no glyph for: they would come out as boxes ("tofu").
    pub fn missing_glyphs(&self, buf: &Buffer) -> Vec<char> {
        let regular = FontRef::new(&self.regular).expect("regular font parses");
        let bold = FontRef::new(&self.bold).expect("bold font parses");
        let mut missing = Vec::new();
        for cell in &buf.content {
            let face = if cell.modifier.contains(Modifier::BOLD) {
                &bold
            } else {
                &regular
            };
            for c in cell.symbol().chars() {
                if !c.is_whitespace() && face.charmap().map(c).is_none() && !missing.contains(&c) {
                    missing.push(c);
                }
            }
        }
        missing
    }

    /// usvg options that know these two faces and no other font.
    fn options(&self) -> usvg::Options<'static> {
        let mut opt = usvg::Options {
            font_family: FAMILY.to_string(),
            ..usvg::Options::default()
        };
        let db = opt.fontdb_mut();
        db.load_font_data(self.regular.clone());
        db.load_font_data(self.bold.clone());
        db.set_monospace_family(FAMILY);
        opt
    }
}

/// A colour as an SVG fill; `None` for `Reset` (the default).
fn rgb(c: Color) -> Option<String> {
    // A fixed palette (a dark terminal theme), so the pictures do not
    // depend on anyone's terminal settings.
    let hex = match c {
        Color::Reset => return None,
        Color::Black => "#2a2d33",
        Color::Red => "#e06c75",
        Color::Green => "#98c379",
        Color::Yellow => "#e5c07b",
        Color::Blue => "#61afef",
        Color::Magenta => "#c678dd",
        Color::Cyan => "#56b6c2",
        Color::Gray => "#a4a9b1",
        Color::DarkGray => "#3e4451",
        Color::LightRed => "#ff8b94",
        Color::LightGreen => "#b5e890",
        Color::LightYellow => "#ffd98e",
        Color::LightBlue => "#8cc8ff",
        Color::LightMagenta => "#e2a0f5",
        Color::LightCyan => "#7fd8e3",
        Color::White => "#f0f2f4",
        Color::Rgb(r, g, b) => return Some(format!("#{r:02x}{g:02x}{b:02x}")),
        Color::Indexed(i) => return Some(indexed(i)),
    };
    Some(hex.to_string())
}

/// xterm's 256-colour cube and grey ramp; 0-15 as the named colours.
fn indexed(i: u8) -> String {
    const NAMED: [Color; 16] = [
        Color::Black,
        Color::Red,
        Color::Green,
        Color::Yellow,
        Color::Blue,
        Color::Magenta,
        Color::Cyan,
        Color::Gray,
        Color::DarkGray,
        Color::LightRed,
        Color::LightGreen,
        Color::LightYellow,
        Color::LightBlue,
        Color::LightMagenta,
        Color::LightCyan,
        Color::White,
    ];
    match i {
        0..=15 => rgb(NAMED[usize::from(i)]).expect("named colours have an rgb"),
        16..=231 => {
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            let j = i - 16;
            format!(
                "#{:02x}{:02x}{:02x}",
                level(j / 36),
                level(j / 6 % 6),
                level(j % 6)
            )
        }
        _ => {
            let v = 8 + (i - 232) * 10;
            format!("#{v:02x}{v:02x}{v:02x}")
        }
    }
}

/// A cell's (foreground, background) after REVERSED, default colours
/// filled in for the foreground only (a default background is not drawn).
fn colours(cell: &Cell) -> (String, Option<String>) {
    let (fg, bg) = (rgb(cell.fg), rgb(cell.bg));
    if cell.modifier.contains(Modifier::REVERSED) {
        (
            bg.unwrap_or_else(|| DEFAULT_BG.to_string()),
            Some(fg.unwrap_or_else(|| DEFAULT_FG.to_string())),
        )
    } else {
        (fg.unwrap_or_else(|| DEFAULT_FG.to_string()), bg)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Cells with something to draw: not blank and not the hidden half of a
/// wide glyph (ratatui leaves those empty).
pub fn is_ink(cell: &Cell) -> bool {
    let s = cell.symbol();
    !s.is_empty() && !s.chars().all(char::is_whitespace)
}

/// The buffer as SVG: the default background, one rectangle per run of
/// cells with the same other background, then one `<text>` per cell with
/// ink at its grid position. Placing every glyph itself (rather than runs
/// of text) keeps the grid exact whatever the font's shaping does.
pub fn svg(buf: &Buffer, grid: Grid) -> String {
    let area = buf.area;
    let (w, h) = (
        f32::from(area.width) * grid.cell_w,
        f32::from(area.height) * grid.cell_h,
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" viewBox="0 0 {w:.0} {h:.0}">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="{DEFAULT_BG}"/>"#
    );
    // Backgrounds: crisp edges, so adjacent runs leave no seams.
    let _ = writeln!(out, r#"<g shape-rendering="crispEdges">"#);
    for y in 0..area.height {
        let mut x = 0;
        while x < area.width {
            let (_, bg) = colours(&buf[(area.x + x, area.y + y)]);
            let start = x;
            while x < area.width && colours(&buf[(area.x + x, area.y + y)]).1 == bg {
                x += 1;
            }
            if let Some(bg) = bg {
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="{:.2}" fill="{bg}"/>"#,
                    f32::from(start) * grid.cell_w,
                    f32::from(y) * grid.cell_h,
                    f32::from(x - start) * grid.cell_w,
                    grid.cell_h,
                );
            }
        }
    }
    let _ = writeln!(out, "</g>");
    let _ = writeln!(out, r#"<g font-family="{FAMILY}" font-size="{FONT_SIZE}">"#);
    for y in 0..area.height {
        for x in 0..area.width {
            let cell = &buf[(area.x + x, area.y + y)];
            if !is_ink(cell) {
                continue;
            }
            let (fg, _) = colours(cell);
            let mut attrs = String::new();
            if cell.modifier.contains(Modifier::BOLD) {
                attrs.push_str(r#" font-weight="bold""#);
            }
            if cell.modifier.contains(Modifier::DIM) {
                attrs.push_str(r#" fill-opacity="0.6""#);
            }
            let _ = writeln!(
                out,
                r#"<text x="{:.2}" y="{:.2}" fill="{fg}"{attrs}>{}</text>"#,
                f32::from(x) * grid.cell_w,
                f32::from(y) * grid.cell_h + grid.baseline,
                escape(cell.symbol()),
            );
            if cell.modifier.contains(Modifier::UNDERLINED) {
                let _ = writeln!(
                    out,
                    r#"<rect x="{:.2}" y="{:.2}" width="{:.2}" height="1" fill="{fg}"/>"#,
                    f32::from(x) * grid.cell_w,
                    f32::from(y) * grid.cell_h + grid.baseline + 2.0,
                    grid.cell_w,
                );
            }
        }
    }
    let _ = writeln!(out, "</g>");
    out.push_str("</svg>\n");
    out
}

/// Rasterise `svg` with only the shipped fonts; PNG bytes.
pub fn png(svg: &str, fonts: &Fonts) -> Result<Vec<u8>, String> {
    let opt = fonts.options();
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| format!("bad SVG: {e}"))?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| "empty picture".to_string())?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| format!("PNG: {e}"))
}
