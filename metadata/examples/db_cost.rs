//! Time per create and unlink in the metadata database itself (no RPC):
//! `db_cost [N]`, on a write-behind sled store in a temporary directory
//! and on the in-memory store.

use std::sync::Arc;
use std::time::Instant;

use migfs_meta::ops::namei::{self, NewNode};
use migfs_meta::{Config, MemStore, MetaDb, MetaStore, SledStore, WriteBehind};

fn run(name: &str, store: Arc<dyn MetaStore>, n: u32) {
    let db = MetaDb::open(store, Config::default()).expect("open");
    let names: Vec<Vec<u8>> = (0..n).map(|i| format!("f{i}").into_bytes()).collect();
    let t = Instant::now();
    for name in &names {
        db.write(0, |t| {
            namei::mknod(
                t,
                NewNode {
                    parent: 1,
                    name,
                    mode: libc::S_IFREG | 0o644,
                    rdev: 0,
                    uid: 0,
                    gid: 0,
                    target: &[],
                    open_in: None,
                },
            )
        })
        .expect("mknod");
    }
    let create = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let t = Instant::now();
    for name in &names {
        db.write(0, |t| namei::unlink(t, 1, name)).expect("unlink");
    }
    let unlink = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("{name:>12}: create {create:.1} us, unlink {unlink:.1} us");
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = SledStore::open(&dir.path().join("db")).expect("sled");
    run(
        "write-behind",
        Arc::new(WriteBehind::open(Arc::new(disk)).expect("wb")),
        n,
    );
    run("memory", Arc::new(MemStore::new()), n);
}
