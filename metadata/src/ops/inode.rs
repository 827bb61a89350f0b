//! Inode lifecycle shared by the operations: adding and removing directory
//! entries, dropping a link (orphan or delete), deleting an inode with
//! everything that hangs off it.

use super::{Read, Txn, gc};
use crate::error::Result;
use crate::schema::{
    self, BlockEntry, Dentry, Enc, Inode, META_INODES, Tree, decode_locks, k_name, k1, k2,
    prefix_range,
};

/// Adds the entry `name` → `ino` to directory `parent` with a fresh cookie.
/// The caller writes `parent` back.
pub fn add_entry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], ino: u64) -> Result<u64> {
    let cookie = t.fresh_id()?;
    t.put(
        Tree::Dentries,
        &k_name(parent.ino, name),
        Dentry { ino, cookie }.encode(),
    );
    t.put(
        Tree::DirOrder,
        &k2(parent.ino, cookie),
        Enc::new().raw(name).done(),
    );
    parent.children += 1;
    Ok(cookie)
}

/// Removes the entry `name` (currently `d`) from `parent`. The caller
/// writes `parent` back.
pub fn remove_entry(t: &mut Txn<'_>, parent: &mut Inode, name: &[u8], d: Dentry) {
    t.remove(Tree::Dentries, &k_name(parent.ino, name));
    t.remove(Tree::DirOrder, &k2(parent.ino, d.cookie));
    parent.children = parent.children.saturating_sub(1);
}

/// Whether any session holds `ino` open.
pub fn is_open<R: Read + ?Sized>(r: &R, ino: u64) -> Result<bool> {
    let (start, end) = prefix_range(ino);
    Ok(!r.scan(Tree::Openers, &start, end.as_deref(), 1)?.is_empty())
}

/// Drops one name of the non-directory `inode` (its entry is already
/// gone). At zero links it is kept as an orphan while any session has it
/// open, else deleted.
pub fn drop_link(t: &mut Txn<'_>, mut inode: Inode) -> Result<()> {
    inode.nlink = inode.nlink.saturating_sub(1);
    inode.ctime = t.now;
    t.inval_inode(inode.ino);
    if inode.nlink > 0 {
        t.put_inode(&inode);
    } else if is_open(t, inode.ino)? {
        t.put_inode(&inode);
        t.put(Tree::Orphans, &k1(inode.ino), schema::marker());
    } else {
        delete(t, inode.ino)?;
    }
    Ok(())
}

/// Deletes inode `ino`: its record, xattrs, block entries (releasing their
/// hashes), locks and orphan mark.
pub fn delete(t: &mut Txn<'_>, ino: u64) -> Result<()> {
    let (start, end) = prefix_range(ino);
    t.remove(Tree::Inodes, &k1(ino));
    t.remove(Tree::Orphans, &k1(ino));
    for (k, _) in t.scan(Tree::Xattrs, &start, end.as_deref(), usize::MAX)? {
        t.remove(Tree::Xattrs, &k);
    }
    for (k, v) in t.scan(Tree::Blocks, &start, end.as_deref(), usize::MAX)? {
        let b = BlockEntry::decode(&v)?;
        gc::unref(t, &b.hash)?;
        t.remove(Tree::Blocks, &k);
    }
    if let Some(v) = t.get(Tree::Locks, &k1(ino))? {
        for l in decode_locks(&v)? {
            t.remove(Tree::SessLocks, &k2(l.session, ino));
        }
        t.remove(Tree::Locks, &k1(ino));
    }
    count_inodes(t, -1)?;
    t.inval_inode(ino);
    Ok(())
}

/// Adjusts the inode counter by `delta`.
pub fn count_inodes(t: &mut Txn<'_>, delta: i64) -> Result<()> {
    let n = match t.get(Tree::Meta, META_INODES)? {
        Some(v) => schema::decode_u64(&v, Tree::Meta)?,
        None => 0,
    };
    let n = n.saturating_add_signed(delta);
    t.put(Tree::Meta, META_INODES, schema::encode_u64(n));
    Ok(())
}

/// The inode counter.
pub fn inode_count<R: Read + ?Sized>(r: &R) -> Result<u64> {
    match r.get(Tree::Meta, META_INODES)? {
        Some(v) => schema::decode_u64(&v, Tree::Meta),
        None => Ok(0),
    }
}
