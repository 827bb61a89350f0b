//! Warm memory: anonymous memory a node allocates before a move needs
//! it, so that an eager move's pages land in memory that is already
//! there instead of memory the kernel must find and zero under the copy
//! (on the 2-vCPU test VM that allocation costs about as much as
//! sending the bytes).
//!
//! The pool keeps one *holder* ready: a child of the node that mapped
//! `bytes` of private anonymous memory and allocated every page of it
//! (`MADV_POPULATE_WRITE`), then sleeps. A restore takes it
//! ([`WarmPool::take`]) and makes it the stub: it seizes the holder,
//! has it `clone3` a process that shares its address space (`CLONE_VM`,
//! with the wanted PID, `CLONE_PARENT` so that the node is its parent),
//! and kills the holder. The new process owns the address space and its
//! memory alone; it is emptied like a fresh stub except for the warm
//! region, whose pages the stream fill moves under the process's
//! mappings with `mremap` (page tables move, no page is copied; see
//! [`super::stream`]). The pool thread then makes the next holder.
//!
//! A holder has `oom_score_adj` 1000: under memory pressure the kernel
//! kills it before anything else; the pool notices and makes a new one.
//! The process made from it gets the node's own `oom_score_adj` back.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};

use crate::sys::{clone3, ptrace};

/// How often the pool checks that its holder is still alive.
const CHECK: Duration = Duration::from_secs(1);
/// How long the pool waits after a holder failed before the next try.
const BACKOFF: Duration = Duration::from_secs(5);

/// A holder with its memory allocated, not yet used by a restore.
#[derive(Debug)]
pub struct Warm {
    pid: Pid,
    addr: u64,
    len: u64,
    /// Whether a restore made it its stub (it is gone then).
    consumed: bool,
    /// The pool it was taken from: told when it is used, given back or
    /// ended, so that it makes the next one only then.
    taken_from: Option<Weak<Shared>>,
}

impl Warm {
    /// The holder's PID.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The warm region: start and length.
    pub fn region(&self) -> (u64, u64) {
        (self.addr, self.len)
    }

    /// The restore took it: it has ended the holder itself.
    pub fn consume(mut self) {
        self.consumed = true;
        self.settle(None);
    }

    /// Not used, untouched: back to its pool as the ready holder (ended
    /// when the pool is gone).
    pub fn give_back(mut self) {
        let back = Warm {
            pid: self.pid,
            addr: self.addr,
            len: self.len,
            consumed: false,
            taken_from: None,
        };
        self.consumed = true;
        self.settle(Some(back));
    }

    /// Tells the pool it was taken from that it is settled: `back` ready
    /// again, or gone.
    fn settle(&mut self, back: Option<Warm>) {
        let Some(pool) = self.taken_from.take().and_then(|w| w.upgrade()) else {
            return;
        };
        let mut slot = pool.slot.lock();
        slot.out = false;
        if !slot.stop {
            slot.ready = back;
        }
        drop(slot);
        pool.changed.notify_all();
    }
}

/// Whether warm memory of `len` bytes is worth using for mappings of
/// `need` bytes: what of it is left over is freed while the process is
/// stopped, at about a fifth of what allocating as much costs; a holder
/// over three times the need costs more than it saves.
pub fn worth(need: u64, len: u64) -> bool {
    need > 0 && need.saturating_mul(3) >= len
}

impl Drop for Warm {
    fn drop(&mut self) {
        if !self.consumed {
            let _ = crate::sys::task::kill(self.pid, libc::SIGKILL);
            let _ = ptrace::wait(self.pid);
            self.settle(None);
        }
    }
}

#[derive(Default)]
struct Slot {
    ready: Option<Warm>,
    /// The holder being made (killed on stop).
    filling: Option<Pid>,
    /// A holder is out with a restore: the next is made once it is used
    /// or ended, not while it may come back.
    out: bool,
    stop: bool,
}

struct Shared {
    bytes: u64,
    slot: Mutex<Slot>,
    changed: Condvar,
    /// Holders made, for the node's counters.
    made: AtomicU64,
}

/// Keeps one holder of `bytes` of warm memory ready.
pub struct WarmPool {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool")
            .field("bytes", &self.shared.bytes)
            .field("ready", &self.ready_bytes())
            .finish_non_exhaustive()
    }
}

impl WarmPool {
    /// Starts the pool thread, which makes the first holder at once.
    pub fn start(bytes: u64) -> std::io::Result<WarmPool> {
        let page = crate::sys::page_size();
        let bytes = bytes.div_ceil(page) * page;
        let shared = Arc::new(Shared {
            bytes,
            slot: Mutex::new(Slot::default()),
            changed: Condvar::new(),
            made: AtomicU64::new(0),
        });
        let s2 = Arc::clone(&shared);
        // The holders die with this thread (PR_SET_PDEATHSIG): it lives as
        // long as the pool.
        let thread = std::thread::Builder::new()
            .name("warm-memory".into())
            .spawn(move || keep_ready(&s2))?;
        Ok(WarmPool {
            shared,
            thread: Some(thread),
        })
    }

    /// The ready holder, if there is one. The pool makes the next once
    /// this one is used or ended ([`Warm::give_back`] returns it).
    pub fn take(&self) -> Option<Warm> {
        let mut slot = self.shared.slot.lock();
        let mut w = slot.ready.take()?;
        slot.out = true;
        w.taken_from = Some(Arc::downgrade(&self.shared));
        Some(w)
    }

    /// Bytes of warm memory ready now (0 while a holder is being made).
    pub fn ready_bytes(&self) -> u64 {
        self.shared.slot.lock().ready.as_ref().map_or(0, |w| w.len)
    }

    /// Holders made so far.
    pub fn made(&self) -> u64 {
        self.shared.made.load(Ordering::Relaxed)
    }

    /// Waits until a holder is ready or `timeout` passes; returns whether
    /// one is.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut slot = self.shared.slot.lock();
        while slot.ready.is_none() && !slot.stop {
            if self
                .shared
                .changed
                .wait_until(&mut slot, deadline)
                .timed_out()
            {
                break;
            }
        }
        slot.ready.is_some()
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        {
            let mut slot = self.shared.slot.lock();
            slot.stop = true;
            if let Some(pid) = slot.filling {
                let _ = crate::sys::task::kill(pid, libc::SIGKILL);
            }
            slot.ready = None;
        }
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The pool thread: make a holder whenever none is ready.
fn keep_ready(s: &Shared) {
    loop {
        {
            let mut slot = s.slot.lock();
            loop {
                if slot.stop {
                    return;
                }
                let dead = slot
                    .ready
                    .as_ref()
                    .map(|w| !matches!(ptrace::wait_until(w.pid, Instant::now()), Ok(None)));
                match dead {
                    None if !slot.out => break,
                    None => {
                        s.changed.wait_for(&mut slot, CHECK);
                    }
                    // Killed (by the OOM killer, say): reaped, then replaced.
                    Some(true) => {
                        if let Some(mut w) = slot.ready.take() {
                            tracing::warn!(pid = w.pid.as_raw(), "the warm-memory holder died");
                            w.consumed = true;
                        }
                        continue;
                    }
                    Some(false) => {
                        s.changed.wait_for(&mut slot, CHECK);
                    }
                }
            }
        }
        let t0 = Instant::now();
        match make_holder(s) {
            Ok(w) => {
                tracing::info!(
                    pid = w.pid.as_raw(),
                    mib = w.len >> 20,
                    ms = t0.elapsed().as_millis(),
                    "warm memory ready"
                );
                s.made.fetch_add(1, Ordering::Relaxed);
                let mut slot = s.slot.lock();
                slot.filling = None;
                if slot.stop {
                    return;
                }
                slot.ready = Some(w);
                drop(slot);
                s.changed.notify_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, mib = s.bytes >> 20, "no warm memory");
                let mut slot = s.slot.lock();
                slot.filling = None;
                if !slot.stop {
                    s.changed.wait_for(&mut slot, BACKOFF);
                }
            }
        }
    }
}

/// Forks a holder and waits until its memory is allocated.
fn make_holder(s: &Shared) -> Result<Warm, String> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let pid = {
        let mut slot = s.slot.lock();
        if slot.stop {
            return Err("the pool is stopping".into());
        }
        let pid =
            clone3::spawn_holder(s.bytes, w.as_raw_fd()).map_err(|e| format!("clone3: {e}"))?;
        slot.filling = Some(pid);
        pid
    };
    drop(w);
    // Until it is ready, the Warm's drop ends it if anything fails.
    let mut held = Warm {
        pid,
        addr: 0,
        len: s.bytes,
        consumed: false,
        taken_from: None,
    };
    let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");
    let word = read_word(r).map_err(|e| format!("holder {pid}: {e}"))?;
    if word < 0 {
        return Err(format!(
            "holder {pid} could not allocate {} MiB: {}",
            s.bytes >> 20,
            nix::errno::Errno::from_raw(i32::try_from(-word).unwrap_or(libc::EINVAL))
        ));
    }
    held.addr = word.cast_unsigned();
    Ok(held)
}

fn read_word(r: OwnedFd) -> std::io::Result<i64> {
    let mut f = std::fs::File::from(r);
    let mut b = [0u8; 8];
    f.read_exact(&mut b)?;
    Ok(i64::from_ne_bytes(b))
}

/// The `oom_score_adj` of this process, for a process made from a holder.
pub fn own_oom_score_adj() -> String {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .map_or_else(|_| "0".into(), |s| s.trim().to_owned())
}
