//! [`WriteBehind`]: the whole database in memory, written to a durable
//! store behind the callers' backs.
//!
//! sled 0.34 writes its log buffer out on every batch (a `pwrite` and a
//! `sync_file_range`, milliseconds on a busy disk), which would put a disk
//! write on every create and unlink. Like the MooseFS master, the server
//! instead answers from memory: [`MetaStore::apply`] updates the in-memory
//! copy and queues the batch; one writer thread applies queued batches to
//! the durable store in order, grouping whatever has queued up into one
//! atomic write. [`MetaStore::flush`] waits until everything queued before
//! it is written and then flushes the durable store, so what a client
//! fsync'd survives `kill -9`. After a crash the durable store holds a
//! prefix of the batches (groups are concatenations of whole batches), so
//! it is as consistent as after any batch; what was not flushed may be
//! lost, as with sled's own periodic flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{Batch, Entry, MemStore, MetaStore};
use crate::error::{MetaError, Result};
use crate::schema::Tree;

/// Most writes grouped into one durable batch.
const GROUP_OPS: usize = 65_536;

#[derive(Debug, Default)]
struct Progress {
    /// Sequence number of the last batch the durable store holds.
    written: u64,
    /// The durable store failed: nothing is written any more.
    failed: Option<String>,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

/// An in-memory copy of a durable store, written behind.
pub struct WriteBehind {
    mem: MemStore,
    disk: Arc<dyn MetaStore>,
    /// Orders memory updates and queueing.
    queue: Mutex<Option<Sender<(u64, Batch)>>>,
    queued: AtomicU64,
    progress: Shared,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl WriteBehind {
    /// Loads every tree of `disk` into memory and starts the writer.
    pub fn open(disk: Arc<dyn MetaStore>) -> Result<WriteBehind> {
        let mem = MemStore::new();
        let mut all = Batch::new();
        for tree in Tree::ALL {
            for (k, v) in disk.scan(tree, &[], None, usize::MAX)? {
                all.put(tree, k, v);
            }
        }
        mem.apply(&all)?;
        let (tx, rx) = channel();
        let progress: Shared = Arc::default();
        let writer = {
            let (disk, progress) = (Arc::clone(&disk), Arc::clone(&progress));
            std::thread::Builder::new()
                .name("meta-writer".into())
                .spawn(move || write_loop(&*disk, &rx, &progress))
                .map_err(|e| MetaError::Internal(format!("start the store writer: {e}")))?
        };
        Ok(WriteBehind {
            mem,
            disk,
            queue: Mutex::new(Some(tx)),
            queued: AtomicU64::new(0),
            progress,
            writer: Mutex::new(Some(writer)),
        })
    }

    fn failed(&self) -> Option<String> {
        lock(&self.progress.0).failed.clone()
    }
}

/// Applies queued batches in order, grouping what is waiting.
fn write_loop(disk: &dyn MetaStore, rx: &Receiver<(u64, Batch)>, progress: &Shared) {
    while let Ok((mut last, first)) = rx.recv() {
        let mut group = first;
        while group.len() < GROUP_OPS {
            match rx.try_recv() {
                Ok((seq, b)) => {
                    group.ops.extend(b.ops);
                    last = seq;
                }
                Err(_) => break,
            }
        }
        let res = disk.apply(&group);
        let (m, cv) = &**progress;
        let mut p = lock(m);
        match res {
            Ok(()) => p.written = last,
            Err(e) => {
                tracing::error!(error = %e, "writing metadata to disk failed; refusing further changes");
                p.failed = Some(e.to_string());
                cv.notify_all();
                return;
            }
        }
        cv.notify_all();
    }
}

impl MetaStore for WriteBehind {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.mem.get(tree, key)
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        self.mem.scan(tree, start, end, limit)
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        if let Some(e) = self.failed() {
            return Err(MetaError::store(
                "apply",
                format!("the database is not being written: {e}"),
            ));
        }
        let q = lock(&self.queue);
        let tx = q
            .as_ref()
            .ok_or_else(|| MetaError::Internal("store is closed".into()))?;
        self.mem.apply(batch)?;
        let seq = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        tx.send((seq, batch.clone()))
            .map_err(|_| MetaError::Internal("the store writer stopped".into()))
    }

    fn flush(&self) -> Result<()> {
        let target = self.queued.load(Ordering::SeqCst);
        let (m, cv) = &*self.progress;
        let mut p = lock(m);
        while p.written < target && p.failed.is_none() {
            p = cv
                .wait(p)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if let Some(e) = &p.failed {
            return Err(MetaError::store("flush", e.clone()));
        }
        drop(p);
        self.disk.flush()
    }

    fn next_id(&self) -> Result<u64> {
        self.disk.next_id()
    }
}

impl Drop for WriteBehind {
    /// Writes out everything queued before the store goes away.
    fn drop(&mut self) {
        lock(&self.queue).take();
        if let Some(w) = lock(&self.writer).take() {
            let _ = w.join();
        }
        let _ = self.disk.flush();
    }
}
