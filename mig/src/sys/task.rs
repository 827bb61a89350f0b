//! Per-task queries made from outside the task: robust futex list,
//! scheduling, `kcmp`, resource limits, locks held on migfs files.

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

/// A thread's scheduling as the kernel keeps it per thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sched {
    /// Nice value, -20..=19.
    pub nice: i32,
    /// `sched_getscheduler`: SCHED_* with SCHED_RESET_ON_FORK or'ed in.
    pub policy: i32,
    /// `sched_param.sched_priority` (non-zero only for real-time policies).
    pub priority: i32,
    /// `sched_getaffinity` mask, as many bytes as the kernel's cpumask.
    pub cpus: Vec<u8>,
}

/// The scheduling of thread `tid`: `getpriority`, `sched_getscheduler`,
/// `sched_getparam`, `sched_getaffinity`.
pub fn sched(tid: Pid) -> Result<Sched, Errno> {
    let t = libc::c_long::from(tid.as_raw());
    // SAFETY: getpriority takes only integers; the raw call returns
    // 20 - nice (1..=40) and never a negative value but an error.
    let r = unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, t) };
    let nice = 20 - i32::try_from(Errno::result(r)?).map_err(|_| Errno::ERANGE)?;
    // SAFETY: sched_getscheduler takes only integers.
    let r = unsafe { libc::syscall(libc::SYS_sched_getscheduler, t) };
    let policy = i32::try_from(Errno::result(r)?).map_err(|_| Errno::ERANGE)?;
    let mut priority: libc::c_int = 0;
    // SAFETY: struct sched_param is one int, a live local here.
    let r = unsafe { libc::syscall(libc::SYS_sched_getparam, t, &raw mut priority) };
    Errno::result(r)?;
    let mut mask = [0u8; 1024];
    // SAFETY: the kernel writes at most `mask.len()` bytes into it and
    // returns how many.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            t,
            mask.len(),
            mask.as_mut_ptr(),
        )
    };
    let n = usize::try_from(Errno::result(r)?).map_err(|_| Errno::ERANGE)?;
    Ok(Sched {
        nice,
        policy,
        priority,
        cpus: mask[..n.min(mask.len())].to_vec(),
    })
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

/// The fcntl (POSIX) locks process `pid` holds on the file open as `f`,
/// found by asking `F_GETLK` for a write lock over ever smaller ranges.
/// Meant for filesystems that keep locks themselves (FUSE `setlk`), whose
/// locks /proc does not list. A lock of `pid` that lies wholly under a
/// read lock another process holds on the same range is not seen.
pub fn posix_locks_of(f: &std::fs::File, pid: i32) -> Result<Vec<super::procfs::LockLine>, Errno> {
    use std::os::fd::AsFd;
    // F_RDLCK, F_WRLCK, F_UNLCK and SEEK_SET are 0, 1, 2 and 0 (short).
    let short = |v: i32| libc::c_short::try_from(v).unwrap_or(-1);
    let mut out = Vec::new();
    let mut todo = vec![(0u64, u64::MAX)];
    let mut probes = 0;
    while let Some((s, e)) = todo.pop() {
        probes += 1;
        if probes > 4096 {
            return Err(Errno::E2BIG);
        }
        let len = if e == u64::MAX {
            0
        } else {
            i64::try_from(e - s + 1).map_err(|_| Errno::EOVERFLOW)?
        };
        let mut fl = libc::flock {
            l_type: short(libc::F_WRLCK),
            l_whence: short(libc::SEEK_SET),
            l_start: i64::try_from(s).map_err(|_| Errno::EOVERFLOW)?,
            l_len: len,
            l_pid: 0,
        };
        nix::fcntl::fcntl(f.as_fd(), nix::fcntl::FcntlArg::F_GETLK(&mut fl))?;
        if fl.l_type == short(libc::F_UNLCK) {
            continue;
        }
        let ls = u64::try_from(fl.l_start).map_err(|_| Errno::EINVAL)?;
        let le = match fl.l_len {
            0 => u64::MAX,
            n => ls + u64::try_from(n).map_err(|_| Errno::EINVAL)? - 1,
        };
        if fl.l_pid == pid {
            let write = fl.l_type == short(libc::F_WRLCK);
            let end = (le != u64::MAX).then_some(le);
            out.push(super::procfs::LockLine {
                class: "POSIX".into(),
                write,
                pid: pid.into(),
                start: ls,
                end,
            });
        }
        if ls > s {
            todo.push((s, ls - 1));
        }
        if le < e {
            todo.push((le + 1, e));
        }
    }
    Ok(out)
}

/// The flock(2) lock held through open file `f` of a migfs mount (the
/// node's `IOC_FLOCK_HELD` ioctl; `f` must be the process's own open file,
/// taken with `pidfd_getfd`, since a flock belongs to one open file).
/// ENOTTY from a filesystem that is not migfs.
pub fn migfs_flock_held(
    f: &impl std::os::fd::AsRawFd,
) -> Result<migfs_proto::control::FlockHeld, Errno> {
    use migfs_proto::control::{FlockHeld, IOC_FLOCK_HELD};
    let mut out = [0u8; FlockHeld::LEN];
    // SAFETY: IOC_FLOCK_HELD is an _IOR request of FlockHeld::LEN bytes
    // and `out` is a live buffer of exactly that size; the kernel writes
    // at most that many bytes.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            libc::Ioctl::from(IOC_FLOCK_HELD),
            out.as_mut_ptr(),
        )
    };
    Errno::result(r)?;
    FlockHeld::decode(&out).ok_or(Errno::EPROTO)
}
