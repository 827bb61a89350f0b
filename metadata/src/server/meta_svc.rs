//! The tonic service: checks each request's wire fields, runs the operation
//! on a blocking thread (store calls are synchronous), converts the result.
//! `MetaError` becomes a `Status` in exactly one place, [`finish`].

use std::sync::Arc;

use migfs_proto::ids::BlockHash;
use migfs_proto::meta::{self as pb, meta_server::Meta};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::delegate::Delegations;
use super::load::{self, Loads};
use super::watch;
use crate::db::MetaDb;
use crate::error::{MetaError, Result, e};
use crate::ops::{
    self, Txn, attr::to_attr, blocks, gc, locks, namei, rename, sessions, tasks, xattr,
};
use crate::store::MetaStore;

/// Largest ReadDir page.
const READDIR_MAX: u32 = 4096;
/// ReadDir page when the request says 0.
const READDIR_DEFAULT: u32 = 1024;
/// Largest GcClaim answer.
const GC_CLAIM_MAX: u32 = 65536;
/// Most inode numbers one LeaseInodes call gives out.
const LEASE_MAX: u32 = 4096;

/// The Meta service over one [`MetaDb`].
#[derive(Clone, Debug)]
pub struct MetaService {
    db: Arc<MetaDb>,
    loads: Arc<Loads>,
    dele: Arc<Delegations>,
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// The one place a [`MetaError`] becomes a [`Status`].
fn finish<T>(r: Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Status::from)
}

fn ino(v: u64) -> Result<u64> {
    if v == 0 {
        return Err(e::einval("inode number 0"));
    }
    Ok(v)
}

fn hash(b: &[u8]) -> Result<[u8; 32]> {
    BlockHash::try_from(b)
        .map(|h| h.0)
        .map_err(|err| e::einval(err.to_string()))
}

impl MetaService {
    /// A service over `db`.
    pub fn new(db: Arc<MetaDb>) -> MetaService {
        let c = db.config();
        let dele = Arc::new(Delegations::new(c.delegate_quiet, c.recall_wait));
        MetaService {
            db,
            loads: Arc::new(Loads::default()),
            dele,
        }
    }

    /// The delegation table.
    pub fn delegations(&self) -> &Arc<Delegations> {
        &self.dele
    }

    /// Before `session` reads or changes the names in `dir`.
    async fn enter(&self, dir: u64, session: u64) {
        self.dele.enter(&self.db, dir, session, true).await;
    }

    /// Before `session` changes what `name` in `parent` is, when that is a
    /// directory another session may hold (rmdir, rename over it): its
    /// holder may have names in it the server does not know yet.
    async fn enter_child(&self, parent: u64, name: &[u8], session: u64) {
        if self.dele.held() == 0 {
            return;
        }
        let name = name.to_vec();
        let child = self
            .read(move |s| Ok(ops::dentry(s, parent, &name)?.map(|d| d.ino)))
            .await;
        if let Ok(Some(c)) = child {
            self.dele.enter(&self.db, c, session, false).await;
        }
    }

    /// Applies one operation of a delegation holder's batch.
    fn apply_dir_op(t: &mut Txn<'_>, session: u64, op: &pb::DirOp) -> Result<()> {
        match &op.op {
            Some(pb::dir_op::Op::Create(c)) => {
                let a = c
                    .attr
                    .as_ref()
                    .ok_or_else(|| e::einval("a batched create without attributes"))?;
                if c.open {
                    // Checked first: nothing may fail after the first write.
                    sessions::session(t, session)?;
                }
                let n = namei::NewNode {
                    parent: ino(c.parent)?,
                    name: &c.name,
                    mode: a.mode,
                    rdev: 0,
                    uid: a.uid,
                    gid: a.gid,
                    target: &[],
                    open_in: c.open.then_some(session),
                };
                namei::create_leased(t, n, a.ino, a.ctime_ns).map(|_| ())
            }
            Some(pb::dir_op::Op::Unlink(u)) => {
                namei::unlink_seen(t, ino(u.parent)?, &u.name, ino(u.ino)?, u.time_ns)
            }
            None => Err(e::einval("an empty batched operation")),
        }
    }

    /// Runs a mutating operation for session `origin`: at once when the
    /// store answers from memory, else on a blocking thread.
    async fn write<R, F>(&self, origin: u64, op: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Txn<'_>) -> Result<R> + Send + 'static,
    {
        // From memory an operation takes microseconds: a hand-off to the
        // blocking pool would cost more than it.
        if self.db.in_memory() {
            return self.db.write(origin, op);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.write(origin, op))
            .await
            .map_err(|err| MetaError::Internal(format!("operation task failed: {err}")))?
    }

    /// Runs a read-only operation (like [`Self::write`]).
    async fn read<R, F>(&self, op: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&dyn MetaStore) -> Result<R> + Send + 'static,
    {
        if self.db.in_memory() {
            return self.db.read(op);
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.read(op))
            .await
            .map_err(|err| MetaError::Internal(format!("operation task failed: {err}")))?
    }

    async fn attr_of_write<F>(&self, origin: u64, op: F) -> Reply<pb::Attr>
    where
        F: FnOnce(&mut Txn<'_>) -> Result<crate::schema::Inode> + Send + 'static,
    {
        finish(self.write(origin, op).await.map(|i| to_attr(&i)))
    }

    async fn empty_write<F>(&self, origin: u64, op: F) -> Reply<pb::Empty>
    where
        F: FnOnce(&mut Txn<'_>) -> Result<()> + Send + 'static,
    {
        finish(self.write(origin, op).await.map(|()| pb::Empty {}))
    }

    /// A write that makes a name in `parent`: answers the new node's
    /// attributes and the directory's after the change.
    async fn entry_write<F>(&self, origin: u64, parent: u64, op: F) -> Reply<pb::EntryReply>
    where
        F: FnOnce(&mut Txn<'_>) -> Result<crate::schema::Inode> + Send + 'static,
    {
        let res = self
            .write(origin, move |t| {
                let node = op(t)?;
                Ok((node, ops::inode(t, parent)?))
            })
            .await;
        finish(res.map(|(node, p)| pb::EntryReply {
            attr: Some(to_attr(&node)),
            parent: Some(to_attr(&p)),
            delegated: false,
        }))
    }

    /// A write that removes a name from `parent`: answers the directory's
    /// attributes after the change.
    async fn remove_write<F>(&self, origin: u64, parent: u64, op: F) -> Reply<pb::ParentReply>
    where
        F: FnOnce(&mut Txn<'_>) -> Result<()> + Send + 'static,
    {
        let res = self
            .write(origin, move |t| {
                op(t)?;
                ops::inode(t, parent)
            })
            .await;
        finish(res.map(|p| pb::ParentReply {
            parent: Some(to_attr(&p)),
        }))
    }

    async fn create(&self, r: pb::MknodRequest, dir: bool) -> Reply<pb::EntryReply> {
        let open_in = (r.open && !dir).then_some(r.session_id);
        let (session, parent) = (r.session_id, r.parent);
        let want = r.want_delegation && !dir;
        self.enter(parent, session).await;
        let mut reply = self
            .entry_write(r.session_id, r.parent, move |t| {
                let n = namei::NewNode {
                    parent: ino(r.parent)?,
                    name: &r.name,
                    mode: r.mode,
                    rdev: r.rdev,
                    uid: r.uid,
                    gid: r.gid,
                    target: &[],
                    open_in,
                };
                if dir {
                    namei::mkdir(t, n)
                } else {
                    namei::mknod(t, n)
                }
            })
            .await?;
        if want && self.dele.grant(&self.db, parent, session) {
            reply.get_mut().delegated = true;
        }
        Ok(reply)
    }

    fn lock_req(r: &pb::LockRequest) -> Result<locks::LockReq> {
        Ok(locks::LockReq {
            ino: ino(r.ino)?,
            session: r.session_id,
            owner: r.owner,
            start: r.start,
            end: r.end,
            typ: r.typ,
            pid: r.pid,
            flock: r.flock,
        })
    }
}

#[tonic::async_trait]
impl Meta for MetaService {
    #[instrument(level = "debug", skip_all, fields(name = %req.get_ref().name))]
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Reply<pb::RegisterNodeReply> {
        let r = req.into_inner();
        let lease_ms = self.db.lease_ms();
        let c = self.db.cluster();
        let res = self
            .write(0, move |t| {
                sessions::register(
                    t,
                    &r.name,
                    &r.addr,
                    r.capacity_bytes,
                    r.free_bytes,
                    lease_ms,
                )
            })
            .await;
        finish(res.map(|(node_id, session_id)| {
            tracing::info!(node_id, session_id, "node registered");
            pb::RegisterNodeReply {
                node_id,
                session_id,
                block_size: c.block_size,
                lease_ms: u32::try_from(lease_ms).unwrap_or(u32::MAX),
                replicas: c.replicas,
            }
        }))
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id))]
    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Reply<pb::HeartbeatReply> {
        let r = req.into_inner();
        let lease_ms = self.db.lease_ms();
        let res = self
            .write(r.session_id, move |t| {
                sessions::heartbeat(t, r.session_id, r.capacity_bytes, r.free_bytes, lease_ms)
            })
            .await;
        finish(res.map(|()| pb::HeartbeatReply {}))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Reply<pb::ListNodesReply> {
        let res = self.read(|s| sessions::list_nodes(s)).await;
        finish(res.map(|mut nodes| {
            self.loads.fill(&mut nodes);
            pb::ListNodesReply { nodes }
        }))
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id))]
    async fn report_load(&self, req: Request<pb::ReportLoadRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let Some(l) = r.load else {
            return finish(Err(e::einval("a load report without a load")));
        };
        if let Err(err) = load::check(&l) {
            return finish(Err(err));
        }
        let sid = r.session_id;
        let res = self.read(move |s| sessions::session(s, sid)).await;
        finish(res.map(|s| {
            self.loads.record(s.node, l);
            pb::Empty {}
        }))
    }

    type WatchStream = watch::WatchStream;

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id))]
    async fn watch(&self, req: Request<pb::WatchRequest>) -> Reply<Self::WatchStream> {
        let sid = req.into_inner().session_id;
        // Subscribe first: nothing committed after the check is missed.
        let rx = self.db.subscribe();
        if self.db.is_closing() {
            return Err(Status::unavailable("the metadata server is shutting down"));
        }
        let res = self.read(move |s| sessions::session(s, sid)).await;
        finish(res.map(|_| watch::start(&self.db, &self.dele, sid, rx)))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent))]
    async fn lookup(&self, req: Request<pb::LookupRequest>) -> Reply<pb::Attr> {
        let r = req.into_inner();
        self.enter(r.parent, r.session_id).await;
        let res = self
            .read(move |s| namei::lookup(s, ino(r.parent)?, &r.name))
            .await;
        finish(res.map(|i| to_attr(&i)))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino))]
    async fn get_attr(&self, req: Request<pb::InoRequest>) -> Reply<pb::Attr> {
        let n = req.into_inner().ino;
        finish(
            self.read(move |s| ops::inode(s, ino(n)?))
                .await
                .map(|i| to_attr(&i)),
        )
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn set_attr(&self, req: Request<pb::SetAttrRequest>) -> Reply<pb::Attr> {
        let r = req.into_inner();
        self.dele.enter(&self.db, r.ino, r.session_id, false).await;
        self.attr_of_write(r.session_id, move |t| {
            ino(r.ino)?;
            ops::attr::setattr(t, &r)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn mknod(&self, req: Request<pb::MknodRequest>) -> Reply<pb::EntryReply> {
        self.create(req.into_inner(), false).await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn mkdir(&self, req: Request<pb::MknodRequest>) -> Reply<pb::EntryReply> {
        self.create(req.into_inner(), true).await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn symlink(&self, req: Request<pb::SymlinkRequest>) -> Reply<pb::EntryReply> {
        let r = req.into_inner();
        self.enter(r.parent, r.session_id).await;
        self.entry_write(r.session_id, r.parent, move |t| {
            let n = namei::NewNode {
                parent: ino(r.parent)?,
                name: &r.name,
                mode: 0,
                rdev: 0,
                uid: r.uid,
                gid: r.gid,
                target: &r.target,
                open_in: None,
            };
            namei::symlink(t, n)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn link(&self, req: Request<pb::LinkRequest>) -> Reply<pb::EntryReply> {
        let r = req.into_inner();
        self.enter(r.new_parent, r.session_id).await;
        self.entry_write(r.session_id, r.new_parent, move |t| {
            namei::link(t, ino(r.ino)?, ino(r.new_parent)?, &r.new_name)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn unlink(&self, req: Request<pb::NameRequest>) -> Reply<pb::ParentReply> {
        let r = req.into_inner();
        self.enter(r.parent, r.session_id).await;
        self.remove_write(r.session_id, r.parent, move |t| {
            namei::unlink(t, ino(r.parent)?, &r.name)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn rmdir(&self, req: Request<pb::NameRequest>) -> Reply<pb::ParentReply> {
        let r = req.into_inner();
        self.enter(r.parent, r.session_id).await;
        self.enter_child(r.parent, &r.name, r.session_id).await;
        self.remove_write(r.session_id, r.parent, move |t| {
            namei::rmdir(t, ino(r.parent)?, &r.name)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().parent, session = req.get_ref().session_id))]
    async fn rename(&self, req: Request<pb::RenameRequest>) -> Reply<pb::RenameReply> {
        let r = req.into_inner();
        self.enter(r.parent, r.session_id).await;
        if r.new_parent != r.parent {
            self.enter(r.new_parent, r.session_id).await;
        }
        self.enter_child(r.new_parent, &r.new_name, r.session_id)
            .await;
        let res = self
            .write(r.session_id, move |t| {
                let rn = rename::Rename {
                    parent: ino(r.parent)?,
                    name: &r.name,
                    new_parent: ino(r.new_parent)?,
                    new_name: &r.new_name,
                    flags: r.flags,
                };
                rename::rename(t, rn)?;
                Ok((ops::inode(t, r.parent)?, ops::inode(t, r.new_parent)?))
            })
            .await;
        finish(res.map(|(p, np)| pb::RenameReply {
            parent: Some(to_attr(&p)),
            new_parent: Some(to_attr(&np)),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino))]
    async fn readlink(&self, req: Request<pb::InoRequest>) -> Reply<pb::ReadlinkReply> {
        let n = req.into_inner().ino;
        let res = self.read(move |s| namei::readlink(s, ino(n)?)).await;
        finish(res.map(|target| pb::ReadlinkReply { target }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, after = req.get_ref().after_cookie))]
    async fn read_dir(&self, req: Request<pb::ReadDirRequest>) -> Reply<pb::ReadDirReply> {
        let r = req.into_inner();
        self.enter(r.ino, r.session_id).await;
        let limit = match r.limit {
            0 => READDIR_DEFAULT,
            n => n.min(READDIR_MAX),
        };
        let res = self
            .read(move |s| namei::readdir(s, ino(r.ino)?, r.after_cookie, limit as usize))
            .await;
        finish(res.map(|(entries, eof)| {
            pb::ReadDirReply {
                entries: entries
                    .into_iter()
                    .map(|d| pb::DirEntry {
                        name: d.name,
                        cookie: d.cookie,
                        attr: Some(to_attr(&d.inode)),
                    })
                    .collect(),
                eof,
            }
        }))
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id, count = req.get_ref().count))]
    async fn lease_inodes(
        &self,
        req: Request<pb::LeaseInodesRequest>,
    ) -> Reply<pb::LeaseInodesReply> {
        let r = req.into_inner();
        let n = r.count.clamp(1, LEASE_MAX);
        let res = self
            .write(r.session_id, move |t| {
                sessions::session(t, r.session_id)?;
                (0..n).map(|_| t.fresh_id()).collect::<Result<Vec<u64>>>()
            })
            .await;
        finish(res.map(|inos| pb::LeaseInodesReply { inos }))
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id, ops = req.get_ref().ops.len()))]
    async fn dir_batch(&self, req: Request<pb::DirBatchRequest>) -> Reply<pb::DirBatchReply> {
        let r = req.into_inner();
        let session = r.session_id;
        let mut dirs: Vec<u64> = r
            .ops
            .iter()
            .filter_map(|o| match &o.op {
                Some(pb::dir_op::Op::Create(c)) => Some(c.parent),
                Some(pb::dir_op::Op::Unlink(u)) => Some(u.parent),
                None => None,
            })
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        // Normally the caller holds them all; after a server restart or a
        // delegation taken from it, another session may.
        for &d in &dirs {
            self.enter(d, session).await;
        }
        // Names in a directory this session holds are cached nowhere else
        // (the others forgot them at the grant, and any look since would
        // have recalled it): no other session needs their invalidations.
        let held: Vec<u64> = dirs
            .iter()
            .copied()
            .filter(|&d| self.dele.holds(d, session))
            .collect();
        let ops = r.ops;
        let res = self
            .write(session, move |t| {
                let mut out = Vec::with_capacity(ops.len());
                for op in &ops {
                    // Each operation checks everything before it writes, so
                    // one that fails leaves the transaction as it was.
                    match Self::apply_dir_op(t, session, op) {
                        Ok(()) => out.push(0),
                        Err(err) if err.errno() != libc::EIO => {
                            tracing::warn!(session, error = %err, "a batched directory operation was refused");
                            out.push(err.errno());
                        }
                        Err(err) => return Err(err),
                    }
                }
                t.retain_invals(|i| {
                    !(i.kind == pb::invalidation::Kind::Entry as i32 && held.contains(&i.parent))
                });
                Ok(out)
            })
            .await;
        for d in r.release {
            self.dele.release(d, session);
        }
        finish(res.map(|errno| pb::DirBatchReply { errno }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn stat_fs(&self, _req: Request<pb::Empty>) -> Reply<pb::StatFsReply> {
        let bs = self.db.cluster().block_size;
        finish(self.read(move |s| sessions::statfs(s, bs)).await)
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn open(&self, req: Request<pb::OpenRequest>) -> Reply<pb::Attr> {
        let r = req.into_inner();
        self.attr_of_write(r.session_id, move |t| {
            sessions::open(t, r.session_id, ino(r.ino)?)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.empty_write(r.session_id, move |t| {
            sessions::release(t, r.session_id, ino(r.ino)?)?;
            for &i in &r.also {
                sessions::release(t, r.session_id, ino(i)?)?;
            }
            Ok(())
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino))]
    async fn get_blocks(&self, req: Request<pb::GetBlocksRequest>) -> Reply<pb::GetBlocksReply> {
        let r = req.into_inner();
        let res = self
            .read(move |s| blocks::get_blocks(s, ino(r.ino)?, r.first_index, r.count))
            .await;
        finish(res.map(|(i, blocks)| pb::GetBlocksReply {
            attr: Some(to_attr(&i)),
            blocks,
        }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id, blocks = req.get_ref().blocks.len()))]
    async fn commit_blocks(&self, req: Request<pb::CommitBlocksRequest>) -> Reply<pb::Attr> {
        let r = req.into_inner();
        let commit = (|| {
            let blocks = r
                .blocks
                .iter()
                .map(|b| {
                    Ok(blocks::NewBlock {
                        index: b.index,
                        hash: hash(&b.hash)?,
                        len: b.len,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(blocks::Commit {
                ino: ino(r.ino)?,
                blocks,
                holders: r.holders.clone(),
                min_size: r.min_size,
                mtime: r.mtime_ns,
                expect_version: r.expect_version,
            })
        })();
        let commit = match commit {
            Ok(c) => c,
            Err(err) => return finish(Err(err)),
        };
        self.attr_of_write(r.session_id, move |t| blocks::commit(t, &commit))
            .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn fallocate(&self, req: Request<pb::FallocateRequest>) -> Reply<pb::Attr> {
        let r = req.into_inner();
        self.attr_of_write(r.session_id, move |t| {
            blocks::fallocate(t, ino(r.ino)?, r.offset, r.length, r.mode)
        })
        .await
    }

    #[instrument(level = "debug", skip_all)]
    async fn sync(&self, _req: Request<pb::Empty>) -> Reply<pb::Empty> {
        let db = self.db.clone();
        let res = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|err| MetaError::Internal(format!("flush task failed: {err}")))
            .and_then(|r| r);
        finish(res.map(|()| pb::Empty {}))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn set_xattr(&self, req: Request<pb::SetXattrRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.empty_write(r.session_id, move |t| {
            xattr::set(t, ino(r.ino)?, &r.name, &r.value, r.flags)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino))]
    async fn get_xattr(&self, req: Request<pb::XattrRequest>) -> Reply<pb::GetXattrReply> {
        let r = req.into_inner();
        let res = self
            .read(move |s| xattr::get(s, ino(r.ino)?, &r.name))
            .await;
        finish(res.map(|value| pb::GetXattrReply { value }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino))]
    async fn list_xattr(&self, req: Request<pb::InoRequest>) -> Reply<pb::ListXattrReply> {
        let n = req.into_inner().ino;
        let res = self.read(move |s| xattr::list(s, ino(n)?)).await;
        finish(res.map(|names| pb::ListXattrReply { names }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn remove_xattr(&self, req: Request<pb::XattrRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.empty_write(r.session_id, move |t| {
            xattr::remove(t, ino(r.ino)?, &r.name)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn get_lock(&self, req: Request<pb::LockRequest>) -> Reply<pb::LockReply> {
        let r = req.into_inner();
        let res = self
            .read(move |s| locks::get(s, &Self::lock_req(&r)?))
            .await;
        finish(res.map(|found| match found {
            Some(l) => pb::LockReply {
                granted: false,
                typ: i32::from(l.typ),
                start: l.start,
                end: l.end,
                pid: l.pid,
            },
            None => pb::LockReply {
                granted: true,
                typ: locks::F_UNLCK,
                ..Default::default()
            },
        }))
    }

    #[instrument(level = "debug", skip_all, fields(ino = req.get_ref().ino, session = req.get_ref().session_id))]
    async fn set_lock(&self, req: Request<pb::LockRequest>) -> Reply<pb::LockReply> {
        let r = req.into_inner();
        let res = self
            .write(r.session_id, move |t| locks::set(t, &Self::lock_req(&r)?))
            .await;
        finish(res.map(|granted| pb::LockReply {
            granted,
            typ: locks::F_UNLCK,
            ..Default::default()
        }))
    }

    #[instrument(level = "debug", skip_all, fields(node = req.get_ref().node_id))]
    async fn gc_claim(&self, req: Request<pb::GcClaimRequest>) -> Reply<pb::GcClaimReply> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1024,
            n => n.min(GC_CLAIM_MAX),
        };
        let res = self
            .read(move |s| {
                if r.node_id == 0 {
                    return Err(e::einval("node id 0"));
                }
                gc::claim(s, r.node_id, limit as usize)
            })
            .await;
        finish(res.map(|hs| pb::GcClaimReply {
            hashes: hs.into_iter().map(|h| h.to_vec()).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(node = req.get_ref().node_id, hashes = req.get_ref().hashes.len()))]
    async fn gc_done(&self, req: Request<pb::GcDoneRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let hashes = r.hashes.iter().map(|h| hash(h)).collect::<Result<Vec<_>>>();
        self.empty_write(0, move |t| {
            if r.node_id == 0 {
                return Err(e::einval("node id 0"));
            }
            gc::done(t, r.node_id, &hashes?)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(from = req.get_ref().from_session, to = req.get_ref().to_session))]
    async fn move_locks(&self, req: Request<pb::MoveLocksRequest>) -> Reply<pb::MoveLocksReply> {
        let r = req.into_inner();
        let res = self
            .write(r.to_session, move |t| {
                locks::move_locks(t, r.from_session, r.from_pid, r.to_session, r.to_pid)
            })
            .await;
        finish(res.map(|held| pb::MoveLocksReply {
            moved: held.iter().map(held_to_pb).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(to = req.get_ref().to_session))]
    async fn return_locks(&self, req: Request<pb::ReturnLocksRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        let held: Vec<locks::Held> = r.locks.iter().map(held_from_pb).collect::<Result<_>>()?;
        self.empty_write(r.to_session, move |t| {
            locks::return_locks(t, r.to_session, r.to_pid, &held)
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id, pid = req.get_ref().pid))]
    async fn park_locks(&self, req: Request<pb::ParkLocksRequest>) -> Reply<pb::ParkLocksReply> {
        let r = req.into_inner();
        let res = self
            .write(r.session_id, move |t| {
                locks::park_locks(t, r.session_id, r.pid, r.token)
            })
            .await;
        finish(res.map(|held| pb::ParkLocksReply {
            locks: u32::try_from(held.len()).unwrap_or(u32::MAX),
            held: held.iter().map(held_to_pb).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(from = req.get_ref().from_session, to = req.get_ref().to_session))]
    async fn claim_parked(
        &self,
        req: Request<pb::ClaimParkedRequest>,
    ) -> Reply<pb::MoveLocksReply> {
        let r = req.into_inner();
        let res = self
            .write(r.to_session, move |t| {
                locks::claim_parked(t, r.from_session, r.token, r.to_session, r.to_pid)
            })
            .await;
        finish(res.map(|held| pb::MoveLocksReply {
            moved: held.iter().map(held_to_pb).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(session = req.get_ref().session_id))]
    async fn drop_parked(&self, req: Request<pb::DropParkedRequest>) -> Reply<pb::Empty> {
        let r = req.into_inner();
        self.empty_write(r.session_id, move |t| {
            locks::drop_parked(t, r.session_id, r.token).map(|_| ())
        })
        .await
    }

    #[instrument(level = "debug", skip_all, fields(node = req.get_ref().node_id, pid = req.get_ref().pid))]
    async fn task_create(&self, req: Request<pb::TaskCreateRequest>) -> Reply<pb::TaskInfo> {
        let r = req.into_inner();
        let res = self
            .write(0, move |t| {
                tasks::create(t, r.node_id, r.pid, r.cmd, r.home_node, r.pinned)
            })
            .await;
        finish(res)
    }

    #[instrument(level = "debug", skip_all, fields(task = req.get_ref().task_id))]
    async fn task_get(&self, req: Request<pb::TaskGetRequest>) -> Reply<pb::TaskInfo> {
        let id = req.into_inner().task_id;
        finish(self.read(move |s| tasks::get(s, id)).await)
    }

    #[instrument(level = "debug", skip_all)]
    async fn task_list(&self, req: Request<pb::TaskListRequest>) -> Reply<pb::TaskListReply> {
        let all = req.into_inner().include_exited;
        let res = self.read(move |s| tasks::list(s, all)).await;
        finish(res.map(|tasks| pb::TaskListReply { tasks }))
    }

    #[instrument(level = "debug", skip_all, fields(task = req.get_ref().task_id, to = req.get_ref().to_node))]
    async fn task_begin_move(&self, req: Request<pb::TaskBeginMoveRequest>) -> Reply<pb::TaskInfo> {
        let r = req.into_inner();
        let res = self
            .write(0, move |t| {
                tasks::begin_move(t, r.task_id, r.from_node, r.pid, r.to_node)
            })
            .await;
        finish(res)
    }

    #[instrument(level = "debug", skip_all, fields(task = req.get_ref().task_id, commit = req.get_ref().commit))]
    async fn task_end_move(&self, req: Request<pb::TaskEndMoveRequest>) -> Reply<pb::TaskInfo> {
        let r = req.into_inner();
        let res = self
            .write(0, move |t| {
                tasks::end_move(t, r.task_id, r.commit, r.to_node, r.new_pid)
            })
            .await;
        finish(res)
    }

    #[instrument(level = "debug", skip_all, fields(task = req.get_ref().task_id))]
    async fn task_exited(&self, req: Request<pb::TaskExitedRequest>) -> Reply<pb::TaskInfo> {
        let r = req.into_inner();
        let res = self
            .write(0, move |t| {
                tasks::exited(t, r.task_id, r.node_id, r.pid, r.exit_code)
            })
            .await;
        finish(res)
    }

    #[instrument(level = "debug", skip_all, fields(task = req.get_ref().task_id, pinned = req.get_ref().pinned))]
    async fn task_pin(&self, req: Request<pb::TaskPinRequest>) -> Reply<pb::TaskInfo> {
        let r = req.into_inner();
        finish(
            self.write(0, move |t| tasks::pin(t, r.task_id, r.pinned))
                .await,
        )
    }
}

fn held_to_pb(h: &locks::Held) -> pb::HeldLock {
    pb::HeldLock {
        ino: h.ino,
        session_id: h.rec.session,
        owner: h.rec.owner,
        start: h.rec.start,
        end: h.rec.end,
        typ: i32::from(h.rec.typ),
        pid: h.rec.pid,
        flock: h.rec.flock,
        pending: h.rec.pending,
    }
}

fn held_from_pb(h: &pb::HeldLock) -> Result<locks::Held> {
    let typ = u8::try_from(h.typ)
        .ok()
        .filter(|t| i32::from(*t) == locks::F_RDLCK || i32::from(*t) == locks::F_WRLCK)
        .ok_or_else(|| e::einval(format!("lock type {}", h.typ)))?;
    if h.owner == 0 || h.start > h.end {
        return Err(e::einval("a returned lock needs an owner and a range"));
    }
    Ok(locks::Held {
        ino: ino(h.ino)?,
        rec: crate::schema::LockRec {
            session: h.session_id,
            owner: h.owner,
            flock: h.flock,
            typ,
            start: h.start,
            end: h.end,
            pid: h.pid,
            pending: h.pending,
        },
    })
}
