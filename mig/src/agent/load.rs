//! The node's load, measured from its own processes and reported to the
//! metadata server about once a second (`ReportLoad`), for `migfs status`
//! and the balancer (policy code reads it; this module only measures).
//!
//! The figures come from the `/proc` the node daemon sees: on the local
//! testbed each node has its own PID namespace and its own `/proc` mount,
//! so that is exactly the node's processes, while `/proc/loadavg` is the
//! one kernel's and the same on every node. The daemon itself is left out
//! (moving tasks does not move it).
//!
//! - A thread's *demand* is the time it was runnable, on a CPU or waiting
//!   for one (`/proc/PID/task/TID/schedstat`: run + wait), per second of
//!   the sample. A busy thread's demand is about 1 however many others
//!   share the CPUs, so a task's demand tells a CPU-bound task from one
//!   that only gets a little CPU, and a node's demand is the average
//!   number of runnable threads over the sample: what the kernel's loadavg
//!   samples, measured exactly.
//! - `load1/5/15` damp the node's demand exponentially over 1, 5 and 15
//!   minutes, as the kernel does (starting from 0).
//! - Memory is `/proc/meminfo`'s, unless the node has a memory budget
//!   (`MIGFS_NODE_MEMORY_MIB`, for the testbed, where the nodes share one
//!   machine's memory): then available = budget - the resident memory of
//!   the node's processes.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use migfs_proto::meta::{NodeLoad, ReportLoadRequest, TaskListRequest, TaskLoad, TaskState};
use nix::unistd::Pid;

use super::Inner;
use crate::sys::procfs;

/// Time between two reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// Environment variable giving the node a memory budget, in MiB.
pub const MEMORY_BUDGET_ENV: &str = "MIGFS_NODE_MEMORY_MIB";

/// Time constants of the damped averages, as the kernel's loadavg.
const WINDOWS_S: [f64; 3] = [60.0, 300.0, 900.0];

/// One process as `/proc` shows it at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcStat {
    /// PID in the node's namespace.
    pub pid: i32,
    /// Start time in clock ticks since boot (tells a reused PID apart).
    pub start: u64,
    /// Sum over its threads of the time on a CPU, ns.
    pub run_ns: u64,
    /// Sum over its threads of the time waiting for a CPU, ns.
    pub wait_ns: u64,
    /// Resident memory, bytes.
    pub rss: u64,
}

/// Reads every process of this `/proc` but `skip` (the daemon). A process
/// that ends while it is read is left out.
pub fn snapshot(skip: i32) -> Vec<ProcStat> {
    let page = crate::sys::page_size();
    let Ok(pids) = procfs::numeric_dir("/proc") else {
        return Vec::new();
    };
    pids.into_iter()
        .filter(|&p| p != skip)
        .filter_map(|p| read_proc(p, page))
        .collect()
}

fn read_proc(pid: i32, page: u64) -> Option<ProcStat> {
    let fields = procfs::stat_fields(Pid::from_raw(pid)).ok()?;
    let start = procfs::stat_field(&fields, 22).ok()?;
    let rss = procfs::stat_field(&fields, 24).ok()?.saturating_mul(page);
    let (mut run_ns, mut wait_ns) = (0u64, 0u64);
    for tid in procfs::numeric_dir(&format!("/proc/{pid}/task")).ok()? {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")) else {
            continue;
        };
        let mut it = text
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        run_ns = run_ns.saturating_add(it.next().unwrap_or(0));
        wait_ns = wait_ns.saturating_add(it.next().unwrap_or(0));
    }
    Some(ProcStat {
        pid,
        start,
        run_ns,
        wait_ns,
        rss,
    })
}

/// The machine's (total, available) memory from `/proc/meminfo`, bytes.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    (kb("MemTotal"), kb("MemAvailable"))
}

/// Turns successive snapshots into load reports; keeps what the rates
/// and the damped averages need. Pure: the caller reads `/proc`.
#[derive(Debug)]
pub struct Sampler {
    prev: HashMap<i32, ProcStat>,
    prev_at: Option<Instant>,
    avg: [f64; 3],
    seq: u64,
    cpus: u32,
    budget: Option<u64>,
}

/// What one sample needs besides the snapshot.
#[derive(Debug)]
pub struct Context<'a> {
    /// When the snapshot was taken.
    pub at: Instant,
    /// The node's live tasks: (task id, PID here).
    pub tasks: &'a [(u64, u32)],
    /// The machine's memory (total, available), bytes.
    pub mem: (u64, u64),
}

impl Sampler {
    /// A sampler for a machine of `cpus` CPUs and a node memory `budget`.
    pub fn new(cpus: u32, budget: Option<u64>) -> Sampler {
        Sampler {
            prev: HashMap::new(),
            prev_at: None,
            avg: [0.0; 3],
            seq: 0,
            cpus: cpus.max(1),
            budget,
        }
    }

    /// Takes `snap`; returns the report for the time since the last
    /// snapshot (none for the first one).
    pub fn advance(&mut self, snap: Vec<ProcStat>, cx: &Context<'_>) -> Option<NodeLoad> {
        let prev_at = self.prev_at.replace(cx.at);
        let old = std::mem::take(&mut self.prev);
        self.prev = snap.iter().map(|p| (p.pid, p.clone())).collect();
        let span = cx.at.checked_duration_since(prev_at?)?;
        let dt = span.as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        // (demand, used) per process seen in both snapshots, in CPUs.
        let rates: HashMap<i32, (f64, f64)> = snap
            .iter()
            .filter_map(|p| {
                let o = old.get(&p.pid).filter(|o| o.start == p.start)?;
                let run = p.run_ns.saturating_sub(o.run_ns) as f64 / 1e9;
                let wait = p.wait_ns.saturating_sub(o.wait_ns) as f64 / 1e9;
                Some((p.pid, ((run + wait) / dt, run / dt)))
            })
            .collect();
        let runnable: f64 = rates.values().map(|r| r.0).sum();
        let used: f64 = rates.values().map(|r| r.1).sum();
        for (avg, window) in self.avg.iter_mut().zip(WINDOWS_S) {
            let e = (-dt / window).exp();
            *avg = *avg * e + runnable * (1.0 - e);
        }
        self.seq += 1;
        let rss: HashMap<i32, u64> = snap.iter().map(|p| (p.pid, p.rss)).collect();
        let task_loads = cx
            .tasks
            .iter()
            .filter_map(|&(task_id, pid)| {
                let pid = i32::try_from(pid).ok()?;
                let (cpu, cpu_used) = *rates.get(&pid)?;
                Some(TaskLoad {
                    task_id,
                    cpu,
                    cpu_used,
                    rss_bytes: rss.get(&pid).copied().unwrap_or(0),
                })
            })
            .collect();
        let (mem_total_bytes, mem_available_bytes) = match self.budget {
            Some(b) => (b, b.saturating_sub(rss.values().sum())),
            None => cx.mem,
        };
        Some(NodeLoad {
            load1: self.avg[0],
            load5: self.avg[1],
            load15: self.avg[2],
            runnable,
            cpu_busy: (used / f64::from(self.cpus)).min(1.0),
            cpus: self.cpus,
            mem_total_bytes,
            mem_available_bytes,
            tasks: u32::try_from(cx.tasks.len()).unwrap_or(u32::MAX),
            processes: u32::try_from(snap.len()).unwrap_or(u32::MAX),
            task_loads,
            seq: self.seq,
            sample_ms: u32::try_from(span.as_millis()).unwrap_or(u32::MAX),
            age_ms: 0,
        })
    }
}

/// The node memory budget from [`MEMORY_BUDGET_ENV`], if set.
fn budget() -> Option<u64> {
    let v = std::env::var(MEMORY_BUDGET_ENV).ok()?;
    match v.trim().parse::<u64>() {
        Ok(mib) => Some(mib << 20),
        Err(_) => {
            tracing::warn!(value = %v, "{MEMORY_BUDGET_ENV} is not a number of MiB; ignored");
            None
        }
    }
}

/// Starts reporting this node's load every [`REPORT_EVERY`], until the
/// agent or the runtime goes away.
pub(crate) fn start(inner: &Arc<Inner>) {
    let weak = Arc::downgrade(inner);
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    tokio::spawn(report_loop(weak, Sampler::new(cpus, budget())));
}

async fn report_loop(weak: Weak<Inner>, mut sampler: Sampler) {
    let own = i32::try_from(std::process::id()).unwrap_or(0);
    let mut tick = tokio::time::interval(REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let tasks = local_tasks(&inner).await;
        // Warm memory is there for the next move in: available.
        let warm = inner.warm_ready();
        let sampled = tokio::task::spawn_blocking(move || {
            let snap = snapshot(own);
            let (total, avail) = meminfo();
            let cx = Context {
                at: Instant::now(),
                tasks: &tasks,
                mem: (total, avail.saturating_add(warm).min(total)),
            };
            let load = sampler.advance(snap, &cx);
            (sampler, load)
        })
        .await;
        let Ok((s, load)) = sampled else { return };
        sampler = s;
        let session = (inner.cfg.session)();
        let (Some(load), true) = (load, session != 0) else {
            continue;
        };
        let req = ReportLoadRequest {
            session_id: session,
            load: Some(load),
        };
        let sent =
            tokio::time::timeout(REPORT_EVERY * 5, inner.meta.clone().report_load(req)).await;
        match sent {
            Ok(Ok(_)) => failing = false,
            Ok(Err(st)) if !failing => {
                failing = true;
                tracing::warn!(error = %st.message(), "could not report the node's load");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::warn!("reporting the node's load timed out");
            }
            _ => {}
        }
    }
}

/// The tasks that run here: (task id, PID). Empty when the metadata
/// server does not answer (the report then carries no per-task figures).
async fn local_tasks(inner: &Inner) -> Vec<(u64, u32)> {
    let req = TaskListRequest {
        include_exited: false,
    };
    let Ok(Ok(r)) = tokio::time::timeout(REPORT_EVERY, inner.meta.clone().task_list(req)).await
    else {
        return Vec::new();
    };
    r.into_inner()
        .tasks
        .into_iter()
        .filter(|t| t.node_id == inner.cfg.node_id && t.state() != TaskState::TaskExited)
        .map(|t| (t.task_id, t.pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: i32, start: u64, run_s: f64, wait_s: f64, rss: u64) -> ProcStat {
        ProcStat {
            pid,
            start,
            run_ns: ns(run_s),
            wait_ns: ns(wait_s),
            rss,
        }
    }

    fn ns(secs: f64) -> u64 {
        u64::try_from(Duration::from_secs_f64(secs).as_nanos()).unwrap()
    }

    fn cx<'a>(t0: Instant, secs: f64, tasks: &'a [(u64, u32)]) -> Context<'a> {
        Context {
            at: t0 + Duration::from_secs_f64(secs),
            tasks,
            mem: (8 << 30, 6 << 30),
        }
    }

    #[test]
    fn demand_counts_waiting_for_a_cpu_and_used_does_not() {
        let t0 = Instant::now();
        let tasks = [(7, 10), (8, 11)];
        let mut s = Sampler::new(2, None);
        let first = vec![p(10, 1, 0.0, 0.0, 4096), p(11, 1, 0.0, 0.0, 8192)];
        assert!(s.advance(first, &cx(t0, 0.0, &tasks)).is_none());
        // Over 2 s: pid 10 ran 1 s and waited 1 s (busy, sharing a CPU);
        // pid 11 ran 0.2 s.
        let second = vec![p(10, 1, 1.0, 1.0, 4096), p(11, 1, 0.2, 0.0, 8192)];
        let l = s.advance(second, &cx(t0, 2.0, &tasks)).unwrap();
        assert!((l.runnable - 1.1).abs() < 1e-9, "{l:?}");
        assert!((l.cpu_busy - 0.3).abs() < 1e-9, "1.2 s of 2 CPUs x 2 s");
        assert_eq!((l.tasks, l.processes, l.seq, l.sample_ms), (2, 2, 1, 2000));
        let t7 = l.task_loads.iter().find(|t| t.task_id == 7).unwrap();
        assert!((t7.cpu - 1.0).abs() < 1e-9 && (t7.cpu_used - 0.5).abs() < 1e-9);
        assert_eq!(t7.rss_bytes, 4096);
        assert_eq!(
            (l.mem_total_bytes, l.mem_available_bytes),
            (8 << 30, 6 << 30)
        );
    }

    #[test]
    fn a_reused_pid_or_a_new_process_has_no_rate_yet() {
        let t0 = Instant::now();
        let tasks = [(7, 10)];
        let mut s = Sampler::new(1, None);
        s.advance(vec![p(10, 1, 5.0, 0.0, 0)], &cx(t0, 0.0, &tasks));
        // pid 10 is another process now (other start time), 12 is new.
        let l = s
            .advance(
                vec![p(10, 99, 1.0, 0.0, 0), p(12, 5, 3.0, 0.0, 0)],
                &cx(t0, 1.0, &tasks),
            )
            .unwrap();
        assert_eq!(l.runnable, 0.0);
        assert!(l.task_loads.is_empty(), "{l:?}");
        let l = s
            .advance(
                vec![p(10, 99, 2.0, 0.0, 0), p(12, 5, 3.5, 0.0, 0)],
                &cx(t0, 2.0, &tasks),
            )
            .unwrap();
        assert!((l.runnable - 1.5).abs() < 1e-9);
        assert_eq!(l.task_loads.len(), 1);
    }

    #[test]
    fn damped_averages_approach_the_demand_like_the_kernels() {
        let t0 = Instant::now();
        let mut s = Sampler::new(4, None);
        let mut last = None;
        // Two busy processes for 5 minutes, sampled every second.
        for i in 0..=300u32 {
            let secs = f64::from(i);
            let snap = vec![p(1, 1, secs, 0.0, 0), p(2, 1, secs, 0.0, 0)];
            last = s.advance(snap, &cx(t0, secs, &[])).or(last);
        }
        let l = last.unwrap();
        // 1 - e^-5 of the way after 5 time constants, 1 - e^-1 after one.
        assert!(
            (l.load1 - 2.0 * (1.0 - (-5.0f64).exp())).abs() < 0.01,
            "{l:?}"
        );
        assert!(
            (l.load5 - 2.0 * (1.0 - (-1.0f64).exp())).abs() < 0.01,
            "{l:?}"
        );
        assert!(l.load15 < l.load5 && l.load5 < l.load1);
    }

    #[test]
    fn a_memory_budget_is_reduced_by_what_the_processes_hold() {
        let t0 = Instant::now();
        let mut s = Sampler::new(1, Some(100 << 20));
        let snap = || vec![p(1, 1, 0.0, 0.0, 30 << 20), p(2, 1, 0.0, 0.0, 10 << 20)];
        s.advance(snap(), &cx(t0, 0.0, &[]));
        let l = s.advance(snap(), &cx(t0, 1.0, &[])).unwrap();
        assert_eq!(
            (l.mem_total_bytes, l.mem_available_bytes),
            (100 << 20, 60 << 20)
        );
    }

    /// The real /proc: a thread of this test that spins shows up with a
    /// demand near one CPU.
    #[test]
    fn a_spinning_thread_shows_in_the_real_proc() {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let spinner = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        let me = i32::try_from(std::process::id()).unwrap();
        let tasks = [(1, u32::try_from(me).unwrap())];
        let mut s = Sampler::new(1, None);
        let t0 = Instant::now();
        s.advance(snapshot(0), &cx(t0, 0.0, &tasks));
        std::thread::sleep(Duration::from_millis(500));
        let l = s
            .advance(snapshot(0), &cx(t0, t0.elapsed().as_secs_f64(), &tasks))
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().unwrap();
        let mine = l.task_loads.first().expect("this process is a task");
        assert!(mine.cpu > 0.7, "demand of a spinning thread: {mine:?}");
        assert!(mine.rss_bytes > 0);
        assert!(l.runnable >= mine.cpu - 1e-9);
        assert!(!snapshot(me).iter().any(|p| p.pid == me), "skipped");
    }
}
