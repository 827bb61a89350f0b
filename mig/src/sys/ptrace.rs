//! ptrace: seize, interrupt, registers (general, xsave), signal mask, rseq
//! configuration, pending siginfo, and waiting for stops.
//!
//! Needs Linux 5.13 (`PTRACE_GET_RSEQ_CONFIGURATION`); the rest is 3.11+.
//! All wrappers are thin and return `Errno`.

use nix::errno::Errno;
use nix::unistd::Pid;

use super::abi;

/// The registers of one thread: `struct user_regs_struct`, 27 words.
pub type Regs = [u64; abi::reg::COUNT];

/// The largest xsave area we accept (AMX makes it ~11 KiB).
const XSAVE_MAX: usize = 64 << 10;

fn ptrace_raw(req: libc::c_uint, tid: Pid, addr: u64, data: u64) -> Result<i64, Errno> {
    // SAFETY: every caller passes, for its request, either plain integers
    // or a pointer to a live buffer of the size that request writes or
    // reads (see each wrapper); the kernel checks the rest.
    let r = unsafe {
        libc::ptrace(
            req,
            tid.as_raw(),
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    Errno::result(r)
}

/// `PTRACE_SEIZE` with `options`.
pub fn seize(tid: Pid, options: libc::c_ulong) -> Result<(), Errno> {
    ptrace_raw(abi::PTRACE_SEIZE, tid, 0, options).map(drop)
}

/// `PTRACE_SETOPTIONS`.
pub fn set_options(tid: Pid, options: libc::c_ulong) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SETOPTIONS, tid, 0, options).map(drop)
}

/// `PTRACE_INTERRUPT`: the thread stops with `PTRACE_EVENT_STOP`.
pub fn interrupt(tid: Pid) -> Result<(), Errno> {
    ptrace_raw(abi::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// `PTRACE_CONT`, delivering `sig` (0: none).
pub fn cont(tid: Pid, sig: i32) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_CONT, tid, 0, i64::from(sig).cast_unsigned()).map(drop)
}

/// `PTRACE_SINGLESTEP`.
pub fn step(tid: Pid) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SINGLESTEP, tid, 0, 0).map(drop)
}

/// `PTRACE_DETACH`: the thread runs on.
pub fn detach(tid: Pid) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_DETACH, tid, 0, 0).map(drop)
}

/// `PTRACE_GETREGS`.
pub fn getregs(tid: Pid) -> Result<Regs, Errno> {
    let mut regs: Regs = [0; abi::reg::COUNT];
    // The buffer is a live `[u64; 27]`, the size of user_regs_struct.
    ptrace_raw(libc::PTRACE_GETREGS, tid, 0, regs.as_mut_ptr() as u64)?;
    Ok(regs)
}

/// `PTRACE_SETREGS`.
pub fn setregs(tid: Pid, regs: &Regs) -> Result<(), Errno> {
    ptrace_raw(libc::PTRACE_SETREGS, tid, 0, regs.as_ptr() as u64).map(drop)
}

/// `PTRACE_GETREGSET NT_X86_XSTATE`: the FPU/SSE/AVX state as the kernel
/// lays it out (size depends on the CPU's enabled features).
pub fn get_xstate(tid: Pid) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; XSAVE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // `iov` describes `buf`, alive for the call; the kernel shrinks iov_len.
    ptrace_raw(
        abi::PTRACE_GETREGSET,
        tid,
        abi::NT_X86_XSTATE as u64,
        &raw mut iov as u64,
    )?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// `PTRACE_SETREGSET NT_X86_XSTATE`.
pub fn set_xstate(tid: Pid, xsave: &[u8]) -> Result<(), Errno> {
    let mut copy = xsave.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    ptrace_raw(
        abi::PTRACE_SETREGSET,
        tid,
        abi::NT_X86_XSTATE as u64,
        &raw mut iov as u64,
    )
    .map(drop)
}

/// `PTRACE_GETSIGMASK`.
pub fn get_sigmask(tid: Pid) -> Result<u64, Errno> {
    let mut mask = 0u64;
    ptrace_raw(abi::PTRACE_GETSIGMASK, tid, 8, &raw mut mask as u64)?;
    Ok(mask)
}

/// `PTRACE_SETSIGMASK`.
pub fn set_sigmask(tid: Pid, mask: u64) -> Result<(), Errno> {
    ptrace_raw(abi::PTRACE_SETSIGMASK, tid, 8, &raw const mask as u64).map(drop)
}

/// A thread's rseq registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RseqConfig {
    /// Address of `struct rseq`.
    pub addr: u64,
    /// Registered length.
    pub len: u32,
    /// Abort signature.
    pub signature: u32,
    /// Flags.
    pub flags: u32,
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`; `None` when not registered.
pub fn get_rseq(tid: Pid) -> Result<Option<RseqConfig>, Errno> {
    // struct ptrace_rseq_configuration { u64 ptr; u32 size, sig, flags, pad; }
    let mut raw = [0u64; 3];
    ptrace_raw(
        abi::PTRACE_GET_RSEQ_CONFIGURATION,
        tid,
        24,
        raw.as_mut_ptr() as u64,
    )?;
    let addr = raw[0];
    let len = (raw[1] & 0xffff_ffff) as u32;
    let signature = (raw[1] >> 32) as u32;
    let flags = (raw[2] & 0xffff_ffff) as u32;
    Ok((addr != 0).then_some(RseqConfig {
        addr,
        len,
        signature,
        flags,
    }))
}

/// `PTRACE_PEEKSIGINFO`: the queued signals (thread queue, or the shared
/// one), as raw 128-byte `siginfo_t`s.
pub fn peek_siginfo(tid: Pid, shared: bool) -> Result<Vec<[u8; abi::SIGINFO_SIZE]>, Errno> {
    let mut out = Vec::new();
    loop {
        // struct ptrace_peeksiginfo_args { u64 off; u32 flags; s32 nr; }
        let flags = if shared {
            abi::PTRACE_PEEKSIGINFO_SHARED
        } else {
            0
        };
        let args: [u64; 2] = [out.len() as u64, u64::from(flags) | (32u64 << 32)];
        let mut buf = vec![[0u8; abi::SIGINFO_SIZE]; 32];
        let n = ptrace_raw(
            abi::PTRACE_PEEKSIGINFO,
            tid,
            args.as_ptr() as u64,
            buf.as_mut_ptr() as u64,
        )?;
        let n = usize::try_from(n).map_err(|_| Errno::EINVAL)?;
        out.extend_from_slice(&buf[..n.min(32)]);
        if n < 32 {
            return Ok(out);
        }
    }
}

/// `PTRACE_GETSIGINFO` (in a signal-delivery-stop).
pub fn get_siginfo(tid: Pid) -> Result<[u8; abi::SIGINFO_SIZE], Errno> {
    let mut buf = [0u8; abi::SIGINFO_SIZE];
    ptrace_raw(libc::PTRACE_GETSIGINFO, tid, 0, buf.as_mut_ptr() as u64)?;
    Ok(buf)
}

/// `PTRACE_GETEVENTMSG` (e.g. the new tid at `PTRACE_EVENT_CLONE`).
pub fn get_event_msg(tid: Pid) -> Result<u64, Errno> {
    let mut msg: libc::c_ulong = 0;
    ptrace_raw(libc::PTRACE_GETEVENTMSG, tid, 0, &raw mut msg as u64)?;
    Ok(msg)
}

/// What a traced thread reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// `PTRACE_EVENT_*` stop (`PTRACE_EVENT_STOP` after an interrupt, a
    /// group-stop or a new auto-attached thread).
    Event {
        /// The event number.
        event: i32,
        /// The stop signal.
        sig: i32,
    },
    /// Signal-delivery-stop for this signal.
    Signal(i32),
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
}

fn decode(status: i32) -> Stop {
    if libc::WIFSTOPPED(status) {
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if event != 0 {
            Stop::Event { event, sig }
        } else {
            Stop::Signal(sig)
        }
    } else if libc::WIFSIGNALED(status) {
        Stop::Killed(libc::WTERMSIG(status))
    } else {
        Stop::Exited(libc::WEXITSTATUS(status))
    }
}

fn waitpid_raw(tid: Pid, flags: i32) -> Result<Option<Stop>, Errno> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live i32 the kernel writes.
        let r = unsafe { libc::waitpid(tid.as_raw(), &raw mut status, flags | libc::__WALL) };
        match Errno::result(r) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(decode(status))),
        }
    }
}

/// Blocks until `tid` reports a stop or its end.
pub fn wait(tid: Pid) -> Result<Stop, Errno> {
    waitpid_raw(tid, 0).and_then(|s| s.ok_or(Errno::ECHILD))
}

/// Like [`wait`], but gives up at `deadline` (returns `None`).
pub fn wait_until(tid: Pid, deadline: std::time::Instant) -> Result<Option<Stop>, Errno> {
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        if let Some(s) = waitpid_raw(tid, libc::WNOHANG)? {
            return Ok(Some(s));
        }
        if std::time::Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_millis(2));
    }
}
