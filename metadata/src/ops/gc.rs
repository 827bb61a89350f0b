//! Block reference counting and garbage collection.
//!
//! `blockrefs` counts the block entries naming each hash and records which
//! nodes hold it. When the count drops to zero the hash moves to `gc` with
//! its holders; each holder claims it ([`claim`]), deletes its copy and
//! reports back ([`done`]). A hash committed again while in `gc` is taken
//! back out, its holders being exactly the committing nodes.

use super::{Read, Txn};
use crate::error::Result;
use crate::schema::{BlockRef, Holders, Tree};

/// Reference count and holders of `hash`, if referenced.
pub fn get_ref<R: Read + ?Sized>(r: &R, hash: &[u8; 32]) -> Result<Option<BlockRef>> {
    r.get(Tree::BlockRefs, hash)?
        .map(|v| BlockRef::decode(&v))
        .transpose()
}

/// One more block entry names `hash`, held by `holders`.
pub fn add_ref(t: &mut Txn<'_>, hash: &[u8; 32], holders: &[u64]) -> Result<()> {
    let r = match get_ref(t, hash)? {
        Some(mut r) => {
            r.refs += 1;
            r.holders.add(holders);
            r
        }
        None => {
            t.remove(Tree::Gc, hash);
            let mut h = Holders::default();
            h.add(holders);
            BlockRef {
                refs: 1,
                holders: h,
            }
        }
    };
    t.put(Tree::BlockRefs, hash, r.encode());
    Ok(())
}

/// Adds holders to a referenced hash without changing its count.
pub fn add_holders(t: &mut Txn<'_>, hash: &[u8; 32], holders: &[u64]) -> Result<()> {
    if let Some(mut r) = get_ref(t, hash)? {
        r.holders.add(holders);
        t.put(Tree::BlockRefs, hash, r.encode());
    }
    Ok(())
}

/// One block entry naming `hash` went away; at zero it moves to `gc`.
pub fn unref(t: &mut Txn<'_>, hash: &[u8; 32]) -> Result<()> {
    let Some(mut r) = get_ref(t, hash)? else {
        tracing::warn!(hash = ?migfs_proto::ids::BlockHash(*hash), "unref of an unreferenced block");
        return Ok(());
    };
    r.refs = r.refs.saturating_sub(1);
    if r.refs > 0 {
        t.put(Tree::BlockRefs, hash, r.encode());
        return Ok(());
    }
    t.remove(Tree::BlockRefs, hash);
    let mut g = match t.get(Tree::Gc, hash)? {
        Some(v) => Holders::decode(&v)?,
        None => Holders::default(),
    };
    g.add(&r.holders.0);
    if !g.0.is_empty() {
        t.put(Tree::Gc, hash, g.encode());
    }
    Ok(())
}

/// Up to `limit` hashes in `gc` that `node` holds and nothing references.
pub fn claim<R: Read + ?Sized>(r: &R, node: u64, limit: usize) -> Result<Vec<[u8; 32]>> {
    let mut out = Vec::new();
    let mut start: Vec<u8> = Vec::new();
    const PAGE: usize = 1024;
    loop {
        let page = r.scan(Tree::Gc, &start, None, PAGE)?;
        for (k, v) in &page {
            if out.len() >= limit {
                return Ok(out);
            }
            let Ok(hash) = <[u8; 32]>::try_from(k.as_slice()) else {
                continue;
            };
            if Holders::decode(v)?.0.contains(&node) && get_ref(r, &hash)?.is_none() {
                out.push(hash);
            }
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// `node` deleted its copies of `hashes`: it no longer holds them; an entry
/// with no holder left is dropped.
pub fn done(t: &mut Txn<'_>, node: u64, hashes: &[[u8; 32]]) -> Result<()> {
    for hash in hashes {
        let Some(v) = t.get(Tree::Gc, hash)? else {
            continue;
        };
        let mut g = Holders::decode(&v)?;
        g.0.retain(|n| *n != node);
        if g.0.is_empty() {
            t.remove(Tree::Gc, hash);
        } else {
            t.put(Tree::Gc, hash, g.encode());
        }
    }
    Ok(())
}
