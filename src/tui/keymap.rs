//! The one table of keys: every action with its default keys and its
//! description. Dispatch, the footer and the `?` help popup all read the
//! same [`Keymap`], and config overrides replace entries in it, so what the
//! screen says is what the keys do.

use std::collections::BTreeMap;
use std::fmt;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Up,
    Down,
    Left,
    Right,
    Fold,
    Filter,
    Sort,
    Clone,
    CloneAs,
    Commit,
    Rebase,
    Flatten,
    Convert,
    CancelJob,
    FocusJobs,
    Rescan,
    Help,
    Quit,
}

/// One row of the table.
pub struct ActionInfo {
    pub action: Action,
    /// The name used in the config file's `[keys]` table.
    pub name: &'static str,
    pub defaults: &'static [&'static str],
    /// Shown in the help popup.
    pub description: &'static str,
    /// Short label for the footer; `None` keeps it out of the footer (the
    /// arrows need no advertising).
    pub footer: Option<&'static str>,
}

pub const ACTIONS: &[ActionInfo] = &[
    ActionInfo {
        action: Action::Up,
        name: "up",
        defaults: &["Up", "k"],
        description: "select the previous image",
        footer: None,
    },
    ActionInfo {
        action: Action::Down,
        name: "down",
        defaults: &["Down", "j"],
        description: "select the next image",
        footer: None,
    },
    ActionInfo {
        action: Action::Left,
        name: "left",
        defaults: &["Left", "h"],
        description: "fold the image, or go to its backing image",
        footer: None,
    },
    ActionInfo {
        action: Action::Right,
        name: "right",
        defaults: &["Right", "l"],
        description: "unfold the image, or go to its first overlay",
        footer: None,
    },
    ActionInfo {
        action: Action::Fold,
        name: "fold",
        defaults: &["Enter", "Space"],
        description: "fold or unfold the overlays of the image",
        footer: None,
    },
    ActionInfo {
        action: Action::Filter,
        name: "filter",
        defaults: &["/"],
        description: "filter by name (type, Enter keeps, Esc clears)",
        footer: Some("filter"),
    },
    ActionInfo {
        action: Action::Sort,
        name: "sort",
        defaults: &["s"],
        description: "sort by name, size or growth",
        footer: Some("sort"),
    },
    ActionInfo {
        action: Action::Clone,
        name: "clone",
        defaults: &["c"],
        description: "clone: new overlay <name>-<n>.qcow2 next to the image",
        footer: Some("clone"),
    },
    ActionInfo {
        action: Action::CloneAs,
        name: "clone_as",
        defaults: &["C"],
        description: "clone, asking for the new image's name",
        footer: None,
    },
    ActionInfo {
        action: Action::Commit,
        name: "commit",
        defaults: &["m"],
        description: "commit the overlay into its backing image (asks first)",
        footer: Some("commit"),
    },
    ActionInfo {
        action: Action::Rebase,
        name: "rebase",
        defaults: &["b"],
        description: "rebase onto another backing (pick in the tree; t types)",
        footer: Some("rebase"),
    },
    ActionInfo {
        action: Action::Flatten,
        name: "flatten",
        defaults: &["f"],
        description: "flatten: copy the chain in, drop the backing (asks)",
        footer: Some("flatten"),
    },
    ActionInfo {
        action: Action::Convert,
        name: "convert",
        defaults: &["v"],
        description: "convert to a new image (format, compression, -B, …)",
        footer: Some("convert"),
    },
    ActionInfo {
        action: Action::CancelJob,
        name: "cancel_job",
        defaults: &["x"],
        description: "cancel the selected job, else the newest unfinished one",
        footer: Some("cancel"),
    },
    ActionInfo {
        action: Action::FocusJobs,
        name: "focus_jobs",
        defaults: &["Tab"],
        description: "focus tree ↔ jobs pane (↑↓ there pick the job x cancels)",
        footer: None,
    },
    ActionInfo {
        action: Action::Rescan,
        name: "rescan",
        defaults: &["r"],
        description: "scan the roots again",
        footer: Some("rescan"),
    },
    ActionInfo {
        action: Action::Help,
        name: "help",
        defaults: &["?"],
        description: "show or hide this help",
        footer: Some("help"),
    },
    ActionInfo {
        action: Action::Quit,
        name: "quit",
        defaults: &["q", "ctrl+c"],
        description: "quit",
        footer: Some("quit"),
    },
];

/// A key as the table knows it. Shift is part of a character (`C`), not a
/// modifier, because terminals disagree on reporting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub code: KeyCode,
    pub ctrl: bool,
    pub alt: bool,
}

impl Key {
    pub fn from_event(ev: &KeyEvent) -> Key {
        Key {
            code: ev.code,
            ctrl: ev.modifiers.contains(KeyModifiers::CONTROL),
            alt: ev.modifiers.contains(KeyModifiers::ALT),
        }
    }

    /// Parse `c`, `C`, `?`, `Enter`, `Space`, `Up`, `F5`, `ctrl+x`,
    /// `alt+Enter`, ... (names are case-insensitive, single characters are
    /// not).
    pub fn parse(s: &str) -> Result<Key, String> {
        let mut ctrl = false;
        let mut alt = false;
        let mut rest = s;
        loop {
            let lower = rest.to_ascii_lowercase();
            if rest.chars().count() > 1
                && (lower.starts_with("ctrl+") || lower.starts_with("ctrl-"))
            {
                ctrl = true;
                rest = &rest[5..];
            } else if rest.chars().count() > 1
                && (lower.starts_with("alt+") || lower.starts_with("alt-"))
            {
                alt = true;
                rest = &rest[4..];
            } else {
                break;
            }
        }
        let mut chars = rest.chars();
        let code = match (chars.next(), chars.next()) {
            (Some(c), None) => KeyCode::Char(c),
            (None, _) => return Err(format!("empty key name in '{s}'")),
            _ => match rest.to_ascii_lowercase().as_str() {
                "enter" | "return" => KeyCode::Enter,
                "space" => KeyCode::Char(' '),
                "esc" | "escape" => KeyCode::Esc,
                "tab" => KeyCode::Tab,
                "backspace" => KeyCode::Backspace,
                "delete" | "del" => KeyCode::Delete,
                "up" => KeyCode::Up,
                "down" => KeyCode::Down,
                "left" => KeyCode::Left,
                "right" => KeyCode::Right,
                "home" => KeyCode::Home,
                "end" => KeyCode::End,
                "pageup" => KeyCode::PageUp,
                "pagedown" => KeyCode::PageDown,
                f if f.starts_with('f') => match f[1..].parse::<u8>() {
                    Ok(n @ 1..=12) => KeyCode::F(n),
                    _ => return Err(format!("unknown key '{s}'")),
                },
                _ => return Err(format!("unknown key '{s}'")),
            },
        };
        if ctrl || alt {
            if let KeyCode::Char(c) = code {
                // Ctrl+C arrives as 'c' with CONTROL whatever the case.
                return Ok(Key {
                    code: KeyCode::Char(c.to_ascii_lowercase()),
                    ctrl,
                    alt,
                });
            }
        }
        Ok(Key { code, ctrl, alt })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ctrl {
            f.write_str("ctrl+")?;
        }
        if self.alt {
            f.write_str("alt+")?;
        }
        match self.code {
            KeyCode::Char(' ') => f.write_str("Space"),
            KeyCode::Char(c) => write!(f, "{c}"),
            KeyCode::Enter => f.write_str("Enter"),
            KeyCode::Esc => f.write_str("Esc"),
            KeyCode::Tab => f.write_str("Tab"),
            KeyCode::Backspace => f.write_str("Backspace"),
            KeyCode::Delete => f.write_str("Delete"),
            KeyCode::Up => f.write_str("↑"),
            KeyCode::Down => f.write_str("↓"),
            KeyCode::Left => f.write_str("←"),
            KeyCode::Right => f.write_str("→"),
            KeyCode::Home => f.write_str("Home"),
            KeyCode::End => f.write_str("End"),
            KeyCode::PageUp => f.write_str("PageUp"),
            KeyCode::PageDown => f.write_str("PageDown"),
            KeyCode::F(n) => write!(f, "F{n}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The table in effect: defaults with the config's overrides applied.
#[derive(Debug, Clone)]
pub struct Keymap {
    bindings: Vec<(Action, Vec<Key>)>,
}

impl Default for Keymap {
    fn default() -> Self {
        Keymap {
            bindings: ACTIONS
                .iter()
                .map(|a| {
                    let keys = a
                        .defaults
                        .iter()
                        .filter_map(|k| Key::parse(k).ok())
                        .collect();
                    (a.action, keys)
                })
                .collect(),
        }
    }
}

impl Keymap {
    /// Apply `[keys]` overrides: action name → one key or a list of keys,
    /// replacing that action's defaults. Unknown actions, unknown key names
    /// and a key bound to two actions are errors.
    pub fn with_overrides(overrides: &BTreeMap<String, Vec<String>>) -> Result<Keymap, String> {
        let mut map = Keymap::default();
        for (name, keys) in overrides {
            let Some(info) = ACTIONS.iter().find(|a| a.name == name) else {
                let known: Vec<&str> = ACTIONS.iter().map(|a| a.name).collect();
                return Err(format!(
                    "[keys]: unknown action '{name}' (known: {})",
                    known.join(", ")
                ));
            };
            if keys.is_empty() {
                return Err(format!("[keys]: '{name}' has no key"));
            }
            let parsed = keys
                .iter()
                .map(|k| Key::parse(k).map_err(|e| format!("[keys] {name}: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(slot) = map.bindings.iter_mut().find(|(a, _)| *a == info.action) {
                slot.1 = parsed;
            }
        }
        for (i, (a, keys)) in map.bindings.iter().enumerate() {
            for k in keys {
                if let Some((b, _)) = map.bindings[i + 1..]
                    .iter()
                    .find(|(_, other)| other.contains(k))
                {
                    return Err(format!(
                        "[keys]: '{k}' is bound to both '{}' and '{}'",
                        info(*a).name,
                        info(*b).name
                    ));
                }
            }
        }
        Ok(map)
    }

    pub fn action_for(&self, key: Key) -> Option<Action> {
        self.bindings
            .iter()
            .find(|(_, keys)| keys.contains(&key))
            .map(|(a, _)| *a)
    }

    pub fn keys(&self, action: Action) -> &[Key] {
        self.bindings
            .iter()
            .find(|(a, _)| *a == action)
            .map_or(&[], |(_, k)| k.as_slice())
    }

    /// `(keys, label)` for the footer, in table order.
    pub fn footer(&self) -> Vec<(String, &'static str)> {
        ACTIONS
            .iter()
            .filter_map(|a| {
                let label = a.footer?;
                let key = self.keys(a.action).first()?;
                Some((key.to_string(), label))
            })
            .collect()
    }

    /// `(all keys, description)` for the help popup, in table order.
    pub fn help(&self) -> Vec<(String, &'static str)> {
        ACTIONS
            .iter()
            .map(|a| {
                let keys: Vec<String> = self.keys(a.action).iter().map(Key::to_string).collect();
                (keys.join(" "), a.description)
            })
            .collect()
    }
}

fn info(action: Action) -> &'static ActionInfo {
    // Every Action has a row: the table is the definition of the enum's
    // meaning, and the tests below check it.
    ACTIONS
        .iter()
        .find(|a| a.action == action)
        .unwrap_or(&ACTIONS[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_key_parses_and_is_unique() {
        let map = Keymap::with_overrides(&BTreeMap::new()).expect("defaults are consistent");
        for a in ACTIONS {
            assert_eq!(map.keys(a.action).len(), a.defaults.len(), "{}", a.name);
        }
    }

    #[test]
    fn overrides_replace_defaults_and_conflicts_are_errors() {
        let mut o = BTreeMap::new();
        o.insert("clone".to_string(), vec!["n".to_string()]);
        let map = Keymap::with_overrides(&o).expect("valid override");
        let n = Key::parse("n").expect("key");
        let c = Key::parse("c").expect("key");
        assert_eq!(map.action_for(n), Some(Action::Clone));
        assert_eq!(map.action_for(c), None);
        assert!(map.footer().contains(&("n".to_string(), "clone")));

        o.insert("quit".to_string(), vec!["n".to_string()]);
        let err = Keymap::with_overrides(&o).expect_err("conflict");
        assert!(err.contains("bound to both"), "{err}");

        let mut bad = BTreeMap::new();
        bad.insert("explode".to_string(), vec!["x".to_string()]);
        let err = Keymap::with_overrides(&bad).expect_err("unknown action");
        assert!(err.contains("unknown action 'explode'"), "{err}");
    }

    #[test]
    fn key_names() {
        let k = Key::parse("ctrl+C").expect("key");
        assert_eq!(
            k,
            Key {
                code: KeyCode::Char('c'),
                ctrl: true,
                alt: false
            }
        );
        assert_eq!(Key::parse("Space").expect("key").code, KeyCode::Char(' '));
        assert_eq!(Key::parse("F5").expect("key").code, KeyCode::F(5));
        assert!(Key::parse("Hyper").is_err());
        assert!(Key::parse("").is_err());
    }
}
