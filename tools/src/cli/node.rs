//! `migfs node`: one node of the cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use migfs_fs::fuse::Ttls;
use migfs_fs::node::{NodeConfig, ServicesHook, run as run_node};
use migfs_mig::agent::client::{NODE_KEY, SOCKET_KEY};
use migfs_mig::agent::{Agent, AgentConfig};

/// Mounts the filesystem, serves this node's block store, registers with
/// the metadata server and heartbeats, until SIGINT or SIGTERM.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Node name, stable across restarts (e.g. n1).
    #[arg(long)]
    name: String,
    /// Metadata server URL, e.g. http://127.0.0.10:7700.
    #[arg(long)]
    meta: String,
    /// Address for this node's services (blocks), e.g. 127.0.0.11:7700.
    #[arg(long)]
    listen: SocketAddr,
    /// Mount point of the filesystem.
    #[arg(long, default_value = "/migfs")]
    mount: PathBuf,
    /// Data directory (block store).
    #[arg(long)]
    data: PathBuf,
    /// File holding the cluster secret (keep it 0600).
    #[arg(long)]
    secret_file: PathBuf,
    /// Written once the node is mounted and registered.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Seconds a metadata call retries while the server is unreachable
    /// before failing with EIO.
    #[arg(long, env = "MIGFS_META_TIMEOUT", default_value_t = 30.0)]
    meta_timeout: f64,
    /// Memory cache of verified blocks, in MiB.
    #[arg(long, default_value_t = 1024)]
    cache_mib: usize,
    /// Seconds the user-space metadata cache keeps an entry (server-pushed
    /// invalidations drop it earlier).
    #[arg(long, default_value_t = 60.0)]
    cache_ttl: f64,
    /// Seconds the kernel keeps entries and attributes.
    #[arg(long, default_value_t = 1.0)]
    kernel_ttl: f64,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    fuse_threads: usize,
    /// Make fsync also force written blocks to the disk (syncfs of the data
    /// directory), for power-loss durability. Without it, fsync'd data
    /// survives a crash of any migfs daemon but not of the machine.
    #[arg(long, env = "MIGFS_FSYNC_BLOCKS")]
    fsync_blocks: bool,
    /// Warm memory for incoming eager moves, in MiB (0: none). The node
    /// keeps that much anonymous memory allocated in a sleeping child, so
    /// that a moved process's pages land in memory the kernel has already
    /// found and zeroed. It is RAM held while idle.
    #[arg(long, env = "MIGFS_WARM_MEMORY", default_value_t = 0)]
    warm_memory: u64,
}

/// Runs the node.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("info");
    let secret = crate::cli::read_secret(&a.secret_file)?;
    let secs = |s: f64, what: &str| {
        Duration::try_from_secs_f64(s)
            .with_context(|| format!("--{what} must be a non-negative number of seconds"))
    };
    let agent_secret = secret.clone();
    let meta_url = a.meta.clone();
    let warm_bytes = a
        .warm_memory
        .checked_mul(1 << 20)
        .context("--warm-memory is too large")?;
    let cfg = NodeConfig {
        name: a.name,
        meta_url: a.meta,
        listen: a.listen,
        mount: a.mount,
        data: a.data,
        secret,
        meta_retry: secs(a.meta_timeout, "meta-timeout")?,
        cache_bytes: a.cache_mib << 20,
        cache_ttl: secs(a.cache_ttl, "cache-ttl")?,
        ttls: Ttls {
            entry: secs(a.kernel_ttl, "kernel-ttl")?,
            attr: secs(a.kernel_ttl, "kernel-ttl")?,
        },
        fuse_threads: a.fuse_threads,
        fsync_blocks: a.fsync_blocks,
        ready_file: a.ready_file,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("MIGFS_NODE_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(4),
        )
        .enable_all()
        .thread_name("migfs-node")
        .build()
        .context("start the async runtime")?;
    rt.block_on(run_node(
        cfg,
        Some(agent_hook(meta_url, agent_secret, warm_bytes)),
        crate::cli::shutdown_signal(),
    ))
    .context("node failed")?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the migration agent beside the block service: on the node's
/// address for other agents, on `<data>/agent.sock` for local clients.
fn agent_hook(
    meta_url: String,
    secret: migfs_proto::auth::Secret,
    warm_bytes: u64,
) -> ServicesHook {
    Box::new(move |id, routes| {
        let cfg = AgentConfig {
            name: id.name.clone(),
            node_id: id.node_id,
            session: id.session,
            listen: id.listen,
            work: id.data.join("agent"),
            meta_url,
            secret,
            warm_bytes,
        };
        let socket = id.data.join("agent.sock");
        let mut info = vec![(NODE_KEY.to_owned(), id.name.clone())];
        match Agent::new(cfg) {
            Ok(agent) => {
                if let Err(e) = agent.serve_unix(&socket) {
                    tracing::error!(error = %e, "the agent's local socket is not available");
                } else {
                    info.push((SOCKET_KEY.to_owned(), socket.display().to_string()));
                }
                (routes.add_service(agent.tcp_service()), info)
            }
            Err(e) => {
                tracing::error!(error = %e, "the migration agent did not start");
                (routes, info)
            }
        }
    })
}
