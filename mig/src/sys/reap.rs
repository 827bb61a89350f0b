//! Waiting for a process to end without disturbing ptrace: the agent is
//! the parent of the processes it restores or starts and may also be
//! tracing them (a later move), so it must not `waitpid` them while they
//! live (that would take their ptrace-stops). A pidfd becomes readable
//! when the process exits; only then is its status collected.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A pidfd for `pid`.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Frees the memory of the process behind `pidfd`, which has a SIGKILL
/// pending, on this thread while it exits (`process_mrelease`, Linux
/// 5.15): the freeing is shared between two CPUs.
pub fn mrelease(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: process_mrelease takes a pidfd and flags (0) and only reads
    // them.
    let r = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks until the process behind `pidfd` has exited, then reaps it if it
/// is our child. Returns its exit code (128 + signal when killed), or
/// `None` when someone else collected the status (not our child, or a
/// tracer waited for it first).
pub fn wait_exit(pidfd: &OwnedFd) -> io::Result<Option<i32>> {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is a valid pollfd array of length 1 for the call.
        let r = unsafe { libc::poll(&raw mut p, 1, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: siginfo_t is plain data; zeroed is a valid initial value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let id = libc::id_t::try_from(pidfd.as_raw_fd()).map_err(io::Error::other)?;
    // SAFETY: waitid writes into `info`, which lives across the call.
    let r = unsafe { libc::waitid(libc::P_PIDFD, id, &raw mut info, libc::WEXITED) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ECHILD) {
            return Ok(None);
        }
        return Err(e);
    }
    // SAFETY: after a successful waitid for WEXITED, si_status is set.
    let status = unsafe { info.si_status() };
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        status
    } else {
        128 + status
    }))
}
