//! One timer structure for all sessions: an ordered set of (due time, name)
//! and one task that sleeps until the earliest entry. Setting or clearing a
//! session's time is O(log n), and nothing polls the sessions: 100,000 idle
//! sessions cost one sleeping task.
//!
//! Due times are wall-clock milliseconds, but tokio's timers run on the
//! monotonic clock, which stands still while the machine is suspended. So
//! the loop also wakes when the wall clock jumps (a resume, or a clock
//! step; see [`crate::clock`]), compares how far each clock moved since its
//! last look, and on a jump takes every entry that is now due at once. It
//! never sleeps longer than [`MAX_SLEEP`] either, as a fallback where the
//! jump signal is unavailable. Serving never relies on the scheduler anyway:
//! every `get` checks the expiry itself.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::clock::{Clock, SystemClock};

/// Longest sleep between looks at the wall clock.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// A difference between wall and monotonic progress above this is a jump.
const JUMP_THRESHOLD_MS: i64 = 2_000;

#[derive(Default)]
struct Queue {
    by_time: BTreeSet<(u64, Arc<str>)>,
    by_name: HashMap<Arc<str>, u64>,
}

#[derive(Default)]
pub struct Scheduler {
    queue: Mutex<Queue>,
    changed: Notify,
    jumps: std::sync::atomic::AtomicU64,
}

impl Scheduler {
    /// Sets when `name` is next due, replacing any earlier plan.
    pub fn schedule(&self, name: &Arc<str>, due_ms: u64) {
        let mut queue = self.lock();
        if let Some(old) = queue.by_name.insert(name.clone(), due_ms) {
            queue.by_time.remove(&(old, name.clone()));
        }
        let is_new_first = queue
            .by_time
            .first()
            .is_none_or(|(first, _)| due_ms < *first);
        queue.by_time.insert((due_ms, name.clone()));
        drop(queue);

        if is_new_first {
            self.changed.notify_one();
        }
    }

    /// Forgets `name`'s plan.
    pub fn unschedule(&self, name: &str) {
        let mut queue = self.lock();
        if let Some((key, due)) = queue.by_name.remove_entry(name) {
            queue.by_time.remove(&(due, key));
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes every entry due at `now`, earliest first.
    fn take_due(&self, now: u64) -> Vec<Arc<str>> {
        let mut queue = self.lock();
        let mut due = Vec::new();
        while let Some((at, _)) = queue.by_time.first() {
            if *at > now {
                break;
            }
            let (_, name) = queue.by_time.pop_first().expect("first exists");
            queue.by_name.remove(&name);
            due.push(name);
        }
        due
    }

    fn next_due(&self) -> Option<u64> {
        self.lock().by_time.first().map(|(at, _)| *at)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs until `shutdown`: hands each due session to `start`, at most
    /// `limit` at once. `start` gets a permit to drop when its refresh ends.
    pub async fn run<F>(self: Arc<Self>, limit: usize, shutdown: CancellationToken, start: F)
    where
        F: Fn(Arc<str>, tokio::sync::OwnedSemaphorePermit),
    {
        self.run_with_clock(&SystemClock::new(), limit, shutdown, start)
            .await
    }

    /// [`Scheduler::run`] on the given clock; tests pass one they control.
    pub async fn run_with_clock<F>(
        self: Arc<Self>,
        clock: &dyn Clock,
        limit: usize,
        shutdown: CancellationToken,
        start: F,
    ) where
        F: Fn(Arc<str>, tokio::sync::OwnedSemaphorePermit),
    {
        let permits = Arc::new(Semaphore::new(limit));
        let mut last_look = (clock.wall_ms(), clock.mono_ms());
        loop {
            let look = (clock.wall_ms(), clock.mono_ms());
            if let Some(jump_ms) = jump(last_look, look) {
                self.jumps
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(
                    jump_s = jump_ms / 1000,
                    "the wall clock jumped (a resume from suspend, or a clock step); \
                     re-checking every due time"
                );
            }
            last_look = look;

            for name in self.take_due(look.0) {
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("never closed"),
                    () = shutdown.cancelled() => return,
                };
                start(name, permit);
            }

            let wait = match self.next_due() {
                Some(at) => {
                    Duration::from_millis(at.saturating_sub(clock.wall_ms())).min(MAX_SLEEP)
                }
                None => MAX_SLEEP,
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.changed.notified() => {}
                () = clock.jumped() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// How many clock jumps the loop has seen.
    pub fn jumps_seen(&self) -> u64 {
        self.jumps.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The wall clock's lead over the monotonic clock between two looks, when
/// it is large enough to be a jump rather than drift. Forward jumps (a
/// resume, a step ahead) and backward steps both count.
fn jump(before: (u64, u64), after: (u64, u64)) -> Option<i64> {
    let wall = after.0 as i64 - before.0 as i64;
    let mono = after.1 as i64 - before.1 as i64;
    let lead = wall - mono;
    (lead.abs() > JUMP_THRESHOLD_MS).then_some(lead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::now_ms;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn entries_come_out_in_time_order_and_only_when_due() {
        let scheduler = Scheduler::default();
        scheduler.schedule(&name("b"), 200);
        scheduler.schedule(&name("a"), 100);
        scheduler.schedule(&name("c"), 300);

        assert!(scheduler.take_due(99).is_empty());
        let due: Vec<String> = scheduler
            .take_due(250)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(due, ["a", "b"]);
        assert_eq!(scheduler.next_due(), Some(300));
    }

    #[test]
    fn rescheduling_replaces_the_old_time() {
        let scheduler = Scheduler::default();
        scheduler.schedule(&name("a"), 100);
        scheduler.schedule(&name("a"), 500);
        assert_eq!(scheduler.len(), 1);
        assert!(scheduler.take_due(400).is_empty());
        assert_eq!(scheduler.take_due(500).len(), 1);
    }

    #[test]
    fn unscheduled_sessions_never_come_due() {
        let scheduler = Scheduler::default();
        scheduler.schedule(&name("a"), 100);
        scheduler.unschedule("a");
        assert!(scheduler.take_due(u64::MAX).is_empty());
        assert_eq!(scheduler.len(), 0);
    }

    #[tokio::test]
    async fn the_loop_starts_due_sessions_and_honours_the_limit() {
        let scheduler = Arc::new(Scheduler::default());
        let now = now_ms();
        for i in 0..10 {
            scheduler.schedule(&Arc::from(format!("s{i}")), now);
        }

        let started = Arc::new(Mutex::new(Vec::new()));
        let held = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(scheduler.clone().run(3, shutdown.clone(), {
            let started = started.clone();
            let held = held.clone();
            move |name, permit| {
                started.lock().unwrap().push(name);
                held.lock().unwrap().push(permit);
            }
        }));

        tokio::time::sleep(Duration::from_millis(100)).await;
        // The permits are held, so only three may have started.
        assert_eq!(started.lock().unwrap().len(), 3);

        held.lock().unwrap().clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(started.lock().unwrap().len(), 6);

        shutdown.cancel();
        run.await.unwrap();
    }

    /// A laptop sleeps for an hour through a session's due time. tokio's
    /// timer (monotonic) has not moved, but on wake the session is started
    /// at once, not when the timer would have fired.
    #[tokio::test]
    async fn a_due_time_passed_in_suspend_is_noticed_at_once_on_wake() {
        use crate::clock::tests::ManualClock;

        let start_ms = 1_800_000_000_000;
        let clock = Arc::new(ManualClock::at(start_ms));
        let scheduler = Arc::new(Scheduler::default());
        // Due in ten minutes; the loop sleeps its longest, 30 s.
        scheduler.schedule(&name("laptop"), start_ms + 600_000);

        let started = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let run = tokio::spawn({
            let (scheduler, clock, started) = (scheduler.clone(), clock.clone(), started.clone());
            let shutdown = shutdown.clone();
            async move {
                scheduler
                    .run_with_clock(&*clock, 4, shutdown, move |name, _permit| {
                        started.lock().unwrap().push(name)
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(started.lock().unwrap().is_empty(), "started before due");

        let woke = std::time::Instant::now();
        clock.suspend(3_600_000);
        while started.lock().unwrap().is_empty() {
            assert!(
                woke.elapsed() < Duration::from_secs(2),
                "the due session waited for the monotonic timer"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(scheduler.jumps_seen(), 1);
        assert_eq!(started.lock().unwrap().len(), 1);

        shutdown.cancel();
        run.await.unwrap();
    }

    #[test]
    fn only_a_gap_between_the_clocks_is_a_jump() {
        assert_eq!(jump((0, 0), (30_000, 30_000)), None);
        assert_eq!(jump((0, 0), (31_000, 30_000)), None);
        assert_eq!(jump((0, 0), (3_630_000, 30_000)), Some(3_600_000));
        assert_eq!(jump((100_000, 0), (40_000, 30_000)), Some(-90_000));
    }
}
