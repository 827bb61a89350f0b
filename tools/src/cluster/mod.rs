//! `migfs cluster`: the local testbed. One metadata server and K nodes on
//! this machine, each node in its own mount, UTS and PID namespace (held
//! by a small init, see [`ns`]), with its own FUSE mount at the same path
//! and its own loopback address. Tests, benchmarks and the demo use it.
//!
//! Everything a cluster is lives in its dir (`--dir`): `cluster.json` (what
//! runs, see [`state`]), the secret, the metadata db, node data and
//! `logs/`. Every subcommand works from that record, so `down` cleans up
//! after a crash of a daemon, of an init or of `up` itself, and never
//! signals a process whose PID was reused (start times are compared).
//!
//! No command here starts a thread: entering a mount namespace (setns)
//! needs a single-threaded process, and the forks in [`sys`] rely on it.

pub mod ns;
pub mod port;
pub mod procs;
pub mod state;
mod sys;
mod up;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

pub use up::{UpOptions, start, up};

use ns::NodeNs;
use procs::ProcRef;
use state::State;

/// Default cluster dir when neither `--dir` nor `MIGFS_CLUSTER_DIR` is set.
pub const DEFAULT_DIR: &str = "/run/migfs/cluster";
/// How long `down` and `kill` wait for a killed process to go.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The cluster dir: `--dir`, else `$MIGFS_CLUSTER_DIR`, else
/// [`DEFAULT_DIR`]; made absolute.
pub fn resolve_dir(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = arg
        .or_else(|| {
            std::env::var_os("MIGFS_CLUSTER_DIR")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    std::path::absolute(&dir).with_context(|| format!("resolve {}", dir.display()))
}

/// Loads the cluster recorded in `dir`, or says there is none.
pub fn load(dir: &Path) -> anyhow::Result<State> {
    State::load(dir)?.with_context(|| {
        format!(
            "no cluster in {} (start one with `migfs cluster up`)",
            dir.display()
        )
    })
}

/// Kills every recorded process (node daemons, inits, then meta) and any
/// unrecorded stray of this cluster (see [`procs::strays`]), waits for
/// them to go, and forgets the cluster. Returns what was killed.
pub fn teardown(st: &State) -> anyhow::Result<Vec<String>> {
    let mut procs: Vec<(String, ProcRef)> = Vec::new();
    for n in &st.nodes {
        procs.extend(n.daemon.proc.map(|p| (format!("{} daemon", n.name), p)));
        procs.extend(n.init.map(|p| (format!("{} init", n.name), p)));
    }
    procs.extend(st.meta.proc.map(|p| ("meta".to_string(), p)));
    let mut killed =
        kill_all(&procs).with_context(|| format!("cluster in {}", st.dir.display()))?;
    killed.extend(kill_strays(&st.dir)?);
    for n in &st.nodes {
        let _ = std::fs::remove_file(&n.ready_file);
    }
    port::release(&st.dir, st.port);
    st.remove()?;
    Ok(killed)
}

/// Kills the strays of the cluster in `dir` (see [`procs::strays`]).
fn kill_strays(dir: &Path) -> anyhow::Result<Vec<String>> {
    let strays: Vec<(String, ProcRef)> = procs::strays(dir)
        .into_iter()
        .map(|p| ("an unrecorded process".to_string(), p))
        .collect();
    kill_all(&strays)
        .with_context(|| format!("stray processes of the cluster in {}", dir.display()))
}

/// SIGKILLs `procs` (those still alive) and waits until all are gone.
fn kill_all(procs: &[(String, ProcRef)]) -> anyhow::Result<Vec<String>> {
    let mut killed = Vec::new();
    let mut errors = Vec::new();
    for (what, p) in procs {
        match p.kill() {
            Ok(true) => killed.push(format!("{what} (pid {})", p.pid)),
            Ok(false) => {}
            Err(e) => errors.push(format!("kill {what} (pid {}): {e}", p.pid)),
        }
    }
    for (what, p) in procs {
        if !p.wait_dead(EXIT_WAIT) {
            errors.push(format!("{what} (pid {}) is still running", p.pid));
        }
    }
    if !errors.is_empty() {
        bail!("not fully stopped: {}", errors.join("; "));
    }
    Ok(killed)
}

/// `cluster down`: removes everything the cluster in `dir` runs. Returns
/// what was killed, or `None` if no cluster is recorded there.
pub fn down(dir: &Path) -> anyhow::Result<Option<Vec<String>>> {
    if !dir.exists() {
        return Ok(None);
    }
    let _lock = state::DirLock::acquire(dir)?;
    match State::load(dir)? {
        Some(st) => teardown(&st).map(Some),
        None => {
            let killed = kill_strays(dir)?;
            port::release_all(dir);
            Ok(Some(killed).filter(|k| !k.is_empty()))
        }
    }
}

/// `cluster kill TARGET`: SIGKILL to one daemon (`meta` or a node name);
/// a node's namespaces stay.
pub fn kill(dir: &Path, target: &str) -> anyhow::Result<String> {
    let _lock = state::DirLock::acquire(dir)?;
    let st = load(dir)?;
    let proc = if target == "meta" {
        st.meta.proc
    } else {
        let node = st.node(target)?;
        let _ = std::fs::remove_file(&node.ready_file);
        node.daemon.proc
    };
    match proc {
        Some(p)
            if p.kill()
                .with_context(|| format!("kill {target} (pid {})", p.pid))? =>
        {
            if !p.wait_dead(EXIT_WAIT) {
                bail!("{target} (pid {}) did not exit after SIGKILL", p.pid);
            }
            Ok(format!("killed {target} (pid {})", p.pid))
        }
        _ => Ok(format!("{target} is not running")),
    }
}

/// The node's namespaces, if its init runs.
fn node_ns(st: &State, node: &str) -> anyhow::Result<NodeNs> {
    let n = st.node(node)?;
    let init = n.init.filter(ProcRef::is_alive).with_context(|| {
        format!(
            "node {node} is not running (its namespaces are gone); run `migfs cluster up` again"
        )
    })?;
    NodeNs::open(init)
}

/// The directory to run in: the caller's, if it can be read.
fn caller_cwd() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
}

/// `cluster exec NODE -- CMD`: runs `argv` in the node, passing stdio
/// through; returns its exit code.
pub fn exec(dir: &Path, node: &str, argv: &[OsString]) -> anyhow::Result<i32> {
    let st = load(dir)?;
    node_ns(&st, node)?.exec(argv, &caller_cwd())
}

/// `cluster exec --detach`: starts `argv` in the node with stdio on
/// /dev/null; returns its PID as the node sees it.
pub fn exec_detached(dir: &Path, node: &str, argv: &[OsString]) -> anyhow::Result<i32> {
    let st = load(dir)?;
    let (prog, args) = argv.split_first().context("no command given")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(node_ns(&st, node)?.spawn(cmd, &caller_cwd())?.ns_pid)
}

/// `cluster path NODE [REL]`: the host's path into the node's mount.
pub fn path(dir: &Path, node: &str, rel: Option<&Path>) -> anyhow::Result<PathBuf> {
    let st = load(dir)?;
    let base = node_ns(&st, node)?.host_path(&st.mount);
    Ok(match rel {
        Some(r) => base.join(r.strip_prefix("/").unwrap_or(r)),
        None => base,
    })
}

/// One daemon in [`Status`].
#[derive(Clone, Debug, Serialize)]
pub struct DaemonStatus {
    /// Listening address.
    pub addr: String,
    /// Host PID of the recorded process.
    pub pid: Option<i32>,
    /// Whether that process runs.
    pub up: bool,
    /// Its log.
    pub log: PathBuf,
}

/// One node in [`Status`].
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    /// Node name (and hostname).
    pub name: String,
    /// Host PID of the init holding the namespaces.
    pub init_pid: Option<i32>,
    /// Whether the init (so the namespaces) is alive.
    pub init_up: bool,
    /// The node daemon.
    pub daemon: DaemonStatus,
    /// The daemon's PID inside the node.
    pub ns_pid: Option<i32>,
    /// Whether a FUSE filesystem is mounted at the mount path in the node.
    pub mounted: bool,
    /// Whether the node is ready (ready file written, mounted).
    pub ready: bool,
    /// The host's path to the node's mount (`/proc/<init>/root/<mount>`).
    pub path: Option<PathBuf>,
}

/// `cluster status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Cluster dir.
    pub dir: PathBuf,
    /// Port of every daemon.
    pub port: u16,
    /// Mount path inside each node.
    pub mount: PathBuf,
    /// The metadata server.
    pub meta: DaemonStatus,
    /// The nodes.
    pub nodes: Vec<NodeStatus>,
}

impl Status {
    /// Whether every daemon runs and every node is ready.
    pub fn all_up(&self) -> bool {
        self.meta.up
            && self
                .nodes
                .iter()
                .all(|n| n.init_up && n.daemon.up && n.ready)
    }
}

fn daemon_status(d: &state::Daemon) -> DaemonStatus {
    DaemonStatus {
        addr: d.addr.to_string(),
        pid: d.proc.map(|p| p.pid),
        up: d.proc.is_some_and(|p| p.is_alive()),
        log: d.log.clone(),
    }
}

/// `cluster status`: what runs in the cluster at `dir`, or `None`.
pub fn status(dir: &Path) -> anyhow::Result<Option<Status>> {
    let Some(st) = State::load(dir)? else {
        return Ok(None);
    };
    let nodes = st
        .nodes
        .iter()
        .map(|n| {
            let init = n.init.filter(ProcRef::is_alive);
            let daemon = daemon_status(&n.daemon);
            let ns_pid = n.daemon.proc.filter(|_| daemon.up).and_then(|p| p.ns_pid());
            NodeStatus {
                name: n.name.clone(),
                init_pid: n.init.map(|p| p.pid),
                init_up: init.is_some(),
                daemon,
                ns_pid,
                mounted: init.is_some_and(|i| ns::node_mounted(i, &st.mount)),
                ready: up::node_ready(n, &st.mount),
                path: init.map(|i| ns::host_path(i, &st.mount)),
            }
        })
        .collect();
    Ok(Some(Status {
        dir: st.dir.clone(),
        port: st.port,
        mount: st.mount.clone(),
        meta: daemon_status(&st.meta),
        nodes,
    }))
}
