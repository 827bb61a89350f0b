//! Attributes: the wire form of an inode, getattr and setattr (chmod,
//! chown, truncate, utimens).

use migfs_proto::meta::{Attr, SetAttrRequest};

use super::{Txn, blocks, inode};
use crate::error::{Result, e};
use crate::schema::{Inode, mode};

/// The wire attributes of an inode.
pub fn to_attr(i: &Inode) -> Attr {
    Attr {
        ino: i.ino,
        size: i.size,
        mode: i.mode,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev,
        atime_ns: i.atime,
        mtime_ns: i.mtime,
        ctime_ns: i.ctime,
        crtime_ns: i.crtime,
        data_version: i.data_version,
    }
}

/// Applies the fields present in `req` to inode `req.ino`. The kernel
/// checked permissions (default_permissions); only the S_IFMT bits of the
/// mode are kept whatever the request says.
pub fn setattr(t: &mut Txn<'_>, req: &SetAttrRequest) -> Result<Inode> {
    let mut i = inode(t, req.ino)?;
    let mut changed = false;
    if let Some(m) = req.mode {
        i.mode = (i.mode & mode::S_IFMT) | (m & mode::PERM);
        changed = true;
    }
    if let Some(uid) = req.uid {
        i.uid = uid;
        changed = true;
    }
    if let Some(gid) = req.gid {
        i.gid = gid;
        changed = true;
    }
    if let Some(size) = req.size {
        if i.is_dir() {
            return Err(e::eisdir(format!("cannot truncate directory {}", i.ino)));
        }
        if !i.is_reg() {
            return Err(e::einval(format!(
                "cannot truncate non-regular file {}",
                i.ino
            )));
        }
        blocks::truncate(t, &mut i, size)?;
        i.mtime = t.now;
        changed = true;
    }
    if req.atime_now || req.atime_ns.is_some() {
        i.atime = if req.atime_now {
            t.now
        } else {
            req.atime_ns.unwrap_or(t.now)
        };
        changed = true;
    }
    if req.mtime_now || req.mtime_ns.is_some() {
        i.mtime = if req.mtime_now {
            t.now
        } else {
            req.mtime_ns.unwrap_or(t.now)
        };
        changed = true;
    }
    if changed || req.ctime_ns.is_some() {
        i.ctime = req.ctime_ns.unwrap_or(t.now);
        t.put_inode(&i);
        t.inval_inode(i.ino);
    }
    Ok(i)
}
