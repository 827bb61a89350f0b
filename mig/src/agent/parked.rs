//! Locks of a checkpointed process, parked between its checkpoint and
//! its restore (docs/checkpoint-restore.md "Locks").
//!
//! A plain checkpoint ends the process, and with it its locks on migfs
//! files. So before it ends, the checkpoint asks its node's agent to park
//! them in the metadata server under a random token: held by nobody, taken
//! by nobody, until a restore (on any node) claims them for the process it
//! rebuilds, whose own lock requests then take them as after a move. A
//! restore that fails gives them back, parked again. Locks no restore
//! claims are dropped after the hold time.

use std::io::Read;
use std::time::Duration;

use migfs_proto::agent as pb;
use migfs_proto::meta::{
    ClaimParkedRequest, DropParkedRequest, ParkLocksRequest, ReturnLocksRequest,
};

use super::{AgentError, Inner};

/// How long parked locks wait for a restore unless the caller says.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(600);

/// Only root checkpoints and restores (they need CAP_SYS_PTRACE and
/// CAP_CHECKPOINT_RESTORE); only root may park or claim locks.
fn root_only(caller_uid: Option<u32>) -> Result<(), AgentError> {
    match caller_uid {
        Some(0) => Ok(()),
        Some(uid) => Err(AgentError::Denied(format!(
            "only root may park or claim a process's locks (caller uid {uid})"
        ))),
        None => Err(AgentError::Denied(
            "locks are parked and claimed by local clients only".into(),
        )),
    }
}

fn token() -> Result<u64, AgentError> {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| AgentError::Invalid(format!("park token: /dev/urandom: {e}")))?;
    Ok(u64::from_ne_bytes(b).max(1))
}

/// Parks the locks of process `r.pid` of this node.
pub async fn park(
    inner: &Inner,
    r: pb::ParkLocksRequest,
    caller_uid: Option<u32>,
) -> Result<pb::ParkLocksReply, AgentError> {
    root_only(caller_uid)?;
    let session = (inner.cfg.session)();
    let token = token()?;
    let reply = inner
        .meta
        .clone()
        .park_locks(ParkLocksRequest {
            session_id: session,
            pid: r.pid,
            token,
        })
        .await
        .map_err(|s| AgentError::rpc("park locks", &s))?
        .into_inner();
    let locks = reply.locks;
    if locks > 0 {
        let hold = match r.hold_ms {
            0 => DEFAULT_HOLD,
            ms => Duration::from_millis(ms),
        };
        let mut meta = inner.meta.clone();
        tokio::spawn(async move {
            tokio::time::sleep(hold).await;
            let req = DropParkedRequest {
                session_id: session,
                token,
            };
            match meta.drop_parked(req).await {
                Ok(_) => tracing::debug!(session, "parked locks expired (if unclaimed)"),
                Err(s) => tracing::warn!(error = %s.message(), "could not drop parked locks"),
            }
        });
        tracing::info!(pid = r.pid, locks, ?hold, "locks parked");
    }
    Ok(pb::ParkLocksReply {
        session,
        token,
        locks,
        held: reply.held,
    })
}

/// Gives locks parked by a checkpoint that then failed back to their
/// process, which keeps running.
pub async fn unpark(
    inner: &Inner,
    r: pb::UnparkLocksRequest,
    caller_uid: Option<u32>,
) -> Result<pb::UnclaimLocksReply, AgentError> {
    root_only(caller_uid)?;
    let mut meta = inner.meta.clone();
    meta.drop_parked(DropParkedRequest {
        session_id: r.session,
        token: r.token,
    })
    .await
    .map_err(|s| AgentError::rpc("unpark locks", &s))?;
    // No process has pid u32::MAX: nothing is dropped, `held` comes back.
    meta.return_locks(ReturnLocksRequest {
        to_session: r.session,
        to_pid: u32::MAX,
        locks: r.held,
    })
    .await
    .map_err(|s| AgentError::rpc("unpark locks", &s))?;
    Ok(pb::UnclaimLocksReply {})
}

/// Hands the locks parked under `r.token` to process `r.pid` of this node.
pub async fn claim(
    inner: &Inner,
    r: pb::ClaimLocksRequest,
    caller_uid: Option<u32>,
) -> Result<pb::ClaimLocksReply, AgentError> {
    root_only(caller_uid)?;
    let claimed = inner
        .meta
        .clone()
        .claim_parked(ClaimParkedRequest {
            from_session: r.session,
            token: r.token,
            to_session: (inner.cfg.session)(),
            to_pid: r.pid,
        })
        .await
        .map_err(|s| AgentError::rpc("claim parked locks", &s))?
        .into_inner()
        .moved;
    Ok(pb::ClaimLocksReply { claimed })
}

/// Parks again the locks a failed restore claimed for process `r.pid`.
pub async fn unclaim(
    inner: &Inner,
    r: pb::UnclaimLocksRequest,
    caller_uid: Option<u32>,
) -> Result<pb::UnclaimLocksReply, AgentError> {
    root_only(caller_uid)?;
    inner
        .meta
        .clone()
        .return_locks(ReturnLocksRequest {
            to_session: (inner.cfg.session)(),
            to_pid: r.pid,
            locks: r.claimed,
        })
        .await
        .map_err(|s| AgentError::rpc("give parked locks back", &s))?;
    Ok(pb::UnclaimLocksReply {})
}
