//! Warm memory: anonymous memory a node allocates before a move needs
//! it, so that an eager move's pages land in memory that is already
//! there instead of memory the kernel must find and zero under the copy
//! (on the 2-vCPU test VM that allocation costs as much as sending the
//! bytes, or far more).
//!
//! The pool keeps a ladder of *holders* ready ([`ladder`]): children of
//! the node that dropped the node's memory they inherited, mapped their
//! size of private anonymous memory, allocated every page of it
//! (`MADV_POPULATE_WRITE`) and sleep. A restore takes the one that fits
//! ([`WarmPool::take_for`]) and makes it the stub: it seizes the holder,
//! has it `clone3` a process that shares its address space (`CLONE_VM`,
//! with the wanted PID, `CLONE_PARENT` so that the node is its parent),
//! and kills the holder. The new process owns the address space and its
//! memory alone; it is emptied like a fresh stub except for the warm
//! region, whose pages the stream fill moves under the process's
//! mappings with `mremap` (page tables move, no page is copied; see
//! [`super::stream`]). The pool thread then makes the holder again.
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

/// How often the pool checks that its holders are still alive.
const CHECK: Duration = Duration::from_secs(1);
/// How long the pool waits after a holder failed before the next try.
const BACKOFF: Duration = Duration::from_secs(5);

/// How a restore gets warm memory: called with the bytes of mappings it
/// could back; the holder to use, if any.
pub type WarmTake = Box<dyn FnOnce(u64) -> Option<Warm> + Send>;

/// The [`WarmTake`] of `pool`: [`WarmPool::take_for`].
pub fn taker(pool: &Arc<WarmPool>) -> WarmTake {
    let pool = Arc::clone(pool);
    Box::new(move |need| pool.take_for(need))
}

/// A holder with its memory allocated, not yet used by a restore.
#[derive(Debug)]
pub struct Warm {
    pid: Pid,
    addr: u64,
    len: u64,
    /// Whether a restore made it its stub (it is gone then).
    consumed: bool,
    /// The pool and slot it was taken from: told when it is used or
    /// ended, so that the pool makes the next one only then.
    taken_from: Option<(Weak<Shared>, usize)>,
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
        self.settle();
    }

    /// Tells the pool it was taken from that it is gone.
    fn settle(&mut self) {
        let Some((pool, i)) = self.taken_from.take() else {
            return;
        };
        let Some(pool) = pool.upgrade() else { return };
        pool.state.lock().slots[i].out = false;
        pool.changed.notify_all();
    }
}

impl Drop for Warm {
    fn drop(&mut self) {
        if !self.consumed {
            let _ = crate::sys::task::kill(self.pid, libc::SIGKILL);
            let _ = ptrace::wait(self.pid);
            self.settle();
        }
    }
}

/// The sizes of the holders of a pool of `bytes`: half of it, a quarter,
/// an eighth and so on down to 16 MiB, the last one taking what is
/// left, so that a move finds a holder less than twice its size (down to
/// the smallest) and little is freed while the process is stopped.
pub fn ladder(bytes: u64, page: u64) -> Vec<u64> {
    let round = |b: u64| b.div_ceil(page) * page;
    if bytes <= 2 * SMALLEST {
        return vec![round(bytes)];
    }
    let mut sizes = Vec::new();
    let mut left = bytes;
    let mut next = bytes / 2;
    while next >= SMALLEST && left - next >= SMALLEST {
        sizes.push(round(next));
        left -= next;
        next /= 2;
    }
    sizes.push(round(left));
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    sizes
}

/// The smallest holder of a ladder.
const SMALLEST: u64 = 16 << 20;

/// Which of holders of sizes `lens` (in ladder order, `None` for one not
/// ready) mappings of `need` bytes should use: the smallest that holds
/// them all. None when none is ready and large enough, or when what would
/// be left over is over three times the need: what is left is freed while
/// the process is stopped, at a fraction of what allocating as much costs.
pub fn pick(lens: &[Option<u64>], need: u64) -> Option<usize> {
    if need == 0 {
        return None;
    }
    let (i, len) = lens
        .iter()
        .enumerate()
        .filter_map(|(i, l)| Some((i, (*l)?)))
        .filter(|&(_, l)| l >= need)
        .min_by_key(|&(_, l)| l)?;
    (len - need <= need.saturating_mul(3)).then_some(i)
}

struct Slot {
    size: u64,
    ready: Option<Warm>,
    /// Its holder is out with a restore: the next is made once it is used
    /// or ended.
    out: bool,
}

struct State {
    slots: Vec<Slot>,
    /// The holder being made (killed on stop).
    filling: Option<Pid>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Holders made, for the node's counters.
    made: AtomicU64,
}

/// Keeps holders of warm memory ready: a ladder of sizes ([`ladder`]).
pub struct WarmPool {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmPool")
            .field("ready", &self.ready_bytes())
            .finish_non_exhaustive()
    }
}

impl WarmPool {
    /// Starts the pool thread, which makes the holders at once, the
    /// largest first.
    pub fn start(bytes: u64) -> std::io::Result<WarmPool> {
        let slots = ladder(bytes, crate::sys::page_size())
            .into_iter()
            .map(|size| Slot {
                size,
                ready: None,
                out: false,
            })
            .collect();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots,
                filling: None,
                stop: false,
            }),
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

    /// The holder for mappings of `need` bytes ([`pick`]), if one is ready
    /// and worth it. The pool makes its replacement once it is used or
    /// ended.
    pub fn take_for(&self, need: u64) -> Option<Warm> {
        let mut st = self.shared.state.lock();
        let lens: Vec<Option<u64>> = st
            .slots
            .iter()
            .map(|s| s.ready.as_ref().map(|w| w.len))
            .collect();
        let i = pick(&lens, need)?;
        let slot = &mut st.slots[i];
        let mut w = slot.ready.take()?;
        slot.out = true;
        w.taken_from = Some((Arc::downgrade(&self.shared), i));
        Some(w)
    }

    /// Bytes of warm memory ready now.
    pub fn ready_bytes(&self) -> u64 {
        let st = self.shared.state.lock();
        st.slots
            .iter()
            .filter_map(|s| s.ready.as_ref())
            .map(|w| w.len)
            .sum()
    }

    /// The sizes of its holders, largest first.
    pub fn sizes(&self) -> Vec<u64> {
        self.shared
            .state
            .lock()
            .slots
            .iter()
            .map(|s| s.size)
            .collect()
    }

    /// Holders made so far.
    pub fn made(&self) -> u64 {
        self.shared.made.load(Ordering::Relaxed)
    }

    /// Waits until every holder is ready or `timeout` passes; returns
    /// whether they are.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock();
        let all = |st: &State| st.slots.iter().all(|s| s.ready.is_some());
        while !all(&st) && !st.stop {
            if self
                .shared
                .changed
                .wait_until(&mut st, deadline)
                .timed_out()
            {
                break;
            }
        }
        all(&st)
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        let ready: Vec<Warm> = {
            let mut st = self.shared.state.lock();
            st.stop = true;
            if let Some(pid) = st.filling {
                let _ = crate::sys::task::kill(pid, libc::SIGKILL);
            }
            st.slots.iter_mut().filter_map(|s| s.ready.take()).collect()
        };
        drop(ready);
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The pool thread: make a holder for each slot without one.
fn keep_ready(s: &Shared) {
    loop {
        let (i, size) = {
            let mut st = s.state.lock();
            loop {
                if st.stop {
                    return;
                }
                // Killed (by the OOM killer, say): reaped, then replaced.
                for slot in &mut st.slots {
                    let dead = slot.ready.as_ref().is_some_and(|w| {
                        !matches!(ptrace::wait_until(w.pid, Instant::now()), Ok(None))
                    });
                    if dead && let Some(mut w) = slot.ready.take() {
                        tracing::warn!(pid = w.pid.as_raw(), "a warm-memory holder died");
                        w.consumed = true;
                    }
                }
                let empty = st
                    .slots
                    .iter()
                    .position(|slot| slot.ready.is_none() && !slot.out);
                match empty {
                    Some(i) => break (i, st.slots[i].size),
                    None => {
                        s.changed.wait_for(&mut st, CHECK);
                    }
                }
            }
        };
        let t0 = Instant::now();
        match make_holder(s, size) {
            Ok(w) => {
                tracing::info!(
                    pid = w.pid.as_raw(),
                    mib = w.len >> 20,
                    ms = t0.elapsed().as_millis(),
                    "warm memory ready"
                );
                s.made.fetch_add(1, Ordering::Relaxed);
                let mut st = s.state.lock();
                st.filling = None;
                if st.stop {
                    drop(st);
                    drop(w);
                    return;
                }
                st.slots[i].ready = Some(w);
                if st.slots.iter().all(|s| s.ready.is_some()) {
                    let total: u64 = st.slots.iter().map(|s| s.size).sum();
                    tracing::info!(mib = total >> 20, "all warm memory ready");
                }
                drop(st);
                s.changed.notify_all();
            }
            Err(e) => {
                tracing::warn!(error = %e, mib = size >> 20, "no warm memory");
                let mut st = s.state.lock();
                st.filling = None;
                if !st.stop {
                    s.changed.wait_for(&mut st, BACKOFF);
                }
            }
        }
    }
}

/// Forks a holder of `size` bytes and waits until its memory is allocated.
fn make_holder(s: &Shared, size: u64) -> Result<Warm, String> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let pid = {
        let mut st = s.state.lock();
        if st.stop {
            return Err("the pool is stopping".into());
        }
        let pid = clone3::spawn_holder(size, w.as_raw_fd()).map_err(|e| format!("clone3: {e}"))?;
        st.filling = Some(pid);
        pid
    };
    drop(w);
    // Until it is ready, the Warm's drop ends it if anything fails.
    let mut held = Warm {
        pid,
        addr: 0,
        len: size,
        consumed: false,
        taken_from: None,
    };
    let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");
    let word = read_word(r).map_err(|e| format!("holder {pid}: {e}"))?;
    if word < 0 {
        return Err(format!(
            "holder {pid} could not allocate {} MiB: {}",
            size >> 20,
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

#[cfg(test)]
mod tests {
    use super::{ladder, pick};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_ladder_halves_down_to_the_smallest_and_adds_up() {
        let l = ladder(4400 * MIB, 4096);
        assert_eq!(l[0], 2200 * MIB);
        assert_eq!(l[1], 1100 * MIB);
        assert_eq!(l.iter().sum::<u64>(), 4400 * MIB);
        assert!(l.iter().all(|&b| b >= 16 * MIB));
        assert!(l.windows(2).all(|w| w[0] >= w[1]));
        assert_eq!(ladder(20 * MIB, 4096), vec![20 * MIB]);
        assert_eq!(ladder(1, 4096), vec![4096]);
    }

    #[test]
    fn the_smallest_holder_that_fits_is_picked() {
        let lens = [Some(2048 * MIB), Some(1024 * MIB), None, Some(256 * MIB)];
        assert_eq!(pick(&lens, 1000 * MIB), Some(1));
        assert_eq!(pick(&lens, 1025 * MIB), Some(0));
        // The 512 MiB one is not ready: the next that fits.
        assert_eq!(pick(&lens, 300 * MIB), Some(1));
        assert_eq!(pick(&lens, 100 * MIB), Some(3));
        // Over three times the need left over: not worth it.
        assert_eq!(pick(&lens, 10 * MIB), None);
        // Larger than all: fresh memory.
        assert_eq!(pick(&lens, 3000 * MIB), None);
        assert_eq!(pick(&lens, 0), None);
        assert_eq!(pick(&[None, None], 100 * MIB), None);
    }
}
