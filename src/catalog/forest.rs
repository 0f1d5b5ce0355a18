//! The backing graph: each image's parent is its resolved backing file, so a
//! base shows all its overlays as children. Broken links, cycles, bases
//! outside the scanned roots and risky backings are flagged, never fatal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::scan::read_record;
use super::ImageRecord;
use crate::engine::chain::{classify_backing, BackingName};
use crate::engine::Format;

pub type NodeId = usize;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Flag {
    /// The backing file does not exist: the chain is broken.
    MissingBacking { wanted: String },
    /// Part of a backing cycle; its parent link is cut to draw it.
    Cycle,
    /// Found as the backing of a scanned image, outside the roots.
    OutsideRoots,
    /// The overlay does not record its backing's format (QEMU probes it).
    BackingFormatNotRecorded,
    /// The recorded backing format is not what the backing file is.
    BackingFormatMismatch { recorded: String, actual: String },
    /// `json:` or protocol backing: reported, not followed.
    UnfollowedBacking { name: String },
    /// The header could not be read.
    Unreadable { message: String },
    /// Not an image at all: a file the scan found and could not use (no
    /// image header, unreadable), shown so that nothing vanishes silently.
    Skipped { reason: String },
    /// An image others use as backing file is held by a process with
    /// QEMU's writer lock: whatever it writes changes what `overlays`
    /// images (its dependents, directly or through others) read, under
    /// their own clusters: their data is corrupt from then on. `writers`
    /// are the holders with a descriptor open for writing (empty when
    /// /proc does not show who).
    OpenForWriting {
        writers: Vec<super::Holder>,
        overlays: usize,
    },
    /// The image was modified (mtime) after these direct dependents were
    /// created (birth time): they were made on a different disk than the
    /// one they now read through. Only where the file system records
    /// birth times; never guessed.
    ModifiedAfterDependents { dependents: Vec<PathBuf> },
    /// On another host that cannot be reached now: what is shown is what
    /// was last heard, and `reason` says why it is not current.
    Stale { reason: String },
}

impl Flag {
    /// Short text for lists and the tree.
    pub fn describe(&self) -> String {
        match self {
            Flag::MissingBacking { wanted } => format!("backing missing: {wanted}"),
            Flag::Cycle => "backing cycle".into(),
            Flag::OutsideRoots => "outside scanned roots".into(),
            Flag::BackingFormatNotRecorded => "backing format not recorded".into(),
            Flag::BackingFormatMismatch { recorded, actual } => {
                format!("backing recorded as {recorded} but is {actual}")
            }
            Flag::UnfollowedBacking { name } => format!("backing not followed: {name}"),
            Flag::Unreadable { message } => format!("unreadable: {message}"),
            Flag::Skipped { reason } => reason.clone(),
            Flag::OpenForWriting { writers, overlays } => {
                let who = if writers.is_empty() {
                    "another process".to_string()
                } else {
                    writers
                        .iter()
                        .map(|h| format!("pid {} ({})", h.pid, h.command))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!(
                    "open for writing by {who}: its {overlays} overlay{} will read corrupt data",
                    if *overlays == 1 { "" } else { "s" }
                )
            }
            Flag::Stale { reason } => format!("stale: {reason}"),
            Flag::ModifiedAfterDependents { dependents } => {
                const SHOWN: usize = 3;
                let mut names: Vec<String> = dependents
                    .iter()
                    .take(SHOWN)
                    .map(|p| {
                        p.file_name()
                            .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
                    })
                    .collect();
                if dependents.len() > SHOWN {
                    names.push(format!("{} more", dependents.len() - SHOWN));
                }
                let (verb, pronoun) = if dependents.len() == 1 {
                    ("was", "it")
                } else {
                    ("were", "they")
                };
                format!(
                    "modified after {} {verb} created on it: {pronoun} may read changed data",
                    names.join(", ")
                )
            }
        }
    }

    /// The stale-base alarm: overlays are being corrupted now.
    pub fn is_alarm(&self) -> bool {
        matches!(self, Flag::OpenForWriting { .. })
    }

    /// Images a flag is about besides the one it is on, as their paths
    /// (the dependents a base was modified after).
    pub fn images(&self) -> &[PathBuf] {
        match self {
            Flag::ModifiedAfterDependents { dependents } => dependents,
            _ => &[],
        }
    }

    /// A stable machine name (JSON).
    pub fn kind(&self) -> &'static str {
        match self {
            Flag::MissingBacking { .. } => "missing-backing",
            Flag::Cycle => "cycle",
            Flag::OutsideRoots => "outside-roots",
            Flag::BackingFormatNotRecorded => "backing-format-not-recorded",
            Flag::BackingFormatMismatch { .. } => "backing-format-mismatch",
            Flag::UnfollowedBacking { .. } => "unfollowed-backing",
            Flag::Unreadable { .. } => "unreadable",
            Flag::Skipped { .. } => "skipped",
            Flag::OpenForWriting { .. } => "open-for-writing",
            Flag::ModifiedAfterDependents { .. } => "modified-after-dependents",
            Flag::Stale { .. } => "stale",
        }
    }

    /// A problem that stops QEMU from opening the chain.
    pub fn is_broken(&self) -> bool {
        matches!(
            self,
            Flag::MissingBacking { .. }
                | Flag::Cycle
                | Flag::BackingFormatMismatch { .. }
                | Flag::UnfollowedBacking { .. }
                | Flag::Unreadable { .. }
        )
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub record: ImageRecord,
    pub parent: Option<NodeId>,
    pub children: Vec<NodeId>,
    pub flags: Vec<Flag>,
}

/// Space of one tree (a root and everything growing on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeSpace {
    /// Allocated bytes of every image in the tree.
    pub used: u64,
    /// What the tree's leaves would take as independent full copies: each
    /// leaf's chain flattened (sum of allocated bytes along the chain).
    pub full_copies: u64,
}

impl TreeSpace {
    pub fn saved(&self) -> u64 {
        self.full_copies.saturating_sub(self.used)
    }
}

/// An image with everything that depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Subtree {
    /// Allocated bytes of the image and all its dependents.
    pub allocated: u64,
    /// Images that depend on it, directly or through others.
    pub dependents: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Forest {
    pub nodes: Vec<Node>,
    /// Nodes without a parent, sorted by path.
    pub roots: Vec<NodeId>,
    by_key: HashMap<PathBuf, NodeId>,
    /// For nodes found outside the roots: how many such bases lead to them.
    outside_depth: HashMap<NodeId, usize>,
}

/// Deepest chain of external bases followed outside the roots.
const MAX_EXTERNAL_DEPTH: usize = 64;

impl Forest {
    /// Build the forest from scanned records. Backing files outside the
    /// scanned set are looked up on disk and added as outside-root nodes.
    pub fn build(records: Vec<ImageRecord>) -> Forest {
        let mut f = Forest::default();
        for r in records {
            f.insert(r);
        }
        f.link();
        f
    }

    fn insert(&mut self, record: ImageRecord) -> NodeId {
        if let Some(&id) = self.by_key.get(&record.key) {
            return id;
        }
        let id = self.nodes.len();
        self.by_key.insert(record.key.clone(), id);
        let mut flags = Vec::new();
        if let Some(message) = &record.error {
            flags.push(Flag::Unreadable {
                message: message.clone(),
            });
        }
        self.nodes.push(Node {
            record,
            parent: None,
            children: Vec::new(),
            flags,
        });
        id
    }

    /// Add files that are no images (`(path, reason, sizes)`) as rows of
    /// their own: roots without a chain, among the others by path.
    pub fn with_skipped(mut self, skipped: Vec<(PathBuf, String, super::Sizes)>) -> Forest {
        for (path, reason, sizes) in skipped {
            if self.by_key.contains_key(&path) {
                continue;
            }
            let id = self.nodes.len();
            self.by_key.insert(path.clone(), id);
            self.nodes.push(Node {
                record: ImageRecord {
                    key: path.clone(),
                    path,
                    host: None,
                    dev_ino: (0, 0),
                    summary: None,
                    error: None,
                    sizes,
                    mtime: None,
                    created: None,
                    mode: 0,
                    lock: crate::engine::LockState::None,
                    holders: Vec::new(),
                    identity: None,
                    vms: Vec::new(),
                    seen_on: Vec::new(),
                },
                parent: None,
                children: Vec::new(),
                flags: vec![Flag::Skipped { reason }],
            });
            self.roots.push(id);
        }
        let nodes = &self.nodes;
        self.roots
            .sort_by(|a, b| nodes[*a].record.path.cmp(&nodes[*b].record.path));
        self
    }

    /// Add a forest built on another host (its backing names resolved
    /// there): `nodes` link to their parents by index among themselves,
    /// and their keys are already that host's (see [`ImageRecord::host`]).
    /// Trees of other hosts come after this machine's, by host, then path.
    ///
    /// A node whose [`ImageRecord::identity`] is that of a file already
    /// here (this machine's, named by `identity::name_local`, or another
    /// host's graft: shared storage) is not added again: that node learns
    /// the other host's name for it (`seen_on`), and its holders, lock and
    /// domains become the union of both hosts'.
    pub fn graft(&mut self, nodes: Vec<(ImageRecord, Option<usize>, Vec<Flag>)>) {
        let base = self.nodes.len();
        let count = nodes.len();
        let shared: HashMap<String, NodeId> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(id, n)| Some((n.record.identity.clone()?, id)))
            .collect();
        // Where each grafted node went: a new node, or one already here.
        let mut placed: Vec<NodeId> = Vec::with_capacity(count);
        let mut parents: Vec<(NodeId, Option<usize>)> = Vec::new();
        let mut touched: Vec<NodeId> = Vec::new();
        for (i, (record, parent, flags)) in nodes.into_iter().enumerate() {
            let same = record
                .identity
                .as_ref()
                .and_then(|k| shared.get(k))
                .copied()
                .filter(|&id| self.nodes[id].record.host != record.host);
            if let Some(id) = same {
                self.by_key.insert(record.key.clone(), id);
                merge_seen(&mut self.nodes[id], record, flags);
                placed.push(id);
                touched.push(id);
                continue;
            }
            let id = self.nodes.len();
            self.by_key.insert(record.key.clone(), id);
            self.nodes.push(Node {
                record,
                parent: None,
                children: Vec::new(),
                flags,
            });
            placed.push(id);
            // A parent index out of range (a confused agent) makes a
            // root rather than a panic.
            parents.push((id, parent.filter(|&p| p < count && p != i)));
        }
        for (id, parent) in parents {
            self.nodes[id].parent = parent.map(|p| placed[p]).filter(|&p| p != id);
        }
        // A cycle among the grafted parents (the agent cuts them; a
        // confused one might not) would make walks endless: cut it here.
        self.cut_cycles();
        for id in base..self.nodes.len() {
            match self.nodes[id].parent {
                Some(p) => {
                    self.nodes[p].children.push(id);
                    if p < base {
                        touched.push(p);
                    }
                }
                None => self.roots.push(id),
            }
        }
        let nodes = &self.nodes;
        let order = |a: &NodeId, b: &NodeId| {
            let (a, b) = (&nodes[*a].record, &nodes[*b].record);
            (&a.host, &a.path).cmp(&(&b.host, &b.path))
        };
        touched.sort_unstable();
        touched.dedup();
        let mut sorted: Vec<(NodeId, Vec<NodeId>)> = (base..nodes.len())
            .chain(touched)
            .map(|id| {
                let mut c = nodes[id].children.clone();
                c.sort_by(order);
                (id, c)
            })
            .collect();
        self.roots.sort_by(order);
        for (id, c) in sorted.drain(..) {
            self.nodes[id].children = c;
        }
    }

    pub fn get(&self, key: &Path) -> Option<NodeId> {
        self.by_key.get(key).copied()
    }

    /// Resolve every image's backing, then cut cycles and sort.
    fn link(&mut self) {
        let mut i = 0;
        // Outside-root nodes are appended while linking, and linked in turn.
        while i < self.nodes.len() {
            self.link_one(i);
            i += 1;
        }
        self.cut_cycles();
        for n in &mut self.nodes {
            n.children.clear();
        }
        for id in 0..self.nodes.len() {
            if let Some(p) = self.nodes[id].parent {
                self.nodes[p].children.push(id);
            }
        }
        let nodes = &self.nodes;
        let by_path = |a: &NodeId, b: &NodeId| nodes[*a].record.path.cmp(&nodes[*b].record.path);
        let mut roots: Vec<NodeId> = (0..nodes.len())
            .filter(|&i| nodes[i].parent.is_none())
            .collect();
        roots.sort_by(by_path);
        let mut sorted_children: Vec<Vec<NodeId>> = nodes
            .iter()
            .map(|n| {
                let mut c = n.children.clone();
                c.sort_by(by_path);
                c
            })
            .collect();
        for (n, c) in self.nodes.iter_mut().zip(sorted_children.iter_mut()) {
            n.children = std::mem::take(c);
        }
        self.roots = roots;
        for id in 0..self.nodes.len() {
            let flags = self.base_guard(id);
            self.nodes[id].flags.extend(flags);
        }
    }

    /// The stale-base guard for one image: a writer on an image others
    /// read through, and dependents created before its last modification.
    fn base_guard(&self, id: NodeId) -> Vec<Flag> {
        let node = &self.nodes[id];
        let mut flags = Vec::new();
        if node.children.is_empty() {
            return flags;
        }
        let r = &node.record;
        if r.lock == crate::engine::LockState::Writer {
            flags.push(Flag::OpenForWriting {
                writers: r.holders.iter().filter(|h| h.writable).cloned().collect(),
                overlays: self.subtree(id).dependents,
            });
        }
        let stale = self.dependents_older_than(id, r.mtime);
        if !stale.is_empty() {
            flags.push(Flag::ModifiedAfterDependents { dependents: stale });
        }
        flags
    }

    /// The direct dependents of `id` created before `mtime` (the base's
    /// last modification), by path; none where either time is unknown.
    pub fn dependents_older_than(
        &self,
        id: NodeId,
        mtime: Option<std::time::SystemTime>,
    ) -> Vec<PathBuf> {
        let Some(modified) = mtime else {
            return Vec::new();
        };
        self.nodes[id]
            .children
            .iter()
            .map(|&c| &self.nodes[c].record)
            .filter(|c| c.created.is_some_and(|born| modified > born))
            .map(|c| c.path.clone())
            .collect()
    }

    /// A base made read-only on disk (`cowshed protect`): others depend on
    /// it and it has no write bit.
    pub fn is_protected(&self, id: NodeId) -> bool {
        let n = &self.nodes[id];
        !n.children.is_empty() && n.record.mode & 0o222 == 0
    }

    /// The alarms of the stale-base guard, as the banner says them: "base
    /// X is open for writing by pid N (cmd): its N overlays will read
    /// corrupt data".
    pub fn alarms(&self) -> impl Iterator<Item = (NodeId, String)> + '_ {
        self.nodes.iter().enumerate().flat_map(|(id, n)| {
            n.flags.iter().filter(|f| f.is_alarm()).map(move |f| {
                (
                    id,
                    format!("base {} is {}", n.record.path.display(), f.describe()),
                )
            })
        })
    }

    fn link_one(&mut self, id: NodeId) {
        let Some(summary) = self.nodes[id].record.summary.clone() else {
            return;
        };
        let Some(name) = summary.backing_filename.clone() else {
            return;
        };
        let path = self.nodes[id].record.path.clone();
        let backing_path = match classify_backing(&path, &name) {
            BackingName::Path(p) => p,
            _ => {
                self.nodes[id].flags.push(Flag::UnfollowedBacking { name });
                return;
            }
        };
        if summary.backing_format.is_none() {
            self.nodes[id].flags.push(Flag::BackingFormatNotRecorded);
        }
        let Ok(key) = backing_path.canonicalize() else {
            self.nodes[id]
                .flags
                .push(Flag::MissingBacking { wanted: name });
            return;
        };
        let parent = match self.by_key.get(&key) {
            Some(&p) => p,
            None => {
                let depth = self.outside_depth.get(&id).copied().unwrap_or(0) + 1;
                if depth > MAX_EXTERNAL_DEPTH {
                    return;
                }
                match read_record(&backing_path) {
                    Ok(Some(mut r)) => {
                        r.key = key;
                        let p = self.insert(r);
                        self.nodes[p].flags.push(Flag::OutsideRoots);
                        self.outside_depth.insert(p, depth);
                        p
                    }
                    // Exists but is no image we know (e.g. raw without a raw
                    // extension): read it as the overlay says.
                    Ok(None) => match read_record_as_raw(&backing_path, key) {
                        Some(r) => {
                            let p = self.insert(r);
                            self.nodes[p].flags.push(Flag::OutsideRoots);
                            self.outside_depth.insert(p, depth);
                            p
                        }
                        None => {
                            self.nodes[id]
                                .flags
                                .push(Flag::MissingBacking { wanted: name });
                            return;
                        }
                    },
                    Err(_) => {
                        self.nodes[id]
                            .flags
                            .push(Flag::MissingBacking { wanted: name });
                        return;
                    }
                }
            }
        };
        if let (Some(recorded), Some(actual)) = (
            summary.backing_format.as_deref(),
            self.nodes[parent].record.summary.as_ref().map(|s| s.format),
        ) {
            // Reading a qcow2 as raw works (it is what the overlay asked
            // for); asking qcow2 of a raw file fails in QEMU.
            if recorded == "qcow2" && actual != Format::Qcow2 {
                self.nodes[id].flags.push(Flag::BackingFormatMismatch {
                    recorded: recorded.to_string(),
                    actual: actual.name().to_string(),
                });
            }
        }
        self.nodes[id].parent = Some(parent);
    }

    /// Nodes on a parent cycle get the Cycle flag and lose their parent.
    fn cut_cycles(&mut self) {
        let n = self.nodes.len();
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut state = vec![0u8; n];
        for start in 0..n {
            let mut path = Vec::new();
            let mut cur = Some(start);
            while let Some(c) = cur {
                match state[c] {
                    0 => {
                        state[c] = 1;
                        path.push(c);
                        cur = self.nodes[c].parent;
                    }
                    1 => {
                        // `c` closes a cycle: everything from c on the path.
                        let from = path.iter().position(|&x| x == c).unwrap_or(0);
                        for &m in &path[from..] {
                            self.nodes[m].flags.push(Flag::Cycle);
                        }
                        for &m in &path[from..] {
                            self.nodes[m].parent = None;
                        }
                        break;
                    }
                    _ => break,
                }
            }
            for m in path {
                state[m] = 2;
            }
        }
    }

    /// Depth-first order of a tree, with each node's depth.
    pub fn walk(&self, root: NodeId) -> Vec<(NodeId, usize)> {
        let mut out = Vec::new();
        let mut stack = vec![(root, 0usize)];
        while let Some((id, d)) = stack.pop() {
            out.push((id, d));
            for &c in self.nodes[id].children.iter().rev() {
                stack.push((c, d + 1));
            }
        }
        out
    }

    /// The root of the tree `id` belongs to.
    pub fn root_of(&self, mut id: NodeId) -> NodeId {
        while let Some(p) = self.nodes[id].parent {
            id = p;
        }
        id
    }

    /// Chain from `id` up to its root, `id` first.
    pub fn chain(&self, mut id: NodeId) -> Vec<NodeId> {
        let mut out = vec![id];
        while let Some(p) = self.nodes[id].parent {
            id = p;
            out.push(id);
        }
        out
    }

    /// What deleting `id` and everything that depends on it would free,
    /// and how many images depend on it, directly or through others (its
    /// descendants in the forest).
    pub fn subtree(&self, id: NodeId) -> Subtree {
        let walked = self.walk(id);
        Subtree {
            allocated: walked
                .iter()
                .map(|&(n, _)| self.nodes[n].record.sizes.allocated)
                .sum(),
            dependents: walked.len() - 1,
        }
    }

    pub fn space(&self, root: NodeId) -> TreeSpace {
        let mut s = TreeSpace::default();
        for (id, _) in self.walk(root) {
            s.used += self.nodes[id].record.sizes.allocated;
            if self.nodes[id].children.is_empty() {
                s.full_copies += self
                    .chain(id)
                    .iter()
                    .map(|&c| self.nodes[c].record.sizes.allocated)
                    .sum::<u64>();
            }
        }
        s
    }
}

/// `node` is also `record` on another host: what uses it there counts too.
fn merge_seen(node: &mut Node, record: ImageRecord, flags: Vec<Flag>) {
    let r = &mut node.record;
    if let Some(h) = record.host {
        if !r.seen_on.iter().any(|(seen, _)| *seen == h) {
            r.seen_on.push((h, record.path));
        }
    }
    // The stronger lock of the two: a writer anywhere is a writer.
    let rank = |l: crate::engine::LockState| match l {
        crate::engine::LockState::None => 0,
        crate::engine::LockState::Reader => 1,
        crate::engine::LockState::Writer => 2,
    };
    if rank(record.lock) > rank(r.lock) {
        r.lock = record.lock;
    }
    for h in record.holders {
        if !r.holders.contains(&h) {
            r.holders.push(h);
        }
    }
    for v in record.vms {
        if !r.vms.contains(&v) {
            r.vms.push(v);
        }
    }
    for f in flags {
        if !node.flags.contains(&f) {
            node.flags.push(f);
        }
    }
}

fn read_record_as_raw(path: &Path, key: PathBuf) -> Option<ImageRecord> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(ImageRecord {
        path: path.to_path_buf(),
        key,
        host: None,
        dev_ino: (meta.dev(), meta.ino()),
        summary: Some(crate::engine::HeaderSummary::plain(Format::Raw, meta.len())),
        error: None,
        sizes: super::Sizes {
            virtual_size: meta.len().next_multiple_of(512),
            allocated: meta.blocks() * 512,
            apparent: meta.len(),
        },
        mtime: meta.modified().ok(),
        created: meta.created().ok(),
        mode: meta.mode() & 0o7777,
        lock: crate::engine::LockState::None,
        holders: Vec::new(),
        identity: None,
        vms: Vec::new(),
        seen_on: Vec::new(),
    })
}

/// Forests built in memory for unit tests elsewhere (rows, reclaim): no
/// disk, links made as `Forest::build` would.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;
    use std::time::SystemTime;

    use super::{Forest, Node};
    use crate::catalog::{ImageRecord, Sizes};
    use crate::engine::LockState;

    /// `(path, parent index, allocated MiB, last written)` per image.
    pub(crate) fn forest(spec: &[(&str, Option<usize>, u64, Option<SystemTime>)]) -> Forest {
        let mut f = Forest::default();
        for &(path, parent, mib, mtime) in spec {
            f.nodes.push(Node {
                record: ImageRecord {
                    path: PathBuf::from(path),
                    key: PathBuf::from(path),
                    host: None,
                    dev_ino: (0, 0),
                    summary: None,
                    error: None,
                    sizes: Sizes {
                        virtual_size: 1 << 30,
                        allocated: mib << 20,
                        apparent: mib << 20,
                    },
                    mtime,
                    created: None,
                    mode: 0o644,
                    lock: LockState::None,
                    holders: Vec::new(),
                    identity: None,
                    vms: Vec::new(),
                    seen_on: Vec::new(),
                },
                parent,
                children: Vec::new(),
                flags: Vec::new(),
            });
        }
        for id in 0..f.nodes.len() {
            match f.nodes[id].parent {
                Some(p) => f.nodes[p].children.push(id),
                None => f.roots.push(id),
            }
        }
        f
    }
}

#[cfg(test)]
mod graft_tests {
    use super::test_support::forest;
    use super::*;

    fn remote(f: &Forest, path: &str) -> ImageRecord {
        let mut r = f.nodes[0].record.clone();
        r.path = PathBuf::from(path);
        r.key = PathBuf::from(format!("h:{path}"));
        r.host = Some("h".into());
        r
    }

    #[test]
    fn grafted_trees_follow_local_ones_and_bad_links_cannot_loop() {
        let mut f = forest(&[("/l/base", None, 1, None), ("/l/o", Some(0), 1, None)]);
        let nodes = vec![
            (remote(&f, "/r/o"), Some(1), Vec::new()),
            (remote(&f, "/r/base"), None, Vec::new()),
            // A confused agent: out of range, and a two-node cycle.
            (remote(&f, "/r/x"), Some(99), Vec::new()),
            (remote(&f, "/r/c1"), Some(4), Vec::new()),
            (remote(&f, "/r/c2"), Some(3), Vec::new()),
        ];
        f.graft(nodes);
        let names: Vec<String> = f
            .roots
            .iter()
            .map(|&r| f.nodes[r].record.location())
            .collect();
        assert_eq!(
            names,
            ["/l/base", "h:/r/base", "h:/r/c1", "h:/r/c2", "h:/r/x"]
        );
        let base = f.get(Path::new("h:/r/base")).expect("grafted base");
        assert_eq!(f.subtree(base).dependents, 1);
        // c1 and c2: after the two local nodes, fourth and fifth grafted.
        for id in [5, 6] {
            assert!(f.nodes[id].flags.contains(&Flag::Cycle));
        }
    }

    /// Two hosts that see one directory (shared storage): each file once,
    /// with both hosts; what uses it on either counts.
    #[test]
    fn a_file_two_hosts_see_is_grafted_once() {
        use crate::engine::preflight::VmUser;
        use crate::engine::LockState;
        let template = forest(&[("/t", None, 1, None)]);
        let on = |host: &str, path: &str, lock: LockState| {
            let mut r = remote(&template, path);
            r.host = Some(host.into());
            r.key = PathBuf::from(format!("{host}:{path}"));
            r.identity = Some(format!("local m 1 {path}"));
            r.lock = lock;
            r
        };
        let h1 = vec![
            (on("h1", "/s/base", LockState::None), None, Vec::new()),
            (on("h1", "/s/o", LockState::None), Some(0), Vec::new()),
        ];
        let mut o2 = on("h2", "/mnt/s/o", LockState::Writer);
        o2.vms.push(VmUser {
            name: "web".into(),
            uuid: "u".into(),
            state: "shut off".into(),
            connection: "qemu:///system".into(),
        });
        let only2 = on("h2", "/mnt/s/o2", LockState::None);
        let h2 = vec![
            (on("h2", "/mnt/s/base", LockState::None), None, Vec::new()),
            (o2, Some(0), Vec::new()),
            (only2, Some(0), Vec::new()),
        ];
        let mut f = Forest::default();
        f.graft(h1);
        // h2 names the files by other paths: their identity matches.
        let h2: Vec<_> = h2
            .into_iter()
            .map(|(mut r, p, fl)| {
                r.identity = r.identity.map(|i| i.replace("/mnt", ""));
                (r, p, fl)
            })
            .collect();
        f.graft(h2);
        assert_eq!(f.nodes.len(), 3, "base and o once, o2 of h2 alone");
        let o = f.get(Path::new("h1:/s/o")).expect("o");
        assert_eq!(f.get(Path::new("h2:/mnt/s/o")), Some(o));
        let r = &f.nodes[o].record;
        assert_eq!(
            r.seen_on,
            vec![("h2".to_string(), PathBuf::from("/mnt/s/o"))]
        );
        assert_eq!(r.hosts_label().as_deref(), Some("h1+h2"));
        assert_eq!(r.lock, LockState::Writer, "h2's lock counts");
        assert_eq!(r.vms.len(), 1, "h2's domain counts");
        let base = f.get(Path::new("h1:/s/base")).expect("base");
        let o2 = f.get(Path::new("h2:/mnt/s/o2")).expect("o2");
        assert_eq!(f.nodes[o2].parent, Some(base), "under the shared base");
        assert_eq!(f.nodes[base].children, vec![o, o2]);
        assert_eq!(f.roots, vec![base]);
    }
}
