//! Pre-copy (DESIGN "Migration", step 2): memory copied in rounds while
//! the process still runs on the source, so the stop only has to cover
//! what changed since the last round.
//!
//! Source: [`Rounds`] tracks writes with [`crate::pages::Tracker`]
//! (userfaultfd write-protect + `PAGEMAP_SCAN`), sends every present page
//! of the process's anonymous memory, then the pages written since, until
//! what is left is small or stops shrinking. After the freeze,
//! [`Rounds::finish`] names what is still stale (written since the last
//! round, or mapped outside the tracked ranges) and, for a complete
//! pre-copy, sends it too while the process is frozen.
//!
//! Target: a [`Store`] per move keeps the pages until the restore; the
//! fault handler takes clean pages from it ([`StoreFirst`]) and the drain
//! installs the rest of it, so only stale pages come from the source, or
//! none at all after a complete pre-copy.

use std::sync::Arc;
use std::time::Duration;

use migfs_proto::agent::{self as pb};
use nix::unistd::Pid;
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::{AgentClient, AgentError, Inner};
use crate::pages::ranges::{intersect, normalize, subtract, total};
use crate::pages::rounds::{RoundPolicy, Verdict};
use crate::pages::wire::{self, Link, Rendezvous};
use crate::pages::{PageFetch, PageSource, Store, Tracker};

const PAGE: u64 = 4096;
/// How long the source waits for the target to connect back for a round.
const CONNECT_BACK: Duration = Duration::from_secs(10);
/// A store no Receive claimed is dropped after this long.
const STORE_TTL: Duration = Duration::from_secs(600);

/// Pages of a running process sent to the target, round after round.
pub struct Rounds {
    move_id: u64,
    tracker: Tracker,
    reader: PageSource,
    /// Where the target connects back for each round's pages.
    channel: Rendezvous,
    /// Written since the last round that sent them.
    dirty: Vec<(u64, u64)>,
    /// Rounds done.
    pub rounds: u32,
    /// Pages sent.
    pub pages: u64,
}

impl Rounds {
    /// Tracks the anonymous memory of `pid` and sends rounds to the target
    /// until little is dirty, nothing improves, or the round limit
    /// ([`RoundPolicy::default`]).
    pub fn run(
        inner: &Inner,
        client: &AgentClient,
        pid: Pid,
        move_id: u64,
        progress: &dyn Fn(String),
    ) -> Result<Rounds, AgentError> {
        let err = |e: crate::error::MigError| AgentError::phase("precopy", e);
        let maps = crate::sys::procfs::maps(pid).map_err(|e| AgentError::phase("precopy", e))?;
        let ranges = crate::pages::lazy_ranges_of_maps(&maps);
        let tracker = Tracker::start(pid, &ranges).map_err(err)?;
        let reader = PageSource::new(pid, ranges.clone()).map_err(err)?;
        let channel = Rendezvous::bind(inner.cfg.listen.ip(), move_id)
            .map_err(|e| AgentError::phase("precopy", format!("page channel: {e}")))?;
        let mut r = Rounds {
            move_id,
            tracker,
            reader,
            channel,
            dirty: ranges,
            rounds: 0,
            pages: 0,
        };
        let policy = RoundPolicy::default();
        let mut last = None;
        loop {
            let dirty = std::mem::take(&mut r.dirty);
            let sent = send(inner, client, &r.reader, &r.channel, move_id, &dirty)?;
            r.pages += sent;
            r.rounds += 1;
            r.dirty = r.tracker.collect().map_err(err)?;
            let left = total(&r.dirty);
            progress(format!(
                "precopy round {}: {} KiB sent, {} KiB written since",
                r.rounds,
                (sent * PAGE) >> 10,
                left >> 10
            ));
            // Converged, or writes outpace the copy: stop either way.
            if policy.decide(r.rounds, left, last) != Verdict::Again {
                return Ok(r);
            }
            last = Some(left);
        }
    }

    /// With the process frozen and its image captured (`frozen`: the page
    /// server's reader of the image's lazy ranges): ends tracking and
    /// returns the ranges whose pre-copied pages are stale, and the pages
    /// sent. With `complete`, those are sent now and nothing is stale.
    pub fn finish(
        mut self,
        inner: &Inner,
        client: &AgentClient,
        frozen: &PageSource,
        complete: bool,
    ) -> Result<(Vec<(u64, u64)>, u64), AgentError> {
        let lazy = frozen.ranges();
        let err = |e: crate::error::MigError| AgentError::phase("precopy", e);
        let mut stale = std::mem::take(&mut self.dirty);
        let t = std::time::Instant::now();
        stale.extend(self.tracker.collect_last().map_err(err)?);
        let collect_ms = t.elapsed().as_secs_f64() * 1e3;
        // Memory mapped outside the tracked ranges since the start.
        stale.extend(subtract(lazy, self.tracker.ranges()));
        let stale = normalize(stale);
        let Rounds {
            tracker,
            move_id,
            rounds,
            pages,
            channel,
            ..
        } = self;
        tracing::debug!(move_id, collect_ms, "pre-copy: last dirty set");
        if !complete {
            stop_later(tracker, move_id);
            return Ok((stale, pages));
        }
        // Its stop would hold the memory map against the reads.
        let sent = send(
            inner,
            client,
            frozen,
            &channel,
            move_id,
            &intersect(&stale, lazy),
        );
        stop_later(tracker, move_id);
        let sent = sent?;
        tracing::debug!(move_id, rounds, pages = pages + sent, "pre-copy complete");
        Ok((Vec::new(), pages + sent))
    }
}

/// Ends dirty tracking on a thread of its own: closing the userfaultfd
/// walks every protected page table, which need not happen while the
/// process waits, frozen (it ends with the move, or runs on unprotected
/// when the move fails).
fn stop_later(tracker: Tracker, move_id: u64) {
    let stopper = std::thread::Builder::new()
        .name("precopy-stop".into())
        .spawn(move || tracker.stop());
    if let Err(e) = stopper {
        tracing::warn!(move_id, error = %e, "stopped the dirty tracker inline");
    }
}

/// One round: the target forgets `dirty`, then gets its present pages,
/// pushed on the page channel it connects back to.
fn send(
    inner: &Inner,
    client: &AgentClient,
    reader: &PageSource,
    channel: &Rendezvous,
    move_id: u64,
    dirty: &[(u64, u64)],
) -> Result<u64, AgentError> {
    let err = |e: String| AgentError::phase("precopy", e);
    let present = reader
        .present()
        .map_err(|e| AgentError::phase("precopy", e))?;
    let runs = crate::pages::chunks(&intersect(&present, dirty), wire::CHUNK as u64);
    let port = channel.addr().map_err(|e| err(e.to_string()))?.port();
    let first = pb::PrecopyMsg {
        move_id,
        discard: dirty.iter().map(|&(s, e)| range(s, e)).collect(),
        page_addr: std::net::SocketAddr::new(inner.cfg.listen.ip(), port).to_string(),
        page_token: channel.token().to_vec(),
        ..Default::default()
    };
    let mut c = client.clone();
    let call = inner
        .rt
        .spawn(async move { c.precopy(tokio_stream::once(first)).await });
    let answer = |call: tokio::task::JoinHandle<Result<_, Status>>| {
        inner
            .rt
            .block_on(call)
            .map_err(|e| err(e.to_string()))?
            .map_err(|s| err(format!("target: {}", s.message())))
    };
    let mut s = match channel.accept(CONNECT_BACK) {
        Ok(s) => s,
        // The target's answer says why it did not connect.
        Err(e) if call.is_finished() => return answer(call).and(Err(err(e))),
        Err(e) => {
            call.abort();
            return Err(err(e));
        }
    };
    let served = std::sync::atomic::AtomicU64::new(0);
    let pushed = wire::push_runs(&mut s, reader, &runs, &served);
    drop(s);
    let reply = answer(call)?;
    let (bytes, _) = pushed.map_err(|e| err(format!("page channel: {e}")))?;
    tracing::debug!(
        move_id,
        mib = bytes >> 20,
        kept = reply.into_inner().pages,
        "pre-copy round sent"
    );
    Ok(bytes / PAGE)
}

/// Tells the target to drop what it kept for a move that failed.
pub fn abort(inner: &Inner, client: &AgentClient, move_id: u64) {
    let mut c = client.clone();
    let msg = pb::PrecopyMsg {
        move_id,
        abort: true,
        ..Default::default()
    };
    let res = inner.rt.block_on(c.precopy(tokio_stream::once(msg)));
    if let Err(s) = res {
        tracing::warn!(move_id, error = %s.message(), "the target did not drop its pre-copied memory");
    }
}

fn range(start: u64, end: u64) -> pb::PageRange {
    pb::PageRange { start, end }
}

/// Ranges of a message.
pub fn ranges_of(r: &[pb::PageRange]) -> Vec<(u64, u64)> {
    normalize(r.iter().map(|r| (r.start, r.end)).collect())
}

/// Takes a Precopy stream into the move's store.
pub async fn receive(
    inner: &Inner,
    mut msgs: Streaming<pb::PrecopyMsg>,
) -> Result<pb::PrecopyReply, Status> {
    let mut store: Option<Arc<Store>> = None;
    while let Some(m) = msgs.next().await {
        let m = m?;
        if m.abort {
            inner.precopies.lock().remove(&m.move_id);
            return Ok(pb::PrecopyReply { pages: 0 });
        }
        let s = store.get_or_insert_with(|| {
            let mut all = inner.precopies.lock();
            all.retain(|_, s| s.age() < STORE_TTL);
            Arc::clone(
                all.entry(m.move_id)
                    .or_insert_with(|| Arc::new(Store::new())),
            )
        });
        s.discard(&ranges_of(&m.discard));
        if !m.data.is_empty() {
            s.put(m.addr, &m.data).map_err(Status::invalid_argument)?;
        }
        if !m.page_addr.is_empty() {
            let link =
                Link {
                    addr: m.page_addr.parse().map_err(|e| {
                        Status::invalid_argument(format!("page channel {:?}: {e}", m.page_addr))
                    })?,
                    move_id: m.move_id,
                    token: m.page_token.as_slice().try_into().map_err(|_| {
                        Status::invalid_argument("a page channel token has 16 bytes")
                    })?,
                };
            let store = Arc::clone(s);
            tokio::task::spawn_blocking(move || {
                let keep = |addr: u64, data: &[u8]| store.put(addr, data).map(|()| 0);
                wire::receive_pushed(&link, &keep)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(format!("pre-copied pages: {e}")))?;
        }
    }
    Ok(pb::PrecopyReply {
        pages: store.map_or(0, |s| s.len()),
    })
}

/// Pages for the fault handler: pre-copied ones from the store, the rest
/// from the source (or zeros after a complete pre-copy, where a page not
/// kept had no data on the source).
pub struct StoreFirst {
    /// The move's pre-copied pages.
    pub store: Arc<Store>,
    /// The source's page server; `None` after a complete pre-copy.
    pub remote: Option<Arc<dyn PageFetch>>,
}

impl PageFetch for StoreFirst {
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        if let Some(d) = self.store.read(addr, len, self.remote.is_none()) {
            return Ok(d);
        }
        match &self.remote {
            Some(r) => r.fetch(addr, len),
            None => Err(format!("{addr:#x}+{len}: not pre-copied")),
        }
    }
}
