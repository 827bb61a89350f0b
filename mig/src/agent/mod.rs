//! The migration agent (DESIGN "Migration"): every `migfs node` runs one.
//! It takes local requests on a Unix socket (the caller's credentials are
//! checked) and calls from other agents on the node's address (the cluster
//! secret is checked), and plays three roles:
//!
//! - [`source`]: moves a process away: check, mark the task moving, freeze,
//!   capture, send, commit, then serve its memory until the target has it.
//! - [`target`]: receives an image, rebuilds the process (memory on demand
//!   through userfaultfd), holds it until the source commits, lets it run,
//!   pulls the rest of its memory and tells the source it is done.
//! - [`run`]: starts commands as tasks and reports how they end.
//! - [`load`]: measures the node's load and reports it; `view`: the
//!   cluster and task pins for local clients; `parked`: locks of a
//!   checkpointed process kept held until its restore.
//!
//! The agent never decides what to move where: that is policy's job.

pub mod client;
pub mod load;
mod parked;
mod precopy;
mod run;
mod source;
mod stdin;
mod target;
mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use migfs_proto::agent::agent_server::{Agent as AgentRpc, AgentServer};
use migfs_proto::agent::{self as pb};
use migfs_proto::auth::{Check, Present, Secret};
use migfs_proto::meta::meta_client::MetaClient;
use migfs_proto::meta::{ListNodesRequest, NodeInfo};
use parking_lot::Mutex;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

/// The metadata client the agent uses.
pub type MetaRpc = MetaClient<InterceptedService<Channel, Present>>;
/// A client of another node's agent.
pub type AgentClient = pb::agent_client::AgentClient<InterceptedService<Channel, Present>>;

/// Why an agent operation failed. Each message names the phase.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is malformed or names something that does not exist.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this.
    #[error("{0}")]
    Denied(String),
    /// A phase of a move failed; the process is where the message says.
    #[error("{phase} failed: {cause}")]
    Phase {
        /// The phase (prepare, freeze, capture, transfer, restore, commit...).
        phase: &'static str,
        /// What went wrong.
        cause: String,
    },
    /// Not now: try again shortly (a task's stdin while it moves).
    #[error("{0}")]
    Busy(String),
    /// A call to the metadata server or another agent failed.
    #[error("{what}: {status}")]
    Rpc {
        /// What was asked.
        what: String,
        /// The answer.
        status: String,
    },
}

impl AgentError {
    pub(crate) fn phase(phase: &'static str, cause: impl std::fmt::Display) -> AgentError {
        AgentError::Phase {
            phase,
            cause: cause.to_string(),
        }
    }

    pub(crate) fn rpc(what: impl Into<String>, st: &Status) -> AgentError {
        AgentError::Rpc {
            what: what.into(),
            status: st.message().to_owned(),
        }
    }
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        match e {
            AgentError::Invalid(m) => Status::invalid_argument(m),
            AgentError::Denied(m) => Status::permission_denied(m),
            AgentError::Busy(m) => Status::unavailable(m),
            other => Status::failed_precondition(other.to_string()),
        }
    }
}

/// What the agent needs to know about its node.
#[derive(Clone)]
pub struct AgentConfig {
    /// Node name.
    pub name: String,
    /// Node id.
    pub node_id: u64,
    /// The node's current FUSE session (locks and opens are held by it).
    pub session: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// The node's service address (other agents call us there).
    pub listen: SocketAddr,
    /// Scratch directory for images in flight.
    pub work: PathBuf,
    /// Metadata server URL.
    pub meta_url: String,
    /// Cluster secret.
    pub secret: Secret,
    /// Bytes of warm memory to keep allocated for eager moves to this
    /// node (0: none; see [`crate::restore::warm`]).
    pub warm_bytes: u64,
}

/// The agent of one node.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

/// Shared state of the agent.
pub(crate) struct Inner {
    pub(crate) cfg: AgentConfig,
    pub(crate) meta: MetaRpc,
    pub(crate) rt: tokio::runtime::Handle,
    /// Moves this node is the source of, by move id (page servers).
    pub(crate) sources: Mutex<HashMap<u64, Arc<source::Serving>>>,
    /// Memory pre-copied to this node, by move id, until its Receive.
    pub(crate) precopies: Mutex<HashMap<u64, Arc<crate::pages::Store>>>,
    /// Stdin relays of the tasks running here, by task id.
    pub(crate) stdins: Arc<stdin::Relays>,
    /// Memory kept allocated for eager moves to this node.
    pub(crate) warm: Option<Arc<crate::restore::warm::WarmPool>>,
    next_move: AtomicU64,
}

impl Inner {
    /// Bytes of warm memory ready for the next move in (0: none kept).
    pub(crate) fn warm_ready(&self) -> u64 {
        self.warm
            .as_deref()
            .map_or(0, crate::restore::warm::WarmPool::ready_bytes)
    }

    /// A cluster-unique move id.
    pub(crate) fn move_id(&self) -> u64 {
        (self.cfg.node_id << 40) | self.next_move.fetch_add(1, Ordering::Relaxed)
    }

    /// A client of the agent at `addr`.
    pub(crate) fn agent_at(&self, addr: &str) -> Result<AgentClient, AgentError> {
        // Callable from the move's own threads: the channel's task needs
        // the runtime.
        let _rt = self.rt.enter();
        let ch = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| AgentError::Invalid(format!("agent address {addr}: {e}")))?
            .tcp_nodelay(true)
            .initial_stream_window_size(migfs_proto::STREAM_WINDOW)
            .initial_connection_window_size(migfs_proto::CONNECTION_WINDOW)
            .max_frame_size(migfs_proto::MAX_FRAME)
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
        Ok(
            pb::agent_client::AgentClient::with_interceptor(ch, Present(self.cfg.secret.clone()))
                .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES),
        )
    }

    /// Every node the metadata server knows.
    pub(crate) async fn nodes(&self) -> Result<Vec<NodeInfo>, AgentError> {
        let r = self
            .meta
            .clone()
            .list_nodes(ListNodesRequest {})
            .await
            .map_err(|s| AgentError::rpc("list nodes", &s))?;
        Ok(r.into_inner().nodes)
    }

    /// The node named `name`, which must be up.
    pub(crate) async fn node(&self, name: &str) -> Result<NodeInfo, AgentError> {
        let nodes = self.nodes().await?;
        let Some(n) = nodes.iter().find(|n| n.name == name) else {
            let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
            return Err(AgentError::Invalid(format!(
                "unknown node {name:?} (known: {})",
                known.join(", ")
            )));
        };
        if !n.up {
            return Err(AgentError::Invalid(format!("node {name} is down")));
        }
        Ok(n.clone())
    }

    /// The node with id `id`.
    pub(crate) async fn node_by_id(&self, id: u64) -> Result<NodeInfo, AgentError> {
        self.nodes()
            .await?
            .into_iter()
            .find(|n| n.node_id == id)
            .ok_or_else(|| AgentError::Invalid(format!("node {id} is not known")))
    }
}

impl Agent {
    /// An agent for the node `cfg` describes. Call inside the runtime.
    pub fn new(cfg: AgentConfig) -> Result<Agent, AgentError> {
        std::fs::create_dir_all(&cfg.work).map_err(|e| {
            AgentError::Invalid(format!("create work dir {}: {e}", cfg.work.display()))
        })?;
        let ch = Channel::from_shared(cfg.meta_url.clone())
            .map_err(|e| AgentError::Invalid(format!("metadata URL {}: {e}", cfg.meta_url)))?
            .tcp_nodelay(true)
            .connect_lazy();
        let meta = MetaClient::with_interceptor(ch, Present(cfg.secret.clone()));
        let warm = match cfg.warm_bytes {
            0 => None,
            n => Some(Arc::new(crate::restore::warm::WarmPool::start(n).map_err(
                |e| AgentError::Invalid(format!("start the warm-memory pool: {e}")),
            )?)),
        };
        let agent = Agent {
            inner: Arc::new(Inner {
                cfg,
                meta,
                rt: tokio::runtime::Handle::current(),
                sources: Mutex::new(HashMap::new()),
                precopies: Mutex::new(HashMap::new()),
                stdins: Arc::default(),
                warm,
                next_move: AtomicU64::new(1),
            }),
        };
        load::start(&agent.inner);
        Ok(agent)
    }

    /// The service for the node's TCP address (secret checked).
    pub fn tcp_service(&self) -> InterceptedService<AgentServer<AgentService>, Check> {
        InterceptedService::new(
            AgentServer::new(AgentService {
                inner: Arc::clone(&self.inner),
            })
            .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES),
            Check(self.cfg().secret.clone()),
        )
    }

    fn cfg(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    /// Serves local requests on the Unix socket `path` (mode 0666: the
    /// agent checks each caller's credentials itself) until the runtime
    /// stops.
    pub fn serve_unix(&self, path: &Path) -> Result<(), AgentError> {
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)
            .map_err(|e| AgentError::Invalid(format!("bind {}: {e}", path.display())))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| AgentError::Invalid(format!("chmod {}: {e}", path.display())))?;
        let svc = AgentServer::new(AgentService {
            inner: Arc::clone(&self.inner),
        });
        tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l))
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "agent socket server failed");
            }
        });
        Ok(())
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

/// A local caller's uid and gid (`u32::MAX` when the socket does not say),
/// or `None` for another agent (over TCP, already authenticated by the
/// cluster secret).
fn local_cred<T>(req: &Request<T>) -> Option<(u32, u32)> {
    req.extensions().get::<UdsConnectInfo>().map(|i| {
        i.peer_cred
            .map_or((u32::MAX, u32::MAX), |c| (c.uid(), c.gid()))
    })
}

/// Calls only other agents may make.
fn agents_only<T>(req: &Request<T>) -> Result<(), Status> {
    if local_cred(req).is_some() {
        return Err(Status::permission_denied(
            "this call is for other agents, not local clients",
        ));
    }
    Ok(())
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentRpc for AgentService {
    type MoveStream = EventStream<pb::MoveEvent>;
    type ReceiveStream = EventStream<pb::ReceiveEvent>;

    async fn r#move(
        &self,
        req: Request<pb::MoveRequest>,
    ) -> Result<Response<Self::MoveStream>, Status> {
        let cred = local_cred(&req);
        let mut r = req.into_inner();
        if let Some((uid, _)) = cred {
            r.caller_uid = uid;
        }
        let s = source::start(Arc::clone(&self.inner), r).await?;
        Ok(Response::new(s))
    }

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<pb::RunReply>, Status> {
        // A local caller runs as itself; another agent forwards a request
        // whose caller it already checked.
        let cred = local_cred(&req);
        let r = req.into_inner();
        let cred = cred.unwrap_or((r.uid, r.gid));
        Ok(Response::new(run::start(&self.inner, r, cred).await?))
    }

    async fn stdin(
        &self,
        req: Request<pb::StdinRequest>,
    ) -> Result<Response<pb::StdinReply>, Status> {
        let cred = local_cred(&req);
        let mut r = req.into_inner();
        if let Some((uid, _)) = cred {
            r.caller_uid = uid;
        }
        Ok(Response::new(stdin::stdin(&self.inner, r).await?))
    }

    async fn tasks(
        &self,
        req: Request<pb::TasksRequest>,
    ) -> Result<Response<pb::TasksReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(run::tasks(&self.inner, &r).await?))
    }

    async fn cluster(
        &self,
        _req: Request<pb::ClusterRequest>,
    ) -> Result<Response<pb::ClusterReply>, Status> {
        Ok(Response::new(view::cluster(&self.inner).await?))
    }

    async fn pin(
        &self,
        req: Request<pb::PinRequest>,
    ) -> Result<Response<migfs_proto::meta::TaskInfo>, Status> {
        let cred = local_cred(&req);
        let mut r = req.into_inner();
        if let Some((uid, _)) = cred {
            r.caller_uid = uid;
        }
        Ok(Response::new(view::pin(&self.inner, r).await?))
    }

    async fn park_locks(
        &self,
        req: Request<pb::ParkLocksRequest>,
    ) -> Result<Response<pb::ParkLocksReply>, Status> {
        let uid = local_cred(&req).map(|(uid, _)| uid);
        let r = parked::park(&self.inner, req.into_inner(), uid).await?;
        Ok(Response::new(r))
    }

    async fn claim_locks(
        &self,
        req: Request<pb::ClaimLocksRequest>,
    ) -> Result<Response<pb::ClaimLocksReply>, Status> {
        let uid = local_cred(&req).map(|(uid, _)| uid);
        let r = parked::claim(&self.inner, req.into_inner(), uid).await?;
        Ok(Response::new(r))
    }

    async fn unclaim_locks(
        &self,
        req: Request<pb::UnclaimLocksRequest>,
    ) -> Result<Response<pb::UnclaimLocksReply>, Status> {
        let uid = local_cred(&req).map(|(uid, _)| uid);
        let r = parked::unclaim(&self.inner, req.into_inner(), uid).await?;
        Ok(Response::new(r))
    }

    async fn unpark_locks(
        &self,
        req: Request<pb::UnparkLocksRequest>,
    ) -> Result<Response<pb::UnclaimLocksReply>, Status> {
        let uid = local_cred(&req).map(|(uid, _)| uid);
        let r = parked::unpark(&self.inner, req.into_inner(), uid).await?;
        Ok(Response::new(r))
    }

    async fn prepare(
        &self,
        req: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareReply>, Status> {
        agents_only(&req)?;
        let warm = self.inner.warm_ready();
        Ok(Response::new(target::prepare(&req.into_inner(), warm)))
    }

    async fn receive(
        &self,
        req: Request<Streaming<pb::ReceiveMsg>>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        agents_only(&req)?;
        let s = target::receive(Arc::clone(&self.inner), req.into_inner()).await?;
        Ok(Response::new(s))
    }

    async fn precopy(
        &self,
        req: Request<Streaming<pb::PrecopyMsg>>,
    ) -> Result<Response<pb::PrecopyReply>, Status> {
        agents_only(&req)?;
        let r = precopy::receive(&self.inner, req.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn drained(
        &self,
        req: Request<pb::DrainedRequest>,
    ) -> Result<Response<pb::DrainedReply>, Status> {
        agents_only(&req)?;
        let r = req.into_inner();
        self.serving(r.move_id)?.drained(r);
        Ok(Response::new(pb::DrainedReply {}))
    }
}

impl AgentService {
    fn serving(&self, move_id: u64) -> Result<Arc<source::Serving>, Status> {
        self.inner
            .sources
            .lock()
            .get(&move_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no move {move_id} is served here")))
    }
}
