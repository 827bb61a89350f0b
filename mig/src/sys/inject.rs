//! Running one system call inside a stopped, traced thread: point `rip` at
//! a `syscall` instruction, load the registers, single-step over it, read
//! `rax`, put the registers back.
//!
//! The kernel reports the single-step trap at syscall exit, before the
//! thread runs the next instruction, so the call may even unmap the page
//! the instruction lives on. `orig_rax` is set to -1 so that the stop we
//! resume from does not restart whatever call the thread was in.

use nix::errno::Errno;
use nix::unistd::Pid;

use super::abi::{self, reg};
use super::ptrace::{self, Stop};

/// The result of an injected call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `rax` after the call: a value, or `-errno`.
    pub ret: i64,
    /// Threads the call created (seen as `PTRACE_EVENT_CLONE`).
    pub clones: Vec<Pid>,
}

impl Outcome {
    /// The value, or the errno the call failed with.
    pub fn result(&self) -> Result<u64, Errno> {
        if (-4095..0).contains(&self.ret) {
            Err(Errno::from_raw(
                i32::try_from(-self.ret).unwrap_or(libc::EINVAL),
            ))
        } else {
            Ok(self.ret.cast_unsigned())
        }
    }
}

/// Why an injected call did not complete.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A ptrace or wait request failed.
    #[error("ptrace: {0}")]
    Ptrace(#[from] Errno),
    /// The thread stopped for another reason than the single-step trap.
    #[error("the thread stopped with {0:?} instead of finishing the call")]
    Unexpected(Stop),
}

/// Runs syscall `nr` with `args` in `tid` using the `syscall` instruction
/// at `insn`, then restores the thread's registers. The thread must be in
/// a ptrace-stop; signals it could take should be blocked.
pub fn syscall(tid: Pid, insn: u64, nr: i64, args: [u64; 6]) -> Result<Outcome, InjectError> {
    let saved = ptrace::getregs(tid)?;
    let mut regs = saved;
    regs[reg::RIP] = insn;
    regs[reg::RAX] = nr.cast_unsigned();
    regs[reg::ORIG_RAX] = u64::MAX;
    regs[reg::RDI] = args[0];
    regs[reg::RSI] = args[1];
    regs[reg::RDX] = args[2];
    regs[reg::R10] = args[3];
    regs[reg::R8] = args[4];
    regs[reg::R9] = args[5];
    ptrace::setregs(tid, &regs)?;
    let mut clones = Vec::new();
    loop {
        ptrace::step(tid)?;
        match ptrace::wait(tid)? {
            Stop::Signal(libc::SIGTRAP) => break,
            Stop::Event {
                event: abi::PTRACE_EVENT_CLONE,
                ..
            } => {
                let new = ptrace::get_event_msg(tid)?;
                clones.push(Pid::from_raw(
                    i32::try_from(new).map_err(|_| Errno::EINVAL)?,
                ));
            }
            other => return Err(InjectError::Unexpected(other)),
        }
    }
    let after = ptrace::getregs(tid)?;
    ptrace::setregs(tid, &saved)?;
    if after[reg::RIP] != insn + 2 {
        return Err(InjectError::Unexpected(Stop::Signal(libc::SIGTRAP)));
    }
    Ok(Outcome {
        ret: after[reg::RAX] as i64,
        clones,
    })
}

/// Why [`vdso_syscall_insn`] found no instruction.
#[derive(Debug, thiserror::Error)]
pub enum InsnError {
    /// The address space has no `[vdso]`.
    #[error("it has no vDSO")]
    NoVdso,
    /// The vDSO could not be read.
    #[error("read its vDSO: {0}")]
    Read(Errno),
    /// The vDSO holds no `syscall` instruction.
    #[error("no syscall instruction in its vDSO")]
    NoInsn,
}

/// A `syscall` instruction in the vDSO of `pid`'s address space, whose
/// `maps` are given (where injected calls run when the process's own
/// code may be gone).
pub fn vdso_syscall_insn(pid: Pid, maps: &[super::procfs::MapEntry]) -> Result<u64, InsnError> {
    let block = super::vdso::find(maps).ok_or(InsnError::NoVdso)?;
    let mut text = vec![0u8; usize::try_from(block.vdso_end - block.vdso_start).unwrap_or(0)];
    super::mem::read_vm(pid, block.vdso_start, &mut text).map_err(InsnError::Read)?;
    find_syscall_insn(&text, block.vdso_start).ok_or(InsnError::NoInsn)
}

/// Finds a `syscall` instruction (`0f 05`) in `bytes`, mapped at `base`.
pub fn find_syscall_insn(bytes: &[u8], base: u64) -> Option<u64> {
    bytes
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|i| base + i as u64)
}
