//! `migfs meta`: the metadata server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use migfs_meta::{Config, SledStore, WriteBehind};

/// Serves the cluster's metadata (namespace, block maps, sessions, locks)
/// from a sled database, until SIGINT or SIGTERM.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Database directory (created on first use).
    #[arg(long)]
    db: PathBuf,
    /// Address to listen on, e.g. 127.0.0.10:7700.
    #[arg(long)]
    listen: SocketAddr,
    /// File holding the cluster secret (keep it 0600).
    #[arg(long)]
    secret_file: PathBuf,
    /// Session lease: a node that has not heartbeated for this long is
    /// considered dead and its session ends.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
    /// Block size of a new database (an existing one keeps its own).
    #[arg(long, env = "MIGFS_BLOCK_SIZE", default_value_t = 65536)]
    block_size: u32,
    /// Copies of each block nodes keep, for a new database.
    #[arg(long, default_value_t = 2)]
    replicas: u32,
    /// Seconds without another node looking into a directory before a node
    /// may take its delegation (answer creates and removals there itself);
    /// keep it above the nodes' --kernel-ttl. 0 turns delegations off.
    #[arg(long, env = "MIGFS_DELEGATE_QUIET", default_value_t = 2.0)]
    delegate_quiet: f64,
}

/// Runs the server.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("info");
    let secret = crate::cli::read_secret(&a.secret_file)?;
    if a.lease_ms == 0 || a.lease_ms > u64::from(u32::MAX) {
        anyhow::bail!("--lease-ms must be between 1 and {}", u32::MAX);
    }
    if !a.block_size.is_power_of_two() || !(4096..=16 << 20).contains(&a.block_size) {
        anyhow::bail!("--block-size must be a power of two from 4096 to 16 MiB");
    }
    if a.replicas == 0 {
        anyhow::bail!("--replicas must be at least 1");
    }
    let delegate_quiet = Duration::try_from_secs_f64(a.delegate_quiet)
        .context("--delegate-quiet must be a non-negative number of seconds")?;
    let config = Config {
        lease: Duration::from_millis(a.lease_ms),
        block_size: a.block_size,
        replicas: a.replicas,
        delegate_quiet,
        ..Config::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("MIGFS_META_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1),
        )
        .enable_all()
        .thread_name("migfs-meta")
        .build()
        .context("start the async runtime")?;
    rt.block_on(async {
        let disk = SledStore::open(&a.db)
            .with_context(|| format!("open the metadata database {}", a.db.display()))?;
        let store = WriteBehind::open_logged(Arc::new(disk), &a.db)
            .with_context(|| format!("load the metadata database {}", a.db.display()))?;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listen on {}", a.listen))?;
        tracing::info!(listen = %listener.local_addr()?, db = %a.db.display(), "migfs meta starting");
        migfs_meta::server::run(Arc::new(store), config, listener, secret, crate::cli::shutdown_signal())
            .await
            .context("metadata server failed")
    })?;
    tracing::info!("migfs meta stopped");
    Ok(ExitCode::SUCCESS)
}
