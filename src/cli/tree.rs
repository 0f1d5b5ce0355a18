//! `cowshed tree`: the forest of backing chains under some directories, the
//! CLI face of the catalog.

use super::session::Session;
use std::path::PathBuf;

use clap::Args;
use std::io::Write;

use serde::Serialize;

use super::{display, human_size, Output};
use crate::catalog::scan::scan_all;
use crate::catalog::{Flag, Forest, NodeId};
use crate::inventory::Inventory;

#[derive(Debug, Args)]
pub struct TreeArgs {
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Directories (or image files) to scan, recursively; `HOST:/PATH`
    /// scans on another host over ssh (see the README: Remote roots).
    #[arg(default_value = ".")]
    roots: Vec<PathBuf>,
}

pub fn run(a: TreeArgs, session: &Session) -> color_eyre::Result<i32> {
    let (local, remote) = crate::remote::split_roots(&a.roots);
    let (mut records, mut errors) = if local.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        scan_all(&local)
    };
    if !remote.is_empty() {
        crate::catalog::identity::name_local(&mut records);
    }
    let mut forest = Forest::build(records);
    let ssh = crate::remote::client::SshOptions::from_env();
    for (host, roots) in remote {
        match crate::remote::client::fetch_forest(&host, &roots, &ssh) {
            Ok((nodes, host_errors)) => {
                forest.graft(nodes);
                errors.extend(host_errors);
            }
            // A host that cannot be reached is an error like an
            // unreadable directory: the rest is still shown.
            Err(e) => {
                let message = e.to_string();
                let message = message
                    .strip_prefix(&format!("{host}: "))
                    .unwrap_or(&message)
                    .to_string();
                errors.push((PathBuf::from(format!("{host}:")), message));
            }
        }
    }
    let vms = Inventory::read(&session.connections()?);
    match a.output {
        Output::Json => write_json(&forest, &vms, &errors)?,
        Output::Human => {
            print!("{}", to_human(&forest, &vms));
            for (path, msg) in &errors {
                eprintln!("cowshed: {}: {msg}", path.display());
            }
        }
    }
    for (uri, why) in &vms.unreadable {
        eprintln!("cowshed: libvirt connection {uri} could not be read: {why}");
    }
    // What could be scanned is shown, but a script must see that some of
    // it could not: an error never ends with exit 0.
    Ok(if errors.is_empty() && vms.unreadable.is_empty() {
        0
    } else {
        1
    })
}

/// One image in `tree --output json`. Serialized one at a time while the
/// document streams out: a 10,000-image fleet never sits in memory as JSON.
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct ImageJson<'a> {
    /// `HOST:/path` for an image on another host.
    filename: String,
    /// The host it is on, as its root named it; absent: this machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    format: Option<&'static str>,
    virtual_size: u64,
    actual_size: u64,
    apparent_size: u64,
    /// Bytes freed by deleting this image and everything depending on it.
    subtree_size: u64,
    /// Images depending on it, directly or through others.
    dependents: usize,
    parent: Option<String>,
    children: Vec<String>,
    flags: Vec<FlagJson>,
    lock_state: &'static str,
    holders: Vec<HolderJson<'a>>,
    /// A base made read-only on disk (`cowshed protect`).
    protected: bool,
    /// The defined libvirt domains that use it, running or not.
    used_by_vms: Vec<VmJson<'a>>,
    /// The same file on the other hosts that see it (shared storage):
    /// `HOST:/path` each; the image is listed once, under `filename`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    also_on: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_filename_format: Option<&'a str>,
}

#[derive(Serialize)]
struct FlagJson {
    kind: &'static str,
    text: String,
    /// The other images the flag names (the dependents a base was
    /// modified after).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<String>,
    /// The processes holding the base for writing (open-for-writing).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    writers: Vec<u32>,
}

#[derive(Serialize)]
struct VmJson<'a> {
    name: &'a str,
    uuid: &'a str,
    state: &'a str,
    connection: &'a str,
}

#[derive(Serialize)]
struct HolderJson<'a> {
    pid: u32,
    command: &'a str,
    writable: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct TreeJson {
    root: String,
    images: usize,
    used: u64,
    full_copies: u64,
    saved: u64,
}

#[derive(Serialize)]
struct ErrorJson {
    filename: String,
    error: String,
}

impl<'a> ImageJson<'a> {
    fn new(forest: &'a Forest, vms: &'a Inventory, id: NodeId) -> Self {
        let n = &forest.nodes[id];
        let r = &n.record;
        let name = |id: usize| forest.nodes[id].record.location();
        let subtree = forest.subtree(id);
        ImageJson {
            filename: r.location(),
            host: r.host.as_deref(),
            format: r.summary.as_ref().map(|s| s.format.name()),
            virtual_size: r.sizes.virtual_size,
            actual_size: r.sizes.allocated,
            apparent_size: r.sizes.apparent,
            subtree_size: subtree.allocated,
            dependents: subtree.dependents,
            parent: n.parent.map(name),
            children: n.children.iter().map(|&c| name(c)).collect(),
            flags: n
                .flags
                .iter()
                .map(|f| FlagJson {
                    kind: f.kind(),
                    text: f.describe(),
                    images: f.images().iter().map(|p| display(p)).collect(),
                    writers: match f {
                        Flag::OpenForWriting { writers, .. } => {
                            writers.iter().map(|h| h.pid).collect()
                        }
                        _ => Vec::new(),
                    },
                })
                .collect(),
            lock_state: r.lock.name(),
            holders: r
                .holders
                .iter()
                .map(|h| HolderJson {
                    pid: h.pid,
                    command: &h.command,
                    writable: h.writable,
                })
                .collect(),
            protected: forest.is_protected(id),
            // Another host's domains came with its images (their device
            // and inode are that host's).
            // This machine's domains by device and inode (never for
            // another host's file: those are that host's numbers), and the
            // domains every other host that sees the file sent with it.
            used_by_vms: vms
                .users_of(r.dev_ino)
                .filter(|_| r.host.is_none())
                .map(|d| VmJson {
                    name: &d.name,
                    uuid: &d.uuid,
                    state: &d.state,
                    connection: &d.connection,
                })
                .chain(r.vms.iter().map(|d| VmJson {
                    name: &d.name,
                    uuid: &d.uuid,
                    state: &d.state,
                    connection: &d.connection,
                }))
                .collect(),
            also_on: r
                .seen_on
                .iter()
                .map(|(h, p)| format!("{h}:{}", p.display()))
                .collect(),
            backing_filename: r
                .summary
                .as_ref()
                .and_then(|s| s.backing_filename.as_deref()),
            backing_filename_format: r.summary.as_ref().and_then(|s| s.backing_format.as_deref()),
        }
    }
}

/// Serializes as a sequence produced on the fly.
struct Seq<F>(F);

impl<F, I, T> Serialize for Seq<F>
where
    F: Fn() -> I,
    I: Iterator<Item = T>,
    T: Serialize,
{
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0)())
    }
}

fn write_json(
    forest: &Forest,
    vms: &Inventory,
    errors: &[(PathBuf, String)],
) -> color_eyre::Result<()> {
    #[derive(Serialize)]
    struct Doc<A, B, C> {
        images: A,
        trees: B,
        errors: C,
    }
    let doc = Doc {
        images: Seq(|| {
            forest
                .roots
                .iter()
                .flat_map(|&r| forest.walk(r))
                .map(|(id, _)| ImageJson::new(forest, vms, id))
        }),
        trees: Seq(|| {
            forest.roots.iter().map(|&r| {
                let s = forest.space(r);
                TreeJson {
                    root: forest.nodes[r].record.location(),
                    images: forest.walk(r).len(),
                    used: s.used,
                    full_copies: s.full_copies,
                    saved: s.saved(),
                }
            })
        }),
        errors: Seq(|| {
            errors.iter().map(|(p, m)| ErrorJson {
                filename: display(p),
                error: m.clone(),
            })
        }),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    serde_json::to_writer_pretty(&mut out, &doc)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn to_human(forest: &Forest, vms: &Inventory) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let saved: u64 = forest.roots.iter().map(|&r| forest.space(r).saved()).sum();
    let bases = forest
        .roots
        .iter()
        .filter(|&&r| !forest.nodes[r].children.is_empty())
        .count();
    let _ = writeln!(
        out,
        "{} images · {} bases · {} saved",
        forest.nodes.len(),
        bases,
        human_size(saved)
    );
    // The stale-base alarm comes first: overlays are being corrupted now.
    for (_, alarm) in forest.alarms() {
        let _ = writeln!(out, "✗ ALARM: {alarm}");
    }
    for &root in &forest.roots {
        // Prefix per depth: whether the ancestor at that depth has more
        // siblings below it.
        let mut open: Vec<bool> = Vec::new();
        for (id, depth) in forest.walk(root) {
            let n = &forest.nodes[id];
            open.truncate(depth);
            let last = n
                .parent
                .is_none_or(|p| forest.nodes[p].children.last() == Some(&id));
            let mut prefix = String::new();
            for &more in open.iter().skip(1) {
                prefix.push_str(if more { "│  " } else { "   " });
            }
            if depth > 0 {
                prefix.push_str(if last { "└─ " } else { "├─ " });
            }
            open.push(!last);
            let r = &n.record;
            let pct = (r.sizes.allocated * 100)
                .checked_div(r.sizes.virtual_size)
                .unwrap_or(0);
            let mark = if n.flags.iter().any(|f| f.is_broken() || f.is_alarm()) {
                "✗ "
            } else {
                ""
            };
            let protected = if forest.is_protected(id) {
                "  protected (read-only)"
            } else {
                ""
            };
            let flags: Vec<String> = n.flags.iter().map(|f| f.describe()).collect();
            let lock = match r.lock {
                crate::engine::LockState::None => String::new(),
                l => {
                    let who: Vec<String> = r
                        .holders
                        .iter()
                        .map(|h| format!("{} {}", h.command, h.pid))
                        .collect();
                    format!(
                        "  in use: {}{}",
                        l.name(),
                        if who.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", who.join(", "))
                        }
                    )
                }
            };
            // A remote image's device and inode are another host's: its
            // domains came with it (as did those of the other hosts that
            // see a file of this machine's).
            let domains: Vec<String> = vms
                .users_of(r.dev_ino)
                .filter(|_| r.host.is_none())
                .map(|d| format!("{} ({})", d.name, d.state))
                .chain(r.vms.iter().map(|d| format!("{} ({})", d.name, d.state)))
                .collect();
            let also: String = r
                .seen_on
                .iter()
                .map(|(h, p)| format!("  also {h}:{}", p.display()))
                .collect();
            let vm = if domains.is_empty() {
                String::new()
            } else {
                format!("  vm: {}", domains.join(", "))
            };
            let _ = writeln!(
                out,
                "{prefix}{mark}{}{also}  {}  {}  {} on disk  {pct}%{}{lock}{vm}{protected}",
                r.location(),
                r.summary.as_ref().map_or("?", |s| s.format.name()),
                human_size(r.sizes.virtual_size),
                human_size(r.sizes.allocated),
                if flags.is_empty() {
                    String::new()
                } else {
                    format!("  [{}]", flags.join("; "))
                },
            );
        }
        if !forest.nodes[root].children.is_empty() {
            let s = forest.space(root);
            let _ = writeln!(
                out,
                "   saves {} ({} used; {} as full copies)",
                human_size(s.saved()),
                human_size(s.used),
                human_size(s.full_copies)
            );
        }
    }
    out
}
