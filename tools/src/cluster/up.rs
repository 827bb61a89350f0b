//! Starting daemons: `cluster up` (everything) and `cluster start` (one
//! daemon again, in its node's existing namespaces), with the readiness
//! checks both share.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::ns::{self, NodeNs};
use super::port;
use super::procs::{self, ProcRef};
use super::state::{self, DirLock, Plan, State};

/// Lines of a daemon's log quoted when it fails to come up.
const TAIL_LINES: usize = 30;
const POLL: Duration = Duration::from_millis(50);

/// What `cluster up` is asked for.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// Cluster dir.
    pub dir: PathBuf,
    /// Number of nodes (n1..nK).
    pub nodes: usize,
    /// Mount path inside every node.
    pub mount: PathBuf,
    /// How long each daemon may take to become ready.
    pub timeout: Duration,
    /// The `migfs` binary the daemons run.
    pub bin: PathBuf,
}

/// `cluster up`: starts the metadata server and the nodes, returns once
/// every node is mounted and ready. On failure everything started is
/// removed again.
pub fn up(o: &UpOptions) -> anyhow::Result<State> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "`migfs cluster up` needs root (namespaces, mounts, /dev/fuse)"
    );
    ensure!(
        (1..=244).contains(&o.nodes),
        "--nodes must be between 1 and 244 (one loopback address each)"
    );
    ensure!(o.mount.is_absolute(), "--mount must be an absolute path");
    std::fs::create_dir_all(&o.dir).with_context(|| format!("create {}", o.dir.display()))?;
    let dir = o
        .dir
        .canonicalize()
        .with_context(|| format!("resolve {}", o.dir.display()))?;
    let _lock = DirLock::acquire(&dir)?;
    if let Some(old) = State::load(&dir)? {
        if let Some(what) = running_part(&old) {
            bail!(
                "a cluster is already running in {} ({what}); stop it with `migfs cluster down --dir {}`",
                dir.display(),
                dir.display()
            );
        }
        super::teardown(&old)?;
    }
    prepare_dir(&dir, o.nodes)?;
    let mut addrs = vec![state::META_IP];
    addrs.extend((1..=o.nodes).filter_map(state::node_ip));
    let port = port::reserve(&dir, &addrs)?;
    let plan = Plan {
        dir: &dir,
        bin: &o.bin,
        port,
        nodes: o.nodes,
        mount: &o.mount,
        env: state::daemon_env(),
    };
    let mut st = plan.state()?;
    st.save()?;
    if let Err(e) = start_all(&mut st, o.timeout) {
        if let Err(t) = super::teardown(&st) {
            eprintln!("migfs cluster: cleaning up after the failed start: {t:#}");
        }
        return Err(e);
    }
    Ok(st)
}

/// The first part of a recorded cluster that still runs, if any.
fn running_part(st: &State) -> Option<String> {
    let alive = |p: &Option<ProcRef>| p.is_some_and(|p| p.is_alive());
    if alive(&st.meta.proc) {
        return Some("meta".into());
    }
    st.nodes
        .iter()
        .find(|n| alive(&n.init) || alive(&n.daemon.proc))
        .map(|n| n.name.clone())
}

/// Fresh metadata, node data and logs (a cluster dir is the testbed's own).
fn prepare_dir(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    for sub in ["meta", "nodes", "logs"] {
        match std::fs::remove_dir_all(dir.join(sub)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("clear {}", dir.join(sub).display()));
            }
            _ => {}
        }
    }
    let mut dirs = vec![state::logs_dir(dir), dir.join("meta")];
    dirs.extend((1..=nodes).map(|i| dir.join("nodes").join(format!("n{i}")).join("data")));
    for d in dirs {
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    }
    state::write_secret(&dir.join("secret"))
}

fn start_all(st: &mut State, timeout: Duration) -> anyhow::Result<()> {
    start_meta(st, false, timeout)?;
    for i in 0..st.nodes.len() {
        create_node(st, i)?;
    }
    for i in 0..st.nodes.len() {
        spawn_node_daemon(st, i, false)?;
    }
    let all: Vec<usize> = (0..st.nodes.len()).collect();
    wait_nodes_ready(st, &all, timeout)
}

/// Opens a daemon's log, truncated for a fresh cluster, appended to (after
/// a marker line) for `cluster start`.
fn open_log(path: &Path, append: bool, what: &str) -> anyhow::Result<File> {
    let mut f = File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    if append {
        writeln!(f, "=== migfs cluster start {what} ===")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(f)
}

/// The command for a daemon: stdin /dev/null, stdout and stderr to its
/// log, cwd /, plain (uncoloured) logs and backtraces on panic.
fn daemon_command(d: &state::Daemon, log: File) -> anyhow::Result<Command> {
    let (prog, args) = d.argv.split_first().context("empty daemon command line")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(d.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("duplicate the log file")?)
        .stderr(log)
        .env("NO_COLOR", "1");
    if !d.env.iter().any(|(k, _)| k == "RUST_BACKTRACE") {
        cmd.env("RUST_BACKTRACE", "1");
    }
    Ok(cmd)
}

/// Starts `migfs meta` and waits until it accepts connections.
fn start_meta(st: &mut State, append: bool, timeout: Duration) -> anyhow::Result<()> {
    let log = open_log(&st.meta.log, append, "meta")?;
    let cmd = daemon_command(&st.meta, log)?;
    st.meta.proc = ns::spawn_on_host(cmd)?;
    st.save()?;
    let (addr, log) = (SocketAddr::V4(st.meta.addr), st.meta.log.clone());
    let end = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        let why = if !st.meta.proc.is_some_and(|p| p.is_alive()) {
            "it exited".to_string()
        } else if Instant::now() >= end {
            format!(
                "it does not accept connections on {addr} after {}s",
                timeout.as_secs_f64()
            )
        } else {
            std::thread::sleep(POLL);
            continue;
        };
        bail!(
            "the metadata server did not start: {why}\n{}",
            quote_log(&log)
        );
    }
}

/// Creates node `i`'s namespaces around its init, and records the init.
fn create_node(st: &mut State, i: usize) -> anyhow::Result<()> {
    let node = &st.nodes[i];
    let log = open_log(&node.init_log, false, &node.name)?;
    let bin = PathBuf::from(st.meta.argv.first().context("empty meta command line")?);
    let pending = ns::create(&bin, &st.dir, &node.name, &st.mount, log)?;
    st.nodes[i].init = Some(pending.proc);
    st.save()?;
    pending.commit()
}

/// Starts node `i`'s daemon inside its namespaces, and records it.
fn spawn_node_daemon(st: &mut State, i: usize, append: bool) -> anyhow::Result<()> {
    let node = &st.nodes[i];
    let init = node
        .init
        .with_context(|| format!("node {} has no init", node.name))?;
    match std::fs::remove_file(&node.ready_file) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", node.ready_file.display()));
        }
        _ => {}
    }
    let log = open_log(&node.daemon.log, append, &node.name)?;
    let cmd = daemon_command(&node.daemon, log)?;
    let spawned = NodeNs::open(init)?.spawn(cmd, Path::new("/"))?;
    st.nodes[i].daemon.proc = spawned.host;
    st.save()
}

/// Whether node `n` is ready: its daemon runs, has written its ready
/// file, and its FUSE mount is up.
pub fn node_ready(n: &state::Node, mount: &Path) -> bool {
    n.daemon.proc.is_some_and(|p| p.is_alive())
        && n.ready_file.exists()
        && n.init.is_some_and(|init| ns::node_mounted(init, mount))
}

/// Waits until the nodes `idx` are ready; names the first that is not.
fn wait_nodes_ready(st: &State, idx: &[usize], timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    let mut pending = idx.to_vec();
    loop {
        pending.retain(|&i| !node_ready(&st.nodes[i], &st.mount));
        let Some(&first) = pending.first() else {
            return Ok(());
        };
        for &i in &pending {
            let n = &st.nodes[i];
            let why = if !n.init.is_some_and(|p| p.is_alive()) {
                format!("its namespaces' init exited (see {})", n.init_log.display())
            } else if !n.daemon.proc.is_some_and(|p| p.is_alive()) {
                "its daemon exited".to_string()
            } else {
                continue;
            };
            bail!(
                "node {} did not start: {why}\n{}",
                n.name,
                quote_log(&n.daemon.log)
            );
        }
        if Instant::now() >= end {
            let n = &st.nodes[first];
            let why = if n.ready_file.exists() {
                "not mounted"
            } else {
                "no ready file"
            };
            bail!(
                "node {} is not ready after {}s ({why} yet)\n{}",
                n.name,
                timeout.as_secs_f64(),
                quote_log(&n.daemon.log)
            );
        }
        std::thread::sleep(POLL);
    }
}

fn quote_log(log: &Path) -> String {
    format!(
        "--- last lines of {} ---\n{}\n---",
        log.display(),
        procs::tail(log, TAIL_LINES)
    )
}

/// `cluster start TARGET`: starts one daemon again with its recorded
/// command line; a node's in its existing namespaces, after lazily
/// detaching the dead mount its killed daemon left.
pub fn start(dir: &Path, target: &str, timeout: Duration) -> anyhow::Result<String> {
    let _lock = DirLock::acquire(dir)?;
    let mut st = super::load(dir)?;
    if target == "meta" {
        if let Some(p) = st.meta.proc.filter(ProcRef::is_alive) {
            bail!("meta is already running (pid {})", p.pid);
        }
        start_meta(&mut st, true, timeout)?;
        return Ok(format!("started meta (pid {})", pid_text(st.meta.proc)));
    }
    let i = st.node_index(target)?;
    let n = &st.nodes[i];
    if let Some(p) = n.daemon.proc.filter(ProcRef::is_alive) {
        bail!("{target} is already running (pid {})", p.pid);
    }
    let init = n.init.filter(ProcRef::is_alive).with_context(|| {
        format!("the namespaces of {target} are gone (its init died); run `migfs cluster down` and `up` again")
    })?;
    NodeNs::open(init)?.detach_fuse(&st.mount)?;
    spawn_node_daemon(&mut st, i, true)?;
    wait_nodes_ready(&st, &[i], timeout)?;
    Ok(format!(
        "started {target} (pid {})",
        pid_text(st.nodes[i].daemon.proc)
    ))
}

fn pid_text(p: Option<ProcRef>) -> String {
    p.map_or_else(|| "?".into(), |p| p.pid.to_string())
}
