//! Warm staging for a lazy restore: pages go into memory the node had
//! already allocated, then `UFFDIO_MOVE` puts them in place, instead of
//! `UFFDIO_COPY` allocating each page while the process waits.
//!
//! The stub of a lazy move made from a warm-memory holder
//! ([`crate::restore::warm`]) keeps the holder's region mapped in its
//! address space (the staging area) and the holder itself alive, sharing
//! that address space. The kernel runs `UFFDIO_MOVE` only for a task of
//! the registered mm, so the holder is the one that runs it: a thread
//! here (the mover) traces it and injects each move through the vDSO's
//! `syscall` instruction. An install writes its bytes into the next
//! unused piece of the staging area (`process_vm_writev`: a copy into
//! pages that are already there) and asks the mover to move that piece
//! to its place; what cannot be moved (a page already there, a run that
//! spans two mappings, an event pending) is copied as before.
//!
//! The staging area is registered with the userfaultfd and marked
//! `MADV_DONTFORK`: a fork does not copy it, and if the process unmaps,
//! discards or moves any of it (it should not know it is there) the
//! event is read under the origin map's write lock, which every install
//! holds the read lock of, and staging stops for good. At the end the
//! range is unregistered, the holder unmaps it and is killed: the
//! process keeps no trace of it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::Pid;
use parking_lot::Mutex;

use crate::restore::warm::Warm;
use crate::sys::{abi, inject, mem, procfs, ptrace, uffd, vdso};

const PAGE: u64 = 4096;
/// How long the mover may take to come up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

enum Req {
    /// Move `len` bytes of pages from `src` (staging) to `dst`.
    Move {
        dst: u64,
        src: u64,
        len: u64,
        reply: mpsc::SyncSender<uffd::Filled>,
    },
    /// Unmap the staging area (unless it is no longer ours), close the
    /// holder's userfaultfd, end the holder.
    Close { unmap: bool },
}

/// A lazy restore's staging area and the holder that moves pages out of
/// it.
pub(super) struct Staging {
    helper: Pid,
    /// The area: its first page holds the move's arguments.
    start: u64,
    end: u64,
    next: Mutex<u64>,
    /// Staging has stopped (the area is not ours any more, or the mover
    /// failed): installs copy.
    dead: AtomicBool,
    tx: Mutex<Option<mpsc::Sender<Req>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Pages moved into place.
    pub moved: AtomicU64,
    /// Time spent writing into the area and moving out of it, and moves.
    write_ns: AtomicU64,
    move_ns: AtomicU64,
    moves: AtomicU64,
}

impl Staging {
    /// Starts the mover for `holder`, whose address space is the restored
    /// process's and holds the warm area `[start, end)` (registered with
    /// `uffd`, this node's descriptor of the process's userfaultfd).
    pub fn start(holder: Warm, start: u64, end: u64, uffd: &OwnedFd) -> Result<Staging, String> {
        let helper = holder.pid();
        let raw = uffd.as_raw_fd();
        let node = i32::try_from(std::process::id()).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("stage-{helper}"))
            .spawn(move || mover(holder, start, end, raw, node, &ready_tx, &rx))
            .map_err(|e| format!("start the mover: {e}"))?;
        match ready_rx.recv_timeout(SETUP_TIMEOUT) {
            Ok(Ok(())) => Ok(Staging {
                helper,
                start,
                end,
                next: Mutex::new(start + PAGE),
                dead: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                moved: AtomicU64::new(0),
                write_ns: AtomicU64::new(0),
                move_ns: AtomicU64::new(0),
                moves: AtomicU64::new(0),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The mover is stuck in a ptrace wait: its holder is killed
            // with this node (PTRACE_O_EXITKILL) or when the wait ends.
            Err(_) => Err("the warm-memory holder did not stop for the mover".into()),
        }
    }

    /// The area's size.
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    /// Installs `data` at `dst` by staging and moving it. Returns the
    /// bytes dealt with from the start (moved, or skipped because the
    /// process has the page already) and the bytes moved; whatever is
    /// left the caller copies. `missing` says which runs of a range the
    /// process has no page for yet. `None` when staging cannot take it
    /// (full, stopped).
    pub fn place(
        &self,
        dst: u64,
        data: &[u8],
        missing: &dyn Fn(u64, u64) -> Vec<(u64, u64)>,
    ) -> Option<(u64, u64)> {
        if self.dead.load(Ordering::Relaxed) {
            return None;
        }
        let len = data.len() as u64;
        let at = {
            let mut next = self.next.lock();
            if *next + len > self.end {
                return None;
            }
            let at = *next;
            *next += len;
            at
        };
        let t = std::time::Instant::now();
        if let Err(e) = mem::write_vm(self.helper, at, data) {
            self.stop(&format!("write into the staging area: {e}"));
            return None;
        }
        let t_moves = std::time::Instant::now();
        let ns = |since: std::time::Instant| u64::try_from(since.elapsed().as_nanos()).unwrap_or(0);
        self.write_ns.fetch_add(ns(t), Ordering::Relaxed);
        let tx = self.tx.lock().clone()?;
        let end = dst + len;
        let (mut cur, mut moved) = (dst, 0u64);
        // Ranges still to move, in order; the front one is `cur..`.
        let mut todo: std::collections::VecDeque<(u64, u64)> = [(dst, end)].into();
        'ranges: while let Some((s, e)) = todo.pop_front() {
            cur = s;
            // A move may not span two mappings: a refused one is tried
            // again with half as many pages.
            let mut step = e - s;
            while cur < e {
                let n = step.min(e - cur);
                let (reply, answer) = mpsc::sync_channel(1);
                let req = Req::Move {
                    dst: cur,
                    src: at + (cur - dst),
                    len: n,
                    reply,
                };
                if tx.send(req).is_err() {
                    break 'ranges;
                }
                let Ok(f) = answer.recv() else { break 'ranges };
                self.moves.fetch_add(1, Ordering::Relaxed);
                cur += f.done;
                moved += f.done;
                match f.err {
                    None if f.done == n => step = step.saturating_mul(2),
                    None if f.done > 0 => {}
                    // Stopped by an event: the copy says which.
                    None => break 'ranges,
                    // The process has this page already (a fault filled
                    // it): move only what is still missing after it.
                    Some(Errno::EEXIST) => {
                        for r in missing(cur, e).into_iter().rev() {
                            todo.push_front(r);
                        }
                        // Past that page at least (the page map may not
                        // say it is there yet).
                        if let Some(front) = todo.front_mut()
                            && front.0 <= cur
                        {
                            front.0 = cur + PAGE;
                            if front.0 >= front.1 {
                                todo.pop_front();
                            }
                        }
                        cur = todo.front().map_or(end, |r| r.0);
                        continue 'ranges;
                    }
                    Some(Errno::EIO) => {
                        self.stop("the mover failed");
                        break 'ranges;
                    }
                    Some(Errno::EINVAL | Errno::ENOENT) if n - f.done > PAGE => {
                        step = ((n - f.done) / 2).next_multiple_of(PAGE);
                    }
                    Some(_) => break 'ranges,
                }
            }
            cur = todo.front().map_or(end, |r| r.0);
        }
        self.moved.fetch_add(moved / PAGE, Ordering::Relaxed);
        self.move_ns.fetch_add(ns(t_moves), Ordering::Relaxed);
        Some((cur.min(end) - dst, moved))
    }

    /// The process unmapped, discarded or moved `[s, e)`: if that touches
    /// the staging area, staging stops (its pages are not ours to move).
    pub fn touched(&self, s: u64, e: u64) {
        if s < self.end && e > self.start {
            self.stop("the process changed the staging area");
        }
    }

    fn stop(&self, why: &str) {
        if !self.dead.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                helper = self.helper.as_raw(),
                why,
                "warm staging stopped; copying"
            );
        }
    }

    /// Ends staging: unregisters the area from `uffd`, has the holder
    /// unmap it (unless the process changed it) and ends the holder.
    /// Call once nothing installs any more.
    pub fn close(&self, uffd: &OwnedFd) {
        let Some(tx) = self.tx.lock().take() else {
            return;
        };
        // Unregistered first: the unmap must not wait for its event.
        let registered = uffd::unregister(uffd, self.start, self.end - self.start).is_ok();
        let unmap = registered && !self.dead.load(Ordering::Relaxed);
        let _ = tx.send(Req::Close { unmap });
        drop(tx);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        tracing::debug!(
            helper = self.helper.as_raw(),
            pages = self.moved.load(Ordering::Relaxed),
            moves = self.moves.load(Ordering::Relaxed),
            write_ms = ms(&self.write_ns),
            move_ms = ms(&self.move_ns),
            "warm staging closed"
        );
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Not closed (an error path): the holder still ends with the
        // mover; the area stays mapped, empty of moved pages.
        drop(self.tx.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// The mover thread: traces `holder`, takes the userfaultfd into it, then
/// runs each move in it until told to close; the holder ends with it.
fn mover(
    holder: Warm,
    start: u64,
    end: u64,
    uffd_raw: i32,
    node: i32,
    ready: &mpsc::SyncSender<Result<(), String>>,
    rx: &mpsc::Receiver<Req>,
) {
    let pid = holder.pid();
    let (insn, fd) = match setup(pid, uffd_raw, node) {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let call = |nr: i64, args: [u64; 6]| -> Result<u64, String> {
        inject::syscall(pid, insn, nr, args)
            .map_err(|e| e.to_string())?
            .result()
            .map_err(|e| e.to_string())
    };
    let mut broken = false;
    for req in rx {
        match req {
            Req::Move {
                dst,
                src,
                len,
                reply,
            } => {
                let f = if broken {
                    None
                } else {
                    run_move(pid, insn, fd, start, dst, src, len)
                };
                let f = f.unwrap_or_else(|| {
                    broken = true;
                    uffd::Filled {
                        done: 0,
                        err: Some(Errno::EIO),
                    }
                });
                let _ = reply.send(f);
            }
            Req::Close { unmap } => {
                if unmap
                    && !broken
                    && let Err(e) = call(libc::SYS_munmap, [start, end - start, 0, 0, 0, 0])
                {
                    tracing::warn!(helper = pid.as_raw(), error = %e, "unmap the staging area");
                }
                break;
            }
        }
    }
    if !broken {
        let _ = call(libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
    }
    // Killed and collected here, by its tracer.
    drop(holder);
}

/// Seizes the holder, finds a `syscall` instruction in the vDSO of the
/// address space, and takes this node's descriptor `uffd_raw` into it;
/// returns the instruction and the holder's descriptor.
fn setup(pid: Pid, uffd_raw: i32, node: i32) -> Result<(u64, u64), String> {
    ptrace::seize(pid, abi::PTRACE_O_EXITKILL)
        .map_err(|e| format!("PTRACE_SEIZE the holder: {e}"))?;
    ptrace::interrupt(pid).map_err(|e| format!("PTRACE_INTERRUPT the holder: {e}"))?;
    match ptrace::wait(pid).map_err(|e| format!("waitpid the holder: {e}"))? {
        ptrace::Stop::Event { .. } => {}
        other => return Err(format!("the holder stopped with {other:?}")),
    }
    let maps = procfs::maps(pid).map_err(|e| format!("the holder's maps: {e}"))?;
    let block = vdso::find(&maps).ok_or("the address space has no vDSO")?;
    let mut text = vec![0u8; usize::try_from(block.vdso_end - block.vdso_start).unwrap_or(0)];
    mem::read_vm(pid, block.vdso_start, &mut text).map_err(|e| format!("read the vDSO: {e}"))?;
    let insn = inject::find_syscall_insn(&text, block.vdso_start)
        .ok_or("no syscall instruction in the vDSO")?;
    let call = |what: &str, nr: i64, args: [u64; 6]| -> Result<u64, String> {
        inject::syscall(pid, insn, nr, args)
            .map_err(|e| format!("{what} in the holder: {e}"))?
            .result()
            .map_err(|e| format!("{what} in the holder: {e}"))
    };
    let node = u64::try_from(node).map_err(|e| e.to_string())?;
    let raw = u64::try_from(uffd_raw).map_err(|e| e.to_string())?;
    let pidfd = call("pidfd_open", libc::SYS_pidfd_open, [node, 0, 0, 0, 0, 0])?;
    let fd = call(
        "pidfd_getfd",
        libc::SYS_pidfd_getfd,
        [pidfd, raw, 0, 0, 0, 0],
    );
    let _ = call("close", libc::SYS_close, [pidfd, 0, 0, 0, 0, 0]);
    Ok((insn, fd?))
}

/// One `UFFDIO_MOVE` run by the holder, its arguments at `scratch`;
/// `None` when the holder could not run it.
fn run_move(
    pid: Pid,
    insn: u64,
    fd: u64,
    scratch: u64,
    dst: u64,
    src: u64,
    len: u64,
) -> Option<uffd::Filled> {
    let mut args = uffd::move_args(dst, src, len);
    mem::write_vm(pid, scratch, &args).ok()?;
    let out = inject::syscall(
        pid,
        insn,
        libc::SYS_ioctl,
        [fd, uffd::UFFDIO_MOVE, scratch, 0, 0, 0],
    )
    .ok()?;
    if out.ret != 0 {
        mem::read_vm(pid, scratch, &mut args).ok()?;
    }
    Some(uffd::moved(out.ret, &args, len))
}
