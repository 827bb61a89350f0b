//! User-space metadata cache: names → inodes and inodes → attributes.
//!
//! Entries live for the cache TTL but are dropped as soon as the metadata
//! server pushes an invalidation for them (see [`crate::node`]'s watch
//! loop), so they stay correct across nodes without polling. The kernel's
//! own caches are invalidated from the same events.
//!
//! For directories this node made itself, it also knows every name they
//! hold (a *listing*), kept up to date by its own creates and removals and
//! given up as soon as another node changes the directory: a name that is
//! not in a listing is answered "no such file" without asking the server,
//! which saves the lookup the kernel makes before every create.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::time::{Duration, Instant};

use migfs_proto::meta::Attr;
use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<(u64, OsString), (u64, Instant)>,
    attrs: HashMap<u64, (Attr, Instant)>,
    /// Directories whose every name is known, and since when.
    listings: HashMap<u64, (HashSet<OsString>, Instant)>,
    /// Names held by all listings together.
    listed: usize,
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
        g.listings.clear();
        g.listed = 0;
    }

    /// `dir` was just made by this node: it is empty.
    pub fn listing_empty(&self, dir: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut g = self.inner.lock();
        if let Some((old, _)) = g.listings.insert(dir, (HashSet::new(), Instant::now())) {
            g.listed -= old.len();
        }
    }

    /// `name` now exists in `dir` (this node made it, or learnt it).
    pub fn listing_add(&self, dir: u64, name: &OsStr) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let Some((names, since)) = g.listings.get_mut(&dir) else {
            return;
        };
        if names.insert(name.to_os_string()) {
            g.listed += 1;
        }
        *since = Instant::now();
        if g.listed > MAX_ENTRIES {
            g.listings.clear();
            g.listed = 0;
        }
    }

    /// `name` no longer exists in `dir` (this node removed it).
    pub fn listing_remove(&self, dir: u64, name: &OsStr) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        if let Some((names, since)) = g.listings.get_mut(&dir) {
            if names.remove(name) {
                g.listed -= 1;
            }
            *since = Instant::now();
        }
    }

    /// Another node changed `dir`, or it is gone: its listing is not
    /// known any more.
    pub fn listing_forget(&self, dir: u64) {
        let mut g = self.inner.lock();
        if let Some((old, _)) = g.listings.remove(&dir) {
            g.listed -= old.len();
        }
    }

    /// Another node now answers for `dir`'s names: forget every cached
    /// name in it, its listing and its attributes.
    pub fn forget_dir(&self, dir: u64) {
        let mut g = self.inner.lock();
        g.entries.retain(|(p, _), _| *p != dir);
        g.attrs.remove(&dir);
        if let Some((old, _)) = g.listings.remove(&dir) {
            g.listed -= old.len();
        }
    }

    /// Whether `name` is known not to exist in `dir`.
    pub fn absent(&self, dir: u64, name: &OsStr) -> bool {
        let g = self.inner.lock();
        g.listings
            .get(&dir)
            .is_some_and(|(names, since)| since.elapsed() < self.ttl && !names.contains(name))
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
        z.listing_empty(5);
        assert!(!z.absent(5, OsStr::new("x")), "no listing without a cache");
        z.put_entry(1, OsStr::new("x"), &a);
        assert!(z.lookup(1, OsStr::new("x")).is_none());
    }

    #[test]
    fn listings_know_what_is_absent_until_forgotten() {
        let c = MetaCache::new(Duration::from_secs(60));
        let (x, y) = (OsStr::new("x"), OsStr::new("y"));
        assert!(!c.absent(9, x), "an unknown directory");
        c.listing_empty(9);
        assert!(c.absent(9, x));
        c.listing_add(9, x);
        assert!(!c.absent(9, x) && c.absent(9, y));
        c.listing_remove(9, x);
        assert!(c.absent(9, x));
        c.listing_add(9, y);
        c.listing_forget(9);
        assert!(!c.absent(9, x));
        c.listing_empty(9);
        c.clear();
        assert!(!c.absent(9, x));
        assert_eq!(c.inner.lock().listed, 0);
    }
}
