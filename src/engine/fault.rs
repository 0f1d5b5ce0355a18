//! Named fault-injection points, so that kill, crash and cancel tests choose
//! *where* an operation stops rather than *when* (a delay lands anywhere, or
//! nowhere, depending on the machine's speed).
//!
//! The engine calls [`point`] at the steps that matter for crash safety
//! (after each copied chunk, before a header switch, around a metadata
//! flush, ...). Each pass counts a hit for that name; a plan may act on a
//! chosen hit. Debug builds only (the tests run the dev-profile binary and
//! the test-profile library): in release builds [`point`] is empty.
//!
//! Driven two ways:
//! - Child processes, from the environment: `COWSHED_FAULT=NAME:HIT:ACTION`
//!   (several, comma separated), ACTION `kill` (SIGKILL the process at the
//!   HIT-th pass, 1-based) or `pause` (hold the passing thread until the
//!   file named by `COWSHED_FAULT_RELEASE` exists; the rest of the process,
//!   a Ctrl-C handler or a UI, goes on). `COWSHED_FAULT_TRACE=FILE` appends
//!   `NAME HIT` to FILE for every pass, written before any action, so a
//!   test can first list the points an operation passes and how often, then
//!   stop it at each, and see that the chosen hit was reached (the file is
//!   also what a test waits on to know a pause began).
//! - In-process tests, with a [`Plan`]: entered on a thread, it sees the
//!   points that thread passes (and the jobs it submits: see [`inherit`]),
//!   counts them, and can pause that thread at a chosen hit until the test
//!   releases it. Other tests running in the same process are unaffected.
//!
//! The points (grep `fault::point` for where):
//! - commit: `commit.copied` (each extent copied or zeroed into the base),
//!   `commit.base_flushed`, `commit.before_empty`, `commit.emptied`;
//! - rebase and flatten: `rebase.copied` (each compared chunk's
//!   differences written), `rebase.before_header_switch`,
//!   `rebase.header_switched`;
//! - convert: `convert.raw.batch` (each chunk read), `convert.qcow2.batch_read`,
//!   `convert.qcow2.batch_written`, `convert.qcow2.finished`,
//!   `convert.before_rename`, `convert.renamed`;
//! - the allocating writer: `writer.l2_batch.before`/`.after` (deferred L2
//!   tables written), `writer.releases.before`/`.after`,
//!   `writer.l2_table.before_link`, `writer.refblock.before_link`,
//!   `writer.reftable.before_switch`/`.switched`,
//!   `writer.l1.before_switch`/`.switched`, `writer.backing.before_switch`,
//!   `writer.shrink.discarded`/`.l1_cut`/`.resized`,
//!   `writer.empty.before_rename`;
//! - `check -r`: `check.rebuild.before_switch`, `check.repair.rebuilt`,
//!   `check.repair.refcounts_fixed`, `check.repair.copied_flags_fixed`;
//! - mv (src/engine/ops/move_image.rs): `mv.journal.saved` (each durable
//!   journal write), `mv.rewrite.before_place` (a moved image's own name
//!   spelled absolutely before DST exists), `mv.linked` (each hard link
//!   made), `mv.copied` (each chunk copied across file systems),
//!   `mv.verified` (each copy read back equal), `mv.placed` (DST renamed
//!   or linked into place, before the journal says so),
//!   `mv.rewrite.repoint` (each backing name re-pointed), `mv.removed`
//!   (each file of SRC unlinked), `mv.rewrite.final` (each moved image's
//!   final name), `mv.rollback` (each step of undoing a cancelled move);
//! - `rm`: `rm.stream.rebased` (each dependent rebased onto the streamed
//!   image's backing), `rm.before_unlink` (each image, before it is
//!   deleted or moved into the trash); the trash: `trash.before_rename`
//!   (record written, image not yet moved in), `trash.restored`;
//! - `reset.before_rename` (the fresh image is written and flushed beside
//!   the old one), `reset.renamed`;
//! - snapshot create, apply, delete: `snapshot.written` (the next
//!   metadata generation written, not yet flushed), `snapshot.before_switch`,
//!   `snapshot.switched` (the header points at it);
//! - bitmap add, remove, clear, enable, disable (each action of one call):
//!   `bitmap.written` (the new directory and table written, not yet
//!   flushed), `bitmap.before_switch`, `bitmap.switched` (the header's
//!   bitmaps extension points at the new directory; the old clusters not
//!   yet freed);
//! - amend: `amend.downgrade.written` (the copied L2 and L1 tables, the
//!   snapshot table and the refcount structure of a compat=0.10 image
//!   written, not yet flushed), `amend.downgrade.before_switch`,
//!   `amend.downgrade.switched` (the v2 header points at them; the old
//!   clusters not yet freed); `amend.refcount.written` (the refcount blocks
//!   and table at the new width written), `amend.refcount.before_switch`,
//!   `amend.refcount.switched`;
//! - `create.before_link`; `cli.interrupted` (the Ctrl-C handler ran);
//!   `agent.cancel_passed_on` (a remote agent set a job's cancel flag).

/// Whether points do anything in this build.
pub const ENABLED: bool = cfg!(debug_assertions);

#[cfg(debug_assertions)]
pub use imp::{inherit, point, Entered, Inherited, Plan};

#[cfg(not(debug_assertions))]
pub use off::{inherit, point, Entered, Inherited};

#[cfg(not(debug_assertions))]
mod off {
    /// A named step of an operation (no-op in release builds).
    #[inline(always)]
    pub fn point(_name: &'static str) {}

    pub struct Inherited;
    pub struct Entered;

    #[inline(always)]
    pub fn inherit() -> Inherited {
        Inherited
    }

    impl Inherited {
        #[inline(always)]
        pub fn enter(&self) -> Entered {
            Entered
        }
    }
}

#[cfg(debug_assertions)]
mod imp {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
    use std::time::{Duration, Instant};

    /// A thread paused by a plan that nobody releases (a test that failed
    /// before releasing it) goes on after this long rather than hang.
    const PAUSE_LIMIT: Duration = Duration::from_secs(120);

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ------------------------------------------------------ environment --

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Action {
        Kill,
        Pause,
    }

    struct EnvPlan {
        arms: Vec<(String, u64, Action)>,
        release: Option<std::path::PathBuf>,
        hits: Mutex<HashMap<&'static str, u64>>,
        trace: Option<Mutex<std::fs::File>>,
    }

    fn env_plan() -> Option<&'static EnvPlan> {
        static PLAN: OnceLock<Option<EnvPlan>> = OnceLock::new();
        PLAN.get_or_init(|| {
            let spec = std::env::var("COWSHED_FAULT").unwrap_or_default();
            let trace = std::env::var_os("COWSHED_FAULT_TRACE");
            if spec.is_empty() && trace.is_none() {
                return None;
            }
            let arms: Vec<(String, u64, Action)> = spec
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|arm| parse_arm(arm).unwrap_or_else(|| bad_spec(arm)))
                .collect();
            let trace = trace.map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map(Mutex::new)
                    .unwrap_or_else(|e| bad_spec(&format!("{}: {e}", p.to_string_lossy())))
            });
            let release = std::env::var_os("COWSHED_FAULT_RELEASE").map(Into::into);
            if release.is_none() && arms.iter().any(|a| a.2 == Action::Pause) {
                bad_spec("a pause needs COWSHED_FAULT_RELEASE");
            }
            Some(EnvPlan {
                arms,
                release,
                hits: Mutex::new(HashMap::new()),
                trace,
            })
        })
        .as_ref()
    }

    fn parse_arm(arm: &str) -> Option<(String, u64, Action)> {
        let mut parts = arm.rsplitn(3, ':');
        let action = match parts.next()? {
            "kill" => Action::Kill,
            "pause" => Action::Pause,
            _ => return None,
        };
        let hit: u64 = parts.next()?.parse().ok().filter(|&h| h > 0)?;
        Some((parts.next()?.to_string(), hit, action))
    }

    /// A test asked for something this build cannot do: stop loudly rather
    /// than run an operation the test believes is being interrupted.
    fn bad_spec(what: &str) -> ! {
        eprintln!(
            "cowshed: bad COWSHED_FAULT / COWSHED_FAULT_TRACE ({what}); \
             expected NAME:HIT:kill|pause[,...]"
        );
        std::process::exit(101)
    }

    fn signal_self(sig: libc::c_int) {
        // SAFETY: plain syscalls with no memory arguments.
        unsafe {
            libc::kill(libc::getpid(), sig);
        }
    }

    impl EnvPlan {
        fn pass(&self, name: &'static str) {
            let hit = {
                let mut hits = lock(&self.hits);
                let h = hits.entry(name).or_insert(0);
                *h += 1;
                *h
            };
            let action = self
                .arms
                .iter()
                .find(|(n, h, _)| n == name && *h == hit)
                .map(|a| a.2);
            // Held through a kill: no other thread's line follows this
            // one, so the trace ends where the process died.
            let trace = self.trace.as_ref().map(|t| {
                let mut t = lock(t);
                // One write per line (O_APPEND): a kill cannot tear it.
                let _ = t.write_all(format!("{name} {hit}\n").as_bytes());
                t
            });
            match action {
                Some(Action::Kill) => signal_self(libc::SIGKILL),
                Some(Action::Pause) => {
                    drop(trace);
                    self.wait_for_release();
                }
                None => {}
            }
        }
    }

    impl EnvPlan {
        /// The releasing test is another process: its file is the only
        /// news, so look for it (debug builds only; never a guess at time).
        fn wait_for_release(&self) {
            let Some(file) = &self.release else {
                return;
            };
            let deadline = Instant::now() + PAUSE_LIMIT;
            while !file.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    // ------------------------------------------------------- in-process --

    #[derive(Default)]
    struct State {
        hits: HashMap<&'static str, u64>,
        pauses: Vec<(String, u64)>,
        paused_at: Option<(&'static str, u64)>,
        released: u64,
    }

    #[derive(Default)]
    struct Inner {
        state: Mutex<State>,
        changed: Condvar,
    }

    /// An in-process fault plan: counts the points passed by the threads
    /// that entered it and pauses them at chosen hits. Clones share it.
    #[derive(Clone, Default)]
    pub struct Plan(Arc<Inner>);

    thread_local! {
        static CURRENT: RefCell<Option<Plan>> = const { RefCell::new(None) };
    }

    /// The plan entered on a thread, until dropped (the previous one is
    /// back then).
    pub struct Entered(Option<Plan>);

    impl Drop for Entered {
        fn drop(&mut self) {
            let previous = self.0.take();
            // Gone already when the thread itself is ending: nothing to undo.
            let _ = CURRENT.try_with(|c| *c.borrow_mut() = previous);
        }
    }

    /// The current thread's plan, carried to a thread that runs work on
    /// its behalf (a job worker).
    pub struct Inherited(Option<Plan>);

    /// Capture the current thread's plan (if any).
    pub fn inherit() -> Inherited {
        Inherited(current())
    }

    /// The thread's plan; none while the thread is being torn down (a
    /// writer dropped then still passes points).
    fn current() -> Option<Plan> {
        CURRENT.try_with(|c| c.borrow().clone()).ok().flatten()
    }

    impl Inherited {
        /// Enter the captured plan on this thread (nothing if there was none).
        pub fn enter(&self) -> Entered {
            let previous = CURRENT
                .try_with(|c| c.replace(self.0.clone()))
                .ok()
                .flatten();
            Entered(previous)
        }
    }

    impl Plan {
        pub fn new() -> Self {
            Self::default()
        }

        /// Pause the thread passing `name` for the `hit`-th time (1-based)
        /// until [`Plan::release`].
        pub fn pause_at(self, name: &str, hit: u64) -> Self {
            lock(&self.0.state).pauses.push((name.to_string(), hit));
            self
        }

        /// Make this the current thread's plan until the guard is dropped.
        pub fn enter(&self) -> Entered {
            Inherited(Some(self.clone())).enter()
        }

        /// How often `name` was passed so far.
        pub fn hits(&self, name: &str) -> u64 {
            lock(&self.0.state).hits.get(name).copied().unwrap_or(0)
        }

        /// Every point passed so far and how often.
        pub fn all_hits(&self) -> HashMap<String, u64> {
            lock(&self.0.state)
                .hits
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect()
        }

        /// Wait until a thread is paused by this plan; where, or `None`
        /// after `timeout` (a hang guard, not a guess at how long the work
        /// takes).
        pub fn wait_paused(&self, timeout: Duration) -> Option<(String, u64)> {
            let deadline = Instant::now() + timeout;
            let mut st = lock(&self.0.state);
            loop {
                if let Some((n, h)) = st.paused_at {
                    return Some((n.to_string(), h));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                st = self
                    .0
                    .changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }

        /// Let the paused thread go on.
        pub fn release(&self) {
            let mut st = lock(&self.0.state);
            st.released += 1;
            st.paused_at = None;
            self.0.changed.notify_all();
        }

        fn pass(&self, name: &'static str) {
            let mut st = lock(&self.0.state);
            let hit = {
                let h = st.hits.entry(name).or_insert(0);
                *h += 1;
                *h
            };
            if !st.pauses.iter().any(|(n, h)| n == name && *h == hit) {
                return;
            }
            let ticket = st.released;
            st.paused_at = Some((name, hit));
            self.0.changed.notify_all();
            let deadline = Instant::now() + PAUSE_LIMIT;
            while st.released == ticket {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    st.paused_at = None;
                    return;
                }
                st = self
                    .0
                    .changed
                    .wait_timeout(st, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// A named step of an operation: counted, traced, and acted on as the
    /// plan in force says (the thread's own plan first, else the
    /// environment's).
    pub fn point(name: &'static str) {
        if let Some(plan) = current() {
            plan.pass(name);
        } else if let Some(plan) = env_plan() {
            plan.pass(name);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn arms_parse() {
            let (n, h, a) = parse_arm("commit.copied:3:kill").unwrap();
            assert_eq!(
                (n.as_str(), h, a == Action::Kill),
                ("commit.copied", 3, true)
            );
            assert!(parse_arm("x:0:kill").is_none());
            assert!(parse_arm("x:1:explode").is_none());
            assert!(parse_arm("x:kill").is_none());
        }

        #[test]
        fn a_plan_counts_and_pauses_only_its_threads() {
            let plan = Plan::new().pause_at("t.step", 2);
            let other = std::thread::spawn(|| point("t.step"));
            let worker = {
                let plan = plan.clone();
                std::thread::spawn(move || {
                    let _in = plan.enter();
                    for _ in 0..3 {
                        point("t.step");
                    }
                })
            };
            assert_eq!(
                plan.wait_paused(Duration::from_secs(60)),
                Some(("t.step".to_string(), 2))
            );
            other.join().unwrap();
            assert_eq!(plan.hits("t.step"), 2);
            plan.release();
            worker.join().unwrap();
            assert_eq!(plan.hits("t.step"), 3);
            // Left: nothing is in force on this thread.
            point("t.step");
            assert_eq!(plan.hits("t.step"), 3);
        }
    }
}
