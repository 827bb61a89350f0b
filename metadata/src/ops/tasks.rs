//! Tasks: the global names of processes (DESIGN "names independent of
//! hosts"). A task records the node it runs on and its PID there; a move
//! is a compare-and-set from RUNNING to MOVING, so two moves of one task
//! cannot both start, and ends by pointing the task at the target (commit)
//! or leaving it where it was.

use migfs_proto::meta::{TaskInfo, TaskState};
use prost::Message;

use super::{Read, Txn, sessions};
use crate::error::{MetaError, Result, e};
use crate::schema::{Tree, k1};

/// A move whose agent said nothing for this long may be taken over (its
/// source agent died mid-move). Sooner when the source node's session
/// ended (see [`abandoned`]).
pub const MOVE_STALE_MS: i64 = 120_000;

/// Whether the move of `task` was given up by its source: the session the
/// source node had when the move began has ended (its daemon, which runs
/// the agent, died and its lease ran out, or it started again).
fn abandoned<R: Read + ?Sized>(r: &R, task: &TaskInfo) -> Result<bool> {
    let sid = task.moving_session;
    if sid == 0 {
        return Ok(false);
    }
    let current = sessions::get_node(r, task.node_id)?.map(|n| n.session);
    Ok(current != Some(sid) || r.get(Tree::Sessions, &k1(sid))?.is_none())
}

fn put(t: &mut Txn<'_>, task: &TaskInfo) {
    t.put(Tree::Tasks, &k1(task.task_id), task.encode_to_vec());
}

fn node_name<R: Read + ?Sized>(r: &R, node_id: u64) -> Result<String> {
    sessions::get_node(r, node_id)?
        .map(|n| n.name)
        .ok_or_else(|| e::enoent(format!("node {node_id} is not known")))
}

/// The task `id`, or ENOENT.
pub fn get<R: Read + ?Sized>(r: &R, id: u64) -> Result<TaskInfo> {
    let v = r
        .get(Tree::Tasks, &k1(id))?
        .ok_or_else(|| e::enoent(format!("task {id} does not exist")))?;
    TaskInfo::decode(v.as_slice()).map_err(|err| MetaError::Corrupt {
        tree: Tree::Tasks.name(),
        what: format!("task {id}: {err}"),
    })
}

/// Every task, in id order; exited ones only when asked.
pub fn list<R: Read + ?Sized>(r: &R, include_exited: bool) -> Result<Vec<TaskInfo>> {
    let mut out = Vec::new();
    for (k, _) in r.scan(Tree::Tasks, &[], None, usize::MAX)? {
        let id = crate::schema::key_u64(&k, Tree::Tasks)?;
        let task = get(r, id)?;
        if include_exited || task.state() != TaskState::TaskExited {
            out.push(task);
        }
    }
    Ok(out)
}

/// A new task for process `pid` running on `node_id`. A live task that
/// already names that process is returned instead of a second one.
pub fn create(
    t: &mut Txn<'_>,
    node_id: u64,
    pid: u32,
    cmd: String,
    home_node: u64,
    pinned: bool,
) -> Result<TaskInfo> {
    if pid == 0 {
        return Err(e::einval("pid 0"));
    }
    let node = node_name(t, node_id)?;
    if let Some(old) = list(t, false)?
        .into_iter()
        .find(|k| k.node_id == node_id && k.pid == pid)
    {
        return Ok(old);
    }
    let mut task = TaskInfo {
        task_id: t.fresh_id()?,
        node_id,
        node,
        pid,
        cmd,
        home_node,
        pinned,
        created_ms: t.now_ms(),
        ..TaskInfo::default()
    };
    task.set_state(TaskState::TaskRunning);
    put(t, &task);
    Ok(task)
}

/// Starts a move of task `id`, found running as `pid` on `from`, to `to`.
pub fn begin_move(t: &mut Txn<'_>, id: u64, from: u64, pid: u32, to: u64) -> Result<TaskInfo> {
    let mut task = get(t, id)?;
    let now = t.now_ms();
    match task.state() {
        TaskState::TaskRunning => {}
        TaskState::TaskMoving if now - task.moving_since_ms > MOVE_STALE_MS => {
            tracing::warn!(task = id, "taking over a move that stalled");
        }
        TaskState::TaskMoving if abandoned(t, &task)? => {
            tracing::warn!(
                task = id,
                "taking over a move whose source node's session has ended"
            );
        }
        TaskState::TaskMoving => {
            let target = node_name(t, task.moving_to).unwrap_or_default();
            return Err(e::ebusy(format!(
                "task {id} is already being moved (to {target}, started {} ms ago)",
                now - task.moving_since_ms
            )));
        }
        _ => return Err(e::enoent(format!("task {id} has exited"))),
    }
    if task.node_id != from || task.pid != pid {
        return Err(e::estale(format!(
            "task {id} runs as pid {} on {}, not as pid {pid} on node {from}",
            task.pid, task.node
        )));
    }
    if to == from {
        return Err(e::einval(format!(
            "task {id} already runs on {}",
            task.node
        )));
    }
    node_name(t, to)?;
    task.set_state(TaskState::TaskMoving);
    task.moving_to = to;
    task.moving_since_ms = now;
    task.moving_session = sessions::get_node(t, from)?.map_or(0, |n| n.session);
    put(t, &task);
    Ok(task)
}

/// Ends the move of task `id` to `to`: with `commit`, the task now runs
/// there as `new_pid`; without, it stays where it was.
pub fn end_move(t: &mut Txn<'_>, id: u64, commit: bool, to: u64, new_pid: u32) -> Result<TaskInfo> {
    let mut task = get(t, id)?;
    if task.state() != TaskState::TaskMoving || task.moving_to != to {
        return Err(e::estale(format!(
            "task {id} is not being moved to node {to}"
        )));
    }
    if commit {
        task.node = node_name(t, to)?;
        task.node_id = to;
        task.pid = new_pid;
        task.moves += 1;
    }
    task.set_state(TaskState::TaskRunning);
    task.moving_to = 0;
    task.moving_since_ms = 0;
    task.moving_session = 0;
    put(t, &task);
    Ok(task)
}

/// Process `pid` of task `id` ended on `node_id` with `code`. A report
/// from where the task no longer runs (its frozen original after a move)
/// changes nothing.
pub fn exited(t: &mut Txn<'_>, id: u64, node_id: u64, pid: u32, code: i32) -> Result<TaskInfo> {
    let mut task = get(t, id)?;
    if task.node_id != node_id || task.pid != pid || task.state() == TaskState::TaskMoving {
        return Ok(task);
    }
    task.set_state(TaskState::TaskExited);
    task.exit_code = code;
    put(t, &task);
    Ok(task)
}

/// Pins task `id` (the balancer leaves it where it is) or unpins it. An
/// exited task cannot be pinned any more.
pub fn pin(t: &mut Txn<'_>, id: u64, pinned: bool) -> Result<TaskInfo> {
    let mut task = get(t, id)?;
    if task.state() == TaskState::TaskExited {
        return Err(e::enoent(format!("task {id} has exited")));
    }
    if task.pinned != pinned {
        task.pinned = pinned;
        put(t, &task);
    }
    Ok(task)
}
