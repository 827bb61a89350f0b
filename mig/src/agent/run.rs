//! Tasks started here (`migfs run`) and the end of every process this node
//! runs as a task: its exit status goes to the task table.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use migfs_proto::agent as pb;
use migfs_proto::meta::{
    TaskCreateRequest, TaskExitedRequest, TaskGetRequest, TaskInfo, TaskListRequest, TaskState,
};

use super::{AgentError, Inner};

/// Starts `r.argv` here as the caller (`cred`: uid, gid), with stdin on
/// /dev/null or a relay pipe (`r.stdin`) and stdout/stderr appended to the named files (on the global
/// filesystem, so they follow the task), in a session of its own.
pub async fn start(
    inner: &Inner,
    r: pb::RunRequest,
    (uid, gid): (u32, u32),
) -> Result<pb::RunReply, AgentError> {
    if r.argv.is_empty() {
        return Err(AgentError::Invalid("no command to run".into()));
    }
    if uid != 0 && (r.uid, r.gid) != (uid, gid) {
        return Err(AgentError::Denied(format!(
            "uid {uid} (gid {gid}) may only run tasks as itself, not as uid {} gid {}",
            r.uid, r.gid
        )));
    }
    if !r.node.is_empty() && r.node != inner.cfg.name {
        let node = inner.node(&r.node).await?;
        let mut fwd = r.clone();
        fwd.node.clear();
        return inner
            .agent_at(&node.addr)?
            .run(fwd)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| AgentError::rpc(format!("start the task on {}", node.name), &s));
    }
    // Opening the output files (on /migfs, served by this very process)
    // and starting the child block: never on a runtime worker, whose
    // FUSE requests need the workers to make progress.
    let req = r.clone();
    let (pid, wr) = tokio::task::spawn_blocking(move || spawn_child(&req))
        .await
        .map_err(|e| AgentError::Invalid(format!("start the task: {e}")))??;
    let relay = wr.map(super::stdin::Relay::new).transpose()?;
    let argv: Vec<OsString> = r
        .argv
        .iter()
        .map(|a| OsString::from_vec(a.clone()))
        .collect();
    let cmdline: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let task = inner
        .meta
        .clone()
        .task_create(TaskCreateRequest {
            node_id: inner.cfg.node_id,
            pid,
            cmd: cmdline.join(" "),
            home_node: r.home_node,
            pinned: r.pinned,
        })
        .await
        .map_err(|s| AgentError::rpc("create the task", &s))?
        .into_inner();
    if let Some(relay) = relay {
        inner
            .stdins
            .lock()
            .insert(task.task_id, std::sync::Arc::new(relay));
    }
    watch_exit(inner, task.task_id, i32::try_from(pid).unwrap_or(0));
    tracing::info!(task = task.task_id, pid, cmd = %task.cmd, "task started");
    Ok(pb::RunReply {
        task_id: task.task_id,
        pid,
    })
}

/// Opens the task's output files and starts it; returns its PID and the
/// write end of its stdin relay pipe. Blocking.
fn spawn_child(r: &pb::RunRequest) -> Result<(u32, Option<std::os::fd::OwnedFd>), AgentError> {
    let out = |p: &[u8], what: &str| -> Result<Stdio, AgentError> {
        if p.is_empty() {
            return Ok(Stdio::null());
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(std::path::Path::new(&OsString::from_vec(p.to_vec())))
            .map_err(|e| {
                AgentError::Invalid(format!("{what} {}: {e}", String::from_utf8_lossy(p)))
            })?;
        Ok(Stdio::from(f))
    };
    let argv: Vec<OsString> = r
        .argv
        .iter()
        .map(|a| OsString::from_vec(a.clone()))
        .collect();
    let (stdin, relay) = if r.stdin {
        let (rd, wr) = crate::sys::pipe::relay_pipe()
            .map_err(|e| AgentError::Invalid(format!("stdin pipe: {e}")))?;
        (Stdio::from(rd), Some(wr))
    } else {
        (Stdio::null(), None)
    };
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .stdin(stdin)
        .stdout(out(&r.stdout, "stdout")?)
        .stderr(out(&r.stderr, "stderr")?)
        .uid(r.uid)
        .gid(r.gid)
        .process_group(0);
    for kv in &r.env {
        if let Some(eq) = kv.iter().position(|b| *b == b'=') {
            cmd.env(
                OsString::from_vec(kv[..eq].to_vec()),
                OsString::from_vec(kv[eq + 1..].to_vec()),
            );
        }
    }
    if !r.cwd.is_empty() {
        cmd.current_dir(OsString::from_vec(r.cwd.clone()));
    }
    let child = cmd
        .spawn()
        .map_err(|e| AgentError::Invalid(format!("start {}: {e}", argv[0].to_string_lossy())))?;
    // The child is reaped by `watch_exit`, never by `Child::wait`.
    Ok((child.id(), relay))
}

/// Reports the exit of `pid` (task `task`) when it comes, and reaps it.
pub fn watch_exit(inner: &Inner, task: u64, pid: i32) {
    let fd = match crate::sys::reap::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(pid, error = %e, "cannot watch the task's process");
            return;
        }
    };
    let (meta, rt, node_id) = (inner.meta.clone(), inner.rt.clone(), inner.cfg.node_id);
    let stdins = std::sync::Arc::clone(&inner.stdins);
    let spawned = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let code = match crate::sys::reap::wait_exit(&fd) {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(pid, error = %e, "waiting for the task failed");
                    return;
                }
            };
            tracing::info!(task, pid, code, "task process ended");
            stdins.lock().remove(&task);
            if task == 0 {
                return;
            }
            let req = TaskExitedRequest {
                task_id: task,
                node_id,
                pid: u32::try_from(pid).unwrap_or(0),
                exit_code: code,
            };
            let mut m = meta;
            if let Err(s) = rt.block_on(m.task_exited(req)) {
                tracing::warn!(task, error = %s.message(), "could not record the task's exit");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(pid, error = %e, "cannot start the reaper thread");
    }
}

/// The task table, as rows for people and scripts.
pub async fn tasks(inner: &Inner, r: &pb::TasksRequest) -> Result<pb::TasksReply, AgentError> {
    let mut meta = inner.meta.clone();
    let list = if r.task_id != 0 {
        vec![
            meta.task_get(TaskGetRequest { task_id: r.task_id })
                .await
                .map_err(|s| AgentError::rpc(format!("task {}", r.task_id), &s))?
                .into_inner(),
        ]
    } else {
        meta.task_list(TaskListRequest {
            include_exited: r.include_exited,
        })
        .await
        .map_err(|s| AgentError::rpc("list tasks", &s))?
        .into_inner()
        .tasks
    };
    let nodes = inner.nodes().await?;
    let name = |id: u64| {
        nodes
            .iter()
            .find(|n| n.node_id == id)
            .map_or_else(|| format!("node{id}"), |n| n.name.clone())
    };
    let row = |t: TaskInfo| pb::TaskRow {
        task_id: t.task_id,
        node: name(t.node_id),
        pid: t.pid,
        state: match t.state() {
            TaskState::TaskRunning => "running",
            TaskState::TaskMoving => "moving",
            TaskState::TaskExited => "exited",
            TaskState::Unspecified => "unknown",
        }
        .into(),
        cmd: t.cmd.clone(),
        pinned: t.pinned,
        exit_code: t.exit_code,
        moves: t.moves,
        moving_to: if t.moving_to == 0 {
            String::new()
        } else {
            name(t.moving_to)
        },
    };
    Ok(pb::TasksReply {
        tasks: list.into_iter().map(row).collect(),
    })
}
