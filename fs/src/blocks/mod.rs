//! Blocks: immutable, named by the blake3 hash of their bytes.
//!
//! A node stores the blocks it writes in its [`local::LocalStore`] and sends
//! a copy to `replicas - 1` other nodes that are up. A read takes the block
//! from the memory cache, then the local store, then each holder in turn;
//! every copy read from disk or the network is checked against its name, and
//! a corrupt copy is skipped, counted and logged, never returned.
//!
//! # Layout
//! - [`local`]: the on-disk store, pins.
//! - [`cache`]: the memory cache of verified blocks.
//! - [`server`]: the `Blocks` gRPC service other nodes call.

pub mod cache;
pub mod local;
pub mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use migfs_proto::auth::{Present, Secret};
use migfs_proto::block::blocks_client::BlocksClient;
use migfs_proto::block::{Block, GetBlockRequest, PutBlocksRequest};
use migfs_proto::ids::BlockHash;
use migfs_proto::meta::{ListNodesRequest, NodeInfo};
use parking_lot::{Mutex, RwLock};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{FsError, Result};
use crate::meta_client::Meta;
use cache::BlockCache;
use local::LocalStore;

type Client = BlocksClient<InterceptedService<Channel, Present>>;

/// Counters a node reports in `/.migfs/stats`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Copies whose bytes did not match their name (local or remote).
    pub corrupt_blocks: AtomicU64,
    /// Blocks served from the memory cache.
    pub cache_hits: AtomicU64,
    /// Blocks read from the local store.
    pub local_reads: AtomicU64,
    /// Blocks fetched from another node.
    pub remote_reads: AtomicU64,
    /// Blocks written to the local store by this node's writers.
    pub blocks_written: AtomicU64,
    /// Block copies sent to other nodes.
    pub blocks_replicated: AtomicU64,
    /// Blocks deleted by garbage collection.
    pub blocks_collected: AtomicU64,
}

/// The node's view of block storage across the cluster.
#[derive(Debug)]
pub struct BlockStore {
    /// This node's files.
    pub local: LocalStore,
    /// Verified blocks in memory.
    pub cache: BlockCache,
    /// Counters.
    pub stats: Stats,
    node_id: AtomicU64,
    replicas: AtomicU64,
    peers: RwLock<Vec<NodeInfo>>,
    clients: Mutex<HashMap<String, Client>>,
    secret: Secret,
    meta: Arc<Meta>,
    peers_fetched: Mutex<Option<std::time::Instant>>,
}

impl BlockStore {
    /// A store over `local` with a memory cache of `cache_bytes`.
    pub fn new(
        local: LocalStore,
        cache_bytes: usize,
        secret: Secret,
        meta: Arc<Meta>,
    ) -> BlockStore {
        BlockStore {
            local,
            cache: BlockCache::new(cache_bytes),
            stats: Stats::default(),
            node_id: AtomicU64::new(0),
            replicas: AtomicU64::new(2),
            peers: RwLock::new(Vec::new()),
            clients: Mutex::new(HashMap::new()),
            secret,
            meta,
            peers_fetched: Mutex::new(None),
        }
    }

    /// Fetches the node list from the metadata server (at most every 50 ms,
    /// so a node that just joined gets replicas at once.
    pub async fn refresh_peers(&self) {
        self.refresh_peers_within(Duration::from_millis(50)).await;
    }

    /// Refreshes the node list unless it was fetched less than `fresh` ago.
    async fn refresh_peers_within(&self, fresh: Duration) {
        {
            let mut last = self.peers_fetched.lock();
            if last.is_some_and(|t| t.elapsed() < fresh) {
                return;
            }
            *last = Some(std::time::Instant::now());
        }
        match self
            .meta
            .call("list nodes", |mut c| async move {
                c.list_nodes(ListNodesRequest {}).await
            })
            .await
        {
            Ok(r) => self.set_peers(r.nodes),
            Err(e) => tracing::warn!(error = %e, "could not refresh the node list"),
        }
    }

    /// This node's id (set at registration).
    pub fn node_id(&self) -> u64 {
        self.node_id.load(Ordering::Relaxed)
    }

    /// Records this node's id and the cluster's replica count.
    pub fn set_identity(&self, node_id: u64, replicas: u32) {
        self.node_id.store(node_id, Ordering::Relaxed);
        self.replicas
            .store(u64::from(replicas.max(1)), Ordering::Relaxed);
    }

    /// Replaces the known node list (refreshed with heartbeats).
    pub fn set_peers(&self, nodes: Vec<NodeInfo>) {
        *self.peers.write() = nodes;
    }

    fn client(&self, addr: &str) -> Result<Client> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| FsError::Invalid(format!("node address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .initial_stream_window_size(migfs_proto::STREAM_WINDOW)
            .initial_connection_window_size(migfs_proto::CONNECTION_WINDOW)
            .max_frame_size(migfs_proto::MAX_FRAME);
        let c = BlocksClient::with_interceptor(ep.connect_lazy(), Present(self.secret.clone()))
            .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Stores blocks locally and on `replicas - 1` other up nodes; returns
    /// the ids of every node that now holds all of them.
    pub async fn write(self: &Arc<Self>, blocks: Vec<(BlockHash, Bytes)>) -> Result<Vec<u64>> {
        let me = self.node_id();
        let this = Arc::clone(self);
        let local_blocks = blocks.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            for (h, d) in &local_blocks {
                this.local.put(h, d)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| FsError::Invalid(format!("block writer task failed: {e}")))??;
        self.stats
            .blocks_written
            .fetch_add(blocks.len() as u64, Ordering::Relaxed);
        // Named by their own hash just now: verified by construction.
        for (h, d) in &blocks {
            self.cache.insert(*h, d.clone());
        }
        let mut holders = vec![me];
        let want = usize::try_from(self.replicas.load(Ordering::Relaxed)).unwrap_or(1) - 1;
        let mut peers = self.pick_peers(blocks.first().map(|b| b.0), want);
        if peers.len() < want {
            self.refresh_peers().await;
            peers = self.pick_peers(blocks.first().map(|b| b.0), want);
        }
        let msg = PutBlocksRequest {
            blocks: blocks
                .iter()
                .map(|(h, d)| Block {
                    hash: h.0.to_vec(),
                    data: d.clone(),
                })
                .collect(),
        };
        for p in peers {
            let mut c = self.client(&p.addr)?;
            match c.put_blocks(msg.clone()).await {
                Ok(_) => {
                    holders.push(p.node_id);
                    self.stats
                        .blocks_replicated
                        .fetch_add(blocks.len() as u64, Ordering::Relaxed);
                }
                Err(st) => {
                    tracing::warn!(node = %p.name, code = ?st.code(), message = st.message(), "replication failed; fewer copies")
                }
            }
        }
        Ok(holders)
    }

    /// Up nodes other than this one, in an order spread by the first hash.
    fn pick_peers(&self, first: Option<BlockHash>, want: usize) -> Vec<NodeInfo> {
        let me = self.node_id();
        let mut up: Vec<NodeInfo> = self
            .peers
            .read()
            .iter()
            .filter(|n| n.up && n.node_id != me)
            .cloned()
            .collect();
        let seed = first.map_or(0, |h| u64::from(h.0[0]));
        // Rendezvous order: highest (seed ^ id) hash first.
        up.sort_by_key(|n| {
            std::cmp::Reverse(
                blake3::hash(&(seed ^ n.node_id).to_le_bytes()).as_bytes()[..8].to_vec(),
            )
        });
        up.truncate(want);
        up
    }

    /// The verified bytes of block `h`, from the cache, this node or any holder.
    pub async fn read(self: &Arc<Self>, h: BlockHash, holders: &[u64]) -> Result<Bytes> {
        if let Some(d) = self.cache.get(&h) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        let mut reasons = Vec::new();
        match self.read_local(h).await {
            Ok(Some(d)) => return Ok(d),
            Ok(None) => {}
            Err(e) => reasons.push(format!("local: {e}")),
        }
        let me = self.node_id();
        let mut nodes = self.peers.read().clone();
        // A holder that registered after this node's last look at the list
        // is not in it yet: look again before calling it unknown.
        if holders
            .iter()
            .any(|&id| id != me && !nodes.iter().any(|n| n.node_id == id))
        {
            self.refresh_peers_within(Duration::ZERO).await;
            nodes = self.peers.read().clone();
        }
        for id in holders.iter().filter(|&&id| id != me) {
            let Some(n) = nodes.iter().find(|n| n.node_id == *id) else {
                reasons.push(format!("node#{id}: unknown"));
                continue;
            };
            match self.read_remote(h, n).await {
                Ok(d) => {
                    self.repair_local(h, &d);
                    return Ok(d);
                }
                Err(e) => reasons.push(format!("{}: {e}", n.name)),
            }
        }
        if reasons.is_empty() {
            reasons.push("no holder has it".into());
        }
        Err(FsError::Block {
            hash: h,
            reason: reasons.join("; "),
        })
    }

    async fn read_local(self: &Arc<Self>, h: BlockHash) -> Result<Option<Bytes>> {
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.read_local_blocking(h))
            .await
            .map_err(|e| FsError::Invalid(format!("block reader task failed: {e}")))?
    }

    /// Reads and verifies the local copy; a corrupt one is discarded.
    pub fn read_local_blocking(&self, h: BlockHash) -> Result<Option<Bytes>> {
        let Some(d) = self.local.get(&h)? else {
            return Ok(None);
        };
        if BlockHash::of(&d) != h {
            self.report_corrupt(h, "local store");
            self.local.discard(&h);
            return Err(FsError::Block {
                hash: h,
                reason: "local copy is corrupt (discarded)".into(),
            });
        }
        self.stats.local_reads.fetch_add(1, Ordering::Relaxed);
        let d = Bytes::from(d);
        self.cache.insert(h, d.clone());
        Ok(Some(d))
    }

    async fn read_remote(&self, h: BlockHash, n: &NodeInfo) -> Result<Bytes> {
        let mut c = self.client(&n.addr)?;
        let reply = c
            .get_block(GetBlockRequest { hash: h.0.to_vec() })
            .await
            .map_err(|st| FsError::Invalid(format!("{:?}: {}", st.code(), st.message())))?;
        let d = reply.into_inner().data;
        if BlockHash::of(&d) != h {
            self.report_corrupt(h, &n.name);
            return Err(FsError::Invalid("copy is corrupt".into()));
        }
        self.stats.remote_reads.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(h, d.clone());
        Ok(d)
    }

    /// Writes a good copy back over a missing or corrupt local one when this
    /// node was meant to hold it (best effort).
    fn repair_local(&self, h: BlockHash, d: &[u8]) {
        if self.local.contains(&h) {
            return;
        }
        if let Err(e) = self.local.put(&h, d) {
            tracing::debug!(hash = %h, error = %e, "could not cache fetched block locally");
        }
    }

    /// Counts and logs a corrupt copy.
    pub fn report_corrupt(&self, h: BlockHash, where_: &str) {
        let n = self.stats.corrupt_blocks.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(hash = %h, holder = where_, corrupt_total = n, "block copy does not match its blake3 name; skipped");
    }
}
