//! `migfs cluster`: the local testbed (see [`crate::cluster`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use crate::cluster::{self, Status, UpOptions};

/// Runs a metadata server and K nodes on this machine, each node in its own
/// mount, UTS and PID namespace.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cluster dir: state, secret, data, logs [default: $MIGFS_CLUSTER_DIR,
    /// else /run/migfs/cluster].
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a metadata server and nodes n1..nK; returns once all are ready.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Where each node mounts the filesystem.
        #[arg(long, default_value = "/migfs")]
        mount: PathBuf,
        /// Seconds each daemon may take to become ready.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Stop everything the cluster runs (idempotent).
    Down,
    /// Show each daemon: pid, address, up or down, mounted; exit 3 unless
    /// everything is up.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a node (its namespaces, hostname and mount).
    Exec {
        /// Start it in the background with stdio on /dev/null and print its
        /// PID as the node sees it.
        #[arg(long)]
        detach: bool,
        /// Node name (n1, n2, ...).
        node: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<OsString>,
    },
    /// SIGKILL one daemon: `meta` or a node name (its namespaces stay).
    Kill {
        /// `meta` or a node name.
        target: String,
    },
    /// Start a killed daemon again (a node's in its existing namespaces).
    Start {
        /// `meta` or a node name.
        target: String,
        /// Seconds it may take to become ready.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Print the host's path into a node's mount (/proc/<init>/root/...).
    Path {
        /// Node name.
        node: String,
        /// A path relative to the mount.
        rel: Option<PathBuf>,
    },
    /// PID 1 of a node (started by `up`; not for direct use).
    #[command(hide = true)]
    InitNs {
        /// Node name, set as hostname.
        #[arg(long)]
        name: String,
        /// Mountpoint to create.
        #[arg(long)]
        mount: PathBuf,
    },
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).context("--timeout must be a non-negative number of seconds")
}

/// Runs a `migfs cluster` subcommand. Starts no thread (see
/// [`crate::cluster`]).
pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Cmd::InitNs { name, mount } = &a.cmd {
        return cluster::ns::init_main(name, mount);
    }
    let dir = cluster::resolve_dir(a.dir)?;
    match a.cmd {
        Cmd::Up {
            nodes,
            mount,
            timeout,
        } => {
            let bin = std::env::current_exe().context("find the migfs binary")?;
            let opts = UpOptions {
                dir,
                nodes,
                mount,
                timeout: secs(timeout)?,
                bin,
            };
            let st = cluster::up(&opts)?;
            let status =
                cluster::status(&st.dir)?.context("the cluster vanished right after it started")?;
            print_status(&status);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down => {
            match cluster::down(&dir)? {
                None => println!("no cluster in {}", dir.display()),
                Some(killed) if killed.is_empty() => {
                    println!("cluster in {} removed (nothing was running)", dir.display())
                }
                Some(killed) => println!(
                    "cluster in {} removed: killed {}",
                    dir.display(),
                    killed.join(", ")
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => status(&dir, json),
        Cmd::Exec {
            detach: false,
            node,
            cmd,
        } => {
            let code = cluster::exec(&dir, &node, &cmd)?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        Cmd::Exec {
            detach: true,
            node,
            cmd,
        } => {
            println!("{}", cluster::exec_detached(&dir, &node, &cmd)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Kill { target } => {
            println!("{}", cluster::kill(&dir, &target)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Start { target, timeout } => {
            println!("{}", cluster::start(&dir, &target, secs(timeout)?)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Path { node, rel } => {
            println!("{}", cluster::path(&dir, &node, rel.as_deref())?.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::InitNs { .. } => unreachable!("handled above"),
    }
}

/// Exit code of `status` when some part is down or there is no cluster.
const NOT_ALL_UP: u8 = 3;

fn status(dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let Some(st) = cluster::status(dir)? else {
        if json {
            println!("null");
        } else {
            println!("no cluster in {}", dir.display());
        }
        return Ok(ExitCode::from(NOT_ALL_UP));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&st).context("encode the status")?
        );
    } else {
        print_status(&st);
    }
    Ok(if st.all_up() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NOT_ALL_UP)
    })
}

fn up_down(up: bool) -> &'static str {
    if up { "up" } else { "down" }
}

fn pid(p: Option<i32>) -> String {
    p.map_or_else(|| "-".into(), |p| p.to_string())
}

fn print_status(st: &Status) {
    println!(
        "cluster {}  port {}  mount {}",
        st.dir.display(),
        st.port,
        st.mount.display()
    );
    let m = &st.meta;
    println!(
        "  meta  {:<21} pid {:<8} {:<5} log {}",
        m.addr,
        pid(m.pid),
        up_down(m.up),
        m.log.display()
    );
    for n in &st.nodes {
        let d = &n.daemon;
        let mounted = if n.mounted { "mounted" } else { "not-mounted" };
        let ns = if n.init_up {
            String::new()
        } else {
            "  (namespaces gone)".into()
        };
        let path = n
            .path
            .as_ref()
            .map_or_else(|| "-".into(), |p| p.display().to_string());
        println!(
            "  {:<5} {:<21} pid {:<8} {:<5} {mounted:<11} init {:<8} {path}  log {}{ns}",
            n.name,
            d.addr,
            pid(d.pid),
            up_down(d.up),
            pid(n.init_pid),
            d.log.display()
        );
    }
}
