//! Colours in one struct. Colour always repeats what a glyph or a word
//! already says (STYLE.md), so a monochrome terminal loses nothing.

use std::str::FromStr;

use ratatui::style::Color;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    /// Broken chains, cycles, failed jobs.
    pub broken: Color,
    /// Problems that do not stop QEMU (backing format not recorded, ...).
    pub warning: Color,
    /// Images held open by a QEMU.
    pub in_use: Color,
    /// Growing images and finished jobs.
    pub growing: Color,
    /// Titles, the header, keys in the footer.
    pub accent: Color,
    /// Background of the selected row.
    pub selected: Color,
    /// Secondary text.
    pub dim: Color,
}

impl Default for Theme {
    fn default() -> Self {
        Theme {
            broken: Color::Red,
            warning: Color::Yellow,
            in_use: Color::Yellow,
            growing: Color::Green,
            accent: Color::Cyan,
            selected: Color::DarkGray,
            dim: Color::Gray,
        }
    }
}

/// The `[theme]` table: every field optional, unknown ones refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThemeFile {
    broken: Option<String>,
    warning: Option<String>,
    in_use: Option<String>,
    growing: Option<String>,
    accent: Option<String>,
    selected: Option<String>,
    dim: Option<String>,
}

impl ThemeFile {
    pub fn resolve(&self) -> Result<Theme, String> {
        let mut t = Theme::default();
        let fields = [
            ("broken", &self.broken, &mut t.broken),
            ("warning", &self.warning, &mut t.warning),
            ("in_use", &self.in_use, &mut t.in_use),
            ("growing", &self.growing, &mut t.growing),
            ("accent", &self.accent, &mut t.accent),
            ("selected", &self.selected, &mut t.selected),
            ("dim", &self.dim, &mut t.dim),
        ];
        for (name, value, slot) in fields {
            if let Some(v) = value {
                *slot = Color::from_str(v).map_err(|_| {
                    format!(
                        "[theme] {name}: '{v}' is not a colour (a name like \"red\" or \
                         \"light-blue\", \"#rrggbb\", or an index 0-255)"
                    )
                })?;
            }
        }
        Ok(t)
    }
}
