//! Block maps: reading them, committing written blocks, truncating and
//! fallocate.

use migfs_proto::meta::BlockRef as WireBlock;

use super::{Read, Txn, gc, inode};
use crate::error::{MetaError, Result, e};
use crate::schema::{BlockEntry, Inode, Tree, k2, key_pair, prefix_range};

/// Most block entries one GetBlocks reply carries.
pub const MAX_BLOCKS_PER_REPLY: u64 = 65536;

/// Largest file size (the kernel's loff_t is signed).
const MAX_FILE_SIZE: u64 = (1 << 63) - 1;

/// fallocate(2) flag: do not change the file size.
pub const FALLOC_FL_KEEP_SIZE: i32 = 1;

/// One written block being committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewBlock {
    /// Chunk index.
    pub index: u64,
    /// blake3 hash.
    pub hash: [u8; 32],
    /// Bytes of the chunk that are file data.
    pub len: u32,
}

/// A commit of written blocks (CommitBlocks).
#[derive(Clone, Debug)]
pub struct Commit {
    /// The file.
    pub ino: u64,
    /// The blocks, in order (a later one for the same index wins).
    pub blocks: Vec<NewBlock>,
    /// Nodes holding every block.
    pub holders: Vec<u64>,
    /// The file is at least this long afterwards.
    pub min_size: u64,
    /// Modification time to set (default: now).
    pub mtime: Option<i64>,
    /// Required current data_version (0: any).
    pub expect_version: u64,
}

fn regular(i: &Inode) -> Result<()> {
    if i.is_dir() {
        return Err(e::eisdir(format!("inode {} is a directory", i.ino)));
    }
    if !i.is_reg() {
        return Err(e::einval(format!("inode {} is not a regular file", i.ino)));
    }
    Ok(())
}

/// The block entries of `ino` with index in `[first, first + count)`
/// (`count` 0: to the end; capped at [`MAX_BLOCKS_PER_REPLY`]), with their
/// holders, and the inode.
pub fn get_blocks<R: Read + ?Sized>(
    r: &R,
    ino: u64,
    first: u64,
    count: u64,
) -> Result<(Inode, Vec<WireBlock>)> {
    let i = inode(r, ino)?;
    if i.is_dir() {
        return Err(e::eisdir(format!("inode {ino} is a directory")));
    }
    let limit = if count == 0 {
        MAX_BLOCKS_PER_REPLY
    } else {
        count.min(MAX_BLOCKS_PER_REPLY)
    };
    let end = match first.checked_add(count) {
        Some(last) if count != 0 => Some(k2(ino, last).to_vec()),
        _ => prefix_range(ino).1,
    };
    let rows = r.scan(
        Tree::Blocks,
        &k2(ino, first),
        end.as_deref(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let (_, index) = key_pair(&k, Tree::Blocks)?;
        let b = BlockEntry::decode(&v)?;
        let holders = gc::get_ref(r, &b.hash)?
            .map(|r| r.holders.0)
            .unwrap_or_default();
        out.push(WireBlock {
            index,
            hash: b.hash.to_vec(),
            len: b.len,
            holders,
        });
    }
    Ok((i, out))
}

/// Records written blocks in the block map of `c.ino`, moving reference
/// counts, and updates size, mtime, ctime and data_version.
pub fn commit(t: &mut Txn<'_>, c: &Commit) -> Result<Inode> {
    let mut i = inode(t, c.ino)?;
    regular(&i)?;
    if c.expect_version != 0 && c.expect_version != i.data_version {
        return Err(e::estale(format!(
            "inode {} is at data version {}, not {}",
            c.ino, i.data_version, c.expect_version
        )));
    }
    let bs = u64::from(t.cluster.block_size);
    if !c.blocks.is_empty() && c.holders.is_empty() {
        return Err(e::einval("committed blocks need at least one holder"));
    }
    if c.holders.contains(&0) {
        return Err(e::einval("node id 0 cannot hold blocks"));
    }
    for b in &c.blocks {
        if b.len == 0 || u64::from(b.len) > bs {
            return Err(e::einval(format!(
                "block {} has length {} (block size {bs})",
                b.index, b.len
            )));
        }
        if b.index
            .checked_mul(bs)
            .and_then(|o| o.checked_add(bs))
            .is_none()
        {
            return Err(e::efbig(format!(
                "block index {} is past the largest file",
                b.index
            )));
        }
    }
    for b in &c.blocks {
        let key = k2(c.ino, b.index);
        let old = t
            .get(Tree::Blocks, &key)?
            .map(|v| BlockEntry::decode(&v))
            .transpose()?;
        match old {
            Some(o) if o.hash == b.hash => gc::add_holders(t, &b.hash, &c.holders)?,
            Some(o) => {
                gc::unref(t, &o.hash)?;
                gc::add_ref(t, &b.hash, &c.holders)?;
            }
            None => gc::add_ref(t, &b.hash, &c.holders)?,
        }
        t.put(
            Tree::Blocks,
            &key,
            BlockEntry {
                hash: b.hash,
                len: b.len,
            }
            .encode(),
        );
    }
    i.size = i.size.max(c.min_size);
    i.mtime = c.mtime.unwrap_or(t.now);
    i.ctime = t.now;
    i.data_version += 1;
    t.put_inode(&i);
    t.inval_inode(i.ino);
    Ok(i)
}

/// Sets the size of `i` to `size`: block entries wholly past it go, a block
/// straddling it is cut so the bytes past the new end read as zeros. The
/// caller writes `i` back.
pub fn truncate(t: &mut Txn<'_>, i: &mut Inode, size: u64) -> Result<()> {
    let bs = u64::from(t.cluster.block_size);
    let first_gone = size.div_ceil(bs);
    let end = prefix_range(i.ino).1;
    for (k, v) in t.scan(
        Tree::Blocks,
        &k2(i.ino, first_gone),
        end.as_deref(),
        usize::MAX,
    )? {
        gc::unref(t, &BlockEntry::decode(&v)?.hash)?;
        t.remove(Tree::Blocks, &k);
    }
    let within = size % bs;
    if within != 0 {
        let key = k2(i.ino, size / bs);
        if let Some(v) = t.get(Tree::Blocks, &key)? {
            let mut b = BlockEntry::decode(&v)?;
            if u64::from(b.len) > within {
                b.len = u32::try_from(within).unwrap_or(b.len);
                t.put(Tree::Blocks, &key, b.encode());
            }
        }
    }
    i.size = size;
    i.data_version += 1;
    Ok(())
}

/// fallocate(2): mode 0 extends the size (the new range reads as zeros,
/// no blocks needed); FALLOC_FL_KEEP_SIZE changes nothing; other modes
/// are not supported.
pub fn fallocate(t: &mut Txn<'_>, ino: u64, offset: u64, length: u64, mode: i32) -> Result<Inode> {
    let mut i = inode(t, ino)?;
    if i.is_dir() {
        return Err(e::eisdir(format!("inode {ino} is a directory")));
    }
    if !i.is_reg() {
        return Err(MetaError::posix(
            libc::ENODEV,
            format!("inode {ino} is not a regular file"),
        ));
    }
    if length == 0 {
        return Err(e::einval("fallocate of zero length"));
    }
    let end = offset
        .checked_add(length)
        .filter(|end| *end <= MAX_FILE_SIZE)
        .ok_or_else(|| {
            e::efbig(format!(
                "fallocate past the largest file ({offset}+{length})"
            ))
        })?;
    match mode {
        0 if end > i.size => {
            i.size = end;
            i.mtime = t.now;
            i.ctime = t.now;
            t.put_inode(&i);
            t.inval_inode(ino);
            Ok(i)
        }
        0 | FALLOC_FL_KEEP_SIZE => Ok(i),
        m => Err(e::eopnotsupp(format!(
            "fallocate mode {m:#x} is not supported"
        ))),
    }
}
