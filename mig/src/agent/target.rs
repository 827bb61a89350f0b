//! The target side of a move: check that this node can take the process,
//! receive its image, hand its locks to this node's session, rebuild it
//! with its anonymous memory on demand (userfaultfd, pages fetched from the
//! source's page server), hold it until the source commits, let it run,
//! then pull every remaining page and tell the source it may let go.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use migfs_proto::agent::{self as pb, Mode, receive_event, receive_msg};
use migfs_proto::meta::{MoveLocksRequest, ReturnLocksRequest};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::precopy::{self, StoreFirst};
use super::{AgentClient, AgentError, EventStream, Inner};
use crate::image::format::{IMAGE_FILE, PAGES_FILE};
use crate::pages::Store;
use crate::pages::wire::{self, Link};
use crate::pages::{LazyConfig, LazyPages, PageFetch};
use crate::restore::stream::StreamFill;
use crate::restore::warm;
use crate::restore::{Extras, RestoreOptions};

/// Whether this node can take a process described by `r`; the reason if
/// not. `warm` is memory this node holds ready for a move (counted as
/// available).
pub fn prepare(r: &pb::PrepareRequest, warm: u64) -> pb::PrepareReply {
    let refused = match why_not(r, warm) {
        Ok(()) => String::new(),
        Err(why) => why,
    };
    pb::PrepareReply { refused }
}

fn why_not(r: &pb::PrepareRequest, warm: u64) -> Result<(), String> {
    if r.arch != std::env::consts::ARCH {
        return Err(format!(
            "architecture {} here, {} there",
            std::env::consts::ARCH,
            r.arch
        ));
    }
    let me = nix::unistd::getpid();
    let maps = crate::sys::procfs::maps(me).map_err(|e| format!("own maps: {e}"))?;
    if let Some(b) = crate::sys::vdso::find(&maps) {
        let parts: Vec<String> = b
            .parts
            .iter()
            .map(|(n, s, e)| format!("{n}:{s:#x}-{e:#x}"))
            .collect();
        let hash = crate::sys::vdso::text_hash(me, &b).map_err(|e| format!("own vDSO: {e}"))?;
        if !r.vdso_parts.is_empty() && (parts != r.vdso_parts || hash[..] != r.vdso_blake3[..]) {
            return Err(format!(
                "the vDSO differs (here {parts:?}, there {:?}; another kernel?)",
                r.vdso_parts
            ));
        }
    }
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| (kb * 1024).saturating_add(warm));
    if r.memory_bytes > avail {
        return Err(format!(
            "not enough memory: the process uses {} MiB, {} MiB available",
            r.memory_bytes >> 20,
            avail >> 20
        ));
    }
    Ok(())
}

/// The page channel of the move `b` describes: the source agent's host,
/// the port and token it named.
fn link_of(b: &pb::ReceiveBegin) -> Result<Link, String> {
    let agent: std::net::SocketAddr = b
        .source_addr
        .parse()
        .map_err(|e| format!("source address {:?}: {e}", b.source_addr))?;
    let port = u16::try_from(b.page_port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("the source named no page channel (port {})", b.page_port))?;
    let token = b
        .page_token
        .as_slice()
        .try_into()
        .map_err(|_| format!("page channel token of {} bytes", b.page_token.len()))?;
    Ok(Link {
        addr: std::net::SocketAddr::new(agent.ip(), port),
        move_id: b.move_id,
        token,
    })
}

/// Pulls every present page of the original (inside `only` unless it is
/// empty) over the page channel and installs it; returns how many pages
/// were new.
fn pull_all(link: &Link, lazy: &LazyPages, only: &[(u64, u64)]) -> Result<u64, String> {
    let t0 = Instant::now();
    let install = |addr: u64, data: &[u8]| {
        lazy.install(addr, data)
            .map_err(|e| format!("install {addr:#x}: {e}"))
    };
    // Received straight into warm memory by the holder.
    let staged =
        (lazy.staging_bytes() > 0).then(|| lazy.receive(link, only).map_err(|e| e.to_string()));
    let p = match staged {
        Some(Ok((installed, bytes, install_time))) => wire::Pulled {
            installed,
            bytes,
            install_time,
        },
        // The holder died (or the channel broke) half-way: what is still
        // missing comes on a new pull, received here.
        Some(Err(e)) if lazy.failed().is_none() => {
            tracing::warn!(move_id = link.move_id, error = %e, "the staged pull failed; pulling the rest");
            let rest = lazy.pending_origins();
            if rest.is_empty() {
                wire::Pulled::default()
            } else {
                wire::pull(link, &rest, &install)?
            }
        }
        Some(Err(e)) => return Err(e),
        None => wire::pull(link, only, &install)?,
    };
    tracing::info!(
        move_id = link.move_id,
        mib = p.bytes >> 20,
        pages = p.installed,
        ms = t0.elapsed().as_millis(),
        install_ms = p.install_time.as_millis(),
        staged = lazy.stats().staged_pages,
        "pages pulled"
    );
    Ok(p.installed)
}

/// One move this node is the target of.
struct Incoming {
    begin: pb::ReceiveBegin,
    /// Where its image is written; removed with it.
    dir: InDir,
}

/// Handles the Receive stream: collects the image, then rebuilds on a
/// thread of its own while this task forwards the source's decision.
pub async fn receive(
    inner: Arc<Inner>,
    mut msgs: Streaming<pb::ReceiveMsg>,
) -> Result<EventStream<pb::ReceiveEvent>, AgentError> {
    let (ev_tx, ev_rx) = mpsc::channel(8);
    // The answer stream goes back at once: the source sends the image only
    // once it has it.
    tokio::spawn(async move {
        let inc = match begin(&inner, &mut msgs).await {
            Ok(inc) => inc,
            Err(e) => {
                let _ = ev_tx.send(Ok(failed("transfer", e))).await;
                return;
            }
        };
        if let Err(e) = collect(&inc, &mut msgs).await {
            let _ = ev_tx.send(Ok(failed("transfer", e))).await;
            return;
        }
        let (decide_tx, decide_rx) = std_mpsc::channel::<Result<(), String>>();
        let tx = ev_tx.clone();
        let inner2 = Arc::clone(&inner);
        let started = std::thread::Builder::new()
            .name("migfs-restore".into())
            .spawn(move || rebuild(inner2, inc, tx, decide_rx));
        if let Err(e) = started {
            let _ = ev_tx.send(Ok(failed("restore", e))).await;
            return;
        }
        // Forward the source's decision (commit or abort) to the rebuild.
        let decision = loop {
            match msgs.next().await {
                Some(Ok(pb::ReceiveMsg {
                    msg: Some(receive_msg::Msg::Commit(_)),
                })) => break Ok(()),
                Some(Ok(pb::ReceiveMsg {
                    msg: Some(receive_msg::Msg::Abort(why)),
                })) => break Err(format!("the source aborted: {why}")),
                Some(Ok(_)) => continue,
                Some(Err(s)) => break Err(format!("the source went away: {}", s.message())),
                None => break Err("the source closed the stream before committing".into()),
            }
        };
        let _ = decide_tx.send(decision);
    });
    Ok(Box::pin(ReceiverStream::new(ev_rx)))
}

/// The first message: what is coming.
async fn begin(inner: &Inner, msgs: &mut Streaming<pb::ReceiveMsg>) -> Result<Incoming, String> {
    let first = msgs
        .next()
        .await
        .ok_or("empty receive stream")?
        .map_err(|s| s.message().to_owned())?;
    let Some(receive_msg::Msg::Begin(begin)) = first.msg else {
        return Err("a receive stream starts with begin".into());
    };
    let dir = inner.cfg.work.join(format!("in-{}", begin.move_id));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Incoming {
        begin,
        dir: InDir(dir),
    })
}

fn failed(step: &str, message: impl std::fmt::Display) -> pb::ReceiveEvent {
    pb::ReceiveEvent {
        event: Some(receive_event::Event::Failed(pb::ReceiveFailed {
            step: step.into(),
            message: message.to_string(),
        })),
    }
}

/// Writes image and pages to the move's directory until `done`.
async fn collect(inc: &Incoming, msgs: &mut Streaming<pb::ReceiveMsg>) -> Result<(), String> {
    let mut image = Vec::new();
    let mut pages = Vec::new();
    loop {
        let m = msgs
            .next()
            .await
            .ok_or("the source closed the stream mid-image")?
            .map_err(|s| format!("the source: {}", s.message()))?;
        match m.msg {
            Some(receive_msg::Msg::Image(b)) => image.extend_from_slice(&b),
            Some(receive_msg::Msg::Pages(b)) => pages.extend_from_slice(&b),
            Some(receive_msg::Msg::Done(_)) => break,
            Some(receive_msg::Msg::Abort(why)) => return Err(format!("the source aborted: {why}")),
            other => return Err(format!("unexpected message {other:?}")),
        }
        let limit = 1u64 << 36;
        if image.len() as u64 > inc.begin.image_len.min(limit)
            || pages.len() as u64 > inc.begin.pages_len.min(limit)
        {
            return Err("more image data than announced".into());
        }
    }
    if image.len() as u64 != inc.begin.image_len || pages.len() as u64 != inc.begin.pages_len {
        return Err(format!(
            "image truncated: {}+{} bytes of {}+{}",
            image.len(),
            pages.len(),
            inc.begin.image_len,
            inc.begin.pages_len
        ));
    }
    std::fs::write(inc.dir.0.join(IMAGE_FILE), &image).map_err(|e| e.to_string())?;
    std::fs::write(inc.dir.0.join(PAGES_FILE), &pages).map_err(|e| e.to_string())?;
    Ok(())
}

/// The rebuild thread: locks, restore (held until the decision), run,
/// then drain the memory.
fn rebuild(
    inner: Arc<Inner>,
    inc: Incoming,
    ev: mpsc::Sender<Result<pb::ReceiveEvent, Status>>,
    decide: std_mpsc::Receiver<Result<(), String>>,
) {
    let t0 = Instant::now();
    let send = |e: pb::ReceiveEvent| {
        let _ = ev.blocking_send(Ok(e));
    };
    let Incoming { begin, dir } = inc;
    let b = &begin;
    let image_pid = match crate::image::persist::read_image(&dir.0) {
        Ok(d) => d.image.process.as_ref().map_or(0, |p| p.pid),
        Err(e) => return send(failed("read image", e)),
    };
    let to_pid = u32::try_from(image_pid).unwrap_or(0);
    let session = (inner.cfg.session)();
    let mut meta = inner.meta.clone();
    let client = match inner.agent_at(&b.source_addr) {
        Ok(c) => c,
        Err(e) => return send(failed("connect", e)),
    };
    let link = match link_of(b) {
        Ok(l) => l,
        Err(e) => return send(failed("connect", e)),
    };
    let copied = match precopied(&inner, b) {
        Ok(p) => p,
        Err(e) => return send(failed("precopy", e)),
    };
    // A new stdin relay pipe: the process opens its read end through
    // /proc; this agent keeps the write end.
    let pipe = match b.stdin_relay.then(crate::sys::pipe::relay_pipe).transpose() {
        Ok(p) => p,
        Err(e) => return send(failed("stdin", format!("stdin pipe: {e}"))),
    };
    let held = match inner.rt.block_on(meta.move_locks(MoveLocksRequest {
        from_session: b.source_session,
        from_pid: b.source_pid,
        to_session: session,
        to_pid,
    })) {
        Ok(r) => r.into_inner().moved,
        Err(s) => return send(failed("take locks", format!("hand-over: {}", s.message()))),
    };
    let eager = Mode::try_from(b.mode) == Ok(Mode::Eager);
    let t_locks = t0.elapsed();
    let preloaded = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Stop-and-copy: the stub receives every page itself before it runs.
    let stream = if eager && copied.is_none() {
        match wire::Incoming::pull(&link, &[]) {
            Ok(pull) => Some(StreamFill {
                pull,
                pages: Arc::clone(&preloaded),
                warm: inner.warm.as_ref().map(warm::taker),
            }),
            Err(e) => {
                give_back(&inner, session, to_pid, held);
                return send(failed("restore", format!("pull the pages: {e}")));
            }
        }
    } else {
        None
    };
    let remote: Arc<dyn PageFetch> = Arc::new(wire::Fetcher::new(link.clone()));
    let fetch: Arc<dyn PageFetch> = match &copied {
        Some(p) => Arc::new(StoreFirst {
            store: Arc::clone(&p.store),
            remote: (!b.precopy_complete).then_some(remote),
        }),
        None => remote,
    };
    let lazy = stream.is_none().then(|| {
        let warm = inner.warm.as_ref().map(warm::taker);
        // The staging holder receives the pull on a connection it takes
        // before the process runs (and before it gives up our privileges).
        let pull_socket = match (&warm, &copied) {
            (Some(_), None) => wire::Incoming::connect(&link)
                .inspect_err(|e| tracing::warn!(error = %e, "no connection for the staged pull"))
                .ok(),
            _ => None,
        };
        LazyConfig {
            fetch,
            warm,
            pull_socket,
        }
    });
    let ev2 = ev.clone();
    let pre2 = Arc::clone(&preloaded);
    let hold = move |pid: i32| -> Result<(), String> {
        tracing::info!(
            pid,
            locks_ms = t_locks.as_secs_f64() * 1e3,
            ready_ms = t0.elapsed().as_secs_f64() * 1e3,
            "rebuilt, held until the commit"
        );
        let ready = pb::ReceiveEvent {
            event: Some(receive_event::Event::Ready(pb::ReceiveReady {
                pid: u32::try_from(pid).unwrap_or(0),
                restore_ms: t0.elapsed().as_secs_f64() * 1e3,
                pages_eager: pre2.load(std::sync::atomic::Ordering::Relaxed),
            })),
        };
        ev2.blocking_send(Ok(ready))
            .map_err(|_| "the source went away".to_string())?;
        decide
            .recv()
            .unwrap_or_else(|_| Err("the source went away".into()))
    };
    let extras = Extras {
        lazy,
        stream,
        before_resume: Some(Box::new(hold)),
        relay_stdin: pipe
            .as_ref()
            .map(|(r, _)| format!("/proc/{}/fd/{}", std::process::id(), r.as_raw_fd())),
        ..Extras::default()
    };
    let res = crate::restore::restore_with(&dir.0, &RestoreOptions::default(), extras);
    drop(dir);
    let restored = match res {
        Ok(r) => r,
        Err(e) => {
            give_back(&inner, session, to_pid, held);
            send(failed(&e.step.to_string(), &e.cause));
            return;
        }
    };
    if restored.warm > 0 {
        tracing::info!(
            pid = restored.pid,
            mib = restored.warm >> 20,
            "placed in warm memory"
        );
    }
    send(pb::ReceiveEvent {
        event: Some(receive_event::Event::Running(
            u32::try_from(restored.pid).unwrap_or(0),
        )),
    });
    if let Some((r, w)) = pipe {
        drop(r);
        match super::stdin::Relay::new(w) {
            Ok(relay) => {
                relay.resume(&b.stdin_pending);
                inner.stdins.lock().insert(b.task_id, Arc::new(relay));
            }
            Err(e) => {
                tracing::error!(task = b.task_id, error = %e, "the task's stdin relay is lost")
            }
        }
    }
    super::run::watch_exit(&inner, b.task_id, restored.pid);
    // What the source still has to send after the resume: everything
    // (lazy), nothing (eager: preloaded; complete pre-copy), or the
    // pages that changed after their pre-copy.
    let remote = match &copied {
        None if eager => Pull::Nothing,
        None => Pull::All,
        Some(_) if b.precopy_complete => Pull::Nothing,
        Some(p) if p.stale.is_empty() => Pull::Nothing,
        Some(p) => Pull::Only(p.stale.clone()),
    };
    // The push has a connection of its own (a bulk one): a fault's reply
    // never queues behind pushed pages.
    drain(
        &inner,
        &client,
        &link,
        restored.lazy,
        copied.map(|p| p.store),
        remote,
    );
}

/// The image directory of an incoming move, removed when dropped.
struct InDir(PathBuf);

impl Drop for InDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pre-copied memory of a move, with what of it is stale.
struct Precopied {
    store: Arc<Store>,
    stale: Vec<(u64, u64)>,
}

/// Takes the move's pre-copied memory (if it was pre-copied) and drops
/// its stale pages.
fn precopied(inner: &Inner, b: &pb::ReceiveBegin) -> Result<Option<Precopied>, String> {
    if !b.precopy {
        return Ok(None);
    }
    let store = inner
        .precopies
        .lock()
        .remove(&b.move_id)
        .ok_or_else(|| format!("no pre-copied memory arrived for move {}", b.move_id))?;
    let stale = precopy::ranges_of(&b.stale);
    store.discard(&stale);
    Ok(Some(Precopied { store, stale }))
}

/// What the drain pulls from the source.
enum Pull {
    Nothing,
    All,
    Only(Vec<(u64, u64)>),
}

/// Gives locks handed over for a move that failed back to the source.
fn give_back(inner: &Inner, session: u64, to_pid: u32, held: Vec<migfs_proto::meta::HeldLock>) {
    if held.is_empty() {
        return;
    }
    let mut meta = inner.meta.clone();
    let req = ReturnLocksRequest {
        to_session: session,
        to_pid,
        locks: held,
    };
    if let Err(s) = inner.rt.block_on(meta.return_locks(req)) {
        tracing::error!(error = %s.message(), "could not give the locks of a failed move back");
    }
}

/// Pulls what the process has not touched yet, closes the userfaultfd and
/// tells the source it may destroy its copy.
fn drain(
    inner: &Inner,
    client: &AgentClient,
    link: &Link,
    lazy: Option<LazyPages>,
    store: Option<Arc<Store>>,
    remote: Pull,
) {
    let move_id = link.move_id;
    let mut report = pb::DrainedRequest {
        move_id,
        ..Default::default()
    };
    if let Some(lazy) = lazy {
        if let Some(store) = store
            && let Err(e) = store.install_all(&lazy)
        {
            report.error = e;
        }
        let only = match remote {
            Pull::Nothing => None,
            Pull::All => Some(Vec::new()),
            Pull::Only(r) => Some(r),
        };
        if let Some(only) = only.filter(|_| report.error.is_empty()) {
            match pull_all(link, &lazy, &only) {
                Ok(n) => report.pages_push = n,
                Err(e) => report.error = e,
            }
        }
        let st = lazy.finish();
        report.pages_demand = st.demand_pages;
    }
    let mut c = client.clone();
    if let Err(s) = inner.rt.block_on(c.drained(report)) {
        tracing::error!(move_id, error = %s.message(), "could not tell the source the move is drained");
    }
}
