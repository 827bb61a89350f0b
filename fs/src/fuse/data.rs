//! File data on a node: write buffers, uploads, commits and reads.
//!
//! A write lands in a per-inode buffer of whole blocks. A block that fills
//! up is handed at once to an upload task (hash, store locally, replicate),
//! so hashing and copying overlap with the next writes; partial blocks wait
//! for `flush` (close), `fsync` or the periodic flusher. Uploaded blocks are
//! published to the metadata server in one `CommitBlocks` per batch: that
//! is the close-to-open point after which other nodes see the data.
//!
//! Reads look, in order, at the dirty buffer, the blocks being uploaded, and
//! the committed block map (fetched in windows and cached per data version).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use migfs_proto::ids::BlockHash;
use migfs_proto::meta::{Attr, BlockRef, CommitBlocksRequest, GetBlocksRequest};
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

use crate::blocks::BlockStore;
use crate::cache::MetaCache;
use crate::error::{FsError, Result};
use crate::meta_client::Meta;

/// Block-map entries fetched per `GetBlocks` call.
const MAP_WINDOW: u64 = 4096;
/// How often a block map older than a known data version is asked again.
const MAP_RETRIES: usize = 8;
/// Uploaded blocks that trigger a background commit.
const COMMIT_BATCH: usize = 512;
/// Blocks fetched ahead of a sequential reader.
const PREFETCH_BLOCKS: u64 = 32;

/// The state of one inode's data on this node.
#[derive(Debug, Default)]
pub struct DataState {
    /// Local handles open on the inode.
    pub opens: u32,
    /// Blocks written but not yet uploaded: index → bytes from the block start.
    dirty: BTreeMap<u64, Vec<u8>>,
    /// Blocks being uploaded or uploaded but not yet committed.
    uploading: HashMap<u64, (u64, Bytes)>,
    /// Uploaded blocks awaiting commit: index → (sequence, ref).
    pending: HashMap<u64, (u64, BlockRef)>,
    in_flight: usize,
    seq: u64,
    /// The file size as this node knows it.
    pub size: u64,
    /// Whether local writes may have extended the file.
    grown: bool,
    /// The size when the last write was handed to upload with nothing
    /// left dirty: the end that the uploaded blocks cover.
    taken_size: u64,
    /// Uploads that failed so far (each handle reports those it has not
    /// reported yet), and the errno and message of the last one.
    errors: u64,
    last_error: Option<(i32, String)>,
    /// A failed upload that no flush has dealt with yet: the next one
    /// publishes what did arrive, not the grown size.
    unhandled: bool,
    map: HashMap<u64, BlockRef>,
    windows: HashSet<u64>,
    /// The data version the cached map belongs to (0 after an invalidation).
    pub version: u64,
    /// The highest data version this node has learned: attributes older
    /// than this (a reply that raced with a newer commit) are not trusted.
    seen: u64,
    /// When the oldest unpublished write happened.
    pub dirty_since: Option<Instant>,
    /// The block after the last one read (sequential detection).
    next_read: u64,
    /// Blocks up to here were already asked for by prefetch.
    prefetched: u64,
}

/// One inode's data, shared by every handle open on it.
#[derive(Debug)]
pub struct FileData {
    /// The inode.
    pub ino: u64,
    /// Mutable state.
    pub st: Mutex<DataState>,
    uploaded: Notify,
    commit_lock: tokio::sync::Mutex<()>,
}

/// One open of an inode on this node (a kernel file handle, shared by
/// every process the open file description was passed to). Upload errors
/// are the inode's; each handle reports each one once to a write or close
/// and once to an fsync, like the kernel's per-file writeback errors, so a
/// close in a child (close-on-exec) or a flush by the node itself cannot
/// take an error away from the fsync of the process that wrote.
#[derive(Debug)]
pub struct Handle {
    /// The inode's data.
    pub data: Arc<FileData>,
    told: AtomicU64,
    synced: AtomicU64,
}

impl Handle {
    /// A handle that reports the upload errors from now on.
    pub fn new(data: Arc<FileData>) -> Handle {
        let seen = data.st.lock().errors;
        Handle {
            data,
            told: AtomicU64::new(seen),
            synced: AtomicU64::new(seen),
        }
    }

    /// For a write or close: the last upload error this handle's writes
    /// and closes have not reported yet.
    pub fn unreported(&self) -> Result<()> {
        self.report(&self.told)
    }

    /// For an fsync: the last upload error no fsync of this handle has
    /// reported yet.
    pub fn unsynced(&self) -> Result<()> {
        self.report(&self.synced)
    }

    fn report(&self, seen: &AtomicU64) -> Result<()> {
        let st = self.data.st.lock();
        if seen.swap(st.errors, Ordering::Relaxed) >= st.errors {
            return Ok(());
        }
        let (errno, message) = st.last_error.clone().unwrap_or((libc::EIO, String::new()));
        Err(FsError::Lost { errno, message })
    }
}

/// What the data path needs from the node (cheap to clone: handles only).
#[derive(Debug, Clone)]
pub struct DataCtx {
    /// Metadata server.
    pub meta: Arc<Meta>,
    /// Block storage.
    pub blocks: Arc<BlockStore>,
    /// The cluster's block size.
    pub block_size: u64,
    /// Bounds the blocks being uploaded at once (memory back-pressure).
    pub upload_slots: Arc<Semaphore>,
    /// The user-space attribute cache, refreshed by every commit.
    pub cache: Arc<MetaCache>,
    /// Whether fsync also forces the block store to stable storage (power
    /// loss); without it fsync'd data survives a crash of any daemon.
    pub fsync_blocks: bool,
}

impl FileData {
    /// Fresh state for an inode whose attributes are `attr`.
    pub fn new(attr: &Attr) -> FileData {
        FileData {
            ino: attr.ino,
            st: Mutex::new(DataState {
                size: attr.size,
                version: attr.data_version,
                seen: attr.data_version,
                ..DataState::default()
            }),
            uploaded: Notify::new(),
            commit_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether anything written here is not yet published, or a failed
    /// upload not yet dealt with.
    pub fn is_dirty(&self) -> bool {
        let st = self.st.lock();
        !st.dirty.is_empty()
            || !st.pending.is_empty()
            || st.in_flight > 0
            || st.grown
            || st.unhandled
    }

    /// After a commit: with nothing left to publish, the periodic
    /// publisher has nothing to do here.
    fn settled(&self) {
        let mut st = self.st.lock();
        if st.dirty.is_empty() && st.pending.is_empty() && st.in_flight == 0 && !st.grown {
            st.dirty_since = None;
        }
    }

    /// Drops the cached block map if the server's data version moved on
    /// (another node published data); says whether cached pages may be kept.
    pub fn revalidate(&self, attr: &Attr) -> bool {
        let mut st = self.st.lock();
        if attr.data_version < st.seen {
            // Older than a commit this node already saw (the reply was
            // overtaken): its size would move the end of file back.
            return false;
        }
        st.seen = attr.data_version;
        if st.version == attr.data_version {
            return true;
        }
        st.map.clear();
        st.windows.clear();
        st.prefetched = 0;
        st.version = attr.data_version;
        let unpublished =
            !st.dirty.is_empty() || !st.uploading.is_empty() || !st.pending.is_empty() || st.grown;
        if !unpublished {
            st.size = attr.size;
        } else {
            st.size = st.size.max(attr.size);
        }
        false
    }

    /// Forgets the cached map (an invalidation arrived for the inode).
    pub fn invalidate_map(&self) {
        let mut st = self.st.lock();
        st.map.clear();
        st.windows.clear();
        st.version = 0;
        st.prefetched = 0;
    }

    /// After a truncate to `size` on the server (dirty data was flushed first).
    pub fn truncated(&self, attr: &Attr) {
        let mut st = self.st.lock();
        st.map.clear();
        st.windows.clear();
        st.version = attr.data_version;
        st.seen = st.seen.max(attr.data_version);
        st.size = attr.size;
        st.taken_size = attr.size;
        st.grown = false;
    }
}

impl DataCtx {
    /// The largest file size: 2^32 blocks.
    pub fn max_file_size(&self) -> u64 {
        self.block_size << 32
    }

    /// Writes `data` at `offset`; returns the bytes taken.
    pub async fn write(&self, h: &Handle, offset: u64, data: &[u8]) -> Result<u32> {
        h.unreported()?;
        let fd = &h.data;
        let bs = self.block_size;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.max_file_size())
            .ok_or(FsError::Local {
                op: "write",
                errno: libc::EFBIG,
            })?;
        let first = offset / bs;
        let last = (end.max(1) - 1) / bs;
        // Blocks partly overwritten need their old bytes first.
        let mut bases = HashMap::new();
        for idx in [first, last] {
            let covers_all = offset <= idx * bs && end >= (idx + 1) * bs;
            if !covers_all
                && !bases.contains_key(&idx)
                && let Some(b) = self.base_block(fd, idx).await?
            {
                bases.insert(idx, b);
            }
        }
        let full = {
            let mut st = fd.st.lock();
            let mut full = Vec::new();
            for idx in first..=last {
                let bstart = idx * bs;
                let from = offset.max(bstart);
                let to = end.min(bstart + bs);
                let buf = st
                    .dirty
                    .entry(idx)
                    .or_insert_with(|| bases.remove(&idx).unwrap_or_default());
                let (lo, hi) = (usize_of(from - bstart), usize_of(to - bstart));
                if buf.len() < hi {
                    buf.resize(hi, 0);
                }
                buf[lo..hi].copy_from_slice(&data[usize_of(from - offset)..usize_of(to - offset)]);
                if buf.len() as u64 == bs && to == bstart + bs {
                    full.push(idx);
                }
            }
            if end > st.size {
                st.size = end;
                st.grown = true;
            }
            st.dirty_since.get_or_insert_with(Instant::now);
            self.take_for_upload(&mut st, &full)
        };
        if !full.is_empty() {
            self.spawn_upload(fd, full).await;
        }
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    /// The current bytes of block `idx` when it is not dirty yet (None: it is).
    async fn base_block(&self, fd: &Arc<FileData>, idx: u64) -> Result<Option<Vec<u8>>> {
        {
            let st = fd.st.lock();
            if st.dirty.contains_key(&idx) {
                return Ok(None);
            }
            if let Some((_, b)) = st.uploading.get(&idx) {
                return Ok(Some(b.to_vec()));
            }
            if idx * self.block_size >= st.size && st.windows.contains(&(idx / MAP_WINDOW)) {
                return Ok(Some(Vec::new()));
            }
        }
        match self.committed_block(fd, idx).await? {
            Some(b) => Ok(Some(b.to_vec())),
            None => Ok(Some(Vec::new())),
        }
    }

    /// Moves the listed dirty blocks to `uploading`, assigning sequence numbers.
    fn take_for_upload(&self, st: &mut DataState, idxs: &[u64]) -> Vec<(u64, u64, Bytes)> {
        let mut out = Vec::with_capacity(idxs.len());
        for &idx in idxs {
            if let Some(buf) = st.dirty.remove(&idx) {
                st.seq += 1;
                let b = Bytes::from(buf);
                st.uploading.insert(idx, (st.seq, b.clone()));
                out.push((idx, st.seq, b));
            }
        }
        st.in_flight += out.len();
        if st.dirty.is_empty() {
            st.taken_size = st.size;
        }
        out
    }

    /// Starts uploading blocks; waits for room first (back-pressure).
    async fn spawn_upload(&self, fd: &Arc<FileData>, blocks: Vec<(u64, u64, Bytes)>) {
        let n = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
        let permit = Arc::clone(&self.upload_slots).acquire_many_owned(n).await;
        let ctx = self.clone();
        let store = Arc::clone(&self.blocks);
        let fd = Arc::clone(fd);
        tokio::spawn(async move {
            let hashed: Vec<(u64, u64, BlockHash, Bytes)> = blocks
                .into_iter()
                .map(|(i, s, b)| (i, s, BlockHash::of(&b), b))
                .collect();
            let res = store
                .write(hashed.iter().map(|(_, _, h, b)| (*h, b.clone())).collect())
                .await;
            drop(permit);
            let commit_now = {
                let mut st = fd.st.lock();
                st.in_flight -= hashed.len();
                match res {
                    Ok(holders) => {
                        for (idx, seq, h, b) in hashed {
                            let r = BlockRef {
                                index: idx,
                                hash: h.0.to_vec(),
                                len: u32::try_from(b.len()).unwrap_or(u32::MAX),
                                holders: holders.clone(),
                            };
                            match st.pending.get(&idx) {
                                Some((s, _)) if *s > seq => {}
                                _ => {
                                    st.pending.insert(idx, (seq, r));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(ino = fd.ino, error = %e, "block upload failed");
                        st.errors += 1;
                        st.last_error = Some((e.errno(), e.to_string()));
                        st.unhandled = true;
                    }
                }
                st.pending.len() >= COMMIT_BATCH
            };
            fd.uploaded.notify_waiters();
            if commit_now && let Err(e) = ctx.commit(&fd).await {
                // The batch is back in `pending`: the next flush retries.
                tracing::warn!(ino = fd.ino, error = %e, "background commit failed");
            }
        });
    }

    /// Uploads every dirty block, waits for all uploads and commits: after
    /// this returns Ok, other nodes that open the file see the data. It
    /// fails when the commit does or when it finds an upload that failed
    /// (which handles report on their own: `Handle::unreported`).
    pub async fn flush(&self, fd: &Arc<FileData>) -> Result<()> {
        let rest = {
            let mut st = fd.st.lock();
            let idxs: Vec<u64> = st.dirty.keys().copied().collect();
            self.take_for_upload(&mut st, &idxs)
        };
        if !rest.is_empty() {
            self.spawn_upload(fd, rest).await;
        }
        loop {
            let notified = fd.uploaded.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if fd.st.lock().in_flight == 0 {
                break;
            }
            notified.await;
        }
        // After a failed upload, publish the blocks that did arrive but not
        // the grown size: the file must not gain a hole where the lost
        // bytes were.
        let failed = {
            let mut st = fd.st.lock();
            let failed = std::mem::take(&mut st.unhandled);
            if failed {
                st.grown = false;
            }
            failed.then(|| st.last_error.clone())
        };
        let committed = self.commit(fd).await;
        if failed.is_some() {
            // This node's idea of the size goes back to what was published.
            let ino = fd.ino;
            let attr = self
                .meta
                .call("getattr", |mut c| async move {
                    c.get_attr(migfs_proto::meta::InoRequest { ino }).await
                })
                .await;
            if let Ok(a) = attr {
                fd.st.lock().size = a.size;
                self.cache.put_attr(&a);
            }
        }
        committed?;
        match failed {
            Some(Some((errno, message))) => Err(FsError::Lost { errno, message }),
            Some(None) => Err(FsError::Lost {
                errno: libc::EIO,
                message: String::new(),
            }),
            None => Ok(()),
        }
    }

    /// Publishes uploaded blocks and the grown size.
    async fn commit(&self, fd: &Arc<FileData>) -> Result<()> {
        let _serial = fd.commit_lock.lock().await;
        let (refs, size, grown) = {
            let mut st = fd.st.lock();
            let refs: Vec<(u64, BlockRef)> = st.pending.drain().map(|(_, v)| v).collect();
            // A grown size is published only up to where every write is
            // uploaded: a block still dirty or uploading may be what grew
            // it, and other nodes would read zeros up to the new end.
            let grown = st.grown && st.in_flight == 0;
            let size = st.taken_size;
            if grown && st.dirty.is_empty() && size == st.size {
                st.grown = false;
            }
            (refs, size, grown)
        };
        if refs.is_empty() && !grown {
            fd.settled();
            return Ok(());
        }
        let mut groups: BTreeMap<Vec<u64>, Vec<(u64, BlockRef)>> = BTreeMap::new();
        for (seq, r) in refs {
            groups.entry(r.holders.clone()).or_default().push((seq, r));
        }
        if groups.is_empty() {
            groups.insert(Vec::new(), Vec::new());
        }
        let session = self.meta.session();
        for (holders, batch) in groups {
            let req = CommitBlocksRequest {
                session_id: session,
                ino: fd.ino,
                blocks: batch
                    .iter()
                    .map(|(_, r)| BlockRef {
                        holders: Vec::new(),
                        ..r.clone()
                    })
                    .collect(),
                holders: holders.clone(),
                min_size: if grown { size } else { 0 },
                mtime_ns: None,
                expect_version: 0,
            };
            let attr = self
                .meta
                .call("commit", |mut c| {
                    let req = req.clone();
                    async move { c.commit_blocks(req).await }
                })
                .await;
            let mut st = fd.st.lock();
            let attr = match attr {
                Ok(a) => a,
                Err(e) => {
                    // Put the batch back so a later flush retries it.
                    for (seq, r) in batch {
                        st.pending.entry(r.index).or_insert((seq, r));
                    }
                    st.grown |= grown;
                    return Err(e);
                }
            };
            for (seq, mut r) in batch {
                if st.uploading.get(&r.index).is_some_and(|(s, _)| *s <= seq) {
                    st.uploading.remove(&r.index);
                }
                if let Ok(h) = BlockHash::try_from(r.hash.as_slice()) {
                    self.blocks.local.unpin(&h);
                }
                r.holders = holders.clone();
                st.map.insert(r.index, r);
            }
            st.version = attr.data_version;
            st.seen = st.seen.max(attr.data_version);
            st.size = st.size.max(attr.size);
            self.cache.put_attr(&attr);
        }
        fd.settled();
        Ok(())
    }

    /// Reads up to `size` bytes at `offset`. The blocks of one request are
    /// fetched and verified in parallel; sequential readers also get the
    /// next blocks prefetched into the cache.
    pub async fn read(&self, fd: &Arc<FileData>, offset: u64, size: u32) -> Result<Vec<u8>> {
        let file_size = fd.st.lock().size;
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(size)).min(file_size);
        let bs = self.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let blocks =
            futures::future::try_join_all((first..=last).map(|idx| self.block_bytes(fd, idx)))
                .await?;
        let mut out = vec![0u8; usize_of(end - offset)];
        for (idx, block) in (first..=last).zip(blocks) {
            let bstart = idx * bs;
            let from = offset.max(bstart);
            let to = end.min(bstart + bs);
            let (lo, hi) = (usize_of(from - bstart), usize_of(to - bstart));
            if lo < block.len() {
                let avail = hi.min(block.len());
                let dst = usize_of(from - offset);
                out[dst..dst + (avail - lo)].copy_from_slice(&block[lo..avail]);
            }
        }
        self.prefetch(fd, first, last);
        Ok(out)
    }

    /// After a read of blocks `first..=last` that continues the previous
    /// one, starts fetching the following blocks into the cache.
    fn prefetch(&self, fd: &Arc<FileData>, first: u64, last: u64) {
        let todo: Vec<BlockRef> = {
            let mut st = fd.st.lock();
            let sequential = first <= st.next_read && st.next_read <= last + 1;
            st.next_read = last + 1;
            if !sequential {
                return;
            }
            let from = st.prefetched.max(last + 1);
            let to = last + 1 + PREFETCH_BLOCKS;
            st.prefetched = to;
            (from..to).filter_map(|i| st.map.get(&i).cloned()).collect()
        };
        for r in todo {
            let Ok(h) = BlockHash::try_from(r.hash.as_slice()) else {
                continue;
            };
            let store = Arc::clone(&self.blocks);
            tokio::spawn(async move {
                if let Err(e) = store.read(h, &r.holders).await {
                    tracing::debug!(hash = %h, error = %e, "prefetch failed");
                }
            });
        }
    }

    /// The current bytes of block `idx` (shorter than a block: zeros follow).
    async fn block_bytes(&self, fd: &Arc<FileData>, idx: u64) -> Result<Bytes> {
        {
            let st = fd.st.lock();
            if let Some(b) = st.dirty.get(&idx) {
                return Ok(Bytes::copy_from_slice(b));
            }
            if let Some((_, b)) = st.uploading.get(&idx) {
                return Ok(b.clone());
            }
        }
        Ok(self.committed_block(fd, idx).await?.unwrap_or_default())
    }

    /// The committed bytes of block `idx`, cut to its valid length.
    async fn committed_block(&self, fd: &Arc<FileData>, idx: u64) -> Result<Option<Bytes>> {
        let w = idx / MAP_WINDOW;
        if !fd.st.lock().windows.contains(&w) {
            self.load_window(fd, w).await?;
        }
        let Some(r) = fd.st.lock().map.get(&idx).cloned() else {
            return Ok(None);
        };
        let h = BlockHash::try_from(r.hash.as_slice())
            .map_err(|e| FsError::Invalid(format!("block map of inode {}: {e}", fd.ino)))?;
        let data = self.blocks.read(h, &r.holders).await?;
        let len = usize::try_from(r.len).unwrap_or(usize::MAX).min(data.len());
        Ok(Some(data.slice(..len)))
    }

    /// Loads window `w` of the block map. A reply older than a data
    /// version this node already saw (it raced with a commit) is asked
    /// again: its map would show old, shorter blocks under a newer size.
    async fn load_window(&self, fd: &Arc<FileData>, w: u64) -> Result<()> {
        let req = GetBlocksRequest {
            ino: fd.ino,
            first_index: w * MAP_WINDOW,
            count: MAP_WINDOW,
        };
        for _ in 0..MAP_RETRIES {
            let reply = self
                .meta
                .call("get blocks", |mut c| async move { c.get_blocks(req).await })
                .await?;
            let mut st = fd.st.lock();
            let version = reply.attr.as_ref().map_or(0, |a| a.data_version);
            if version < st.seen {
                continue;
            }
            st.seen = version;
            if version != st.version {
                st.map.clear();
                st.windows.clear();
                st.version = version;
            }
            for r in reply.blocks {
                st.map.insert(r.index, r);
            }
            st.windows.insert(w);
            return Ok(());
        }
        Err(FsError::Invalid(format!(
            "the block map of inode {} stayed older than version {} ({MAP_RETRIES} tries)",
            fd.ino,
            fd.st.lock().seen
        )))
    }
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}
