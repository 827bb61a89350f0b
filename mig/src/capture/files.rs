//! Open descriptors (path, flags, offset, close-on-exec, shared
//! descriptions), the locks held through them, cwd and exe, and how each
//! file is found again: its path, and for files on migfs its inode
//! number (reopened through `<mount>/.migfs/by-inode/<ino>` when the path
//! is gone). Content hashes let a restore refuse a changed file.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use migfs_proto::image::{Fd, FdKind, FileLock, FileRef, LockKind, MigfsRef};
use nix::unistd::Pid;

use crate::check::{self, MIGFS_FSTYPE, Movable};
use crate::error::CaptureError;
use crate::sys::procfs::{self, Mount};
use crate::sys::task;

/// Builds [`FileRef`]s for one process, hashing each file once.
pub struct FileCtx {
    pid: Pid,
    mounts: Vec<Mount>,
    hash_limit: u64,
    hashes: HashMap<FileKey, Vec<u8>>,
}

/// A file version: device, inode, size, mtime (s, ns).
type FileKey = (u64, u64, u64, i64, i64);

fn key(m: &std::fs::Metadata) -> FileKey {
    (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

impl FileCtx {
    /// Files of `pid`; contents up to `hash_limit` bytes are hashed.
    pub fn new(pid: Pid, hash_limit: u64) -> Result<FileCtx, CaptureError> {
        let mounts = procfs::mountinfo(pid).map_err(|source| CaptureError::Io {
            pid: pid.as_raw(),
            what: "mountinfo".into(),
            source,
        })?;
        Ok(FileCtx {
            pid,
            mounts,
            hash_limit,
            hashes: HashMap::new(),
        })
    }

    /// Hashes the files `pid` maps now, while it still runs, so that the
    /// capture (frozen) only checks they did not change since.
    pub fn prehash_mappings(&mut self) -> Result<(), CaptureError> {
        let pid = self.pid;
        let maps = procfs::maps(pid).map_err(|source| CaptureError::Io {
            pid: pid.as_raw(),
            what: "maps".into(),
            source,
        })?;
        for m in maps
            .iter()
            .filter(|m| m.inode != 0 && !m.path.starts_with('[') && !m.path.starts_with("/dev/"))
        {
            let proc_path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            // A mapping may go away before we get to it: that is fine.
            let _ = self.file_ref(&proc_path, &m.path, true);
        }
        Ok(())
    }

    /// The migfs mount holding device `dev`, if any.
    pub fn migfs_by_dev(&self, dev: u64) -> Option<&Mount> {
        let d = (libc::major(dev), libc::minor(dev));
        self.mounts
            .iter()
            .find(|m| m.dev == d && m.fstype == MIGFS_FSTYPE)
    }

    /// Describes the file behind the /proc magic link `proc_path`, which
    /// the process sees as `shown`.
    pub fn file_ref(
        &mut self,
        proc_path: &str,
        shown: &str,
        hash: bool,
    ) -> Result<FileRef, CaptureError> {
        let p = self.pid.as_raw();
        let meta = std::fs::metadata(proc_path).map_err(|source| CaptureError::Io {
            pid: p,
            what: format!("stat {shown}"),
            source,
        })?;
        let (path, deleted) = match shown.strip_suffix(" (deleted)") {
            Some(s) => (s, true),
            None => (shown, false),
        };
        let migfs = self.migfs_by_dev(meta.dev()).map(|m| MigfsRef {
            mountpoint: m.mountpoint.clone(),
            ino: meta.ino(),
        });
        let mut r = FileRef {
            path: path.to_owned(),
            deleted,
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode(),
            size: meta.size(),
            migfs,
            content_blake3: Vec::new(),
            hashed: false,
            rdev: meta.rdev(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ghost: String::new(),
        };
        if hash && meta.is_file() && meta.size() <= self.hash_limit {
            let key = key(&meta);
            let h = match self.hashes.get(&key) {
                Some(h) => h.clone(),
                None => {
                    let h =
                        hash_file(proc_path, meta.size()).map_err(|source| CaptureError::Io {
                            pid: p,
                            what: format!("hash {shown}"),
                            source,
                        })?;
                    self.hashes.insert(key, h.clone());
                    h
                }
            };
            r.content_blake3 = h;
            r.hashed = true;
        }
        Ok(r)
    }
}

/// blake3 of the first `size` bytes of the file at `path`.
pub fn hash_file(path: &str, size: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut r = f.take(size);
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().as_bytes().to_vec())
}

/// The flock(2) lock held through the open file behind `fd` of process
/// `p`, a file on migfs: the node answers for that open file, so it is
/// taken (`pidfd_getfd`) rather than opened again. A lock some other
/// process took through a shared open file is refused: it stays with that
/// process and cannot move with this one.
fn migfs_flock(
    pidfd: &std::os::fd::OwnedFd,
    p: i32,
    fd: i32,
    link: &str,
) -> Result<Option<procfs::LockLine>, CaptureError> {
    let ours = crate::sys::uffd::pidfd_getfd(pidfd, fd).map_err(|source| CaptureError::Io {
        pid: p,
        what: format!("fd {fd}: pidfd_getfd of {link}"),
        source,
    })?;
    let held = task::migfs_flock_held(&ours).map_err(|errno| CaptureError::Sys {
        pid: p,
        what: format!("fd {fd}: asking the node for the flock lock on {link}"),
        errno,
    })?;
    if !held.held() {
        return Ok(None);
    }
    if i64::from(held.pid) != i64::from(p) {
        return Err(CaptureError::Unsupported {
            pid: p,
            what: format!(
                "fd {fd}: the flock lock on {link} was taken by process {} through an open \
                 file this process shares",
                held.pid
            ),
        });
    }
    Ok(Some(procfs::LockLine {
        class: "FLOCK".into(),
        write: held.typ == libc::F_WRLCK,
        pid: i64::from(held.pid),
        start: 0,
        end: None,
    }))
}

/// Every descriptor and the locks held through them. Each file on migfs
/// is reopened (for its locks) and closed, which publishes what the
/// process wrote to it before the image is written.
pub fn fds(
    ctx: &mut FileCtx,
    relay_pipes: &[u64],
) -> Result<(Vec<Fd>, Vec<FileLock>), CaptureError> {
    let pid = ctx.pid;
    let p = pid.as_raw();
    let io = |what: String| {
        move |source| CaptureError::Io {
            pid: p,
            what,
            source,
        }
    };
    let mut out: Vec<Fd> = Vec::new();
    let mut locks = Vec::new();
    let mut posix_seen = Vec::new();
    let mut probed = Vec::new();
    let mut pidfd = None;
    for fd in procfs::numeric_dir(&format!("/proc/{pid}/fd")).map_err(io("list fds".into()))? {
        let proc_path = format!("/proc/{pid}/fd/{fd}");
        let link = std::fs::read_link(&proc_path).map_err(io(format!("fd {fd}")))?;
        let link = link.to_string_lossy().into_owned();
        let meta = std::fs::metadata(&proc_path).map_err(io(format!("fd {fd}: stat {link}")))?;
        let info = procfs::fdinfo(pid, fd).map_err(io(format!("fd {fd}: fdinfo")))?;
        if meta.file_type().is_fifo() && relay_pipes.contains(&meta.ino()) {
            out.push(Fd {
                fd,
                kind: FdKind::FdRelayPipe as i32,
                flags: info.flags & !(libc::O_CLOEXEC as u32),
                cloexec: info.flags & libc::O_CLOEXEC as u32 != 0,
                pos: 0,
                file: None,
                dup_of: -1,
            });
            continue;
        }
        let migfs = check::on_migfs(&ctx.mounts, info.mnt_id).is_some();
        let kind = check::classify_fd(pid, &link, &meta, check::on_migfs(&ctx.mounts, info.mnt_id))
            .map_err(|why| CaptureError::Unsupported {
                pid: p,
                what: format!("fd {fd}: {why}"),
            })?;
        let dup_of = shared_with(pid, &out, fd, &meta)?;
        let file = ctx.file_ref(&proc_path, &link, kind == Movable::Regular && dup_of < 0)?;
        let cloexec = info.flags & libc::O_CLOEXEC as u32 != 0;
        let flags = info.flags & !(libc::O_CLOEXEC as u32);
        let mut lines = info.locks.clone();
        if migfs && kind == Movable::Regular && !probed.contains(&(meta.dev(), meta.ino())) {
            // migfs keeps fcntl locks in its servers: /proc does not list
            // them. Closing this reopened descriptor also publishes what
            // the process wrote (close-to-open), so a restore elsewhere
            // reads it.
            probed.push((meta.dev(), meta.ino()));
            let f =
                std::fs::File::open(&proc_path).map_err(io(format!("fd {fd}: reopen {link}")))?;
            let held = task::posix_locks_of(&f, p).map_err(|errno| CaptureError::Sys {
                pid: p,
                what: format!("fd {fd}: F_GETLK on {link}"),
                errno,
            })?;
            lines.extend(held);
        }
        if migfs && kind == Movable::Regular && dup_of < 0 {
            if pidfd.is_none() {
                let f = crate::sys::reap::pidfd_open(p).map_err(io("pidfd_open".into()))?;
                pidfd = Some(f);
            }
            if let Some(pidfd) = &pidfd {
                lines.extend(migfs_flock(pidfd, p, fd, &link)?);
            }
        }
        for l in &lines {
            let kind = match l.class.as_str() {
                "POSIX" => LockKind::LockPosix,
                "FLOCK" => LockKind::LockFlock,
                "OFDLCK" => LockKind::LockOfd,
                other => {
                    return Err(CaptureError::Unsupported {
                        pid: p,
                        what: format!("fd {fd}: {other} lock on {link}"),
                    });
                }
            };
            let len = l.end.map_or(0, |e| e - l.start + 1);
            let key = (meta.dev(), meta.ino(), l.start, len, l.write);
            if kind == LockKind::LockPosix && posix_seen.contains(&key)
                || kind != LockKind::LockPosix && dup_of >= 0
            {
                continue;
            }
            posix_seen.push(key);
            locks.push(FileLock {
                fd,
                kind: kind as i32,
                write: l.write,
                start: l.start,
                len,
            });
        }
        let kind = match kind {
            Movable::Regular => FdKind::FdRegular,
            Movable::Directory => FdKind::FdDirectory,
            Movable::PlainDevice => FdKind::FdCharDevice,
        };
        out.push(Fd {
            fd,
            kind: kind as i32,
            flags,
            cloexec,
            pos: info.pos,
            file: Some(file),
            dup_of,
        });
    }
    Ok((out, locks))
}

/// The lowest earlier descriptor sharing `fd`'s open file description.
fn shared_with(
    pid: Pid,
    earlier: &[Fd],
    fd: i32,
    meta: &std::fs::Metadata,
) -> Result<i32, CaptureError> {
    for e in earlier.iter().filter(|e| e.dup_of < 0) {
        let same_file = e
            .file
            .as_ref()
            .is_some_and(|f| f.dev == meta.dev() && f.ino == meta.ino());
        if same_file {
            let same =
                task::same_file_description(pid, e.fd, fd).map_err(|errno| CaptureError::Sys {
                    pid: pid.as_raw(),
                    what: format!("kcmp fd {} and fd {fd}", e.fd),
                    errno,
                })?;
            if same {
                return Ok(e.fd);
            }
        }
    }
    Ok(-1)
}

/// The working directory and the executable.
pub fn cwd_and_exe(ctx: &mut FileCtx) -> Result<(FileRef, FileRef), CaptureError> {
    let pid = ctx.pid;
    let link = |what: &str| {
        std::fs::read_link(format!("/proc/{pid}/{what}"))
            .map(|l| l.to_string_lossy().into_owned())
            .map_err(|source| CaptureError::Io {
                pid: pid.as_raw(),
                what: what.into(),
                source,
            })
    };
    let (cwd, exe) = (link("cwd")?, link("exe")?);
    let cwd = ctx.file_ref(&format!("/proc/{pid}/cwd"), &cwd, false)?;
    let exe = ctx.file_ref(&format!("/proc/{pid}/exe"), &exe, true)?;
    Ok((cwd, exe))
}
