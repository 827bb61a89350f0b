//! `memory`: move tasks off a node whose available memory fell below
//! `min_available` (a fraction of its memory), until it has
//! `min_available + headroom` again, onto nodes that keep at least
//! `min_available + headroom` after taking them.
//!
//! The gap between the two levels is the hysteresis: a node that received
//! a task is still `headroom` above the level that would make it give
//! tasks away, so tasks do not bounce between nodes. A node's figures are
//! brought up to date with moves its report has not seen yet
//! ([`ClusterState::adjusted`]).

use std::time::Duration;

use migfs_proto::ids::{NodeId, TaskId};

use super::history::History;
use super::{ClusterState, Common, Decision, Outcome, Policy, decision};

/// The `memory` policy's thresholds, as fractions of a node's memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    /// Below this much available memory a node gives tasks away.
    pub min_available: f64,
    /// How much more than `min_available` a source aims for and a target
    /// must keep.
    pub headroom: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_available: 0.10,
            headroom: 0.10,
        }
    }
}

/// Relieves nodes short of memory.
#[derive(Debug)]
pub struct MemoryPolicy {
    common: Common,
    t: Thresholds,
    history: History,
}

/// A usable node's memory: total and (estimated) available, bytes.
#[derive(Clone, Copy, Debug)]
struct Mem {
    id: NodeId,
    total: f64,
    avail: f64,
}

impl Mem {
    fn ratio(&self) -> f64 {
        if self.total > 0.0 {
            self.avail / self.total
        } else {
            1.0
        }
    }
}

const MIB: f64 = 1048576.0;

impl MemoryPolicy {
    /// A policy with these settings.
    pub fn new(common: Common, t: Thresholds) -> MemoryPolicy {
        MemoryPolicy {
            common,
            t,
            history: History::default(),
        }
    }

    fn mems(&self, s: &ClusterState) -> Vec<Mem> {
        s.usable(self.common.stale)
            .filter(|(n, _)| self.history.settled(n.id))
            .map(|(n, l)| {
                let total = l.mem_total as f64;
                let used = l.mem_total.saturating_sub(l.mem_available) as f64;
                let used = s.adjusted(n, used, |f| f.1 as f64, |t| t.rss.map(|r| r as f64));
                Mem {
                    id: n.id,
                    total,
                    avail: total - used,
                }
            })
            .collect()
    }

    /// The level a target must keep (and a source aims for), bytes.
    fn high(&self, m: &Mem) -> f64 {
        (self.t.min_available + self.t.headroom) * m.total
    }

    /// For source `src`: a task to move and the node to take it. Prefers
    /// the smallest task that alone lifts `src` to its aim, else the
    /// largest; the target keeps the most memory afterwards.
    fn pick(
        &self,
        s: &ClusterState,
        src: &Mem,
        mems: &[Mem],
        now: Duration,
        taken: &[TaskId],
    ) -> Option<(TaskId, f64, usize)> {
        let need = self.high(src) - src.avail;
        let mut cands: Vec<(TaskId, f64)> = s
            .tasks_on(src.id)
            .filter(|t| !t.pinned && !t.moving && !taken.contains(&t.id))
            .filter(|t| self.history.eligible(t.id, now))
            .filter_map(|t| Some((t.id, t.rss? as f64)))
            .filter(|(_, rss)| *rss > 0.0)
            .collect();
        // Enough alone, smallest first; then the rest, largest first.
        cands.sort_by(|a, b| {
            let (ea, eb) = (a.1 >= need, b.1 >= need);
            eb.cmp(&ea)
                .then(if ea {
                    a.1.total_cmp(&b.1)
                } else {
                    b.1.total_cmp(&a.1)
                })
                .then(a.0.cmp(&b.0))
        });
        cands.into_iter().find_map(|(task, rss)| {
            let dst = mems
                .iter()
                .enumerate()
                .filter(|(_, m)| m.id != src.id && m.avail - rss >= self.high(m))
                .max_by(|a, b| (a.1.avail - rss).total_cmp(&(b.1.avail - rss)))?;
            Some((task, rss, dst.0))
        })
    }

    fn reason(&self, s: &ClusterState, src: &Mem, dst: &Mem, task: TaskId, rss: f64) -> String {
        format!(
            "{} has {:.0} MiB of {:.0} MiB available ({:.1}%), below {:.1}%; {task} holds \
             {:.0} MiB; {} keeps {:.0} MiB ({:.1}%) after taking it",
            s.name(src.id),
            src.avail / MIB,
            src.total / MIB,
            src.ratio() * 100.0,
            self.t.min_available * 100.0,
            rss / MIB,
            s.name(dst.id),
            (dst.avail - rss) / MIB,
            (dst.avail - rss) / dst.total * 100.0,
        )
    }
}

impl Policy for MemoryPolicy {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn decide(&mut self, s: &ClusterState, now: Duration) -> Vec<Decision> {
        self.history.retain(|id| s.tasks.iter().any(|t| t.id == id));
        self.history.observe(s);
        let mut mems = self.mems(s);
        // Nodes short of memory, the shortest first; each gives tasks away
        // until it reaches its aim (or nothing more fits anywhere).
        let mut sources: Vec<usize> = (0..mems.len())
            .filter(|&i| mems[i].ratio() < self.t.min_available)
            .collect();
        sources.sort_by(|&a, &b| {
            mems[a]
                .ratio()
                .total_cmp(&mems[b].ratio())
                .then(mems[a].id.cmp(&mems[b].id))
        });
        let mut out: Vec<Decision> = Vec::new();
        for si in sources {
            let src0 = mems[si];
            while out.len() < self.common.max_moves && mems[si].avail < self.high(&mems[si]) {
                let taken: Vec<TaskId> = out.iter().map(|d| d.task).collect();
                let Some((task, rss, di)) = self.pick(s, &mems[si], &mems, now, &taken) else {
                    break;
                };
                let reason = self.reason(s, &src0, &mems[di], task, rss);
                self.history.decided(task, now, &self.common.hysteresis);
                out.push(decision(s, task, src0.id, mems[di].id, reason));
                mems[si].avail += rss;
                mems[di].avail -= rss;
            }
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

    fn policy() -> MemoryPolicy {
        MemoryPolicy::new(Common::default(), Thresholds::default())
    }

    /// n1 and n2 of 1000 MiB; n1 holds tasks of these sizes (MiB) and
    /// has `n1_other` MiB used besides; n2 is empty.
    fn cluster(sizes: &[u64], n1_other: u64) -> ClusterState {
        let used: u64 = sizes.iter().sum::<u64>() + n1_other;
        let mut s = ClusterState {
            nodes: vec![
                node(1, 0.0, 1000 * MIB, (1000 - used) * MIB),
                node(2, 0.0, 1000 * MIB, 900 * MIB),
            ],
            tasks: Vec::new(),
        };
        for (i, &mib) in sizes.iter().enumerate() {
            add_task(&mut s, 10 + i as u64, 1, 0.0, mib * MIB);
        }
        s
    }

    #[test]
    fn a_node_short_of_memory_gives_the_task_that_relieves_it() {
        // n1: 60 MiB available (6%) < 10%; it needs 140 MiB to get to 20%.
        let mut p = policy();
        let mut s = cluster(&[100, 150, 600], 90);
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].task, TaskId(11), "the smallest that is enough");
        assert_eq!(d[0].to, NodeId(2));
        assert!(d[0].reason.contains("below 10.0%"), "{}", d[0]);
        apply(&mut s, &d, true);
        for i in 1..100 {
            assert!(p.decide(&s, S(i)).is_empty(), "round {i}");
        }
        assert_eq!(spread(&s), [2, 1]);
    }

    #[test]
    fn a_report_taken_while_the_original_still_held_its_memory_moves_nothing() {
        let mut p = policy();
        let mut s = cluster(&[100, 150, 600], 90);
        let d = p.decide(&s, S(0));
        p.outcome(&d[0], &Outcome::Moved, S(0));
        apply(&mut s, &d, false);
        // n1 measured during the drain: t11 is no task of n1 any more, but
        // its frozen original still holds its 150 MiB there.
        tick(&mut s);
        s.nodes[0].load.as_mut().unwrap().tasks.remove(&TaskId(11));
        assert!(p.decide(&s, S(1)).is_empty(), "n1 and n2 settle first");
        tick(&mut s);
        assert!(
            p.decide(&s, S(2)).is_empty(),
            "one report may be from before"
        );
    }

    #[test]
    fn small_tasks_go_largest_first_until_the_node_is_relieved() {
        // 50 MiB available; every task is 40 MiB; n1 needs 150 MiB.
        let mut p = policy();
        let s = cluster(&[40, 40, 40, 40, 40, 40], 710);
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 4, "{d:#?}");
    }

    #[test]
    fn a_target_that_would_run_short_itself_is_not_used() {
        let mut p = policy();
        let mut s = cluster(&[100, 150, 600], 90);
        // n2 has 300 MiB available: taking 150 would leave 15% < 20%.
        s.nodes[1].load.as_mut().unwrap().mem_available = 300 * MIB;
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].task, TaskId(10), "only 100 MiB fits: {}", d[0]);
        s.nodes[1].load.as_mut().unwrap().mem_available = 250 * MIB;
        let mut p = policy();
        assert!(p.decide(&s, S(0)).is_empty(), "nothing fits");
    }

    #[test]
    fn pinned_tasks_and_down_nodes_are_skipped() {
        let mut p = policy();
        let mut s = cluster(&[100, 150, 600], 90);
        s.tasks[1].pinned = true;
        s.nodes.push(node(3, 0.0, 1000 * MIB, 1000 * MIB));
        s.nodes[2].up = false;
        let d = p.decide(&s, S(0));
        assert_eq!(d.len(), 1, "{d:#?}");
        assert_eq!(d[0].task, TaskId(12), "t11 is pinned; t12 is enough alone");
        assert_eq!(d[0].to, NodeId(2), "n3 is down");
    }

    #[test]
    fn enough_memory_everywhere_moves_nothing() {
        let mut p = policy();
        let s = cluster(&[100, 150], 600);
        assert!(p.decide(&s, S(0)).is_empty(), "15% available");
    }
}
