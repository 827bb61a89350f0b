//! [`Txn`]: the writes of one operation, gathered over a read view of the
//! store, and the [`Read`] trait both the store and a `Txn` implement.
//!
//! An operation reads through the `Txn` (so it sees its own earlier writes,
//! e.g. a refcount it decremented twice), and the `Txn` becomes one
//! [`Batch`] applied atomically by [`crate::db::MetaDb::write`].

use std::collections::BTreeMap;

use migfs_proto::meta::Invalidation;
use migfs_proto::meta::invalidation::Kind;

use crate::error::Result;
use crate::schema::{Cluster, Inode, Tree, k1};
use crate::store::{Batch, Entry, MetaStore};

/// Ids from the store are at least 1; adding this keeps inode numbers clear
/// of the root (1) and readdir cookies clear of "." (1) and ".." (2).
const ID_BASE: u64 = 2;

/// Read access to the trees.
pub trait Read {
    /// The value of `key` in `tree`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Up to `limit` entries with `start <= key < end`, in key order.
    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>>;
}

impl<S: MetaStore + ?Sized> Read for S {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        MetaStore::get(self, tree, key)
    }
    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        MetaStore::scan(self, tree, start, end, limit)
    }
}

/// The pending writes and side effects of one mutating operation.
pub struct Txn<'s> {
    store: &'s dyn MetaStore,
    writes: BTreeMap<(Tree, Vec<u8>), Option<Vec<u8>>>,
    /// The operation's time, ns since the epoch.
    pub now: i64,
    /// Cluster constants.
    pub cluster: Cluster,
    invals: Vec<Invalidation>,
    ended: Vec<u64>,
}

/// What a finished [`Txn`] hands back: the batch, the invalidations to push,
/// and the sessions it ended.
pub struct Outcome {
    /// The writes.
    pub batch: Batch,
    /// Invalidations for the other sessions.
    pub invals: Vec<Invalidation>,
    /// Sessions ended by the operation.
    pub ended: Vec<u64>,
}

impl<'s> Txn<'s> {
    /// A transaction over `store` at time `now` (ns).
    pub fn new(store: &'s dyn MetaStore, now: i64, cluster: Cluster) -> Txn<'s> {
        Txn {
            store,
            writes: BTreeMap::new(),
            now,
            cluster,
            invals: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// The operation's time in ms since the epoch.
    pub fn now_ms(&self) -> i64 {
        self.now / 1_000_000
    }

    /// Sets `key` of `tree`.
    pub fn put(&mut self, tree: Tree, key: &[u8], value: Vec<u8>) {
        self.writes.insert((tree, key.to_vec()), Some(value));
    }

    /// Removes `key` of `tree`.
    pub fn remove(&mut self, tree: Tree, key: &[u8]) {
        self.writes.insert((tree, key.to_vec()), None);
    }

    /// Writes an inode record.
    pub fn put_inode(&mut self, inode: &Inode) {
        self.put(Tree::Inodes, &k1(inode.ino), inode.encode());
    }

    /// A fresh id (inode number, cookie, session, node): never reused.
    pub fn fresh_id(&self) -> Result<u64> {
        Ok(self.store.next_id()? + ID_BASE)
    }

    /// Tells other sessions that attributes or data of `ino` changed.
    pub fn inval_inode(&mut self, ino: u64) {
        self.invals.push(Invalidation {
            kind: Kind::Inode.into(),
            ino,
            ..Default::default()
        });
    }

    /// Tells other sessions that `name` in `parent` changed.
    pub fn inval_entry(&mut self, parent: u64, name: &[u8]) {
        self.invals.push(Invalidation {
            kind: Kind::Entry.into(),
            parent,
            name: name.to_vec(),
            ..Default::default()
        });
    }

    /// Records that `session` ended (its watch stream closes).
    pub fn session_ended(&mut self, session: u64) {
        self.ended.push(session);
    }

    /// Keeps only the invalidations `keep` accepts (a delegation holder's
    /// batch: nobody else has its directory's names cached).
    pub fn retain_invals(&mut self, keep: impl FnMut(&Invalidation) -> bool) {
        self.invals.retain(keep);
    }

    /// Turns the transaction into its batch and side effects.
    pub fn finish(self) -> Outcome {
        let mut batch = Batch::new();
        for ((tree, key), value) in self.writes {
            match value {
                Some(v) => batch.put(tree, key, v),
                None => batch.remove(tree, key),
            }
        }
        let mut invals = self.invals;
        dedup_keep_order(&mut invals);
        Outcome {
            batch,
            invals,
            ended: self.ended,
        }
    }
}

fn dedup_keep_order(v: &mut Vec<Invalidation>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|i| seen.insert((i.kind, i.ino, i.parent, i.name.clone())));
}

impl Read for Txn<'_> {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(&(tree, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(tree, key),
        }
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut cursor = start.to_vec();
        while out.len() < limit {
            let base = self.store.scan(tree, &cursor, end, limit)?;
            let full = base.len() == limit;
            // The window in which `base` is complete: up to its last key
            // when it was cut by the limit, else up to `end`.
            let upper: Option<Vec<u8>> = if full {
                base.last().map(|(k, _)| k.clone())
            } else {
                end.map(<[u8]>::to_vec)
            };
            let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
            let lo = (tree, cursor.clone());
            for ((_, k), v) in self.writes.range(lo..).take_while(|((t, _), _)| *t == tree) {
                let inside = match &upper {
                    Some(u) if full => k <= u,
                    Some(u) => k < u,
                    None => true,
                };
                if !inside {
                    break;
                }
                match v {
                    Some(v) => merged.insert(k.clone(), v.clone()),
                    None => merged.remove(k),
                };
            }
            out.extend(merged.into_iter().take(limit - out.len()));
            match (full, upper) {
                (true, Some(mut last)) => {
                    last.push(0);
                    cursor = last;
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn cluster() -> Cluster {
        Cluster {
            block_size: 4096,
            replicas: 1,
        }
    }

    #[test]
    fn scan_merges_pending_writes_across_limit_windows() {
        let store = MemStore::new();
        let mut b = Batch::new();
        for i in 0u8..10 {
            b.put(Tree::Xattrs, vec![i * 2], vec![i]);
        }
        store.apply(&b).unwrap();
        let mut t = Txn::new(&store, 0, cluster());
        t.remove(Tree::Xattrs, &[0]);
        t.remove(Tree::Xattrs, &[2]);
        t.put(Tree::Xattrs, &[3], vec![99]);
        t.put(Tree::Dentries, &[1], vec![1]);
        let keys = |v: Vec<Entry>| v.into_iter().map(|(k, _)| k[0]).collect::<Vec<_>>();
        assert_eq!(keys(t.scan(Tree::Xattrs, &[], None, 3).unwrap()), [3, 4, 6]);
        assert_eq!(
            keys(t.scan(Tree::Xattrs, &[], None, usize::MAX).unwrap()),
            [3, 4, 6, 8, 10, 12, 14, 16, 18]
        );
        assert_eq!(
            keys(t.scan(Tree::Xattrs, &[1], Some(&[6]), 2).unwrap()),
            [3, 4]
        );
        assert_eq!(t.get(Tree::Xattrs, &[0]).unwrap(), None);
        assert_eq!(t.get(Tree::Xattrs, &[4]).unwrap(), Some(vec![2]));
        // Removing every stored key inside the first window still finds later ones.
        let mut t = Txn::new(&store, 0, cluster());
        for i in 0u8..5 {
            t.remove(Tree::Xattrs, &[i * 2]);
        }
        assert_eq!(keys(t.scan(Tree::Xattrs, &[], None, 2).unwrap()), [10, 12]);
    }
}
