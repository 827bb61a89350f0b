//! Directory delegations through a real server: grants, recalls, batches
//! of operations answered by the holder, and what happens when the holder
//! goes away.

mod common;

use std::time::{Duration, Instant};

use common::{Node, TestServer, fsck};
use migfs_meta::Config;
use migfs_proto::meta as pb;
use pb::invalidation::Kind;
use tokio_stream::StreamExt;

const ROOT: u64 = 1;

fn config() -> Config {
    Config {
        delegate_quiet: Duration::from_millis(200),
        recall_wait: Duration::from_secs(5),
        ..Config::default()
    }
}

async fn watch(n: &mut Node) -> tonic::Streaming<pb::Invalidation> {
    n.c.watch(pb::WatchRequest { session_id: n.sid })
        .await
        .unwrap()
        .into_inner()
}

/// open(O_CREAT) of `name` in `dir`, asking for the delegation.
async fn create_asking(n: &mut Node, dir: u64, name: &str) -> pb::EntryReply {
    n.c.mknod(pb::MknodRequest {
        session_id: n.sid,
        parent: dir,
        name: name.into(),
        mode: 0o100_644,
        open: true,
        want_delegation: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn lookup_as(n: &mut Node, dir: u64, name: &str) -> Result<pb::Attr, tonic::Status> {
    n.c.lookup(pb::LookupRequest {
        parent: dir,
        name: name.into(),
        session_id: n.sid,
    })
    .await
    .map(|r| r.into_inner())
}

async fn lease(n: &mut Node, count: u32) -> Vec<u64> {
    n.c.lease_inodes(pb::LeaseInodesRequest {
        session_id: n.sid,
        count,
    })
    .await
    .unwrap()
    .into_inner()
    .inos
}

fn new_file(dir: u64, name: &str, ino: u64, open: bool) -> pb::DirOp {
    let now = migfs_meta::db::now_ns();
    pb::DirOp {
        op: Some(pb::dir_op::Op::Create(pb::NewFile {
            parent: dir,
            name: name.into(),
            attr: Some(pb::Attr {
                ino,
                mode: 0o100_600,
                nlink: 1,
                uid: 7,
                gid: 8,
                atime_ns: now,
                mtime_ns: now,
                ctime_ns: now,
                crtime_ns: now,
                ..Default::default()
            }),
            open,
        })),
    }
}

fn removed(dir: u64, name: &str, ino: u64) -> pb::DirOp {
    pb::DirOp {
        op: Some(pb::dir_op::Op::Unlink(pb::RemovedName {
            parent: dir,
            name: name.into(),
            ino,
            time_ns: migfs_meta::db::now_ns(),
        })),
    }
}

async fn batch(n: &mut Node, ops: Vec<pb::DirOp>, release: Vec<u64>) -> Vec<i32> {
    n.c.dir_batch(pb::DirBatchRequest {
        session_id: n.sid,
        ops,
        release,
    })
    .await
    .unwrap()
    .into_inner()
    .errno
}

/// Reads `stream` until an invalidation of `kind` for `ino`.
async fn until(stream: &mut tonic::Streaming<pb::Invalidation>, kind: Kind, ino: u64) {
    let wait = async {
        while let Some(Ok(inv)) = stream.next().await {
            if inv.kind == kind as i32 && inv.ino == ino {
                return;
            }
        }
        panic!("the stream ended before {kind:?} of {ino}");
    };
    tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap_or_else(|_| panic!("no {kind:?} of {ino} within 5 s"));
}

#[tokio::test]
async fn a_recall_waits_for_what_the_holder_queued_before_answering() {
    let s = TestServer::start(config()).await;
    let (mut a, mut b) = (s.node("a").await, s.node("b").await);
    let mut a_events = watch(&mut a).await;
    let mut b_events = watch(&mut b).await;
    let d = a.mkdir(ROOT, "d").await;
    // Nothing is granted in the server's first quiet time.
    assert!(!create_asking(&mut a, d.ino, "early").await.delegated);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(create_asking(&mut a, d.ino, "x").await.delegated);
    // The other session is told to forget the directory's names.
    until(&mut b_events, Kind::ForgetDir, d.ino).await;
    // b looks for a name a has not sent yet: the lookup waits for the recall.
    let d_ino = d.ino;
    let b_looks = tokio::spawn(async move {
        let r = lookup_as(&mut b, d_ino, "y").await;
        (b, r)
    });
    until(&mut a_events, Kind::Recall, d.ino).await;
    assert!(!b_looks.is_finished(), "b was answered during the recall");
    let inos = lease(&mut a, 4).await;
    assert_eq!(inos.len(), 4);
    let errs = batch(
        &mut a,
        vec![new_file(d.ino, "y", inos[0], true)],
        vec![d.ino],
    )
    .await;
    assert_eq!(errs, [0]);
    // Given back, and b not answered yet perhaps: a cannot take it again
    // while b waits for it.
    assert!(!create_asking(&mut a, d.ino, "w").await.delegated);
    let (mut b, found) = b_looks.await.unwrap();
    let y = found.expect("b does not see the name a made before giving the directory back");
    assert_eq!((y.ino, y.mode, y.uid, y.gid), (inos[0], 0o100_600, 7, 8));
    // b read the directory just now: a is not granted it again yet.
    assert!(!create_asking(&mut a, d.ino, "z").await.delegated);
    assert!(lookup_as(&mut b, d.ino, "z").await.is_ok());
    a.release(y.ino).await.unwrap();
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn a_batch_applies_each_operation_on_its_own() {
    let s = TestServer::start(config()).await;
    let mut a = s.node("a").await;
    let _events = watch(&mut a).await;
    let d = a.mkdir(ROOT, "d").await;
    let taken = a.create(d.ino, "taken").await;
    let inos = lease(&mut a, 8).await;
    let errs = batch(
        &mut a,
        vec![
            new_file(d.ino, "one", inos[0], false),
            // The name exists: refused, the rest goes on.
            new_file(d.ino, "taken", inos[1], false),
            // An inode number in use: refused.
            new_file(d.ino, "two", taken.ino, false),
            new_file(d.ino, "three", inos[2], false),
            // Removed as seen, then made again under a new number.
            removed(d.ino, "one", inos[0]),
            new_file(d.ino, "one", inos[3], false),
            // The holder saw another inode there: refused.
            removed(d.ino, "taken", inos[4]),
            removed(d.ino, "missing", inos[5]),
        ],
        vec![],
    )
    .await;
    assert_eq!(
        errs,
        [
            0,
            libc::EEXIST,
            libc::EEXIST,
            0,
            0,
            0,
            libc::ENOENT,
            libc::ENOENT
        ]
    );
    let mut names = a.names(d.ino).await;
    names.sort();
    assert_eq!(names, ["one", "taken", "three"]);
    assert_eq!(a.lookup(d.ino, "one").await.unwrap().ino, inos[3]);
    assert_eq!(a.lookup(d.ino, "taken").await.unwrap().ino, taken.ino);
    let dir = a.getattr(d.ino).await.unwrap();
    assert_eq!(dir.nlink, 2);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    // Leased numbers are never given out again.
    let more = lease(&mut a, 8).await;
    assert!(more.iter().all(|i| !inos.contains(i)));
}

#[tokio::test]
async fn a_holder_without_a_watch_stream_holds_nobody_up() {
    let s = TestServer::start(config()).await;
    let (mut a, mut b) = (s.node("a").await, s.node("b").await);
    let a_events = watch(&mut a).await;
    let d = a.mkdir(ROOT, "d").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(create_asking(&mut a, d.ino, "x").await.delegated);
    // The holder's node dies: its stream goes.
    drop(a_events);
    let t = Instant::now();
    loop {
        // The server notices the closed stream when it next writes to it,
        // or at once when the connection drops; either way b is answered
        // well before the recall wait ends.
        if lookup_as(&mut b, d.ino, "x").await.is_ok() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "waited {:?}",
        t.elapsed()
    );
    // And a session that never watched is never granted anything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = s.node("c").await;
    let e = c.mkdir(ROOT, "e").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!create_asking(&mut c, e.ino, "y").await.delegated);
}
