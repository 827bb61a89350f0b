//! The control directory `/.migfs` (not listed by readdir of the root):
//!
//! - `by-inode/<ino>`: the file with inode number `ino`, even after it was
//!   renamed or unlinked while some node still holds it open. Restoring a
//!   moved process reopens its files through here.
//! - `stats`: this node's counters, one `name value` per line.
//!
//! Directories are not reachable through `by-inode` (the kernel allows a
//! directory only one name).

use std::ffi::OsStr;
use std::sync::atomic::Ordering;

use fuser::OpenFlags;
use migfs_proto::meta::Attr;

use super::Shared;
use crate::error::{FsError, Result};

/// Inode of `/.migfs`.
pub const CTL_DIR: u64 = u64::MAX - 0xff;
/// Inode of `/.migfs/by-inode`.
pub const CTL_BY_INODE: u64 = CTL_DIR + 1;
/// Inode of `/.migfs/stats`.
pub const CTL_STATS: u64 = CTL_DIR + 2;
/// Name of the control directory in the root.
pub const CTL_NAME: &str = ".migfs";

/// Whether `ino` is one of the control inodes.
pub fn is_control(ino: u64) -> bool {
    ino >= CTL_DIR
}

/// Attributes of a control inode.
pub fn attr(ino: u64) -> Option<Attr> {
    let mode = match ino {
        CTL_DIR | CTL_BY_INODE => libc::S_IFDIR | 0o555,
        CTL_STATS => libc::S_IFREG | 0o444,
        _ => return None,
    };
    Some(Attr {
        ino,
        mode,
        nlink: if mode & libc::S_IFDIR != 0 { 2 } else { 1 },
        ..Attr::default()
    })
}

/// Answers lookups that land in or on the control directory; `None` for
/// ordinary names.
pub async fn lookup(sh: &Shared, parent: u64, name: &OsStr) -> Result<Option<Attr>> {
    let enoent = FsError::Local {
        op: "lookup",
        errno: libc::ENOENT,
    };
    match parent {
        1 if name == CTL_NAME => Ok(attr(CTL_DIR)),
        CTL_DIR if name == "by-inode" => Ok(attr(CTL_BY_INODE)),
        CTL_DIR if name == "stats" => Ok(attr(CTL_STATS)),
        CTL_DIR => Err(enoent),
        CTL_BY_INODE => {
            let ino: u64 = name.to_str().and_then(|s| s.parse().ok()).ok_or(enoent)?;
            if ino == 0 || is_control(ino) {
                return Err(FsError::Local {
                    op: "lookup",
                    errno: libc::ENOENT,
                });
            }
            // Always asked of the server: the inode may be gone since it was cached.
            let a = super::ops::fetch_attr(sh, ino).await?;
            if super::attr::is_dir(&a) {
                return Err(FsError::Local {
                    op: "by-inode lookup",
                    errno: libc::EISDIR,
                });
            }
            Ok(Some(a))
        }
        _ => Ok(None),
    }
}

/// Refuses to create anything inside the control directory.
pub fn refuse_in_control(parent: u64) -> Result<()> {
    if is_control(parent) {
        return Err(FsError::Local {
            op: "create in control dir",
            errno: libc::EPERM,
        });
    }
    Ok(())
}

/// Opening a control file: read-only.
pub fn open(ino: u64, flags: OpenFlags) -> std::result::Result<(), i32> {
    if ino != CTL_STATS {
        return Err(libc::EISDIR);
    }
    if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(libc::EACCES);
    }
    Ok(())
}

/// The contents of a control file.
pub fn read(sh: &Shared, ino: u64) -> Vec<u8> {
    if ino != CTL_STATS {
        return Vec::new();
    }
    let s = &sh.data.blocks.stats;
    let d = &sh.dirops.stats;
    let rows = [
        ("dirops_answered", &d.answered),
        ("dirops_refused", &d.refused),
        ("dirops_batches", &d.batches),
        ("delegations_granted", &d.granted),
        ("delegations_given_back", &d.recalled),
        ("corrupt_blocks", &s.corrupt_blocks),
        ("cache_hits", &s.cache_hits),
        ("local_reads", &s.local_reads),
        ("remote_reads", &s.remote_reads),
        ("blocks_written", &s.blocks_written),
        ("blocks_replicated", &s.blocks_replicated),
        ("blocks_collected", &s.blocks_collected),
    ];
    let mut out = format!(
        "node_id {}\nsession {}\ndelegations_held {}\n",
        sh.data.blocks.node_id(),
        sh.data.meta.session(),
        sh.dirops.held()
    );
    for (k, v) in rows {
        out.push_str(&format!("{k} {}\n", v.load(Ordering::Relaxed)));
    }
    for (k, v) in &sh.info {
        out.push_str(&format!("{k} {v}\n"));
    }
    out.into_bytes()
}

/// Lists `/.migfs` (by-inode is not listable).
pub fn readdir(offset: u64, add: &mut dyn FnMut(&OsStr, u64, &Attr) -> bool) {
    let items = [(3, "by-inode", CTL_BY_INODE), (4, "stats", CTL_STATS)];
    for (cookie, name, ino) in items {
        if offset < cookie
            && let Some(a) = attr(ino)
            && add(OsStr::new(name), cookie, &a)
        {
            return;
        }
    }
}
