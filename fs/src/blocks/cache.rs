//! A memory cache of verified blocks, bounded in bytes, least recently used
//! out first. Only bytes whose blake3 name was checked enter it.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use migfs_proto::ids::BlockHash;
use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<BlockHash, (Bytes, u64)>,
    order: BTreeMap<u64, BlockHash>,
    tick: u64,
    bytes: usize,
}

/// The cache; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct BlockCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> BlockCache {
        BlockCache {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    /// The block, if cached (and marks it recently used).
    pub fn get(&self, h: &BlockHash) -> Option<Bytes> {
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        let (data, old) = {
            let e = g.map.get_mut(h)?;
            let old = std::mem::replace(&mut e.1, tick);
            (e.0.clone(), old)
        };
        g.order.remove(&old);
        g.order.insert(tick, *h);
        Some(data)
    }

    /// Adds a verified block, evicting the least recently used.
    pub fn insert(&self, h: BlockHash, data: Bytes) {
        if data.len() > self.capacity {
            return;
        }
        let mut g = self.inner.lock();
        g.tick += 1;
        let tick = g.tick;
        let len = data.len();
        if let Some((old, t)) = g.map.insert(h, (data, tick)) {
            g.bytes -= old.len();
            g.order.remove(&t);
        }
        g.order.insert(tick, h);
        g.bytes += len;
        while g.bytes > self.capacity {
            let Some((_, victim)) = g.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = g.map.remove(&victim) {
                g.bytes -= d.len();
            }
        }
    }

    /// Drops a block (collected, or found corrupt).
    pub fn remove(&self, h: &BlockHash) {
        let mut g = self.inner.lock();
        if let Some((d, t)) = g.map.remove(h) {
            g.bytes -= d.len();
            g.order.remove(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_capacity() {
        let c = BlockCache::new(10);
        let (a, b, d) = (BlockHash([1; 32]), BlockHash([2; 32]), BlockHash([3; 32]));
        c.insert(a, Bytes::from_static(b"aaaa"));
        c.insert(b, Bytes::from_static(b"bbbb"));
        assert!(c.get(&a).is_some());
        c.insert(d, Bytes::from_static(b"dddd"));
        assert!(c.get(&b).is_none(), "b was least recently used");
        assert!(c.get(&a).is_some() && c.get(&d).is_some());
    }
}
