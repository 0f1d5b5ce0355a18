//! A small worker pool for engine operations: the only place that spawns
//! threads to run them. Each job has an id, the images it touches and a
//! state; state changes are sent as [`JobEvent`]s, progress is read from a
//! shared [`Progress`] whenever the UI wants (no event per byte). Two jobs
//! touching the same image never run at the same time: a later one waits in
//! the queue until the earlier one is finished.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use crossbeam_channel::Sender;

use crate::engine::{fault, Cancel, Error, Progress};

pub type JobId = u64;

/// Workers started by [`Jobs::new`] unless told otherwise: the machines this
/// runs on are small, and image operations are I/O bound.
pub const DEFAULT_WORKERS: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed(String),
    Cancelled,
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed(_) | JobState::Cancelled
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// How far a job is: `done` of `total` bytes of the guest disk gone
/// through (the bar), and the data bytes actually `copied` (a commit of a
/// small overlay goes through the whole disk but copies little).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobProgress {
    pub done: u64,
    pub total: u64,
    pub copied: u64,
}

impl JobProgress {
    fn of(p: &Progress) -> JobProgress {
        let (done, total) = p.snapshot();
        JobProgress {
            done,
            total,
            copied: p.copied(),
        }
    }
}

/// Sent whenever a job changes state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub id: JobId,
    pub state: JobState,
    /// The image the job made, if it made one (a clone's new overlay), so a
    /// UI can show and select it.
    pub created: Option<PathBuf>,
    /// Progress when the job finished: its live progress is dropped with
    /// it, and a UI polling on ticks may have missed the end.
    pub progress: JobProgress,
}

/// What a job runs. It returns the path of an image it created, if any.
pub type Work =
    Box<dyn FnOnce(&Progress, &Cancel) -> crate::engine::Result<Option<PathBuf>> + Send>;

struct Pending {
    id: JobId,
    touches: Vec<PathBuf>,
    work: Work,
    /// The submitter's fault plan (tests), in force while the job runs.
    faults: fault::Inherited,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Pending>,
    /// Images touched by running jobs.
    busy: HashSet<PathBuf>,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Progress and cancel flag of every job not yet finished.
    live: Mutex<HashMap<JobId, (Arc<Progress>, Cancel)>>,
    events: Box<dyn Fn(JobEvent) + Send + Sync>,
}

pub struct Jobs {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    next_id: JobId,
}

/// A poisoned lock means a worker panicked while holding it; the queue data
/// is still consistent (every change is a single push/remove), so go on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Jobs {
    /// Start `workers` threads; job events go to `events`, converted into
    /// whatever event type the receiver merges them into.
    pub fn new<T: From<JobEvent> + Send + 'static>(workers: usize, events: Sender<T>) -> Jobs {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            live: Mutex::new(HashMap::new()),
            // A receiver gone means nobody listens any more: not an error.
            events: Box::new(move |e| {
                let _ = events.send(T::from(e));
            }),
        });
        let workers = (0..workers.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("cowshed-job-{i}"))
                    .spawn(move || worker(&shared))
            })
            // A pool that cannot start a thread runs nothing; the UI still
            // works read-only and the job stays queued, which it shows.
            .filter_map(Result::ok)
            .collect();
        Jobs {
            shared,
            workers,
            next_id: 1,
        }
    }

    /// Queue `work`, which touches the images `touches` (canonical paths,
    /// so the same file reached two ways is one image).
    pub fn submit(&mut self, touches: Vec<PathBuf>, work: Work) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        lock(&self.shared.live).insert(id, (Arc::new(Progress::new()), Cancel::new()));
        (self.shared.events)(JobEvent {
            id,
            state: JobState::Queued,
            created: None,
            progress: JobProgress::default(),
        });
        lock(&self.shared.queue).pending.push_back(Pending {
            id,
            touches,
            work,
            faults: fault::inherit(),
        });
        self.shared.wake.notify_all();
        id
    }

    /// Ask a job to stop: a queued one is dropped, a running one stops at
    /// its next cancellation check.
    pub fn cancel(&self, id: JobId) {
        let removed = {
            let mut q = lock(&self.shared.queue);
            let before = q.pending.len();
            q.pending.retain(|p| p.id != id);
            before != q.pending.len()
        };
        if removed {
            lock(&self.shared.live).remove(&id);
            (self.shared.events)(JobEvent {
                id,
                state: JobState::Cancelled,
                created: None,
                progress: JobProgress::default(),
            });
        } else if let Some((_, c)) = lock(&self.shared.live).get(&id) {
            c.cancel();
        }
    }

    /// Progress of a job not yet finished.
    pub fn progress(&self, id: JobId) -> Option<JobProgress> {
        lock(&self.shared.live)
            .get(&id)
            .map(|(p, _)| JobProgress::of(p))
    }
}

impl Drop for Jobs {
    /// Cancel what runs, drop what waits, and wait for the workers, so no
    /// operation is left half done when the program ends normally.
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        for (_, c) in lock(&self.shared.live).values() {
            c.cancel();
        }
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if q.shutdown {
                    return;
                }
                // First queued job whose images are all free: jobs on
                // different images overtake a blocked one, jobs on the same
                // image keep their order.
                let mut claimed: HashSet<&PathBuf> = HashSet::new();
                let mut pick = None;
                for (i, p) in q.pending.iter().enumerate() {
                    let free = p
                        .touches
                        .iter()
                        .all(|t| !q.busy.contains(t) && !claimed.contains(t));
                    if free {
                        pick = Some(i);
                        break;
                    }
                    claimed.extend(p.touches.iter());
                }
                if let Some(job) = pick.and_then(|i| q.pending.remove(i)) {
                    q.busy.extend(job.touches.iter().cloned());
                    break job;
                }
                q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let handles = lock(&shared.live).get(&job.id).cloned();
        let (progress, cancel) = handles.unwrap_or_default();
        (shared.events)(JobEvent {
            id: job.id,
            state: JobState::Running,
            created: None,
            progress: JobProgress::default(),
        });
        let work = job.work;
        let _faults = job.faults.enter();
        // A panicking operation fails its job, not the pool.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&progress, &cancel)));
        let (state, created) = match result {
            Ok(Ok(created)) => (JobState::Done, created),
            Ok(Err(Error::Cancelled)) => (JobState::Cancelled, None),
            Ok(Err(e)) => (JobState::Failed(e.to_string()), None),
            Err(_) => (
                JobState::Failed("internal error: the operation panicked".into()),
                None,
            ),
        };
        let last = JobProgress::of(&progress);
        lock(&shared.live).remove(&job.id);
        {
            let mut q = lock(&shared.queue);
            for t in &job.touches {
                q.busy.remove(t);
            }
        }
        shared.wake.notify_all();
        (shared.events)(JobEvent {
            id: job.id,
            state,
            created,
            progress: last,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn wait_finished(rx: &crossbeam_channel::Receiver<JobEvent>, n: usize) -> Vec<JobEvent> {
        let mut out = Vec::new();
        while out
            .iter()
            .filter(|e: &&JobEvent| e.state.is_finished())
            .count()
            < n
        {
            out.push(rx.recv_timeout(Duration::from_secs(10)).expect("job event"));
        }
        out
    }

    #[test]
    fn same_image_jobs_never_overlap() {
        let (tx, rx) = crossbeam_channel::unbounded::<JobEvent>();
        let mut jobs = Jobs::new(2, tx);
        let running = Arc::new(AtomicUsize::new(0));
        let max_seen = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let (r, m) = (Arc::clone(&running), Arc::clone(&max_seen));
            jobs.submit(
                vec![PathBuf::from("/same")],
                Box::new(move |_, _| {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(20));
                    r.fetch_sub(1, Ordering::SeqCst);
                    Ok(None)
                }),
            );
        }
        let ev = wait_finished(&rx, 4);
        assert_eq!(max_seen.load(Ordering::SeqCst), 1);
        assert_eq!(
            ev.iter().filter(|e| e.state == JobState::Done).count(),
            4,
            "{ev:?}"
        );
    }

    #[test]
    fn different_images_run_in_parallel_and_errors_are_reported() {
        let (tx, rx) = crossbeam_channel::unbounded::<JobEvent>();
        let mut jobs = Jobs::new(2, tx);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        for name in ["/a", "/b"] {
            let b = Arc::clone(&barrier);
            // Both must be running at once to pass the barrier.
            jobs.submit(
                vec![PathBuf::from(name)],
                Box::new(move |_, _| {
                    b.wait();
                    Ok(None)
                }),
            );
        }
        let failing = jobs.submit(
            vec![PathBuf::from("/c")],
            Box::new(|_, _| Err(Error::invalid("/c", "broken on purpose"))),
        );
        let ev = wait_finished(&rx, 3);
        let failed = ev.iter().find(|e| e.id == failing && e.state.is_finished());
        assert_eq!(
            failed.map(|e| e.state.clone()),
            Some(JobState::Failed("/c: broken on purpose".into()))
        );
    }

    #[test]
    fn cancel_stops_a_running_job() {
        let (tx, rx) = crossbeam_channel::unbounded::<JobEvent>();
        let mut jobs = Jobs::new(1, tx);
        let id = jobs.submit(
            vec![],
            Box::new(|p, c| {
                p.set_total(100);
                loop {
                    c.check()?;
                    thread::sleep(Duration::from_millis(5));
                }
            }),
        );
        // Wait until it runs, then cancel.
        loop {
            let e = rx.recv_timeout(Duration::from_secs(10)).expect("event");
            if e.state == JobState::Running {
                break;
            }
        }
        // The job sets its total right after it starts running.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while jobs.progress(id).map(|p| (p.done, p.total)) != Some((0, 100)) {
            assert!(
                std::time::Instant::now() < deadline,
                "progress: {:?}",
                jobs.progress(id)
            );
            thread::sleep(Duration::from_millis(1));
        }
        jobs.cancel(id);
        let ev = wait_finished(&rx, 1);
        assert_eq!(
            ev.last().map(|e| e.state.clone()),
            Some(JobState::Cancelled)
        );
    }
}
