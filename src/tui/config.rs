//! The config file (TOML): roots, key overrides, theme. A wrong file is an
//! error at start, naming the file and the problem; nothing is silently
//! ignored (STYLE.md: config files silently ignored are a known pitfall).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::keymap::Keymap;
use super::theme::{Theme, ThemeFile};

/// The default config, commented; also what `assets/config.toml` holds.
pub const DEFAULT_CONFIG: &str = include_str!("../../assets/config.toml");

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    roots: Vec<PathBuf>,
    #[serde(default)]
    keys: BTreeMap<String, KeySpec>,
    #[serde(default)]
    theme: ThemeFile,
}

/// `quit = "q"` or `quit = ["q", "ctrl+c"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeySpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Roots from the file, used when none are given on the command line.
    pub roots: Vec<PathBuf>,
    pub keymap: Keymap,
    pub theme: Theme,
}

impl Config {
    /// Parse a config's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, String> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| format!("{}: {}", origin.display(), e))?;
        let keys = file
            .keys
            .into_iter()
            .map(|(k, v)| match v {
                KeySpec::One(s) => (k, vec![s]),
                KeySpec::Many(v) => (k, v),
            })
            .collect();
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
            .map(|r| if r.is_absolute() { r } else { base.join(r) })
            .collect();
        Ok(Config {
            roots,
            keymap,
            theme,
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
            "roots = [\"vms\", \"/abs\"]\n[keys]\nclone = \"n\"\nquit = [\"Q\", \"ctrl+q\"]\n\
             [theme]\nbroken = \"#ff0000\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.roots,
            vec![PathBuf::from("/etc/cowshed/vms"), PathBuf::from("/abs")]
        );
        assert_eq!(c.theme.broken, Color::Rgb(255, 0, 0));
        assert_eq!(c.keymap.footer().last(), Some(&("Q".to_string(), "quit")));
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
        let e = parse("roots = 3").expect_err("bad type");
        assert!(e.contains("roots"), "{e}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/cowshed.toml"))).expect_err("missing");
        assert!(e.contains("/nonexistent/cowshed.toml"), "{e}");
    }
}
