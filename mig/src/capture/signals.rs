//! Signal dispositions (asked of the process with `rt_sigaction`, since
//! no /proc file shows handler addresses), the shared pending queue, and
//! the interval timers that send signals (`getitimer`, asked the same way).

use migfs_proto::image::{ITimer, PendingSignal, SigAction};
use nix::unistd::Pid;

use super::remote::Remote;
use crate::error::CaptureError;
use crate::sys::{abi, procfs, ptrace};

/// The dispositions of every caught or ignored signal (the others are
/// SIG_DFL, which a restore sets for every signal not listed).
pub fn sigactions(pid: Pid, remote: &Remote) -> Result<Vec<SigAction>, CaptureError> {
    let p = pid.as_raw();
    let st = procfs::status(&p.to_string()).map_err(|source| CaptureError::Io {
        pid: p,
        what: "status".into(),
        source,
    })?;
    let mask = |k: &str| {
        st.get(k)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let interesting = mask("SigCgt") | mask("SigIgn");
    let mut out = Vec::new();
    for signo in 1..=64u32 {
        if interesting & (1 << (signo - 1)) == 0
            || signo == libc::SIGKILL as u32
            || signo == libc::SIGSTOP as u32
        {
            continue;
        }
        let (ret, raw) = remote.call(
            pid,
            libc::SYS_rt_sigaction,
            |s| [u64::from(signo), 0, s, 8, 0, 0],
            &[],
            abi::KSIGACTION_SIZE,
        )?;
        ret.map_err(|errno| CaptureError::Sys {
            pid: p,
            what: format!("rt_sigaction({signo})"),
            errno,
        })?;
        let word =
            |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        out.push(SigAction {
            signo,
            handler: word(0),
            flags: word(1),
            restorer: word(2),
            mask: word(3),
        });
    }
    Ok(out)
}

/// The armed `setitimer` timers (real, virtual, profiling) with the time
/// left on each. A real timer keeps running while the process is frozen;
/// the restore arms it with what was left here.
pub fn itimers(pid: Pid, remote: &Remote) -> Result<Vec<ITimer>, CaptureError> {
    let mut out = Vec::new();
    for which in [libc::ITIMER_REAL, libc::ITIMER_VIRTUAL, libc::ITIMER_PROF] {
        let (ret, raw) = remote.call(
            pid,
            libc::SYS_getitimer,
            |s| [u64::from(which.unsigned_abs()), s, 0, 0, 0, 0],
            &[],
            32,
        )?;
        ret.map_err(|errno| CaptureError::Sys {
            pid: pid.as_raw(),
            what: format!("getitimer({which})"),
            errno,
        })?;
        let word =
            |i: usize| i64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (interval_us, value_us) =
            (word(0) * 1_000_000 + word(1), word(2) * 1_000_000 + word(3));
        // A periodic real timer that fired during the freeze reads 0 left:
        // the kernel arms it again only when SIGALRM is taken off the
        // queue (that signal is captured as pending). It is still armed
        // for the process: it comes back with a full period left.
        let value_us = if value_us == 0 { interval_us } else { value_us };
        if value_us != 0 {
            out.push(ITimer {
                which: which.unsigned_abs(),
                interval_us,
                value_us,
            });
        }
    }
    Ok(out)
}

/// Signals pending for the whole process.
pub fn shared_pending(pid: Pid) -> Result<Vec<PendingSignal>, CaptureError> {
    let q = ptrace::peek_siginfo(pid, true).map_err(|errno| CaptureError::Sys {
        pid: pid.as_raw(),
        what: "PTRACE_PEEKSIGINFO (shared)".into(),
        errno,
    })?;
    Ok(q.iter().map(super::regs::pending).collect())
}
