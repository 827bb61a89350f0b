//! `migfs restore --from DIR [--lazy]`: rebuild a checkpointed process
//! here and print its PID (docs/checkpoint-restore.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{AgentLocks, local_node};
use migfs_mig::image::park::LockPark;
use migfs_mig::restore::lazy::restore_lazy;
use migfs_mig::restore::{Extras, RestoreOptions, restore_with};
use migfs_proto::meta::HeldLock;

/// Threads installing pages besides the fault handler.
const FILL_THREADS: usize = 2;

#[derive(Debug, Parser)]
pub struct Args {
    /// Image directory written by `migfs checkpoint`.
    #[arg(long)]
    from: PathBuf,
    /// Fail when the process's old PID is taken here (default: use another).
    #[arg(long)]
    pid_required: bool,
    /// Print the PID and timings as one JSON object instead of the bare PID
    /// (with --lazy: once every page is in).
    #[arg(long)]
    json: bool,
    /// The migfs mount whose node claims the locks the checkpoint parked.
    #[arg(long, default_value = "/migfs")]
    mount: PathBuf,
    /// Let the process run before its private anonymous memory (heap,
    /// stack, anonymous mappings) is in: pages it touches are read from
    /// pages.img on demand (userfaultfd), the rest in the background. The
    /// PID is printed as soon as it runs; the command exits once every
    /// page is in. Each segment is checked against its blake3 before its
    /// bytes reach the process, but a bad segment found after it resumed
    /// kills it (exit 1, naming the segment): a plain restore finds every
    /// bad segment before the process runs. Do not kill this command
    /// before it ends: memory not yet in would then read as zeros.
    #[arg(long)]
    lazy: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let opts = RestoreOptions {
        require_pid: a.pid_required,
    };
    let claims = match migfs_mig::image::park::read(&a.from)? {
        Some(park) => Some(Claims::new(&a, park)?),
        None => None,
    };
    if a.lazy {
        return lazy(&a, &opts, claims);
    }
    let extras = claims.as_ref().map(Claims::extras).unwrap_or_default();
    let r = restore_with(&a.from, &opts, extras);
    if r.is_err()
        && let Some(c) = &claims
    {
        c.give_back();
    }
    let r = r?;
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

/// The locks the checkpoint of the image parked: the rebuilt process
/// claims them before it takes them again ([`Claims::extras`]); a restore
/// that fails after that parks them again ([`Claims::give_back`]).
struct Claims {
    park: LockPark,
    locks: Arc<AgentLocks>,
    claimed: Arc<Mutex<Option<Claimed>>>,
}

impl Claims {
    fn new(a: &Args, park: LockPark) -> anyhow::Result<Claims> {
        let node = local_node(&a.mount).with_context(|| {
            format!(
                "the checkpoint parked {} lock(s) on migfs; claiming them needs a node",
                park.locks
            )
        })?;
        Ok(Claims {
            park,
            locks: Arc::new(AgentLocks::new(&node, Duration::ZERO)?),
            claimed: Arc::default(),
        })
    }

    fn extras(&self) -> Extras {
        let (l, c, park) = (
            Arc::clone(&self.locks),
            Arc::clone(&self.claimed),
            self.park,
        );
        Extras {
            claim_locks: Some(Box::new(move |pid| {
                let held = l.claim(&park, pid)?;
                *c.lock().unwrap_or_else(|e| e.into_inner()) = Some((pid, held));
                Ok(())
            })),
            ..Extras::default()
        }
    }

    fn give_back(&self) {
        let taken = self
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((pid, held)) = taken.filter(|(_, h)| !h.is_empty())
            && let Err(e) = self.locks.unclaim(pid, held)
        {
            tracing::error!(error = %e, "the failed restore could not park its locks again");
        }
    }
}

/// `--lazy`: the PID as soon as the process runs, then the fill.
fn lazy(a: &Args, opts: &RestoreOptions, claims: Option<Claims>) -> anyhow::Result<ExitCode> {
    let extras = claims.as_ref().map(Claims::extras).unwrap_or_default();
    let r = match restore_lazy(&a.from, opts, extras) {
        Ok(r) => r,
        Err(e) => {
            if let Some(c) = &claims {
                c.give_back();
            }
            return Err(e.into());
        }
    };
    let pid = r.pid();
    let running = r.restored.total;
    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(out, "{pid}")?;
    }
    out.flush()?;
    let done = r.fill(FILL_THREADS).with_context(|| {
        format!("lazy restore of pid {pid}: its memory could not be completed after it resumed")
    })?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if a.json {
        writeln!(
            out,
            "{{\"pid\":{pid},\"same_pid\":{},\"bytes\":{},\"running_ms\":{:.3},\"fill_ms\":{:.3},\"lazy_bytes\":{},\"faults\":{},\"fault_pages\":{},\"gone\":{}}}",
            done.restored.same_pid,
            done.restored.bytes,
            ms(running),
            ms(done.fill.elapsed),
            done.fill.bytes,
            done.faults.demand_faults,
            done.faults.demand_pages,
            done.fill.gone
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
