//! Migration policy (DESIGN "policy separated from mechanism"): which task
//! to move where, decided from the cluster's state. Pure code: a policy
//! sees a [`ClusterState`] and returns [`Decision`]s; it does no I/O and
//! moves nothing. The caller (`migfs balance`) executes each decision the
//! way `migfs move` does, through the local agent's `Move` call, and tells
//! the policy how it went ([`Policy::outcome`]). The mechanism (agent,
//! freeze, capture, restore, pages) never imports this module.
//!
//! # Layout
//! - [`state`]: [`ClusterState`], what a policy sees.
//! - [`history`]: cooldowns and retries, so decisions do not flap.
//! - [`cpu`]: spread CPU-bound tasks (`--policy cpu`).
//! - [`memory`]: move tasks off nodes short of memory (`--policy memory`).
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use migfs_mig::policy::{self, ClusterState, Settings};
//! let mut p = policy::by_name("cpu", &Settings::default()).unwrap();
//! let state = ClusterState::default();
//! assert!(p.decide(&state, Duration::ZERO).is_empty());
//! ```
//!
//! docs/balancer.md explains each policy, its thresholds, and how to
//! write a new one.

pub mod cpu;
pub mod history;
pub mod memory;
pub mod state;

use std::fmt;
use std::time::Duration;

use migfs_proto::ids::{NodeId, TaskId};

pub use self::history::Hysteresis;
pub use self::state::{ClusterState, LoadView, NodeView, TaskView};

/// Move `task` from node `from` to node `to`, because `reason`.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The task.
    pub task: TaskId,
    /// Where it runs.
    pub from: NodeId,
    /// Its node's name.
    pub from_name: String,
    /// Where it should run.
    pub to: NodeId,
    /// That node's name (a move names its target by it).
    pub to_name: String,
    /// Why, in words, with the figures that led to it.
    pub reason: String,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "move {} {} -> {}: {}",
            self.task, self.from_name, self.to_name, self.reason
        )
    }
}

/// How the execution of a decision went.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The task runs on the target now.
    Moved,
    /// The move failed (the task exited, the target went down...).
    Failed(String),
    /// It was not tried (a dry run).
    NotTried,
}

/// A migration policy. `decide` is called every round with the current
/// state and a monotonic `now` (time since the caller started); every
/// decision it returns is executed (or not, on a dry run) and reported
/// through `outcome` before the next round.
pub trait Policy: Send {
    /// The name `--policy` selects it by.
    fn name(&self) -> &'static str;
    /// The moves to make now; empty when the cluster is fine.
    fn decide(&mut self, state: &ClusterState, now: Duration) -> Vec<Decision>;
    /// How the execution of `decision` went.
    fn outcome(&mut self, decision: &Decision, outcome: &Outcome, now: Duration);
}

/// Settings every policy shares.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Common {
    /// Cooldowns and retries.
    pub hysteresis: Hysteresis,
    /// A node whose last report is older is neither a source nor a target.
    pub stale: Duration,
    /// Most moves decided in one round.
    pub max_moves: usize,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            hysteresis: Hysteresis::default(),
            stale: Duration::from_secs(5),
            max_moves: 4,
        }
    }
}

/// Settings of every policy, for [`by_name`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Settings {
    /// Shared settings.
    pub common: Common,
    /// The `cpu` policy's thresholds.
    pub cpu: cpu::Thresholds,
    /// The `memory` policy's thresholds.
    pub memory: memory::Thresholds,
}

/// The names [`by_name`] knows.
pub const NAMES: &[&str] = &["cpu", "memory"];

/// The policy called `name`, or `None` if there is none (see [`NAMES`]).
pub fn by_name(name: &str, s: &Settings) -> Option<Box<dyn Policy>> {
    match name {
        "cpu" => Some(Box::new(cpu::CpuPolicy::new(s.common, s.cpu))),
        "memory" => Some(Box::new(memory::MemoryPolicy::new(s.common, s.memory))),
        _ => None,
    }
}

/// The decision record both policies build.
fn decision(s: &ClusterState, task: TaskId, from: NodeId, to: NodeId, reason: String) -> Decision {
    Decision {
        task,
        from,
        from_name: s.name(from),
        to,
        to_name: s.name(to),
        reason,
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Synthetic cluster states.
    use std::collections::HashMap;
    use std::time::Duration;

    use migfs_proto::ids::{NodeId, TaskId};

    use super::{ClusterState, LoadView, NodeView, TaskView};

    pub const MIB: u64 = 1 << 20;

    /// A node `n<id>` that is up, reported 1 s ago: `background` runnable
    /// threads besides its tasks, `avail` of `total` bytes free.
    pub fn node(id: u64, background: f64, total: u64, avail: u64) -> NodeView {
        NodeView {
            id: NodeId(id),
            name: format!("n{id}"),
            up: true,
            load: Some(LoadView {
                age: Duration::from_secs(1),
                runnable: background,
                cpus: 2,
                mem_total: total,
                mem_available: avail,
                tasks: HashMap::new(),
                ..Default::default()
            }),
        }
    }

    /// A task `t<id>` on `node` with demand `cpu` and `rss`, covered by
    /// that node's report (which counts it in its runnable threads).
    pub fn add_task(s: &mut ClusterState, id: u64, node: u64, cpu: f64, rss: u64) {
        let n = s
            .nodes
            .iter_mut()
            .find(|n| n.id == NodeId(node))
            .expect("node");
        if let Some(l) = n.load.as_mut() {
            l.runnable += cpu;
            l.tasks.insert(TaskId(id), (cpu, rss));
        }
        s.tasks.push(TaskView {
            id: TaskId(id),
            node: NodeId(node),
            pinned: false,
            moving: false,
            moves: 0,
            cpu: Some(cpu),
            rss: Some(rss),
            cmd: format!("prog{id}"),
        });
    }

    /// Carries out `moves` as the cluster would: the task table first,
    /// the reports later (`report`: both nodes measured again).
    pub fn apply(s: &mut ClusterState, moves: &[super::Decision], report: bool) {
        for d in moves {
            let t = s.tasks.iter_mut().find(|t| t.id == d.task).expect("task");
            t.node = d.to;
            t.moves += 1;
            let (cpu, rss) = (t.cpu.unwrap_or(0.0), t.rss.unwrap_or(0));
            if !report {
                continue;
            }
            tick(s);
            for n in &mut s.nodes {
                let Some(l) = n.load.as_mut() else { continue };
                if n.id == d.from {
                    l.runnable -= cpu;
                    l.mem_available += rss;
                    l.tasks.remove(&d.task);
                } else if n.id == d.to {
                    l.runnable += cpu;
                    l.mem_available = l.mem_available.saturating_sub(rss);
                    l.tasks.insert(d.task, (cpu, rss));
                }
            }
        }
    }

    /// Every node sends its next report.
    pub fn tick(s: &mut ClusterState) {
        for l in s.nodes.iter_mut().filter_map(|n| n.load.as_mut()) {
            l.seq += 1;
        }
    }

    /// How many tasks each node runs, in node order.
    pub fn spread(s: &ClusterState) -> Vec<usize> {
        s.nodes.iter().map(|n| s.tasks_on(n.id).count()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The mechanism never imports policy code, and policy code uses
    /// nothing of the mechanism (it only sees cluster state).
    #[test]
    fn mechanism_and_policy_do_not_import_each_other() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let policy_dir = src.join("policy");
        // Built here, so that this test's own text does not match.
        let (krate, own) = (["crate", "::"].concat(), ["crate", "::policy"].concat());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            if f.starts_with(&policy_dir) {
                for l in text.lines().filter(|l| l.contains(&krate)) {
                    assert!(l.contains(&own), "{} uses the mechanism: {l}", f.display());
                }
            } else if f != src.join("lib.rs") {
                assert!(
                    !text.contains("policy::"),
                    "{} imports the policy",
                    f.display()
                );
            }
        }
    }

    #[test]
    fn policies_are_found_by_name() {
        for name in NAMES {
            let p = by_name(name, &Settings::default()).expect(name);
            assert_eq!(p.name(), *name);
        }
        assert!(by_name("nope", &Settings::default()).is_none());
    }
}
