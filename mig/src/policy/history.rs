//! What a policy remembers between rounds so that it does not flap: a
//! task it decided to move rests for a cooldown; a move that failed is
//! retried after a pause, and dropped after a few failures.

use std::collections::HashMap;
use std::time::Duration;

use migfs_proto::ids::TaskId;

/// How long tasks rest after a decision and after failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hysteresis {
    /// A task moved (or decided) is not moved again before this.
    pub cooldown: Duration,
    /// A move that failed is not retried before this.
    pub retry_after: Duration,
    /// After this many failed moves in a row a task is dropped: not moved
    /// again for [`Hysteresis::drop_for`].
    pub max_failures: u32,
    /// How long a dropped task is left alone.
    pub drop_for: Duration,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis {
            cooldown: Duration::from_secs(60),
            retry_after: Duration::from_secs(10),
            max_failures: 3,
            drop_for: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    until: Duration,
    failures: u32,
}

/// Per-task rest periods.
#[derive(Clone, Debug, Default)]
pub struct History {
    rest: HashMap<TaskId, Entry>,
}

impl History {
    /// Whether `task` may be moved at `now`.
    pub fn eligible(&self, task: TaskId, now: Duration) -> bool {
        self.rest.get(&task).is_none_or(|e| now >= e.until)
    }

    /// A move of `task` was decided at `now`: it rests for the cooldown.
    pub fn decided(&mut self, task: TaskId, now: Duration, h: &Hysteresis) {
        let e = self.rest.entry(task).or_insert(Entry {
            until: now,
            failures: 0,
        });
        e.until = now + h.cooldown;
    }

    /// The move of `task` succeeded: its failures are forgotten (the
    /// cooldown stays).
    pub fn moved(&mut self, task: TaskId) {
        if let Some(e) = self.rest.get_mut(&task) {
            e.failures = 0;
        }
    }

    /// The move of `task` failed at `now`: retry after a pause, or drop it
    /// after too many failures. Returns whether it was dropped.
    pub fn failed(&mut self, task: TaskId, now: Duration, h: &Hysteresis) -> bool {
        let e = self.rest.entry(task).or_insert(Entry {
            until: now,
            failures: 0,
        });
        e.failures += 1;
        let dropped = e.failures >= h.max_failures;
        e.until = now + if dropped { h.drop_for } else { h.retry_after };
        dropped
    }

    /// The decision about `task` was not carried out (a dry run): forget
    /// it, as if it had not been made.
    pub fn undo(&mut self, task: TaskId) {
        if let Some(e) = self.rest.get(&task)
            && e.failures == 0
        {
            self.rest.remove(&task);
        }
    }

    /// Forgets tasks that no longer exist.
    pub fn retain(&mut self, live: impl Fn(TaskId) -> bool) {
        self.rest.retain(|t, _| live(*t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn a_decided_task_rests_for_the_cooldown() {
        let h = Hysteresis::default();
        let mut hist = History::default();
        let t = TaskId(1);
        assert!(hist.eligible(t, S(0)));
        hist.decided(t, S(10), &h);
        hist.moved(t);
        assert!(!hist.eligible(t, S(69)));
        assert!(hist.eligible(t, S(70)));
        hist.undo(t);
        assert!(hist.eligible(t, S(11)), "an undone decision leaves no rest");
    }

    #[test]
    fn failures_are_retried_then_dropped() {
        let h = Hysteresis::default();
        let mut hist = History::default();
        let t = TaskId(1);
        hist.decided(t, S(0), &h);
        assert!(!hist.failed(t, S(1), &h));
        assert!(!hist.eligible(t, S(10)) && hist.eligible(t, S(11)));
        hist.decided(t, S(11), &h);
        assert!(!hist.failed(t, S(12), &h));
        hist.decided(t, S(22), &h);
        assert!(hist.failed(t, S(23), &h), "third failure drops it");
        assert!(!hist.eligible(t, S(600)) && hist.eligible(t, S(623)));
        hist.retain(|_| false);
        assert!(hist.eligible(t, S(24)));
    }
}
