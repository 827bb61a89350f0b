//! Node load reports (`ReportLoad`): the last report of each node, kept in
//! memory only. A report is stale a few seconds after it is sent and the
//! next one comes a second later, so persisting it would cost a write per
//! node per second for nothing a restarted server needs.

use std::collections::HashMap;
use std::time::Instant;

use migfs_proto::meta::{NodeInfo, NodeLoad};
use parking_lot::Mutex;

use crate::error::{Result, e};

/// Most per-task entries one report may carry.
pub const MAX_TASK_LOADS: usize = 65536;

/// The last load report of each node, with when it arrived.
#[derive(Debug, Default)]
pub struct Loads {
    last: Mutex<HashMap<u64, (NodeLoad, Instant)>>,
}

impl Loads {
    /// Records `load` as node `node`'s latest (after [`check`]).
    pub fn record(&self, node: u64, load: NodeLoad) {
        self.last.lock().insert(node, (load, Instant::now()));
    }

    /// Sets each node's `load` to its last report, aged by now.
    pub fn fill(&self, nodes: &mut [NodeInfo]) {
        let last = self.last.lock();
        for n in nodes {
            n.load = last.get(&n.node_id).map(|(l, at)| NodeLoad {
                age_ms: i64::try_from(at.elapsed().as_millis()).unwrap_or(i64::MAX),
                ..l.clone()
            });
        }
    }
}

/// Refuses a report with figures no measurement gives (negative, NaN,
/// infinite) or too many tasks.
pub fn check(load: &NodeLoad) -> Result<()> {
    let mut figures = vec![
        ("load1", load.load1),
        ("load5", load.load5),
        ("load15", load.load15),
        ("runnable", load.runnable),
        ("cpu_busy", load.cpu_busy),
    ];
    if load.task_loads.len() > MAX_TASK_LOADS {
        return Err(e::einval(format!(
            "a load report of {} tasks (at most {MAX_TASK_LOADS})",
            load.task_loads.len()
        )));
    }
    for t in &load.task_loads {
        figures.push(("task cpu", t.cpu));
        figures.push(("task cpu_used", t.cpu_used));
    }
    match figures.iter().find(|(_, v)| !v.is_finite() || *v < 0.0) {
        Some((what, v)) => Err(e::einval(format!("load report: {what} is {v}"))),
        None => Ok(()),
    }
}
