//! A real local cluster for a test: [`Cluster::up`] runs
//! `migfs cluster up` in a fresh temp dir, and dropping the [`Cluster`]
//! runs `migfs cluster down` (also when the test panics), then checks that
//! every process it started is gone.
//!
//! The `migfs` binary is `$MIGFS_BIN`, else `<target dir>/debug/migfs`
//! next to the test executable. Tests that need a cluster start with
//! `if !require_priv() { return; }`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;

/// Lines of each daemon log printed when a test fails.
const LOG_TAIL: usize = 40;

/// Whether this machine can run a cluster (root, /dev/fuse, mounts,
/// namespaces). If not: panics with the reason when `MIGFS_REQUIRE_PRIV=1`
/// (CI), else prints `SKIP: <reason>` and returns false.
pub fn require_priv() -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    match PROBE.get_or_init(probe) {
        Ok(()) => true,
        Err(reason) if std::env::var("MIGFS_REQUIRE_PRIV").as_deref() == Ok("1") => {
            panic!("MIGFS_REQUIRE_PRIV=1 but this test cannot run: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            false
        }
    }
}

/// The `/proc/self/status` line `key:`, split into fields.
fn status_fields(key: &str) -> Option<Vec<String>> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    Some(line.split_whitespace().map(str::to_owned).collect())
}

fn probe() -> Result<(), String> {
    let euid = status_fields("Uid")
        .and_then(|f| f.get(1).cloned())
        .unwrap_or_default();
    if euid != "0" {
        return Err(format!("needs root (effective uid is {euid})"));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| format!("needs /dev/fuse ({e})"))?;
    const CAP_SYS_ADMIN: u32 = 21;
    let caps = status_fields("CapEff")
        .and_then(|f| u64::from_str_radix(f.first()?, 16).ok())
        .unwrap_or(0);
    if caps & (1 << CAP_SYS_ADMIN) == 0 {
        return Err("needs CAP_SYS_ADMIN (mount, namespaces)".into());
    }
    for ns in ["mnt", "uts", "pid"] {
        if !Path::new(&format!("/proc/self/ns/{ns}")).exists() {
            return Err(format!("the kernel has no {ns} namespaces"));
        }
    }
    // A container may still forbid unshare (seccomp); util-linux tells.
    let unshare = Command::new("unshare")
        .args(["--mount", "--uts", "--pid", "--fork", "true"])
        .output();
    if let Some(o) = unshare.ok().filter(|o| !o.status.success()) {
        let why = String::from_utf8_lossy(&o.stderr);
        return Err(format!(
            "cannot create namespaces: unshare says {}",
            why.trim()
        ));
    }
    Ok(())
}

/// The `migfs` binary: `$MIGFS_BIN`, else `debug/migfs` in the target dir
/// this test executable was built in (`<target>/debug/deps/<test>`).
pub fn migfs_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MIGFS_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("locate the test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable outside <target>/<profile>/deps");
    let bin = profile_dir.join("migfs");
    assert!(
        bin.exists(),
        "{} not found: build it first: cargo build --workspace --bins (or set MIGFS_BIN)",
        bin.display()
    );
    bin
}

/// One daemon in [`Status`] (`migfs cluster status --json`).
#[derive(Clone, Debug, Deserialize)]
pub struct DaemonStatus {
    /// Listening address.
    pub addr: String,
    /// Host PID.
    pub pid: Option<i32>,
    /// Whether it runs.
    pub up: bool,
    /// Its log.
    pub log: PathBuf,
}

/// One node in [`Status`].
#[derive(Clone, Debug, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Host PID of the node's init (PID 1 of its PID namespace).
    pub init_pid: Option<i32>,
    /// Whether the init, and so the node's namespaces, live.
    pub init_up: bool,
    /// The node daemon.
    pub daemon: DaemonStatus,
    /// The daemon's PID inside the node.
    pub ns_pid: Option<i32>,
    /// Whether the node's FUSE mount is there.
    pub mounted: bool,
    /// Whether the node is ready.
    pub ready: bool,
    /// Host path to the node's mount.
    pub path: Option<PathBuf>,
}

/// `migfs cluster status --json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    /// Cluster dir.
    pub dir: PathBuf,
    /// Port of every daemon.
    pub port: u16,
    /// Mount path in each node.
    pub mount: PathBuf,
    /// The metadata server.
    pub meta: DaemonStatus,
    /// The nodes, n1 first.
    pub nodes: Vec<NodeStatus>,
}

impl Status {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> &NodeStatus {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in {self:?}"))
    }
}

/// A process, told apart from a later one with the same PID by its start
/// time (`/proc/PID/stat` field 22).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    /// Host PID.
    pub pid: i32,
    /// Start time, clock ticks after boot.
    pub start: u64,
}

impl Proc {
    /// The process now holding `pid`.
    pub fn of(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        Some(Proc {
            pid,
            start: f.get(19)?.parse().ok()?,
        })
    }

    /// Whether this very process runs (same start time, not a zombie).
    pub fn is_alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(19).and_then(|s| s.parse().ok()) == Some(self.start)
            && !matches!(f.first(), Some(&"Z") | Some(&"X"))
    }
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running local cluster in a temp dir; `cluster down` on drop.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    env: Vec<(String, String)>,
    /// Host path of each node's mount, from the status after `up` (a
    /// node's init, and so the path, lives as long as the cluster).
    paths: Vec<(String, PathBuf)>,
    /// Every process `up` and `start` started (inits, daemons), checked
    /// gone on drop.
    started: Mutex<Vec<Proc>>,
}

impl Cluster {
    /// Starts a cluster of `nodes` nodes (n1..); panics, with the output of
    /// `cluster up`, if it does not come up.
    pub fn up(nodes: usize) -> Cluster {
        Cluster::up_with_env(nodes, &[])
    }

    /// Like [`Cluster::up`], with extra environment for every `migfs
    /// cluster` command, and so for the daemons (e.g. `MIGFS_LOG`).
    pub fn up_with_env(nodes: usize, env: &[(&str, &str)]) -> Cluster {
        match Cluster::try_up(nodes, env) {
            Ok(c) => c,
            Err(e) => panic!("migfs cluster up --nodes {nodes} failed:\n{e}"),
        }
    }

    /// Starts a cluster; on failure returns the output of `cluster up` (and
    /// has already run `cluster down`).
    pub fn try_up(nodes: usize, env: &[(&str, &str)]) -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("migfs-e2e-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut c = Cluster {
            dir: Some(dir),
            bin: migfs_bin(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            paths: Vec::new(),
            started: Mutex::new(Vec::new()),
        };
        let o = c.cli(["up", "--nodes", &nodes.to_string()]);
        if !o.status.success() {
            return Err(output_text(&o));
        }
        let st = c.status();
        let mut started = vec![st.meta.pid];
        for n in &st.nodes {
            started.extend([n.init_pid, n.daemon.pid]);
        }
        c.track(started.into_iter().flatten());
        c.paths = st
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), n.path.clone()?)))
            .collect();
        Ok(c)
    }

    /// The cluster dir (state, secret, data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().map(|d| d.path()).expect("cluster dir")
    }

    /// The `migfs` binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A `migfs cluster --dir <dir>` command, ready for more arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("cluster").arg("--dir").arg(self.dir());
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `migfs cluster <args>` and returns its output.
    pub fn cli<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command()
            .args(args)
            .output()
            .expect("run migfs cluster")
    }

    /// Runs `migfs cluster <args>`; panics unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "migfs cluster {}\n{}",
            args.join(" "),
            output_text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a command inside `node` (`cluster exec`) and returns its output.
    pub fn exec(&self, node: &str, argv: &[&str]) -> Output {
        self.command()
            .args(["exec", node, "--"])
            .args(argv)
            .output()
            .expect("run migfs cluster exec")
    }

    /// [`Cluster::exec`] that must succeed (else panics with its output);
    /// returns its stdout.
    pub fn exec_ok(&self, node: &str, argv: &[&str]) -> String {
        let o = self.exec(node, argv);
        assert!(
            o.status.success(),
            "on {node}: {argv:?}\n{}",
            output_text(&o)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts a command inside `node` in the background, stdio on
    /// /dev/null; returns its PID as the node sees it.
    pub fn spawn_detached(&self, node: &str, argv: &[&str]) -> i32 {
        let o = self
            .command()
            .args(["exec", "--detach", node, "--"])
            .args(argv)
            .output()
            .expect("run migfs");
        assert!(
            o.status.success(),
            "exec --detach {node} {argv:?}\n{}",
            output_text(&o)
        );
        let out = String::from_utf8_lossy(&o.stdout);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("exec --detach printed {out:?}, not a pid"))
    }

    /// The host path of `rel` inside `node`'s mount
    /// (`/proc/<init pid>/root/<mount>/<rel>`).
    pub fn path(&self, node: &str, rel: &str) -> PathBuf {
        let base = match self.paths.iter().find(|(n, _)| n == node) {
            Some((_, p)) => p.clone(),
            None => panic!("no node {node} in this cluster"),
        };
        base.join(rel.trim_start_matches('/'))
    }

    /// The node's block store dir on the host.
    pub fn data_dir(&self, node: &str) -> PathBuf {
        self.dir().join("nodes").join(node).join("data")
    }

    /// The log of `target` (`meta` or a node name).
    pub fn log(&self, target: &str) -> PathBuf {
        self.dir().join("logs").join(format!("{target}.log"))
    }

    /// `cluster kill TARGET`: SIGKILL to `meta` or a node's daemon.
    pub fn kill(&self, target: &str) {
        self.cli_ok(&["kill", target]);
    }

    /// `cluster start TARGET`: starts it again and waits until it is ready.
    pub fn start(&self, target: &str) {
        self.cli_ok(&["start", target]);
        let st = self.status();
        let pid = if target == "meta" {
            st.meta.pid
        } else {
            st.node(target).daemon.pid
        };
        self.track(pid);
    }

    /// Adds processes to those checked gone after `down`.
    fn track(&self, pids: impl IntoIterator<Item = i32>) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        started.extend(pids.into_iter().filter_map(Proc::of));
    }

    /// The started processes that still run.
    fn alive(&self) -> Vec<Proc> {
        self.started().into_iter().filter(Proc::is_alive).collect()
    }

    /// `cluster status --json`.
    pub fn status(&self) -> Status {
        let o = self.cli(["status", "--json"]);
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("cluster status --json: {e}\n{}", output_text(&o)))
    }

    /// The processes `up` and `start` started (meta, each init, each node
    /// daemon).
    pub fn started(&self) -> Vec<Proc> {
        self.started
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs `cluster down` now and checks that everything `up` started is
    /// gone; the cluster dir stays until drop.
    pub fn down(&self) -> Output {
        let o = self.cli(["down"]);
        assert!(o.status.success(), "cluster down\n{}", output_text(&o));
        self.assert_stopped();
        o
    }

    fn assert_stopped(&self) {
        let left = self.alive();
        assert!(
            left.is_empty(),
            "still running after cluster down: {left:?}"
        );
    }

    /// Prints the tail of every log in the cluster dir (for a failed test).
    fn print_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir().join("logs")) else {
            return;
        };
        let mut logs: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last {LOG_TAIL} lines)", log.display());
            for l in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
                eprintln!("{l}");
            }
        }
    }

    /// Last resort when `cluster down` failed: SIGKILL what `up` started
    /// (the inits take their whole node with them).
    fn force_kill(&self) {
        for p in self.alive() {
            let _ = Command::new("kill")
                .args(["-KILL", &p.pid.to_string()])
                .status();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let ok = match self.command().arg("down").output() {
            Ok(o) if o.status.success() => true,
            Ok(o) => {
                eprintln!("migfs cluster down failed:\n{}", output_text(&o));
                false
            }
            Err(e) => {
                eprintln!("cannot run migfs cluster down: {e}");
                false
            }
        };
        if !ok {
            self.force_kill();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.alive().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if let Some(d) = self
            .dir
            .take_if(|_| std::env::var_os("MIGFS_E2E_KEEP").is_some())
        {
            eprintln!("keeping {}", d.keep().display());
        }
        let left = self.alive();
        if !left.is_empty() && !std::thread::panicking() {
            panic!("cluster processes still running after down: {left:?}");
        }
    }
}
