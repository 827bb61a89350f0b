//! The metadata operations. Each one reads the state through a [`Txn`] (or
//! a read view), checks the request, and leaves its writes in the `Txn`,
//! which [`crate::db::MetaDb::write`] applies as one atomic batch.
//!
//! Ids arrive here already checked for the wire (non-zero inode numbers,
//! 32-byte hashes); names are checked here.

pub mod attr;
pub mod blocks;
pub mod format;
pub mod gc;
pub mod inode;
pub mod locks;
pub mod namei;
pub mod rename;
pub mod sessions;
pub mod tasks;
pub mod txn;
pub mod xattr;

pub use self::txn::{Outcome, Read, Txn};

use crate::error::{Result, e};
use crate::schema::{Dentry, Inode, Tree, k_name, k1};

/// Longest name in a directory, in bytes.
pub const NAME_MAX: usize = 255;

/// Checks a directory entry name.
pub fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(e::einval(format!(
            "invalid name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(e::einval(format!(
            "name {:?} contains '/' or NUL",
            String::from_utf8_lossy(name)
        )));
    }
    if name.len() > NAME_MAX {
        return Err(e::enametoolong(format!(
            "name of {} bytes is longer than {NAME_MAX}",
            name.len()
        )));
    }
    Ok(())
}

/// The inode `ino`, if it exists.
pub fn get_inode<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Option<Inode>> {
    r.get(Tree::Inodes, &k1(ino))?
        .map(|v| Inode::decode(ino, &v))
        .transpose()
}

/// The inode `ino`, or ENOENT.
pub fn inode<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Inode> {
    get_inode(r, ino)?.ok_or_else(|| e::enoent(format!("inode {ino} does not exist")))
}

/// The directory `ino`, or ENOENT / ENOTDIR.
pub fn dir<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Inode> {
    let i = inode(r, ino)?;
    if !i.is_dir() {
        return Err(e::enotdir(format!("inode {ino} is not a directory")));
    }
    Ok(i)
}

/// The entry `name` of directory `parent`, if present.
pub fn dentry<R: Read + ?Sized>(r: &R, parent: u64, name: &[u8]) -> Result<Option<Dentry>> {
    r.get(Tree::Dentries, &k_name(parent, name))?
        .map(|v| Dentry::decode(&v))
        .transpose()
}

/// Human-readable form of a name for messages.
pub(crate) fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
