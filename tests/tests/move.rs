//! `migfs-move` on the local testbed: real processes (C programs built
//! with gcc here, python3) moved between real nodes by the agents inside
//! `migfs node`, lazily (userfaultfd + page server) and eagerly; the task
//! table (`migfs ps`), `migfs run`, and moves that must change nothing.
//!
//! Needs root, /dev/fuse, ptrace, userfaultfd and gcc: otherwise SKIP, or
//! fail when MIGFS_REQUIRE_PRIV=1. The cluster (and every process in it)
//! is torn down by its guard, also when a test panics.

use std::fs;
use std::process::Output;
use std::time::Instant;

use migfs_e2e::harness::{Cluster, migfs_bin, output_text, require_priv};
use migfs_e2e::progs::{
    assert_sequence, assert_shared_counter, have_gcc, numbers, prog, wait_lines, within,
};

fn cluster() -> Option<Cluster> {
    if !require_priv() || !have_gcc() {
        return None;
    }
    Some(Cluster::up(2))
}

fn m() -> String {
    migfs_bin().to_str().unwrap().to_owned()
}

/// Starts `argv` on `node` with only stdio open; its PID there.
fn start_on(c: &Cluster, node: &str, argv: &[&str]) -> i32 {
    c.spawn_detached(node, argv)
}

fn alive(c: &Cluster, node: &str, pid: i32) -> bool {
    c.exec_ok(
        node,
        &[
            "sh",
            "-c",
            // A zombie is dead: its parent (the node's init) reaps it a
            // moment after the move has ended it.
            &format!(
                "test -e /proc/{pid} && ! grep -qE '^State:[[:space:]]+[ZX]' /proc/{pid}/status && echo alive || true"
            ),
        ],
    )
    .contains("alive")
}

/// `migfs move WHAT NODE --json [extra]` on `from`: the report.
fn move_json(c: &Cluster, from: &str, what: &str, to: &str, extra: &[&str]) -> serde_json::Value {
    let o = try_move(c, from, what, to, extra);
    assert!(
        o.status.success(),
        "move {what} {from} -> {to} {extra:?}\n{}",
        output_text(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {}", output_text(&o)))
}

fn try_move(c: &Cluster, from: &str, what: &str, to: &str, extra: &[&str]) -> Output {
    let m = m();
    let mut argv = vec![m.as_str(), "move", what, to, "--json"];
    argv.extend_from_slice(extra);
    c.exec(from, &argv)
}

fn field(r: &serde_json::Value, k: &str) -> u64 {
    r[k].as_u64()
        .or_else(|| {
            r[k].as_f64()
                .map(|f| f.round().to_string().parse().unwrap_or(0))
        })
        .unwrap_or_else(|| panic!("report has no {k}: {r}"))
}

fn pid_of(r: &serde_json::Value) -> i32 {
    i32::try_from(field(r, "pid")).unwrap()
}

fn ps(c: &Cluster, node: &str) -> Vec<serde_json::Value> {
    let out = c.exec_ok(node, &[&m(), "ps", "--json", "--all"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A counter appending to /migfs/count.txt moves n1 -> n2 -> n1 in `mode`;
/// the file shows no gap and no duplicate; the task follows in `ps`.
fn counter_round_trip(mode: &[&str], static_: bool) {
    let Some(c) = cluster() else { return };
    let counter = prog("ckpt_counter", static_);
    let pid = start_on(&c, "n1", &[counter.to_str().unwrap(), "/migfs/count.txt"]);
    let out = c.path("n2", "count.txt");
    wait_lines(&out, 20, 10_000);
    let r = move_json(&c, "n1", &pid.to_string(), "n2", mode);
    for k in [
        "task",
        "pid",
        "downtime_ms",
        "total_ms",
        "bytes",
        "pages_eager",
        "pages_demand",
        "pages_push",
        "residual_ms",
    ] {
        assert!(r.get(k).is_some(), "report lacks {k}: {r}");
    }
    let task = field(&r, "task");
    let pid2 = pid_of(&r);
    assert!(!alive(&c, "n1", pid), "the original still runs on n1");
    assert!(alive(&c, "n2", pid2), "not running on n2: {r}");
    let row = ps(&c, "n1")
        .into_iter()
        .find(|t| t["task"].as_u64() == Some(task))
        .expect("task in ps");
    assert_eq!(row["node"], "n2");
    assert_eq!(row["pid"].as_i64(), Some(i64::from(pid2)));
    let n = numbers(&out).len();
    wait_lines(&out, n + 20, 10_000);
    // Back, by task id, asked on n2 where it now runs.
    let r2 = move_json(&c, "n2", &format!("t{task}"), "n1", mode);
    assert_eq!(field(&r2, "task"), task);
    let pid3 = pid_of(&r2);
    let n = numbers(&out).len();
    wait_lines(&out, n + 20, 10_000);
    c.exec_ok("n1", &["kill", "-9", &pid3.to_string()]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_sequence(&c.path("n1", "count.txt"));
}

#[test]
fn counter_moves_there_and_back_lazily() {
    counter_round_trip(&["--lazy"], false);
}

#[test]
fn counter_moves_there_and_back_with_precopy() {
    counter_round_trip(&["--precopy"], false);
}

#[test]
fn counter_moves_there_and_back_with_precopy_then_lazy() {
    counter_round_trip(&["--precopy", "--lazy"], false);
}

#[test]
fn counter_moves_there_and_back_eagerly() {
    counter_round_trip(&["--eager"], false);
}

#[test]
fn static_counter_moves_there_and_back_lazily() {
    counter_round_trip(&["--lazy"], true);
}

/// A process rewriting 10 MB/s of its 128 MiB moves with --precopy, then
/// back with --precopy --lazy: rounds ran and sent pages, the original is
/// gone, and every page holds what the process last wrote (full verify).
#[test]
fn precopy_of_a_process_that_keeps_writing() {
    let Some(c) = cluster() else { return };
    let bin = prog("move_touch", false);
    let pid = start_on(
        &c,
        "n1",
        &[bin.to_str().unwrap(), "/migfs/dirty.txt", "128", "16", "10"],
    );
    let out = c.path("n1", "dirty.txt");
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let r = move_json(&c, "n1", &pid.to_string(), "n2", &["--precopy"]);
    assert_eq!(r["precopy"], true, "{r}");
    assert!(field(&r, "precopy_rounds") >= 1, "{r}");
    assert!(
        field(&r, "pages_precopy") >= 128 * 256,
        "the first round sends all 128 MiB: {r}"
    );
    assert_eq!(
        field(&r, "pages_push"),
        0,
        "nothing pulled after a complete pre-copy: {r}"
    );
    assert!(!alive(&c, "n1", pid), "the original was not destroyed");
    let pid2 = pid_of(&r);
    let verify = |node: &str, pid: i32, n: usize| {
        c.exec_ok(node, &["kill", "-USR1", &pid.to_string()]);
        assert!(
            within(60_000, || fs::read_to_string(&out)
                .unwrap_or_default()
                .matches("verified")
                .count()
                >= n),
            "no verification"
        );
        let text = fs::read_to_string(&out).unwrap();
        assert!(!text.contains("BAD"), "{}", tail(&text));
    };
    verify("n2", pid2, 1);
    let task = field(&r, "task");
    let r2 = move_json(
        &c,
        "n2",
        &format!("t{task}"),
        "n1",
        &["--precopy", "--lazy"],
    );
    assert_eq!(r2["precopy"], true, "{r2}");
    assert!(!alive(&c, "n2", pid2));
    let pid3 = pid_of(&r2);
    verify("n1", pid3, 2);
    assert!(alive(&c, "n1", pid3));
}

/// 256 MiB touched at random right after a lazy move: every check passes,
/// pages came on demand and by push, and the source let go.
#[test]
fn lazy_move_with_random_touches_completes_and_the_source_lets_go() {
    let Some(c) = cluster() else { return };
    random_touches_after_a_lazy_move(&c);
}

/// The same with warm memory on the nodes: the pages are staged in it and
/// moved into place while the process faults all over them.
#[test]
fn lazy_move_with_random_touches_through_warm_staging() {
    if !require_priv() || !have_gcc() {
        return;
    }
    let c = Cluster::up_with_env(2, &[("MIGFS_WARM_MEMORY", "640")]);
    assert!(
        within(60_000, || log_count(&c, "n2", "all warm memory ready") >= 1),
        "n2 made no warm memory"
    );
    random_touches_after_a_lazy_move(&c);
    assert_eq!(log_count(&c, "n2", "placed in warm memory"), 1);
    assert!(staged_pages(&c, "n2") > 0, "nothing was staged");
}

/// 256 MiB of `move_touch` moved lazily n1 -> n2 on `c` and checked.
fn random_touches_after_a_lazy_move(c: &Cluster) {
    let bin = prog("move_touch", false);
    let pid = start_on(
        c,
        "n1",
        &[bin.to_str().unwrap(), "/migfs/touch.txt", "256", "64"],
    );
    let out = c.path("n1", "touch.txt");
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let r = move_json(c, "n1", &pid.to_string(), "n2", &["--lazy"]);
    let pid2 = pid_of(&r);
    assert!(
        field(&r, "pages_push") + field(&r, "pages_demand") >= 256 * 256 - 1024,
        "most of 256 MiB should come by demand or push: {r}"
    );
    assert!(field(&r, "pages_demand") > 0, "no page faulted: {r}");
    assert!(
        !alive(c, "n1", pid),
        "the frozen original was not destroyed"
    );
    c.exec_ok("n2", &["kill", "-USR1", &pid2.to_string()]);
    assert!(
        within(60_000, || fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("verified")),
        "no verification"
    );
    let text = fs::read_to_string(&out).unwrap();
    assert!(text.contains("verified ok"), "{}", tail(&text));
    assert!(!text.contains("BAD"), "{}", tail(&text));
    assert!(alive(c, "n2", pid2));
}

fn tail(text: &str) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(10)..].join("\n")
}

/// A move that cannot happen changes nothing: unknown node, missing PID,
/// a process `--check` refuses (a pipe), a target that cannot rebuild it.
#[test]
fn refused_and_failing_moves_leave_the_process_running_where_it_was() {
    let Some(c) = cluster() else { return };
    let counter = prog("ckpt_counter", false);
    let pid = start_on(&c, "n1", &[counter.to_str().unwrap(), "/migfs/stay.txt"]);
    let out = c.path("n1", "stay.txt");
    wait_lines(&out, 10, 10_000);
    let o = try_move(&c, "n1", &pid.to_string(), "n9", &[]);
    assert!(!o.status.success());
    assert!(
        output_text(&o).contains("unknown node \"n9\""),
        "{}",
        output_text(&o)
    );
    let o = try_move(&c, "n1", "999999", "n2", &[]);
    assert!(!o.status.success(), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains("999999"), "{text}");
    // A pipe on fd 1: refused up front, naming it.
    let piped = start_on(&c, "n1", &["sh", "-c", "sleep 1000 | cat > /dev/null"]);
    let mut sleeper = String::new();
    assert!(within(5_000, || {
        let o = c.exec("n1", &["pgrep", "-P", &piped.to_string(), "sleep"]);
        sleeper = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        !sleeper.is_empty()
    }));
    let sleeper = sleeper.as_str();
    let o = try_move(&c, "n1", sleeper, "n2", &[]);
    assert!(!o.status.success());
    assert!(output_text(&o).contains("pipe"), "{}", output_text(&o));
    assert!(alive(&c, "n1", sleeper.parse().unwrap()));
    // A program whose binary was replaced under it (the target could not
    // map the same file): refused at prepare, naming the mapping.
    let copy = c.dir().join("counter-copy");
    fs::copy(&counter, &copy).unwrap();
    let pid2 = start_on(&c, "n1", &[copy.to_str().unwrap(), "/migfs/stay2.txt"]);
    let out2 = c.path("n1", "stay2.txt");
    wait_lines(&out2, 10, 10_000);
    let tmp = c.dir().join("counter-new");
    fs::write(&tmp, b"#!/bin/sh\nexit 0\n").unwrap();
    fs::rename(&tmp, &copy).unwrap();
    let o = try_move(&c, "n1", &pid2.to_string(), "n2", &[]);
    assert!(!o.status.success(), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(
        text.contains("prepare failed") && text.contains("counter-copy was deleted"),
        "names the phase and the mapping: {text}"
    );
    let n = numbers(&out2).len();
    wait_lines(&out2, n + 20, 10_000);
    assert_sequence(&out2);
    assert!(alive(&c, "n1", pid));
    let n = numbers(&out).len();
    wait_lines(&out, n + 10, 10_000);
    assert_sequence(&out);
    // None of them left a task stuck in "moving".
    assert!(ps(&c, "n2").iter().all(|t| t["state"] != "moving"));
}

/// The target's node daemon (agent and page server) dies in the middle
/// of an eager move: the process keeps running on the source, untouched.
#[test]
fn target_killed_mid_transfer_leaves_the_process_on_the_source() {
    let Some(c) = cluster() else { return };
    let bin = prog("move_touch", false);
    let pid = start_on(
        &c,
        "n1",
        &[bin.to_str().unwrap(), "/migfs/kill.txt", "1024"],
    );
    let out = c.path("n1", "kill.txt");
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let bin = migfs_bin();
    let mover = c
        .command()
        .args(["exec", "n1", "--"])
        .arg(&bin)
        .args(["move", &pid.to_string(), "n2", "--eager"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    c.kill("n2");
    let o = mover.wait_with_output().unwrap();
    assert!(!o.status.success(), "{}", output_text(&o));
    let text = output_text(&o);
    assert!(text.contains("failed"), "names the phase: {text}");
    assert!(alive(&c, "n1", pid), "the process is gone from n1: {text}");
    let beats = |t: &str| t.lines().filter(|l| l.starts_with("beat")).count();
    let n = beats(&fs::read_to_string(&out).unwrap());
    assert!(within(10_000, || beats(&fs::read_to_string(&out).unwrap())
        > n + 20));
    c.exec_ok("n1", &["kill", "-USR1", &pid.to_string()]);
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap()
        .contains("verified")));
    assert!(fs::read_to_string(&out).unwrap().contains("verified ok"));
    assert!(ps(&c, "n1").iter().all(|t| t["state"] != "moving"));
}

/// Two moves of one task at once: one wins, the other is told why.
#[test]
fn two_moves_of_one_task_at_once_one_wins() {
    let Some(c) = cluster() else { return };
    let bin = prog("move_touch", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/two.txt", "512"]);
    let out = c.path("n1", "two.txt");
    assert!(within(60_000, || fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("filled")));
    let bin = migfs_bin();
    let spawn = || {
        c.command()
            .args(["exec", "n1", "--"])
            .arg(&bin)
            .args(["move", &pid.to_string(), "n2", "--eager", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    let b = spawn();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "A:\n{}\nB:\n{}", output_text(&a), output_text(&b));
    let loser = if a.status.success() { &b } else { &a };
    let text = output_text(loser);
    let low = text.to_lowercase();
    assert!(
        low.contains("already being moved")
            || low.contains("not as pid")
            || low.contains("no such process"),
        "{text}"
    );
}

/// An fcntl lock and a flock lock on /migfs files stay held by the moved
/// process: a process on either node cannot take them, they are flock and
/// fcntl still (a lock of the other kind is free), and they are free once
/// the moved process ends.
#[test]
fn fcntl_and_flock_locks_on_migfs_stay_held_across_the_move() {
    let Some(c) = cluster() else { return };
    let state = prog("ckpt_state", false);
    for f in ["s.txt", "r.txt", "l.txt", "f.txt"] {
        fs::write(c.path("n1", f), b"0123456789abcdef").unwrap();
    }
    let pid = start_on(
        &c,
        "n1",
        &[
            state.to_str().unwrap(),
            "/migfs/s.txt",
            "/migfs",
            "/migfs/r.txt",
            "/migfs/l.txt",
            "/migfs/f.txt",
        ],
    );
    // ckpt_state holds an fcntl write lock on bytes 0-9 of l.txt and a
    // shared flock on f.txt.
    let probe = |node: &str, file: &str, take: &str| {
        let code = format!(
            "import fcntl,sys\nf=open('/migfs/{file}','r+')\ntry:\n {take}\n print('got')\nexcept OSError:\n print('busy')"
        );
        c.exec_ok(node, &["python3", "-c", &code]).trim().to_owned()
    };
    let fcntl = |node: &str, file: &str| {
        probe(
            node,
            file,
            "fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 10, 0)",
        )
    };
    let flock =
        |node: &str, file: &str| probe(node, file, "fcntl.flock(f, fcntl.LOCK_EX|fcntl.LOCK_NB)");
    assert!(within(10_000, || fcntl("n2", "l.txt") == "busy"));
    assert_eq!(flock("n2", "f.txt"), "busy");
    let r = move_json(&c, "n1", &pid.to_string(), "n2", &[]);
    let pid2 = field(&r, "pid");
    for node in ["n1", "n2"] {
        assert_eq!(fcntl(node, "l.txt"), "busy", "fcntl lock on {node}");
        assert_eq!(flock(node, "f.txt"), "busy", "flock lock on {node}");
        assert_eq!(flock(node, "l.txt"), "got", "l.txt holds no flock");
        assert_eq!(fcntl(node, "f.txt"), "got", "f.txt holds no fcntl lock");
    }
    c.exec_ok("n2", &["kill", "-9", &pid2.to_string()]);
    assert!(
        within(10_000, || fcntl("n1", "l.txt") == "got"
            && flock("n1", "f.txt") == "got"),
        "the locks were not freed"
    );
}

/// VmFlags that /proc/PID/maps does not show (dontfork, wipeonfork,
/// locked) come back on the target: the move reads them before the freeze
/// and checks them again while the image travels.
#[test]
fn mapping_flags_that_maps_does_not_show_survive_a_move() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_vmflags", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/vmflags.txt"]);
    let out = c.path("n1", "vmflags.txt");
    assert!(
        within(10_000, || fs::read_to_string(&out)
            .is_ok_and(|t| t.contains("beat"))),
        "the program did not start"
    );
    let text = fs::read_to_string(&out).unwrap();
    let first = text.lines().next().unwrap().to_owned();
    let w: Vec<&str> = first.split_whitespace().collect();
    let flags_at = |node: &str, pid: i32, addr: &str| -> String {
        let smaps = c.exec_ok(node, &["cat", &format!("/proc/{pid}/smaps")]);
        let mut lines = smaps
            .lines()
            .skip_while(|l| !l.starts_with(&format!("{addr}-")));
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_else(|| panic!("no mapping at {addr} on {node}"))
            .to_owned()
    };
    let expect = [(w[1], "dc"), (w[3], "wf"), (w[5], "lo")];
    for (addr, flag) in expect {
        assert!(
            flags_at("n1", pid, addr)
                .split_whitespace()
                .any(|f| f == flag)
        );
    }
    let r = move_json(&c, "n1", &pid.to_string(), "n2", &[]);
    let pid2 = pid_of(&r);
    for (addr, flag) in expect {
        let f = flags_at("n2", pid2, addr);
        assert!(
            f.split_whitespace().any(|x| x == flag),
            "mapping {addr} lost {flag} in the move: {f}"
        );
    }
    let before = fs::read_to_string(&out).unwrap().matches("beat").count();
    assert!(
        within(5_000, || fs::read_to_string(&out)
            .unwrap()
            .matches("beat")
            .count()
            > before + 5),
        "the moved program does not run"
    );
    c.exec_ok("n2", &["kill", "-9", &pid2.to_string()]);
}

/// `migfs run` relays the task's output and returns its exit status, also
/// when the task was moved to another node while it ran.
#[test]
fn run_relays_output_and_exit_status_across_a_move() {
    let Some(c) = cluster() else { return };
    let o = c.exec(
        "n1",
        &[
            &m(),
            "run",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2; exit 3",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"));
    // A task that prints for a while; moved mid-way by task id from n2.
    let script = "import time\nfor i in range(60):\n    print(i, flush=True)\n    time.sleep(0.05)\nraise SystemExit(7)";
    let (child, task) = run_python_on_n1(&c, script, std::process::Stdio::null());
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Asked on n2 by task id; n1's agent does the move.
    let r = move_json(&c, "n2", &format!("t{task}"), "n2", &[]);
    assert_eq!(r["from"], "n1");
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", output_text(&o));
    let got: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    assert_eq!(
        got,
        (0..60).collect::<Vec<u64>>(),
        "relayed output; {}",
        output_text(&o)
    );
}

/// `migfs run` feeds the task's stdin from the caller wherever the task
/// runs: lines written before (still unread in the pipe at the move),
/// during and after a move all arrive once, in order; end-of-file then
/// ends the task with its status.
#[test]
fn run_relays_stdin_across_a_move() {
    use std::io::Write;
    let Some(c) = cluster() else { return };
    // It starts reading only after the move: the first lines wait in the
    // pipe and must travel with the process.
    let script = "import sys, time\ntime.sleep(2)\nfor l in sys.stdin:\n    print('got', l.strip(), flush=True)\nraise SystemExit(5)";
    let (mut child, task) = run_python_on_n1(&c, script, std::process::Stdio::piped());
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..60 {
            writeln!(input, "{i}").unwrap();
            input.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Dropping it is the end of input.
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = move_json(&c, "n2", &format!("t{task}"), "n2", &[]);
    assert_eq!(r["from"], "n1");
    writer.join().unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", output_text(&o));
    let want: Vec<String> = (0..60).map(|i| format!("got {i}")).collect();
    let got: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(got, want, "relayed stdin; {}", output_text(&o));
}

/// `migfs run -- python3 -c SCRIPT` started from n1 (its output piped
/// back), once its task is running; returns the client and the task id.
fn run_python_on_n1(
    c: &Cluster,
    script: &str,
    stdin: std::process::Stdio,
) -> (std::process::Child, u64) {
    let child = c
        .command()
        .args(["exec", "n1", "--"])
        .arg(migfs_bin())
        .args(["run", "--", "python3", "-c", script])
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut task = None;
    assert!(within(10_000, || {
        task = ps(c, "n2")
            .into_iter()
            .find(|t| {
                t["cmd"].as_str().is_some_and(|s| s.starts_with("python3"))
                    && t["state"] == "running"
            })
            .and_then(|t| t["task"].as_u64());
        task.is_some()
    }));
    (child, task.unwrap())
}

/// The four ways to move.
const MODES: [&[&str]; 4] = [
    &["--lazy"],
    &["--eager"],
    &["--precopy"],
    &["--precopy", "--lazy"],
];

/// Lines of a file on /migfs, read through `node`'s mount.
fn line_count(c: &Cluster, node: &str, file: &str) -> usize {
    fs::read_to_string(c.path(node, file))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Moves process `pid` of n1 to n2 and back in every mode (8 moves, by
/// task id after the first), each time waiting for `file` to grow by a few
/// lines where it now runs. Returns its PID on n1 at the end.
fn there_and_back_in_every_mode(c: &Cluster, pid: i32, file: &str) -> i32 {
    let grown = |node: &str| {
        let n = line_count(c, node, file);
        assert!(
            within(20_000, || line_count(c, node, file) >= n + 5),
            "{file}: no progress on {node}"
        );
    };
    grown("n1");
    let mut what = pid.to_string();
    let mut pid = pid;
    for mode in MODES {
        let r = move_json(c, "n1", &what, "n2", mode);
        let task = field(&r, "task");
        grown("n2");
        let r = move_json(c, "n2", &format!("t{task}"), "n1", mode);
        pid = pid_of(&r);
        grown("n1");
        what = format!("t{task}");
    }
    pid
}

/// The last line of a file on /migfs, through n1.
fn last_line(c: &Cluster, file: &str) -> String {
    fs::read_to_string(c.path("n1", file))
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

/// The SIGUSR1 handler still counts and SIGUSR2 stays blocked and pending
/// through 8 moves.
#[test]
fn signal_program_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_signals", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/sig.txt"]);
    assert!(within(10_000, || line_count(&c, "n1", "sig.txt") >= 2));
    for n in 1..=2 {
        c.exec_ok("n1", &["kill", "-USR1", &pid.to_string()]);
        assert!(within(3000, || last_line(&c, "sig.txt")
            .starts_with(&format!("c={n} "))));
    }
    c.exec_ok("n1", &["kill", "-USR2", &pid.to_string()]);
    let want = |n: u32| format!("c={n} blocked=1 pending=1");
    assert!(within(3000, || last_line(&c, "sig.txt") == want(2)));
    let pid = there_and_back_in_every_mode(&c, pid, "sig.txt");
    assert_eq!(last_line(&c, "sig.txt"), want(2));
    c.exec_ok("n1", &["kill", "-USR1", &pid.to_string()]);
    assert!(
        within(3000, || last_line(&c, "sig.txt") == want(3)),
        "{}",
        last_line(&c, "sig.txt")
    );
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

/// A shared writable mapping of a /migfs file: its counter goes on with no
/// gap through 8 moves, and the file holds it.
#[test]
fn shared_mapping_program_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_shmap", false);
    let pid = start_on(
        &c,
        "n1",
        &[
            bin.to_str().unwrap(),
            "/migfs/shared.bin",
            "/migfs/shlog.txt",
        ],
    );
    let pid = there_and_back_in_every_mode(&c, pid, "shlog.txt");
    c.exec_ok("n1", &["kill", "-STOP", &pid.to_string()]);
    assert_shared_counter(&c.path("n1", "shlog.txt"), &c.path("n1", "shared.bin"));
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

/// Four threads keep their TLS counters (each goes on by one, never
/// restarts), rseq, robust lists and alternate stacks through 8 moves;
/// new threads and joins work afterwards.
#[test]
fn threads_program_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_threads", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/threads.txt"]);
    let pid = there_and_back_in_every_mode(&c, pid, "threads.txt");
    fs::write(c.path("n1", "threads.txt.stop"), b"").unwrap();
    let text = || fs::read_to_string(c.path("n1", "threads.txt")).unwrap_or_default();
    assert!(
        within(5000, || text().contains("joined t0")),
        "t0 could not be joined"
    );
    let t = text();
    for k in 0..4 {
        let counts: Vec<u64> = t
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("t{k} ")))
            .filter_map(|l| l.split(' ').next()?.parse().ok())
            .collect();
        assert!(counts.len() > 10, "thread {k} wrote {} lines", counts.len());
        assert!(
            counts.windows(2).all(|w| w[1] == w[0] + 1),
            "thread {k}'s TLS counter did not go on by one"
        );
    }
    for bad in ["rseq=0", "robust=0", "FAILED", "alt=0"] {
        assert!(!t.contains(bad), "{bad} after the moves");
    }
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

/// clock_gettime and gettimeofday (vDSO) keep working, never backwards,
/// through 8 moves.
#[test]
fn clock_program_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_clock", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/clock.txt"]);
    let pid = there_and_back_in_every_mode(&c, pid, "clock.txt");
    let t = fs::read_to_string(c.path("n1", "clock.txt")).unwrap();
    assert!(
        !t.contains("BAD"),
        "{}",
        t.lines()
            .filter(|l| l.contains("BAD"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

/// 256 MiB of patterned memory is intact after 8 moves.
#[test]
fn patterned_memory_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    let bin = prog("ckpt_bigmem", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/big.txt", "256"]);
    let text = || fs::read_to_string(c.path("n1", "big.txt")).unwrap_or_default();
    assert!(within(60_000, || text().contains("filled")), "not filled");
    let pid = there_and_back_in_every_mode(&c, pid, "big.txt");
    c.exec_ok("n1", &["kill", "-USR1", &pid.to_string()]);
    assert!(
        within(60_000, || text().contains("verified")),
        "no verification"
    );
    assert!(
        text().contains("verified ok"),
        "{}",
        text()
            .lines()
            .filter(|l| l.starts_with("verified"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

fn log_count(c: &Cluster, node: &str, what: &str) -> usize {
    fs::read_to_string(c.log(node))
        .unwrap_or_default()
        .matches(what)
        .count()
}

/// The MiB of the last "placed in warm memory" line of `node`'s log.
fn placed_mib(c: &Cluster, node: &str) -> u64 {
    log_field(c, node, "placed in warm memory", "mib")
}

/// Pages moved in from warm staging, by the last "pages pulled" line of
/// `node`'s log.
fn staged_pages(c: &Cluster, node: &str) -> u64 {
    log_field(c, node, "pages pulled", "staged")
}

/// The number `key=` says on the last line of `node`'s log with `what`
/// (0 if none).
fn log_field(c: &Cluster, node: &str, what: &str, key: &str) -> u64 {
    let log = fs::read_to_string(c.log(node)).unwrap_or_default();
    log.lines()
        .rfind(|l| l.contains(what))
        .and_then(|l| {
            l.split(&format!("{key}="))
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// With warm memory on the nodes (`MIGFS_WARM_MEMORY`: holders of 320,
/// 160, ... MiB), 256 MiB of patterned memory moves eagerly n1 -> n2 ->
/// n1 into the memory each target kept allocated, intact; each target
/// replaces the holder it used.
#[test]
fn eager_moves_land_in_the_targets_warm_memory() {
    there_and_back_through_warm_memory("--eager", |c, n| {
        assert!(
            placed_mib(c, n) >= 256,
            "not all of it was placed warm on {n}"
        );
    });
}

/// The same with lazy moves: each target stages the pages it is sent in
/// its warm memory and moves them into place (`UFFDIO_MOVE`).
#[test]
fn lazy_moves_stage_their_pages_in_the_targets_warm_memory() {
    there_and_back_through_warm_memory("--lazy", |c, n| {
        let staged = staged_pages(c, n);
        assert!(
            staged >= (256 << 20) / 4096,
            "{n} moved {staged} pages in from warm memory"
        );
    });
}

/// A 256 MiB `ckpt_bigmem` moved n1 -> n2 -> n1 with `flag`, the nodes
/// keeping warm memory; `check` looks at each target's log afterwards.
fn there_and_back_through_warm_memory(flag: &str, check: impl Fn(&Cluster, &str)) {
    if !require_priv() || !have_gcc() {
        return;
    }
    let c = Cluster::up_with_env(2, &[("MIGFS_WARM_MEMORY", "640")]);
    for n in ["n1", "n2"] {
        assert!(
            within(60_000, || log_count(&c, n, "all warm memory ready") >= 1),
            "{n} made no warm memory"
        );
    }
    let bin = prog("ckpt_bigmem", false);
    let pid = start_on(&c, "n1", &[bin.to_str().unwrap(), "/migfs/warm.txt", "256"]);
    let text = || fs::read_to_string(c.path("n1", "warm.txt")).unwrap_or_default();
    assert!(within(60_000, || text().contains("filled")), "not filled");
    // One move, checked on its target.
    let leg = |pid: i32, from: &str, to: &str| {
        let r = move_json(&c, from, &pid.to_string(), to, &[flag]);
        assert!(
            within(30_000, || log_count(&c, to, "pages pulled") >= 1
                || flag == "--eager"),
            "{to} never had every page"
        );
        assert_eq!(log_count(&c, to, "placed in warm memory"), 1);
        check(&c, to);
        r
    };
    let r = leg(pid, "n1", "n2");
    assert!(
        within(60_000, || log_count(&c, "n2", "all warm memory ready") >= 2),
        "n2 did not replace the holder the move used"
    );
    let r = leg(pid_of(&r), "n2", "n1");
    let pid = pid_of(&r);
    c.exec_ok("n1", &["kill", "-USR1", &pid.to_string()]);
    assert!(
        within(60_000, || text().contains("verified")),
        "no verification"
    );
    assert!(text().contains("verified ok"), "{}", text());
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
}

/// python3 with a million-entry dict, writing its progress to /migfs,
/// finishes with the right result and every step once after 8 moves.
#[test]
fn python3_program_moves_in_every_mode() {
    let Some(c) = cluster() else { return };
    fs::write(
        c.path("n1", "work.py"),
        "import sys, time, os\nout = open(sys.argv[1], 'a', buffering=1)\nd = {i: i * i for i in range(1_000_000)}\nout.write('built\\n')\n\
         step = 0\nwhile not os.path.exists(sys.argv[1] + '.stop'):\n    time.sleep(0.01)\n    out.write(f'step {step}\\n')\n    step += 1\n\
         out.write(f'result {sum(d.values()) % 1000003}\\n')\n",
    )
    .unwrap();
    let pid = start_on(&c, "n1", &["python3", "/migfs/work.py", "/migfs/py.txt"]);
    let text = || fs::read_to_string(c.path("n1", "py.txt")).unwrap_or_default();
    assert!(
        within(60_000, || text().contains("step 5")),
        "python did not start"
    );
    let _pid = there_and_back_in_every_mode(&c, pid, "py.txt");
    fs::write(c.path("n1", "py.txt.stop"), b"").unwrap();
    assert!(
        within(30_000, || text().contains("result")),
        "python did not finish"
    );
    let want = (0..1_000_000u64).map(|i| i * i).sum::<u64>() % 1_000_003;
    let t = text();
    assert!(t.contains(&format!("result {want}\n")), "{t}");
    let steps: Vec<u64> = t
        .lines()
        .filter_map(|l| l.strip_prefix("step ")?.parse().ok())
        .collect();
    assert!(
        steps.iter().enumerate().all(|(i, &s)| s == i as u64),
        "steps lost or repeated"
    );
}

/// Starts `ckpt_blocking` in `call` for 5 s on n1, moves it there and
/// back in every mode while it is inside the call, and returns how the
/// call ended: the elapsed ms of "rc=0 errno=0 elapsed_ms=..." (it must
/// not end early, nor with EINTR), and how long the moves took.
fn blocked_call_through_every_mode(call: &str) -> (u64, u64) {
    let Some(c) = cluster() else {
        return (5000, 0);
    };
    let bin = prog("ckpt_blocking", false);
    let file = format!("{call}.txt");
    let pid = start_on(
        &c,
        "n1",
        &[
            bin.to_str().unwrap(),
            &format!("/migfs/{file}"),
            call,
            "5000",
        ],
    );
    assert!(within(10_000, || line_count(&c, "n1", &file) >= 1));
    let t0 = Instant::now();
    let mut what = pid.to_string();
    let mut pid = pid;
    for mode in MODES {
        let r = move_json(&c, "n1", &what, "n2", mode);
        let task = field(&r, "task");
        let r = move_json(&c, "n2", &format!("t{task}"), "n1", mode);
        pid = pid_of(&r);
        what = format!("t{task}");
    }
    let moves = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
    let early = fs::read_to_string(c.path("n1", &file)).unwrap_or_default();
    assert!(!early.contains("rc="), "{call} ended early: {early}");
    assert!(
        within(60_000, || last_line(&c, &file).starts_with("rc=")),
        "{call} never returned"
    );
    let line = last_line(&c, &file);
    assert!(line.starts_with("rc=0 errno=0 "), "{call}: {line}");
    let ms: u64 = line
        .rsplit("elapsed_ms=")
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    c.exec_ok("n1", &["kill", "-9", &pid.to_string()]);
    (ms, moves)
}

/// A nanosleep the process is inside of through 8 moves ends normally
/// (not EINTR), after at least the time it asked for and not much more.
/// (A pre-copy's tracker start freezes and thaws the process once more;
/// the kernel's own restart of the sleep went through `restart_syscall`,
/// which the move's freeze then captured and the target could only
/// answer with EINTR: a thaw now restarts the sleep itself for the time
/// left.)
#[test]
fn blocked_nanosleep_moves_in_every_mode() {
    let (ms, _) = blocked_call_through_every_mode("nanosleep");
    assert!((5000..15_000).contains(&ms), "slept {ms} ms of 5000");
}

/// A poll with a timeout the process is inside of through 8 moves times
/// out normally (rc 0, not EINTR). The kernel keeps a poll's deadline
/// where no tracer can read it, so every thaw and restore starts the
/// timeout again in full: it ends at least 5 s after the last move.
#[test]
fn blocked_poll_moves_in_every_mode() {
    let (ms, moves) = blocked_call_through_every_mode("poll");
    assert!(
        ms >= 5000 && ms < moves + 5000 + 10_000,
        "polled {ms} ms of 5000 (the moves took {moves} ms)"
    );
}
