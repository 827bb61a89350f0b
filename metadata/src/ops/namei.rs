//! Names: lookup, create (mknod, mkdir, symlink), link, unlink, rmdir,
//! readlink and readdir.

use super::inode::{add_entry, count_inodes, delete, drop_link, remove_entry};
use super::{Read, Txn, check_name, dentry, dir, inode, sessions, show};
use crate::db::invariant;
use crate::error::{Result, e};
use crate::schema::{Dec, Dentry, Inode, Tree, k_name, k2, mode};

/// Longest symlink target (PATH_MAX).
pub const TARGET_MAX: usize = 4096;

/// What a new inode is made of.
#[derive(Clone, Debug)]
pub struct NewNode<'a> {
    /// Directory to create it in.
    pub parent: u64,
    /// Its name there.
    pub name: &'a [u8],
    /// Type and permission bits (type already decided by the caller).
    pub mode: u32,
    /// Device number.
    pub rdev: u32,
    /// Owner.
    pub uid: u32,
    /// Group (a set-gid parent overrides it).
    pub gid: u32,
    /// Symlink target.
    pub target: &'a [u8],
    /// Register an open in this session in the same batch.
    pub open_in: Option<u64>,
}

/// Looks up `name` in `parent`.
pub fn lookup<R: Read + ?Sized>(r: &R, parent: u64, name: &[u8]) -> Result<Inode> {
    check_name(name)?;
    dir(r, parent)?;
    let d = dentry(r, parent, name)?
        .ok_or_else(|| e::enoent(format!("no entry {:?} in directory {parent}", show(name))))?;
    super::inode(r, d.ino)
}

/// mknod(2): a regular file (type 0 counts as regular), FIFO, socket or
/// device node.
pub fn mknod(t: &mut Txn<'_>, mut n: NewNode<'_>) -> Result<Inode> {
    let typ = match n.mode & mode::S_IFMT {
        0 => mode::S_IFREG,
        ty @ (mode::S_IFREG | mode::S_IFIFO | mode::S_IFCHR | mode::S_IFBLK | mode::S_IFSOCK) => ty,
        ty => return Err(e::einval(format!("mknod cannot create file type {ty:#o}"))),
    };
    if n.open_in.is_some() && typ != mode::S_IFREG {
        return Err(e::einval("only regular files can be created open"));
    }
    n.mode = typ | (n.mode & mode::PERM);
    n.target = &[];
    create(t, n)
}

/// mkdir(2).
pub fn mkdir(t: &mut Txn<'_>, mut n: NewNode<'_>) -> Result<Inode> {
    n.mode = mode::S_IFDIR | (n.mode & mode::PERM);
    n.target = &[];
    n.open_in = None;
    create(t, n)
}

/// symlink(2).
pub fn symlink(t: &mut Txn<'_>, mut n: NewNode<'_>) -> Result<Inode> {
    if n.target.is_empty() {
        return Err(e::enoent("a symlink target cannot be empty"));
    }
    if n.target.len() > TARGET_MAX || n.target.contains(&0) {
        return Err(e::enametoolong(format!(
            "symlink target of {} bytes is too long or contains NUL",
            n.target.len()
        )));
    }
    n.mode = mode::S_IFLNK | 0o777;
    n.rdev = 0;
    n.open_in = None;
    create(t, n)
}

fn create(t: &mut Txn<'_>, n: NewNode<'_>) -> Result<Inode> {
    make(t, n, None, t.now)
}

/// A regular file made by the holder of its directory's delegation, with
/// the inode number leased to it and its clock's time. Fails before
/// writing anything (so a batch can go on with its next operation).
pub fn create_leased(t: &mut Txn<'_>, mut n: NewNode<'_>, ino: u64, now: i64) -> Result<Inode> {
    if ino <= 1 || super::get_inode(t, ino)?.is_some() {
        return Err(e::eexist(format!("inode {ino} is in use")));
    }
    n.mode = mode::S_IFREG | (n.mode & mode::PERM);
    n.target = &[];
    make(t, n, Some(ino), now)
}

/// unlink(2) from a delegation holder, who saw `ino` under `name`: fails
/// (changing nothing) when the name holds anything else now.
pub fn unlink_seen(t: &mut Txn<'_>, parent: u64, name: &[u8], ino: u64, now: i64) -> Result<()> {
    let (mut p, d, i) = victim(t, parent, name)?;
    if i.ino != ino {
        return Err(e::enoent(format!(
            "{:?} in directory {parent} is inode {}, not {ino}",
            show(name),
            i.ino
        )));
    }
    if i.is_dir() {
        return Err(e::eisdir(format!("{:?} is a directory", show(name))));
    }
    remove_entry(t, &mut p, name, d);
    p.mtime = now;
    p.ctime = now;
    t.put_inode(&p);
    let saved = t.now;
    t.now = now;
    let r = drop_link(t, i);
    t.now = saved;
    r?;
    t.inval_entry(parent, name);
    t.inval_inode(parent);
    Ok(())
}

/// Makes the node `n` (numbered `ino`, or a fresh number) at time `now`.
fn make(t: &mut Txn<'_>, n: NewNode<'_>, ino: Option<u64>, now: i64) -> Result<Inode> {
    check_name(n.name)?;
    let mut p = dir(t, n.parent)?;
    if dentry(t, n.parent, n.name)?.is_some() {
        return Err(e::eexist(format!(
            "{:?} exists in directory {}",
            show(n.name),
            n.parent
        )));
    }
    let is_dir = n.mode & mode::S_IFMT == mode::S_IFDIR;
    if is_dir && p.nlink == u32::MAX {
        return Err(e::emlink(format!("directory {} has too many links", p.ino)));
    }
    let (mut gid, mut mode_bits) = (n.gid, n.mode);
    if p.mode & mode::S_ISGID != 0 {
        gid = p.gid;
        if is_dir {
            mode_bits |= mode::S_ISGID;
        }
    }
    let ino = match ino {
        Some(i) => i,
        None => t.fresh_id()?,
    };
    let node = Inode {
        ino,
        mode: mode_bits,
        uid: n.uid,
        gid,
        rdev: n.rdev,
        nlink: if is_dir { 2 } else { 1 },
        size: n.target.len() as u64,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        data_version: 0,
        parent: if is_dir { p.ino } else { 0 },
        children: 0,
        target: n.target.to_vec(),
    };
    add_entry(t, &mut p, n.name, ino)?;
    if is_dir {
        p.nlink += 1;
    }
    p.mtime = now;
    p.ctime = now;
    t.put_inode(&p);
    t.put_inode(&node);
    count_inodes(t, 1)?;
    if let Some(s) = n.open_in {
        sessions::add_open(t, s, ino)?;
    }
    t.inval_entry(p.ino, n.name);
    t.inval_inode(p.ino);
    Ok(node)
}

/// link(2): a new name `new_name` in `new_parent` for `ino`.
pub fn link(t: &mut Txn<'_>, ino: u64, new_parent: u64, new_name: &[u8]) -> Result<Inode> {
    check_name(new_name)?;
    let mut i = inode(t, ino)?;
    if i.is_dir() {
        return Err(e::eperm(format!("cannot hard-link directory {ino}")));
    }
    if i.nlink == 0 {
        return Err(e::enoent(format!("inode {ino} has been unlinked")));
    }
    if i.nlink == u32::MAX {
        return Err(e::emlink(format!("inode {ino} has too many links")));
    }
    let mut p = dir(t, new_parent)?;
    if dentry(t, new_parent, new_name)?.is_some() {
        return Err(e::eexist(format!(
            "{:?} exists in directory {new_parent}",
            show(new_name)
        )));
    }
    add_entry(t, &mut p, new_name, ino)?;
    p.mtime = t.now;
    p.ctime = t.now;
    t.put_inode(&p);
    i.nlink += 1;
    i.ctime = t.now;
    t.put_inode(&i);
    t.inval_entry(new_parent, new_name);
    t.inval_inode(new_parent);
    t.inval_inode(ino);
    Ok(i)
}

/// Finds `name` in `parent` for removal: the parent, the entry, the inode.
fn victim(t: &Txn<'_>, parent: u64, name: &[u8]) -> Result<(Inode, Dentry, Inode)> {
    check_name(name)?;
    let p = dir(t, parent)?;
    let d = dentry(t, parent, name)?
        .ok_or_else(|| e::enoent(format!("no entry {:?} in directory {parent}", show(name))))?;
    let i = inode(t, d.ino)?;
    Ok((p, d, i))
}

/// unlink(2) of a non-directory.
pub fn unlink(t: &mut Txn<'_>, parent: u64, name: &[u8]) -> Result<()> {
    let (mut p, d, i) = victim(t, parent, name)?;
    if i.is_dir() {
        return Err(e::eisdir(format!("{:?} is a directory", show(name))));
    }
    remove_entry(t, &mut p, name, d);
    p.mtime = t.now;
    p.ctime = t.now;
    t.put_inode(&p);
    drop_link(t, i)?;
    t.inval_entry(parent, name);
    t.inval_inode(parent);
    Ok(())
}

/// rmdir(2) of an empty directory.
pub fn rmdir(t: &mut Txn<'_>, parent: u64, name: &[u8]) -> Result<()> {
    let (mut p, d, i) = victim(t, parent, name)?;
    if !i.is_dir() {
        return Err(e::enotdir(format!("{:?} is not a directory", show(name))));
    }
    if i.children > 0 {
        return Err(e::enotempty(format!(
            "directory {:?} is not empty",
            show(name)
        )));
    }
    remove_entry(t, &mut p, name, d);
    p.nlink = p.nlink.saturating_sub(1);
    p.mtime = t.now;
    p.ctime = t.now;
    t.put_inode(&p);
    delete(t, i.ino)?;
    t.inval_entry(parent, name);
    t.inval_inode(parent);
    Ok(())
}

/// readlink(2).
pub fn readlink<R: Read + ?Sized>(r: &R, ino: u64) -> Result<Vec<u8>> {
    let i = inode(r, ino)?;
    if !i.is_symlink() {
        return Err(e::einval(format!("inode {ino} is not a symlink")));
    }
    Ok(i.target)
}

/// One readdir entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// The name.
    pub name: Vec<u8>,
    /// Its cookie (stable while the entry exists).
    pub cookie: u64,
    /// The inode it names.
    pub inode: Inode,
}

/// Up to `limit` entries of directory `ino` with a cookie greater than
/// `after`, in cookie order, and whether the directory ends there.
pub fn readdir<R: Read + ?Sized>(
    r: &R,
    ino: u64,
    after: u64,
    limit: usize,
) -> Result<(Vec<DirEntry>, bool)> {
    dir(r, ino)?;
    let Some(first) = after.checked_add(1) else {
        return Ok((Vec::new(), true));
    };
    let end = ino.checked_add(1).map(|n| k2(n, 0));
    let page = r.scan(
        Tree::DirOrder,
        &k2(ino, first),
        end.as_ref().map(|k| &k[..]),
        limit.saturating_add(1),
    )?;
    let eof = page.len() <= limit;
    let mut out = Vec::with_capacity(page.len().min(limit));
    for (k, v) in page.into_iter().take(limit) {
        let (_, cookie) = crate::schema::key_pair(&k, Tree::DirOrder)?;
        let name = Dec::new(&v, Tree::DirOrder)?.rest();
        let d = r
            .get(Tree::Dentries, &k_name(ino, &name))?
            .map(|v| Dentry::decode(&v))
            .transpose()?
            .ok_or_else(|| invariant(format!("dirorder entry {cookie} of {ino} has no dentry")))?;
        out.push(DirEntry {
            name,
            cookie,
            inode: inode(r, d.ino)?,
        });
    }
    Ok((out, eof))
}
