//! The reclaim view (`D`): the images whose deletion frees space without
//! breaking anything, the likeliest leaks first. A pure function of the
//! forest and the time, tested on forests built in memory.

use crate::engine::preflight::VmUsers;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::catalog::{Flag, Forest, NodeId};
use crate::engine::LockState;

/// One image that could go.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: NodeId,
    pub key: PathBuf,
    pub allocated: u64,
    /// Since its last write (mtime); zero when unknown or in the future.
    pub age: Duration,
}

impl Candidate {
    /// Big and long untouched first: bytes times seconds.
    pub fn score(&self) -> u128 {
        u128::from(self.allocated) * u128::from(self.age.as_secs())
    }
}

/// Images nothing depends on (no overlay among the scanned images, no
/// defined libvirt domain, running or not) and no process holds, found under the roots (a base outside them is not the
/// operator's to reclaim here), sorted by size × age, then size, then
/// path. Files that are no image are left out: they are not cowshed's to
/// delete.
pub fn candidates(f: &Forest, vms: &VmUsers, now: SystemTime) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = f
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.children.is_empty()
                && n.record.lock == LockState::None
                && !(n.record.host.is_none() && vms.by_file.contains_key(&n.record.dev_ino))
                && n.record.vms.is_empty()
                && !n
                    .flags
                    .iter()
                    .any(|fl| matches!(fl, Flag::Skipped { .. } | Flag::OutsideRoots))
        })
        .map(|(id, n)| Candidate {
            id,
            key: n.record.key.clone(),
            allocated: n.record.sizes.allocated,
            age: n
                .record
                .mtime
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| {
        b.score()
            .cmp(&a.score())
            .then_with(|| b.allocated.cmp(&a.allocated))
            .then_with(|| a.key.cmp(&b.key))
    });
    out
}

/// `40 d`, `5 h`, `12 min`, `9 s`: the largest whole unit.
pub fn age_text(age: Duration) -> String {
    let s = age.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

/// The view's state: the list as last built and the row selected.
#[derive(Debug, Clone, Default)]
pub struct ReclaimView {
    pub rows: Vec<Candidate>,
    pub selected: usize,
}

impl ReclaimView {
    /// Build the list again (a new forest), keeping the selected image
    /// selected while it is listed.
    pub fn rebuild(&mut self, f: &Forest, vms: &VmUsers, now: SystemTime) {
        let key = self.rows.get(self.selected).map(|c| c.key.clone());
        self.rows = candidates(f, vms, now);
        self.selected = key
            .and_then(|k| self.rows.iter().position(|c| c.key == k))
            .unwrap_or(self.selected)
            .min(self.rows.len().saturating_sub(1));
    }

    pub fn total(&self) -> u64 {
        self.rows.iter().map(|c| c.allocated).sum()
    }

    pub fn selected_key(&self) -> Option<&PathBuf> {
        self.rows.get(self.selected).map(|c| &c.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Holder;

    const DAY: u64 = 86_400;

    /// A forest from `(path, parent, allocated MiB, days since written)`.
    fn forest(now: SystemTime, spec: &[(&str, Option<usize>, u64, u64)]) -> Forest {
        let spec: Vec<_> = spec
            .iter()
            .map(|&(p, parent, mib, days)| {
                (p, parent, mib, Some(now - Duration::from_secs(days * DAY)))
            })
            .collect();
        crate::catalog::forest::test_support::forest(&spec)
    }

    fn names(c: &[Candidate]) -> Vec<&str> {
        c.iter()
            .map(|c| c.key.to_str().expect("utf-8"))
            .collect::<Vec<_>>()
    }

    #[test]
    fn leaves_nobody_holds_sorted_by_size_times_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 * DAY);
        let mut f = forest(
            now,
            &[
                ("/vm/base.qcow2", None, 900, 300),   // 0: has overlays
                ("/vm/web-1.qcow2", Some(0), 10, 30), // 300
                ("/vm/web-2.qcow2", Some(0), 100, 1), // 100
                ("/vm/old.qcow2", None, 5, 200),      // 1000
                ("/vm/held.qcow2", None, 999, 999),   // held
                ("/vm/notes.txt", None, 50, 900),     // no image
                ("/ext/base.qcow2", None, 70, 900),   // outside the roots
                ("/vm/tie-a.qcow2", None, 100, 1),    // 100, as web-2
                ("/vm/new.qcow2", None, 400, 0),      // written just now
            ],
        );
        f.nodes[4].record.lock = LockState::Writer;
        f.nodes[4].record.holders = vec![Holder {
            pid: 42,
            command: "qemu".into(),
            writable: true,
        }];
        f.nodes[5].flags.push(Flag::Skipped {
            reason: "no image header".into(),
        });
        f.nodes[6].flags.push(Flag::OutsideRoots);
        let c = candidates(&f, &VmUsers::default(), now);
        assert_eq!(
            names(&c),
            [
                "/vm/old.qcow2",
                "/vm/web-1.qcow2",
                "/vm/tie-a.qcow2",
                "/vm/web-2.qcow2",
                "/vm/new.qcow2"
            ]
        );
        assert_eq!(c[0].age, Duration::from_secs(200 * DAY));
        assert_eq!(age_text(c[0].age), "200 d");
        assert_eq!(c[4].score(), 0);

        // A reader holds an image too; the view keeps its selection.
        let mut view = ReclaimView::default();
        view.rebuild(&f, &VmUsers::default(), now);
        view.selected = 2;
        assert_eq!(view.total(), (5 + 10 + 100 + 100 + 400) << 20);
        f.nodes[1].record.lock = LockState::Reader;
        view.rebuild(&f, &VmUsers::default(), now);
        assert_eq!(
            view.selected_key().map(|k| k.to_str().expect("utf-8")),
            Some("/vm/tie-a.qcow2")
        );
        assert_eq!(view.rows.len(), 4);
        // So does a defined libvirt domain, even shut off.
        f.nodes[2].record.dev_ino = (1, 42);
        let mut vms = VmUsers::default();
        vms.by_file.insert(
            f.nodes[2].record.dev_ino,
            vec![crate::engine::preflight::VmUser {
                name: "web".into(),
                uuid: "u".into(),
                state: "shut off".into(),
                connection: "qemu:///system".into(),
            }],
        );
        view.rebuild(&f, &vms, now);
        assert_eq!(view.rows.len(), 3);
        assert!(view.rows.iter().all(|c| c.id != 2));
    }

    #[test]
    fn ages_in_their_largest_unit() {
        assert_eq!(age_text(Duration::from_secs(9)), "9 s");
        assert_eq!(age_text(Duration::from_secs(720)), "12 min");
        assert_eq!(age_text(Duration::from_secs(5 * 3600 + 59)), "5 h");
        assert_eq!(age_text(Duration::from_secs(3 * DAY)), "3 d");
    }
}
