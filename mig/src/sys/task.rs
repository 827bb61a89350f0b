//! Per-task queries made from outside the task: robust futex list,
//! `kcmp`, resource limits.

use nix::errno::Errno;
use nix::unistd::Pid;

/// `get_robust_list(tid)` (2.6.17): the head address and its length.
pub fn get_robust_list(tid: Pid) -> Result<(u64, u64), Errno> {
    let mut head: u64 = 0;
    let mut len: libc::size_t = 0;
    // SAFETY: both out-pointers are live locals of the sizes the kernel
    // writes (a pointer and a size_t).
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            libc::c_long::from(tid.as_raw()),
            &raw mut head,
            &raw mut len,
        )
    };
    Errno::result(r)?;
    Ok((head, len as u64))
}

/// `kcmp(pid, pid, KCMP_FILE, a, b) == 0`: descriptors `a` and `b` of
/// `pid` share one open file description.
pub fn same_file_description(pid: Pid, a: i32, b: i32) -> Result<bool, Errno> {
    // SAFETY: kcmp takes only integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(pid.as_raw()),
            libc::c_long::from(pid.as_raw()),
            libc::c_long::from(super::abi::KCMP_FILE),
            libc::c_long::from(a),
            libc::c_long::from(b),
        )
    };
    Ok(Errno::result(r)? == 0)
}

/// `prlimit(pid, resource, NULL, &old)`.
pub fn get_rlimit(pid: Pid, resource: u32) -> Result<(u64, u64), Errno> {
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is a live rlimit64 the kernel fills; no new limit.
    let r = unsafe { libc::prlimit64(pid.as_raw(), resource, std::ptr::null(), &raw mut old) };
    Errno::result(r)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// `prlimit(pid, resource, &new, NULL)`.
pub fn set_rlimit(pid: Pid, resource: u32, cur: u64, max: u64) -> Result<(), Errno> {
    let new = libc::rlimit64 {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: `new` is a live rlimit64 the kernel reads.
    let r =
        unsafe { libc::prlimit64(pid.as_raw(), resource, &raw const new, std::ptr::null_mut()) };
    Errno::result(r).map(drop)
}

/// Sends `sig` to `pid` (0 tests for existence).
pub fn kill(pid: Pid, sig: i32) -> Result<(), Errno> {
    // SAFETY: kill takes only integers.
    Errno::result(unsafe { libc::kill(pid.as_raw(), sig) }).map(drop)
}

/// The calling thread's id.
pub fn gettid() -> Pid {
    nix::unistd::gettid()
}
