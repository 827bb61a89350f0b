//! `migfs status`: the cluster's nodes with their load and tasks, as the
//! metadata server knows them (through the local agent).

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Parser;
use migfs_mig::agent::client::{connect, local_node};
use migfs_proto::agent as pb;
use migfs_proto::meta::{NodeInfo, NodeLoad, TaskInfo, TaskLoad, TaskState};

use super::task::{Local, one_line, runtime};

#[derive(Debug, Parser)]
pub struct Args {
    /// Print one JSON object ({"nodes": [...], "tasks": [...]}).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    local: Local,
}

/// Asks the local agent for the cluster's nodes and live tasks.
pub async fn fetch(local: &Local) -> anyhow::Result<pb::ClusterReply> {
    let node = local_node(&local.mount)?;
    let mut c = connect(&node.socket).await?;
    let r = c
        .cluster(pb::ClusterRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(r.into_inner())
}

/// `migfs status`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let reply = runtime()?.block_on(fetch(&a.local))?;
    if a.json {
        println!("{}", to_json(&reply));
    } else {
        print_table(&reply);
    }
    Ok(ExitCode::SUCCESS)
}

/// Each task's figures from the report of the node it runs on.
fn task_loads(nodes: &[NodeInfo]) -> HashMap<(u64, u64), TaskLoad> {
    nodes
        .iter()
        .flat_map(|n| {
            let loads = n.load.iter().flat_map(|l| l.task_loads.iter());
            loads.map(move |t| ((n.node_id, t.task_id), *t))
        })
        .collect()
}

fn state(t: &TaskInfo) -> &'static str {
    match t.state() {
        TaskState::TaskRunning => "running",
        TaskState::TaskMoving => "moving",
        TaskState::TaskExited => "exited",
        TaskState::Unspecified => "unknown",
    }
}

fn load_json(l: &NodeLoad) -> serde_json::Value {
    serde_json::json!({
        "load1": l.load1, "load5": l.load5, "load15": l.load15,
        "runnable": l.runnable, "cpu_busy": l.cpu_busy, "cpus": l.cpus,
        "mem_total_bytes": l.mem_total_bytes,
        "mem_available_bytes": l.mem_available_bytes,
        "tasks": l.tasks, "processes": l.processes, "seq": l.seq,
        "sample_ms": l.sample_ms, "age_ms": l.age_ms,
    })
}

fn to_json(r: &pb::ClusterReply) -> serde_json::Value {
    let per_task = task_loads(&r.nodes);
    let nodes: Vec<_> = r
        .nodes
        .iter()
        .map(|n| {
            serde_json::json!({
                "node_id": n.node_id, "name": n.name, "addr": n.addr, "up": n.up,
                "load": n.load.as_ref().map(load_json),
                "tasks": r.tasks.iter().filter(|t| t.node_id == n.node_id).count(),
            })
        })
        .collect();
    let tasks: Vec<_> = r
        .tasks
        .iter()
        .map(|t| {
            let l = per_task.get(&(t.node_id, t.task_id));
            serde_json::json!({
                "task": t.task_id, "node": t.node, "pid": t.pid, "state": state(t),
                "pinned": t.pinned, "moves": t.moves, "cmd": t.cmd,
                "cpu": l.map(|l| l.cpu), "cpu_used": l.map(|l| l.cpu_used),
                "rss_bytes": l.map(|l| l.rss_bytes),
            })
        })
        .collect();
    serde_json::json!({ "nodes": nodes, "tasks": tasks })
}

fn mib(b: u64) -> String {
    if b < 10 << 20 {
        format!("{}K", b >> 10)
    } else {
        format!("{}M", b >> 20)
    }
}

fn print_table(r: &pb::ClusterReply) {
    println!(
        "{:<8} {:<4} {:>16} {:>8} {:>5} {:>15} {:>5} {:>8}",
        "NODE", "UP", "LOAD 1/5/15", "RUNNABLE", "CPU%", "MEM AVAIL/TOTAL", "TASKS", "REPORT"
    );
    for n in &r.nodes {
        let tasks = r.tasks.iter().filter(|t| t.node_id == n.node_id).count();
        let up = if n.up { "up" } else { "down" };
        match &n.load {
            Some(l) => println!(
                "{:<8} {:<4} {:>16} {:>8.2} {:>5.0} {:>15} {:>5} {:>7.1}s",
                n.name,
                up,
                format!("{:.2} {:.2} {:.2}", l.load1, l.load5, l.load15),
                l.runnable,
                l.cpu_busy * 100.0,
                format!("{}/{}", mib(l.mem_available_bytes), mib(l.mem_total_bytes)),
                tasks,
                l.age_ms as f64 / 1e3,
            ),
            None => println!(
                "{:<8} {:<4} {:>16} {:>8} {:>5} {:>15} {:>5} {:>8}",
                n.name, up, "-", "-", "-", "-", tasks, "none"
            ),
        }
    }
    if r.tasks.is_empty() {
        return;
    }
    let per_task = task_loads(&r.nodes);
    println!();
    println!(
        "{:<8} {:<8} {:>8} {:<8} {:>5} {:>7} {:<3}  CMD",
        "TASK", "NODE", "PID", "STATE", "CPU", "RSS", "PIN"
    );
    for t in &r.tasks {
        let l = per_task.get(&(t.node_id, t.task_id));
        println!(
            "{:<8} {:<8} {:>8} {:<8} {:>5} {:>7} {:<3}  {}",
            format!("t{}", t.task_id),
            t.node,
            t.pid,
            state(t),
            l.map_or_else(|| "-".into(), |l| format!("{:.2}", l.cpu)),
            l.map_or_else(|| "-".into(), |l| mib(l.rss_bytes)),
            if t.pinned { "yes" } else { "-" },
            one_line(&t.cmd)
        );
    }
}
