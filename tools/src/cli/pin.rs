//! `migfs pin TASK [--unpin]`: keep a task where it runs (the balancer
//! never moves a pinned task), or let it go again.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{connect, local_node};
use migfs_proto::agent as pb;

use super::task::{Local, runtime};

#[derive(Debug, Parser)]
pub struct Args {
    /// The task: `t42` or `42`.
    task: String,
    /// Unpin it instead.
    #[arg(long)]
    unpin: bool,
    #[command(flatten)]
    local: Local,
}

/// `t42`, `task:42` or `42`.
fn task_id(what: &str) -> anyhow::Result<u64> {
    let digits = what
        .strip_prefix("task:")
        .or_else(|| what.strip_prefix('t'))
        .unwrap_or(what);
    digits
        .parse()
        .with_context(|| format!("{what:?} is not a task id (t42 or 42)"))
}

/// `migfs pin`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let task_id = task_id(&a.task)?;
    let node = local_node(&a.local.mount)?;
    let t = runtime()?.block_on(async {
        let mut c = connect(&node.socket).await?;
        let r = c
            .pin(pb::PinRequest {
                task_id,
                pinned: !a.unpin,
                caller_uid: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
        anyhow::Ok(r.into_inner())
    })?;
    let what = if t.pinned { "pinned" } else { "unpinned" };
    println!("t{} {what} (runs on {})", t.task_id, t.node);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::task_id;

    #[test]
    fn task_ids_are_read_with_or_without_their_prefix() {
        assert_eq!(task_id("t42").unwrap(), 42);
        assert_eq!(task_id("task:7").unwrap(), 7);
        assert_eq!(task_id("9").unwrap(), 9);
        assert!(task_id("tx").is_err());
    }
}
