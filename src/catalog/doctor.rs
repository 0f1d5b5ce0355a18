//! The chain doctor: per image, the problems of its backing chain and the
//! fixes they have. Diagnosis reads the forest only (the TUI runs it on a
//! key press); planning a header fix reads the disk (directories are
//! canonicalised, the new name is resolved) and so runs in the CLI or in
//! a job. Fixes are applied by the shells through the engine's `rebase
//! -u`, which takes QEMU's locks and refuses corrupt metadata: the catalog
//! never writes an image.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::forest::{Flag, Forest, NodeId};
use crate::engine::chain::{classify_backing, relative_backing_name, BackingName};
use crate::engine::{Format, RebaseOptions};

/// Chains deeper than this many backing files are reported. Measured with
/// `qemu-img bench` (QEMU 10.0.2, 200,000 reads of 4 KiB served by the
/// base of a chain of empty overlays): 1.5× as long through 8 layers as
/// from the base itself, 1.8× through 16, 2.7× through 32, 10× through
/// 64, and each layer is one more open file and metadata cache in the VM.
/// Eight keeps that cost small while allowing the usual base, template,
/// VM and a few snapshots; it is also the deep chain of the project's
/// benchmark fixtures.
pub const DEFAULT_MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoctorOptions {
    /// Backing files an image may read through before its chain is
    /// reported as too deep.
    pub max_depth: usize,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Something wrong with an image's backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The backing format is not in the header: QEMU probes it each time it
    /// opens the chain (a guest writing a qcow2 header into a raw backing
    /// could then redirect reads). `probed` is what the probe finds now.
    BackingFormatNotRecorded {
        backing: String,
        probed: Option<Format>,
    },
    /// The backing name is absolute: moving the directory that holds the
    /// chain breaks it, where a relative name would keep working.
    AbsoluteBackingName { backing: String },
    /// The image reads through more backing files than allowed.
    TooDeep {
        depth: usize,
        max: usize,
        /// Its backing has no other dependent: committing into it is safe
        /// for everyone else.
        commit_is_safe: bool,
    },
    /// The backing file is outside the scanned directories: nothing here
    /// shows who else uses it, and moving these directories leaves it.
    BackingOutsideRoots { backing: PathBuf },
    /// The backing file does not exist: the chain is broken.
    MissingBacking { wanted: String },
    /// Part of a backing cycle: QEMU cannot open it.
    Cycle,
    /// Another reason QEMU cannot open the chain (a recorded format that
    /// is wrong, a backing that is no file, a header that cannot be read).
    Broken { text: String },
}

/// A way to fix a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Record the probed format in the header (`rebase -u -F`).
    RecordFormat,
    /// Store a relative name for the same file, keeping the recorded
    /// format (`rebase -u -b`).
    MakeRelative,
    /// Copy the chain into the image and drop its backing (`rebase -b ""`):
    /// offered, never applied by `doctor --fix` (it copies data).
    Flatten,
    /// Commit the image into its backing, whose chain is one shorter:
    /// offered, never applied by `doctor --fix`.
    Commit,
}

impl Fix {
    /// Only the header changes: `doctor --fix` applies these.
    pub fn is_header_only(self) -> bool {
        matches!(self, Fix::RecordFormat | Fix::MakeRelative)
    }

    /// A stable machine name (JSON).
    pub fn kind(self) -> &'static str {
        match self {
            Fix::RecordFormat => "record-backing-format",
            Fix::MakeRelative => "make-backing-name-relative",
            Fix::Flatten => "flatten",
            Fix::Commit => "commit",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Fix::RecordFormat => "record the probed backing format",
            Fix::MakeRelative => "make the backing name relative",
            Fix::Flatten => "flatten: copy the chain in, drop the backing",
            Fix::Commit => "commit into the backing image",
        }
    }
}

impl Problem {
    /// A stable machine name (JSON).
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::BackingFormatNotRecorded { .. } => "backing-format-not-recorded",
            Problem::AbsoluteBackingName { .. } => "absolute-backing-name",
            Problem::TooDeep { .. } => "chain-too-deep",
            Problem::BackingOutsideRoots { .. } => "backing-outside-roots",
            Problem::MissingBacking { .. } => "missing-backing",
            Problem::Cycle => "cycle",
            Problem::Broken { .. } => "broken-chain",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Problem::BackingFormatNotRecorded { backing, probed } => match probed {
                Some(f) => format!(
                    "the format of backing file {backing} is not recorded: QEMU probes it ({})",
                    f.name()
                ),
                None => format!(
                    "the format of backing file {backing} is not recorded, and it cannot be \
                     probed now"
                ),
            },
            Problem::AbsoluteBackingName { backing } => {
                format!("absolute backing name {backing}: moving the directory breaks the chain")
            }
            Problem::TooDeep { depth, max, .. } => format!(
                "reads through {depth} backing files, more than {max}: every read the image \
                 does not serve walks them all"
            ),
            Problem::BackingOutsideRoots { backing } => format!(
                "backing file {} is outside the scanned directories",
                backing.display()
            ),
            Problem::MissingBacking { wanted } => {
                format!("backing file {wanted} is missing: the chain is broken")
            }
            Problem::Cycle => "part of a backing cycle: QEMU cannot open it".into(),
            Problem::Broken { text } => text.clone(),
        }
    }

    /// The fixes this problem has, the first the one to try.
    pub fn fixes(&self) -> Vec<Fix> {
        match self {
            Problem::BackingFormatNotRecorded {
                probed: Some(Format::Qcow2 | Format::Raw),
                ..
            } => vec![Fix::RecordFormat],
            Problem::AbsoluteBackingName { .. } => vec![Fix::MakeRelative],
            Problem::TooDeep {
                commit_is_safe: true,
                ..
            } => vec![Fix::Flatten, Fix::Commit],
            Problem::TooDeep { .. } => vec![Fix::Flatten],
            _ => Vec::new(),
        }
    }
}

/// The problems of image `id`. Images found only as the backing of a
/// scanned one (outside the roots) and files that are no images are not
/// diagnosed: they are not the user's to fix here.
pub fn diagnose(f: &Forest, id: NodeId, opts: &DoctorOptions) -> Vec<Problem> {
    let node = &f.nodes[id];
    let mut out = Vec::new();
    if node
        .flags
        .iter()
        .any(|fl| matches!(fl, Flag::Skipped { .. } | Flag::OutsideRoots))
    {
        return out;
    }
    let summary = node.record.summary.as_ref();
    let backing = summary.and_then(|s| s.backing_filename.clone());
    let parent = node.parent.map(|p| &f.nodes[p]);
    for flag in &node.flags {
        match flag {
            Flag::MissingBacking { wanted } => out.push(Problem::MissingBacking {
                wanted: wanted.clone(),
            }),
            Flag::Cycle => out.push(Problem::Cycle),
            Flag::BackingFormatNotRecorded => out.push(Problem::BackingFormatNotRecorded {
                backing: backing.clone().unwrap_or_default(),
                probed: parent.and_then(|p| p.record.summary.as_ref().map(|s| s.format)),
            }),
            f if f.is_broken() => out.push(Problem::Broken { text: f.describe() }),
            _ => {}
        }
    }
    let Some(parent) = parent else {
        return out;
    };
    let outside = parent.flags.contains(&Flag::OutsideRoots);
    if outside {
        out.push(Problem::BackingOutsideRoots {
            backing: parent.record.path.clone(),
        });
    }
    // A base outside the roots is somebody else's layout: an absolute
    // name to it is what survives moving these directories.
    if let Some(name) = backing.filter(|n| n.starts_with('/') && !outside) {
        out.push(Problem::AbsoluteBackingName { backing: name });
    }
    let depth = f.chain(id).len() - 1;
    if depth > opts.max_depth {
        out.push(Problem::TooDeep {
            depth,
            max: opts.max_depth,
            commit_is_safe: parent.children.len() == 1,
        });
    }
    out
}

/// Every image of the forest with problems, in tree order.
pub fn diagnose_all(f: &Forest, opts: &DoctorOptions) -> Vec<(NodeId, Vec<Problem>)> {
    f.roots
        .iter()
        .flat_map(|&r| f.walk(r))
        .map(|(id, _)| (id, diagnose(f, id, opts)))
        .filter(|(_, p)| !p.is_empty())
        .collect()
}

/// A header-only fix planned against the disk: the backing name and
/// format to store, as `rebase -u` stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderFix {
    pub image: PathBuf,
    pub backing: String,
    pub format: Format,
}

impl HeaderFix {
    pub fn rebase_options(&self) -> RebaseOptions {
        RebaseOptions {
            backing: self.backing.clone(),
            backing_format: Some(self.format),
            unsafe_header_only: true,
            // A header fix keeps the guest view and every path: no
            // machine's disk changes.
            vms: Default::default(),
        }
    }

    /// The command that does the same.
    pub fn command(&self) -> String {
        format!(
            "cowshed rebase -u -b {} -F {} {}",
            shell_quote(&self.backing),
            self.format.name(),
            shell_quote(&self.image.display().to_string())
        )
    }
}

/// Plan the header-only `fixes` of the image at `image` as its header is
/// now: the name made relative (resolving to the very file the current
/// name does, checked on disk) and the format recorded. Making the name
/// relative keeps the recorded format, or records the probed one when
/// there is none (QEMU 10 stores no backing name without a format).
pub fn plan_header_fix(image: &Path, fixes: &[Fix]) -> Result<HeaderFix, String> {
    let summary = crate::engine::inspect(image).map_err(|e| e.to_string())?;
    let Some(name) = summary.backing_filename else {
        return Err("it has no backing file".into());
    };
    let BackingName::Path(resolved) = classify_backing(image, &name) else {
        return Err(format!("backing {name} is not a file name"));
    };
    let target = std::fs::metadata(&resolved)
        .map_err(|e| format!("backing file {name} cannot be reached: {e}"))?;
    let recorded = match summary.backing_format.as_deref() {
        Some(n) => Some(
            Format::from_name(n)
                .ok_or_else(|| format!("recorded backing format '{n}' is unknown"))?,
        ),
        None => None,
    };
    let format = match recorded {
        Some(f) => f,
        None => {
            let probed = crate::engine::inspect(&resolved)
                .map_err(|e| format!("cannot probe the backing file: {e}"))?
                .format;
            match probed {
                Format::Qcow2 | Format::Raw => probed,
                other => {
                    return Err(format!(
                        "the backing file probes as {}, which cowshed does not record",
                        other.name()
                    ))
                }
            }
        }
    };
    if fixes.contains(&Fix::RecordFormat) && recorded.is_some() {
        return Err("the backing format is recorded already".into());
    }
    let backing = if fixes.contains(&Fix::MakeRelative) {
        let rel = relative_backing_name(image, &resolved).ok_or_else(|| {
            format!("no relative name reaches {name} (a directory is gone, or a path is not UTF-8)")
        })?;
        // The new name must open the very same file the old one does.
        let BackingName::Path(again) = classify_backing(image, &rel) else {
            return Err(format!("{rel} is not a file name"));
        };
        let same = std::fs::metadata(&again)
            .is_ok_and(|m| (m.dev(), m.ino()) == (target.dev(), target.ino()));
        if !same {
            return Err(format!(
                "the relative name {rel} does not reach the same file as {name}"
            ));
        }
        rel
    } else {
        name
    };
    Ok(HeaderFix {
        image: image.to_path_buf(),
        backing,
        format,
    })
}

/// The command that applies a fix that is not header-only.
pub fn command(fix: Fix, image: &Path) -> Option<String> {
    let image = shell_quote(&image.display().to_string());
    match fix {
        Fix::Flatten => Some(format!("cowshed rebase -b \"\" {image}")),
        Fix::Commit => Some(format!("cowshed commit {image}")),
        Fix::RecordFormat | Fix::MakeRelative => None,
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_header_fixes_are_header_only() {
        assert!(Fix::RecordFormat.is_header_only());
        assert!(Fix::MakeRelative.is_header_only());
        assert!(!Fix::Flatten.is_header_only());
        assert!(!Fix::Commit.is_header_only());
        let deep = Problem::TooDeep {
            depth: 9,
            max: 8,
            commit_is_safe: false,
        };
        assert_eq!(deep.fixes(), vec![Fix::Flatten]);
        assert!(Problem::Cycle.fixes().is_empty());
        let unprobed = Problem::BackingFormatNotRecorded {
            backing: "b".into(),
            probed: None,
        };
        assert!(unprobed.fixes().is_empty());
    }

    #[test]
    fn commands_quote_what_a_shell_would_split() {
        assert_eq!(
            command(Fix::Flatten, Path::new("my vm.qcow2")).as_deref(),
            Some("cowshed rebase -b \"\" 'my vm.qcow2'")
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("a/b.qcow2"), "a/b.qcow2");
    }
}
