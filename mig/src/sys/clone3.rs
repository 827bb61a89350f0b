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
        // The copy of the node's memory would stay shared with it (and be
        // copied as the node writes to it): gone, but for the stack this
        // runs on (its thread's TLS is there too). System calls only from
        // here.
        let here = 0u8;
        drop_private_memory((&raw const here) as u64);
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let p = libc::syscall(
            libc::SYS_mmap,
            0usize,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0usize,
        );
        let word: i64 = if p == -1
            || libc::syscall(libc::SYS_madvise, p, len, libc::MADV_POPULATE_WRITE) != 0
        {
            -i64::from(*libc::__errno_location())
        } else {
            p
        };
        libc::syscall(libc::SYS_write, ready, &raw const word, 8usize);
        libc::syscall(libc::SYS_close, ready);
        loop {
            libc::syscall(libc::SYS_pause);
        }
    }
}

/// Unmaps every writable private mapping of this process but the one
/// holding `keep` (the stack the caller runs on): what a fork of the node
/// shares with it. Reads `/proc/self/maps` into a stack buffer and parses
/// it by hand: system calls only.
///
/// # Safety
///
/// Only in a forked child that makes nothing but system calls afterwards:
/// its heap, globals and the other threads' stacks are gone.
unsafe fn drop_private_memory(keep: u64) {
    const MAX: usize = 1024;
    let mut ranges = [(0u64, 0u64); MAX];
    let mut n = 0;
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/maps".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return;
    }
    let mut buf = [0u8; 4096];
    // Per line: start, '-', end, ' ', perms (4 bytes); the rest skipped.
    let (mut field, mut start, mut end, mut perm, mut pi) = (0u8, 0u64, 0u64, [0u8; 4], 0);
    loop {
        // SAFETY: `buf` is ours and as long as the read.
        let k = unsafe { libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len()) };
        if k <= 0 {
            break;
        }
        for &b in &buf[..usize::try_from(k).unwrap_or(0)] {
            match (field, b) {
                (_, b'\n') => {
                    let private_rw = perm[1] == b'w' && perm[3] == b'p';
                    if private_rw && !(start..end).contains(&keep) && n < MAX {
                        ranges[n] = (start, end);
                        n += 1;
                    }
                    (field, start, end, perm, pi) = (0, 0, 0, [0; 4], 0);
                }
                (0, b'-') => field = 1,
                (1, b' ') => field = 2,
                (0 | 1, _) => {
                    let d = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        _ => 0,
                    };
                    let v = if field == 0 { &mut start } else { &mut end };
                    *v = (*v << 4) | u64::from(d);
                }
                (2, b' ') => field = 3,
                (2, _) if pi < 4 => {
                    perm[pi] = b;
                    pi += 1;
                }
                _ => {}
            }
        }
    }
    // SAFETY: our descriptor.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    for &(s, e) in &ranges[..n] {
        // SAFETY: not the stack this runs on; the caller touches nothing
        // else of this process's memory afterwards.
        unsafe { libc::syscall(libc::SYS_munmap, s, e - s) };
    }
}
