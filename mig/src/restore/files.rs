//! Files on the restoring side: finding every file the image names (by
//! path; for migfs files whose path is gone or names another inode, by
//! `<mount>/.migfs/by-inode/<ino>`), checking it is the same file (type,
//! device number, size and content hash), and reopening descriptors, the
//! working directory and locks inside the target.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use migfs_proto::image::{FdKind, FileRef, Image, LockKind};

use super::inject::{Call, CallError, Target};
use crate::error::{RestoreCause, RestoreError, Step};

/// Where each file of an image is opened on this node, keyed by the
/// (device, inode) it had at checkpoint.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    paths: HashMap<(u64, u64), String>,
    /// Deleted files made again from their ghosts: removed (unlinked) once
    /// the process has them open ([`Resolved::remove_ghosts`]).
    ghosts: Vec<std::path::PathBuf>,
    /// The image's executable is the file this restorer runs from: the
    /// stub cannot switch /proc/PID/exe to it (the kernel refuses while
    /// the old one is still mapped), and it already is the same file.
    pub exe_is_ours: bool,
}

impl Resolved {
    /// The path to open for `f` (its own path if it was never resolved).
    pub fn path<'a>(&'a self, f: &'a FileRef) -> &'a str {
        self.paths
            .get(&(f.dev, f.ino))
            .map_or(f.path.as_str(), String::as_str)
    }

    /// Records a path (tests).
    pub fn insert(&mut self, f: &FileRef, path: &str) {
        self.paths.insert((f.dev, f.ino), path.to_owned());
    }

    /// Unlinks the files made from ghosts: the process's descriptors keep
    /// them, as deleted files, as before the checkpoint.
    pub fn remove_ghosts(&self) {
        for p in &self.ghosts {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!(path = %p.display(), error = %e, "a restored deleted file stays visible");
            }
        }
    }
}

/// Every file the image refers to, with what refers to it.
fn file_uses(img: &Image) -> Vec<(String, &FileRef)> {
    let mut out = Vec::new();
    if let Some(p) = &img.process {
        out.extend(p.exe.iter().map(|f| ("the executable".to_owned(), f)));
        out.extend(
            p.cwd
                .iter()
                .map(|f| ("the working directory".to_owned(), f)),
        );
    }
    for fd in &img.fds {
        out.extend(fd.file.iter().map(|f| (format!("fd {}", fd.fd), f)));
    }
    for v in img.mm.iter().flat_map(|m| &m.vmas) {
        out.extend(
            v.file
                .iter()
                .map(|f| (format!("mapping {:x}-{:x}", v.start, v.end), f)),
        );
    }
    out
}

/// Finds and checks every file of the image in `dir` ("check files"
/// step). Deleted files that are gone are made again from their ghosts:
/// call [`Resolved::remove_ghosts`] when the restore is over.
pub fn resolve(img: &Image, dir: &Path) -> Result<Resolved, RestoreError> {
    let mut r = Resolved::default();
    let res = resolve_into(&mut r, img, dir);
    if res.is_err() {
        r.remove_ghosts();
    }
    res.map(|()| r)
}

fn resolve_into(r: &mut Resolved, img: &Image, dir: &Path) -> Result<(), RestoreError> {
    for (who, f) in file_uses(img) {
        if r.paths.contains_key(&(f.dev, f.ino)) {
            continue;
        }
        let why = |why| refused(Step::CheckFiles, format!("{who}: {why}"));
        let path = match locate(f) {
            Ok(p) if std::fs::metadata(&p).is_ok() => p,
            // Gone, and its content travelled with the image.
            _ if !f.ghost.is_empty() => {
                let p = from_ghost(f, dir).map_err(why)?;
                r.ghosts.push(p.clone().into());
                p
            }
            other => other.map_err(why)?,
        };
        verify(f, &path).map_err(why)?;
        r.paths.insert((f.dev, f.ino), path);
    }
    if let Some(exe) = img.process.as_ref().and_then(|p| p.exe.as_ref()) {
        let ours = std::fs::metadata("/proc/self/exe")
            .map(|m| (m.dev(), m.ino()))
            .ok();
        let theirs = std::fs::metadata(r.path(exe))
            .map(|m| (m.dev(), m.ino()))
            .ok();
        r.exe_is_ours = ours.is_some() && ours == theirs;
    }
    Ok(())
}

/// Makes a deleted file again from its ghost, in its old directory (else
/// in its migfs mount's root, else the temporary directory), with its old
/// permissions; returns the path (unlinked after the restore).
fn from_ghost(f: &FileRef, dir: &Path) -> Result<String, String> {
    let old = Path::new(&f.path);
    let place = old
        .parent()
        .filter(|p| p.is_dir())
        .map(Path::to_path_buf)
        .or_else(|| f.migfs.as_ref().map(|m| m.mountpoint.clone().into()))
        .unwrap_or_else(std::env::temp_dir);
    let name = format!(
        ".migfs-restored-{}-{}",
        std::process::id(),
        old.file_name()
            .map_or("file".into(), |n| n.to_string_lossy())
    );
    let path = place.join(name);
    let src = dir.join(&f.ghost);
    std::fs::copy(&src, &path).map_err(|e| {
        format!(
            "{} was deleted; making it again from {} at {}: {e}",
            f.path,
            src.display(),
            path.display()
        )
    })?;
    let perm = std::fs::Permissions::from_mode(f.mode & 0o7777);
    std::fs::set_permissions(&path, perm).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path.to_string_lossy().into_owned())
}

fn refused(step: Step, why: String) -> RestoreError {
    RestoreError::new(step, RestoreCause::Refused(why))
}

/// The path that names `f` here.
fn locate(f: &FileRef) -> Result<String, String> {
    let Some(m) = &f.migfs else {
        if f.deleted {
            return Err(format!("{} was deleted", f.path));
        }
        return Ok(f.path.clone());
    };
    let same = |meta: std::fs::Metadata| meta.ino() == m.ino;
    if !f.deleted && std::fs::metadata(&f.path).is_ok_and(same) {
        return Ok(f.path.clone());
    }
    Ok(format!(
        "{}/.migfs/by-inode/{}",
        m.mountpoint.trim_end_matches('/'),
        m.ino
    ))
}

/// Checks that `path` is the file `f` describes.
fn verify(f: &FileRef, path: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if meta.mode() & libc::S_IFMT != f.mode & libc::S_IFMT {
        return Err(format!("{path} is not the same kind of file any more"));
    }
    if meta.mode() & libc::S_IFMT == libc::S_IFCHR && meta.rdev() != f.rdev {
        return Err(format!("{path} is another device"));
    }
    if f.hashed {
        if meta.size() != f.size {
            return Err(format!(
                "{path} changed since the checkpoint (size {} instead of {})",
                meta.size(),
                f.size
            ));
        }
        // The very same file with the same mtime and ctime: any write
        // since would have changed ctime, so the content is the same.
        let ns = |s: i64, n: i64| s * 1_000_000_000 + n;
        let untouched = f.ctime_ns != 0
            && (meta.dev(), meta.ino()) == (f.dev, f.ino)
            && ns(meta.mtime(), meta.mtime_nsec()) == f.mtime_ns
            && ns(meta.ctime(), meta.ctime_nsec()) == f.ctime_ns;
        if untouched {
            return Ok(());
        }
        let h =
            crate::capture::files::hash_file(path, f.size).map_err(|e| format!("{path}: {e}"))?;
        if h != f.content_blake3 {
            return Err(format!(
                "{path} changed since the checkpoint (content differs)"
            ));
        }
    }
    Ok(())
}

fn sys(step: Step, what: String) -> impl FnOnce(CallError) -> RestoreError {
    move |e| RestoreError::new(step, cause(what, e))
}

/// A [`RestoreCause`] for a failed target request.
pub fn cause(what: String, e: CallError) -> RestoreCause {
    match e {
        CallError::Errno(errno) => RestoreCause::Sys { what, errno },
        CallError::Inject(source) => RestoreCause::Inject { what, source },
        CallError::Ptrace(m) => RestoreCause::Refused(format!("{what}: {m}")),
    }
}

/// Reopens every descriptor with its number, flags, offset and
/// close-on-exec, then the working directory ("open files" step).
pub fn open_fds<T: Target>(
    t: &mut T,
    img: &Image,
    r: &Resolved,
    relay: Option<&str>,
) -> Result<(), RestoreError> {
    let step = Step::OpenFiles;
    t.call(0, &Call::CloseRange { first: 0 })
        .map_err(sys(step, "close the stub's descriptors".into()))?;
    for fd in &img.fds {
        let n = fd.fd;
        if fd.dup_of >= 0 {
            t.call(
                0,
                &Call::Dup3 {
                    old: fd.dup_of,
                    new: n,
                    cloexec: fd.cloexec,
                },
            )
            .map_err(sys(step, format!("fd {n}: dup3")))?;
            continue;
        }
        let relayed = fd.kind == FdKind::FdRelayPipe as i32;
        let path = match (&fd.file, relayed) {
            (_, true) => relay.ok_or_else(|| {
                RestoreError::new(
                    step,
                    RestoreCause::Refused(format!(
                        "fd {n} is a migration agent's stdin pipe; only a move restores it"
                    )),
                )
            })?,
            (Some(file), false) => r.path(file),
            (None, false) => continue,
        };
        let mut flags = if relayed {
            libc::O_RDONLY as u32
        } else {
            fd.flags & !((libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOCTTY) as u32)
        };
        if fd.cloexec {
            flags |= libc::O_CLOEXEC as u32;
        }
        let got = t
            .call(0, &Call::Open { path, flags })
            .map_err(sys(step, format!("fd {n}: open {path}")))?;
        let got = i32::try_from(got).unwrap_or(-1);
        if got != n {
            t.call(
                0,
                &Call::Dup3 {
                    old: got,
                    new: n,
                    cloexec: fd.cloexec,
                },
            )
            .map_err(sys(step, format!("fd {n}: dup3")))?;
            t.call(0, &Call::Close { fd: got })
                .map_err(sys(step, format!("fd {n}: close {got}")))?;
        }
        if !relayed && fd.kind != FdKind::FdCharDevice as i32 && fd.pos != 0 {
            t.call(
                0,
                &Call::Lseek {
                    fd: n,
                    offset: fd.pos,
                },
            )
            .map_err(sys(step, format!("fd {n}: lseek to {}", fd.pos)))?;
        }
    }
    if let Some(cwd) = img.process.as_ref().and_then(|p| p.cwd.as_ref()) {
        let path = r.path(cwd);
        t.call(0, &Call::Chdir { path })
            .map_err(sys(step, format!("chdir {path}")))?;
    }
    Ok(())
}

/// Takes again every lock the process held ("take locks" step); a lock
/// someone else holds now fails the restore.
pub fn take_locks<T: Target>(t: &mut T, img: &Image, r: &Resolved) -> Result<(), RestoreError> {
    for l in &img.locks {
        let kind = LockKind::try_from(l.kind).unwrap_or(LockKind::LockPosix);
        let path = img
            .fds
            .iter()
            .find(|f| f.fd == l.fd)
            .and_then(|f| f.file.as_ref())
            .map_or("?", |f| r.path(f));
        let call = match kind {
            LockKind::LockFlock => Call::Flock {
                fd: l.fd,
                write: l.write,
            },
            k => Call::SetLock {
                fd: l.fd,
                ofd: k == LockKind::LockOfd,
                write: l.write,
                start: l.start,
                len: l.len,
            },
        };
        let what = format!(
            "fd {}: {} {} lock on {path} (bytes {}+{})",
            l.fd,
            kind.as_str_name(),
            if l.write { "write" } else { "read" },
            l.start,
            if l.len == 0 {
                "EOF".to_owned()
            } else {
                l.len.to_string()
            }
        );
        t.call(0, &call).map_err(sys(Step::Locks, what))?;
    }
    Ok(())
}
