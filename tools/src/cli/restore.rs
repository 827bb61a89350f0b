//! `migfs restore --from DIR`: rebuild a checkpointed process here and
//! print its PID (docs/checkpoint-restore.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{AgentLocks, local_node};
use migfs_mig::image::park::LockPark;
use migfs_mig::restore::{Extras, RestoreOptions, restore, restore_with};
use migfs_proto::meta::HeldLock;

#[derive(Debug, Parser)]
pub struct Args {
    /// Image directory written by `migfs checkpoint`.
    #[arg(long)]
    from: PathBuf,
    /// Fail when the process's old PID is taken here (default: use another).
    #[arg(long)]
    pid_required: bool,
    /// Print the PID and timings as one JSON object instead of the bare PID.
    #[arg(long)]
    json: bool,
    /// The migfs mount whose node claims the locks the checkpoint parked.
    #[arg(long, default_value = "/migfs")]
    mount: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let opts = RestoreOptions {
        require_pid: a.pid_required,
    };
    let r = match migfs_mig::image::park::read(&a.from)? {
        None => restore(&a.from, &opts)?,
        Some(park) => restore_claiming(&a, &opts, park)?,
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if a.json {
        println!(
            "{{\"pid\":{},\"same_pid\":{},\"bytes\":{},\"prepare_ms\":{:.3},\"memory_ms\":{:.3},\"total_ms\":{:.3}}}",
            r.pid,
            r.same_pid,
            r.bytes,
            ms(r.prepare),
            ms(r.memory),
            ms(r.total)
        );
    } else {
        println!("{}", r.pid);
    }
    Ok(ExitCode::SUCCESS)
}

/// The rebuilt process's PID and the parked locks it claimed.
type Claimed = (i32, Vec<HeldLock>);

/// A restore of an image whose checkpoint parked locks: the rebuilt
/// process claims them before it takes them again; a restore that fails
/// after that parks them again.
fn restore_claiming(
    a: &Args,
    opts: &RestoreOptions,
    park: LockPark,
) -> anyhow::Result<migfs_mig::restore::Restored> {
    let node = local_node(&a.mount).with_context(|| {
        format!(
            "the checkpoint parked {} lock(s) on migfs; claiming them needs a node",
            park.locks
        )
    })?;
    let locks = Arc::new(AgentLocks::new(&node, Duration::ZERO)?);
    let claimed: Arc<Mutex<Option<Claimed>>> = Arc::default();
    let (l, c) = (Arc::clone(&locks), Arc::clone(&claimed));
    let extras = Extras {
        claim_locks: Some(Box::new(move |pid| {
            let held = l.claim(&park, pid)?;
            *c.lock().unwrap_or_else(|e| e.into_inner()) = Some((pid, held));
            Ok(())
        })),
        ..Extras::default()
    };
    let res = restore_with(&a.from, opts, extras);
    if res.is_err() {
        let taken = claimed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((pid, held)) = taken.filter(|(_, h)| !h.is_empty())
            && let Err(e) = locks.unclaim(pid, held)
        {
            tracing::error!(error = %e, "the failed restore could not park its locks again");
        }
    }
    Ok(res?)
}
