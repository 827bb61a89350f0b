//! Creating the restore stub with `clone3` (5.3), asking for a PID with
//! `set_tid` (5.5; needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN in the
//! PID namespace's owner, 5.9).

use nix::errno::Errno;
use nix::unistd::Pid;

use super::abi;

/// Forks a stub: a copy of this process (PID `want` when given) that
/// closes every descriptor, blocks every signal, starts its own session
/// and then sleeps until the caller seizes it and rebuilds it.
///
/// Fails with `EEXIST` when `want` is taken.
pub fn spawn_stub(want: Option<i32>) -> Result<Pid, Errno> {
    let set_tid: [libc::pid_t; 1] = [want.unwrap_or(0)];
    let (ptr, n) = match want {
        Some(_) => (set_tid.as_ptr() as u64, 1),
        None => (0, 0),
    };
    let args = abi::clone_args_bytes(0, libc::SIGCHLD as u64, ptr, n);
    // SAFETY: `args` is a complete struct clone_args (88 bytes) whose only
    // pointer, set_tid, points at `set_tid`, alive for the call. Without
    // CLONE_VM the child gets its own copy of this address space, like
    // fork(); it runs only async-signal-safe calls (stub_main) and never
    // returns into Rust code.
    let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), args.len()) };
    match Errno::result(r)? {
        0 => stub_main(),
        pid => Ok(Pid::from_raw(
            i32::try_from(pid).map_err(|_| Errno::EINVAL)?,
        )),
    }
}

/// The stub's life before it is seized: nothing the restore could trip on.
fn stub_main() -> ! {
    // SAFETY: plain system calls on values we own; no allocation, no locks
    // (we are a fork of a possibly multi-threaded process).
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&raw mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
        libc::setsid();
        loop {
            libc::pause();
        }
    }
}

/// Forks a warm-memory holder: a copy of this process that maps `len`
/// bytes of private anonymous memory, allocates every page of it
/// (`MADV_POPULATE_WRITE`), writes the mapping's address (or `-errno`)
/// as 8 bytes to `ready` and then sleeps, its signals blocked, until a
/// restore takes its memory (see `restore::warm`). It dies with the
/// calling thread (`PR_SET_PDEATHSIG`).
pub fn spawn_holder(len: u64, ready: std::os::fd::RawFd) -> Result<Pid, Errno> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let args = abi::clone_args_bytes(0, libc::SIGCHLD as u64, 0, 0);
    // SAFETY: as in spawn_stub: a complete struct clone_args without
    // pointers, no CLONE_VM; the child runs only holder_main.
    let r = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), args.len()) };
    match Errno::result(r)? {
        0 => holder_main(parent, len, ready),
        pid => Ok(Pid::from_raw(
            i32::try_from(pid).map_err(|_| Errno::EINVAL)?,
        )),
    }
}

/// The holder's life: async-signal-safe calls only (a fork of a possibly
/// multi-threaded process).
fn holder_main(parent: libc::pid_t, len: u64, ready: std::os::fd::RawFd) -> ! {
    // SAFETY: plain system calls on values we own; no allocation, no
    // locks. `ready` is the one descriptor kept; `word` outlives the write.
    unsafe {
        let fd = u32::try_from(ready).unwrap_or(0);
        if fd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, fd - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, fd + 1, u32::MAX, 0u32);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&raw mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const set, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
        libc::setsid();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        let word: i64 =
            if p == libc::MAP_FAILED || libc::madvise(p, len, libc::MADV_POPULATE_WRITE) != 0 {
                -i64::from(*libc::__errno_location())
            } else {
                p as i64
            };
        libc::write(ready, (&raw const word).cast(), 8);
        libc::close(ready);
        loop {
            libc::pause();
        }
    }
}
