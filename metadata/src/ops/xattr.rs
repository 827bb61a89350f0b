//! Extended attributes.

use super::{Read, Txn, inode};
use crate::error::{Result, e};
use crate::schema::{Dec, Enc, Tree, k_name, prefix_range};

/// Longest xattr name.
pub const XATTR_NAME_MAX: usize = 255;
/// Largest xattr value.
pub const XATTR_SIZE_MAX: usize = 65536;
/// setxattr flag: fail if present.
pub const XATTR_CREATE: i32 = 1;
/// setxattr flag: fail if absent.
pub const XATTR_REPLACE: i32 = 2;

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > XATTR_NAME_MAX {
        return Err(e::erange(format!(
            "xattr name of {} bytes (1..={XATTR_NAME_MAX})",
            name.len()
        )));
    }
    if name.contains(&0) {
        return Err(e::einval("xattr name contains NUL"));
    }
    Ok(())
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// setxattr(2).
pub fn set(t: &mut Txn<'_>, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
    check_name(name)?;
    if value.len() > XATTR_SIZE_MAX {
        return Err(e::e2big(format!(
            "xattr value of {} bytes (max {XATTR_SIZE_MAX})",
            value.len()
        )));
    }
    if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
        return Err(e::einval(format!("invalid setxattr flags {flags:#x}")));
    }
    let mut i = inode(t, ino)?;
    let key = k_name(ino, name);
    let present = t.get(Tree::Xattrs, &key)?.is_some();
    if present && flags == XATTR_CREATE {
        return Err(e::eexist(format!(
            "xattr {:?} exists on inode {ino}",
            show(name)
        )));
    }
    if !present && flags == XATTR_REPLACE {
        return Err(e::enodata(format!(
            "no xattr {:?} on inode {ino}",
            show(name)
        )));
    }
    t.put(Tree::Xattrs, &key, Enc::new().raw(value).done());
    i.ctime = t.now;
    t.put_inode(&i);
    t.inval_inode(ino);
    Ok(())
}

/// getxattr(2).
pub fn get<R: Read + ?Sized>(r: &R, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
    check_name(name)?;
    inode(r, ino)?;
    match r.get(Tree::Xattrs, &k_name(ino, name))? {
        Some(v) => Ok(Dec::new(&v, Tree::Xattrs)?.rest()),
        None => Err(e::enodata(format!(
            "no xattr {:?} on inode {ino}",
            show(name)
        ))),
    }
}

/// listxattr(2).
pub fn list<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Vec<Vec<u8>>> {
    inode(r, ino)?;
    let (start, end) = prefix_range(ino);
    Ok(r.scan(Tree::Xattrs, &start, end.as_deref(), usize::MAX)?
        .into_iter()
        .map(|(k, _)| k.get(8..).map(<[u8]>::to_vec).unwrap_or_default())
        .collect())
}

/// removexattr(2).
pub fn remove(t: &mut Txn<'_>, ino: u64, name: &[u8]) -> Result<()> {
    check_name(name)?;
    let mut i = inode(t, ino)?;
    let key = k_name(ino, name);
    if t.get(Tree::Xattrs, &key)?.is_none() {
        return Err(e::enodata(format!(
            "no xattr {:?} on inode {ino}",
            show(name)
        )));
    }
    t.remove(Tree::Xattrs, &key);
    i.ctime = t.now;
    t.put_inode(&i);
    t.inval_inode(ino);
    Ok(())
}
