//! The node daemon: registers with the metadata server, serves the block
//! store, mounts the filesystem, and runs the background loops
//! (heartbeat, pushed invalidations, periodic publish of written data,
//! garbage collection) until shut down.

use std::ffi::OsStr;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, INodeNo, Session, SessionACL};
use migfs_proto::auth::{Check, Secret};
use migfs_proto::block::blocks_server::BlocksServer;
use migfs_proto::ids::BlockHash;
use migfs_proto::meta::invalidation::Kind;
use migfs_proto::meta::{
    GcClaimRequest, GcDoneRequest, HeartbeatRequest, Invalidation, OpenRequest,
    RegisterNodeRequest, WatchRequest,
};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;

use crate::blocks::BlockStore;
use crate::blocks::local::LocalStore;
use crate::blocks::server::BlockService;
use crate::error::{FsError, Result};
use crate::fuse::data::DataCtx;
use crate::fuse::{MigFs, Shared, Ttls};
use crate::meta_client::Meta;

/// Everything `migfs node` is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name (stable across restarts).
    pub name: String,
    /// Metadata server URL.
    pub meta_url: String,
    /// Address the block (and later agent) service listens on.
    pub listen: SocketAddr,
    /// Where the filesystem is mounted.
    pub mount: PathBuf,
    /// The node's data directory (block store).
    pub data: PathBuf,
    /// Cluster secret.
    pub secret: Secret,
    /// How long metadata calls retry before failing with EIO.
    pub meta_retry: Duration,
    /// Memory block cache size in bytes.
    pub cache_bytes: usize,
    /// User-space metadata cache TTL.
    pub cache_ttl: Duration,
    /// Kernel TTLs.
    pub ttls: Ttls,
    /// FUSE worker threads.
    pub fuse_threads: usize,
    /// fsync also syncs the block store's disk (see `DataCtx::fsync_blocks`).
    pub fsync_blocks: bool,
    /// Written (with the mount path) once the node is mounted and registered.
    pub ready_file: Option<PathBuf>,
}

/// Who this node is, for the services it hosts beside the block store
/// (the migration agent, which lives in another crate).
#[derive(Clone)]
pub struct NodeIdentity {
    /// Node name.
    pub name: String,
    /// Node id the metadata server gave.
    pub node_id: u64,
    /// The node's current session (it changes when the node re-registers).
    pub session: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Address of the node's services.
    pub listen: SocketAddr,
    /// Mount point.
    pub mount: PathBuf,
    /// Data directory.
    pub data: PathBuf,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("node_id", &self.node_id)
            .field("session", &(self.session)())
            .finish()
    }
}

/// Adds services to the node's routes (which hold the block service) and
/// returns them with lines for `/.migfs/stats` (e.g. where the agent's
/// local socket is).
pub type ServicesHook = Box<
    dyn FnOnce(
            NodeIdentity,
            tonic::service::Routes,
        ) -> (tonic::service::Routes, Vec<(String, String)>)
        + Send,
>;

/// Registration results the loops need.
#[derive(Debug, Clone, Copy)]
struct Lease {
    lease: Duration,
}

/// Runs the node until `shutdown` completes or the mount goes away.
pub async fn run(
    cfg: NodeConfig,
    services: Option<ServicesHook>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let store = LocalStore::open(&cfg.data)?;
    let meta = Arc::new(Meta::new(
        &cfg.meta_url,
        cfg.secret.clone(),
        cfg.meta_retry,
    )?);
    let blocks = Arc::new(BlockStore::new(
        store,
        cfg.cache_bytes,
        cfg.secret.clone(),
        Arc::clone(&meta),
    ));
    let (block_size, lease) = register(&cfg, &meta, &blocks).await?;
    blocks.refresh_peers().await;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| FsError::io(format!("listen on {}", cfg.listen), e))?;
    let svc = tonic::service::interceptor::InterceptedService::new(
        BlocksServer::new(BlockService::new(Arc::clone(&blocks)))
            .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES),
        Check(cfg.secret.clone()),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut srv_stop = stop_rx.clone();
    let mut routes = tonic::service::Routes::new(svc);
    let mut info = Vec::new();
    if let Some(hook) = services {
        let m = Arc::clone(&meta);
        (routes, info) = hook(
            NodeIdentity {
                name: cfg.name.clone(),
                node_id: blocks.node_id(),
                session: Arc::new(move || m.session()),
                listen: cfg.listen,
                mount: cfg.mount.clone(),
                data: cfg.data.clone(),
            },
            routes,
        );
    }
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(migfs_proto::STREAM_WINDOW)
            .initial_connection_window_size(migfs_proto::CONNECTION_WINDOW)
            .max_frame_size(migfs_proto::MAX_FRAME)
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                // Nagle off on accepted connections too (`tcp_nodelay`
                // above only applies to listeners tonic binds itself):
                // with it on, a reply split in two writes waited for the
                // peer's delayed ACK, 40 ms.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    let _ = srv_stop.changed().await;
                },
            ),
    );
    let data = DataCtx {
        meta: Arc::clone(&meta),
        blocks: Arc::clone(&blocks),
        block_size: u64::from(block_size),
        upload_slots: Arc::new(Semaphore::new(1024)),
        cache: Arc::new(crate::cache::MetaCache::new(cfg.cache_ttl)),
        fsync_blocks: cfg.fsync_blocks,
    };
    let mut shared = Shared::new(data, cfg.ttls);
    shared.info = info;
    let shared = Arc::new(shared);
    shared.dirops.start();
    let fuse_done = mount_fuse(&cfg, &shared)?;
    tracing::info!(node = %cfg.name, mount = %cfg.mount.display(), listen = %cfg.listen, "node ready");
    if let Some(f) = &cfg.ready_file {
        std::fs::write(f, format!("{}\n", cfg.mount.display()))
            .map_err(|e| FsError::io(format!("write ready file {}", f.display()), e))?;
    }
    let loops = [
        tokio::spawn(heartbeat_loop(cfg.clone(), Arc::clone(&shared), lease)),
        tokio::spawn(watch_loop(Arc::clone(&shared))),
        tokio::spawn(flush_loop(Arc::clone(&shared))),
        tokio::spawn(gc_loop(Arc::clone(&shared))),
    ];
    tokio::select! {
        () = shutdown => tracing::info!("shutting down"),
        _ = fuse_done => tracing::warn!("the FUSE session ended (unmounted from outside?)"),
    }
    publish_all(&shared).await;
    shared.dirops.give_back_all();
    if let Err(e) = shared.dirops.drain().await {
        tracing::error!(error = %e, "directory operations answered here were not all sent");
    }
    crate::mount::unmount(&cfg.mount);
    let _ = stop_tx.send(true);
    for l in loops {
        l.abort();
    }
    let _ = server.await;
    Ok(())
}

/// Mounts and starts the FUSE session threads; the returned receiver fires
/// when the session ends.
fn mount_fuse(
    cfg: &NodeConfig,
    shared: &Arc<Shared>,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let fd = crate::mount::mount(&cfg.mount)?;
    let fs = MigFs::new(tokio::runtime::Handle::current(), Arc::clone(shared));
    let mut config = Config::default();
    config.n_threads = Some(cfg.fuse_threads.max(1));
    config.clone_fd = true;
    let session = Session::from_fd(fs, fd, SessionACL::All, config).map_err(|e| {
        crate::mount::unmount(&cfg.mount);
        FsError::io("FUSE handshake", e)
    })?;
    let _ = shared.notifier.set(session.notifier());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            if let Err(e) = session.run() {
                tracing::error!(error = %e, "FUSE session failed");
            }
            let _ = tx.send(());
        })
        .map_err(|e| FsError::io("start FUSE session thread", e))?;
    Ok(rx)
}

async fn register(cfg: &NodeConfig, meta: &Meta, blocks: &BlockStore) -> Result<(u32, Lease)> {
    let (capacity, free) = blocks.local.usage();
    let req = RegisterNodeRequest {
        name: cfg.name.clone(),
        addr: cfg.listen.to_string(),
        capacity_bytes: capacity,
        free_bytes: free,
    };
    let r = meta
        .call("register node", |mut c| {
            let req = req.clone();
            async move { c.register_node(req).await }
        })
        .await?;
    meta.set_session(r.session_id);
    blocks.set_identity(r.node_id, r.replicas);
    tracing::info!(node = %cfg.name, node_id = r.node_id, session = r.session_id, block_size = r.block_size, "registered");
    if r.block_size == 0 {
        return Err(FsError::Invalid("metadata server sent block size 0".into()));
    }
    let lease = Lease {
        lease: Duration::from_millis(u64::from(r.lease_ms.max(1000))),
    };
    Ok((r.block_size, lease))
}

/// Extends the session's lease; re-registers (and re-opens what is open
/// here) when the server no longer knows the session.
async fn heartbeat_loop(cfg: NodeConfig, sh: Arc<Shared>, mut lease: Lease) {
    let meta = Arc::clone(&sh.data.meta);
    let blocks = Arc::clone(&sh.data.blocks);
    loop {
        tokio::time::sleep(lease.lease / 4).await;
        let (capacity, free) = blocks.local.usage();
        let req = HeartbeatRequest {
            session_id: meta.session(),
            capacity_bytes: capacity,
            free_bytes: free,
        };
        match meta
            .call("heartbeat", |mut c| async move { c.heartbeat(req).await })
            .await
        {
            Ok(_) => {}
            Err(FsError::Errno { errno, .. }) if errno == libc::ESTALE => {
                tracing::warn!("session expired at the metadata server; registering again");
                match register(&cfg, &meta, &blocks).await {
                    Ok((_, l)) => {
                        lease = l;
                        reopen_all(&sh).await;
                        sh.dirops.give_back_all();
                        sh.cache.clear();
                    }
                    Err(e) => tracing::error!(error = %e, "re-registration failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        blocks.refresh_peers().await;
    }
}

/// Registers every open handle with a new session.
async fn reopen_all(sh: &Shared) {
    let open: Vec<(u64, u32)> = sh
        .files
        .lock()
        .values()
        .map(|f| (f.ino, f.st.lock().opens))
        .collect();
    for (ino, n) in open {
        for _ in 0..n {
            let req = OpenRequest {
                session_id: sh.data.meta.session(),
                ino,
            };
            if let Err(e) = sh
                .data
                .meta
                .call("reopen", |mut c| async move { c.open(req).await })
                .await
            {
                tracing::warn!(ino, error = %e, "could not re-open a file in the new session");
            }
        }
    }
}

/// Applies the invalidations the server pushes, reconnecting as needed;
/// after any gap every cached entry is dropped.
async fn watch_loop(sh: Arc<Shared>) {
    let notes = sh.notifier.get().cloned().map(KernelNotes::start);
    loop {
        let req = WatchRequest {
            session_id: sh.data.meta.session(),
        };
        let mut raw = sh.data.meta.raw();
        match raw.watch(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(inv) => apply(&sh, notes.as_ref(), inv),
                        Err(st) => {
                            tracing::debug!(code = ?st.code(), "watch stream error");
                            break;
                        }
                    }
                }
            }
            Err(st) => tracing::debug!(code = ?st.code(), message = st.message(), "watch failed"),
        }
        forget_everything(&sh);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn forget_everything(sh: &Shared) {
    // What this node knew of its delegated directories may be stale too
    // (the server may have restarted): ask the server again from now on.
    sh.dirops.give_back_all();
    sh.cache.clear();
    for f in sh.files.lock().values() {
        f.invalidate_map();
    }
}

fn apply(sh: &Shared, notes: Option<&KernelNotes>, inv: Invalidation) {
    match Kind::try_from(inv.kind) {
        Ok(Kind::Inode) => {
            sh.cache.drop_attr(inv.ino);
            if let Some(f) = sh.files.lock().get(&inv.ino) {
                f.invalidate_map();
            }
            if let Some(n) = notes {
                n.send(Note::Inode(inv.ino));
            }
        }
        Ok(Kind::Entry) => {
            let name = OsStr::from_bytes(&inv.name).to_os_string();
            sh.cache.drop_entry(inv.parent, &name);
            sh.cache.drop_attr(inv.parent);
            sh.cache.listing_forget(inv.parent);
            if let Some(n) = notes {
                n.send(Note::Entry(inv.parent, name));
            }
        }
        Ok(Kind::All) => forget_everything(sh),
        Ok(Kind::Recall) => sh.dirops.recall(inv.ino),
        Ok(Kind::ForgetDir) => {
            sh.cache.forget_dir(inv.ino);
            if let Some(n) = notes {
                n.send(Note::Inode(inv.ino));
            }
        }
        _ => tracing::debug!(kind = inv.kind, "unknown invalidation ignored"),
    }
}

/// One invalidation for the kernel's caches.
#[derive(Debug, PartialEq, Eq, Hash)]
enum Note {
    Inode(u64),
    Entry(u64, std::ffi::OsString),
}

/// The kernel's side of invalidations, on a thread of its own: a
/// notification can block (the kernel may need a lock a FUSE request
/// holds), so never on the runtime, and not a blocking-pool hand-off for
/// each one either. What queued up is sent once each (a burst of creates in
/// one directory invalidates that directory once).
struct KernelNotes {
    tx: std::sync::mpsc::Sender<Note>,
}

impl KernelNotes {
    fn start(n: fuser::Notifier) -> KernelNotes {
        let (tx, rx) = std::sync::mpsc::channel::<Note>();
        let spawned = std::thread::Builder::new()
            .name("kernel-inval".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let queued: std::collections::HashSet<Note> =
                        std::iter::once(first).chain(rx.try_iter()).collect();
                    for note in queued {
                        // ENOENT (the kernel does not know it) is fine.
                        let _ = match note {
                            Note::Inode(ino) => n.inval_inode(INodeNo(ino), 0, 0),
                            Note::Entry(parent, name) => n.inval_entry(INodeNo(parent), &name),
                        };
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no kernel invalidation thread: kernel caches live out their TTL");
        }
        KernelNotes { tx }
    }

    fn send(&self, note: Note) {
        let _ = self.tx.send(note);
    }
}

/// Publishes data written more than a second ago (mmap writes, long-open
/// writers), so it does not wait for close.
async fn flush_loop(sh: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let old: Vec<_> = sh
            .files
            .lock()
            .values()
            .filter(|f| {
                f.st.lock()
                    .dirty_since
                    .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
            })
            .cloned()
            .collect();
        for f in old {
            if let Err(e) = sh.data.flush(&f).await {
                tracing::warn!(ino = f.ino, error = %e, "periodic publish failed");
            }
        }
    }
}

async fn publish_all(sh: &Shared) {
    let all: Vec<_> = sh.files.lock().values().cloned().collect();
    for f in all {
        if f.is_dirty()
            && let Err(e) = sh.data.flush(&f).await
        {
            tracing::error!(ino = f.ino, error = %e, "unpublished data lost at shutdown");
        }
    }
}

/// Deletes this node's copies of blocks no inode references any more.
async fn gc_loop(sh: Arc<Shared>) {
    let meta = Arc::clone(&sh.data.meta);
    let blocks = Arc::clone(&sh.data.blocks);
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let node_id = blocks.node_id();
        let claim = GcClaimRequest {
            node_id,
            limit: 4096,
        };
        let Ok(r) = meta
            .call("gc claim", |mut c| async move { c.gc_claim(claim).await })
            .await
        else {
            continue;
        };
        if r.hashes.is_empty() {
            continue;
        }
        let b2 = Arc::clone(&blocks);
        // A pinned block is about to be referenced again: keep it, and do
        // not report it, so it is claimed again if it stays unreferenced.
        let collected = tokio::task::spawn_blocking(move || {
            let mut done = Vec::new();
            for raw in r.hashes {
                let Ok(h) = BlockHash::try_from(raw.as_slice()) else {
                    continue;
                };
                if b2.local.collect(&h) {
                    b2.cache.remove(&h);
                    b2.stats
                        .blocks_collected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    done.push(raw);
                }
            }
            done
        })
        .await
        .unwrap_or_default();
        if collected.is_empty() {
            continue;
        }
        let done = GcDoneRequest {
            node_id,
            hashes: collected,
        };
        if let Err(e) = meta
            .call("gc done", |mut c| {
                let done = done.clone();
                async move { c.gc_done(done).await }
            })
            .await
        {
            tracing::warn!(error = %e, "gc done not recorded");
        }
    }
}
