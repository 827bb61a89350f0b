//! User-space metadata cache: names → inodes and inodes → attributes.
//!
//! Entries live for the cache TTL but are dropped as soon as the metadata
//! server pushes an invalidation for them (see [`crate::node`]'s watch
//! loop), so they stay correct across nodes without polling. The kernel's
//! own caches are invalidated from the same events.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

use migfs_proto::meta::Attr;
use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<(u64, OsString), (u64, Instant)>,
    attrs: HashMap<u64, (Attr, Instant)>,
}

/// The cache.
#[derive(Debug)]
pub struct MetaCache {
    inner: Mutex<Inner>,
    ttl: Duration,
}

/// Beyond this many entries a map is cleared rather than grown.
const MAX_ENTRIES: usize = 1 << 20;

impl MetaCache {
    /// A cache whose entries expire after `ttl` (zero disables it).
    pub fn new(ttl: Duration) -> MetaCache {
        MetaCache {
            inner: Mutex::new(Inner::default()),
            ttl,
        }
    }

    /// The cached attributes of the entry `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<Attr> {
        let g = self.inner.lock();
        let (ino, t) = g.entries.get(&(parent, name.to_os_string()))?;
        if t.elapsed() >= self.ttl {
            return None;
        }
        let (a, t) = g.attrs.get(ino)?;
        (t.elapsed() < self.ttl).then_some(*a)
    }

    /// The cached attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Option<Attr> {
        let g = self.inner.lock();
        let (a, t) = g.attrs.get(&ino)?;
        (t.elapsed() < self.ttl).then_some(*a)
    }

    /// Records an entry and its inode's attributes.
    pub fn put_entry(&self, parent: u64, name: &OsStr, attr: &Attr) {
        if self.ttl.is_zero() {
            return;
        }
        let mut g = self.inner.lock();
        if g.entries.len() >= MAX_ENTRIES {
            g.entries.clear();
        }
        g.entries
            .insert((parent, name.to_os_string()), (attr.ino, Instant::now()));
        Self::put_attr_locked(&mut g, attr);
    }

    /// Records fresh attributes of an inode.
    pub fn put_attr(&self, attr: &Attr) {
        if self.ttl.is_zero() {
            return;
        }
        Self::put_attr_locked(&mut self.inner.lock(), attr);
    }

    fn put_attr_locked(g: &mut Inner, attr: &Attr) {
        if g.attrs.len() >= MAX_ENTRIES {
            g.attrs.clear();
        }
        // A reply overtaken by a newer data change must not replace it.
        if g.attrs
            .get(&attr.ino)
            .is_some_and(|(old, _)| old.data_version > attr.data_version)
        {
            return;
        }
        g.attrs.insert(attr.ino, (*attr, Instant::now()));
    }

    /// Forgets the entry `name` in `parent`.
    pub fn drop_entry(&self, parent: u64, name: &OsStr) {
        self.inner
            .lock()
            .entries
            .remove(&(parent, name.to_os_string()));
    }

    /// Forgets the attributes of `ino`.
    pub fn drop_attr(&self, ino: u64) {
        self.inner.lock().attrs.remove(&ino);
    }

    /// Forgets everything (the invalidation stream was interrupted).
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.entries.clear();
        g.attrs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_drop() {
        let c = MetaCache::new(Duration::from_secs(60));
        let a = Attr {
            ino: 7,
            size: 3,
            ..Attr::default()
        };
        c.put_entry(1, OsStr::new("x"), &a);
        assert_eq!(c.lookup(1, OsStr::new("x")).unwrap().size, 3);
        c.drop_attr(7);
        assert!(c.lookup(1, OsStr::new("x")).is_none());
        c.put_entry(1, OsStr::new("x"), &a);
        c.drop_entry(1, OsStr::new("x"));
        assert!(c.lookup(1, OsStr::new("x")).is_none());
        let z = MetaCache::new(Duration::ZERO);
        z.put_entry(1, OsStr::new("x"), &a);
        assert!(z.lookup(1, OsStr::new("x")).is_none());
    }
}
