//! Kernel ABI numbers and structs the `libc` crate does not carry (x86_64).
//!
//! Everything here is copied from the kernel's uapi headers by value; the
//! comment names the header.

/// A signed system-call argument as the register value the kernel reads
/// (sign-extended to 64 bits).
pub fn sx(v: i32) -> u64 {
    i64::from(v).cast_unsigned()
}

/// `linux/elf.h`: the xsave register set of `PTRACE_GETREGSET`.
pub const NT_X86_XSTATE: usize = 0x202;
/// `linux/ptrace.h`.
pub const PTRACE_GETREGSET: libc::c_uint = 0x4204;
/// `linux/ptrace.h`.
pub const PTRACE_SETREGSET: libc::c_uint = 0x4205;
/// `linux/ptrace.h`.
pub const PTRACE_SEIZE: libc::c_uint = 0x4206;
/// `linux/ptrace.h`.
pub const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
/// `linux/ptrace.h`.
pub const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// `linux/ptrace.h`.
pub const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
/// `linux/ptrace.h`.
pub const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
/// `linux/ptrace.h` (5.13).
pub const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// `linux/ptrace.h`: read the shared (process-wide) pending queue.
pub const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// `linux/ptrace.h`.
pub const PTRACE_EVENT_CLONE: i32 = 3;
/// `linux/ptrace.h`.
pub const PTRACE_EVENT_STOP: i32 = 128;
/// `linux/ptrace.h`.
pub const PTRACE_O_TRACECLONE: libc::c_ulong = 0x8;
/// `linux/ptrace.h`.
pub const PTRACE_O_EXITKILL: libc::c_ulong = 1 << 20;

/// `asm/prctl.h`: map a fresh vDSO (and its vvar pages) at an address.
pub const ARCH_MAP_VDSO_64: u64 = 0x2003;
/// `linux/prctl.h`.
pub const PR_SET_MM: u64 = 35;
/// `linux/prctl.h`.
pub const PR_SET_MM_MAP: u64 = 14;
/// `linux/prctl.h`.
pub const PR_GET_TID_ADDRESS: u64 = 40;
/// `linux/prctl.h`.
pub const PR_SET_NAME: u64 = 15;
/// `linux/prctl.h`.
pub const PR_SET_DUMPABLE: u64 = 4;
/// `linux/prctl.h`.
pub const PR_SET_NO_NEW_PRIVS: u64 = 38;
/// `linux/prctl.h`.
pub const PR_CAPBSET_DROP: u64 = 24;

/// `linux/kcmp.h`.
pub const KCMP_FILE: i32 = 0;

/// `linux/errno.h` (kernel-internal, seen by ptrace in `rax`).
pub const ERESTARTSYS: i64 = 512;
/// See [`ERESTARTSYS`].
pub const ERESTARTNOINTR: i64 = 513;
/// See [`ERESTARTSYS`].
pub const ERESTARTNOHAND: i64 = 514;
/// See [`ERESTARTSYS`].
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// `linux/sched.h`.
pub const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

/// `linux/mman.h` (6.13): install guard pages (not shown in maps).
pub const MADV_GUARD_INSTALL: i32 = 102;

/// `struct prctl_mm_map` (`linux/prctl.h`): 104 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrctlMmMap {
    /// Code section bounds.
    pub start_code: u64,
    /// See `start_code`.
    pub end_code: u64,
    /// Data section bounds.
    pub start_data: u64,
    /// See `start_data`.
    pub end_data: u64,
    /// Heap for brk().
    pub start_brk: u64,
    /// Current brk.
    pub brk: u64,
    /// Where the stack starts.
    pub start_stack: u64,
    /// argv bounds.
    pub arg_start: u64,
    /// See `arg_start`.
    pub arg_end: u64,
    /// environ bounds.
    pub env_start: u64,
    /// See `env_start`.
    pub env_end: u64,
    /// Pointer to the auxv in the target.
    pub auxv: u64,
    /// Its size in bytes.
    pub auxv_size: u32,
    /// fd (in the target) of the new /proc/PID/exe, or `u32::MAX`.
    pub exe_fd: u32,
}

impl PrctlMmMap {
    /// The kernel's byte layout.
    pub fn to_bytes(self) -> Vec<u8> {
        let words = [
            self.start_code,
            self.end_code,
            self.start_data,
            self.end_data,
            self.start_brk,
            self.brk,
            self.start_stack,
            self.arg_start,
            self.arg_end,
            self.env_start,
            self.env_end,
            self.auxv,
        ];
        let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
        out.extend_from_slice(&self.auxv_size.to_ne_bytes());
        out.extend_from_slice(&self.exe_fd.to_ne_bytes());
        out
    }
}

/// `struct clone_args` (`linux/sched.h`, version 2: 88 bytes) as bytes.
pub fn clone_args_bytes(
    flags: u64,
    exit_signal: u64,
    set_tid_ptr: u64,
    set_tid_size: u64,
) -> Vec<u8> {
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size, cgroup
    let words = [
        flags,
        0,
        0,
        0,
        exit_signal,
        0,
        0,
        0,
        set_tid_ptr,
        set_tid_size,
        0,
    ];
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Index of each register in `user_regs_struct` (x86_64), 27 words.
pub mod reg {
    /// r15
    pub const R15: usize = 0;
    /// r10
    pub const R10: usize = 7;
    /// r9
    pub const R9: usize = 8;
    /// r8
    pub const R8: usize = 9;
    /// rax
    pub const RAX: usize = 10;
    /// rdx
    pub const RDX: usize = 12;
    /// rsi
    pub const RSI: usize = 13;
    /// rdi
    pub const RDI: usize = 14;
    /// orig_rax
    pub const ORIG_RAX: usize = 15;
    /// rip
    pub const RIP: usize = 16;
    /// rsp
    pub const RSP: usize = 19;
    /// fs_base
    pub const FS_BASE: usize = 21;
    /// Number of words.
    pub const COUNT: usize = 27;
}

/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// Size of the kernel's `struct sigaction` (handler, flags, restorer, mask).
pub const KSIGACTION_SIZE: usize = 32;
/// Size of `stack_t`.
pub const STACK_T_SIZE: usize = 24;
