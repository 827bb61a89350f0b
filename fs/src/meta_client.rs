//! The node's connection to the metadata server.
//!
//! Every call is retried while the server is unreachable, for at most the
//! configured time, and then fails with EIO: the mount never hangs forever,
//! and it recovers by itself when the server returns. A POSIX error the
//! server answers is returned at once, never retried.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

use migfs_proto::auth::{Present, Secret};
use migfs_proto::frame::FrameChannel;
use migfs_proto::meta::meta_client::MetaClient;
use migfs_proto::{MAX_MESSAGE_BYTES, errno};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{FsError, Result};

/// The generated client with the cluster secret on every call, over
/// HTTP/2 (for streams).
pub type RawMeta = MetaClient<InterceptedService<Channel, Present>>;

/// The same client over framed TCP (unary calls: the hot path).
pub type FastMeta = MetaClient<InterceptedService<FrameChannel, Present>>;

/// How long one call may take before it is abandoned and retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A retrying metadata client, shared by every FUSE thread.
#[derive(Debug)]
pub struct Meta {
    raw: RawMeta,
    fast: FastMeta,
    retry_for: Duration,
    session: AtomicU64,
    order: Order,
}

/// Directory operations a node answered itself go to the server before any
/// call made after them (see [`crate::dirops`]): each gets a sequence
/// number, and a call waits until the server applied every number given
/// out before it started.
#[derive(Debug)]
struct Order {
    queued: AtomicU64,
    applied: AtomicU64,
    applied_tx: watch::Sender<u64>,
}

impl Meta {
    /// Connects lazily to `url` (e.g. `http://127.0.0.10:7700`).
    pub fn new(url: &str, secret: Secret, retry_for: Duration) -> Result<Meta> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| FsError::Invalid(format!("metadata server URL {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true);
        let raw = MetaClient::with_interceptor(ep.connect_lazy(), Present(secret.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let frames = FrameChannel::new(url, Duration::from_secs(2), CALL_TIMEOUT);
        let fast = MetaClient::with_interceptor(frames, Present(secret))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Meta {
            raw,
            fast,
            retry_for,
            session: AtomicU64::new(0),
            order: Order {
                queued: AtomicU64::new(0),
                applied: AtomicU64::new(0),
                applied_tx: watch::channel(0).0,
            },
        })
    }

    /// The current session id (0 before registration).
    pub fn session(&self) -> u64 {
        self.session.load(Ordering::Relaxed)
    }

    /// Records the session id the server gave at registration.
    pub fn set_session(&self, id: u64) {
        self.session.store(id, Ordering::Relaxed);
    }

    /// A clone of the raw client, for streams (watch) that manage their own retries.
    pub fn raw(&self) -> RawMeta {
        self.raw.clone()
    }

    /// The sequence number of a directory operation being queued.
    pub fn next_queued(&self) -> u64 {
        self.order.queued.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The server applied every queued operation up to `seq`.
    pub fn applied(&self, seq: u64) {
        if self.order.applied.fetch_max(seq, Ordering::SeqCst) < seq {
            self.order.applied_tx.send_replace(seq);
        }
    }

    /// Waits until every operation queued so far is applied, for at most
    /// the retry budget.
    pub async fn ordered(&self, op: &'static str) -> Result<()> {
        let want = self.order.queued.load(Ordering::SeqCst);
        if self.order.applied.load(Ordering::SeqCst) >= want {
            return Ok(());
        }
        let mut rx = self.order.applied_tx.subscribe();
        match tokio::time::timeout(self.retry_for, rx.wait_for(|&v| v >= want)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(FsError::Errno {
                op,
                errno: libc::EIO,
                message: "directory operations queued before it did not reach the metadata server in time".into(),
            }),
        }
    }

    /// Runs `f` against the server after every queued directory operation
    /// (see [`Meta::ordered`]), retrying transport failures until the
    /// retry budget is spent.
    pub async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Fn(FastMeta) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.ordered(op).await?;
        self.call_unordered(op, f).await
    }

    /// [`Meta::call`] without waiting for queued directory operations (for
    /// the queue's own calls).
    pub async fn call_unordered<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Fn(FastMeta) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(5);
        loop {
            let status = match f(self.fast.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(st) => st,
            };
            if let Some(e) = errno::of(&status) {
                return Err(FsError::Errno {
                    op,
                    errno: e,
                    message: status.message().to_string(),
                });
            }
            if !retryable(&status) || Instant::now() + backoff > deadline {
                tracing::warn!(op, code = ?status.code(), message = status.message(), "metadata call failed");
                return Err(FsError::Meta { op, status });
            }
            tracing::debug!(op, code = ?status.code(), "metadata server unreachable, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Transport-level failures are worth retrying; answers from the server are not.
fn retryable(st: &Status) -> bool {
    matches!(
        st.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}
