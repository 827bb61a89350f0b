//! What a restore asks of the process it rebuilds: typed system calls run
//! inside it ([`Call`]), memory writes, new threads, final register
//! state. [`Target`] is implemented by the ptrace-driven stub
//! ([`super::stub::PtraceStub`]) and, in tests, by a recording fake, so
//! the restore sequence is testable without root.

use nix::errno::Errno;

use crate::sys::abi::PrctlMmMap;
use crate::sys::inject::InjectError;
use crate::sys::ptrace::Regs;
use crate::sys::vdso::VdsoBlock;

/// One system call, with its arguments as values (the stub lays out
/// strings and structs in its scratch page).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call<'a> {
    /// `mmap(addr, len, prot, flags, fd, offset)`.
    Mmap {
        /// Address (always MAP_FIXED).
        addr: u64,
        /// Length.
        len: u64,
        /// PROT_*.
        prot: u32,
        /// MAP_*.
        flags: u32,
        /// Descriptor or -1.
        fd: i32,
        /// File offset.
        offset: u64,
    },
    /// `munmap`.
    Munmap {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// `mprotect`.
    Mprotect {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// PROT_*.
        prot: u32,
    },
    /// `madvise`.
    Madvise {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// MADV_*.
        advice: i32,
    },
    /// `mremap` of `len` bytes from `from` to exactly `to`
    /// (`MREMAP_MAYMOVE | MREMAP_FIXED`): the pages move, not their bytes.
    Mremap {
        /// Where the pages are.
        from: u64,
        /// Length.
        len: u64,
        /// Where they go (whatever is mapped there is unmapped).
        to: u64,
    },
    /// `mlock`.
    Mlock {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// `arch_prctl(ARCH_MAP_VDSO_64, addr)`.
    MapVdso {
        /// Start of the block.
        addr: u64,
    },
    /// `prctl(PR_SET_MM, PR_SET_MM_MAP, ...)`; `auxv` is copied next to it.
    SetMmMap {
        /// The fields (the auxv pointer is filled in by the stub).
        map: PrctlMmMap,
        /// The auxv bytes.
        auxv: &'a [u8],
    },
    /// `open(path, flags)`.
    Open {
        /// Path.
        path: &'a str,
        /// O_* flags.
        flags: u32,
    },
    /// `close`.
    Close {
        /// Descriptor.
        fd: i32,
    },
    /// `close_range(first, ~0, 0)`.
    CloseRange {
        /// First descriptor.
        first: u32,
    },
    /// `dup3(old, new, cloexec ? O_CLOEXEC : 0)`.
    Dup3 {
        /// Source.
        old: i32,
        /// Target number.
        new: i32,
        /// O_CLOEXEC on the new one.
        cloexec: bool,
    },
    /// `lseek(fd, offset, SEEK_SET)`.
    Lseek {
        /// Descriptor.
        fd: i32,
        /// Position.
        offset: u64,
    },
    /// `fcntl(fd, F_SETLK or F_OFD_SETLK, {type, SEEK_SET, start, len})`.
    SetLock {
        /// Descriptor.
        fd: i32,
        /// Open-file-description lock.
        ofd: bool,
        /// Write lock (else read).
        write: bool,
        /// First byte.
        start: u64,
        /// Length (0: to EOF).
        len: u64,
    },
    /// `flock(fd, LOCK_EX or LOCK_SH | LOCK_NB)`.
    Flock {
        /// Descriptor.
        fd: i32,
        /// Exclusive.
        write: bool,
    },
    /// `chdir(path)`.
    Chdir {
        /// Path.
        path: &'a str,
    },
    /// `umask`.
    Umask {
        /// Mask.
        mask: u32,
    },
    /// `rt_sigaction(signo, act, NULL, 8)`.
    SigAction {
        /// Signal.
        signo: u32,
        /// Handler.
        handler: u64,
        /// SA_* flags.
        flags: u64,
        /// Restorer.
        restorer: u64,
        /// Mask during the handler.
        mask: u64,
    },
    /// `setitimer(which, {interval, value}, NULL)`.
    SetITimer {
        /// ITIMER_*.
        which: u32,
        /// Period, µs.
        interval_us: i64,
        /// Time until it fires, µs.
        value_us: i64,
    },
    /// `set_tid_address`.
    SetTidAddress {
        /// clear_child_tid.
        addr: u64,
    },
    /// `set_robust_list`.
    SetRobustList {
        /// Head.
        head: u64,
        /// Length.
        len: u64,
    },
    /// `rseq(addr, len, 0, signature)`.
    Rseq {
        /// Area.
        addr: u64,
        /// Length.
        len: u32,
        /// Signature.
        signature: u32,
        /// Flags (1 = unregister).
        flags: u32,
    },
    /// `sigaltstack(&ss, NULL)`.
    SigAltStack {
        /// Stack base.
        sp: u64,
        /// SS_* flags.
        flags: u32,
        /// Size.
        size: u64,
    },
    /// `setpriority(PRIO_PROCESS, 0, nice)`: the calling thread's nice.
    SetNice {
        /// -20..=19.
        nice: i32,
    },
    /// `sched_setscheduler(0, policy, &{priority})`.
    SetScheduler {
        /// SCHED_* (SCHED_RESET_ON_FORK or'ed in).
        policy: i32,
        /// sched_priority.
        priority: i32,
    },
    /// `sched_setaffinity(0, len, mask)`.
    SetAffinity {
        /// Mask bytes (bit N: CPU N).
        mask: &'a [u8],
    },
    /// `prctl(PR_SET_NAME, name)`.
    SetName {
        /// Up to 15 bytes.
        name: &'a str,
    },
    /// `prlimit64(0, resource, &new, NULL)`.
    Prlimit {
        /// RLIMIT_*.
        resource: u32,
        /// Soft.
        cur: u64,
        /// Hard.
        max: u64,
    },
    /// `personality`.
    Personality {
        /// Value.
        persona: u32,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    NoNewPrivs,
    /// `pidfd_open(pid, 0)`.
    PidfdOpen {
        /// Process.
        pid: i32,
    },
    /// `pidfd_getfd(pidfd, fd, 0)`: a copy of descriptor `fd` of the
    /// process `pidfd` names.
    PidfdGetfd {
        /// The other process.
        pidfd: i32,
        /// Its descriptor.
        fd: i32,
    },
    /// `recvfrom(fd, addr, len, MSG_WAITALL, NULL, NULL)`: socket bytes
    /// straight into the process's memory.
    Recv {
        /// Socket.
        fd: i32,
        /// Where.
        addr: u64,
        /// How many.
        len: u64,
    },
    /// `userfaultfd(flags)`.
    Userfaultfd {
        /// O_CLOEXEC | O_NONBLOCK.
        flags: u32,
    },
    /// `setgroups`.
    SetGroups {
        /// Supplementary groups.
        groups: &'a [u32],
    },
    /// `setresgid`.
    SetResGid {
        /// Real, effective, saved.
        ids: [u32; 3],
    },
    /// `setresuid`.
    SetResUid {
        /// Real, effective, saved.
        ids: [u32; 3],
    },
    /// `prctl(PR_CAPBSET_DROP, cap)`.
    CapBsetDrop {
        /// Capability number.
        cap: u32,
    },
    /// `capset` (version 3).
    Capset {
        /// Effective.
        eff: u64,
        /// Permitted.
        prm: u64,
        /// Inheritable.
        inh: u64,
    },
    /// `rt_tgsigqueueinfo(tgid, tid, signo, info)` (or `rt_sigqueueinfo`
    /// for the shared queue when `tid` is 0), run by the thread itself.
    Queue {
        /// Process.
        tgid: i32,
        /// Thread, 0 for the shared queue.
        tid: i32,
        /// Signal.
        signo: u32,
        /// 128-byte siginfo.
        info: &'a [u8],
    },
}

/// Why a [`Target`] request failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call ran and returned this errno.
    #[error("{0}")]
    Errno(Errno),
    /// Driving the thread failed.
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// A request to the kernel about the stub failed.
    #[error("{0}")]
    Ptrace(String),
}

/// The final state of one thread.
#[derive(Clone, Debug)]
pub struct ThreadState<'a> {
    /// General registers (orig_rax is ignored; set to -1).
    pub regs: Regs,
    /// xsave area.
    pub xsave: &'a [u8],
    /// Blocked signals.
    pub sigmask: u64,
}

/// A process being rebuilt. Thread 0 is the main thread.
pub trait Target {
    /// Its pid.
    fn pid(&self) -> i32;
    /// Runs `call` in thread `thread`; returns the call's value.
    fn call(&mut self, thread: usize, call: &Call<'_>) -> Result<u64, CallError>;
    /// Writes `data` at `addr` (the pages must be writable).
    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), CallError>;
    /// Creates a thread with id `tid` (any id if taken and not
    /// `require`); returns its index and id.
    fn new_thread(&mut self, tid: i32, require: bool) -> Result<(usize, i32), CallError>;
    /// The xsave layout of this CPU: xfeatures and size.
    fn xsave_layout(&mut self) -> Result<(u64, usize), CallError>;
    /// Warm memory the process was made with, still unused: start and
    /// end ([`super::warm`]). Taking it makes it the caller's to place
    /// or unmap.
    fn take_warm(&mut self) -> Option<(u64, u64)> {
        None
    }
    /// The warm-memory holder the process was made from, when it was kept
    /// alive sharing the address space (a lazy restore's staging).
    fn take_holder(&mut self) -> Option<super::warm::Warm> {
        None
    }
    /// The vDSO block as mapped now.
    fn vdso_block(&mut self) -> Result<Option<VdsoBlock>, CallError>;
    /// Drops the helper mapping and loads the final registers, xsave and
    /// signal masks of every thread (still stopped).
    fn finish(&mut self, states: &[ThreadState<'_>]) -> Result<(), CallError>;
}
