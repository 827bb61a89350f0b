//! Per-thread state: registers (with the interrupted system call turned
//! into a restart), xsave, signal mask, rseq, robust list,
//! clear_child_tid, alternate signal stack, name, pending signals,
//! scheduling (nice, policy, CPU mask).

use migfs_proto::image::{AltStack, PendingSignal, Rseq, Sched, Thread};
use nix::unistd::Pid;

use super::remote::Remote;
use crate::error::CaptureError;
use crate::freeze::FrozenThread;
use crate::sys::abi::{self, reg};
use crate::sys::ptrace::{self, Regs};
use crate::sys::task;

/// `TIMER_ABSTIME` for clock_nanosleep.
const TIMER_ABSTIME: u64 = 1;

/// Captures one frozen thread of `pid`.
pub fn capture_thread(pid: Pid, t: &FrozenThread, remote: &Remote) -> Result<Thread, CaptureError> {
    let p = pid.as_raw();
    let tid = t.tid;
    let sys = |what: &'static str| {
        move |errno| CaptureError::Sys {
            pid: p,
            what: format!("thread {tid}: {what}"),
            errno,
        }
    };
    let mut regs = ptrace::getregs(tid).map_err(sys("PTRACE_GETREGS"))?;
    let xsave = ptrace::get_xstate(tid).map_err(sys("PTRACE_GETREGSET NT_X86_XSTATE"))?;
    let sigmask = ptrace::get_sigmask(tid).map_err(sys("PTRACE_GETSIGMASK"))?;
    let rseq = ptrace::get_rseq(tid).map_err(sys("PTRACE_GET_RSEQ_CONFIGURATION"))?;
    let (robust_list, robust_list_len) =
        task::get_robust_list(tid).map_err(sys("get_robust_list"))?;
    let mut note = restart_fixup(&mut regs).unwrap_or_default();
    if let Some(n) = rseq.and_then(|r| rseq_fixup(remote, &mut regs, r.addr)) {
        note = n;
    }
    let clear_child_tid = tid_address(remote, tid)?;
    let altstack = alt_stack(remote, tid)?;
    let comm =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).map_err(|source| {
            CaptureError::Io {
                pid: p,
                what: format!("thread {tid}: comm"),
                source,
            }
        })?;
    let queued = ptrace::peek_siginfo(tid, false).map_err(sys("PTRACE_PEEKSIGINFO"))?;
    let sched = task::sched(tid).map_err(sys("scheduling (nice, policy, CPU mask)"))?;
    let pending: Vec<PendingSignal> = t.held.iter().chain(&queued).map(pending).collect();
    Ok(Thread {
        tid: tid.as_raw(),
        comm: comm.trim_end_matches('\n').to_owned(),
        regs: regs.to_vec(),
        xsave,
        sigmask,
        rseq: rseq.map(|r| Rseq {
            addr: r.addr,
            len: r.len,
            signature: r.signature,
            flags: r.flags,
        }),
        robust_list,
        robust_list_len,
        clear_child_tid,
        altstack: Some(altstack),
        pending,
        syscall_note: note,
        sched: Some(Sched {
            nice: sched.nice,
            policy: sched.policy,
            priority: sched.priority,
            cpus: sched.cpus,
        }),
    })
}

/// A pending signal from a raw siginfo.
pub fn pending(info: &[u8; abi::SIGINFO_SIZE]) -> PendingSignal {
    let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
    PendingSignal {
        signo,
        siginfo: info.to_vec(),
    }
}

/// Turns a system call the freeze interrupted into one the restored
/// thread makes again, as the kernel would have on resume. Relative
/// sleeps restart with the remaining time when the program gave a
/// `rem` pointer (the kernel wrote it there); other calls restart with
/// their own arguments. Returns a note saying what was done.
pub fn restart_fixup(regs: &mut Regs) -> Option<String> {
    let nr = regs[reg::ORIG_RAX] as i64;
    if nr < 0 {
        return None;
    }
    if let Some(note) = own_restart(regs) {
        return Some(note);
    }
    let note = match -(regs[reg::RAX] as i64) {
        abi::ERESTARTSYS | abi::ERESTARTNOINTR | abi::ERESTARTNOHAND => {
            format!("syscall {nr} restarted")
        }
        // The kernel's restart_syscall of a call interrupted before and
        // let go by something other than a thaw of ours: the call it
        // restarts is not in the registers, and a new process has
        // nothing to restart, so the program gets EINTR from it.
        abi::ERESTART_RESTARTBLOCK => {
            "a call the kernel was restarting (restart_syscall) returns EINTR".to_owned()
        }
        _ => return None,
    };
    regs[reg::RAX] = nr.cast_unsigned();
    regs[reg::RIP] -= 2;
    Some(note)
}

/// A call the kernel would resume through `restart_syscall` (a relative
/// sleep, `poll`, a futex wait with a relative timeout), made into the
/// same call again by the thread itself: a restored process has no
/// restart block, and a thread frozen again later would show
/// `restart_syscall`, whose call no capture can name; so a thaw uses this
/// too. Sleeps given a `rem` pointer go on for the time left
/// (`sleep_restart`); other calls restart with their own arguments, so a
/// timeout starts again in full (the kernel keeps the deadline where no
/// tracer can read it): the call waits longer than asked, by as long as
/// it had waited, and never fails with EINTR.
pub fn own_restart(regs: &mut Regs) -> Option<String> {
    let nr = regs[reg::ORIG_RAX] as i64;
    if nr < 0 || nr == libc::SYS_restart_syscall {
        return None;
    }
    if let Some(note) = sleep_restart(regs) {
        return Some(note.to_owned());
    }
    if -(regs[reg::RAX] as i64) != abi::ERESTART_RESTARTBLOCK {
        return None;
    }
    regs[reg::RAX] = nr.cast_unsigned();
    regs[reg::RIP] -= 2;
    Some(format!(
        "syscall {nr} restarted with its arguments (its timeout starts again)"
    ))
}

/// A relative `nanosleep` / `clock_nanosleep` the freeze interrupted,
/// given a `rem` pointer (the kernel wrote the time left there), made
/// into the same call for the time left: `rem` becomes the request.
fn sleep_restart(regs: &mut Regs) -> Option<&'static str> {
    let nr = regs[reg::ORIG_RAX] as i64;
    if -(regs[reg::RAX] as i64) != abi::ERESTART_RESTARTBLOCK {
        return None;
    }
    let note = match nr {
        libc::SYS_nanosleep if regs[reg::RSI] != 0 => {
            regs[reg::RDI] = regs[reg::RSI];
            "nanosleep restarted with the remaining time"
        }
        libc::SYS_clock_nanosleep if regs[reg::RSI] & TIMER_ABSTIME == 0 && regs[reg::R10] != 0 => {
            regs[reg::RDX] = regs[reg::R10];
            "clock_nanosleep restarted with the remaining time"
        }
        _ => return None,
    };
    regs[reg::RAX] = nr.cast_unsigned();
    regs[reg::RIP] -= 2;
    Some(note)
}

/// A thread stopped inside an rseq critical section resumes at its abort
/// handler, as the kernel would have sent it there.
fn rseq_fixup(remote: &Remote, regs: &mut Regs, rseq_addr: u64) -> Option<String> {
    let cs_ptr = remote.read(rseq_addr + 8, 8).ok()?;
    let cs = u64::from_ne_bytes(cs_ptr.try_into().ok()?);
    if cs == 0 {
        return None;
    }
    let raw = remote.read(cs, 32).ok()?;
    let word = |i: usize| u64::from_ne_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
    let (start, post_commit, abort) = (word(8), word(16), word(24));
    let ip = regs[reg::RIP];
    (ip >= start && ip < start.wrapping_add(post_commit)).then(|| {
        regs[reg::RIP] = abort;
        format!("inside an rseq critical section: resumes at its abort handler {abort:#x}")
    })
}

fn tid_address(remote: &Remote, tid: Pid) -> Result<u64, CaptureError> {
    let (ret, out) = remote.call(
        tid,
        libc::SYS_prctl,
        |s| [abi::PR_GET_TID_ADDRESS, s, 0, 0, 0, 0],
        &[],
        8,
    )?;
    ret.map_err(|errno| CaptureError::Sys {
        pid: remote.pid().as_raw(),
        what: format!("thread {tid}: PR_GET_TID_ADDRESS"),
        errno,
    })?;
    Ok(u64::from_ne_bytes(out[..8].try_into().unwrap_or([0; 8])))
}

fn alt_stack(remote: &Remote, tid: Pid) -> Result<AltStack, CaptureError> {
    let (ret, out) = remote.call(
        tid,
        libc::SYS_sigaltstack,
        |s| [0, s, 0, 0, 0, 0],
        &[],
        abi::STACK_T_SIZE,
    )?;
    ret.map_err(|errno| CaptureError::Sys {
        pid: remote.pid().as_raw(),
        what: format!("thread {tid}: sigaltstack"),
        errno,
    })?;
    let word = |i: usize| u64::from_ne_bytes(out[i..i + 8].try_into().unwrap_or([0; 8]));
    Ok(AltStack {
        sp: word(0),
        flags: (word(8) & 0xffff_ffff) as u32,
        size: word(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(nr: i64, ret: i64) -> Regs {
        let mut r = [0u64; reg::COUNT];
        r[reg::ORIG_RAX] = nr.cast_unsigned();
        r[reg::RAX] = ret.cast_unsigned();
        r[reg::RIP] = 0x1002;
        r
    }

    #[test]
    fn restarts_interrupted_calls() {
        let mut r = regs(libc::SYS_read, -abi::ERESTARTSYS);
        assert!(restart_fixup(&mut r).is_some());
        assert_eq!((r[reg::RAX], r[reg::RIP]), (libc::SYS_read as u64, 0x1000));

        let mut r = regs(libc::SYS_clock_nanosleep, -abi::ERESTART_RESTARTBLOCK);
        r[reg::RDX] = 0x5000; // req
        r[reg::R10] = 0x6000; // rem
        restart_fixup(&mut r).unwrap();
        assert_eq!(
            (r[reg::RDX], r[reg::RIP]),
            (0x6000, 0x1000),
            "sleeps the remaining time"
        );

        let mut r = regs(libc::SYS_nanosleep, -abi::ERESTART_RESTARTBLOCK);
        r[reg::RDI] = 0x5000;
        restart_fixup(&mut r).unwrap();
        assert_eq!(r[reg::RDI], 0x5000, "no rem pointer: the full time again");
    }

    #[test]
    fn a_thaw_makes_the_thread_itself_restart_what_the_kernel_would_restart_blindly() {
        let mut r = regs(libc::SYS_nanosleep, -abi::ERESTART_RESTARTBLOCK);
        r[reg::RDI] = 0x5000;
        r[reg::RSI] = 0x6000;
        assert!(own_restart(&mut r).unwrap().contains("remaining time"));
        assert_eq!(
            (r[reg::RAX], r[reg::RDI], r[reg::RIP]),
            (libc::SYS_nanosleep as u64, 0x6000, 0x1000)
        );
        let mut r = regs(libc::SYS_poll, -abi::ERESTART_RESTARTBLOCK);
        r[reg::RDX] = 1500;
        assert!(own_restart(&mut r).is_some(), "poll restarts itself");
        assert_eq!(
            (r[reg::RAX], r[reg::RDX], r[reg::RIP]),
            (libc::SYS_poll as u64, 1500, 0x1000)
        );
        let mut r = regs(libc::SYS_read, -abi::ERESTARTSYS);
        assert!(own_restart(&mut r).is_none(), "the kernel restarts read");
        assert_eq!(r[reg::RIP], 0x1002);
        let mut r = regs(libc::SYS_restart_syscall, -abi::ERESTART_RESTARTBLOCK);
        assert!(own_restart(&mut r).is_none());
        assert!(restart_fixup(&mut r).unwrap().contains("EINTR"));
    }

    #[test]
    fn leaves_finished_calls_alone() {
        let mut r = regs(libc::SYS_write, 8);
        assert!(restart_fixup(&mut r).is_none());
        assert_eq!(r[reg::RIP], 0x1002);
        let mut r = regs(libc::SYS_read, -libc::EINTR as i64);
        assert!(restart_fixup(&mut r).is_none());
        let mut r = regs(-1, -abi::ERESTARTSYS);
        assert!(restart_fixup(&mut r).is_none(), "not in a syscall");
    }
}
