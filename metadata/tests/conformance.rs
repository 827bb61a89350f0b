//! The store contract, checked against every implementation: point reads,
//! ordered range scans with limits, atomic multi-tree batches, monotonic
//! ids; and for the on-disk store, persistence across a reopen.

use migfs_meta::schema::Tree;
use std::sync::Arc;

use migfs_meta::store::{Batch, MemStore, MetaStore, SledStore, WriteBehind};

/// A store plus whatever must outlive it (a temp dir).
struct Fixture {
    store: Box<dyn MetaStore>,
    _dir: Option<tempfile::TempDir>,
}

fn mem() -> Fixture {
    Fixture {
        store: Box::new(MemStore::new()),
        _dir: None,
    }
}

fn sled() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        store: Box::new(SledStore::open(dir.path()).unwrap()),
        _dir: Some(dir),
    }
}

fn behind() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(SledStore::open(dir.path()).unwrap());
    Fixture {
        store: Box::new(WriteBehind::open(disk).unwrap()),
        _dir: Some(dir),
    }
}

fn logged() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(SledStore::open(&dir.path().join("db")).unwrap());
    Fixture {
        store: Box::new(WriteBehind::open_logged(disk, dir.path()).unwrap()),
        _dir: Some(dir),
    }
}

fn keys(v: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<Vec<u8>> {
    v.into_iter().map(|(k, _)| k).collect()
}

fn get_put_remove(s: &dyn MetaStore) {
    assert_eq!(s.get(Tree::Inodes, b"a").unwrap(), None);
    let mut b = Batch::new();
    b.put(Tree::Inodes, b"a".to_vec(), b"1".to_vec());
    b.put(Tree::Dentries, b"a".to_vec(), b"2".to_vec());
    s.apply(&b).unwrap();
    assert_eq!(s.get(Tree::Inodes, b"a").unwrap(), Some(b"1".to_vec()));
    // Trees are separate key spaces.
    assert_eq!(s.get(Tree::Dentries, b"a").unwrap(), Some(b"2".to_vec()));
    assert_eq!(s.get(Tree::Blocks, b"a").unwrap(), None);
    let mut b = Batch::new();
    b.remove(Tree::Inodes, b"a".to_vec());
    b.remove(Tree::Inodes, b"never-there".to_vec());
    s.apply(&b).unwrap();
    assert_eq!(s.get(Tree::Inodes, b"a").unwrap(), None);
    assert_eq!(s.get(Tree::Dentries, b"a").unwrap(), Some(b"2".to_vec()));
}

fn scan_is_ordered_bounded_and_limited(s: &dyn MetaStore) {
    let mut b = Batch::new();
    // Inserted out of order, big-endian u64 keys and byte strings mixed.
    for n in [300u64, 2, 70_000, 1, 256, 65_535] {
        b.put(
            Tree::Blocks,
            n.to_be_bytes().to_vec(),
            n.to_le_bytes().to_vec(),
        );
    }
    b.put(Tree::Xattrs, b"x".to_vec(), vec![]);
    s.apply(&b).unwrap();
    let all = s.scan(Tree::Blocks, &[], None, usize::MAX).unwrap();
    let nums: Vec<u64> = all
        .iter()
        .map(|(k, _)| u64::from_be_bytes(k.as_slice().try_into().unwrap()))
        .collect();
    assert_eq!(nums, [1, 2, 256, 300, 65_535, 70_000]);
    assert_eq!(all[2].1, 256u64.to_le_bytes());
    // Start inclusive, end exclusive.
    let r = s
        .scan(
            Tree::Blocks,
            &2u64.to_be_bytes(),
            Some(&300u64.to_be_bytes()),
            10,
        )
        .unwrap();
    assert_eq!(
        keys(r),
        [2u64.to_be_bytes().to_vec(), 256u64.to_be_bytes().to_vec()]
    );
    // Limit.
    let r = s.scan(Tree::Blocks, &3u64.to_be_bytes(), None, 2).unwrap();
    assert_eq!(
        keys(r),
        [256u64.to_be_bytes().to_vec(), 300u64.to_be_bytes().to_vec()]
    );
    assert!(s.scan(Tree::Blocks, &[], None, 0).unwrap().is_empty());
    // Empty and inverted ranges.
    assert!(
        s.scan(
            Tree::Blocks,
            &5u64.to_be_bytes(),
            Some(&5u64.to_be_bytes()),
            9
        )
        .unwrap()
        .is_empty()
    );
    assert!(
        s.scan(
            Tree::Blocks,
            &9u64.to_be_bytes(),
            Some(&5u64.to_be_bytes()),
            9
        )
        .unwrap()
        .is_empty()
    );
    // A scan never crosses into another tree.
    assert_eq!(
        keys(s.scan(Tree::Xattrs, &[], None, 100).unwrap()),
        [b"x".to_vec()]
    );
}

fn batch_applies_every_write_in_order(s: &dyn MetaStore) {
    let mut b = Batch::new();
    b.put(Tree::Sessions, b"k".to_vec(), b"first".to_vec());
    b.put(Tree::Opens, b"k".to_vec(), b"o".to_vec());
    b.put(Tree::Sessions, b"k".to_vec(), b"second".to_vec());
    b.put(Tree::Locks, b"gone".to_vec(), b"x".to_vec());
    b.remove(Tree::Locks, b"gone".to_vec());
    assert_eq!(b.len(), 5);
    s.apply(&b).unwrap();
    assert_eq!(
        s.get(Tree::Sessions, b"k").unwrap(),
        Some(b"second".to_vec())
    );
    assert_eq!(s.get(Tree::Opens, b"k").unwrap(), Some(b"o".to_vec()));
    assert_eq!(s.get(Tree::Locks, b"gone").unwrap(), None);
    s.apply(&Batch::new()).unwrap();
    s.flush().unwrap();
}

fn ids_increase(s: &dyn MetaStore) {
    let mut last = 0;
    for _ in 0..1000 {
        let id = s.next_id().unwrap();
        assert!(id >= 1 && id > last, "id {id} after {last}");
        last = id;
    }
}

fn large_batch_over_every_tree(s: &dyn MetaStore) {
    let mut b = Batch::new();
    for (i, t) in Tree::ALL.iter().enumerate() {
        for j in 0u32..200 {
            b.put(
                *t,
                j.to_be_bytes().to_vec(),
                vec![u8::try_from(i).unwrap(); 64],
            );
        }
    }
    s.apply(&b).unwrap();
    for t in Tree::ALL {
        assert_eq!(
            s.scan(t, &[], None, usize::MAX).unwrap().len(),
            200,
            "tree {}",
            t.name()
        );
    }
}

macro_rules! conformance {
    ($store:ident: $($case:ident),* $(,)?) => {
        mod $store {
            $(
                #[test]
                fn $case() {
                    let f = super::$store();
                    super::$case(f.store.as_ref());
                }
            )*
        }
    };
}

conformance!(mem: get_put_remove, scan_is_ordered_bounded_and_limited,
    batch_applies_every_write_in_order, ids_increase, large_batch_over_every_tree);
conformance!(sled: get_put_remove, scan_is_ordered_bounded_and_limited,
    batch_applies_every_write_in_order, ids_increase, large_batch_over_every_tree);

/// Opens the sled database at `path` again in this process. sled's flusher
/// thread lets go of the database's file lock a moment after the last
/// handle is dropped, so an immediate reopen can find it still held.
fn reopen(path: &std::path::Path) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match SledStore::open(path) {
            Ok(s) => return s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen {}: {e}", path.display()),
        }
    }
}

#[test]
fn sled_data_and_ids_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let s = SledStore::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put(Tree::Inodes, 7u64.to_be_bytes().to_vec(), b"seven".to_vec());
        b.put(Tree::Dentries, b"d".to_vec(), b"e".to_vec());
        s.apply(&b).unwrap();
        s.flush().unwrap();
        (0..10).map(|_| s.next_id().unwrap()).max().unwrap()
    };
    let s = reopen(dir.path());
    assert_eq!(
        s.get(Tree::Inodes, &7u64.to_be_bytes()).unwrap(),
        Some(b"seven".to_vec())
    );
    assert_eq!(s.get(Tree::Dentries, b"d").unwrap(), Some(b"e".to_vec()));
    let after = s.next_id().unwrap();
    assert!(
        after > before,
        "id {after} after reopen is not above {before}"
    );
}
conformance!(behind: get_put_remove, scan_is_ordered_bounded_and_limited,
    batch_applies_every_write_in_order, ids_increase, large_batch_over_every_tree);

#[test]
fn write_behind_writes_everything_to_disk_and_loads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let disk = Arc::new(SledStore::open(dir.path()).unwrap());
        let s = WriteBehind::open(disk.clone()).unwrap();
        logged_batches(&s, 2000);
        s.flush().unwrap();
        // After flush the durable store holds every batch, in order.
        assert_eq!(
            disk.scan(Tree::Inodes, &[], None, usize::MAX)
                .unwrap()
                .len(),
            1000
        );
        assert_eq!(disk.get(Tree::Inodes, &0u64.to_be_bytes()).unwrap(), None);
    }
    let s = WriteBehind::open(Arc::new(reopen(dir.path()))).unwrap();
    let all = s.scan(Tree::Inodes, &[], None, usize::MAX).unwrap();
    assert_eq!(all.len(), 1000);
    assert_eq!(
        all[0].0,
        1u64.to_be_bytes().to_vec(),
        "odd keys survive, even ones were removed"
    );
}
conformance!(logged: get_put_remove, scan_is_ordered_bounded_and_limited,
    batch_applies_every_write_in_order, ids_increase, large_batch_over_every_tree);

/// The store holds, in order, every key [`logged_batches`] wrote.
fn holds_logged_batches(s: &dyn MetaStore, n: u64) {
    let all = s.scan(Tree::Inodes, &[], None, usize::MAX).unwrap();
    assert_eq!(all.len() as u64, n / 2);
    assert!(s.get(Tree::Inodes, &0u64.to_be_bytes()).unwrap().is_none());
    assert_eq!(
        s.get(Tree::Inodes, &(n - 1).to_be_bytes()).unwrap(),
        Some((n - 1).to_le_bytes().to_vec())
    );
}

/// Batch i writes key i and removes key i - 1 when i is odd.
fn logged_batches(s: &dyn MetaStore, n: u64) {
    for i in 0..n {
        let mut b = Batch::new();
        b.put(
            Tree::Inodes,
            i.to_be_bytes().to_vec(),
            i.to_le_bytes().to_vec(),
        );
        if i % 2 == 1 {
            b.remove(Tree::Inodes, (i - 1).to_be_bytes().to_vec());
        }
        s.apply(&b).unwrap();
    }
}

#[test]
fn answered_changes_survive_a_crash_through_the_change_log() {
    let dir = tempfile::tempdir().unwrap();
    // A durable store that loses everything it was given: what the
    // change log holds is all there is after the "crash" (the store is
    // leaked, as a killed process would leave it: nothing flushed).
    let lost = Arc::new(MemStore::new());
    let s = WriteBehind::open_logged(lost, dir.path()).unwrap();
    logged_batches(&s, 2000);
    std::mem::forget(s);
    let fresh = Arc::new(MemStore::new());
    let s = WriteBehind::open_logged(fresh.clone(), dir.path()).unwrap();
    holds_logged_batches(&s, 2000);
    // Replayed into the durable store too, and the old log removed: a
    // second reopen over the same store finds nothing more to apply.
    holds_logged_batches(&*fresh, 2000);
    drop(s);
    let s = WriteBehind::open_logged(fresh, dir.path()).unwrap();
    holds_logged_batches(&s, 2000);
    let logs = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(logs, 1, "only the new generation's log is left");
}

#[test]
fn a_logged_store_reopened_on_sled_has_everything() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    {
        let s = WriteBehind::open_logged(Arc::new(SledStore::open(&db).unwrap()), &db).unwrap();
        logged_batches(&s, 1000);
        s.flush().unwrap();
    }
    let s = WriteBehind::open_logged(Arc::new(reopen(&db)), &db).unwrap();
    holds_logged_batches(&s, 1000);
}
