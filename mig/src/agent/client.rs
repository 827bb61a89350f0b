//! For command-line clients on a node: find the local agent (the node
//! names its socket in `<mount>/.migfs/stats`) and connect to it.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use migfs_proto::agent::agent_client::AgentClient;
use migfs_proto::agent::{self as pb};
use migfs_proto::meta::HeldLock;
use tonic::transport::{Channel, Endpoint, Uri};

use super::AgentError;
use crate::checkpoint::{LockParking, Parked};
use crate::image::park::LockPark;

/// Key of the agent's socket path in `/.migfs/stats`.
pub const SOCKET_KEY: &str = "agent_socket";
/// Key of the node's name in `/.migfs/stats`.
pub const NODE_KEY: &str = "node_name";

/// What a node says about itself in `<mount>/.migfs/stats`.
#[derive(Clone, Debug)]
pub struct LocalNode {
    /// Node name.
    pub name: String,
    /// The agent's Unix socket.
    pub socket: PathBuf,
}

/// Reads the local node's name and agent socket from its mount.
pub fn local_node(mount: &Path) -> Result<LocalNode, AgentError> {
    let stats = mount.join(".migfs/stats");
    let text = std::fs::read_to_string(&stats).map_err(|e| {
        AgentError::Invalid(format!(
            "no migfs node here ({}: {e}); run this on a node, or pass --mount",
            stats.display()
        ))
    })?;
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix(' ')))
            .map(str::to_owned)
    };
    match (get(NODE_KEY), get(SOCKET_KEY)) {
        (Some(name), Some(socket)) => Ok(LocalNode {
            name,
            socket: socket.into(),
        }),
        _ => Err(AgentError::Invalid(format!(
            "{} names no agent (is this node's migfs too old?)",
            stats.display()
        ))),
    }
}

/// A client of the agent listening on `socket`.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, AgentError> {
    let path = socket.to_owned();
    let ch = Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .map_err(|e| {
            AgentError::Invalid(format!("connect to the agent at {}: {e}", socket.display()))
        })?;
    Ok(AgentClient::new(ch)
        .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES))
}

/// The local agent's lock parking, for the (synchronous) checkpoint and
/// restore commands: each call connects to the agent's socket on a small
/// runtime of its own.
pub struct AgentLocks {
    socket: PathBuf,
    hold: std::time::Duration,
    rt: tokio::runtime::Runtime,
}

impl AgentLocks {
    /// Through the agent of `node`; parked locks nobody claims are dropped
    /// after `hold` (zero: the agent's default).
    pub fn new(node: &LocalNode, hold: std::time::Duration) -> Result<AgentLocks, AgentError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AgentError::Invalid(format!("runtime: {e}")))?;
        Ok(AgentLocks {
            socket: node.socket.clone(),
            hold,
            rt,
        })
    }

    fn call<T, F>(&self, what: &str, f: impl FnOnce(AgentClient<Channel>) -> F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt.block_on(async {
            let c = connect(&self.socket).await.map_err(|e| e.to_string())?;
            f(c).await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("{what}: {}", s.message()))
        })
    }

    /// Hands the locks parked as `park` says to process `pid` of this node
    /// (a restore, just before the process takes them); returns them as
    /// they were, for [`AgentLocks::unclaim`].
    pub fn claim(&self, park: &LockPark, pid: i32) -> Result<Vec<HeldLock>, String> {
        let req = pb::ClaimLocksRequest {
            session: park.session,
            token: park.token,
            pid: u32::try_from(pid).map_err(|_| format!("pid {pid}"))?,
        };
        let r = self.call("claim parked locks", |mut c| async move {
            c.claim_locks(req).await
        })?;
        Ok(r.claimed)
    }

    /// Parks again the locks a failed restore claimed for `pid`.
    pub fn unclaim(&self, pid: i32, claimed: Vec<HeldLock>) -> Result<(), String> {
        let req = pb::UnclaimLocksRequest {
            pid: u32::try_from(pid).map_err(|_| format!("pid {pid}"))?,
            claimed,
        };
        self.call("give parked locks back", |mut c| async move {
            c.unclaim_locks(req).await
        })
        .map(|_| ())
    }
}

impl LockParking for AgentLocks {
    fn park(&self, pid: i32) -> Result<Parked, String> {
        let req = pb::ParkLocksRequest {
            pid: u32::try_from(pid).map_err(|_| format!("pid {pid}"))?,
            hold_ms: u64::try_from(self.hold.as_millis()).unwrap_or(u64::MAX),
        };
        let r = self.call("park locks", |mut c| async move { c.park_locks(req).await })?;
        Ok(Parked {
            park: LockPark {
                session: r.session,
                token: r.token,
                locks: r.locks,
            },
            held: r.held,
        })
    }

    fn unpark(&self, parked: Parked) -> Result<(), String> {
        let req = pb::UnparkLocksRequest {
            session: parked.park.session,
            token: parked.park.token,
            held: parked.held,
        };
        self.call(
            "unpark locks",
            |mut c| async move { c.unpark_locks(req).await },
        )
        .map(|_| ())
    }
}
