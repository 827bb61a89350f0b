//! What a policy remembers between rounds so that it does not flap: a
//! task it decided to move rests for a cooldown; a move that failed is
//! retried after a pause, and dropped after a few failures; the two nodes
//! of a move settle until they have reported a sample taken wholly after
//! it (until then their figures still show the move: a frozen original
//! holding its memory, a restored process not measured yet).

use std::collections::HashMap;
use std::time::Duration;

use migfs_proto::ids::{NodeId, TaskId};

use super::{ClusterState, Decision, Outcome};

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

/// Per-task rest periods, settling nodes.
#[derive(Clone, Debug, Default)]
pub struct History {
    rest: HashMap<TaskId, Entry>,
    /// Nodes a move touched: the report number they must reach (`None`
    /// until the next round saw their latest).
    settling: HashMap<NodeId, Option<u64>>,
}

/// Reports a settling node must send after the first round that follows
/// the move: the first of them may cover a sample begun before the move
/// ended; the second cannot.
const SETTLE_REPORTS: u64 = 2;

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

    /// Records how the execution of `d` went (what every policy's
    /// [`super::Policy::outcome`] does).
    pub fn outcome(&mut self, d: &Decision, outcome: &Outcome, now: Duration, h: &Hysteresis) {
        match outcome {
            Outcome::Moved => {
                self.moved(d.task);
                self.settle(d.from, d.to);
            }
            Outcome::Failed(_) => {
                self.failed(d.task, now, h);
            }
            Outcome::NotTried => self.undo(d.task),
        }
    }

    /// Forgets tasks that no longer exist.
    pub fn retain(&mut self, live: impl Fn(TaskId) -> bool) {
        self.rest.retain(|t, _| live(*t));
    }

    /// A move between `from` and `to` was carried out: both settle.
    pub fn settle(&mut self, from: NodeId, to: NodeId) {
        self.settling.insert(from, None);
        self.settling.insert(to, None);
    }

    /// Takes the reports of a new round: settling nodes that reported
    /// enough since are settled (a node without a report, or gone, too).
    pub fn observe(&mut self, s: &ClusterState) {
        self.settling.retain(|id, until| {
            let Some(seq) = s.node(*id).and_then(|n| Some(n.load.as_ref()?.seq)) else {
                return false;
            };
            let target = *until.get_or_insert(seq + SETTLE_REPORTS);
            // A restarted agent counts from 1 again.
            seq < target && seq + 2 * SETTLE_REPORTS >= target
        });
    }

    /// Whether `node` has settled since the last move that touched it.
    pub fn settled(&self, node: NodeId) -> bool {
        !self.settling.contains_key(&node)
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
    fn the_nodes_of_a_move_settle_for_two_reports_after_the_next_round() {
        use crate::policy::testing::{MIB, node};
        let mut s = ClusterState {
            nodes: vec![node(1, 0.0, MIB, MIB), node(2, 0.0, MIB, MIB)],
            tasks: Vec::new(),
        };
        let seq = |s: &mut ClusterState, v: u64| {
            for n in &mut s.nodes {
                n.load.as_mut().unwrap().seq = v;
            }
        };
        seq(&mut s, 10);
        let mut hist = History::default();
        hist.settle(NodeId(1), NodeId(2));
        for (v, settled) in [(10, false), (11, false), (12, true)] {
            seq(&mut s, v);
            hist.observe(&s);
            assert_eq!(hist.settled(NodeId(1)), settled, "at report {v}");
            assert_eq!(hist.settled(NodeId(2)), settled, "at report {v}");
        }
        // A node that restarted its count, or stopped reporting, is settled.
        hist.settle(NodeId(1), NodeId(2));
        hist.observe(&s);
        seq(&mut s, 1);
        s.nodes[1].load = None;
        hist.observe(&s);
        assert!(hist.settled(NodeId(1)) && hist.settled(NodeId(2)));
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
