//! The cluster dir: its layout and `cluster.json`, the record of what
//! `cluster up` started. Every process is written there as soon as it
//! exists, so `cluster down` can remove it even after `up` crashed.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::procs::ProcRef;

/// Version of the `cluster.json` format.
const VERSION: u32 = 1;

/// The metadata server's address; nodes take the following ones.
pub const META_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

/// Loopback address of node `i` (1-based): 127.0.0.(10 + i).
pub fn node_ip(i: usize) -> Option<Ipv4Addr> {
    let last = u8::try_from(10 + i).ok().filter(|b| *b < 255)?;
    Some(Ipv4Addr::new(127, 0, 0, last))
}

/// One daemon: how to start it again and, once started, which process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Daemon {
    /// Where it listens.
    pub addr: SocketAddrV4,
    /// Its command line (program first).
    pub argv: Vec<String>,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
    /// Environment set for it on every start: the `MIGFS_*` and `RUST_*`
    /// variables `cluster up` had, so `cluster start` restarts it alike.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The running process, if one was started.
    pub proc: Option<ProcRef>,
}

/// One node: the init holding its namespaces, and its daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    /// Node name, also its hostname (n1, n2, ...).
    pub name: String,
    /// PID 1 of the node's PID namespace, once created.
    pub init: Option<ProcRef>,
    /// The init's log.
    pub init_log: PathBuf,
    /// The file `migfs node` writes once mounted and registered.
    pub ready_file: PathBuf,
    /// `migfs node`.
    pub daemon: Daemon,
}

/// Everything `cluster up` started in one cluster dir.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// The cluster dir (absolute).
    pub dir: PathBuf,
    /// The port every daemon of this cluster listens on.
    pub port: u16,
    /// Where each node mounts the filesystem.
    pub mount: PathBuf,
    /// The cluster secret file.
    pub secret_file: PathBuf,
    /// `migfs meta`.
    pub meta: Daemon,
    /// The nodes, n1 first.
    pub nodes: Vec<Node>,
}

/// Paths inside a cluster dir.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

/// The dir of daemon logs.
pub fn logs_dir(dir: &Path) -> PathBuf {
    dir.join("logs")
}

impl State {
    /// Reads `dir/cluster.json`; `None` if there is no cluster there.
    pub fn load(dir: &Path) -> anyhow::Result<Option<State>> {
        let path = state_file(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let state: State =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        if state.version != VERSION {
            bail!(
                "{} has format version {}, this migfs reads {VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(Some(state))
    }

    /// Writes `cluster.json` atomically (temp file + rename).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = state_file(&self.dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).context("encode the cluster state")?;
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }

    /// Removes `cluster.json`: no cluster is recorded here any more.
    pub fn remove(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(state_file(&self.dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("remove {}", state_file(&self.dir).display()))
            }
            _ => Ok(()),
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| self.unknown(name))
    }

    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| self.unknown(name))
    }

    fn unknown(&self, name: &str) -> String {
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        format!(
            "no node {name:?} in the cluster at {} (nodes: {})",
            self.dir.display(),
            names.join(", ")
        )
    }

    /// A state with no nodes, for unit tests of code that reads states.
    #[cfg(test)]
    pub fn for_test(dir: &Path, port: u16) -> State {
        State {
            version: VERSION,
            dir: dir.to_path_buf(),
            port,
            mount: PathBuf::from("/migfs"),
            secret_file: dir.join("secret"),
            meta: Daemon {
                addr: SocketAddrV4::new(META_IP, port),
                argv: vec![],
                log: dir.join("meta.log"),
                env: vec![],
                proc: None,
            },
            nodes: vec![],
        }
    }
}

/// Builds the record of a new cluster (nothing started yet).
pub struct Plan<'a> {
    /// Cluster dir (absolute).
    pub dir: &'a Path,
    /// The `migfs` binary the daemons run.
    pub bin: &'a Path,
    /// Port for every daemon.
    pub port: u16,
    /// Number of nodes.
    pub nodes: usize,
    /// Mount path inside each node.
    pub mount: &'a Path,
    /// Environment for every daemon (see [`Daemon::env`]).
    pub env: Vec<(String, String)>,
}

/// The variables of this process's environment a daemon keeps across
/// restarts: `MIGFS_*` and `RUST_*` (logging, timeouts, backtraces).
pub fn daemon_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("MIGFS_") || k.starts_with("RUST_"))
        .collect()
}

/// A path as a command-line argument (the testbed's paths are UTF-8).
fn arg(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

impl Plan<'_> {
    /// The state before anything runs: addresses, command lines, logs.
    pub fn state(&self) -> anyhow::Result<State> {
        let nodes = (1..=self.nodes)
            .map(|i| self.node(i))
            .collect::<anyhow::Result<_>>()?;
        Ok(State {
            version: VERSION,
            dir: self.dir.to_path_buf(),
            port: self.port,
            mount: self.mount.to_path_buf(),
            secret_file: self.secret_file(),
            meta: self.meta()?,
            nodes,
        })
    }

    fn secret_file(&self) -> PathBuf {
        self.dir.join("secret")
    }

    fn meta_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(META_IP, self.port)
    }

    fn meta(&self) -> anyhow::Result<Daemon> {
        let addr = self.meta_addr();
        #[rustfmt::skip]
        let argv = vec![
            arg(self.bin)?, "meta".into(),
            "--db".into(), arg(&self.dir.join("meta").join("db"))?,
            "--listen".into(), addr.to_string(),
            "--secret-file".into(), arg(&self.secret_file())?,
        ];
        let log = logs_dir(self.dir).join("meta.log");
        Ok(Daemon {
            addr,
            argv,
            log,
            env: self.env.clone(),
            proc: None,
        })
    }

    /// Node `i` (1-based): n<i> on 127.0.0.<10 + i>.
    fn node(&self, i: usize) -> anyhow::Result<Node> {
        let name = format!("n{i}");
        let ip = node_ip(i)
            .with_context(|| format!("too many nodes: no loopback address for {name}"))?;
        let addr = SocketAddrV4::new(ip, self.port);
        let ndir = self.dir.join("nodes").join(&name);
        let ready_file = ndir.join("ready");
        #[rustfmt::skip]
        let argv = vec![
            arg(self.bin)?, "node".into(),
            "--name".into(), name.clone(),
            "--meta".into(), format!("http://{}", self.meta_addr()),
            "--listen".into(), addr.to_string(),
            "--mount".into(), arg(self.mount)?,
            "--data".into(), arg(&ndir.join("data"))?,
            "--secret-file".into(), arg(&self.secret_file())?,
            "--ready-file".into(), arg(&ready_file)?,
        ];
        let logs = logs_dir(self.dir);
        let daemon = Daemon {
            addr,
            argv,
            log: logs.join(format!("{name}.log")),
            env: self.env.clone(),
            proc: None,
        };
        let init_log = logs.join(format!("{name}-init.log"));
        Ok(Node {
            name,
            init: None,
            init_log,
            ready_file,
            daemon,
        })
    }
}

/// Exclusive lock on a cluster dir, held by `up`, `down`, `kill` and
/// `start` while they change it. Released on drop (or when the holder dies).
pub struct DirLock(#[allow(dead_code)] Flock<File>);

impl DirLock {
    /// Waits for the lock on `dir`.
    pub fn acquire(dir: &Path) -> anyhow::Result<DirLock> {
        let path = dir.join("lock");
        let file = File::create(&path).with_context(|| format!("open {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("lock {}", path.display()))?;
        Ok(DirLock(lock))
    }
}

/// Creates the secret file: 32 random bytes as hex, mode 0600.
pub fn write_secret(path: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(f, "{hex}").with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_gives_each_node_its_address_and_paths() {
        let dir = Path::new("/tmp/c");
        let plan = Plan {
            dir,
            bin: Path::new("/bin/migfs"),
            port: 21000,
            nodes: 2,
            mount: Path::new("/migfs"),
            env: vec![("MIGFS_LOG".into(), "debug".into())],
        };
        let st = plan.state().unwrap();
        assert_eq!(st.meta.addr.to_string(), "127.0.0.10:21000");
        assert_eq!(st.nodes[1].daemon.addr.to_string(), "127.0.0.12:21000");
        let argv = st.nodes[1].daemon.argv.join(" ");
        assert_eq!(
            argv,
            "/bin/migfs node --name n2 --meta http://127.0.0.10:21000 --listen 127.0.0.12:21000 \
             --mount /migfs --data /tmp/c/nodes/n2/data --secret-file /tmp/c/secret \
             --ready-file /tmp/c/nodes/n2/ready"
        );
        assert_eq!(st.nodes[0].daemon.env, st.meta.env);
        assert_eq!(
            st.meta.env,
            vec![("MIGFS_LOG".to_string(), "debug".to_string())]
        );
        assert_eq!(node_ip(244), Some(Ipv4Addr::new(127, 0, 0, 254)));
        assert_eq!(node_ip(245), None);
    }

    #[test]
    fn state_round_trips_and_secret_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let st = State::for_test(dir.path(), 21001);
        st.save().unwrap();
        assert_eq!(State::load(dir.path()).unwrap().unwrap().port, 21001);
        st.remove().unwrap();
        assert!(State::load(dir.path()).unwrap().is_none());
        let secret = dir.path().join("secret");
        write_secret(&secret).unwrap();
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&secret).unwrap().trim().len(), 64);
    }
}
