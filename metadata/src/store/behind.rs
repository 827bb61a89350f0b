//! [`WriteBehind`]: the whole database in memory, written to a durable
//! store behind the callers' backs.
//!
//! sled 0.34 writes its log buffer out on every batch (a `pwrite` and a
//! `sync_file_range`: ~0.4 ms of CPU on this VM), which would put a disk
//! write on every create and unlink. Like the MooseFS master, the server
//! instead answers from memory: [`MetaStore::apply`] updates the in-memory
//! copy and queues the batch; one writer thread applies queued batches to
//! the durable store in order, grouping whatever has queued up into one
//! atomic write. After a crash the durable store holds a prefix of the
//! batches (groups are concatenations of whole batches).
//!
//! Opened with a change log ([`WriteBehind::open_logged`], what `migfs
//! meta` does), every batch is also appended to the log before its caller
//! is answered, so nothing answered is lost when the server process dies;
//! the writer can then wait for larger groups ([`LINGER_LOGGED`]), and
//! [`MetaStore::flush`] (a client's fsync) is one `fdatasync` of the log.
//! On open, the records the durable store lacks are applied to it again.
//! Without a log, the writer writes at once and `flush` waits for it and
//! flushes the durable store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::log::ChangeLog;
use super::{Batch, Entry, MemStore, MetaStore};
use crate::error::{MetaError, Result};
use crate::schema::{self, Tree};

/// Most writes grouped into one durable batch.
const GROUP_OPS: usize = 65_536;

/// With a change log, how long the writer lets changes gather after the
/// first one before it writes them as one group: under a stream of creates
/// this is one durable write per interval instead of one per change.
pub const LINGER_LOGGED: Duration = Duration::from_millis(20);

/// A change log is rotated once this large (and the old one removed once
/// the durable store holds and has flushed its records).
const ROTATE_BYTES: u64 = 64 << 20;

/// Key in [`Tree::Meta`]: the last logged batch the durable store holds.
const LOG_SEQ: &[u8] = b"log_seq";

#[derive(Debug, Default)]
struct Progress {
    /// Sequence number of the last batch the durable store holds.
    written: u64,
    /// The durable store failed: nothing is written any more.
    failed: Option<String>,
    /// Rotated logs, each with the last sequence number it holds.
    retired: Vec<(u64, PathBuf)>,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

/// Where batches go: the writer, and the log first if there is one.
struct Queue {
    tx: Sender<(u64, Batch)>,
    log: Option<ChangeLog>,
}

/// An in-memory copy of a durable store, written behind.
pub struct WriteBehind {
    mem: MemStore,
    disk: Arc<dyn MetaStore>,
    /// Orders logging, memory updates and queueing.
    queue: Mutex<Option<Queue>>,
    queued: AtomicU64,
    progress: Shared,
    writer: Mutex<Option<JoinHandle<()>>>,
    logged: bool,
}

impl std::fmt::Debug for WriteBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBehind")
            .field("queued", &self.queued.load(Ordering::Relaxed))
            .field("logged", &self.logged)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn load(disk: &dyn MetaStore) -> Result<MemStore> {
    let mem = MemStore::new();
    let mut all = Batch::new();
    for tree in Tree::ALL {
        for (k, v) in disk.scan(tree, &[], None, usize::MAX)? {
            all.put(tree, k, v);
        }
    }
    mem.apply(&all)?;
    Ok(mem)
}

impl WriteBehind {
    /// Loads every tree of `disk` into memory and starts the writer (no
    /// change log: see the module documentation).
    pub fn open(disk: Arc<dyn MetaStore>) -> Result<WriteBehind> {
        let mem = load(&*disk)?;
        WriteBehind::start(disk, mem, None, 0)
    }

    /// Like [`WriteBehind::open`] with a change log in `dir`: first
    /// applies to `disk` what the logs there hold and it does not.
    pub fn open_logged(disk: Arc<dyn MetaStore>, dir: &Path) -> Result<WriteBehind> {
        let applied = match disk.get(Tree::Meta, LOG_SEQ)? {
            Some(v) => schema::decode_u64(&v, Tree::Meta)?,
            None => 0,
        };
        let rec = ChangeLog::open(dir)?;
        let mut replay = Batch::new();
        let mut last = applied;
        for (seq, b) in rec.records.into_iter().filter(|(s, _)| *s > applied) {
            replay.ops.extend(b.ops);
            last = seq;
        }
        if last > applied {
            tracing::info!(
                batches = last - applied,
                writes = replay.len(),
                "applying logged changes the store lacks"
            );
            replay.put(Tree::Meta, LOG_SEQ, schema::encode_u64(last));
            disk.apply(&replay)?;
        }
        disk.flush()?;
        for p in &rec.old {
            std::fs::remove_file(p).map_err(|e| {
                MetaError::store("change log", format!("remove {}: {e}", p.display()))
            })?;
        }
        let mem = load(&*disk)?;
        WriteBehind::start(disk, mem, Some(rec.log), last)
    }

    fn start(
        disk: Arc<dyn MetaStore>,
        mem: MemStore,
        log: Option<ChangeLog>,
        seq: u64,
    ) -> Result<WriteBehind> {
        let (tx, rx) = channel();
        let progress: Shared = Arc::new((
            Mutex::new(Progress {
                written: seq,
                ..Progress::default()
            }),
            Condvar::new(),
        ));
        let logged = log.is_some();
        let writer = {
            let (disk, progress) = (Arc::clone(&disk), Arc::clone(&progress));
            std::thread::Builder::new()
                .name("meta-writer".into())
                .spawn(move || write_loop(&*disk, &rx, &progress, logged))
                .map_err(|e| MetaError::Internal(format!("start the store writer: {e}")))?
        };
        Ok(WriteBehind {
            mem,
            disk,
            queue: Mutex::new(Some(Queue { tx, log })),
            queued: AtomicU64::new(seq),
            progress,
            writer: Mutex::new(Some(writer)),
            logged,
        })
    }

    fn failed(&self) -> Option<String> {
        lock(&self.progress.0).failed.clone()
    }
}

/// Applies queued batches in order, grouping what is waiting.
fn write_loop(disk: &dyn MetaStore, rx: &Receiver<(u64, Batch)>, progress: &Shared, logged: bool) {
    while let Ok((mut last, first)) = rx.recv() {
        if logged {
            std::thread::sleep(LINGER_LOGGED);
        }
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
        if logged {
            group.put(Tree::Meta, LOG_SEQ, schema::encode_u64(last));
        }
        let res = disk
            .apply(&group)
            .and_then(|()| retire(disk, progress, last));
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

/// Removes the rotated logs whose records the durable store now holds
/// (after flushing it).
fn retire(disk: &dyn MetaStore, progress: &Shared, written: u64) -> Result<()> {
    let done: Vec<PathBuf> = {
        let mut p = lock(&progress.0);
        let (done, keep) = std::mem::take(&mut p.retired)
            .into_iter()
            .partition(|(seq, _)| *seq <= written);
        p.retired = keep;
        done.into_iter().map(|(_, path)| path).collect()
    };
    if done.is_empty() {
        return Ok(());
    }
    disk.flush()?;
    for path in done {
        std::fs::remove_file(&path).map_err(|e| {
            MetaError::store("change log", format!("remove {}: {e}", path.display()))
        })?;
    }
    Ok(())
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
        let mut q = lock(&self.queue);
        let q = q
            .as_mut()
            .ok_or_else(|| MetaError::Internal("store is closed".into()))?;
        let seq = self.queued.load(Ordering::SeqCst) + 1;
        if let Some(log) = &mut q.log {
            // Logged first: a change that cannot be logged is not made.
            log.append(seq, batch)?;
            if log.bytes() > ROTATE_BYTES {
                let old = log.rotate()?;
                lock(&self.progress.0).retired.push((seq, old));
            }
        }
        self.mem.apply(batch)?;
        self.queued.store(seq, Ordering::SeqCst);
        q.tx.send((seq, batch.clone()))
            .map_err(|_| MetaError::Internal("the store writer stopped".into()))
    }

    fn flush(&self) -> Result<()> {
        if self.logged {
            let file = lock(&self.queue)
                .as_ref()
                .and_then(|q| q.log.as_ref().map(ChangeLog::file));
            return match file {
                Some(f) => f
                    .sync_data()
                    .map_err(|e| MetaError::store("flush", format!("sync the change log: {e}"))),
                None => Err(MetaError::Internal("store is closed".into())),
            };
        }
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

    fn in_memory(&self) -> bool {
        true
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
