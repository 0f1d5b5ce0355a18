//! The tree's visible rows, from the forest and the view's choices (folds,
//! filter, sort): a pure function, tested on forests built in memory.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::catalog::{Forest, NodeId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Size,
    Growth,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::Size => "size",
            SortKey::Growth => "growth",
        }
    }

    pub fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::Size,
            SortKey::Size => SortKey::Growth,
            SortKey::Growth => SortKey::Name,
        }
    }
}

/// How an image grows, as the catalog's watcher last reported it.
#[derive(Debug, Clone, Default)]
pub struct Growth {
    pub rate: f64,
    pub history: Vec<u64>,
}

/// One visible line of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: NodeId,
    pub depth: usize,
    /// Tree guides drawn before the name (`│ ├ └`).
    pub guides: String,
    pub has_children: bool,
    pub folded: bool,
    /// Shown by its path under its root, not its file name alone: another
    /// image of the forest has the same file name. (The text itself is
    /// made for the rows drawn only: see [`row_name`].)
    pub qualified: bool,
}

/// What the rows depend on besides the forest.
pub struct RowOptions<'a> {
    pub roots: &'a [PathBuf],
    pub folded: &'a HashSet<PathBuf>,
    /// Case-insensitive; matches the shown name (so `a/` finds the images
    /// of sub-folder `a`).
    pub filter: &'a str,
    pub sort: SortKey,
    pub growth: &'a HashMap<PathBuf, Growth>,
}

pub fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// `p` relative to the first root it is under, so the screen says what the
/// operator typed; else `p` as it is.
pub fn relative_to_roots(roots: &[PathBuf], p: &Path) -> String {
    for r in roots {
        if let Ok(rel) = p.strip_prefix(r) {
            if !rel.as_os_str().is_empty() {
                return rel.display().to_string();
            }
        }
    }
    p.display().to_string()
}

fn borrowed_name(p: &Path) -> Cow<'_, str> {
    match p.file_name() {
        Some(n) => n.to_string_lossy(),
        None => Cow::Owned(p.display().to_string()),
    }
}

/// The name each node is shown by: its file name, or its path under its
/// root where the file name alone would be ambiguous (flagged true).
/// Borrowed where it can be: this runs over the whole forest on every
/// rebuild of the rows.
fn shown_names<'a>(f: &'a Forest, roots: &[PathBuf]) -> Vec<(Cow<'a, str>, bool)> {
    let names: Vec<Cow<str>> = f
        .nodes
        .iter()
        .map(|n| borrowed_name(&n.record.path))
        .collect();
    let mut count: HashMap<&str, usize> = HashMap::with_capacity(names.len());
    for n in &names {
        *count.entry(n.as_ref()).or_default() += 1;
    }
    let ambiguous: Vec<bool> = names.iter().map(|n| count[n.as_ref()] > 1).collect();
    names
        .into_iter()
        .zip(&f.nodes)
        .zip(ambiguous)
        .map(|((name, node), amb)| {
            if amb {
                (
                    Cow::Owned(relative_to_roots(roots, &node.record.path)),
                    true,
                )
            } else {
                (name, false)
            }
        })
        .collect()
}

/// The text a row shows for its image.
pub fn row_name(f: &Forest, roots: &[PathBuf], row: &Row) -> String {
    let path = &f.nodes[row.id].record.path;
    if row.qualified {
        relative_to_roots(roots, path)
    } else {
        file_name(path)
    }
}

/// The visible rows: roots and (unless folded) their overlays, depth
/// first, sorted; with a filter, the matches and the images they hang on,
/// all unfolded.
pub fn build_rows(f: &Forest, o: &RowOptions) -> Vec<Row> {
    let names = shown_names(f, o.roots);
    let filter = o.filter.to_lowercase();
    let shown: Option<HashSet<NodeId>> = (!filter.is_empty()).then(|| {
        let mut s = HashSet::new();
        for (id, (name, _)) in names.iter().enumerate() {
            if name.to_lowercase().contains(&filter) {
                s.extend(f.chain(id));
            }
        }
        s
    });
    let b = Builder {
        f,
        o,
        names: &names,
        shown: shown.as_ref(),
    };
    let mut rows = Vec::new();
    for r in b.sorted(&f.roots) {
        b.push(r, 0, &mut Vec::new(), &mut rows);
    }
    rows
}

struct Builder<'a> {
    f: &'a Forest,
    o: &'a RowOptions<'a>,
    names: &'a [(Cow<'a, str>, bool)],
    shown: Option<&'a HashSet<NodeId>>,
}

impl Builder<'_> {
    fn sorted(&self, ids: &[NodeId]) -> Vec<NodeId> {
        let f = self.f;
        let mut v: Vec<NodeId> = ids
            .iter()
            .copied()
            .filter(|id| self.shown.is_none_or(|s| s.contains(id)))
            .collect();
        let name = |id: &NodeId| &self.names[*id].0;
        match self.o.sort {
            SortKey::Name => v.sort_by(|a, b| name(a).cmp(name(b))),
            SortKey::Size => v.sort_by(|a, b| {
                f.nodes[*b]
                    .record
                    .sizes
                    .allocated
                    .cmp(&f.nodes[*a].record.sizes.allocated)
                    .then_with(|| name(a).cmp(name(b)))
            }),
            SortKey::Growth => {
                let rate = |id: &NodeId| {
                    self.o
                        .growth
                        .get(&f.nodes[*id].record.key)
                        .map_or(0.0, |g| g.rate)
                };
                v.sort_by(|a, b| {
                    rate(b)
                        .total_cmp(&rate(a))
                        .then_with(|| name(a).cmp(name(b)))
                });
            }
        }
        v
    }

    /// Push `id` and (unless folded) its subtree. `last` says, for each
    /// level, whether that ancestor was the last of its siblings.
    fn push(&self, id: NodeId, depth: usize, last: &mut Vec<bool>, rows: &mut Vec<Row>) {
        let node = &self.f.nodes[id];
        let children = self.sorted(&node.children);
        let folded = self.shown.is_none() && self.o.folded.contains(&node.record.key);
        let mut g = String::new();
        for (lvl, &l) in last.iter().enumerate() {
            if lvl + 1 == last.len() {
                g.push_str(if l { "└ " } else { "├ " });
            } else {
                g.push_str(if l { "  " } else { "│ " });
            }
        }
        rows.push(Row {
            id,
            depth,
            guides: g,
            has_children: !children.is_empty(),
            folded: folded && !children.is_empty(),
            qualified: self.names[id].1,
        });
        if folded {
            return;
        }
        let n = children.len();
        for (i, c) in children.into_iter().enumerate() {
            last.push(i + 1 == n);
            self.push(c, depth + 1, last, rows);
            last.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forest from `(path, parent index, allocated MiB)`, no disk.
    fn forest(spec: &[(&str, Option<usize>, u64)]) -> Forest {
        let spec: Vec<_> = spec
            .iter()
            .map(|&(p, parent, mib)| (p, parent, mib, None))
            .collect();
        crate::catalog::forest::test_support::forest(&spec)
    }

    fn names(f: &Forest, rows: &[Row]) -> Vec<String> {
        let roots = [PathBuf::from("/vm")];
        rows.iter()
            .map(|r| format!("{}{}", r.guides, row_name(f, &roots, r)))
            .collect()
    }

    struct Opts {
        roots: Vec<PathBuf>,
        folded: HashSet<PathBuf>,
        filter: String,
        sort: SortKey,
        growth: HashMap<PathBuf, Growth>,
    }

    impl Opts {
        fn new() -> Opts {
            Opts {
                roots: vec![PathBuf::from("/vm")],
                folded: HashSet::new(),
                filter: String::new(),
                sort: SortKey::Name,
                growth: HashMap::new(),
            }
        }

        fn rows(&self, f: &Forest) -> Vec<Row> {
            build_rows(
                f,
                &RowOptions {
                    roots: &self.roots,
                    folded: &self.folded,
                    filter: &self.filter,
                    sort: self.sort,
                    growth: &self.growth,
                },
            )
        }
    }

    fn fleet() -> Forest {
        forest(&[
            ("/vm/base.qcow2", None, 4),     // 0
            ("/vm/web-2.qcow2", Some(0), 1), // 1
            ("/vm/web-1.qcow2", Some(0), 2), // 2
            ("/vm/web-2-1.qcow2", Some(1), 3),
            ("/vm/disk.raw", None, 9), // 4
        ])
    }

    #[test]
    fn overlays_under_their_base_with_guides_sorted_by_name() {
        let f = fleet();
        let rows = Opts::new().rows(&f);
        assert_eq!(
            names(&f, &rows),
            [
                "base.qcow2",
                "├ web-1.qcow2",
                "└ web-2.qcow2",
                "  └ web-2-1.qcow2",
                "disk.raw"
            ]
        );
        assert!(rows[0].has_children && !rows[0].folded);
        assert_eq!(rows[3].depth, 2);
    }

    #[test]
    fn folds_hide_the_subtree_and_a_filter_unfolds_what_matches() {
        let f = fleet();
        let mut o = Opts::new();
        o.folded.insert(PathBuf::from("/vm/base.qcow2"));
        let rows = o.rows(&f);
        assert_eq!(names(&f, &rows), ["base.qcow2", "disk.raw"]);
        assert!(rows[0].folded);
        // Matches and the images they hang on, folds ignored, any case.
        o.filter = "WEB-2-".into();
        assert_eq!(
            names(&f, &o.rows(&f)),
            ["base.qcow2", "└ web-2.qcow2", "  └ web-2-1.qcow2"]
        );
        o.filter = "nothing".into();
        assert!(o.rows(&f).is_empty());
    }

    #[test]
    fn sorts_by_size_and_by_growth_with_names_breaking_ties() {
        let f = fleet();
        let mut o = Opts::new();
        o.sort = SortKey::Size;
        assert_eq!(
            names(&f, &o.rows(&f)),
            [
                "disk.raw",
                "base.qcow2",
                "├ web-1.qcow2",
                "└ web-2.qcow2",
                "  └ web-2-1.qcow2"
            ]
        );
        o.sort = SortKey::Growth;
        o.growth.insert(
            PathBuf::from("/vm/web-2.qcow2"),
            Growth {
                rate: 5.0,
                history: vec![],
            },
        );
        assert_eq!(
            names(&f, &o.rows(&f))[..3],
            ["base.qcow2", "├ web-2.qcow2", "│ └ web-2-1.qcow2"]
        );
    }

    /// Issue 11, defect 7: images in sub-folders with the same file name
    /// are told apart by their path under the root; unique names stay
    /// short.
    #[test]
    fn ambiguous_names_show_their_path_under_the_root() {
        let f = forest(&[
            ("/vm/a/disk.qcow2", None, 1),
            ("/vm/b/disk.qcow2", None, 1),
            ("/vm/b/solo.qcow2", None, 1),
        ]);
        let mut o = Opts::new();
        assert_eq!(
            names(&f, &o.rows(&f)),
            ["a/disk.qcow2", "b/disk.qcow2", "solo.qcow2"]
        );
        // The filter reads the shown name.
        o.filter = "b/".into();
        assert_eq!(names(&f, &o.rows(&f)), ["b/disk.qcow2"]);
    }
}
