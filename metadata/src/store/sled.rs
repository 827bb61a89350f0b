//! [`SledStore`]: the store on disk, one sled tree per [`Tree`]. A batch is
//! one sled transaction over the trees it touches, so a crash leaves it
//! either fully applied or not at all.

use std::path::Path;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{Batch, Entry, MetaStore};
use crate::error::{MetaError, Result};
use crate::schema::Tree;

/// A sled database with the trees of [`Tree::ALL`].
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    trees: Vec<sled::Tree>,
}

impl SledStore {
    /// Opens (or creates) the database in directory `path`.
    pub fn open(path: &Path) -> Result<SledStore> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| MetaError::store("open", e))?;
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<sled::Result<Vec<_>>>()
            .map_err(|e| MetaError::store("open tree", e))?;
        Ok(SledStore { db, trees })
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree.index()]
    }
}

impl MetaStore for SledStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.tree(tree)
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| MetaError::store("get", e))
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let t = self.tree(tree);
        let it = match end {
            Some(end) if end <= start => return Ok(Vec::new()),
            Some(end) => t.range(start..end),
            None => t.range(start..),
        };
        it.take(limit)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| MetaError::store("scan", e))
            })
            .collect()
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // Only the touched trees take part in the transaction.
        let mut slot = [usize::MAX; Tree::ALL.len()];
        let mut used: Vec<&sled::Tree> = Vec::new();
        for (tree, _, _) in batch.ops() {
            if slot[tree.index()] == usize::MAX {
                slot[tree.index()] = used.len();
                used.push(self.tree(*tree));
            }
        }
        let res: Result<(), TransactionError<()>> = used.as_slice().transaction(|views| {
            for (tree, key, value) in batch.ops() {
                let view = &views[slot[tree.index()]];
                match value {
                    Some(v) => view.insert(key.as_slice(), v.as_slice())?,
                    None => view.remove(key.as_slice())?,
                };
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        res.map_err(|e| match e {
            TransactionError::Storage(e) => MetaError::store("apply", e),
            TransactionError::Abort(()) => MetaError::store("apply", "transaction aborted"),
        })
    }

    fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| MetaError::store("flush", e))
    }

    fn next_id(&self) -> Result<u64> {
        // sled's ids start at 0 and survive restarts (it reserves ranges
        // and skips past the reservation on recovery).
        self.db
            .generate_id()
            .map(|id| id + 1)
            .map_err(|e| MetaError::store("next_id", e))
    }
}
