//! [`MemStore`]: the store in memory (tests, and a reference for the
//! contract). Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use super::{Batch, Entry, MetaStore};
use crate::error::Result;
use crate::schema::Tree;

/// Every tree as a `BTreeMap`, all behind one lock so a batch is atomic.
#[derive(Debug)]
pub struct MemStore {
    trees: RwLock<Vec<BTreeMap<Vec<u8>, Vec<u8>>>>,
    ids: AtomicU64,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore {
            trees: RwLock::new(vec![BTreeMap::new(); Tree::ALL.len()]),
            ids: AtomicU64::new(1),
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl MetaStore for MemStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.trees.read()[tree.index()].get(key).cloned())
    }

    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>> {
        let trees = self.trees.read();
        let map = &trees[tree.index()];
        let it = map.range(start.to_vec()..);
        Ok(it
            .take_while(|(k, _)| end.is_none_or(|e| k.as_slice() < e))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&self, batch: &Batch) -> Result<()> {
        let mut trees = self.trees.write();
        for (tree, key, value) in batch.ops() {
            let map = &mut trees[tree.index()];
            match value {
                Some(v) => map.insert(key.clone(), v.clone()),
                None => map.remove(key),
            };
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn next_id(&self) -> Result<u64> {
        Ok(self.ids.fetch_add(1, Ordering::Relaxed))
    }

    fn in_memory(&self) -> bool {
        true
    }
}
