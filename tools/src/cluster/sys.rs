//! The only unsafe code of the testbed: `fork`, `clone` into new
//! namespaces, and pidfds (nix 0.31 wraps none of them safely).
//!
//! `fork` and `clone` are only sound here because the `migfs cluster`
//! commands never start a thread: both check that the process has exactly
//! one thread before they run, so the child cannot inherit a lock another
//! thread held (allocator, stdio), and may run ordinary Rust code until it
//! execs or `_exit`s.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;

use anyhow::{Context, bail};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{ForkResult, Pid};

/// Stack for a `clone`d child: it only sets up and execs.
const CLONE_STACK: usize = 1 << 20;

/// Fails unless this process has exactly one thread.
fn ensure_single_threaded() -> anyhow::Result<()> {
    let n = std::fs::read_dir("/proc/self/task")
        .context("read /proc/self/task")?
        .count();
    if n != 1 {
        bail!(
            "internal error: fork/clone/setns need a single-threaded process, this one has {n} threads"
        );
    }
    Ok(())
}

/// Runs `child` in the child, turning a panic into exit code 101, and
/// leaves with `_exit` (no atexit handlers, no flushing of the parent's
/// buffers a second time).
fn run_child(child: impl FnOnce() -> i32) -> ! {
    let code = std::panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(101);
    // SAFETY: _exit ends the process at once; it has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Forks; the child runs `child` and exits with the code it returns.
/// Values `child` captures are dropped in the parent when this returns.
pub fn fork_with(child: impl FnOnce() -> i32) -> anyhow::Result<Pid> {
    ensure_single_threaded()?;
    // SAFETY: the process has one thread (checked just above), so the
    // child's copy of memory holds no lock owned by a thread that does not
    // exist in it; the child runs `child` and leaves through `_exit`.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => run_child(child),
    }
}

/// Like [`fork_with`], but the child starts in the new namespaces `flags`
/// asks for (`CLONE_NEWPID` makes it PID 1 of a new PID namespace).
pub fn clone_with(flags: CloneFlags, child: impl FnOnce() -> i32) -> anyhow::Result<Pid> {
    ensure_single_threaded()?;
    let mut stack = vec![0u8; CLONE_STACK];
    let mut child = Some(child);
    let cb = Box::new(move || -> isize {
        match child.take() {
            Some(f) => run_child(f),
            None => 127,
        }
    });
    // SAFETY: without CLONE_VM the child gets its own copy of the address
    // space, `stack` included, and runs `cb` on that copy; the parent keeps
    // `stack` alive until clone returns. With one thread (checked above) the
    // child inherits no held lock, exactly as after fork; it never returns
    // from `cb` (run_child ends in `_exit`).
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .with_context(|| format!("clone({flags:?})"))?;
    Ok(pid)
}

/// `pidfd_open(2)`: a descriptor that names this very process, so a signal
/// sent through it can never reach a later process that reuses the PID.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a PID and a flags word and returns a new
    // descriptor or -1; no memory is passed.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret)
        .map_err(|_| io::Error::other("pidfd_open returned an fd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: Signal) -> io::Result<()> {
    // SAFETY: the arguments are a live descriptor, a signal number, a null
    // siginfo pointer (allowed: the kernel fills in a default) and flags 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec, so a command the
/// testbed starts inherits only stdin, stdout and stderr (not whatever
/// the caller happened to have open). Linux 5.9+ (`close_range`).
pub fn cloexec_from_3() -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets the
    // close-on-exec flag on this process's descriptors; it reads and
    // writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
