//! One module per `migfs` subcommand. Each has `Args` (clap) and
//! `run(Args) -> anyhow::Result<ExitCode>`; a command that needs an async
//! runtime builds its own, so `cluster exec` can enter namespaces while the
//! process is still single-threaded.

pub mod balance;
pub mod bench;
pub mod bench_fs;
pub mod bench_move;
pub mod checkpoint;
pub mod cluster;
pub mod meta;
pub mod node;
pub mod pin;
pub mod restore;
pub mod status;
pub mod task;

use std::path::Path;

use anyhow::Context;
use migfs_proto::auth::Secret;

/// Reads the cluster secret, refusing a file others can read.
pub fn read_secret(path: &Path) -> anyhow::Result<Secret> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the cluster secret file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        anyhow::bail!(
            "the cluster secret file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cluster secret file {}", path.display()))?;
    Secret::new(&text).with_context(|| format!("bad cluster secret in {}", path.display()))
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
