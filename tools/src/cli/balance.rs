//! `migfs balance`: watches the cluster and moves tasks to spread load.
//! Every round it reads the cluster (nodes with their load, tasks) from
//! the local agent, asks the policy (`mig::policy`) for decisions, and
//! carries each one out the way `migfs move` does: the local agent's
//! `Move` call. A decision that fails (the task exited, the target went
//! down, the task cannot be moved) is printed and reported to the policy,
//! which retries it later or drops it; the balancer goes on.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use migfs_mig::agent::client::{connect, local_node};
use migfs_mig::policy::{self, ClusterState, Decision, Outcome, Policy, Settings};
use migfs_proto::agent::{self as pb, Mode, move_event};
use tokio_stream::StreamExt;

use super::task::{Local, runtime};

#[derive(Debug, Parser)]
pub struct Args {
    /// The policy: `cpu` (spread CPU-bound tasks) or `memory` (relieve
    /// nodes short of memory).
    #[arg(long, default_value = "cpu")]
    policy: String,
    /// Print each decision with its reason; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// One round, then exit.
    #[arg(long)]
    once: bool,
    /// One JSON object per decision and line.
    #[arg(long)]
    json: bool,
    /// Stop-and-copy moves instead of lazy (copy-on-reference) ones.
    #[arg(long)]
    eager: bool,
    /// Seconds a move may take before it counts as failed.
    #[arg(long, default_value_t = 300.0)]
    move_timeout: f64,
    #[command(flatten)]
    knobs: Knobs,
    #[command(flatten)]
    local: Local,
}

/// Policy settings; each one left out keeps the policy's default
/// (printed at start, see docs/balancer.md).
#[derive(Debug, clap::Args)]
struct Knobs {
    /// Most moves decided in one round.
    #[arg(long)]
    max_moves: Option<usize>,
    /// Seconds a moved task rests before it may move again.
    #[arg(long)]
    cooldown: Option<f64>,
    /// Seconds before a failed move is tried again.
    #[arg(long)]
    retry_after: Option<f64>,
    /// Failed moves in a row after which a task is left alone for a while.
    #[arg(long)]
    max_failures: Option<u32>,
    /// Seconds after which a node's load report is too old to act on.
    #[arg(long)]
    stale: Option<f64>,
    /// cpu: runnable threads above the cluster mean that make a node a source.
    #[arg(long)]
    threshold: Option<f64>,
    /// cpu: least narrowing of the source-target gap a move must bring.
    #[arg(long)]
    min_gain: Option<f64>,
    /// cpu: least demand (CPUs) of a task that counts as CPU-bound.
    #[arg(long)]
    cpu_bound: Option<f64>,
    /// memory: fraction of a node's memory below which it gives tasks away.
    #[arg(long)]
    min_available: Option<f64>,
    /// memory: fraction above `min_available` a source aims for and a
    /// target must keep.
    #[arg(long)]
    headroom: Option<f64>,
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{what} must be a non-negative number of seconds"))
}

impl Knobs {
    fn settings(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::default();
        let c = &mut s.common;
        set(&mut c.max_moves, self.max_moves);
        if let Some(v) = self.cooldown {
            c.hysteresis.cooldown = secs(v, "cooldown")?;
        }
        if let Some(v) = self.retry_after {
            c.hysteresis.retry_after = secs(v, "retry-after")?;
        }
        set(&mut c.hysteresis.max_failures, self.max_failures);
        if let Some(v) = self.stale {
            c.stale = secs(v, "stale")?;
        }
        set(&mut s.cpu.threshold, self.threshold);
        set(&mut s.cpu.min_gain, self.min_gain);
        set(&mut s.cpu.cpu_bound, self.cpu_bound);
        set(&mut s.memory.min_available, self.min_available);
        set(&mut s.memory.headroom, self.headroom);
        let numbers = [
            ("threshold", s.cpu.threshold, f64::MAX),
            ("min-gain", s.cpu.min_gain, f64::MAX),
            ("cpu-bound", s.cpu.cpu_bound, f64::MAX),
            ("min-available", s.memory.min_available, 1.0),
            ("headroom", s.memory.headroom, 1.0),
        ];
        for (name, v, max) in numbers {
            let what = if max == 1.0 {
                "a fraction from 0 to 1"
            } else {
                "a non-negative number"
            };
            anyhow::ensure!((0.0..=max).contains(&v), "--{name} {v}: must be {what}");
        }
        Ok(s)
    }
}

/// The settings that matter for `policy`, in words.
fn describe(policy: &str, s: &Settings) -> String {
    let c = &s.common;
    let own = match policy {
        "cpu" => format!(
            "threshold {:.2}, min-gain {:.2}, cpu-bound {:.2}",
            s.cpu.threshold, s.cpu.min_gain, s.cpu.cpu_bound
        ),
        "memory" => format!(
            "min-available {:.0}%, headroom {:.0}%",
            s.memory.min_available * 100.0,
            s.memory.headroom * 100.0
        ),
        _ => String::new(),
    };
    format!(
        "policy {policy} ({own}; max-moves {}, cooldown {} s, retry-after {} s, \
         max-failures {}, stale {} s)",
        c.max_moves,
        c.hysteresis.cooldown.as_secs_f64(),
        c.hysteresis.retry_after.as_secs_f64(),
        c.hysteresis.max_failures,
        c.stale.as_secs_f64()
    )
}

fn set<T>(field: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *field = v;
    }
}

/// `migfs balance`.
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    crate::observability::init("warn");
    let settings = a.knobs.settings()?;
    let Some(policy) = policy::by_name(&a.policy, &settings) else {
        anyhow::bail!(
            "no policy {:?} (there are: {})",
            a.policy,
            policy::NAMES.join(", ")
        );
    };
    let interval = secs(a.interval, "interval")?;
    let mut b = Balancer {
        policy,
        local: a.local,
        dry_run: a.dry_run,
        json: a.json,
        mode: if a.eager { Mode::Eager } else { Mode::Lazy },
        move_timeout: secs(a.move_timeout, "move-timeout")?,
        t0: Instant::now(),
    };
    if !a.json {
        eprintln!(
            "migfs balance: {}, every {} s{}",
            describe(&a.policy, &settings),
            interval.as_secs_f64(),
            if a.dry_run {
                " (dry run: nothing moves)"
            } else {
                ""
            }
        );
    }
    runtime()?.block_on(async {
        if a.once {
            let n = b.round().await?;
            if n == 0 && !a.json {
                println!("no move needed");
            }
            return anyhow::Ok(());
        }
        tokio::select! {
            () = b.forever(interval) => {}
            () = crate::cli::shutdown_signal() => {}
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

struct Balancer {
    policy: Box<dyn Policy>,
    local: Local,
    dry_run: bool,
    json: bool,
    mode: Mode,
    move_timeout: Duration,
    t0: Instant,
}

impl Balancer {
    /// Rounds every `interval` until stopped; a round that fails is
    /// reported and the next one comes.
    async fn forever(&mut self, interval: Duration) {
        loop {
            if let Err(e) = self.round().await {
                eprintln!("migfs balance: {e:#}");
                tracing::warn!(error = %format!("{e:#}"), "balancing round failed");
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// One round: read the cluster, decide, carry the decisions out.
    /// Returns how many decisions there were.
    async fn round(&mut self) -> anyhow::Result<usize> {
        let reply = super::status::fetch(&self.local)
            .await
            .context("cannot read the cluster's state")?;
        let state = ClusterState::from_wire(&reply.nodes, &reply.tasks);
        let decisions = self.policy.decide(&state, self.t0.elapsed());
        for d in &decisions {
            let outcome = if self.dry_run {
                Outcome::NotTried
            } else {
                self.carry_out(d).await
            };
            self.print(d, &outcome);
            self.policy.outcome(d, &outcome, self.t0.elapsed());
        }
        Ok(decisions.len())
    }

    /// Moves the task as `migfs move` would.
    async fn carry_out(&self, d: &Decision) -> Outcome {
        if !self.json {
            println!(
                "move {} {} -> {}: {}",
                d.task, d.from_name, d.to_name, d.reason
            );
        }
        match tokio::time::timeout(self.move_timeout, self.move_task(d)).await {
            Ok(Ok(r)) => {
                tracing::info!(task = r.task, to = %r.to, pid = r.pid, downtime_ms = r.downtime_ms, "moved");
                Outcome::Moved
            }
            Ok(Err(e)) => {
                tracing::warn!(task = d.task.0, to = %d.to_name, error = %e, "move failed");
                Outcome::Failed(e)
            }
            Err(_) => Outcome::Failed(format!(
                "no report within {} s",
                self.move_timeout.as_secs_f64()
            )),
        }
    }

    async fn move_task(&self, d: &Decision) -> Result<pb::MoveReport, String> {
        let node = local_node(&self.local.mount).map_err(|e| e.to_string())?;
        let mut c = connect(&node.socket).await.map_err(|e| e.to_string())?;
        let req = pb::MoveRequest {
            task_id: d.task.0,
            pid: 0,
            target: d.to_name.clone(),
            mode: self.mode as i32,
            precopy: false,
            caller_uid: 0,
        };
        let mut s = c
            .r#move(req)
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        let mut report = None;
        while let Some(ev) = s.next().await {
            if let Some(move_event::Event::Report(r)) =
                ev.map_err(|s| s.message().to_owned())?.event
            {
                report = Some(r);
            }
        }
        report.ok_or_else(|| "the agent ended the move without a report".to_owned())
    }

    fn print(&self, d: &Decision, outcome: &Outcome) {
        if self.json {
            let (result, error) = match outcome {
                Outcome::Moved => ("moved", None),
                Outcome::Failed(e) => ("failed", Some(e.as_str())),
                Outcome::NotTried => ("dry-run", None),
            };
            let v = serde_json::json!({
                "policy": self.policy.name(), "task": d.task.0,
                "from": d.from_name, "to": d.to_name, "reason": d.reason,
                "result": result, "error": error,
            });
            println!("{v}");
            return;
        }
        match outcome {
            Outcome::NotTried => println!(
                "would move {} {} -> {}: {}",
                d.task, d.from_name, d.to_name, d.reason
            ),
            Outcome::Moved => println!("  moved {} to {}", d.task, d.to_name),
            Outcome::Failed(e) => {
                println!(
                    "  move of {} failed: {e} (tried again later, or dropped)",
                    d.task
                );
                eprintln!(
                    "migfs balance: move {} {} -> {} failed: {e}",
                    d.task, d.from_name, d.to_name
                );
            }
        }
    }
}
