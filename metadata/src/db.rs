//! [`MetaDb`]: a store plus the discipline every operation follows.
//!
//! * One writer at a time: a mutating operation takes the writer mutex,
//!   reads the state, computes one [`crate::ops::Txn`] and applies its batch
//!   atomically. Operations are therefore serializable without the store
//!   having to run range scans inside its transactions.
//! * Readers share an `RwLock` that the writer holds exclusively only while
//!   applying a batch, so no reader sees half of one.
//! * After a batch is applied, its invalidations go to every watcher
//!   through a broadcast channel, in commit order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use migfs_proto::meta::Invalidation;
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::error::{MetaError, Result};
use crate::ops::{Txn, format};
use crate::schema::Cluster;
use crate::store::MetaStore;

/// Server settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a session lives without a heartbeat.
    pub lease: Duration,
    /// Chunk size, used only when a new database is created.
    pub block_size: u32,
    /// Block copies, used only when a new database is created.
    pub replicas: u32,
    /// Capacity of the invalidation channel; a watcher further behind gets
    /// one `ALL` invalidation instead of what it missed.
    pub watch_backlog: usize,
    /// A directory's delegation is granted only when no other session read
    /// its names for this long (longer than the nodes' kernel entry TTL).
    pub delegate_quiet: Duration,
    /// How long a recall waits for the holder before taking the delegation.
    pub recall_wait: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lease: Duration::from_secs(10),
            block_size: 65536,
            replicas: 2,
            watch_backlog: 4096,
            delegate_quiet: Duration::from_secs(2),
            recall_wait: Duration::from_secs(5),
        }
    }
}

/// What watchers receive.
#[derive(Clone, Debug)]
pub enum Event {
    /// A committed operation of session `origin` changed these things.
    Changed {
        /// The session that made the change (it is not told).
        origin: u64,
        /// What changed.
        invals: Arc<[Invalidation]>,
    },
    /// The session ended: its watch stream closes (0: every session's, the
    /// server is shutting down).
    Ended(u64),
    /// `session` is asked to give back its delegation of `dir`.
    Recall {
        /// The holder.
        session: u64,
        /// The directory.
        dir: u64,
    },
}

/// The metadata database: store, single-writer discipline, events.
pub struct MetaDb {
    store: Arc<dyn MetaStore>,
    writer: Mutex<()>,
    view: RwLock<()>,
    config: Config,
    cluster: Cluster,
    events: broadcast::Sender<Event>,
    closing: AtomicBool,
}

impl std::fmt::Debug for MetaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaDb")
            .field("config", &self.config)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// Now, in ns since the epoch.
pub fn now_ns() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl MetaDb {
    /// Opens the database in `store`, creating the root directory and the
    /// cluster constants on first use; refuses a foreign format version.
    /// Stored sessions get a full lease from now (their nodes may be alive
    /// and only waiting for the server).
    pub fn open(store: Arc<dyn MetaStore>, config: Config) -> Result<MetaDb> {
        let wanted = Cluster {
            block_size: config.block_size,
            replicas: config.replicas,
        };
        let cluster = format::open_or_format(store.as_ref(), wanted, now_ns())?;
        let (events, _) = broadcast::channel(config.watch_backlog.max(16));
        let db = MetaDb {
            store,
            writer: Mutex::new(()),
            view: RwLock::new(()),
            config,
            cluster,
            events,
            closing: AtomicBool::new(false),
        };
        let lease_ms = db.lease_ms();
        db.write(0, |t| crate::ops::sessions::renew_all(t, lease_ms))?;
        Ok(db)
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The cluster constants.
    pub fn cluster(&self) -> Cluster {
        self.cluster
    }

    /// The lease length in ms.
    pub fn lease_ms(&self) -> i64 {
        i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Runs the mutating operation `op` on behalf of session `origin`:
    /// computes its writes under the writer mutex, applies them as one
    /// batch, then announces its invalidations to the other sessions.
    pub fn write<R>(&self, origin: u64, op: impl FnOnce(&mut Txn<'_>) -> Result<R>) -> Result<R> {
        let _w = self.writer.lock();
        let mut txn = Txn::new(self.store.as_ref(), now_ns(), self.cluster);
        let ret = op(&mut txn)?;
        let out = txn.finish();
        if !out.batch.is_empty() {
            let _v = self.view.write();
            self.store.apply(&out.batch)?;
        }
        if !out.invals.is_empty() {
            // No receiver is not an error: nobody is watching.
            let _ = self.events.send(Event::Changed {
                origin,
                invals: out.invals.into(),
            });
        }
        for s in out.ended {
            let _ = self.events.send(Event::Ended(s));
        }
        Ok(ret)
    }

    /// Sends `ev` to the watchers (delegation recalls and grants).
    pub fn announce(&self, ev: Event) {
        let _ = self.events.send(ev);
    }

    /// Runs the read-only operation `op` on a consistent view.
    pub fn read<R>(&self, op: impl FnOnce(&dyn MetaStore) -> Result<R>) -> Result<R> {
        let _v = self.view.read();
        op(self.store.as_ref())
    }

    /// Whether operations are answered from memory (see
    /// [`MetaStore::in_memory`]).
    pub fn in_memory(&self) -> bool {
        self.store.in_memory()
    }

    /// Makes everything applied so far durable.
    pub fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Announces that the server is going away: every watch stream ends
    /// (they receive `Event::Ended(0)`), and no new one starts.
    pub fn close_watchers(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let _ = self.events.send(Event::Ended(0));
    }

    /// Number of live watch subscriptions.
    pub fn watchers(&self) -> usize {
        self.events.receiver_count()
    }

    /// Whether [`MetaDb::close_watchers`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }
}

/// The error for a broken invariant of the stored data.
pub(crate) fn invariant(what: impl Into<String>) -> MetaError {
    MetaError::Internal(what.into())
}
