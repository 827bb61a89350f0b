//! `migfs checkpoint PID --to DIR [--leave-running] [--precopy]` and
//! `migfs checkpoint --check PID` (docs/checkpoint-restore.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{AgentLocks, local_node};
use migfs_mig::checkpoint::{CheckpointOptions, LockParking, checkpoint};
use migfs_mig::pages::rounds::RoundPolicy;
use migfs_mig::predump::PrecopyOptions;
use nix::unistd::Pid;

/// Exit code of `--check` when the process cannot be moved.
pub const EXIT_NOT_MOVABLE: u8 = 3;

#[derive(Debug, Parser)]
pub struct Args {
    /// The process to checkpoint.
    pid: i32,
    /// Image directory to write (created if missing).
    #[arg(long, required_unless_present = "check")]
    to: Option<PathBuf>,
    /// Let the process run on after the checkpoint (default: end it).
    #[arg(long)]
    leave_running: bool,
    /// Copy the process's memory into the image while it still runs, in
    /// rounds that track the pages it writes (userfaultfd write-protect),
    /// until what it writes stops shrinking; then freeze it and copy only
    /// what changed since. The freeze no longer grows with its memory.
    #[arg(long)]
    precopy: bool,
    /// With --precopy: rounds at most (the first copies everything).
    #[arg(long, default_value_t = 8, requires = "precopy")]
    precopy_rounds: u32,
    /// Only say whether the process can be moved and, if not, name each
    /// resource that stops it; changes nothing. Exit 0: movable, 3: not.
    #[arg(long, conflicts_with_all = ["to", "leave_running", "precopy"])]
    check: bool,
    /// Give up when a thread does not stop within this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    freeze_timeout_ms: u64,
    /// Print the timings as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Keep the process's locks on migfs files held (parked in the
    /// metadata server) for this many seconds after it ends, for the
    /// restore to claim; 0: let them go with the process.
    #[arg(long, default_value_t = 600)]
    hold_locks: u64,
    /// The migfs mount whose node parks the locks.
    #[arg(long, default_value = "/migfs")]
    mount: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let pid = Pid::from_raw(a.pid);
    if a.check {
        let blockers = migfs_mig::check::check(pid)?;
        if blockers.is_empty() {
            println!("pid {pid} can be moved");
            return Ok(ExitCode::SUCCESS);
        }
        println!("pid {pid} cannot be moved:");
        for b in blockers {
            println!("  {b}");
        }
        return Ok(ExitCode::from(EXIT_NOT_MOVABLE));
    }
    let dir = a.to.clone().context("--to DIR is required")?;
    let opts = CheckpointOptions {
        leave_running: a.leave_running,
        freeze_timeout: Duration::from_millis(a.freeze_timeout_ms),
        park: parking(&a)?,
        precopy: a.precopy.then(|| PrecopyOptions {
            rounds: RoundPolicy {
                max_rounds: a.precopy_rounds.max(1),
                ..RoundPolicy::default()
            },
        }),
        ..Default::default()
    };
    // Every error names the pid and what failed.
    let r = checkpoint(pid, &dir, &opts)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if a.json {
        let pre = r.precopy.map_or_else(String::new, |p| {
            format!(
                ",\"precopy_rounds\":{},\"precopy_stop\":\"{}\",\"precopy_ms\":{:.3},\"precopy_bytes\":{},\"frozen_copy_bytes\":{}",
                p.rounds,
                p.verdict.as_str(),
                ms(p.elapsed),
                p.copied,
                p.frozen_bytes
            )
        });
        println!(
            "{{\"pid\":{pid},\"threads\":{},\"freeze_ms\":{:.3},\"capture_ms\":{:.3},\"copy_ms\":{:.3},\"frozen_ms\":{:.3},\"image_bytes\":{},\"pages_bytes\":{}{pre}}}",
            r.threads,
            ms(r.freeze),
            ms(r.capture.total),
            ms(r.capture.copy),
            ms(r.frozen_for),
            r.capture.image_bytes,
            r.capture.pages_bytes
        );
    } else {
        let what = if a.leave_running {
            "left running"
        } else {
            "ended"
        };
        println!(
            "checkpointed pid {pid} ({} threads) to {}: {:.1} MiB of memory; freeze {:.1} ms, capture {:.1} ms; original {what}",
            r.threads,
            dir.display(),
            r.capture.pages_bytes as f64 / (1 << 20) as f64,
            ms(r.freeze),
            ms(r.capture.total)
        );
        if let Some(p) = r.precopy {
            println!(
                "pre-copy: {} rounds ({}) in {:.1} ms while it ran, {:.1} MiB; {:.1} MiB copied frozen",
                p.rounds,
                p.verdict.as_str(),
                ms(p.elapsed),
                p.copied as f64 / (1 << 20) as f64,
                p.frozen_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The local node's lock parking, when locks should be parked and there is
/// a node (without one the process cannot hold locks on migfs).
fn parking(a: &Args) -> anyhow::Result<Option<Arc<dyn LockParking>>> {
    if a.leave_running || a.hold_locks == 0 {
        return Ok(None);
    }
    let Ok(node) = local_node(&a.mount) else {
        return Ok(None);
    };
    let locks = AgentLocks::new(&node, Duration::from_secs(a.hold_locks))?;
    Ok(Some(Arc::new(locks)))
}
