//! `cpu`: spread CPU-bound tasks. A node whose CPU load is above the
//! cluster mean by at least `threshold` gives a CPU-bound task to the
//! least-loaded node, if that narrows the gap between the two by at least
//! `min_gain`.
//!
//! A node's load is its runnable threads over the last sample (demand, see
//! `NodeLoad`), brought up to date with moves its report has not seen yet
//! ([`ClusterState::adjusted`]); a task's load is its own demand. Moving a
//! task of demand `d` between nodes `gap` apart leaves them `|gap - 2d|`
//! apart, so a move needs `0 < d < gap`: then the sum of squared node
//! loads falls with every move, the moves stop, and the same task can
//! never be sent back (the reverse gap is below its demand). On top of
//! that, `min_gain` ignores gains smaller than measurement noise, and a
//! moved task rests for the cooldown ([`super::Hysteresis`]).

use std::collections::HashMap;
use std::time::Duration;

use migfs_proto::ids::{NodeId, TaskId};

use super::history::History;
use super::{ClusterState, Common, Decision, Outcome, Policy, TaskView, decision};

/// The `cpu` policy's thresholds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// How far above the cluster mean (runnable threads) a node must be
    /// before tasks move off it.
    pub threshold: f64,
    /// Least narrowing of the gap between source and target a move must
    /// bring (runnable threads).
    pub min_gain: f64,
    /// Least demand (CPUs) of a task that counts as CPU-bound.
    pub cpu_bound: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            threshold: 0.5,
            min_gain: 0.5,
            cpu_bound: 0.5,
        }
    }
}

/// Spreads CPU-bound tasks.
#[derive(Debug)]
pub struct CpuPolicy {
    common: Common,
    t: Thresholds,
    history: History,
    /// Last known demand of each task (a task just moved has none in the
    /// report of its new node yet).
    known: HashMap<TaskId, f64>,
}

impl CpuPolicy {
    /// A policy with these settings.
    pub fn new(common: Common, t: Thresholds) -> CpuPolicy {
        CpuPolicy {
            common,
            t,
            history: History::default(),
            known: HashMap::new(),
        }
    }

    fn demand(&self, t: &TaskView) -> Option<f64> {
        t.cpu.or_else(|| self.known.get(&t.id).copied())
    }

    /// Each usable node's load, brought up to date with the task table.
    fn loads(&self, s: &ClusterState) -> Vec<(NodeId, f64)> {
        s.usable(self.common.stale)
            .filter(|(n, _)| self.history.settled(n.id))
            .map(|(n, l)| {
                let load = s.adjusted(n, l.runnable, |f| f.0, |t| self.demand(t));
                (n.id, load)
            })
            .collect()
    }

    /// The task on `from` whose move to a node `gap` below it narrows the
    /// gap most (at least `min_gain`), with its demand.
    fn pick(
        &self,
        s: &ClusterState,
        from: NodeId,
        gap: f64,
        now: Duration,
        taken: &[TaskId],
    ) -> Option<(TaskId, f64)> {
        let gain = |d: f64| gap - (gap - 2.0 * d).abs();
        s.tasks_on(from)
            .filter(|t| !t.pinned && !t.moving && !taken.contains(&t.id))
            .filter(|t| self.history.eligible(t.id, now))
            .filter_map(|t| Some((t, self.demand(t)?)))
            .filter(|(_, d)| *d >= self.t.cpu_bound && gain(*d) >= self.t.min_gain)
            .max_by(|(a, da), (b, db)| {
                gain(*da)
                    .total_cmp(&gain(*db))
                    .then(b.moves.cmp(&a.moves))
                    .then(b.id.cmp(&a.id))
            })
            .map(|(t, d)| (t.id, d))
    }
}

impl Policy for CpuPolicy {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn decide(&mut self, s: &ClusterState, now: Duration) -> Vec<Decision> {
        for t in &s.tasks {
            if let Some(c) = t.cpu {
                self.known.insert(t.id, c);
            }
        }
        self.known
            .retain(|id, _| s.tasks.iter().any(|t| t.id == *id));
        self.history.retain(|id| s.tasks.iter().any(|t| t.id == id));
        self.history.observe(s);
        let mut loads = self.loads(s);
        if loads.len() < 2 {
            return Vec::new();
        }
        let mean = loads.iter().map(|l| l.1).sum::<f64>() / loads.len() as f64;
        let mut out: Vec<Decision> = Vec::new();
        while out.len() < self.common.max_moves {
            // Highest first, ties by id: the same state gives the same moves.
            loads.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let ((src, hi), (dst, lo)) = (loads[0], loads[loads.len() - 1]);
            if hi - mean < self.t.threshold {
                break;
            }
            let taken: Vec<TaskId> = out.iter().map(|d| d.task).collect();
            let Some((task, d)) = self.pick(s, src, hi - lo, now, &taken) else {
                break;
            };
            let reason = format!(
                "{} has {hi:.2} runnable threads, {:.2} above the cluster mean {mean:.2} \
                 (threshold {:.2}); {task} is CPU-bound ({d:.2} CPUs); {} is the least \
                 loaded ({lo:.2}); after the move {:.2} and {:.2}",
                s.name(src),
                hi - mean,
                self.t.threshold,
                s.name(dst),
                hi - d,
                lo + d,
            );
            self.history.decided(task, now, &self.common.hysteresis);
            out.push(decision(s, task, src, dst, reason));
            loads[0].1 -= d;
            let last = loads.len() - 1;
            loads[last].1 += d;
        }
        out
    }

    fn outcome(&mut self, d: &Decision, outcome: &Outcome, now: Duration) {
        self.history
            .outcome(d, outcome, now, &self.common.hysteresis);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{MIB, add_task, apply, node, spread, tick};
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy() -> CpuPolicy {
        CpuPolicy::new(Common::default(), Thresholds::default())
    }

    /// Two nodes, `n1` with `busy` CPU-bound tasks, `n2` with none.
    fn two_nodes(busy: u64) -> ClusterState {
        let mut s = ClusterState {
            nodes: vec![
                node(1, 0.05, 1024 * MIB, 512 * MIB),
                node(2, 0.05, 1024 * MIB, 512 * MIB),
            ],
            tasks: Vec::new(),
        };
        for i in 0..busy {
            add_task(&mut s, 10 + i, 1, 1.0, MIB);
        }
        s
    }

    #[test]
    fn four_busy_tasks_end_two_and_two_and_stay() {
        let mut p = policy();
        let mut s = two_nodes(4);
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 2, "{d:#?}");
        assert!(d.iter().all(|d| d.from == NodeId(1) && d.to == NodeId(2)));
        assert!(d[0].reason.contains("above the cluster mean"), "{}", d[0]);
        // The table changes at once, the reports a second later: no round
        // in between, or after, moves anything again.
        apply(&mut s, &d, false);
        assert_eq!(spread(&s), [2, 2]);
        assert!(
            p.decide(&s, S(1)).is_empty(),
            "before the reports caught up"
        );
        let mut s2 = s.clone();
        apply(&mut s2, &d, true);
        for i in 2..300 {
            assert!(p.decide(&s2, S(i)).is_empty(), "round {i}: ping-pong");
        }
    }

    #[test]
    fn one_move_per_round_converges_as_well() {
        let mut p = CpuPolicy::new(
            Common {
                max_moves: 1,
                ..Common::default()
            },
            Thresholds::default(),
        );
        let mut s = two_nodes(4);
        for round in 0..5 {
            let d = p.decide(&s, S(round));
            apply(&mut s, &d, true);
        }
        assert_eq!(spread(&s), [2, 2]);
    }

    #[test]
    fn an_odd_task_out_stays_where_it_is() {
        // 3 on n1, 2 on n2: moving one would only mirror the imbalance.
        let mut p = policy();
        let mut s = two_nodes(3);
        add_task(&mut s, 20, 2, 1.0, MIB);
        add_task(&mut s, 21, 2, 1.0, MIB);
        assert!(p.decide(&s, S(0)).is_empty());
    }

    #[test]
    fn noise_below_the_thresholds_moves_nothing() {
        let mut p = policy();
        let mut s = two_nodes(2);
        add_task(&mut s, 20, 2, 0.9, MIB);
        add_task(&mut s, 21, 2, 0.8, MIB);
        s.nodes[0].load.as_mut().unwrap().runnable += 0.3;
        assert!(p.decide(&s, S(0)).is_empty());
    }

    #[test]
    fn pinned_moving_and_light_tasks_are_left_alone() {
        let mut p = policy();
        let mut s = two_nodes(4);
        s.tasks[0].pinned = true;
        s.tasks[1].moving = true;
        s.tasks[2].cpu = Some(0.1);
        s.nodes[0]
            .load
            .as_mut()
            .unwrap()
            .tasks
            .insert(TaskId(12), (0.1, MIB));
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].task, TaskId(13));
    }

    #[test]
    fn down_stale_and_silent_nodes_are_never_targets() {
        let mut s = two_nodes(4);
        s.nodes.push(node(3, 0.0, MIB, MIB));
        s.nodes.push(node(4, 0.0, MIB, MIB));
        s.nodes.push(node(5, 0.0, MIB, MIB));
        s.nodes[2].up = false;
        s.nodes[3].load.as_mut().unwrap().age = S(60);
        s.nodes[4].load = None;
        let d = policy().decide(&s, S(0));
        assert!(!d.is_empty());
        assert!(d.iter().all(|d| d.to == NodeId(2)), "{d:#?}");
        // Only n1 usable: nothing to balance against.
        s.nodes[1].up = false;
        assert!(policy().decide(&s, S(0)).is_empty());
    }

    #[test]
    fn a_failed_move_is_retried_after_a_pause_then_dropped() {
        let mut p = CpuPolicy::new(
            Common {
                max_moves: 1,
                ..Common::default()
            },
            Thresholds::default(),
        );
        let mut s = two_nodes(2);
        let first = p.decide(&s, S(0));
        assert_eq!(first.len(), 1);
        let t = first[0].task;
        p.outcome(&first[0], &Outcome::Failed("target down".into()), S(0));
        // The other task goes meanwhile (the state is not updated: as if
        // it had failed silently, it stays a candidate after its cooldown).
        let other = p.decide(&s, S(1));
        assert_ne!(other[0].task, t);
        p.outcome(&other[0], &Outcome::Moved, S(1));
        assert!(p.decide(&s, S(5)).is_empty(), "t pauses, the other rests");
        for at in [10, 20] {
            // Two reports since: the nodes of the last move settled.
            tick(&mut s);
            tick(&mut s);
            let again = p.decide(&s, S(at));
            assert_eq!(again[0].task, t, "retried after the pause");
            p.outcome(&again[0], &Outcome::Failed("task exited".into()), S(at));
        }
        // Three failures: dropped for 10 minutes.
        tick(&mut s);
        let d = p.decide(&s, S(100));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].task, other[0].task, "t was dropped");
        assert_eq!(p.decide(&s, S(620))[0].task, t, "back after drop_for");
    }

    #[test]
    fn no_move_touches_a_node_before_it_reported_after_the_last_one() {
        let mut p = CpuPolicy::new(
            Common {
                max_moves: 1,
                ..Common::default()
            },
            Thresholds::default(),
        );
        let mut s = two_nodes(4);
        let d = p.decide(&s, S(0));
        p.outcome(&d[0], &Outcome::Moved, S(0));
        // Table and reports up to date already: still wait for two reports
        // after the next round (one may cover a sample from before).
        apply(&mut s, &d, true);
        assert!(p.decide(&s, S(1)).is_empty());
        tick(&mut s);
        assert!(p.decide(&s, S(2)).is_empty());
        tick(&mut s);
        assert_eq!(p.decide(&s, S(3)).len(), 1, "settled");
    }

    #[test]
    fn a_dry_run_decides_the_same_every_round() {
        let mut p = policy();
        let s = two_nodes(4);
        let a = p.decide(&s, S(0));
        for d in &a {
            p.outcome(d, &Outcome::NotTried, S(0));
        }
        assert_eq!(p.decide(&s, S(1)), a);
    }

    #[test]
    fn three_nodes_share_six_tasks_two_each() {
        let mut p = policy();
        let mut s = two_nodes(6);
        s.nodes.push(node(3, 0.05, MIB, MIB));
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 4, "{d:#?}");
        apply(&mut s, &d, true);
        assert_eq!(spread(&s), [2, 2, 2]);
        for i in 1..200 {
            assert!(p.decide(&s, S(i)).is_empty(), "round {i}");
        }
    }

    #[test]
    fn a_just_moved_task_without_figures_keeps_its_known_demand() {
        let mut p = policy();
        let mut s = two_nodes(4);
        let d = p.decide(&s, S(0));
        apply(&mut s, &d, false);
        // n1 measured again without them; n2 measured too, but a process
        // seen once has no rate yet: no figures for them anywhere.
        let l1 = s.nodes[0].load.as_mut().unwrap();
        for x in &d {
            l1.tasks.remove(&x.task);
            l1.runnable -= 1.0;
        }
        for t in s.tasks.iter_mut().filter(|t| t.node == NodeId(2)) {
            t.cpu = None;
        }
        assert!(p.decide(&s, S(1)).is_empty(), "known demand keeps n2 at 2");
    }
}
