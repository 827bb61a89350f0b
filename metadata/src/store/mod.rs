//! The storage contract the metadata server is written against.
//!
//! A [`MetaStore`] is a set of ordered byte-keyed trees ([`Tree`]) with one
//! atomic multi-tree write ([`MetaStore::apply`]). Everything above it
//! (schema, operations, server) is independent of the engine; this module
//! never names sled. `tests/conformance.rs` runs one suite against every
//! implementation.

mod behind;
mod log;
mod mem;
mod sled;

pub use self::behind::WriteBehind;
pub use self::mem::MemStore;
pub use self::sled::SledStore;

use crate::error::Result;
use crate::schema::Tree;

/// One key/value pair returned by a scan.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One write of a batch: `None` removes the key.
pub type Write = (Tree, Vec<u8>, Option<Vec<u8>>);

/// A set of writes applied all together or not at all.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    ops: Vec<Write>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Batch {
        Batch::default()
    }
    /// Sets `key` in `tree` to `value`.
    pub fn put(&mut self, tree: Tree, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.ops.push((tree, key.into(), Some(value)));
    }
    /// Removes `key` from `tree` (absent keys are fine).
    pub fn remove(&mut self, tree: Tree, key: impl Into<Vec<u8>>) {
        self.ops.push((tree, key.into(), None));
    }
    /// Number of writes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    /// The writes in order (a later write to the same key wins).
    pub fn ops(&self) -> &[Write] {
        &self.ops
    }
}

/// An ordered key/value store with atomic multi-tree batches.
pub trait MetaStore: Send + Sync {
    /// The value of `key` in `tree`.
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` entries of `tree` with `start <= key < end` (`end`
    /// `None`: to the last key), in ascending key order.
    fn scan(
        &self,
        tree: Tree,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>>;

    /// Applies every write of `batch` atomically: after a crash either all
    /// of them are visible or none is.
    fn apply(&self, batch: &Batch) -> Result<()>;

    /// Makes every applied batch durable on disk.
    fn flush(&self) -> Result<()>;

    /// A fresh id, greater than every id returned before, also across a
    /// restart of the store. The first is at least 1.
    fn next_id(&self) -> Result<u64>;

    /// Whether reads and applies are answered from memory (no disk I/O on
    /// the caller's thread), so a server may run them on its async tasks.
    fn in_memory(&self) -> bool {
        false
    }
}
