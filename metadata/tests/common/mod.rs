//! Shared test harness: a real metadata server on 127.0.0.1:0 (in this
//! process, stopped by a Drop guard) and real gRPC clients.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use migfs_meta::{Config, MemStore, MetaDb, MetaStore, SledStore};
use migfs_proto::auth::{Present, Secret};
use migfs_proto::meta::meta_client::MetaClient;
use migfs_proto::meta::{self as pb, Attr};
use tokio::sync::oneshot;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The secret every test server uses.
pub const SECRET: &str = "test-secret";

/// A client presenting the secret.
pub type Client = MetaClient<InterceptedService<Channel, Present>>;

/// A running server; dropping it stops it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub db: Arc<MetaDb>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<migfs_meta::Result<()>>>,
}

impl TestServer {
    /// A server over an in-memory store.
    pub async fn start(config: Config) -> TestServer {
        TestServer::start_on(Arc::new(MemStore::new()), config).await
    }

    /// A server over a sled store in `dir`.
    pub async fn start_sled(dir: &std::path::Path, config: Config) -> TestServer {
        TestServer::start_on(Arc::new(SledStore::open(dir).unwrap()), config).await
    }

    async fn start_on(store: Arc<dyn MetaStore>, config: Config) -> TestServer {
        let db = Arc::new(MetaDb::open(store, config).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let secret = Secret::new(SECRET).unwrap();
        let task = tokio::spawn(migfs_meta::server::serve(
            db.clone(),
            listener,
            secret,
            async {
                let _ = rx.await;
            },
        ));
        TestServer {
            addr,
            db,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server and waits until it has shut down.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// A client with the right secret.
    pub async fn client(&self) -> Client {
        connect(self.addr, SECRET).await
    }

    /// A registered node with its own session.
    pub async fn node(&self, name: &str) -> Node {
        let mut c = self.client().await;
        let r = c
            .register_node(pb::RegisterNodeRequest {
                name: name.into(),
                addr: "127.0.0.1:1".into(),
                capacity_bytes: 1000,
                free_bytes: 600,
            })
            .await
            .unwrap()
            .into_inner();
        Node {
            c,
            sid: r.session_id,
            id: r.node_id,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A client presenting `secret`.
pub async fn connect(addr: SocketAddr, secret: &str) -> Client {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    MetaClient::with_interceptor(ch, Present(Secret::new(secret).unwrap()))
}

/// The errno of a failed call (panics on success or a status without one).
pub fn errno<T: std::fmt::Debug>(r: Result<T, Status>) -> i32 {
    let st = r.expect_err("the call should have failed");
    migfs_proto::errno::of(&st).unwrap_or_else(|| panic!("no errno in {st:?}"))
}

/// A node's client and session.
pub struct Node {
    pub c: Client,
    pub sid: u64,
    pub id: u64,
}

impl Node {
    pub async fn try_mknod(&mut self, parent: u64, name: &[u8], mode: u32) -> Result<Attr, Status> {
        let req = pb::MknodRequest {
            session_id: self.sid,
            parent,
            name: name.to_vec(),
            mode,
            uid: 1000,
            gid: 1000,
            ..Default::default()
        };
        self.c
            .mknod(req)
            .await
            .map(|r| r.into_inner().attr.expect("mknod answers the attributes"))
    }

    pub async fn create(&mut self, parent: u64, name: &str) -> Attr {
        self.try_mknod(parent, name.as_bytes(), 0o100_644)
            .await
            .unwrap()
    }

    pub async fn create_open(&mut self, parent: u64, name: &str) -> Attr {
        let req = pb::MknodRequest {
            session_id: self.sid,
            parent,
            name: name.into(),
            mode: 0o100_644,
            open: true,
            ..Default::default()
        };
        self.c
            .mknod(req)
            .await
            .unwrap()
            .into_inner()
            .attr
            .expect("mknod answers the attributes")
    }

    pub async fn try_mkdir(&mut self, parent: u64, name: &[u8]) -> Result<Attr, Status> {
        let req = pb::MknodRequest {
            session_id: self.sid,
            parent,
            name: name.to_vec(),
            mode: 0o755,
            uid: 1000,
            gid: 1000,
            ..Default::default()
        };
        self.c
            .mkdir(req)
            .await
            .map(|r| r.into_inner().attr.expect("mkdir answers the attributes"))
    }

    pub async fn mkdir(&mut self, parent: u64, name: &str) -> Attr {
        self.try_mkdir(parent, name.as_bytes()).await.unwrap()
    }

    pub async fn lookup(&mut self, parent: u64, name: &str) -> Result<Attr, Status> {
        let req = pb::LookupRequest {
            session_id: 0,
            parent,
            name: name.into(),
        };
        self.c.lookup(req).await.map(|r| r.into_inner())
    }

    pub async fn getattr(&mut self, ino: u64) -> Result<Attr, Status> {
        self.c
            .get_attr(pb::InoRequest { ino })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn unlink(&mut self, parent: u64, name: &str) -> Result<(), Status> {
        let req = pb::NameRequest {
            session_id: self.sid,
            parent,
            name: name.into(),
        };
        self.c.unlink(req).await.map(|_| ())
    }

    pub async fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), Status> {
        let req = pb::NameRequest {
            session_id: self.sid,
            parent,
            name: name.into(),
        };
        self.c.rmdir(req).await.map(|_| ())
    }

    pub async fn rename(
        &mut self,
        (parent, name): (u64, &str),
        (new_parent, new_name): (u64, &str),
        flags: u32,
    ) -> Result<(), Status> {
        let req = pb::RenameRequest {
            session_id: self.sid,
            parent,
            name: name.into(),
            new_parent,
            new_name: new_name.into(),
            flags,
        };
        self.c.rename(req).await.map(|_| ())
    }

    pub async fn open(&mut self, ino: u64) -> Result<Attr, Status> {
        let req = pb::OpenRequest {
            session_id: self.sid,
            ino,
        };
        self.c.open(req).await.map(|r| r.into_inner())
    }

    pub async fn release(&mut self, ino: u64) -> Result<(), Status> {
        let req = pb::ReleaseRequest {
            session_id: self.sid,
            ino,
            also: Vec::new(),
        };
        self.c.release(req).await.map(|_| ())
    }

    pub async fn readdir(&mut self, ino: u64, after_cookie: u64, limit: u32) -> pb::ReadDirReply {
        let req = pb::ReadDirRequest {
            session_id: 0,
            ino,
            after_cookie,
            limit,
        };
        self.c.read_dir(req).await.unwrap().into_inner()
    }

    /// Every name in directory `ino` (paging through).
    pub async fn names(&mut self, ino: u64) -> Vec<String> {
        let (mut out, mut after) = (Vec::new(), 0);
        loop {
            let r = self.readdir(ino, after, 7).await;
            for e in &r.entries {
                out.push(String::from_utf8(e.name.clone()).unwrap());
                after = e.cookie;
            }
            if r.eof {
                return out;
            }
        }
    }

    pub async fn commit(
        &mut self,
        ino: u64,
        blocks: &[(u64, [u8; 32], u32)],
        min_size: u64,
    ) -> Result<Attr, Status> {
        let req = pb::CommitBlocksRequest {
            session_id: self.sid,
            ino,
            blocks: blocks
                .iter()
                .map(|(index, hash, len)| pb::BlockRef {
                    index: *index,
                    hash: hash.to_vec(),
                    len: *len,
                    holders: vec![],
                })
                .collect(),
            holders: vec![self.id],
            min_size,
            ..Default::default()
        };
        self.c.commit_blocks(req).await.map(|r| r.into_inner())
    }

    pub async fn blocks(&mut self, ino: u64) -> pb::GetBlocksReply {
        let req = pb::GetBlocksRequest {
            ino,
            first_index: 0,
            count: 0,
        };
        self.c.get_blocks(req).await.unwrap().into_inner()
    }

    pub async fn truncate(&mut self, ino: u64, size: u64) -> Attr {
        let req = pb::SetAttrRequest {
            session_id: self.sid,
            ino,
            size: Some(size),
            ..Default::default()
        };
        self.c.set_attr(req).await.unwrap().into_inner()
    }

    pub async fn lock(
        &mut self,
        ino: u64,
        owner: u64,
        range: (u64, u64),
        typ: i32,
        flock: bool,
    ) -> bool {
        let req = pb::LockRequest {
            session_id: self.sid,
            ino,
            owner,
            start: range.0,
            end: range.1,
            typ,
            pid: u32::try_from(owner).unwrap_or(0),
            flock,
        };
        self.c.set_lock(req).await.unwrap().into_inner().granted
    }

    /// F_GETLK: (typ, start, end, pid) of the conflicting lock.
    pub async fn test_lock(
        &mut self,
        ino: u64,
        owner: u64,
        range: (u64, u64),
        typ: i32,
    ) -> (i32, u64, u64, u32) {
        let req = pb::LockRequest {
            session_id: self.sid,
            ino,
            owner,
            start: range.0,
            end: range.1,
            typ,
            pid: 0,
            flock: false,
        };
        let r = self.c.get_lock(req).await.unwrap().into_inner();
        (r.typ, r.start, r.end, r.pid)
    }
}

/// A hash-shaped test value.
pub fn h(n: u8) -> [u8; 32] {
    [n; 32]
}

/// The database's consistency problems (must be none).
pub fn fsck(db: &MetaDb) -> Vec<String> {
    db.read(|s| migfs_meta::fsck::check(s)).unwrap()
}
