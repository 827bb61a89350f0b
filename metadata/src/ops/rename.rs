//! rename(2) and renameat2(2) with RENAME_NOREPLACE / RENAME_EXCHANGE, as
//! one batch.

use super::inode::{add_entry, delete, drop_link, remove_entry};
use super::{Read, Txn, check_name, dentry, dir, inode, show};
use crate::db::invariant;
use crate::error::{Result, e};
use crate::schema::{Dentry, Inode, Tree, k_name};

/// Fail if the target exists.
pub const RENAME_NOREPLACE: u32 = 1;
/// Swap source and target.
pub const RENAME_EXCHANGE: u32 = 2;

/// The two names of a rename.
#[derive(Clone, Copy, Debug)]
pub struct Rename<'a> {
    /// Source directory.
    pub parent: u64,
    /// Source name.
    pub name: &'a [u8],
    /// Target directory.
    pub new_parent: u64,
    /// Target name.
    pub new_name: &'a [u8],
    /// RENAME_* flags.
    pub flags: u32,
}

/// Renames `r.name` in `r.parent` to `r.new_name` in `r.new_parent`.
pub fn rename(t: &mut Txn<'_>, r: Rename<'_>) -> Result<()> {
    if r.flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
        || r.flags == RENAME_NOREPLACE | RENAME_EXCHANGE
    {
        return Err(e::einval(format!("invalid rename flags {:#x}", r.flags)));
    }
    check_name(r.name)?;
    check_name(r.new_name)?;
    dir(t, r.parent)?;
    dir(t, r.new_parent)?;
    let sd = dentry(t, r.parent, r.name)?.ok_or_else(|| {
        e::enoent(format!(
            "no entry {:?} in directory {}",
            show(r.name),
            r.parent
        ))
    })?;
    let dd = dentry(t, r.new_parent, r.new_name)?;
    if dd.is_some_and(|d| d.ino == sd.ino) {
        // Both names are links to the same inode: nothing to do.
        return Ok(());
    }
    let src = inode(t, sd.ino)?;
    if r.flags & RENAME_EXCHANGE != 0 {
        let dd = dd.ok_or_else(|| {
            e::enoent(format!(
                "no entry {:?} in directory {} to exchange with",
                show(r.new_name),
                r.new_parent
            ))
        })?;
        return exchange(t, r, (sd, src), dd);
    }
    if src.is_dir() {
        not_into_own_subtree(t, src.ino, r.new_parent)?;
    }
    if let Some(dd) = dd {
        if r.flags & RENAME_NOREPLACE != 0 {
            return Err(e::eexist(format!(
                "{:?} exists in directory {}",
                show(r.new_name),
                r.new_parent
            )));
        }
        replace_target(t, r, &src, dd)?;
    }
    move_entry(t, r, sd, src)
}

/// Fails with EINVAL if `dest` is `moved` or lies below it.
fn not_into_own_subtree(t: &Txn<'_>, moved: u64, dest: u64) -> Result<()> {
    if is_below(t, dest, moved)? {
        return Err(e::einval(format!(
            "cannot move directory {moved} into its own subtree"
        )));
    }
    Ok(())
}

/// Checks the existing target against the source and removes it.
fn replace_target(t: &mut Txn<'_>, r: Rename<'_>, src: &Inode, dd: Dentry) -> Result<()> {
    let dst = inode(t, dd.ino)?;
    match (src.is_dir(), dst.is_dir()) {
        (true, false) => {
            return Err(e::enotdir(format!(
                "cannot replace non-directory {:?} with a directory",
                show(r.new_name)
            )));
        }
        (false, true) => {
            return Err(e::eisdir(format!(
                "cannot replace directory {:?} with a non-directory",
                show(r.new_name)
            )));
        }
        (true, true) if dst.children > 0 => {
            return Err(e::enotempty(format!(
                "directory {:?} is not empty",
                show(r.new_name)
            )));
        }
        _ => {}
    }
    let mut np = dir(t, r.new_parent)?;
    remove_entry(t, &mut np, r.new_name, dd);
    if dst.is_dir() {
        np.nlink = np.nlink.saturating_sub(1);
    }
    t.put_inode(&np);
    if dst.is_dir() {
        delete(t, dst.ino)
    } else {
        drop_link(t, dst)
    }
}

/// Moves the source entry to the target name (which is free by now).
fn move_entry(t: &mut Txn<'_>, r: Rename<'_>, sd: Dentry, mut src: Inode) -> Result<()> {
    let mut p = dir(t, r.parent)?;
    remove_entry(t, &mut p, r.name, sd);
    if src.is_dir() {
        p.nlink = p.nlink.saturating_sub(1);
    }
    p.mtime = t.now;
    p.ctime = t.now;
    t.put_inode(&p);
    let mut np = dir(t, r.new_parent)?;
    add_entry(t, &mut np, r.new_name, src.ino)?;
    if src.is_dir() {
        np.nlink = np.nlink.saturating_add(1);
        src.parent = r.new_parent;
    }
    np.mtime = t.now;
    np.ctime = t.now;
    t.put_inode(&np);
    src.ctime = t.now;
    t.put_inode(&src);
    announce(t, r, src.ino, None);
    Ok(())
}

/// RENAME_EXCHANGE: both names stay where they are (with their cookies)
/// and swap inodes.
fn exchange(
    t: &mut Txn<'_>,
    r: Rename<'_>,
    (sd, mut src): (Dentry, Inode),
    dd: Dentry,
) -> Result<()> {
    let mut dst = inode(t, dd.ino)?;
    if src.is_dir() {
        not_into_own_subtree(t, src.ino, r.new_parent)?;
    }
    if dst.is_dir() {
        not_into_own_subtree(t, dst.ino, r.parent)?;
    }
    let swapped_src = Dentry {
        ino: dst.ino,
        cookie: sd.cookie,
    };
    let swapped_dst = Dentry {
        ino: src.ino,
        cookie: dd.cookie,
    };
    t.put(
        Tree::Dentries,
        &k_name(r.parent, r.name),
        swapped_src.encode(),
    );
    t.put(
        Tree::Dentries,
        &k_name(r.new_parent, r.new_name),
        swapped_dst.encode(),
    );
    let mut p = dir(t, r.parent)?;
    if r.parent != r.new_parent {
        let mut np = dir(t, r.new_parent)?;
        if src.is_dir() {
            src.parent = r.new_parent;
            p.nlink = p.nlink.saturating_sub(1);
            np.nlink = np.nlink.saturating_add(1);
        }
        if dst.is_dir() {
            dst.parent = r.parent;
            np.nlink = np.nlink.saturating_sub(1);
            p.nlink = p.nlink.saturating_add(1);
        }
        np.mtime = t.now;
        np.ctime = t.now;
        t.put_inode(&np);
    }
    p.mtime = t.now;
    p.ctime = t.now;
    t.put_inode(&p);
    src.ctime = t.now;
    dst.ctime = t.now;
    t.put_inode(&src);
    t.put_inode(&dst);
    announce(t, r, src.ino, Some(dst.ino));
    Ok(())
}

fn announce(t: &mut Txn<'_>, r: Rename<'_>, moved: u64, other: Option<u64>) {
    t.inval_entry(r.parent, r.name);
    t.inval_entry(r.new_parent, r.new_name);
    t.inval_inode(r.parent);
    t.inval_inode(r.new_parent);
    t.inval_inode(moved);
    if let Some(o) = other {
        t.inval_inode(o);
    }
}

/// Whether `ino` is `root` or below it (used by consistency checks too).
pub fn is_below<R: Read + ?Sized>(r: &R, ino: u64, root: u64) -> Result<bool> {
    let mut cur = ino;
    for _ in 0..100_000 {
        if cur == root {
            return Ok(true);
        }
        let i = dir(r, cur)?;
        if i.parent == cur || i.parent == 0 {
            return Ok(false);
        }
        cur = i.parent;
    }
    Err(invariant(format!(
        "parent chain of directory {ino} does not end"
    )))
}
