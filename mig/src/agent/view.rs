//! The cluster as local clients see it through the agent (`migfs status`,
//! the balancer): the nodes with their load and the live tasks; and pins,
//! which keep a task where it is.

use migfs_proto::agent as pb;
use migfs_proto::meta::{TaskGetRequest, TaskInfo, TaskListRequest, TaskPinRequest, TaskState};

use super::{AgentError, Inner};

/// Every node (with its last load report) and every live task.
pub async fn cluster(inner: &Inner) -> Result<pb::ClusterReply, AgentError> {
    let nodes = inner.nodes().await?;
    let tasks = inner
        .meta
        .clone()
        .task_list(TaskListRequest {
            include_exited: false,
        })
        .await
        .map_err(|s| AgentError::rpc("list tasks", &s))?
        .into_inner()
        .tasks;
    Ok(pb::ClusterReply { nodes, tasks })
}

/// Pins or unpins task `r.task_id`. Root may; so may the owner of the
/// task's process, which the agent of the node where it runs checks.
pub async fn pin(inner: &Inner, r: pb::PinRequest) -> Result<TaskInfo, AgentError> {
    let mut meta = inner.meta.clone();
    let t = meta
        .task_get(TaskGetRequest { task_id: r.task_id })
        .await
        .map_err(|s| AgentError::rpc(format!("task {}", r.task_id), &s))?
        .into_inner();
    if t.state() == TaskState::TaskExited {
        return Err(AgentError::Invalid(format!(
            "task {} has exited",
            t.task_id
        )));
    }
    if r.caller_uid != 0 {
        if t.node_id != inner.cfg.node_id {
            let node = inner.node_by_id(t.node_id).await?;
            return inner
                .agent_at(&node.addr)?
                .pin(r)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| AgentError::rpc(format!("ask {} to pin", node.name), &s));
        }
        check_owner(&t, r.caller_uid)?;
    }
    let done = meta
        .task_pin(TaskPinRequest {
            task_id: t.task_id,
            pinned: r.pinned,
        })
        .await
        .map_err(|s| AgentError::rpc(format!("pin task {}", t.task_id), &s))?
        .into_inner();
    tracing::info!(
        task = done.task_id,
        pinned = done.pinned,
        "task pin changed"
    );
    Ok(done)
}

/// Whether `uid` owns the process of task `t`, which runs here.
fn check_owner(t: &TaskInfo, uid: u32) -> Result<(), AgentError> {
    let owner: Option<u32> = crate::sys::procfs::status(&t.pid.to_string())
        .ok()
        .and_then(|st| st.get("Uid")?.split_whitespace().next()?.parse().ok());
    if owner == Some(uid) {
        return Ok(());
    }
    Err(AgentError::Denied(format!(
        "uid {uid} may not pin task {} (only root or the owner of its process may)",
        t.task_id
    )))
}
