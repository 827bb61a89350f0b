//! Sessions, open files and orphans, locks, the watch stream, the cluster
//! secret and persistence, through a real server.

mod common;

use std::time::Duration;

use common::{TestServer, connect, errno, fsck, h};
use migfs_meta::Config;
use migfs_proto::meta::{self as pb, invalidation::Kind};
use tokio_stream::StreamExt;

const ROOT: u64 = 1;
const RD: i32 = 0;
const WR: i32 = 1;
const UN: i32 = 2;

#[tokio::test]
async fn unlinked_file_lives_while_open_in_another_session() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    a.commit(f.ino, &[(0, h(1), 10)], 10).await.unwrap();
    a.open(f.ino).await.unwrap();
    a.open(f.ino).await.unwrap();
    b.unlink(ROOT, "f").await.unwrap();
    assert_eq!(errno(b.lookup(ROOT, "f").await), libc::ENOENT);
    // Still there by inode, with its data.
    let attr = b.getattr(f.ino).await.unwrap();
    assert_eq!((attr.nlink, attr.size), (0, 10));
    assert_eq!(b.blocks(f.ino).await.blocks.len(), 1);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    // Another session can open it too (reopen by inode), and must close too.
    b.open(f.ino).await.unwrap();
    a.release(f.ino).await.unwrap();
    a.release(f.ino).await.unwrap();
    assert!(b.getattr(f.ino).await.is_ok(), "b still has it open");
    b.release(f.ino).await.unwrap();
    assert_eq!(errno(b.getattr(f.ino).await), libc::ENOENT);
    let claim = pb::GcClaimRequest {
        node_id: a.id,
        limit: 10,
    };
    assert_eq!(
        a.c.gc_claim(claim).await.unwrap().into_inner().hashes,
        [h(1).to_vec()]
    );
    // Release without an open, and release of a deleted inode, are harmless.
    b.release(f.ino).await.unwrap();
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn created_open_then_replaced_by_rename_is_an_orphan() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let victim = a.create_open(ROOT, "victim").await;
    b.create(ROOT, "other").await;
    b.rename((ROOT, "other"), (ROOT, "victim"), 0)
        .await
        .unwrap();
    assert_eq!(a.getattr(victim.ino).await.unwrap().nlink, 0);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    a.release(victim.ino).await.unwrap();
    assert_eq!(errno(a.getattr(victim.ino).await), libc::ENOENT);
    // Open needs a live session.
    let other = b.lookup(ROOT, "victim").await.unwrap();
    let req = pb::OpenRequest {
        session_id: 424_242,
        ino: other.ino,
    };
    assert_eq!(errno(b.c.open(req).await), libc::ESTALE);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn reregistering_ends_the_old_session() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create_open(ROOT, "f").await;
    assert!(a.lock(f.ino, 1, (0, 9), WR, false).await);
    b.unlink(ROOT, "f").await.unwrap();
    assert!(b.getattr(f.ino).await.is_ok());
    // Node "a" restarts: same node id, new session; the old one is gone.
    let a2 = s.node("a").await;
    assert_eq!(a2.id, a.id);
    assert_ne!(a2.sid, a.sid);
    assert_eq!(
        errno(b.getattr(f.ino).await),
        libc::ENOENT,
        "orphan reclaimed"
    );
    let hb = pb::HeartbeatRequest {
        session_id: a.sid,
        ..Default::default()
    };
    assert_eq!(errno(a.c.heartbeat(hb).await), libc::ESTALE);
    let nodes =
        b.c.list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n.up));
    let n = nodes.iter().find(|n| n.name == "a").unwrap();
    assert_eq!(
        (n.node_id, n.addr.as_str(), n.capacity_bytes),
        (a.id, "127.0.0.1:1", 1000)
    );
    let empty = pb::RegisterNodeRequest::default();
    assert_eq!(errno(b.c.register_node(empty).await), libc::EINVAL);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn register_reply_carries_cluster_constants() {
    let cfg = Config {
        lease: Duration::from_millis(1234),
        block_size: 4096,
        replicas: 3,
        ..Config::default()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    let req = pb::RegisterNodeRequest {
        name: "n".into(),
        ..Default::default()
    };
    let r = c.register_node(req).await.unwrap().into_inner();
    assert_eq!((r.block_size, r.lease_ms, r.replicas), (4096, 1234, 3));
    assert!(r.node_id > 0 && r.session_id > 0);
}

#[tokio::test]
async fn expired_lease_ends_the_session() {
    let cfg = Config {
        lease: Duration::from_millis(300),
        ..Config::default()
    };
    let s = TestServer::start(cfg).await;
    let mut live = s.node("live").await;
    let mut dead = s.node("dead").await;
    let f = dead.create_open(ROOT, "f").await;
    dead.unlink(ROOT, "f").await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hb = pb::HeartbeatRequest {
            session_id: live.sid,
            capacity_bytes: 1,
            free_bytes: 1,
        };
        live.c.heartbeat(hb).await.unwrap();
    }
    let nodes = live
        .c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let up: Vec<(String, bool)> = nodes.into_iter().map(|n| (n.name, n.up)).collect();
    assert!(
        up.contains(&("live".into(), true)) && up.contains(&("dead".into(), false)),
        "{up:?}"
    );
    assert_eq!(
        errno(live.getattr(f.ino).await),
        libc::ENOENT,
        "orphan of the dead session reclaimed"
    );
    let hb = pb::HeartbeatRequest {
        session_id: dead.sid,
        ..Default::default()
    };
    assert_eq!(errno(dead.c.heartbeat(hb).await), libc::ESTALE);
    let st = live.c.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(st.total_bytes, 1, "only the live node counts");
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn fcntl_locks_conflict_across_holders_and_split() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    let i = f.ino;
    assert!(a.lock(i, 1, (0, 99), WR, false).await);
    // Another session (and another owner in the same session) conflicts.
    assert!(!b.lock(i, 1, (50, 50), RD, false).await);
    assert!(!a.lock(i, 2, (99, 200), RD, false).await);
    assert!(b.lock(i, 1, (100, 200), WR, false).await, "no overlap");
    assert_eq!(b.test_lock(i, 1, (0, 10), RD).await, (WR, 0, 99, 1));
    // The holder downgrades the middle: the lock splits in three.
    assert!(a.lock(i, 1, (40, 59), RD, false).await);
    assert!(
        b.lock(i, 7, (45, 50), RD, false).await,
        "shared with a read lock"
    );
    assert_eq!(b.test_lock(i, 7, (0, 39), RD).await, (WR, 0, 39, 1));
    assert_eq!(b.test_lock(i, 7, (60, 60), RD).await, (WR, 60, 99, 1));
    // Unlock a hole; then the whole range.
    assert!(a.lock(i, 1, (0, 9), UN, false).await);
    assert_eq!(b.test_lock(i, 9, (0, 9), WR).await.0, UN);
    assert!(a.lock(i, 1, (0, u64::MAX), UN, false).await);
    assert_eq!(a.test_lock(i, 3, (0, 99), WR).await, (RD, 45, 50, 7));
    assert!(b.lock(i, 7, (0, u64::MAX), UN, false).await);
    assert!(a.lock(i, 1, (0, 99), WR, false).await);
    // Merge: adjacent write ranges of one holder become one.
    assert!(a.lock(i, 1, (100, 100), UN, false).await);
    assert!(b.lock(i, 1, (100, 200), UN, false).await);
    assert!(a.lock(i, 1, (100, 149), WR, false).await);
    assert_eq!(b.test_lock(i, 1, (0, u64::MAX), RD).await, (WR, 0, 149, 1));
    // Bad requests.
    let bad = pb::LockRequest {
        session_id: a.sid,
        ino: i,
        typ: 5,
        ..Default::default()
    };
    assert_eq!(errno(a.c.set_lock(bad).await), libc::EINVAL);
    let inverted = pb::LockRequest {
        session_id: a.sid,
        ino: i,
        start: 9,
        end: 1,
        ..Default::default()
    };
    assert_eq!(errno(a.c.set_lock(inverted).await), libc::EINVAL);
    let stale = pb::LockRequest {
        session_id: 999_999,
        ino: i,
        end: 1,
        ..Default::default()
    };
    assert_eq!(errno(a.c.set_lock(stale).await), libc::ESTALE);
}

#[tokio::test]
async fn flock_is_whole_file_and_separate_from_fcntl() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let i = a.create(ROOT, "f").await.ino;
    assert!(a.lock(i, 1, (0, 0), RD, true).await);
    assert!(b.lock(i, 2, (0, 0), RD, true).await, "two shared flocks");
    assert!(
        !b.lock(i, 2, (0, 0), WR, true).await,
        "upgrade blocked by a's shared lock"
    );
    assert!(
        b.lock(i, 2, (0, u64::MAX), WR, false).await,
        "fcntl ignores flock"
    );
    assert!(a.lock(i, 1, (0, 0), UN, true).await);
    assert!(b.lock(i, 2, (0, 0), WR, true).await, "upgrade");
    assert!(!a.lock(i, 1, (0, 0), RD, true).await);
    assert!(b.lock(i, 2, (0, 0), RD, true).await, "downgrade");
    assert!(a.lock(i, 1, (0, 0), RD, true).await);
    // The session going away drops its locks.
    assert!(!a.lock(i, 1, (5, 5), RD, false).await);
    let _b2 = s.node("b").await;
    assert!(a.lock(i, 1, (0, u64::MAX), WR, false).await);
    assert!(a.lock(i, 1, (0, 0), WR, true).await);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

async fn next(stream: &mut tonic::Streaming<pb::Invalidation>) -> pb::Invalidation {
    tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("an invalidation within 5 s")
        .expect("the stream is open")
        .unwrap()
}

fn entry(parent: u64, name: &str) -> pb::Invalidation {
    pb::Invalidation {
        kind: Kind::Entry.into(),
        parent,
        name: name.into(),
        ino: 0,
    }
}

fn inode(ino: u64) -> pb::Invalidation {
    pb::Invalidation {
        kind: Kind::Inode.into(),
        ino,
        ..Default::default()
    }
}

#[tokio::test]
async fn watch_tells_other_sessions_not_the_caller() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let mut wa =
        a.c.watch(pb::WatchRequest { session_id: a.sid })
            .await
            .unwrap()
            .into_inner();
    let mut wb =
        b.c.watch(pb::WatchRequest { session_id: b.sid })
            .await
            .unwrap()
            .into_inner();
    let f = b.create(ROOT, "f").await;
    assert_eq!(next(&mut wa).await, entry(ROOT, "f"));
    assert_eq!(next(&mut wa).await, inode(ROOT));
    a.commit(f.ino, &[(0, h(1), 1)], 1).await.unwrap();
    assert_eq!(next(&mut wb).await, inode(f.ino));
    b.unlink(ROOT, "f").await.unwrap();
    let mut got = vec![
        next(&mut wa).await,
        next(&mut wa).await,
        next(&mut wa).await,
    ];
    got.sort_by_key(|i| (i.kind, i.ino));
    assert_eq!(got, [inode(ROOT), inode(f.ino), entry(ROOT, "f")]);
    // b saw none of its own changes: the next thing it sees is a's.
    a.mkdir(ROOT, "d").await;
    assert_eq!(next(&mut wb).await, entry(ROOT, "d"));
    // Unknown session.
    let req = pb::WatchRequest { session_id: 31_337 };
    assert_eq!(errno(a.c.watch(req).await), libc::ESTALE);
    // The stream ends with the session.
    let _a2 = s.node("a").await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = wa.next().await {}
    });
    end.await.expect("the old session's stream ends");
}

#[tokio::test]
async fn a_lagging_watcher_gets_all() {
    let cfg = Config {
        watch_backlog: 16,
        lease: Duration::from_secs(300),
        ..Config::default()
    };
    let s = TestServer::start(cfg).await;
    let a = s.node("a").await;
    let mut b = s.node("b").await;
    // A watcher whose stream buffers little (1 KiB HTTP/2 window), so the
    // server, not the client's HTTP/2 buffer, falls behind. (A large
    // window of unread tiny frames trips h2's data-frame budget instead.)
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .initial_stream_window_size(Some(1 << 10))
        .connect()
        .await
        .unwrap();
    let secret = migfs_proto::auth::Secret::new(common::SECRET).unwrap();
    let mut slow =
        pb::meta_client::MetaClient::with_interceptor(ch, migfs_proto::auth::Present(secret));
    let mut wa = slow
        .watch(pb::WatchRequest { session_id: a.sid })
        .await
        .unwrap()
        .into_inner();
    // a does not read while b makes many changes.
    for i in 0..1500 {
        b.create(ROOT, &format!("f{i}")).await;
    }
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let inv = wa.next().await.expect("stream open").unwrap();
            if inv.kind == i32::from(Kind::All) {
                return;
            }
        }
    });
    found
        .await
        .expect("an ALL invalidation after falling behind");
}

#[tokio::test]
async fn wrong_or_missing_secret_is_refused() {
    let s = TestServer::start(Config::default()).await;
    let mut wrong = connect(s.addr, "not-the-secret").await;
    let st = wrong
        .get_attr(pb::InoRequest { ino: ROOT })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut bare = pb::meta_client::MetaClient::new(ch);
    let st = bare
        .get_attr(pb::InoRequest { ino: ROOT })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    let mut right = s.client().await;
    right.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap();
}

#[tokio::test]
async fn sled_server_keeps_everything_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_millis(1000);
    let cfg = Config {
        block_size: 4096,
        lease,
        ..Config::default()
    };
    let (f, node_id, sid) = {
        let s = TestServer::start_sled(dir.path(), cfg.clone()).await;
        let mut a = s.node("a").await;
        let d = a.mkdir(ROOT, "d").await;
        let f = a.create(d.ino, "f").await;
        a.commit(f.ino, &[(0, h(5), 100)], 100).await.unwrap();
        let (id, sid) = (a.id, a.sid);
        drop(a);
        s.stop().await;
        (f, id, sid)
    };
    // Down for longer than the lease: the session gets a new lease at
    // restart, so it outlives the reaper's first passes (every lease/4).
    tokio::time::sleep(lease + lease / 5).await;
    // Reopened with another block size: the stored one wins.
    let cfg = Config {
        lease,
        ..Config::default()
    };
    let s = TestServer::start_sled(dir.path(), cfg).await;
    tokio::time::sleep(lease / 2).await;
    let mut old = s.client().await;
    let hb = pb::HeartbeatRequest {
        session_id: sid,
        ..Default::default()
    };
    old.heartbeat(hb)
        .await
        .expect("the session survived the restart");
    let mut a = s.node("a").await;
    assert_eq!(a.id, node_id);
    let d = a.lookup(ROOT, "d").await.unwrap();
    assert_eq!(a.lookup(d.ino, "f").await.unwrap().ino, f.ino);
    assert_eq!(a.blocks(f.ino).await.blocks[0].len, 100);
    let st = a.c.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!((st.block_size, st.files), (4096, 3));
    let g = a.create(d.ino, "g").await;
    assert!(g.ino > f.ino, "inode numbers are never reused");
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    s.stop().await;
}

#[tokio::test]
async fn one_release_call_can_carry_many_closes() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create_open(ROOT, "f").await;
    let g = a.create_open(ROOT, "g").await;
    a.open(f.ino).await.unwrap();
    b.unlink(ROOT, "f").await.unwrap();
    b.unlink(ROOT, "g").await.unwrap();
    // Two closes of f and one of g in one call: both orphans go.
    let req = pb::ReleaseRequest {
        session_id: a.sid,
        ino: f.ino,
        also: vec![g.ino, f.ino],
    };
    a.c.release(req).await.unwrap();
    assert_eq!(errno(b.getattr(f.ino).await), libc::ENOENT);
    assert_eq!(errno(b.getattr(g.ino).await), libc::ENOENT);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}
