//! Ghosts: copies of deleted files a process holds open, kept in the image
//! directory so a restore can give the process the same content after
//! nothing holds the file any more (a plain checkpoint ends the original,
//! and with it the last open of an unlinked file).

use std::path::Path;

use migfs_proto::image::Fd;
use nix::unistd::Pid;

use crate::error::CaptureError;

/// The name of the ghost of file (dev, ino) in an image directory.
fn name(dev: u64, ino: u64) -> String {
    format!("ghost-{dev:x}-{ino}")
}

/// Copies every deleted regular file on migfs behind `fds` of at most
/// `limit` bytes into `dir` (once per file) and names the copy in its
/// `FileRef`. (Deleted files elsewhere are refused by the check: they
/// could not follow a migration, which sends no ghosts.)
pub fn copy_deleted(pid: Pid, dir: &Path, limit: u64, fds: &mut [Fd]) -> Result<(), CaptureError> {
    if limit == 0 {
        return Ok(());
    }
    let mut done = Vec::new();
    for fd in fds.iter_mut() {
        let n = fd.fd;
        let Some(f) = fd.file.as_mut() else {
            continue;
        };
        if !f.deleted
            || f.migfs.is_none()
            || f.mode & libc::S_IFMT != libc::S_IFREG
            || f.size > limit
        {
            continue;
        }
        let ghost = name(f.dev, f.ino);
        if !done.contains(&ghost) {
            let from = format!("/proc/{pid}/fd/{n}");
            std::fs::copy(&from, dir.join(&ghost)).map_err(|source| CaptureError::Io {
                pid: pid.as_raw(),
                what: format!("fd {n}: copy the deleted file {} into the image", f.path),
                source,
            })?;
            done.push(ghost.clone());
        }
        f.ghost = ghost;
    }
    Ok(())
}
