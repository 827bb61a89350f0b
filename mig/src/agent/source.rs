//! The source side of a move (DESIGN "Migration", phases 1 to 7), run on
//! one thread (ptrace binds a tracee to the thread that seized it):
//!
//! prepare (claim the task, check, ask the target) → freeze → capture
//! (anonymous memory stays in the frozen process) → transfer (the image)
//! → the target restores and holds the process → commit (the task table
//! points at the target) → the target lets it run → drain (the page
//! server answers faults and pushes the rest) → the frozen original is
//! destroyed. Until commit, any failure thaws the original untouched.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use migfs_proto::agent::{self as pb, Mode, receive_event, receive_msg};
use migfs_proto::meta::{
    NodeInfo, TaskBeginMoveRequest, TaskCreateRequest, TaskEndMoveRequest, TaskGetRequest,
    TaskInfo, TaskState,
};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{AgentError, EventStream, Inner, precopy};
use crate::capture::flags::FlagsSnapshot;
use crate::capture::{self, CaptureOptions};
use crate::freeze::{self, Frozen};
use crate::image::format::{IMAGE_FILE, PAGES_FILE};
use crate::pages::source::PageSource;
use crate::pages::wire::{Origin, PageServer};

/// Bytes per message when sending the image.
const CHUNK: usize = 4 << 20;
/// How long the source waits for the target to drain a lazy move.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

type Events = mpsc::Sender<Result<pb::MoveEvent, Status>>;

/// A move this node is the source of: its page server (the page channel,
/// [`PageServer`]) and the wait for the target's "drained".
pub struct Serving {
    pages: Arc<PageSource>,
    server: PageServer,
    done: Mutex<Option<ToMover>>,
}

/// What the move's thread hears while it waits: the target's "drained",
/// and pushes the page server hands it (only the thread that froze the
/// process can send from inside it, [`crate::pages::inside`]).
enum Heard {
    Drained(pb::DrainedRequest),
    Push(Push),
}

type ToMover = mpsc::UnboundedSender<Heard>;

/// Chunks to send on a pull's connection; the answer goes to `done`
/// (`None`: nothing was sent, the page server sends them itself).
struct Push {
    sock: std::net::TcpStream,
    chunks: Vec<(u64, u64)>,
    done: std_mpsc::SyncSender<Option<std::io::Result<u64>>>,
}

/// The frozen original as its page server sees it: reads by
/// `process_vm_readv`, pulls sent from inside it by the move's thread.
struct Original {
    pages: Arc<PageSource>,
    mover: ToMover,
}

impl Origin for Original {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        Origin::read(self.pages.as_ref(), addr, buf)
    }

    fn present(&self) -> Result<Vec<(u64, u64)>, String> {
        Origin::present(self.pages.as_ref())
    }

    fn send_runs(
        &self,
        s: &mut std::net::TcpStream,
        chunks: &[(u64, u64)],
    ) -> Option<std::io::Result<u64>> {
        let (done, answer) = std_mpsc::sync_channel(1);
        let push = Push {
            sock: s.try_clone().ok()?,
            chunks: chunks.to_vec(),
            done,
        };
        self.mover.send(Heard::Push(push)).ok()?;
        answer.recv().ok().flatten()
    }
}

impl Serving {
    /// Serves the frozen original's lazy memory `pages` for move
    /// `move_id` on a new page channel on `ip`; tells `mover` what it must
    /// hear.
    fn start(
        ip: std::net::IpAddr,
        move_id: u64,
        pages: PageSource,
        mover: ToMover,
    ) -> std::io::Result<Serving> {
        let pages = Arc::new(pages);
        let origin: Arc<dyn Origin> = Arc::new(Original {
            pages: Arc::clone(&pages),
            mover: mover.clone(),
        });
        Ok(Serving {
            server: PageServer::start(ip, move_id, origin)?,
            pages,
            done: Mutex::new(Some(mover)),
        })
    }

    /// The target has every page.
    pub fn drained(&self, r: pb::DrainedRequest) {
        if let Some(tx) = self.done.lock().take() {
            let _ = tx.send(Heard::Drained(r));
        }
    }

    /// Stops serving: the listener and every page connection are closed.
    fn close(&self) -> u64 {
        self.server.close();
        self.server.served_bytes()
    }
}

/// Checks the request, finds or names the task and starts the move on its
/// own thread; the stream carries progress and the report. A task that
/// runs on another node is moved by that node's agent.
pub async fn start(
    inner: Arc<Inner>,
    r: pb::MoveRequest,
) -> Result<EventStream<pb::MoveEvent>, AgentError> {
    let task = if r.task_id != 0 {
        let t = inner
            .meta
            .clone()
            .task_get(TaskGetRequest { task_id: r.task_id })
            .await
            .map_err(|s| AgentError::rpc(format!("task {}", r.task_id), &s))?
            .into_inner();
        if t.state() == TaskState::TaskExited {
            return Err(AgentError::Invalid(format!(
                "task {} has exited",
                t.task_id
            )));
        }
        if t.node_id != inner.cfg.node_id {
            return forward(&inner, &t, r).await;
        }
        t
    } else {
        if r.pid == 0 {
            return Err(AgentError::Invalid("give a pid or a task id".into()));
        }
        local_task(&inner, r.pid).await?
    };
    let pid =
        i32::try_from(task.pid).map_err(|_| AgentError::Invalid(format!("pid {}", task.pid)))?;
    check_owner(pid, r.caller_uid)?;
    let target = inner.node(&r.target).await?;
    if target.node_id == inner.cfg.node_id {
        return Err(AgentError::Invalid(format!(
            "task {} already runs on {}",
            task.task_id, inner.cfg.name
        )));
    }
    let (tx, rx) = mpsc::channel(64);
    let mode = match Mode::try_from(r.mode) {
        Ok(Mode::Eager) => Mode::Eager,
        _ => Mode::Lazy,
    };
    let mv = Move {
        inner,
        task,
        pid: Pid::from_raw(pid),
        target,
        mode,
        precopy: r.precopy,
        events: tx.clone(),
        t0: Instant::now(),
        phases: Vec::new(),
        move_id: 0,
        relay: None,
        stdin_pending: Vec::new(),
        flags_before: None,
        heard: None,
        drained: None,
    };
    std::thread::Builder::new()
        .name("migfs-move".into())
        .spawn(move || {
            let res = mv.run();
            let ev = match res {
                Ok(report) => Ok(pb::MoveEvent {
                    event: Some(pb::move_event::Event::Report(report)),
                }),
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.blocking_send(ev);
        })
        .map_err(|e| AgentError::phase("prepare", format!("start the move thread: {e}")))?;
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// The task of local process `pid`, created when it has none yet.
async fn local_task(inner: &Inner, pid: u32) -> Result<TaskInfo, AgentError> {
    let p = i32::try_from(pid).map_err(|_| AgentError::Invalid(format!("pid {pid}")))?;
    let gone = || AgentError::Invalid(format!("pid {pid}: no such process on {}", inner.cfg.name));
    // A process that is ending (a moved original being destroyed) gets
    // no task.
    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).map_err(|_| gone())?;
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X" | "x") | None) {
        return Err(gone());
    }
    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).map_err(|_| gone())?;
    let cmd: Vec<String> = cmd
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let t = inner
        .meta
        .clone()
        .task_create(TaskCreateRequest {
            node_id: inner.cfg.node_id,
            pid,
            cmd: cmd.join(" "),
            ..Default::default()
        })
        .await
        .map_err(|s| AgentError::rpc("create the task", &s))?;
    Ok(t.into_inner())
}

/// Only root and the process's owner may move it.
pub(crate) fn check_owner(pid: i32, uid: u32) -> Result<(), AgentError> {
    if uid == 0 {
        return Ok(());
    }
    let st = crate::sys::procfs::status(&pid.to_string())
        .map_err(|_| AgentError::Invalid(format!("pid {pid}: no such process")))?;
    let owner: Option<u32> = st
        .get("Uid")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    if owner == Some(uid) {
        return Ok(());
    }
    Err(AgentError::Denied(format!(
        "uid {uid} may not move pid {pid} (only root or its owner may)"
    )))
}

/// Asks the agent of the node where task `t` runs to move it.
async fn forward(
    inner: &Inner,
    t: &TaskInfo,
    mut r: pb::MoveRequest,
) -> Result<EventStream<pb::MoveEvent>, AgentError> {
    let node = inner.node_by_id(t.node_id).await?;
    if !node.up {
        return Err(AgentError::Invalid(format!(
            "task {} runs on {}, which is down",
            t.task_id, node.name
        )));
    }
    r.task_id = t.task_id;
    let s = inner
        .agent_at(&node.addr)?
        .r#move(r)
        .await
        .map_err(|s| AgentError::rpc(format!("ask {} to move task {}", node.name, t.task_id), &s))?
        .into_inner();
    Ok(Box::pin(s))
}

/// One move in progress on this node.
struct Move {
    inner: Arc<Inner>,
    task: TaskInfo,
    pid: Pid,
    target: NodeInfo,
    mode: Mode,
    precopy: bool,
    events: Events,
    t0: Instant,
    phases: Vec<pb::Phase>,
    move_id: u64,
    /// The task's stdin relay here, if it has one (paused while moving).
    relay: Option<Arc<super::stdin::Relay>>,
    /// What the process had not read from its stdin pipe at the freeze.
    stdin_pending: Vec<u8>,
    /// VmFlags read just before the freeze (capture reuses them).
    flags_before: Option<Arc<FlagsSnapshot>>,
    /// What the page server and the target's "drained" tell this thread.
    heard: Option<mpsc::UnboundedReceiver<Heard>>,
    /// The target's "drained", when it came during another wait.
    drained: Option<pb::DrainedRequest>,
}

/// What happened on the target, for the report.
#[derive(Default)]
struct TargetSide {
    pid: u32,
    pages_eager: u64,
}

impl Move {
    fn progress(&self, msg: impl Into<String>) {
        let _ = self.events.blocking_send(Ok(pb::MoveEvent {
            event: Some(pb::move_event::Event::Progress(msg.into())),
        }));
    }

    fn phase_done(&mut self, name: &str, since: Instant) {
        self.phases.push(pb::Phase {
            name: name.into(),
            ms: since.elapsed().as_secs_f64() * 1e3,
        });
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.rt.block_on(f)
    }

    fn run(mut self) -> Result<pb::MoveReport, AgentError> {
        let t = Instant::now();
        self.progress(format!(
            "prepare: task {} (pid {}) {} -> {}",
            self.task.task_id, self.pid, self.inner.cfg.name, self.target.name
        ));
        self.relay = self.inner.stdins.lock().get(&self.task.task_id).cloned();
        // The task is claimed first: a second move of it is told so, not
        // what the first one's work in the process looks like to a check.
        let begin = TaskBeginMoveRequest {
            task_id: self.task.task_id,
            from_node: self.inner.cfg.node_id,
            pid: self.task.pid,
            to_node: self.target.node_id,
        };
        let mut meta = self.inner.meta.clone();
        self.block_on(meta.task_begin_move(begin))
            .map_err(|s| AgentError::phase("prepare", s.message()))?;
        let res = self.prepared(t);
        if res.is_err() {
            let end = TaskEndMoveRequest {
                task_id: self.task.task_id,
                commit: false,
                to_node: self.target.node_id,
                new_pid: 0,
            };
            if let Err(s) = self.block_on(meta.task_end_move(end)) {
                tracing::error!(task = self.task.task_id, error = %s.message(), "could not end the failed move in the task table");
            }
        }
        res
    }

    /// Everything after the task was marked moving; an error here means
    /// the original runs on, thawed.
    fn prepared(&mut self, t: Instant) -> Result<pb::MoveReport, AgentError> {
        let relay_pipes: Vec<u64> = self.relay.iter().map(|r| r.ino).collect();
        let blockers = crate::check::check_allowing(self.pid, &relay_pipes)
            .map_err(|e| AgentError::phase("prepare", e))?;
        if !blockers.is_empty() {
            return Err(AgentError::phase(
                "prepare",
                format!("pid {} cannot be moved: {}", self.pid, blockers.join("; ")),
            ));
        }
        let mut client = self.inner.agent_at(&self.target.addr)?;
        let prep = prepare_request(self.pid, self.task.task_id)?;
        let reply = self
            .block_on(client.prepare(prep))
            .map_err(|s| {
                AgentError::phase(
                    "prepare",
                    format!("target {}: {}", self.target.name, s.message()),
                )
            })?
            .into_inner();
        if !reply.refused.is_empty() {
            return Err(AgentError::phase(
                "prepare",
                format!("target {} refuses: {}", self.target.name, reply.refused),
            ));
        }
        let mut files =
            capture::files::FileCtx::new(self.pid, CaptureOptions::default().hash_limit)
                .map_err(|e| AgentError::phase("prepare", e))?;
        files
            .prehash_mappings()
            .map_err(|e| AgentError::phase("prepare", e))?;
        self.phase_done("prepare", t);
        self.move_id = self.inner.move_id();
        let rounds = if self.precopy {
            let t = Instant::now();
            self.progress("precopy: copying memory while the process runs");
            let events = self.events.clone();
            let progress = |m: String| {
                let _ = events.blocking_send(Ok(pb::MoveEvent {
                    event: Some(pb::move_event::Event::Progress(m)),
                }));
            };
            let r = precopy::Rounds::run(&self.inner, &client, self.pid, self.move_id, &progress);
            if r.is_err() {
                precopy::abort(&self.inner, &client, self.move_id);
            }
            let r = r?;
            self.phase_done("precopy", t);
            Some(r)
        } else {
            None
        };

        // Read here, while it runs: smaps walks every page table.
        self.flags_before = FlagsSnapshot::take(self.pid).ok().map(Arc::new);
        self.progress("freeze");
        if let Some(r) = &self.relay {
            r.pause();
        }
        let t_freeze = Instant::now();
        let precopied = rounds.is_some();
        let frozen = match freeze::freeze(self.pid, Duration::from_secs(10)) {
            Ok(f) => f,
            Err(e) => {
                self.undo(&client, precopied, None);
                return Err(AgentError::phase("freeze", e));
            }
        };
        self.phase_done("freeze", t_freeze);
        if let Some(r) = &self.relay
            && let Some(&fd) = super::stdin::fds_of(self.pid, r).first()
        {
            match super::stdin::drain(self.pid, fd) {
                Ok(p) => {
                    tracing::info!(
                        task = self.task.task_id,
                        bytes = p.len(),
                        "unread stdin travels with the process"
                    );
                    self.stdin_pending = p;
                }
                Err(e) => {
                    self.undo(&client, precopied, Some(frozen));
                    return Err(e);
                }
            }
        }
        let dir = self.inner.cfg.work.join(format!("out-{}", self.move_id));
        let res = self.frozen(&frozen, files, &dir, &mut client, t_freeze, rounds);
        let _ = std::fs::remove_dir_all(&dir);
        match res {
            Ok((mut report, ready)) => {
                // The target feeds its stdin now.
                self.inner.stdins.lock().remove(&self.task.task_id);
                // Committed: the original only serves pages now; after a
                // complete pre-copy, not even that.
                let t_drain = Instant::now();
                let resumed = t_freeze + Duration::from_secs_f64(report.downtime_ms / 1e3);
                let pid = self.pid.as_raw();
                let mut original = Some(frozen);
                let mut end_original = |report: &mut pb::MoveReport| {
                    if let Some(f) = original.take()
                        && let Err(e) = f.kill()
                    {
                        tracing::warn!(pid, error = %e, "ending the original failed");
                    }
                    report.residual_ms = resumed.elapsed().as_secs_f64() * 1e3;
                };
                let complete = report.precopy && self.mode == Mode::Eager;
                if complete {
                    end_original(&mut report);
                }
                let drained = self.wait_drained(DRAIN_TIMEOUT);
                self.stop_hearing();
                let served = self.inner.sources.lock().remove(&self.move_id);
                let served = served.map(|s| s.close());
                if !complete {
                    end_original(&mut report);
                }
                self.phase_done("drain", t_drain);
                match drained {
                    Some(d) => {
                        report.pages_demand = d.pages_demand;
                        report.pages_push = d.pages_push;
                        report.pages_eager += d.pages_eager;
                        if !d.error.is_empty() {
                            tracing::error!(error = %d.error, "the target reported a page error");
                        }
                    }
                    None => tracing::error!(
                        task = self.task.task_id,
                        "the target never said it had every page; the original was ended anyway"
                    ),
                }
                report.bytes += served.unwrap_or(0);
                report.pid = ready.pid;
                report.phases = std::mem::take(&mut self.phases);
                report.total_ms = self.t0.elapsed().as_secs_f64() * 1e3;
                Ok(report)
            }
            Err(e) => {
                self.stop_hearing();
                let served = self.inner.sources.lock().remove(&self.move_id);
                if let Some(s) = served {
                    s.close();
                }
                self.undo(&client, precopied, Some(frozen));
                Err(e)
            }
        }
    }

    /// A move that failed before commit: the target drops its pre-copied
    /// memory, the stdin relay gets its unread bytes back and takes input
    /// again, and the original runs on.
    fn undo(&self, client: &super::AgentClient, precopied: bool, frozen: Option<Frozen>) {
        if precopied {
            precopy::abort(&self.inner, client, self.move_id);
        }
        if let Some(r) = &self.relay {
            r.resume(&self.stdin_pending);
        }
        if let Some(f) = frozen {
            crate::checkpoint::thaw(f);
        }
    }

    /// Capture, transfer, restore on the target, commit, resume.
    fn frozen(
        &mut self,
        frozen: &Frozen,
        files: capture::files::FileCtx,
        dir: &PathBuf,
        client: &mut super::AgentClient,
        t_freeze: Instant,
        rounds: Option<precopy::Rounds>,
    ) -> Result<(pb::MoveReport, TargetSide), AgentError> {
        self.progress("capture");
        let t = Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| AgentError::phase("capture", e))?;
        let opts = CaptureOptions {
            lazy_anon: true,
            relay_pipes: self.relay.iter().map(|r| r.ino).collect(),
            flags_before: self.flags_before.clone(),
            ..CaptureOptions::default()
        };
        let stats = capture::capture(frozen, dir, &opts, Some(files))
            .map_err(|e| AgentError::phase("capture", e))?;
        // Flags taken before the freeze are checked while the image travels.
        let verify = self
            .flags_before
            .clone()
            .filter(|_| stats.flags_reused)
            .map(|before| std::thread::spawn(move || before.verify()));
        let img =
            crate::image::persist::read_image(dir).map_err(|e| AgentError::phase("capture", e))?;
        let ranges = crate::pages::lazy_ranges(&img.image);
        let pages =
            PageSource::new(self.pid, ranges).map_err(|e| AgentError::phase("capture", e))?;
        let (heard_tx, heard_rx) = mpsc::unbounded_channel();
        self.heard = Some(heard_rx);
        let serving = Serving::start(self.inner.cfg.listen.ip(), self.move_id, pages, heard_tx)
            .map_err(|e| AgentError::phase("capture", format!("start the page server: {e}")))?;
        let serving = Arc::new(serving);
        self.inner
            .sources
            .lock()
            .insert(self.move_id, Arc::clone(&serving));
        self.phase_done("capture", t);
        // What pre-copy left stale; after a complete one, sent now.
        let complete = self.mode == Mode::Eager;
        let (precopy, precopy_rounds) = (rounds.is_some(), rounds.as_ref().map_or(0, |r| r.rounds));
        let (stale, pages_precopy) = match rounds {
            Some(r) => {
                let t = Instant::now();
                let res = r.finish(&self.inner, client, &serving.pages, complete)?;
                self.phase_done("precopy final", t);
                res
            }
            None => (Vec::new(), 0),
        };

        self.progress(format!(
            "transfer: image {} KiB, eager pages {} KiB",
            stats.image_bytes >> 10,
            stats.pages_bytes >> 10
        ));
        let t = Instant::now();
        let image =
            std::fs::read(dir.join(IMAGE_FILE)).map_err(|e| AgentError::phase("transfer", e))?;
        let pages =
            std::fs::read(dir.join(PAGES_FILE)).map_err(|e| AgentError::phase("transfer", e))?;
        let bytes = (image.len() + pages.len()) as u64;
        let (msg_tx, msg_rx) = mpsc::channel::<pb::ReceiveMsg>(8);
        let begin = pb::ReceiveBegin {
            move_id: self.move_id,
            task_id: self.task.task_id,
            mode: self.mode as i32,
            source_addr: self.inner.cfg.listen.to_string(),
            source_session: (self.inner.cfg.session)(),
            source_pid: self.task.pid,
            image_len: image.len() as u64,
            pages_len: pages.len() as u64,
            precopy,
            precopy_complete: precopy && complete,
            stale: stale
                .iter()
                .map(|&(start, end)| pb::PageRange { start, end })
                .collect(),
            stdin_relay: self.relay.is_some(),
            stdin_pending: self.stdin_pending.clone(),
            page_port: u32::from(serving.server.addr().port()),
            page_token: serving.server.token().to_vec(),
        };
        let send = |m: receive_msg::Msg| {
            msg_tx
                .blocking_send(pb::ReceiveMsg { msg: Some(m) })
                .map_err(|_| AgentError::phase("transfer", "the target closed the stream"))
        };
        let mut events = self
            .block_on(client.receive(ReceiverStream::new(msg_rx)))
            .map_err(|s| {
                AgentError::phase(
                    "transfer",
                    format!("target {}: {}", self.target.name, s.message()),
                )
            })?
            .into_inner();
        send(receive_msg::Msg::Begin(begin))?;
        for c in image.chunks(CHUNK) {
            send(receive_msg::Msg::Image(c.to_vec()))?;
        }
        for c in pages.chunks(CHUNK) {
            send(receive_msg::Msg::Pages(c.to_vec()))?;
        }
        send(receive_msg::Msg::Done(true))?;
        self.phase_done("transfer", t);

        self.progress("restore on the target");
        let t = Instant::now();
        let ready = match self.next_event(&mut events, "restore")? {
            receive_event::Event::Ready(r) => TargetSide {
                pid: r.pid,
                pages_eager: r.pages_eager,
            },
            other => {
                return Err(AgentError::phase(
                    "restore",
                    format!("unexpected answer {other:?}"),
                ));
            }
        };
        self.phase_done("restore", t);

        if let Some(why) = verify.and_then(|v| flags_changed(v.join())) {
            let _ = send(receive_msg::Msg::Abort(format!("capture: {why}")));
            return Err(AgentError::phase("capture", why));
        }
        self.progress(format!("commit: pid {} on {}", ready.pid, self.target.name));
        let t = Instant::now();
        let end = TaskEndMoveRequest {
            task_id: self.task.task_id,
            commit: true,
            to_node: self.target.node_id,
            new_pid: ready.pid,
        };
        let mut meta = self.inner.meta.clone();
        if let Err(s) = self.block_on(meta.task_end_move(end)) {
            let _ = send(receive_msg::Msg::Abort(format!(
                "commit failed: {}",
                s.message()
            )));
            return Err(AgentError::phase("commit", s.message()));
        }
        send(receive_msg::Msg::Commit(true))
            .map_err(|_| AgentError::phase("commit", "the target went away after the commit"))?;
        match self.next_event(&mut events, "resume") {
            Ok(receive_event::Event::Running(_)) => {}
            Ok(other) => tracing::error!(?other, "unexpected answer to commit"),
            Err(e) => tracing::error!(error = %e, "the target did not confirm the resume"),
        }
        let downtime = t_freeze.elapsed();
        self.phase_done("commit+resume", t);
        self.progress(format!(
            "running on {} after {:.1} ms frozen; draining memory",
            self.target.name,
            downtime.as_secs_f64() * 1e3
        ));
        let report = pb::MoveReport {
            task: self.task.task_id,
            pid: ready.pid,
            source_pid: self.task.pid,
            from: self.inner.cfg.name.clone(),
            to: self.target.name.clone(),
            mode: self.mode as i32,
            precopy,
            precopy_rounds,
            pages_precopy,
            downtime_ms: downtime.as_secs_f64() * 1e3,
            bytes: bytes + pages_precopy * 4096,
            pages_eager: stats.pages_bytes / 4096 + ready.pages_eager,
            ..Default::default()
        };
        Ok((report, ready))
    }

    /// Sends a push the page server handed over from inside the frozen
    /// original (this thread froze it).
    fn push(&self, p: Push) {
        let Push {
            mut sock,
            chunks,
            done,
        } = p;
        let answer = match crate::pages::inside::send_runs(self.pid, &mut sock, &chunks) {
            crate::pages::inside::Sent::NotHere(why) => {
                tracing::info!(pid = self.pid.as_raw(), %why, "pages cannot be sent from inside the original; read from outside");
                None
            }
            crate::pages::inside::Sent::Done(r) => Some(r),
        };
        let _ = done.send(answer);
    }

    /// Hears nothing more: a push still queued is dropped, so the page
    /// server's thread waiting for it goes on (and can be joined when the
    /// page server closes).
    fn stop_hearing(&mut self) {
        self.heard = None;
    }

    /// The next thing heard within `limit`, or `None` (nothing more can
    /// be heard, or the time is up).
    fn hear(&mut self, limit: Duration) -> Option<Heard> {
        let rx = self.heard.as_mut()?;
        self.inner
            .rt
            .block_on(async { tokio::time::timeout(limit, rx.recv()).await.ok().flatten() })
    }

    /// Waits at most `limit` for the target's "drained", sending the
    /// pushes handed over meanwhile.
    fn wait_drained(&mut self, limit: Duration) -> Option<pb::DrainedRequest> {
        let t0 = Instant::now();
        while self.drained.is_none() {
            match self.hear(limit.saturating_sub(t0.elapsed()))? {
                Heard::Drained(d) => self.drained = Some(d),
                Heard::Push(p) => self.push(p),
            }
        }
        self.drained.take()
    }

    /// The target's next event, sending the pushes handed over meanwhile.
    fn next_event(
        &mut self,
        events: &mut tonic::Streaming<pb::ReceiveEvent>,
        phase: &'static str,
    ) -> Result<receive_event::Event, AgentError> {
        let got = loop {
            let heard = self.heard.as_mut();
            let step = self.inner.rt.block_on(async {
                match heard {
                    Some(rx) => tokio::select! {
                        e = events.next() => Ok(e),
                        Some(h) = rx.recv() => Err(h),
                    },
                    None => Ok(events.next().await),
                }
            });
            match step {
                Ok(e) => break e,
                Err(Heard::Drained(d)) => self.drained = Some(d),
                Err(Heard::Push(p)) => self.push(p),
            }
        };
        match got {
            Some(Ok(pb::ReceiveEvent {
                event: Some(receive_event::Event::Failed(f)),
            })) => Err(AgentError::phase(
                phase,
                format!(
                    "target {} at step {:?}: {}",
                    self.target.name, f.step, f.message
                ),
            )),
            Some(Ok(pb::ReceiveEvent { event: Some(e) })) => Ok(e),
            Some(Ok(_)) => Err(AgentError::phase(phase, "empty answer from the target")),
            Some(Err(s)) => Err(AgentError::phase(
                phase,
                format!("target {}: {}", self.target.name, s.message()),
            )),
            None => Err(AgentError::phase(
                phase,
                format!("target {} closed the stream", self.target.name),
            )),
        }
    }
}

/// What the target must match: architecture, vDSO, memory.
/// Why the VmFlags read before the freeze are not the frozen process's
/// (a whole mapping `madvise`d or `mlock`ed in between), if they are not.
fn flags_changed(verified: std::thread::Result<std::io::Result<Option<String>>>) -> Option<String> {
    match verified {
        Ok(Ok(None)) => None,
        Ok(Ok(Some(diff))) => Some(format!(
            "{diff} while the move prepared; the process runs on here, move it again"
        )),
        Ok(Err(e)) => Some(format!("read smaps of the frozen process: {e}")),
        Err(_) => Some("the smaps check panicked".into()),
    }
}

fn prepare_request(pid: Pid, task: u64) -> Result<pb::PrepareRequest, AgentError> {
    let maps = crate::sys::procfs::maps(pid).map_err(|e| AgentError::phase("prepare", e))?;
    let (parts, hash) = match crate::sys::vdso::find(&maps) {
        Some(b) => {
            let h = crate::sys::vdso::text_hash(pid, &b)
                .map_err(|e| AgentError::phase("prepare", e))?;
            let parts = b
                .parts
                .iter()
                .map(|(n, s, e)| format!("{n}:{s:#x}-{e:#x}"))
                .collect();
            (parts, h.to_vec())
        }
        None => (Vec::new(), Vec::new()),
    };
    let rss = crate::sys::procfs::status(&pid.as_raw().to_string())
        .ok()
        .and_then(|st| st.get("VmRSS").cloned())
        .and_then(|v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Ok(pb::PrepareRequest {
        task_id: task,
        arch: std::env::consts::ARCH.into(),
        vdso_blake3: hash,
        vdso_parts: parts,
        memory_bytes: rss,
        ..Default::default()
    })
}
