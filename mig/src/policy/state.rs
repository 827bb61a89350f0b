//! What a policy sees: the cluster's nodes with their last load report
//! and its live tasks, as plain values (built from the wire by
//! [`ClusterState::from_wire`], or by hand in tests).

use std::collections::HashMap;
use std::time::Duration;

use migfs_proto::ids::{NodeId, TaskId};
use migfs_proto::meta::{NodeInfo, TaskInfo, TaskState};

/// The cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    /// Every known node, up or not.
    pub nodes: Vec<NodeView>,
    /// Every task that has not exited.
    pub tasks: Vec<TaskView>,
}

/// One node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Its id.
    pub id: NodeId,
    /// Its name (moves name their target by it).
    pub name: String,
    /// Whether it holds a live session with the metadata server.
    pub up: bool,
    /// Its last load report; `None` if it never sent one.
    pub load: Option<LoadView>,
}

/// A node's last load report (see `NodeLoad` in meta.proto).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadView {
    /// Time since the report arrived.
    pub age: Duration,
    /// Runnable threads, averaged over the report's sample.
    pub runnable: f64,
    /// Damped averages of the runnable threads over 1, 5, 15 minutes.
    pub load: [f64; 3],
    /// The machine's CPUs.
    pub cpus: u32,
    /// Memory of the node (or its budget), bytes.
    pub mem_total: u64,
    /// Memory still available, bytes.
    pub mem_available: u64,
    /// Per task the report covers: (demand in CPUs, resident bytes).
    pub tasks: HashMap<TaskId, (f64, u64)>,
    /// The report's number (each node counts its reports from 1).
    pub seq: u64,
}

/// One live task.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskView {
    /// Its id.
    pub id: TaskId,
    /// Where the task table says it runs.
    pub node: NodeId,
    /// The user (or `migfs run --pin`) said never to move it.
    pub pinned: bool,
    /// A move of it is under way.
    pub moving: bool,
    /// Times it has moved so far.
    pub moves: u32,
    /// Its demand in CPUs, from the last report that covers it.
    pub cpu: Option<f64>,
    /// Its resident memory, bytes, from the same report.
    pub rss: Option<u64>,
    /// Its command line (for messages).
    pub cmd: String,
}

impl ClusterState {
    /// The state from ListNodes' nodes and TaskList's tasks. A task's
    /// figures come from the report of the node it runs on, else (it just
    /// moved, and that node has not measured it yet) from another node's.
    pub fn from_wire(nodes: &[NodeInfo], tasks: &[TaskInfo]) -> ClusterState {
        let nodes: Vec<NodeView> = nodes.iter().map(node_view).collect();
        let tasks = tasks
            .iter()
            .filter(|t| t.state() != TaskState::TaskExited)
            .map(|t| {
                let id = TaskId(t.task_id);
                let here = nodes
                    .iter()
                    .find(|n| n.id.0 == t.node_id)
                    .and_then(|n| n.load.as_ref()?.tasks.get(&id));
                let anywhere = || {
                    nodes
                        .iter()
                        .filter_map(|n| n.load.as_ref()?.tasks.get(&id))
                        .next()
                };
                let figures = here.or_else(anywhere);
                TaskView {
                    id,
                    node: NodeId(t.node_id),
                    pinned: t.pinned,
                    moving: t.state() == TaskState::TaskMoving,
                    moves: t.moves,
                    cpu: figures.map(|f| f.0),
                    rss: figures.map(|f| f.1),
                    cmd: t.cmd.clone(),
                }
            })
            .collect();
        ClusterState { nodes, tasks }
    }

    /// The node `id`.
    pub fn node(&self, id: NodeId) -> Option<&NodeView> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The name of node `id` (or its id when unknown).
    pub fn name(&self, id: NodeId) -> String {
        self.node(id)
            .map_or_else(|| id.to_string(), |n| n.name.clone())
    }

    /// Nodes a policy may move tasks off or onto: up, with a report
    /// younger than `stale`.
    pub fn usable(&self, stale: Duration) -> impl Iterator<Item = (&NodeView, &LoadView)> {
        self.nodes.iter().filter_map(move |n| {
            let l = n.load.as_ref().filter(|l| l.age <= stale)?;
            n.up.then_some((n, l))
        })
    }

    /// The tasks the table places on `node`.
    pub fn tasks_on(&self, node: NodeId) -> impl Iterator<Item = &TaskView> {
        self.tasks.iter().filter(move |t| t.node == node)
    }

    /// A node's reported figure brought up to date with the task table: a
    /// report says what the node's processes used when it was taken; a
    /// task that moved since then is taken out of the node it left and
    /// added to the node it runs on now. `of` picks the task figure
    /// (demand, or resident bytes) from a report or a task.
    pub fn adjusted(
        &self,
        node: &NodeView,
        reported: f64,
        of_report: impl Fn(&(f64, u64)) -> f64,
        of_task: impl Fn(&TaskView) -> Option<f64>,
    ) -> f64 {
        let covered: f64 = node
            .load
            .as_ref()
            .map_or(0.0, |l| l.tasks.values().map(&of_report).sum());
        let placed: f64 = self.tasks_on(node.id).filter_map(of_task).sum();
        (reported - covered).max(0.0) + placed
    }
}

fn node_view(n: &NodeInfo) -> NodeView {
    NodeView {
        id: NodeId(n.node_id),
        name: n.name.clone(),
        up: n.up,
        load: n.load.as_ref().map(|l| LoadView {
            age: Duration::from_millis(u64::try_from(l.age_ms).unwrap_or(0)),
            runnable: l.runnable,
            load: [l.load1, l.load5, l.load15],
            cpus: l.cpus,
            mem_total: l.mem_total_bytes,
            mem_available: l.mem_available_bytes,
            tasks: l
                .task_loads
                .iter()
                .map(|t| (TaskId(t.task_id), (t.cpu, t.rss_bytes)))
                .collect(),
            seq: l.seq,
        }),
    }
}

#[cfg(test)]
mod tests {
    use migfs_proto::meta::{NodeLoad, TaskLoad};

    use super::*;

    fn wire_node(id: u64, name: &str, loads: &[(u64, f64)]) -> NodeInfo {
        NodeInfo {
            node_id: id,
            name: name.into(),
            up: true,
            load: Some(NodeLoad {
                runnable: loads.iter().map(|l| l.1).sum::<f64>() + 0.25,
                task_loads: loads
                    .iter()
                    .map(|&(task_id, cpu)| TaskLoad {
                        task_id,
                        cpu,
                        rss_bytes: 1000,
                        ..Default::default()
                    })
                    .collect(),
                age_ms: 1500,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn wire_task(id: u64, node: u64, state: TaskState) -> TaskInfo {
        let mut t = TaskInfo {
            task_id: id,
            node_id: node,
            ..Default::default()
        };
        t.set_state(state);
        t
    }

    #[test]
    fn a_task_that_just_moved_keeps_the_figures_of_its_old_node() {
        // Task 3 moved from a (whose report still has it) to b (whose
        // report predates it); task 4 has exited.
        let nodes = [wire_node(1, "a", &[(3, 0.9)]), wire_node(2, "b", &[])];
        let tasks = [
            wire_task(3, 2, TaskState::TaskRunning),
            wire_task(4, 1, TaskState::TaskExited),
        ];
        let s = ClusterState::from_wire(&nodes, &tasks);
        assert_eq!(s.tasks.len(), 1);
        assert_eq!((s.tasks[0].cpu, s.tasks[0].rss), (Some(0.9), Some(1000)));
        assert_eq!(
            s.nodes[0].load.as_ref().unwrap().age,
            Duration::from_millis(1500)
        );
        // a's demand without task 3 is its background; b gains task 3.
        let cpu = |s: &ClusterState, i: usize| {
            let n = &s.nodes[i];
            let l = n.load.as_ref().unwrap();
            s.adjusted(n, l.runnable, |f| f.0, |t| t.cpu)
        };
        assert!((cpu(&s, 0) - 0.25).abs() < 1e-9);
        assert!((cpu(&s, 1) - 1.15).abs() < 1e-9);
    }
}
