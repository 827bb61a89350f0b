//! The stdin of `migfs run` tasks: a pipe whose write end the agent of
//! the task's node holds, fed by `Stdin` calls from the caller's `migfs
//! run` (forwarded to wherever the task runs now).
//!
//! A move carries it along: the source stops taking input, reads what
//! the process has not read yet out of the pipe (through a copy of the
//! process's read end), and sends it with the image; the image marks the
//! descriptors as relay pipes; the target makes a new pipe, holding those
//! bytes, opens its read end into the rebuilt process at the same
//! descriptor numbers, and takes input from then on. A move that fails
//! puts the bytes back and takes input again.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use migfs_proto::agent as pb;
use migfs_proto::meta::TaskGetRequest;
use nix::unistd::Pid;
use parking_lot::Mutex;

use super::{AgentError, Inner};

/// The relay of one task on this node.
pub struct Relay {
    /// Our (non-blocking) write end; `None` after end-of-file.
    write: Mutex<Option<std::fs::File>>,
    /// The pipe's inode (how the process's descriptors are recognized).
    pub ino: u64,
    /// The task is moving: input waits.
    moving: AtomicBool,
}

/// The relays of this node's tasks.
pub type Relays = Mutex<HashMap<u64, Arc<Relay>>>;

impl Relay {
    /// A relay around our write end `w` of a pipe.
    pub fn new(w: OwnedFd) -> Result<Relay, AgentError> {
        let f = std::fs::File::from(w);
        let ino = std::os::unix::fs::MetadataExt::ino(
            &f.metadata()
                .map_err(|e| AgentError::Invalid(format!("stdin pipe: {e}")))?,
        );
        Ok(Relay {
            write: Mutex::new(Some(f)),
            ino,
            moving: AtomicBool::new(false),
        })
    }

    /// Writes what fits now; returns the bytes taken.
    fn feed(&self, data: &[u8], eof: bool) -> Result<usize, AgentError> {
        let mut w = self.write.lock();
        let Some(f) = w.as_mut() else {
            return Err(AgentError::Invalid("the task's stdin is closed".into()));
        };
        let mut taken = 0;
        while taken < data.len() {
            match f.write(&data[taken..]) {
                Ok(0) => break,
                Ok(n) => taken += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    // The task closed its stdin or ended: input is dropped.
                    *w = None;
                    return Ok(data.len());
                }
                Err(e) => return Err(AgentError::Invalid(format!("stdin pipe: {e}"))),
            }
        }
        if eof && taken == data.len() {
            *w = None;
        }
        Ok(taken)
    }

    /// Stops taking input (a move begins).
    pub fn pause(&self) {
        self.moving.store(true, Ordering::SeqCst);
        // Wait for a write in progress.
        drop(self.write.lock());
    }

    /// Takes input again after a failed move, first putting back `pending`.
    pub fn resume(&self, pending: &[u8]) {
        if !pending.is_empty()
            && let Err(e) = self.feed(pending, false)
        {
            tracing::error!(error = %e, "could not put the task's unread stdin back");
        }
        self.moving.store(false, Ordering::SeqCst);
    }
}

/// Handles a `Stdin` call: feeds the task here, or forwards it to the
/// node where the task runs.
pub async fn stdin(inner: &Inner, r: pb::StdinRequest) -> Result<pb::StdinReply, AgentError> {
    let task = inner
        .meta
        .clone()
        .task_get(TaskGetRequest { task_id: r.task_id })
        .await
        .map_err(|s| AgentError::rpc(format!("task {}", r.task_id), &s))?
        .into_inner();
    let relay = inner.stdins.lock().get(&r.task_id).cloned();
    let Some(relay) = relay else {
        return forward(inner, &task, r).await;
    };
    if relay.moving.load(Ordering::SeqCst) {
        return Err(AgentError::Busy(format!(
            "task {} is moving; send its input again shortly",
            r.task_id
        )));
    }
    super::source::check_owner(i32::try_from(task.pid).unwrap_or(0), r.caller_uid)?;
    let taken = tokio::task::spawn_blocking(move || relay.feed(&r.data, r.eof))
        .await
        .map_err(|e| AgentError::Invalid(e.to_string()))??;
    Ok(pb::StdinReply {
        taken: taken as u64,
    })
}

async fn forward(
    inner: &Inner,
    task: &migfs_proto::meta::TaskInfo,
    r: pb::StdinRequest,
) -> Result<pb::StdinReply, AgentError> {
    if task.node_id == inner.cfg.node_id {
        return Err(AgentError::Busy(format!(
            "task {} has no stdin relay here (yet)",
            r.task_id
        )));
    }
    let node = inner.node(&task.node).await?;
    inner
        .agent_at(&node.addr)?
        .stdin(r)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable => AgentError::Busy(s.message().to_owned()),
            _ => AgentError::rpc(format!("stdin of the task on {}", node.name), &s),
        })
}

/// The process's descriptor numbers that are read ends of `relay`'s pipe.
pub fn fds_of(pid: Pid, relay: &Relay) -> Vec<i32> {
    let link = format!("pipe:[{}]", relay.ino);
    crate::sys::procfs::numeric_dir(&format!("/proc/{pid}/fd"))
        .unwrap_or_default()
        .into_iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy() == link)
        })
        .collect()
}

/// Reads what the (frozen) process has not read from the pipe yet,
/// through a copy of its descriptor `fd`.
pub fn drain(pid: Pid, fd: i32) -> Result<Vec<u8>, AgentError> {
    let err = |e: std::io::Error| AgentError::phase("capture", format!("stdin pipe: {e}"));
    let pidfd = crate::sys::reap::pidfd_open(pid.as_raw()).map_err(err)?;
    let ours = crate::sys::uffd::pidfd_getfd(&pidfd, fd).map_err(err)?;
    let n = crate::sys::pipe::unread(ours.as_fd()).map_err(err)?;
    let mut buf = vec![0u8; n];
    std::fs::File::from(ours)
        .read_exact(&mut buf)
        .map_err(err)?;
    Ok(buf)
}
