//! `migfs restore --from DIR`: rebuild a checkpointed process here and
//! print its PID (docs/checkpoint-restore.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use migfs_mig::restore::{RestoreOptions, restore};

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
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let r = restore(
        &a.from,
        &RestoreOptions {
            require_pid: a.pid_required,
        },
    )?;
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
