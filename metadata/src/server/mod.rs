//! The metadata server: the tonic [`MetaService`] behind the cluster-secret
//! check, the session reaper, and graceful shutdown.

pub mod delegate;
mod load;
mod meta_svc;
pub mod watch;

pub use self::meta_svc::MetaService;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use migfs_proto::auth::{Check, Secret};
use migfs_proto::meta::meta_server::MetaServer;
use tokio::net::TcpListener;
use tokio::sync::watch as signal;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::db::{Config, MetaDb, now_ns};
use crate::error::Result;
use crate::ops::sessions;
use crate::store::MetaStore;

/// Opens `store` (formatting it if new) and serves it on `listener` until
/// `shutdown` completes; then stops the watch streams, finishes in-flight
/// requests and flushes the store.
pub async fn run(
    store: Arc<dyn MetaStore>,
    config: Config,
    listener: TcpListener,
    secret: Secret,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let db = Arc::new(MetaDb::open(store, config)?);
    serve(db, listener, secret, shutdown).await
}

/// Serves an open database (see [`run`]).
pub async fn serve(
    db: Arc<MetaDb>,
    listener: TcpListener,
    secret: Secret,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener.local_addr().ok();
    let svc = MetaServer::new(MetaService::new(db.clone()))
        .max_decoding_message_size(migfs_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(migfs_proto::MAX_MESSAGE_BYTES);
    let svc = InterceptedService::new(svc, Check(secret));
    let (stop_tx, stop_rx) = signal::channel(false);
    let stop_rx2 = stop_rx.clone();
    let reaper = tokio::spawn(reap(db.clone(), stop_rx));
    let closer = db.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("metadata server shutting down");
        closer.close_watchers();
        let _ = stop_tx.send(true);
    };
    tracing::info!(addr = ?addr, "metadata server listening");
    // One port for both: HTTP/2 (streams, tools) and framed unary calls
    // (the FUSE clients' hot path).
    let incoming = migfs_proto::frame::Incoming::split(listener, svc.clone(), stop_rx2);
    let served = Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, signal)
        .await;
    let _ = reaper.await;
    let flushed = tokio::task::spawn_blocking(move || db.flush()).await;
    served?;
    match flushed {
        Ok(r) => r,
        Err(err) => Err(crate::MetaError::Internal(format!(
            "final flush task failed: {err}"
        ))),
    }
}

/// Ends sessions whose lease ran out, every quarter lease (50 ms .. 1 s).
async fn reap(db: Arc<MetaDb>, mut stop: signal::Receiver<bool>) {
    let period = (db.config().lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(period) => {}
        }
        let db2 = db.clone();
        match tokio::task::spawn_blocking(move || reap_once(&db2)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "session reaper failed"),
            Err(err) => tracing::warn!(error = %err, "session reaper task failed"),
        }
    }
}

/// One reaper pass; each expired session ends in its own batch, after a
/// re-check under the writer lock (a heartbeat may just have renewed it).
pub fn reap_once(db: &MetaDb) -> Result<()> {
    let now_ms = now_ns() / 1_000_000;
    for sid in db.read(|s| sessions::expired(s, now_ms))? {
        db.write(0, |t| {
            let still = sessions::session(t, sid).is_ok_and(|s| s.expires_ms < t.now_ms());
            if still {
                tracing::info!(session = sid, "session lease expired");
                sessions::end(t, sid)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}
