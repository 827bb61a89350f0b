//! Delegated directories, the node's side: creates and removals this node
//! answers itself, and the queue that carries them to the metadata server.
//!
//! The server delegates a directory to a node that knows every name in it
//! (see [`crate::cache`]'s listings) when no other node looked into it
//! lately. While it holds the delegation, the node answers `open(O_CREAT)`
//! of a new name and `unlink` of a name it knows without a round trip: the
//! new inode's number comes from a pool the server leased to it, and the
//! change joins a queue that one task sends in batches (`DirBatch`). Every
//! other metadata call waits until what was queued before it is applied
//! ([`crate::meta_client::Meta::ordered`]), so the server sees this node's
//! operations in the order it answered them. When another node needs the
//! directory, the server recalls it: the node stops answering there, sends
//! its queue and gives the delegation back in the same batch.
//!
//! What a crash of the node loses: operations still queued (at most a few
//! milliseconds' worth; an fsync of any file or directory waits for them).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use migfs_proto::meta::{
    Attr, DirBatchRequest, DirOp, LeaseInodesRequest, NewFile, RemovedName, dir_op,
};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::cache::MetaCache;
use crate::meta_client::Meta;

/// Operations per batch at most.
const BATCH_MAX: usize = 4096;
/// Beyond this many unsent operations the server answers again (a server
/// that does not keep up makes the callers wait, not the queue grow).
const QUEUE_MAX: usize = 65536;
/// Inode numbers asked for at a time, and the level that asks for more.
const POOL_LEASE: u32 = 2048;
const POOL_LOW: usize = 512;

#[derive(Debug, Default)]
struct State {
    /// Directories delegated to this node.
    held: HashSet<u64>,
    /// Operations not sent yet, with their sequence numbers.
    queue: Vec<(u64, DirOp)>,
    /// Delegations to give back with the next batch.
    give_back: Vec<u64>,
    /// Leased inode numbers not used yet.
    pool: Vec<u64>,
    leasing: bool,
}

/// Counters for `/.migfs/stats`.
#[derive(Debug, Default)]
pub struct DirStats {
    /// Creates and removals answered here.
    pub answered: AtomicU64,
    /// Of those, refused by the server when they arrived (logged).
    pub refused: AtomicU64,
    /// Batches sent.
    pub batches: AtomicU64,
    /// Delegations received and given back.
    pub granted: AtomicU64,
    /// Delegations given back.
    pub recalled: AtomicU64,
}

/// The node's delegations and queue.
#[derive(Debug)]
pub struct DirOps {
    meta: Arc<Meta>,
    cache: Arc<MetaCache>,
    st: Mutex<State>,
    wake: Notify,
    /// Counters.
    pub stats: DirStats,
}

impl DirOps {
    /// No delegation yet; the sender is started by [`DirOps::start`].
    pub fn new(meta: Arc<Meta>, cache: Arc<MetaCache>) -> DirOps {
        DirOps {
            meta,
            cache,
            st: Mutex::new(State::default()),
            wake: Notify::new(),
            stats: DirStats::default(),
        }
    }

    /// Starts the task that sends the queue (on the current runtime).
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(send_loop(Arc::clone(self)));
    }

    /// Whether this node holds `dir`.
    pub fn holds(&self, dir: u64) -> bool {
        self.st.lock().held.contains(&dir)
    }

    /// Number of delegations held.
    pub fn held(&self) -> usize {
        self.st.lock().held.len()
    }

    /// The server granted `dir`.
    pub fn granted(self: &Arc<Self>, dir: u64) {
        if self.st.lock().held.insert(dir) {
            self.stats.granted.fetch_add(1, Ordering::Relaxed);
        }
        self.refill();
    }

    /// The server recalls `dir`: stop answering there, send the queue and
    /// give it back.
    pub fn recall(&self, dir: u64) {
        let mut st = self.st.lock();
        if st.held.remove(&dir) {
            self.stats.recalled.fetch_add(1, Ordering::Relaxed);
        }
        // Given back even when not held here any more: the server waits.
        st.give_back.push(dir);
        drop(st);
        self.wake.notify_one();
    }

    /// Gives every delegation back (the invalidation stream was cut, the
    /// session changed, the node stops).
    pub fn give_back_all(&self) {
        let mut st = self.st.lock();
        let dirs: Vec<u64> = st.held.drain().collect();
        self.stats
            .recalled
            .fetch_add(dirs.len() as u64, Ordering::Relaxed);
        st.give_back.extend(dirs);
        drop(st);
        self.wake.notify_one();
    }

    /// Queues the create of `name` in `dir` when this node holds `dir` and
    /// has an inode number left: `make` builds the new attributes from the
    /// number. `None`: ask the server instead.
    pub fn create(
        self: &Arc<Self>,
        dir: u64,
        name: &[u8],
        make: impl FnOnce(u64) -> Attr,
    ) -> Option<Attr> {
        let mut st = self.st.lock();
        if !st.held.contains(&dir) || st.queue.len() >= QUEUE_MAX {
            return None;
        }
        let Some(ino) = st.pool.pop() else {
            drop(st);
            self.refill();
            return None;
        };
        let attr = make(ino);
        let op = dir_op::Op::Create(NewFile {
            parent: dir,
            name: name.to_vec(),
            attr: Some(attr),
            open: true,
        });
        self.push(&mut st, op);
        let low = st.pool.len() < POOL_LOW;
        drop(st);
        if low {
            self.refill();
        }
        Some(attr)
    }

    /// Queues the removal of `name` (inode `ino`) from `dir` when this node
    /// holds `dir`; false: ask the server instead.
    pub fn unlink(&self, dir: u64, name: &[u8], ino: u64, now_ns: i64) -> bool {
        let mut st = self.st.lock();
        if !st.held.contains(&dir) || st.queue.len() >= QUEUE_MAX {
            return false;
        }
        let op = dir_op::Op::Unlink(RemovedName {
            parent: dir,
            name: name.to_vec(),
            ino,
            time_ns: now_ns,
        });
        self.push(&mut st, op);
        true
    }

    fn push(&self, st: &mut State, op: dir_op::Op) {
        let seq = self.meta.next_queued();
        st.queue.push((seq, DirOp { op: Some(op) }));
        self.stats.answered.fetch_add(1, Ordering::Relaxed);
        if st.queue.len() == 1 {
            self.wake.notify_one();
        }
    }

    /// Waits until everything queued so far reached the server.
    pub async fn drain(&self) -> crate::error::Result<()> {
        self.meta.ordered("drain directory operations").await
    }

    /// Leases more inode numbers in the background, once at a time.
    fn refill(self: &Arc<Self>) {
        {
            let mut st = self.st.lock();
            if st.leasing || st.pool.len() >= POOL_LOW {
                return;
            }
            st.leasing = true;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let req = LeaseInodesRequest {
                session_id: this.meta.session(),
                count: POOL_LEASE,
            };
            let r = this
                .meta
                .call_unordered(
                    "lease inodes",
                    |mut c| async move { c.lease_inodes(req).await },
                )
                .await;
            let mut st = this.st.lock();
            st.leasing = false;
            match r {
                // Popped from the end: keep them in ascending order of use.
                Ok(r) => st.pool.extend(r.inos.into_iter().rev()),
                Err(e) => tracing::warn!(error = %e, "could not lease inode numbers"),
            }
        });
    }
}

/// Sends the queue in batches, in order, retrying while the server is
/// unreachable (what is queued was answered already: it is never dropped
/// while the node lives).
async fn send_loop(d: Arc<DirOps>) {
    loop {
        let notified = d.wake.notified();
        let (ops, give_back) = {
            let mut st = d.st.lock();
            let n = st.queue.len().min(BATCH_MAX);
            let ops: Vec<(u64, DirOp)> = st.queue.drain(..n).collect();
            let give_back = if st.queue.is_empty() {
                std::mem::take(&mut st.give_back)
            } else {
                Vec::new()
            };
            (ops, give_back)
        };
        if ops.is_empty() && give_back.is_empty() {
            notified.await;
            continue;
        }
        let last = ops.last().map(|o| o.0);
        let ops: Vec<DirOp> = ops.into_iter().map(|o| o.1).collect();
        let mut backoff = Duration::from_millis(20);
        let reply = loop {
            let req = DirBatchRequest {
                session_id: d.meta.session(),
                ops: ops.clone(),
                release: give_back.clone(),
            };
            match d
                .meta
                .call_unordered("directory batch", |mut c| {
                    let req = req.clone();
                    async move { c.dir_batch(req).await }
                })
                .await
            {
                Ok(r) => break Some(r),
                Err(e) if e.errno() != libc::EIO => {
                    tracing::error!(error = %e, ops = ops.len(), "the metadata server refused a whole batch of directory operations");
                    break None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, ops = ops.len(), "directory batch not delivered; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        d.stats.batches.fetch_add(1, Ordering::Relaxed);
        let refused: Vec<(&DirOp, i32)> = match &reply {
            Some(r) => ops
                .iter()
                .zip(r.errno.iter().copied().chain(std::iter::repeat(0)))
                .filter(|(_, e)| *e != 0)
                .collect(),
            None => ops.iter().map(|o| (o, libc::EIO)).collect(),
        };
        for (op, errno) in refused {
            d.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                ?op,
                errno,
                "a directory operation answered here was refused by the metadata server"
            );
            // What this node told about the directory is not so: ask again.
            let (dir, name) = match &op.op {
                Some(dir_op::Op::Create(c)) => (c.parent, &c.name),
                Some(dir_op::Op::Unlink(u)) => (u.parent, &u.name),
                None => continue,
            };
            d.cache
                .drop_entry(dir, std::ffi::OsStr::from_bytes(name.as_slice()));
            d.cache.listing_forget(dir);
            d.cache.drop_attr(dir);
        }
        if let Some(s) = last {
            d.meta.applied(s);
        }
    }
}
