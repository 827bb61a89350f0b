//! For command-line clients on a node: find the local agent (the node
//! names its socket in `<mount>/.migfs/stats`) and connect to it.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use migfs_proto::agent::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};

use super::AgentError;

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
