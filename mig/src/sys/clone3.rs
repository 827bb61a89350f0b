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
