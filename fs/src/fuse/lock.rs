//! fcntl and flock(2) locks, kept in the metadata server.
//!
//! The kernel hands both kinds to a FUSE filesystem as `setlk` requests
//! (flock emulated as a whole-file lock owned by the open file), marked
//! apart only by `FUSE_LK_FLOCK`, which fuser 0.18 does not pass on. The
//! node tells them apart by the system call the requesting thread is in:
//! a thread blocked in our reply shows it in `/proc/<tid>/syscall` (the
//! request carries the thread id). flock and fcntl locks then follow
//! Linux's rules: they never conflict with each other, an fcntl lock
//! belongs to the process and goes at any close of the file, a flock lock
//! belongs to the open file and goes at its last close (FUSE release).
//!
//! The flock lock each open file holds is remembered by file handle, for
//! the [`IOC_FLOCK_HELD`](migfs_proto::control::IOC_FLOCK_HELD) ioctl a
//! checkpoint asks through the process's own open file.

use std::time::Duration;

use fuser::FileHandle;
use migfs_proto::control::FlockHeld;
use migfs_proto::meta::{LockReply, LockRequest};

use super::Shared;
use crate::error::{FsError, Result};

/// A lock request from the kernel.
#[derive(Debug, Clone, Copy)]
pub struct Lock {
    /// Inode.
    pub ino: u64,
    /// Kernel lock owner (the process's files for fcntl, the open file for
    /// flock).
    pub owner: u64,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// F_RDLCK, F_WRLCK or F_UNLCK.
    pub typ: i32,
    /// Requesting pid.
    pub pid: u32,
    /// flock(2) rather than fcntl.
    pub flock: bool,
}

impl Lock {
    /// Unlocks everything `owner` holds on `ino` (fcntl or flock).
    pub fn unlock_all(ino: u64, owner: u64, flock: bool) -> Lock {
        Lock {
            ino,
            owner,
            start: 0,
            end: u64::MAX,
            typ: libc::F_UNLCK,
            pid: 0,
            flock,
        }
    }
}

/// Whether thread `tid` (as the mount's PID namespace numbers it) is in
/// flock(2). `/proc/<tid>/syscall` starts with the number of the system
/// call a blocked thread is in; anything unreadable (a thread outside the
/// node's namespace, pid 0) counts as fcntl, the kernel's other caller.
pub fn in_flock_call(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{tid}/syscall")) else {
        return false;
    };
    s.split_ascii_whitespace()
        .next()
        .and_then(|n| n.parse::<i64>().ok())
        .is_some_and(|n| n == libc::SYS_flock)
}

fn lock_req(sh: &Shared, l: Lock) -> LockRequest {
    LockRequest {
        session_id: sh.data.meta.session(),
        ino: l.ino,
        owner: l.owner,
        start: l.start,
        end: l.end,
        typ: l.typ,
        pid: l.pid,
        flock: l.flock,
    }
}

/// The first fcntl lock that would conflict with `l` (F_GETLK: flock has
/// no such query).
pub async fn getlk(sh: &Shared, l: Lock) -> Result<LockReply> {
    let req = lock_req(sh, Lock { flock: false, ..l });
    sh.data
        .meta
        .call("getlk", |mut c| async move { c.get_lock(req).await })
        .await
}

/// One SetLock call: granted or not.
pub async fn setlk_once(sh: &Shared, l: Lock) -> Result<bool> {
    let req = lock_req(sh, l);
    let r = sh
        .data
        .meta
        .call("setlk", |mut c| async move { c.set_lock(req).await })
        .await?;
    Ok(r.granted)
}

/// Takes or drops a lock through handle `fh`; with `sleep`, waits until it
/// can be taken.
pub async fn setlk(sh: &Shared, fh: FileHandle, l: Lock, sleep: bool) -> Result<()> {
    let mut wait = Duration::from_millis(1);
    loop {
        if setlk_once(sh, l).await? {
            granted(sh, fh, l);
            return Ok(());
        }
        if !sleep {
            return Err(FsError::Local {
                op: "setlk",
                errno: libc::EAGAIN,
            });
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(50));
    }
}

fn granted(sh: &Shared, fh: FileHandle, l: Lock) {
    if l.flock {
        let mut flocks = sh.flocks.lock();
        if l.typ == libc::F_UNLCK {
            flocks.remove(&fh.0);
        } else {
            flocks.insert(
                fh.0,
                FlockHeld {
                    typ: l.typ,
                    pid: l.pid,
                },
            );
        }
    } else if l.typ != libc::F_UNLCK {
        sh.locked.lock().insert((l.ino, l.owner));
    }
}

/// close(2) of any descriptor: the closing process's fcntl locks on the
/// inode go (POSIX), if it took any here.
pub async fn drop_at_close(sh: &Shared, ino: u64, owner: u64) -> Result<()> {
    if sh.locked.lock().remove(&(ino, owner)) {
        setlk_once(sh, Lock::unlock_all(ino, owner, false)).await?;
    }
    Ok(())
}

/// The last close of an open file: its flock lock goes. The kernel names
/// the owner only when the file ever took a flock lock.
pub async fn drop_at_release(sh: &Shared, ino: u64, fh: FileHandle, owner: Option<u64>) {
    sh.flocks.lock().remove(&fh.0);
    if let Some(owner) = owner
        && let Err(e) = setlk_once(sh, Lock::unlock_all(ino, owner, true)).await
    {
        tracing::warn!(ino, error = %e, "dropping flock locks at release failed");
    }
}

/// Answer to `IOC_FLOCK_HELD` on handle `fh`.
pub fn flock_held(sh: &Shared, fh: FileHandle) -> FlockHeld {
    sh.flocks
        .lock()
        .get(&fh.0)
        .copied()
        .unwrap_or(FlockHeld::NONE)
}
