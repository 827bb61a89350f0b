//! Mounting and unmounting the FUSE filesystem (`fuse.migfs`).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::error::{FsError, Result};

/// The filesystem type shown in /proc/mounts.
pub const FSTYPE: &str = "fuse.migfs";

/// Opens /dev/fuse and mounts it at `mountpoint`; returns the device fd the
/// FUSE session serves. A dead migfs mount left there by a killed daemon is
/// detached first.
pub fn mount(mountpoint: &Path) -> Result<OwnedFd> {
    if is_migfs_mount(mountpoint) {
        tracing::warn!(path = %mountpoint.display(), "detaching a stale migfs mount");
        unmount(mountpoint);
    }
    std::fs::create_dir_all(mountpoint)
        .map_err(|e| FsError::io(format!("create mountpoint {}", mountpoint.display()), e))?;
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            FsError::io(
                "open /dev/fuse (is the fuse module loaded, are you root?)",
                e,
            )
        })?;
    let mode = std::fs::metadata(mountpoint)
        .map_err(|e| FsError::io(format!("stat {}", mountpoint.display()), e))?
        .permissions()
        .mode()
        & libc::S_IFMT;
    let opts = format!(
        "fd={},rootmode={mode:o},user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("migfs"),
        mountpoint,
        Some(FSTYPE),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| {
        FsError::io(
            format!("mount {} at {}", FSTYPE, mountpoint.display()),
            e.into(),
        )
    })?;
    Ok(dev.into())
}

/// Detaches the mount at `mountpoint` (lazily: open files keep working
/// until closed). Errors are ignored: there may be nothing mounted.
pub fn unmount(mountpoint: &Path) {
    if let Err(e) = nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH) {
        tracing::debug!(path = %mountpoint.display(), error = %e, "unmount");
    }
}

/// Whether a migfs filesystem is mounted exactly at `mountpoint` in this
/// mount namespace.
pub fn is_migfs_mount(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.to_string_lossy();
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        matches!(sep, Some(s) if f.get(4) == Some(&want.as_ref()) && f.get(s + 1) == Some(&FSTYPE))
    })
}
