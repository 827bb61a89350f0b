//! Thin wrappers around the kernel interfaces migration uses. This is the
//! only place in the crate with `unsafe`; every block says why it is sound.
//!
//! Minimum kernel: 5.13 (PTRACE_GET_RSEQ_CONFIGURATION); clone3 set_tid
//! needs 5.5 and CAP_CHECKPOINT_RESTORE (5.9) or CAP_SYS_ADMIN. Only
//! x86_64 is supported.

pub mod abi;
pub mod clone3;
pub mod inject;
pub mod mem;
pub mod net;
pub mod pagemap;
pub mod pipe;
pub mod procfs;
pub mod ptrace;
pub mod reap;
pub mod task;
pub mod uffd;
pub mod vdso;
pub mod xsave;

/// The page size (4096 on x86_64).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(4096)
}
