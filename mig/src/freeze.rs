//! Freezing: `PTRACE_SEIZE` + `PTRACE_INTERRUPT` on every thread, looping
//! until a listing of `/proc/PID/task` shows no thread we have not
//! stopped. No SIGSTOP is sent, so the process sees nothing. Dropping a
//! [`Frozen`] without [`Frozen::kill`] thaws it (detaches every thread).

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::error::FreezeError;
use crate::sys::abi::SIGINFO_SIZE;
use crate::sys::procfs;
use crate::sys::ptrace::{self, Stop};

/// One stopped thread.
#[derive(Debug)]
pub struct FrozenThread {
    /// Its id.
    pub tid: Pid,
    /// Signals it was about to take when it stopped (signal-delivery-stops
    /// we suppressed); they are queued again on thaw and saved as pending
    /// in an image.
    pub held: Vec<[u8; SIGINFO_SIZE]>,
}

/// A process whose every thread is in a ptrace-stop under us.
#[derive(Debug)]
pub struct Frozen {
    pid: Pid,
    threads: Vec<FrozenThread>,
    done: bool,
}

/// Stops every thread of `pid`; gives up (and thaws) when one does not
/// stop within `timeout`.
#[tracing::instrument(skip_all, fields(pid = pid.as_raw()))]
pub fn freeze(pid: Pid, timeout: Duration) -> Result<Frozen, FreezeError> {
    let p = pid.as_raw();
    let mut frozen = Frozen {
        pid,
        threads: Vec::new(),
        done: false,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let tids = procfs::tasks(pid).map_err(|_| FreezeError::NoProcess { pid: p })?;
        let new: Vec<Pid> = tids
            .into_iter()
            .filter(|t| !frozen.threads.iter().any(|f| f.tid == *t))
            .collect();
        if new.is_empty() {
            break;
        }
        let mut seized = Vec::new();
        for tid in new {
            match ptrace::seize(tid, 0) {
                Ok(()) => {}
                Err(Errno::ESRCH) => continue,
                Err(errno) => {
                    return Err(FreezeError::Ptrace {
                        pid: p,
                        tid: tid.as_raw(),
                        what: "PTRACE_SEIZE",
                        errno,
                    });
                }
            }
            if let Err(errno) = ptrace::interrupt(tid) {
                let _ = ptrace::detach(tid);
                return Err(FreezeError::Ptrace {
                    pid: p,
                    tid: tid.as_raw(),
                    what: "PTRACE_INTERRUPT",
                    errno,
                });
            }
            seized.push(tid);
        }
        for tid in seized {
            if let Some(t) = wait_stopped(pid, tid, deadline, timeout)? {
                frozen.threads.push(t);
            }
        }
    }
    if let Some(i) = frozen.threads.iter().position(|t| t.tid == pid) {
        frozen.threads.swap(0, i);
    } else {
        return Err(FreezeError::Gone {
            pid: p,
            how: "its main thread is gone".into(),
        });
    }
    tracing::debug!(threads = frozen.threads.len(), "frozen");
    Ok(frozen)
}

/// Waits for `tid` to reach its interrupt stop; `None` if it exited.
fn wait_stopped(
    pid: Pid,
    tid: Pid,
    deadline: Instant,
    timeout: Duration,
) -> Result<Option<FrozenThread>, FreezeError> {
    let (p, t) = (pid.as_raw(), tid.as_raw());
    let mut held = Vec::new();
    loop {
        let stop = ptrace::wait_until(tid, deadline).map_err(|errno| FreezeError::Ptrace {
            pid: p,
            tid: t,
            what: "waitpid",
            errno,
        })?;
        match stop {
            Some(Stop::Event { .. }) => return Ok(Some(FrozenThread { tid, held })),
            Some(Stop::Signal(_)) => {
                // The thread was already delivering a signal: keep it for
                // later and let the pending interrupt stop it.
                let info = ptrace::get_siginfo(tid).map_err(|errno| FreezeError::Ptrace {
                    pid: p,
                    tid: t,
                    what: "PTRACE_GETSIGINFO",
                    errno,
                })?;
                held.push(info);
                ptrace::cont(tid, 0).map_err(|errno| FreezeError::Ptrace {
                    pid: p,
                    tid: t,
                    what: "PTRACE_CONT",
                    errno,
                })?;
            }
            Some(Stop::Exited(code)) if tid == pid => {
                return Err(FreezeError::Gone {
                    pid: p,
                    how: format!("exit {code}"),
                });
            }
            Some(Stop::Killed(sig)) if tid == pid => {
                return Err(FreezeError::Gone {
                    pid: p,
                    how: format!("signal {sig}"),
                });
            }
            Some(Stop::Exited(_) | Stop::Killed(_)) => return Ok(None),
            None => {
                let _ = ptrace::detach(tid);
                let state = procfs::status(&format!("{pid}/task/{tid}"))
                    .ok()
                    .and_then(|s| s.get("State").cloned())
                    .unwrap_or_else(|| "?".into());
                return Err(FreezeError::Timeout {
                    pid: p,
                    tid: t,
                    ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    state,
                });
            }
        }
    }
}

impl Frozen {
    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Its threads, the main thread first.
    pub fn threads(&self) -> &[FrozenThread] {
        &self.threads
    }

    /// Lets every thread run on, first queueing again any signal it was
    /// about to take when frozen (through `requeue`, which runs in the
    /// still-stopped thread).
    pub fn thaw_with(mut self, mut requeue: impl FnMut(Pid, &[u8; SIGINFO_SIZE])) {
        for t in &self.threads {
            for info in &t.held {
                requeue(t.tid, info);
            }
        }
        self.detach_all();
    }

    /// Lets every thread run on (held signals are dropped).
    pub fn thaw(mut self) {
        self.detach_all();
    }

    fn detach_all(&mut self) {
        for t in self.threads.iter().rev() {
            restart_in_place(t.tid);
            if let Err(e) = ptrace::detach(t.tid) {
                tracing::warn!(tid = t.tid.as_raw(), error = %e, "detach failed");
            }
        }
        self.done = true;
    }

    /// Ends the process with SIGKILL and waits until every thread is gone
    /// (its parent still reaps it).
    pub fn kill(mut self) -> Result<(), FreezeError> {
        self.done = true;
        let p = self.pid.as_raw();
        // Opened first: the PID cannot be reused while it is ours to reap.
        let pidfd = crate::sys::reap::pidfd_open(p).ok();
        crate::sys::task::kill(self.pid, libc::SIGKILL).map_err(|errno| FreezeError::Ptrace {
            pid: p,
            tid: p,
            what: "kill",
            errno,
        })?;
        // Its memory is freed here as well as by its exit: faster.
        if let Some(fd) = &pidfd
            && let Err(e) = crate::sys::reap::mrelease(fd)
        {
            tracing::debug!(pid = p, error = %e, "process_mrelease");
        }
        for t in self.threads.iter().rev() {
            loop {
                match ptrace::wait(t.tid) {
                    Ok(Stop::Exited(_) | Stop::Killed(_)) | Err(_) => break,
                    Ok(_) => {
                        let _ = ptrace::cont(t.tid, 0);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            self.detach_all();
        }
    }
}

/// A thread the freeze interrupted in a call the kernel would resume
/// through `restart_syscall` (a relative sleep, poll, a futex wait with a
/// timeout) makes the call again itself: a thread frozen again later (a
/// pre-copy's tracker start, then the move's freeze) would otherwise show
/// `restart_syscall`, whose call no capture can name (see
/// `capture::regs::own_restart`).
fn restart_in_place(tid: Pid) {
    let Ok(mut regs) = ptrace::getregs(tid) else {
        return;
    };
    if crate::capture::regs::own_restart(&mut regs).is_some()
        && let Err(errno) = ptrace::setregs(tid, &regs)
    {
        tracing::warn!(tid = tid.as_raw(), %errno, "could not make an interrupted call restart itself");
    }
}
