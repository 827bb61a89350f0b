//! Asking the frozen process questions only it can answer (its signal
//! handlers, alternate stacks, clear_child_tid address) by running single
//! system calls inside it; also used to flush its files and to queue
//! held signals again on thaw.
//!
//! The call runs at a `syscall` instruction found in the process's own
//! vDSO (or code), with a borrowed scratch area: some bytes of a writable
//! private mapping, saved before and written back after. Every thread is
//! stopped, so nothing else can see the borrowed bytes. Signals are
//! blocked in the thread for the duration.

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::error::CaptureError;
use crate::sys::inject;
use crate::sys::mem::ProcMem;
use crate::sys::procfs::MapEntry;
use crate::sys::{ptrace, vdso};

/// Bytes of scratch space a call may use.
pub const SCRATCH: usize = 512;

/// A frozen process we can run calls in.
pub struct Remote {
    pid: Pid,
    insn: u64,
    scratch: u64,
    mem: ProcMem,
}

impl Remote {
    /// Prepares calls into `pid`, whose mappings are `maps`.
    pub fn new(pid: Pid, maps: &[MapEntry]) -> Result<Remote, CaptureError> {
        let p = pid.as_raw();
        let mem = ProcMem::open(pid, true).map_err(|source| CaptureError::Io {
            pid: p,
            what: "open /proc/PID/mem".into(),
            source,
        })?;
        let insn = find_insn(&mem, maps).ok_or_else(|| CaptureError::Unsupported {
            pid: p,
            what: "no syscall instruction found in its vDSO or code".into(),
        })?;
        let scratch = maps
            .iter()
            .find(|m| {
                m.prot & (libc::PROT_WRITE as u32) != 0
                    && !m.shared
                    && m.end - m.start >= SCRATCH as u64
                    && !vdso::is_vdso_part(m)
            })
            .map(|m| m.start)
            .ok_or_else(|| CaptureError::Unsupported {
                pid: p,
                what: "no writable private mapping to borrow".into(),
            })?;
        Ok(Remote {
            pid,
            insn,
            scratch,
            mem,
        })
    }

    /// Runs syscall `nr` in `tid`. `args` gets the scratch address;
    /// `input` is put at the start of the scratch area first. Returns the
    /// call's result and the first `out_len` scratch bytes after it.
    pub fn call(
        &self,
        tid: Pid,
        nr: i64,
        args: impl FnOnce(u64) -> [u64; 6],
        input: &[u8],
        out_len: usize,
    ) -> Result<(Result<u64, Errno>, Vec<u8>), CaptureError> {
        let p = self.pid.as_raw();
        let io = |what: &str| {
            let what = format!("thread {tid}: {what}");
            move |source| CaptureError::Io {
                pid: p,
                what,
                source,
            }
        };
        // A call that neither reads nor writes the scratch area leaves it
        // alone.
        let borrows = !input.is_empty() || out_len > 0;
        let mut saved = vec![0u8; if borrows { SCRATCH } else { 0 }];
        self.mem
            .read(self.scratch, &mut saved)
            .map_err(io("save scratch bytes"))?;
        let mask =
            ptrace::get_sigmask(tid).map_err(|errno| sys(p, tid, "PTRACE_GETSIGMASK", errno))?;
        ptrace::set_sigmask(tid, !0).map_err(|errno| sys(p, tid, "PTRACE_SETSIGMASK", errno))?;
        let mut res = self
            .mem
            .write(self.scratch, &input[..input.len().min(SCRATCH)])
            .map_err(io("write scratch"));
        let mut out = vec![0u8; out_len.min(SCRATCH)];
        let mut ret = Err(Errno::EINVAL);
        if res.is_ok() {
            match inject::syscall(tid, self.insn, nr, args(self.scratch)) {
                Ok(o) => ret = o.result(),
                Err(source) => {
                    res = Err(CaptureError::Inject {
                        pid: p,
                        what: format!("thread {tid}: syscall {nr}"),
                        source,
                    })
                }
            }
        }
        if res.is_ok() && !out.is_empty() {
            res = self
                .mem
                .read(self.scratch, &mut out)
                .map_err(io("read scratch"));
        }
        let put_back = self
            .mem
            .write(self.scratch, &saved)
            .map_err(io("restore scratch bytes"));
        let unmask =
            ptrace::set_sigmask(tid, mask).map_err(|errno| sys(p, tid, "PTRACE_SETSIGMASK", errno));
        res.and(put_back).and(unmask)?;
        Ok((ret, out))
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Where the scratch area is (for arguments that point into it).
    pub fn scratch(&self) -> u64 {
        self.scratch
    }

    /// Reads `len` bytes of the process at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem.read(addr, &mut buf)?;
        Ok(buf)
    }
}

fn sys(pid: i32, tid: Pid, what: &str, errno: Errno) -> CaptureError {
    CaptureError::Sys {
        pid,
        what: format!("thread {tid}: {what}"),
        errno,
    }
}

/// A `syscall` instruction in the vDSO, else in the first executable
/// mapping that has one.
fn find_insn(mem: &ProcMem, maps: &[MapEntry]) -> Option<u64> {
    let exec = |m: &&MapEntry| {
        m.prot & (libc::PROT_EXEC as u32) != 0 && m.prot & (libc::PROT_READ as u32) != 0
    };
    let vdso = maps.iter().filter(|m| m.path == "[vdso]");
    let rest = maps
        .iter()
        .filter(exec)
        .filter(|m| m.path != "[vdso]" && m.path != "[vsyscall]");
    for m in vdso.chain(rest) {
        let len = usize::try_from((m.end - m.start).min(8 << 20)).ok()?;
        let mut buf = vec![0u8; len];
        if let Some(a) = mem
            .read(m.start, &mut buf)
            .ok()
            .and_then(|()| inject::find_syscall_insn(&buf, m.start))
        {
            return Some(a);
        }
    }
    None
}
