//! Crash recovery: the real server runs in a child process (this test
//! binary re-executed in the server role) on a sled database and is killed
//! with SIGKILL; a restarted server must find every synced change, and
//! after a kill at a random moment of a create/rename/unlink storm the
//! database must be consistent (every batch fully applied or not at all).
//!
//! Own `main` (harness = false) so the child role needs no test filter
//! tricks. Set `MIGFS_CRASH_SEED` to replay a storm.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use migfs_meta::{Config, MetaDb, SledStore, WriteBehind};
use migfs_proto::auth::{Present, Secret};
use migfs_proto::meta::{self as pb, meta_client::MetaClient};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

const ROLE_ENV: &str = "MIGFS_META_CRASH_CHILD_DB";
const SECRET: &str = "crash-secret";
const ROOT: u64 = 1;

type Client = MetaClient<InterceptedService<Channel, Present>>;

fn main() {
    if let Ok(db) = std::env::var(ROLE_ENV) {
        child_server(Path::new(&db));
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    type Test = fn() -> Result<()>;
    let tests: [(&str, Test); 2] = [
        ("synced_tree_survives_kill_9", synced_tree_survives_kill_9),
        ("kill_9_during_a_storm_leaves_a_consistent_db", storm),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let start = Instant::now();
        match std::panic::catch_unwind(test) {
            Ok(Ok(())) => println!("test {name} ... ok ({:.1?})", start.elapsed()),
            Ok(Err(e)) => {
                failed += 1;
                println!("test {name} ... FAILED: {e:#}");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED (panicked)");
            }
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}

/// The child role: serve the database until killed.
fn child_server(db: &Path) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // The server's own store (as `migfs meta` opens it): memory in
        // front, every change logged, sled written behind.
        let disk = Arc::new(SledStore::open(db).expect("open db"));
        let store = Arc::new(WriteBehind::open_logged(disk, db).expect("load db"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("LISTEN {}", listener.local_addr().expect("addr"));
        let config = Config {
            lease: Duration::from_secs(600),
            ..Config::default()
        };
        let secret = Secret::new(SECRET).expect("secret");
        migfs_meta::server::run(store, config, listener, secret, std::future::pending())
            .await
            .expect("serve");
    });
}

/// A server child process; dropped = killed and reaped.
struct ServerChild {
    child: Child,
    addr: SocketAddr,
}

impl ServerChild {
    fn start(db: &Path) -> Result<ServerChild> {
        let mut child = Command::new(std::env::current_exe()?)
            .env(ROLE_ENV, db)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning the server child")?;
        let out = child.stdout.take().context("child stdout")?;
        let mut guard = ServerChild {
            child,
            addr: "127.0.0.1:0".parse()?,
        };
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        guard.addr = line
            .trim()
            .strip_prefix("LISTEN ")
            .with_context(|| format!("child said {line:?}"))?
            .parse()?;
        Ok(guard)
    }

    /// SIGKILL, and wait until the process is gone (sled's lock released).
    fn kill_9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(addr: SocketAddr) -> Result<Client> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(MetaClient::with_interceptor(
        ch,
        Present(Secret::new(SECRET)?),
    ))
}

async fn register(c: &mut Client, name: &str) -> Result<u64> {
    let req = pb::RegisterNodeRequest {
        name: name.into(),
        ..Default::default()
    };
    Ok(c.register_node(req).await?.into_inner().session_id)
}

fn fsck(db: &Path) -> Result<()> {
    // Opened as the server would be after the crash: the change log's
    // records the store lacks are applied first.
    let disk = Arc::new(SledStore::open(db)?);
    let store = Arc::new(WriteBehind::open_logged(disk, db)?);
    let db = MetaDb::open(store, Config::default())?;
    let problems = db.read(|s| migfs_meta::fsck::check(s))?;
    ensure!(
        problems.is_empty(),
        "inconsistent after the crash: {problems:#?}"
    );
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn synced_tree_survives_kill_9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rt = runtime()?;
    let server = ServerChild::start(dir.path())?;
    let addr = server.addr;
    let made = rt.block_on(async {
        let mut c = connect(addr).await?;
        let sid = register(&mut c, "n").await?;
        let mut made = Vec::new();
        for d in 0..4 {
            let mk = pb::MknodRequest {
                session_id: sid,
                parent: ROOT,
                name: format!("d{d}").into(),
                mode: 0o755,
                ..Default::default()
            };
            let dir = c.mkdir(mk).await?.into_inner().attr.expect("attributes");
            for f in 0..50 {
                let name = format!("f{f}");
                let mk = pb::MknodRequest {
                    session_id: sid,
                    parent: dir.ino,
                    name: name.clone().into(),
                    mode: 0o100_600,
                    ..Default::default()
                };
                let a = c.mknod(mk).await?.into_inner().attr.expect("attributes");
                let blocks = vec![pb::BlockRef {
                    index: 0,
                    hash: vec![f; 32],
                    len: u32::from(f) + 1,
                    holders: vec![],
                }];
                let commit = pb::CommitBlocksRequest {
                    session_id: sid,
                    ino: a.ino,
                    blocks,
                    holders: vec![1],
                    min_size: u64::from(f) + 1,
                    ..Default::default()
                };
                c.commit_blocks(commit).await?;
                made.push((dir.ino, name, a.ino, u64::from(f) + 1));
            }
        }
        c.sync(pb::Empty {}).await?;
        anyhow::Ok(made)
    })?;
    server.kill_9()?;
    fsck(dir.path())?;
    let server = ServerChild::start(dir.path())?;
    let addr = server.addr;
    rt.block_on(async {
        let mut c = connect(addr).await?;
        for (parent, name, ino, size) in &made {
            let a = c
                .lookup(pb::LookupRequest {
                    session_id: 0,
                    parent: *parent,
                    name: name.clone().into(),
                })
                .await?
                .into_inner();
            ensure!(
                a.ino == *ino && a.size == *size,
                "{name} in {parent}: {a:?}"
            );
        }
        let st = c.stat_fs(pb::Empty {}).await?.into_inner();
        ensure!(st.files == 205, "{} inodes after restart", st.files);
        anyhow::Ok(())
    })?;
    server.kill_9()?;
    fsck(dir.path())
}

/// xorshift64*: enough randomness for a storm, replayable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn name(&mut self) -> String {
        format!("n{}", self.below(12))
    }
}

fn storm() -> Result<()> {
    let seed = match std::env::var("MIGFS_CRASH_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => {
            u64::from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .subsec_nanos(),
            ) << 20
                | u64::from(std::process::id())
                | 1
        }
    };
    println!("storm seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let rt = runtime()?;
    let mut total_ops = 0;
    for round in 0..6 {
        let server = ServerChild::start(dir.path())?;
        let addr = server.addr;
        let kill_after = Duration::from_millis(150 + rng.below(700));
        let seeds: Vec<u64> = (0..3).map(|_| rng.next() | 1).collect();
        let ops = rt.block_on(async move {
            let mut tasks = Vec::new();
            for (w, s) in seeds.into_iter().enumerate() {
                tasks.push(tokio::spawn(worker(addr, w, Rng(s))));
            }
            tokio::time::sleep(kill_after).await;
            tasks
        });
        // Kill while the workers are still issuing requests.
        server.kill_9()?;
        let mut done = 0;
        for t in ops {
            done += rt.block_on(t)?;
        }
        total_ops += done;
        fsck(dir.path())
            .with_context(|| format!("round {round} (seed {seed}), killed after {kill_after:?}"))?;
    }
    if total_ops < 50 {
        bail!("the storm only managed {total_ops} operations before the kills");
    }
    println!("storm: {total_ops} operations over 6 kills");
    Ok(())
}

/// Random namespace operations until the server dies; returns how many
/// were answered. Errors the operations may legitimately return (ENOENT,
/// EEXIST, ...) are ignored; the check is the consistency afterwards.
async fn worker(addr: SocketAddr, w: usize, mut rng: Rng) -> usize {
    let Ok(mut c) = connect(addr).await else {
        return 0;
    };
    let Ok(sid) = register(&mut c, &format!("w{w}")).await else {
        return 0;
    };
    let mut done = 0;
    let mut open: Vec<u64> = Vec::new();
    loop {
        let r = one_op(&mut c, sid, &mut rng, &mut open).await;
        match r {
            Err(st) if migfs_proto::errno::of(&st).is_none() => return done,
            _ => done += 1,
        }
    }
}

async fn dir_of(c: &mut Client, rng: &mut Rng) -> u64 {
    if rng.below(3) == 0 {
        return ROOT;
    }
    let req = pb::LookupRequest {
        session_id: 0,
        parent: ROOT,
        name: format!("d{}", rng.below(3)).into(),
    };
    match c.lookup(req).await {
        Ok(a) if a.get_ref().mode & 0o170_000 == 0o040_000 => a.into_inner().ino,
        _ => ROOT,
    }
}

async fn one_op(
    c: &mut Client,
    sid: u64,
    rng: &mut Rng,
    open: &mut Vec<u64>,
) -> Result<(), tonic::Status> {
    let p = dir_of(c, rng).await;
    let name: Vec<u8> = if p == ROOT && rng.below(2) == 0 {
        format!("d{}", rng.below(3)).into()
    } else {
        rng.name().into()
    };
    match rng.below(10) {
        0 | 1 => {
            let opened = rng.below(3) == 0;
            let req = pb::MknodRequest {
                session_id: sid,
                parent: p,
                name,
                mode: 0o100_644,
                open: opened,
                ..Default::default()
            };
            let a = c.mknod(req).await?.into_inner().attr.expect("attributes");
            if opened {
                open.push(a.ino);
            }
        }
        2 => {
            c.mkdir(pb::MknodRequest {
                session_id: sid,
                parent: p,
                name,
                mode: 0o755,
                ..Default::default()
            })
            .await?;
        }
        3 | 4 => {
            let np = dir_of(c, rng).await;
            let flags = [0, 0, 1, 2][usize::try_from(rng.below(4)).unwrap_or(0)];
            let req = pb::RenameRequest {
                session_id: sid,
                parent: p,
                name,
                new_parent: np,
                new_name: rng.name().into(),
                flags,
            };
            c.rename(req).await?;
        }
        5 => {
            c.unlink(pb::NameRequest {
                session_id: sid,
                parent: p,
                name,
            })
            .await?;
        }
        6 => {
            c.rmdir(pb::NameRequest {
                session_id: sid,
                parent: p,
                name,
            })
            .await?;
        }
        7 => {
            let a = c
                .lookup(pb::LookupRequest {
                    parent: p,
                    name,
                    session_id: 0,
                })
                .await?
                .into_inner();
            let np = dir_of(c, rng).await;
            c.link(pb::LinkRequest {
                session_id: sid,
                ino: a.ino,
                new_parent: np,
                new_name: rng.name().into(),
            })
            .await?;
        }
        8 => {
            let a = c
                .lookup(pb::LookupRequest {
                    parent: p,
                    name,
                    session_id: 0,
                })
                .await?
                .into_inner();
            let h = u8::try_from(rng.below(8)).unwrap_or(0);
            let blocks = vec![pb::BlockRef {
                index: rng.below(4),
                hash: vec![h; 32],
                len: 4096,
                holders: vec![],
            }];
            let req = pb::CommitBlocksRequest {
                session_id: sid,
                ino: a.ino,
                blocks,
                holders: vec![1],
                min_size: 4096,
                ..Default::default()
            };
            c.commit_blocks(req).await?;
            if rng.below(2) == 0 {
                c.open(pb::OpenRequest {
                    session_id: sid,
                    ino: a.ino,
                })
                .await?;
                open.push(a.ino);
            }
        }
        _ => {
            if let Some(ino) = open.pop() {
                c.release(pb::ReleaseRequest {
                    session_id: sid,
                    ino,
                    also: Vec::new(),
                })
                .await?;
            } else {
                c.sync(pb::Empty {}).await?;
            }
        }
    }
    Ok(())
}
