//! The releases of closed files, sent to the metadata server in batches.
//!
//! A close does not wait for its release to be recorded (the kernel does
//! not wait for FUSE_RELEASE either). Releases that queue up while one call
//! is on its way go together in the next, so a burst of closes costs a few
//! calls, not one each. The server counts opens per session and inode, so
//! a release that arrives after a later open of the same inode is still
//! right.

use std::sync::Arc;

use migfs_proto::meta::ReleaseRequest;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::meta_client::Meta;

/// Most closes sent in one call.
const BATCH: usize = 4096;

/// The queue of closes and the task that sends them.
#[derive(Debug)]
pub struct Closes {
    meta: Arc<Meta>,
    tx: Mutex<Option<mpsc::UnboundedSender<u64>>>,
}

impl Closes {
    /// Closes sent through `meta` (the task starts with the first).
    pub fn new(meta: Arc<Meta>) -> Closes {
        Closes {
            meta,
            tx: Mutex::new(None),
        }
    }

    /// Queues the release of one open of `ino` (inside the runtime).
    pub fn release(&self, ino: u64) {
        let mut tx = self.tx.lock();
        let tx = tx.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(send_loop(Arc::clone(&self.meta), rx));
            tx
        });
        if tx.send(ino).is_err() {
            tracing::warn!(ino, "release not recorded: the release task stopped");
        }
    }
}

async fn send_loop(meta: Arc<Meta>, mut rx: mpsc::UnboundedReceiver<u64>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let req = ReleaseRequest {
            session_id: meta.session(),
            ino: batch[0],
            also: batch[1..].to_vec(),
        };
        if let Err(e) = meta
            .call("release", |mut c| {
                let req = req.clone();
                async move { c.release(req).await }
            })
            .await
        {
            tracing::warn!(inodes = batch.len(), error = %e, "releases not recorded by the metadata server");
        }
        batch.clear();
    }
}
