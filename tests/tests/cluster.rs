//! The testbed itself: `migfs cluster up/exec/status/kill/start/down`
//! against real namespaces, real daemons and real FUSE mounts.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use migfs_e2e::harness::{Cluster, Proc, migfs_bin, output_text, require_priv};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `argv` on `node`; panics unless it succeeds; returns stdout, trimmed.
fn run(c: &Cluster, node: &str, argv: &[&str]) -> String {
    c.exec_ok(node, argv).trim().to_string()
}

/// Namespace ids (`mnt:[...]`) every process on the host is in.
fn mount_namespaces_in_use() -> HashSet<String> {
    let mut set = HashSet::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(l) = std::fs::read_link(e.path().join("ns/mnt")) {
            set.insert(l.to_string_lossy().into_owned());
        }
    }
    set
}

fn ns_of(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn up_exec_status_down() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let st = c.status();
    assert!(st.meta.up, "{st:?}");
    assert_eq!(st.meta.addr, format!("127.0.0.10:{}", st.port));
    for (i, n) in st.nodes.iter().enumerate() {
        assert_eq!(n.name, format!("n{}", i + 1));
        assert_eq!(n.daemon.addr, format!("127.0.0.{}:{}", 11 + i, st.port));
        assert!(n.init_up && n.daemon.up && n.mounted && n.ready, "{n:?}");
        assert_eq!(
            n.path.as_deref(),
            Some(Path::new(&format!(
                "/proc/{}/root/migfs",
                n.init_pid.unwrap()
            )))
        );
    }
    // Own hostname, PID namespace (PID 1 is the init), /proc and mount.
    for node in ["n1", "n2"] {
        assert_eq!(run(&c, node, &["hostname"]), node);
        assert!(run(&c, node, &["cat", "/proc/1/cmdline"]).contains("init-ns"));
        let pid: i32 = run(&c, node, &["sh", "-c", "echo $$"]).parse().unwrap();
        assert!(
            pid < 1000,
            "{node}: shell has pid {pid}, not a namespace pid"
        );
        let mounts = run(&c, node, &["cat", "/proc/self/mounts"]);
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(1) == Some("/migfs") && l.contains(" fuse")),
            "{mounts}"
        );
    }
    let host_ns = ns_of(std::process::id().try_into().unwrap(), "mnt");
    let n1_ns = run(&c, "n1", &["readlink", "/proc/self/ns/mnt"]);
    let n2_ns = run(&c, "n2", &["readlink", "/proc/self/ns/mnt"]);
    assert!(
        n1_ns != n2_ns && n1_ns != host_ns && n2_ns != host_ns,
        "{n1_ns} {n2_ns} {host_ns}"
    );
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host_mounts.contains(&c.dir().display().to_string()),
        "a node mount leaked to the host"
    );
    // Human status: one line per daemon, exit 0 when all is up.
    let o = c.cli(["status"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(
        stdout(&o)
            .lines()
            .filter(|l| l.contains(" up ") && l.contains("mounted"))
            .count(),
        2
    );

    c.down();
    assert!(
        !mount_namespaces_in_use().contains(&n1_ns),
        "n1's mount namespace outlived down"
    );
    assert!(
        !mount_namespaces_in_use().contains(&n2_ns),
        "n2's mount namespace outlived down"
    );
    let o = c.cli(["status", "--json"]);
    assert_eq!(o.status.code(), Some(3), "{}", output_text(&o));
    assert_eq!(stdout(&o).trim(), "null");
}

#[test]
fn exec_passes_exit_code_output_and_cwd() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(1);
    let o = c.exec("n1", &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", output_text(&o));
    assert_eq!(stdout(&o), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    let o = c.exec("n1", &["sh", "-c", "kill -9 $$"]);
    assert_eq!(o.status.code(), Some(128 + 9), "{}", output_text(&o));
    let o = c.exec("n1", &["/no/such/program"]);
    assert_eq!(o.status.code(), Some(127), "{}", output_text(&o));
    let o = c
        .command()
        .args(["exec", "n1", "--", "cat"])
        .stdin(std::fs::File::open("/etc/hostname").unwrap())
        .output();
    assert_eq!(
        stdout(&o.unwrap()),
        std::fs::read_to_string("/etc/hostname").unwrap(),
        "stdin passes through"
    );
    // cwd: kept when the node has it, else /. A host PID's /proc dir does
    // not exist in the node's fresh /proc.
    let o = c
        .command()
        .args(["exec", "n1", "--", "pwd"])
        .current_dir("/usr")
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "/usr\n");
    let host_only = format!("/proc/{}/fdinfo", std::process::id());
    let o = c
        .command()
        .args(["exec", "n1", "--", "pwd"])
        .current_dir(&host_only)
        .output()
        .unwrap();
    assert_eq!(stdout(&o), "/\n", "{}", output_text(&o));
    let o = c.exec("n9", &["true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no node \"n9\""),
        "{}",
        output_text(&o)
    );
}

#[test]
fn detach_prints_a_pid_alive_inside_the_node() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let t = Instant::now();
    let pid = c.spawn_detached(
        "n1",
        &[
            "sh",
            "-c",
            "echo started > /tmp/migfs-detach-$$; exec sleep 1000",
        ],
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exec --detach waited for the command"
    );
    let pid_s = pid.to_string();
    wait_until("the detached command to exec sleep", || {
        run(&c, "n1", &["cat", &format!("/proc/{pid}/cmdline")]).starts_with("sleep")
    });
    // Its parent is the node's init, its stdio is /dev/null.
    let ppid = run(&c, "n1", &["ps", "-o", "ppid=", "-p", &pid_s]);
    assert_eq!(ppid, "1");
    assert_eq!(
        run(&c, "n1", &["readlink", &format!("/proc/{pid}/fd/1")]),
        "/dev/null"
    );
    assert!(c.exec("n1", &["kill", "-0", &pid_s]).status.success());
    // The redirect inside the command still works; the file is on the host fs.
    let marker = format!("/tmp/migfs-detach-{pid}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "started\n");
    std::fs::remove_file(&marker).unwrap();
    // n2 has its own PIDs: no sleep there.
    assert!(!run(&c, "n2", &["ps", "-e", "-o", "comm="]).contains("sleep"));
    run(&c, "n1", &["kill", "-9", &pid_s]);
    wait_until("the node's init to reap the killed command", || {
        !c.exec("n1", &["kill", "-0", &pid_s]).status.success()
    });
}

#[test]
fn two_clusters_run_at_once() {
    if !require_priv() {
        return;
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Cluster::up(2));
        let b = s.spawn(|| Cluster::up(1));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (sa, sb) = (a.status(), b.status());
    assert_ne!(sa.port, sb.port, "two clusters on one port");
    for c in [&a, &b] {
        assert_eq!(run(c, "n1", &["hostname"]), "n1");
        run(c, "n1", &["sh", "-c", "echo x > /migfs/mine"]);
    }
    assert_ne!(sa.node("n1").init_pid, sb.node("n1").init_pid);
    assert!(a.status().nodes.iter().all(|n| n.ready) && b.status().node("n1").ready);
    b.down();
    assert!(
        a.status().nodes.iter().all(|n| n.ready),
        "down of one cluster touched the other"
    );
    assert_eq!(run(&a, "n2", &["hostname"]), "n2");
}

#[test]
fn down_cleans_up_after_killed_daemon_and_init() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let st = c.status();
    let n1_init = st.node("n1").init_pid.unwrap();
    let n1_daemon = Proc::of(st.node("n1").daemon.pid.unwrap()).unwrap();
    let n2_init = st.node("n2").init_pid.unwrap();
    let namespaces = [ns_of(n1_init, "mnt"), ns_of(n2_init, "mnt")];
    let started = c.started();
    assert_eq!(
        started.len(),
        5,
        "meta, two inits, two daemons: {started:?}"
    );

    c.kill("n1");
    let st = c.status();
    let n1 = st.node("n1");
    assert!(!n1.daemon.up && n1.init_up, "{n1:?}");
    assert!(
        !n1_daemon.is_alive(),
        "kill returned before the daemon died"
    );
    // A crash of n2's init (kill -9 from the host) takes the whole node.
    let o = Command::new("kill")
        .args(["-9", &n2_init.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success());
    wait_until("n2's daemon to die with its init", || {
        !c.status().node("n2").daemon.up
    });
    let o = c.cli(["status"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "status must report the dead nodes\n{}",
        output_text(&o)
    );

    let o = c.cli(["down"]);
    assert!(o.status.success(), "{}", output_text(&o));
    let left: Vec<Proc> = started.iter().copied().filter(Proc::is_alive).collect();
    assert!(left.is_empty(), "still running: {left:?}");
    let in_use = mount_namespaces_in_use();
    assert!(
        namespaces.iter().all(|ns| !in_use.contains(ns)),
        "a node mount namespace survived down"
    );
    let o = c.cli(["down"]);
    assert!(
        o.status.success(),
        "down is idempotent\n{}",
        output_text(&o)
    );
    assert!(stdout(&o).contains("no cluster"), "{}", output_text(&o));
}

#[test]
fn kill_and_start_bring_daemons_back_in_the_same_namespaces() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    let before = c.status();
    c.kill("n1");
    assert!(
        c.cli_ok(&["kill", "n1"]).contains("not running"),
        "kill of a dead daemon is a no-op"
    );
    let o = c.cli(["start", "n2"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already running"));
    c.start("n1");
    let after = c.status();
    let (b, a) = (before.node("n1"), after.node("n1"));
    assert_eq!(
        a.init_pid, b.init_pid,
        "start must reuse the node's namespaces"
    );
    assert_ne!(a.daemon.pid, b.daemon.pid);
    assert!(a.daemon.up && a.mounted && a.ready, "{a:?}");
    // The dead mount was detached: exactly one FUSE mount at /migfs.
    let mounts = run(&c, "n1", &["cat", "/proc/self/mounts"]);
    assert_eq!(
        mounts
            .lines()
            .filter(|l| l.split(' ').nth(1) == Some("/migfs"))
            .count(),
        1,
        "{mounts}"
    );
    run(&c, "n1", &["sh", "-c", "echo again > /migfs/after-restart"]);
    assert_eq!(run(&c, "n2", &["cat", "/migfs/after-restart"]), "again");

    c.kill("meta");
    assert!(!c.status().meta.up);
    c.start("meta");
    let st = c.status();
    assert!(st.meta.up && st.meta.pid != before.meta.pid, "{st:?}");
    let log = std::fs::read_to_string(c.log("meta")).unwrap();
    assert!(
        log.contains("=== migfs cluster start meta ==="),
        "start appends to the log"
    );
}

#[test]
fn file_written_on_n1_is_read_on_n2() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(2);
    run(
        &c,
        "n1",
        &["sh", "-c", "echo hello from $(hostname) > /migfs/greeting"],
    );
    assert_eq!(run(&c, "n2", &["cat", "/migfs/greeting"]), "hello from n1");
    // The host reaches each node's mount through /proc/<init>/root.
    assert_eq!(
        std::fs::read_to_string(c.path("n2", "greeting")).unwrap(),
        "hello from n1\n"
    );
    std::fs::write(c.path("n2", "/from-host"), "via n2\n").unwrap();
    assert_eq!(run(&c, "n1", &["cat", "/migfs/from-host"]), "via n2");
    let printed = c.cli_ok(&["path", "n1", "greeting"]);
    assert_eq!(Path::new(printed.trim()), c.path("n1", "greeting"));
}

#[test]
fn failed_up_names_the_node_and_leaves_nothing_running() {
    if !require_priv() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("migfs-e2e-fail-")
        .tempdir()
        .unwrap();
    let up = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(migfs_bin());
        cmd.arg("cluster")
            .arg("--dir")
            .arg(dir.path())
            .args(["up", "--nodes", "2"])
            .args(extra);
        cmd.envs(env.iter().copied()).output().unwrap()
    };
    let guard = DownOnDrop(dir.path());
    // The init cannot create the mountpoint.
    let o = up(&["--mount", "/etc/hostname/sub"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("node n1") && err.contains("mountpoint"),
        "{err}"
    );
    // The node daemon exits at once (it rejects its configuration).
    let o = up(&[], &[("MIGFS_META_TIMEOUT", "not-a-number")]);
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("node n1 did not start") || err.contains("node n2 did not start"),
        "{err}"
    );
    assert!(
        err.contains("--- last lines of"),
        "the log tail is printed: {err}"
    );
    assert!(
        !dir.path().join("cluster.json").exists(),
        "a failed up must forget the cluster"
    );
    // Daemons and inits all name the cluster dir on their command line.
    let left = processes_mentioning(dir.path());
    assert!(left.is_empty(), "processes left behind: {left:?}");
    drop(guard);
}

#[test]
fn down_never_kills_a_process_that_reused_a_recorded_pid() {
    if !require_priv() {
        return;
    }
    let c = Cluster::up(1);
    let meta = Proc::of(c.status().meta.pid.unwrap()).unwrap();
    c.kill("meta");
    // Pretend the kernel gave the dead meta's PID to an unrelated process:
    // record that process's PID with meta's start time.
    let mut bystander = Command::new("sleep").arg("1000").spawn().unwrap();
    let bystander_pid = i32::try_from(bystander.id()).unwrap();
    let state_file = c.dir().join("cluster.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    state["meta"]["proc"] = serde_json::json!({ "pid": bystander_pid, "start": meta.start });
    std::fs::write(&state_file, serde_json::to_string(&state).unwrap()).unwrap();
    assert!(!c.status().meta.up, "a reused PID is not the daemon");
    c.down();
    let alive = bystander.try_wait().unwrap().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(
        alive,
        "cluster down killed an unrelated process that reused a recorded PID"
    );
}

/// Runs `cluster down` for a dir on drop (for tests that drive `up` by hand).
struct DownOnDrop<'a>(&'a Path);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        let _ = Command::new(migfs_bin())
            .arg("cluster")
            .arg("--dir")
            .arg(self.0)
            .arg("down")
            .output();
    }
}

/// Host PIDs whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(&needle)
        })
        .collect()
}
