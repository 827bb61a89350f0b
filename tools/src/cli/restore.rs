//! `migfs restore --from DIR [--lazy]`: rebuild a checkpointed process
//! here and print its PID (docs/checkpoint-restore.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use migfs_mig::restore::lazy::restore_lazy;
use migfs_mig::restore::{RestoreOptions, restore};

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
    if a.lazy {
        return lazy(&a, &opts);
    }
    let r = restore(&a.from, &opts)?;
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

/// `--lazy`: the PID as soon as the process runs, then the fill.
fn lazy(a: &Args, opts: &RestoreOptions) -> anyhow::Result<ExitCode> {
    let r = restore_lazy(&a.from, opts)?;
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
