//! `migfs balance` on the local testbed: CPU-bound tasks (tests/progs/spin.c,
//! built with gcc here) started on n1 of a 2-node cluster are spread by
//! the `cpu` policy and stay put; `--dry-run` says what it would do and
//! moves nothing; pinned tasks are never moved; a move that fails is
//! reported and the balancer goes on; the `memory` policy relieves a node
//! over its memory budget. Every task must finish with the right result.
//!
//! Needs root, /dev/fuse, ptrace, userfaultfd and gcc: otherwise SKIP, or
//! fail when MIGFS_REQUIRE_PRIV=1. The cluster (and every process in it,
//! the balancer included) is torn down by its guard, also when a test
//! panics; a running balancer is also stopped by its own guard.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use migfs_e2e::harness::{Cluster, migfs_bin, require_priv};
use migfs_e2e::progs::{have_gcc, prog};
use serde_json::Value;

/// LCG steps per unit of spin.c's work (about 0.1 s of one CPU).
const ITERS: u64 = 100_000_000;
const LCG_A: u64 = 6364136223846793005;
const LCG_C: u64 = 1442695040888963407;

fn cluster_with(env: &[(&str, &str)]) -> Option<Cluster> {
    if !require_priv() || !have_gcc() {
        return None;
    }
    Some(Cluster::up_with_env(2, env))
}

fn m() -> String {
    migfs_bin().to_str().unwrap().to_owned()
}

/// Waits up to `ms` for `cond`, asking every half second (each question
/// runs commands in the cluster).
fn within(ms: u64, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    cond()
}

/// A spin.c task started with `migfs run --detach` on n1.
struct Spinner {
    task: u64,
    seed: u64,
    out: String,
}

/// Starts spin.c on n1 as a task (`extra`: spin's optional arguments;
/// `pin`: `migfs run --pin`).
fn spin(c: &Cluster, seed: u64, extra: &[&str], pin: bool) -> Spinner {
    let bin = prog("spin", false);
    let out = format!("/migfs/spin-{seed}.out");
    let (m, iters, seed_s) = (m(), ITERS.to_string(), seed.to_string());
    let mut argv = vec![m.as_str(), "run", "--detach"];
    if pin {
        argv.push("--pin");
    }
    argv.extend([
        "--",
        bin.to_str().unwrap(),
        "/migfs/stop",
        &out,
        &iters,
        &seed_s,
    ]);
    argv.extend_from_slice(extra);
    let printed = c.exec_ok("n1", &argv);
    let task = printed
        .trim()
        .strip_prefix('t')
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("migfs run --detach printed {printed:?}"));
    Spinner { task, seed, out }
}

/// `migfs status --json` (asked on n1).
fn status(c: &Cluster) -> Value {
    let out = c.exec_ok("n1", &[&m(), "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json ({e}): {out}"))
}

fn task_row(st: &Value, task: u64) -> Value {
    st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"].as_u64() == Some(task))
        .cloned()
        .unwrap_or_else(|| panic!("task {task} not in {st}"))
}

/// Waits until every task's load report shows it CPU-bound.
fn wait_measured(c: &Cluster, tasks: &[&Spinner]) {
    let ok = within(30_000, || {
        let st = status(c);
        tasks.iter().all(|s| {
            let cpu = task_row(&st, s.task)["cpu"].as_f64().unwrap_or(0.0);
            cpu >= 0.6
        })
    });
    assert!(ok, "tasks never measured CPU-bound: {}", status(c));
}

/// (node, moves) of each task, in order; the node is "moving" while a
/// move of the task is under way.
fn placement(c: &Cluster, tasks: &[&Spinner]) -> Vec<(String, u64)> {
    let st = status(c);
    tasks
        .iter()
        .map(|s| {
            let row = task_row(&st, s.task);
            let node = match row["state"].as_str() {
                Some("running") => row["node"].as_str().unwrap().to_owned(),
                Some("moving") => "moving".to_owned(),
                other => panic!("t{} is {other:?}: {row}", s.task),
            };
            (node, row["moves"].as_u64().unwrap())
        })
        .collect()
}

fn on(p: &[(String, u64)], node: &str) -> usize {
    p.iter().filter(|(n, _)| n == node).count()
}

/// `n` steps of the LCG as one affine map (a, c).
fn lcg_jump(mut n: u64) -> (u64, u64) {
    let (mut a, mut c) = (1u64, 0u64);
    let (mut ba, mut bc) = (LCG_A, LCG_C);
    while n > 0 {
        if n & 1 == 1 {
            a = a.wrapping_mul(ba);
            c = c.wrapping_mul(ba).wrapping_add(bc);
        }
        bc = bc.wrapping_mul(ba).wrapping_add(bc);
        ba = ba.wrapping_mul(ba);
        n >>= 1;
    }
    (a, c)
}

/// Stops every spinner, waits for each task to exit 0 and checks the
/// result it wrote.
fn stop_and_check(c: &Cluster, tasks: &[&Spinner]) {
    std::fs::write(c.path("n1", "stop"), b"").unwrap();
    let ids: Vec<u64> = tasks.iter().map(|s| s.task).collect();
    let ended = within(60_000, || {
        let out = c.exec_ok("n1", &[&m(), "ps", "--json", "--all"]);
        let rows: Value = serde_json::from_str(&out).unwrap();
        ids.iter().all(|id| {
            rows.as_array()
                .unwrap()
                .iter()
                .any(|r| r["task"].as_u64() == Some(*id) && r["state"] == "exited")
        })
    });
    assert!(ended, "tasks did not end after the stop file");
    let rows: Value =
        serde_json::from_str(&c.exec_ok("n1", &[&m(), "ps", "--json", "--all"])).unwrap();
    let (ja, jc) = lcg_jump(ITERS);
    for s in tasks {
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["task"].as_u64() == Some(s.task))
            .unwrap();
        assert_eq!(row["exit_code"].as_i64(), Some(0), "{row}");
        let text = std::fs::read_to_string(c.path("n1", s.out.trim_start_matches("/migfs/")))
            .unwrap_or_else(|e| panic!("{}: {e}", s.out));
        let f: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(f.len(), 8, "{}: {text:?}", s.out);
        let units: u64 = f[1].parse().unwrap();
        let (mut x, mut sum) = (s.seed, 0u64);
        for _ in 0..units {
            x = x.wrapping_mul(ja).wrapping_add(jc);
            sum = sum.wrapping_add(x);
        }
        assert!(units > 0, "{text}");
        assert_eq!(f[3], x.to_string(), "t{} value after {units} units", s.task);
        assert_eq!(f[5], sum.to_string(), "t{} sum after {units} units", s.task);
        assert_eq!(f[7], "ok", "t{}: its memory changed", s.task);
    }
}

/// A `migfs balance` running on n1, its output in a log; stopped on drop.
struct Balancer<'a> {
    c: &'a Cluster,
    pid: i32,
    log: PathBuf,
}

impl<'a> Balancer<'a> {
    fn start(c: &'a Cluster, args: &[&str]) -> Balancer<'a> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = c
            .dir()
            .join(format!("balance-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let cmd = format!(
            "exec {} balance --json {} >{} 2>&1",
            m(),
            args.join(" "),
            log.display()
        );
        let pid = c.spawn_detached("n1", &["sh", "-c", &cmd]);
        Balancer { c, pid, log }
    }

    fn alive(&self) -> bool {
        let probe = format!("grep -q balance /proc/{}/cmdline && echo alive", self.pid);
        self.c
            .exec("n1", &["sh", "-c", &probe])
            .stdout
            .starts_with(b"alive")
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The decisions it printed (one JSON object per line).
    fn decisions(&self) -> Vec<Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }
}

impl Drop for Balancer<'_> {
    fn drop(&mut self) {
        let _ = self.c.exec("n1", &["kill", &self.pid.to_string()]);
    }
}

/// The acceptance test: four CPU-bound tasks on n1 end two and
/// two, stay so for a minute under the balancer, and finish correctly.
#[test]
fn four_cpu_bound_tasks_end_two_and_two_and_stay() {
    let Some(c) = cluster_with(&[]) else { return };
    let spinners: Vec<Spinner> = (1..=4).map(|i| spin(&c, i, &[], false)).collect();
    let all: Vec<&Spinner> = spinners.iter().collect();
    wait_measured(&c, &all);
    let b = Balancer::start(&c, &["--policy", "cpu", "--interval", "1"]);
    let split = within(60_000, || {
        let p = placement(&c, &all);
        on(&p, "n1") == 2 && on(&p, "n2") == 2
    });
    assert!(split, "not split: {:?}\n{}", placement(&c, &all), b.text());
    let settled = placement(&c, &all);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(65) {
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(
            placement(&c, &all),
            settled,
            "a task moved after the split\n{}",
            b.text()
        );
        assert!(b.alive(), "the balancer stopped:\n{}", b.text());
    }
    let d = b.decisions();
    assert_eq!(d.len(), 2, "exactly two moves:\n{}", b.text());
    for x in &d {
        assert_eq!(
            (&x["result"], &x["from"], &x["to"]),
            (&"moved".into(), &"n1".into(), &"n2".into()),
            "{x}"
        );
        let reason = x["reason"].as_str().unwrap();
        assert!(
            reason.contains("above the cluster mean") && reason.contains("CPU-bound"),
            "{reason}"
        );
    }
    drop(b);
    stop_and_check(&c, &all);
}

/// `--dry-run` prints what it would move and why, every round, and moves
/// nothing.
#[test]
fn a_dry_run_prints_decisions_with_reasons_and_moves_nothing() {
    let Some(c) = cluster_with(&[]) else { return };
    let spinners: Vec<Spinner> = (1..=2).map(|i| spin(&c, i, &[], false)).collect();
    let all: Vec<&Spinner> = spinners.iter().collect();
    wait_measured(&c, &all);
    // Rounds for 4 s, then SIGINT (timeout says 124: it had to stop it).
    let argv = ["timeout", "-s", "INT", "4", &m(), "balance", "--dry-run"];
    let o = c.exec("n1", &[&argv[..], &["--interval", "1"]].concat());
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(124), "{text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("would move"))
        .collect();
    assert!(lines.len() >= 2, "a decision every round: {text}");
    let ids: Vec<String> = spinners.iter().map(|s| format!("t{}", s.task)).collect();
    for l in &lines {
        assert!(
            ids.iter()
                .any(|id| l.starts_with(&format!("would move {id} n1 -> n2: n1 has "))),
            "{l}"
        );
        assert!(
            l.contains("above the cluster mean") && l.contains("CPU-bound"),
            "{l}"
        );
    }
    let json = c.exec_ok("n1", &[&m(), "balance", "--dry-run", "--once", "--json"]);
    let d: Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(d["result"], "dry-run", "{json}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        placement(&c, &all),
        vec![("n1".to_owned(), 0), ("n1".to_owned(), 0)],
        "a dry run moved something"
    );
    stop_and_check(&c, &all);
}

/// Pinned tasks (`migfs run --pin`, `migfs pin`) are never moved; unpinned
/// (`migfs pin --unpin`) they may be. Only root or the owner may pin.
#[test]
fn pinned_tasks_are_never_moved() {
    let Some(c) = cluster_with(&[]) else { return };
    let a = spin(&c, 1, &[], true);
    let b = spin(&c, 2, &[], false);
    let x = spin(&c, 3, &[], false);
    let y = spin(&c, 4, &[], false);
    for s in [&x, &y] {
        let out = c.exec_ok("n1", &[&m(), "pin", &format!("t{}", s.task)]);
        assert_eq!(out.trim(), format!("t{} pinned (runs on n1)", s.task));
    }
    let st = status(&c);
    for (s, pinned) in [(&a, true), (&b, false), (&x, true), (&y, true)] {
        assert_eq!(task_row(&st, s.task)["pinned"], pinned, "t{}", s.task);
    }
    let denied = c.exec(
        "n1",
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            &m(),
            "pin",
            "--unpin",
            &format!("t{}", x.task),
        ],
    );
    assert!(!denied.status.success());
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(err.contains("may not pin"), "{err}");
    let all = [&a, &b, &x, &y];
    wait_measured(&c, &all);
    let once = || c.exec_ok("n1", &[&m(), "balance", "--once", "--interval", "1"]);
    let first = once();
    assert!(
        first.contains(&format!("moved t{} to n2", b.task)),
        "only the unpinned task moves: {first}"
    );
    assert_eq!(first.matches("moved t").count(), 1, "{first}");
    assert_eq!(once().trim(), "no move needed");
    c.exec_ok("n1", &[&m(), "pin", "--unpin", &format!("t{}", x.task)]);
    let after = once();
    assert!(
        after.contains(&format!("moved t{} to n2", x.task)),
        "{after}"
    );
    let p = placement(&c, &all);
    assert_eq!(p[0], ("n1".to_owned(), 0), "t{} is pinned", a.task);
    assert_eq!(p[3], ("n1".to_owned(), 0), "t{} is pinned", y.task);
    stop_and_check(&c, &all);
}

/// Moves that fail (the tasks hold a pipe, which migfs refuses to move)
/// are reported, retried, then dropped; the balancer keeps running and
/// moves the next task that can move.
#[test]
fn a_failing_move_is_reported_and_the_balancer_goes_on() {
    let Some(c) = cluster_with(&[]) else { return };
    let u1 = spin(&c, 1, &["0", "pipe"], false);
    let u2 = spin(&c, 2, &["0", "pipe"], false);
    wait_measured(&c, &[&u1, &u2]);
    let b = Balancer::start(
        &c,
        &[
            "--interval",
            "1",
            "--retry-after",
            "1",
            "--max-failures",
            "2",
        ],
    );
    let failed = |d: &[Value], t: u64| {
        d.iter()
            .filter(|x| x["task"].as_u64() == Some(t) && x["result"] == "failed")
            .count()
    };
    let dropped = within(60_000, || {
        let d = b.decisions();
        failed(&d, u1.task) >= 2 && failed(&d, u2.task) >= 2
    });
    assert!(dropped, "each should fail twice:\n{}", b.text());
    for x in b.decisions() {
        let err = x["error"].as_str().unwrap_or_default();
        assert!(err.contains("pipe"), "the refusal names the pipe: {x}");
    }
    std::thread::sleep(Duration::from_secs(3));
    let before = b.decisions().len();
    assert_eq!(
        failed(&b.decisions(), u1.task),
        2,
        "dropped after 2 failures:\n{}",
        b.text()
    );
    assert!(b.alive(), "the balancer died:\n{}", b.text());
    let ok = spin(&c, 3, &[], false);
    let all = [&u1, &u2, &ok];
    let moved = within(60_000, || {
        b.decisions()
            .iter()
            .any(|x| x["task"].as_u64() == Some(ok.task) && x["result"] == "moved")
    });
    assert!(moved, "the movable task was not moved:\n{}", b.text());
    assert_eq!(
        b.decisions().len(),
        before + 1,
        "nothing else was tried:\n{}",
        b.text()
    );
    let p = placement(&c, &all);
    assert_eq!(p[0], ("n1".to_owned(), 0));
    assert_eq!(p[1], ("n1".to_owned(), 0));
    assert_eq!(p[2], ("n2".to_owned(), 1));
    assert!(b.alive());
    drop(b);
    stop_and_check(&c, &all);
}

/// With a memory budget per node, a node over it gives the `memory`
/// policy's choice away, and the task's memory arrives intact.
#[test]
fn the_memory_policy_relieves_a_node_over_its_budget() {
    let Some(c) = cluster_with(&[("MIGFS_NODE_MEMORY_MIB", "512")]) else {
        return;
    };
    let small = spin(&c, 1, &["200"], false);
    let big = spin(&c, 2, &["300"], false);
    let all = [&small, &big];
    wait_measured(&c, &all);
    let short = within(30_000, || {
        let st = status(&c);
        let nodes = st["nodes"].as_array().unwrap();
        let n1 = nodes.iter().find(|n| n["name"] == "n1").unwrap();
        n1["load"]["mem_available_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
            < 51 << 20
    });
    assert!(short, "n1 never short of memory: {}", status(&c));
    let out = c.exec_ok(
        "n1",
        &[&m(), "balance", "--policy", "memory", "--once", "--json"],
    );
    let d: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(d.len(), 1, "{out}");
    assert_eq!(
        d[0]["task"].as_u64(),
        Some(small.task),
        "the smallest that is enough: {out}"
    );
    assert_eq!(d[0]["result"], "moved", "{out}");
    assert!(
        d[0]["reason"].as_str().unwrap().contains("below 10.0%"),
        "{out}"
    );
    let p = placement(&c, &all);
    assert_eq!((p[0].0.as_str(), p[1].0.as_str()), ("n2", "n1"));
    // Once n1 reported without the moved task's memory (its frozen
    // original is gone when the move's report comes), nothing more moves.
    let relieved = within(10_000, || {
        let st = status(&c);
        let nodes = st["nodes"].as_array().unwrap();
        let n1 = nodes.iter().find(|n| n["name"] == "n1").unwrap();
        n1["load"]["mem_available_bytes"].as_u64().unwrap_or(0) > 150 << 20
    });
    assert!(relieved, "n1 still short: {}", status(&c));
    let again = c.exec_ok("n1", &[&m(), "balance", "--policy", "memory", "--once"]);
    assert_eq!(again.trim(), "no move needed");
    stop_and_check(&c, &all);
}
