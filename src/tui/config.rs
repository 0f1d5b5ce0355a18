//! The config file (TOML): roots, key overrides, theme. A wrong file is an
//! error at start, naming the file and the problem; nothing is silently
//! ignored (STYLE.md: config files silently ignored are a known pitfall).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::keymap::{default_config_keys, Keymap, Overrides};
use super::theme::{Theme, ThemeFile};
use crate::catalog::doctor::DoctorOptions;

/// What `assets/config.toml` holds: [`default_config`], checked by a test.
pub const DEFAULT_CONFIG: &str = include_str!("../../assets/config.toml");

const HEADER: &str = "\
# cowshed configuration (TOML). Generated from the key table by
# `cowshed default-config`: every setting, commented out with its default.
#
# cowshed reads $XDG_CONFIG_HOME/cowshed/config.toml (or
# ~/.config/cowshed/config.toml), or the file given with --config FILE.
# Every setting is optional. Unknown settings and bad values stop cowshed
# at start with a message naming the problem: nothing here is silently
# ignored.

# Directories to scan when none are given on the command line. Relative
# paths are relative to this file.
# roots = [\"/var/lib/libvirt/images\", \"vms\"]

# libvirt connections whose defined domains (running or shut off) guard
# the images they use: shown in the tree, refused as targets of rm, reset,
# mv, commit, rebase and resize. Unset: qemu:///system and qemu:///session,
# each where its daemon runs. A connection named here that cannot be read
# is reported, and writes are refused until --force-vms says otherwise.
# libvirt = [\"qemu:///system\", \"qemu+ssh://host/system\"]

# Change nothing: commands that would write are refused, and the terminal
# UI's action keys are disabled (as --readonly does).
# readonly = false

# Keys, one table per layer (a mode of the screen, or a part of one that
# has keys of its own). A line names an action and one key or a list of
# keys, which replace that action's default keys in that layer only; a
# layer may be changed without touching the others. Key names: a single
# character (\"c\", \"C\", \"?\"), Enter, Space, Esc, Tab, BackTab,
# Backspace, Delete, Up, Down, Left, Right, Home, End, PageUp, PageDown,
# F1..F12, optionally prefixed with ctrl+ or alt+. A key that would mean two
# things in one mode is an error. Where text is typed (a filter, a name),
# plain characters are typed: bind actions there to other keys. Lines
# directly under [keys] (no layer) are taken as [keys.tree].
";

const THEME: &str = "
[theme]
# Colour names (red, light-blue, dark-gray, ...), \"#rrggbb\" or an index
# 0-255. Colour only repeats what a glyph or word already says.
# broken = \"red\"
# warning = \"yellow\"
# in_use = \"yellow\"
# growing = \"green\"
# accent = \"cyan\"
# selected = \"dark-gray\"
# dim = \"gray\"
";

/// The full default config file, generated from the key table: what
/// `cowshed default-config` prints and `assets/config.toml` holds.
pub fn default_config() -> String {
    format!(
        "{HEADER}{}{THEME}{}",
        default_config_keys(),
        doctor_section()
    )
}

fn doctor_section() -> String {
    format!(
        "
[doctor]
# Chains in which an image reads through more than this many backing
# files are reported by `cowshed doctor` (which --max-depth overrides) and
# the doctor of the terminal UI (!). At least 1.
# max_depth = {}
",
        crate::catalog::doctor::DEFAULT_MAX_DEPTH
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    roots: Vec<PathBuf>,
    #[serde(default)]
    keys: BTreeMap<String, KeyEntry>,
    #[serde(default)]
    theme: ThemeFile,
    #[serde(default)]
    doctor: DoctorFile,
    #[serde(default)]
    libvirt: Vec<String>,
    #[serde(default)]
    readonly: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DoctorFile {
    max_depth: Option<usize>,
}

/// `quit = "q"` or `quit = ["q", "ctrl+c"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeySpec {
    One(String),
    Many(Vec<String>),
}

impl KeySpec {
    fn keys(self) -> Vec<String> {
        match self {
            KeySpec::One(s) => vec![s],
            KeySpec::Many(v) => v,
        }
    }
}

/// Under `[keys]`: a layer's table, or (the first form of the file) an
/// action of the tree.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeyEntry {
    Action(KeySpec),
    Layer(BTreeMap<String, KeySpec>),
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Roots from the file, used when none are given on the command line.
    pub roots: Vec<PathBuf>,
    pub keymap: Keymap,
    pub theme: Theme,
    /// The chain doctor's settings (`[doctor]`).
    pub doctor: DoctorOptions,
    /// libvirt connections to read (empty: the default set).
    pub libvirt: Vec<String>,
    /// Nothing is written (`readonly = true`).
    pub readonly: bool,
}

impl Config {
    /// Parse a config's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, String> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| format!("{}: {}", origin.display(), e))?;
        let mut keys = Overrides::new();
        for (name, entry) in file.keys {
            match entry {
                KeyEntry::Action(spec) => {
                    keys.entry("tree".to_string())
                        .or_default()
                        .insert(name, spec.keys());
                }
                KeyEntry::Layer(actions) => {
                    let layer = keys.entry(name).or_default();
                    for (action, spec) in actions {
                        layer.insert(action, spec.keys());
                    }
                }
            }
        }
        let keymap =
            Keymap::with_overrides(&keys).map_err(|e| format!("{}: {e}", origin.display()))?;
        let theme = file
            .theme
            .resolve()
            .map_err(|e| format!("{}: {e}", origin.display()))?;
        // Relative roots in a config file mean relative to the file, not to
        // wherever cowshed happens to be started.
        let base = origin.parent().unwrap_or(Path::new("."));
        let roots = file
            .roots
            .into_iter()
            .map(|r| {
                // `host1:/srv/images` names another host: kept as written.
                let remote = matches!(
                    crate::remote::Root::parse(&r),
                    crate::remote::Root::Remote { .. }
                );
                if r.is_absolute() || remote {
                    r
                } else {
                    base.join(r)
                }
            })
            .collect();
        let mut doctor = DoctorOptions::default();
        match file.doctor.max_depth {
            Some(0) => {
                return Err(format!(
                    "{}: [doctor] max_depth must be at least 1",
                    origin.display()
                ))
            }
            Some(n) => doctor.max_depth = n,
            None => {}
        }
        Ok(Config {
            roots,
            keymap,
            theme,
            doctor,
            libvirt: file.libvirt,
            readonly: file.readonly,
        })
    }

    /// Load `explicit` (it must exist), else the XDG config file if there is
    /// one, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, String> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_path() {
                Some(p) if p.exists() => p,
                _ => return Ok(Config::default()),
            },
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        Config::parse(&text, &path)
    }
}

/// `$XDG_CONFIG_HOME/cowshed/config.toml`, else
/// `~/.config/cowshed/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if Path::new(&x).is_absolute() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".config"),
    };
    Some(base.join("cowshed").join("config.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::style::Color;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/cowshed/test.toml"))
    }

    /// The shipped file is the generated one: a key added to the table
    /// shows up there (regenerate with `cargo run -- default-config >
    /// assets/config.toml`).
    #[test]
    fn shipped_default_config_is_generated_from_the_key_table() {
        assert!(
            DEFAULT_CONFIG == default_config(),
            "assets/config.toml is stale: run `cargo run -- default-config > assets/config.toml`"
        );
        for a in crate::tui::keymap::ACTIONS {
            assert!(
                DEFAULT_CONFIG.contains(&format!("[keys.{}]", a.layer.name())),
                "{}",
                a.layer.name()
            );
        }
    }

    #[test]
    fn shipped_default_config_parses_to_the_defaults() {
        let c = parse(DEFAULT_CONFIG).expect("assets/config.toml parses");
        assert_eq!(c.theme, Theme::default());
        assert_eq!(
            format!("{:?}", c.keymap),
            format!("{:?}", Keymap::default())
        );
    }

    /// Every commented setting in the shipped file, uncommented, is valid
    /// and (roots aside) says what the built-in defaults say.
    #[test]
    fn shipped_default_config_uncommented_is_the_defaults() {
        let text: String = DEFAULT_CONFIG
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
                {
                    rest
                }
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(text.contains("\nclone = \"c\"\n"), "{text}");
        assert!(text.contains("\n[keys.convert]\n"), "{text}");
        let c = parse(&text).expect("uncommented assets/config.toml parses");
        assert_eq!(c.theme, Theme::default());
        assert_eq!(
            format!("{:?}", c.keymap),
            format!("{:?}", Keymap::default())
        );
        assert_eq!(c.roots.len(), 2);
    }

    #[test]
    fn overrides_and_relative_roots() {
        let c = parse(
            "roots = [\"vms\", \"/abs\", \"host1:/srv/images\"]\n[keys]\nclone = \"n\"\nquit = [\"Q\", \"ctrl+q\"]\n\
             [keys.confirm]\nyes = \"o\"\n[theme]\nbroken = \"#ff0000\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.keymap
                .hint(
                    crate::tui::keymap::Layer::Confirm,
                    crate::tui::keymap::Action::Yes,
                    None
                )
                .keys,
            "o"
        );
        assert_eq!(
            c.roots,
            vec![
                PathBuf::from("/etc/cowshed/vms"),
                PathBuf::from("/abs"),
                PathBuf::from("host1:/srv/images")
            ]
        );
        assert_eq!(c.theme.broken, Color::Rgb(255, 0, 0));
        let last = c.keymap.footer(crate::tui::keymap::Layer::Tree);
        let last = last.last().expect("a footer");
        assert_eq!((last.keys.as_str(), last.label.as_str()), ("Q", "quit"));
    }

    #[test]
    fn wrong_files_are_errors_naming_the_problem() {
        let e = parse("root = [\"x\"]").expect_err("unknown top-level key");
        assert!(e.contains("test.toml") && e.contains("root"), "{e}");
        let e = parse("[theme]\nbroken = \"blood\"").expect_err("bad colour");
        assert!(e.contains("broken") && e.contains("blood"), "{e}");
        let e = parse("[theme]\nbackground = \"red\"").expect_err("unknown theme key");
        assert!(e.contains("background"), "{e}");
        let e = parse("[keys]\nclone = \"Hyper\"").expect_err("bad key");
        assert!(e.contains("unknown key 'Hyper'"), "{e}");
        let e = parse("[keys]\nclown = \"c\"").expect_err("unknown action");
        assert!(e.contains("clown"), "{e}");
        let e = parse("[keys.convert]\nclown = \"c\"").expect_err("unknown action");
        assert!(e.contains("clown") && e.contains("keys.convert"), "{e}");
        let e = parse("[doctor]\nmax_depth = 0").expect_err("no chain at all");
        assert!(e.contains("max_depth"), "{e}");
        let e = parse("[doctor]\ndepth = 3").expect_err("unknown doctor key");
        assert!(e.contains("depth"), "{e}");
        assert_eq!(
            parse("[doctor]\nmax_depth = 3")
                .expect("valid")
                .doctor
                .max_depth,
            3
        );
        let e = parse("roots = 3").expect_err("bad type");
        assert!(e.contains("roots"), "{e}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/cowshed.toml"))).expect_err("missing");
        assert!(e.contains("/nonexistent/cowshed.toml"), "{e}");
    }
}
