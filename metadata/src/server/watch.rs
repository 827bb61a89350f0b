//! The Watch stream: the invalidations of every other session's committed
//! operations, for one session, until it ends or the server stops.

use std::sync::Arc;

use migfs_proto::meta::Invalidation;
use migfs_proto::meta::invalidation::Kind;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::delegate::Delegations;
use crate::db::{Event, MetaDb};

/// The stream type of the Watch RPC.
pub type WatchStream = ReceiverStream<Result<Invalidation, Status>>;

/// Invalidations a slow watcher may have queued before the broadcast
/// channel starts counting it as lagging.
const QUEUE: usize = 256;

/// Starts the stream for `session`. `rx` must have been subscribed before
/// the session was checked, so nothing committed afterwards is missed.
pub fn start(
    db: &Arc<MetaDb>,
    dele: &Arc<Delegations>,
    session: u64,
    rx: broadcast::Receiver<Event>,
) -> WatchStream {
    let (tx, out) = mpsc::channel(QUEUE);
    dele.watch_started(session);
    let dele = Arc::clone(dele);
    tokio::spawn(async move {
        forward(rx, tx, session).await;
        dele.watch_ended(session);
    });
    tracing::debug!(session, watchers = db.watchers(), "watch stream started");
    ReceiverStream::new(out)
}

async fn forward(
    mut rx: broadcast::Receiver<Event>,
    tx: mpsc::Sender<Result<Invalidation, Status>>,
    session: u64,
) {
    loop {
        let ev = tokio::select! {
            () = tx.closed() => return,
            ev = rx.recv() => ev,
        };
        let batch = match ev {
            Ok(Event::Changed { origin, invals }) if origin != session => invals,
            Ok(Event::Changed { .. }) => continue,
            Ok(Event::Ended(s)) if s == session || s == 0 => return,
            Ok(Event::Ended(_)) => continue,
            Ok(Event::Recall { session: s, dir }) if s == session => {
                Arc::from(vec![Invalidation {
                    kind: Kind::Recall.into(),
                    ino: dir,
                    ..Default::default()
                }])
            }
            Ok(Event::Recall { .. }) => continue,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(session, missed, "watcher fell behind");
                let all = Invalidation {
                    kind: Kind::All.into(),
                    ..Default::default()
                };
                Arc::from(vec![all])
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for inv in batch.iter() {
            if tx.send(Ok(inv.clone())).await.is_err() {
                return;
            }
        }
    }
}
