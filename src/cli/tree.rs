//! `cowshed tree`: the forest of backing chains under some directories, the
//! CLI face of the catalog.

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use super::{display, human_size, Output};
use crate::catalog::scan::scan_all;
use crate::catalog::{Forest, Node};

#[derive(Debug, Args)]
pub struct TreeArgs {
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Directories (or image files) to scan, recursively.
    #[arg(default_value = ".")]
    roots: Vec<PathBuf>,
}

pub fn run(a: TreeArgs) -> color_eyre::Result<i32> {
    let (records, errors) = scan_all(&a.roots);
    let forest = Forest::build(records);
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&forest, &errors))?
        ),
        Output::Human => {
            print!("{}", to_human(&forest));
            for (path, msg) in &errors {
                eprintln!("cowshed: {}: {msg}", path.display());
            }
        }
    }
    Ok(0)
}

fn node_json(forest: &Forest, n: &Node) -> Value {
    let r = &n.record;
    let mut v = json!({
        "filename": display(&r.path),
        "format": r.summary.as_ref().map(|s| s.format.name()),
        "virtual-size": r.sizes.virtual_size,
        "actual-size": r.sizes.allocated,
        "apparent-size": r.sizes.apparent,
        "parent": n.parent.map(|p| display(&forest.nodes[p].record.path)),
        "children": n.children.iter().map(|&c| display(&forest.nodes[c].record.path)).collect::<Vec<_>>(),
        "flags": n.flags.iter().map(|f| json!({"kind": f.kind(), "text": f.describe()})).collect::<Vec<_>>(),
        "lock-state": r.lock.name(),
        "holders": r.holders.iter().map(|h| json!({"pid": h.pid, "command": h.command})).collect::<Vec<_>>(),
    });
    if let Some(s) = &r.summary {
        if let Some(b) = &s.backing_filename {
            v["backing-filename"] = json!(b);
        }
        if let Some(f) = &s.backing_format {
            v["backing-filename-format"] = json!(f);
        }
    }
    v
}

fn to_json(forest: &Forest, errors: &[(PathBuf, String)]) -> Value {
    let images: Vec<Value> = forest
        .roots
        .iter()
        .flat_map(|&r| forest.walk(r))
        .map(|(id, _)| node_json(forest, &forest.nodes[id]))
        .collect();
    let trees: Vec<Value> = forest
        .roots
        .iter()
        .map(|&r| {
            let s = forest.space(r);
            json!({
                "root": display(&forest.nodes[r].record.path),
                "images": forest.walk(r).len(),
                "used": s.used,
                "full-copies": s.full_copies,
                "saved": s.saved(),
            })
        })
        .collect();
    let errors: Vec<Value> = errors
        .iter()
        .map(|(p, m)| json!({"filename": display(p), "error": m}))
        .collect();
    json!({"images": images, "trees": trees, "errors": errors})
}

fn to_human(forest: &Forest) -> String {
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
            let mark = if n.flags.iter().any(|f| f.is_broken()) {
                "✗ "
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
            let _ = writeln!(
                out,
                "{prefix}{mark}{}  {}  {}  {} on disk  {pct}%{}{lock}",
                display(&r.path),
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
