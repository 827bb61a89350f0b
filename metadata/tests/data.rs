//! Block maps, truncate, reference counts and GC, fallocate, xattrs and
//! statfs through a real server.

mod common;

use common::{TestServer, errno, fsck, h};
use migfs_meta::Config;
use migfs_proto::meta as pb;

const ROOT: u64 = 1;
const BS: u64 = 65536;
const FULL: u32 = 65536;

async fn claim(c: &mut common::Client, node: u64) -> Vec<Vec<u8>> {
    let req = pb::GcClaimRequest {
        node_id: node,
        limit: 0,
    };
    c.gc_claim(req).await.unwrap().into_inner().hashes
}

#[tokio::test]
async fn commit_and_get_blocks() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let f = n.create(ROOT, "f").await;
    let a = n
        .commit(f.ino, &[(0, h(1), FULL), (2, h(2), 10)], 2 * BS + 10)
        .await
        .unwrap();
    assert_eq!((a.size, a.data_version), (2 * BS + 10, 1));
    assert!(a.mtime_ns >= f.mtime_ns && a.ctime_ns >= f.ctime_ns);
    let r = n.blocks(f.ino).await;
    assert_eq!(r.attr.unwrap().size, 2 * BS + 10);
    let got: Vec<(u64, Vec<u8>, u32, Vec<u64>)> = r
        .blocks
        .into_iter()
        .map(|b| (b.index, b.hash, b.len, b.holders))
        .collect();
    assert_eq!(
        got,
        [
            (0, h(1).to_vec(), FULL, vec![n.id]),
            (2, h(2).to_vec(), 10, vec![n.id])
        ]
    );
    // A range.
    let req = pb::GetBlocksRequest {
        ino: f.ino,
        first_index: 1,
        count: 1,
    };
    assert!(
        n.c.get_blocks(req)
            .await
            .unwrap()
            .into_inner()
            .blocks
            .is_empty()
    );
    let req = pb::GetBlocksRequest {
        ino: f.ino,
        first_index: 1,
        count: 5,
    };
    assert_eq!(
        n.c.get_blocks(req).await.unwrap().into_inner().blocks.len(),
        1
    );
    // Smaller min_size never shrinks; explicit mtime is kept.
    let req = pb::CommitBlocksRequest {
        session_id: n.sid,
        ino: f.ino,
        holders: vec![n.id],
        min_size: 5,
        mtime_ns: Some(1234),
        ..Default::default()
    };
    let a = n.c.commit_blocks(req).await.unwrap().into_inner();
    assert_eq!((a.size, a.mtime_ns, a.data_version), (2 * BS + 10, 1234, 2));
    // expect_version.
    let req = |v| pb::CommitBlocksRequest {
        session_id: n.sid,
        ino: f.ino,
        holders: vec![n.id],
        expect_version: v,
        ..Default::default()
    };
    let (stale, fresh) = (req(1), req(2));
    assert_eq!(errno(n.c.commit_blocks(stale).await), libc::ESTALE);
    assert_eq!(
        n.c.commit_blocks(fresh)
            .await
            .unwrap()
            .into_inner()
            .data_version,
        3
    );
    // Validation.
    let bad_hash = pb::CommitBlocksRequest {
        session_id: n.sid,
        ino: f.ino,
        holders: vec![n.id],
        blocks: vec![pb::BlockRef {
            index: 0,
            hash: vec![1; 31],
            len: 1,
            holders: vec![],
        }],
        ..Default::default()
    };
    assert_eq!(errno(n.c.commit_blocks(bad_hash).await), libc::EINVAL);
    assert_eq!(
        errno(n.commit(f.ino, &[(0, h(3), 0)], 0).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(n.commit(f.ino, &[(0, h(3), FULL + 1)], 0).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(n.commit(f.ino, &[(u64::MAX, h(3), 1)], 0).await),
        libc::EFBIG
    );
    assert_eq!(
        errno(n.commit(ROOT, &[(0, h(3), 1)], 0).await),
        libc::EISDIR
    );
    assert_eq!(
        errno(n.commit(777_777, &[(0, h(3), 1)], 0).await),
        libc::ENOENT
    );
    assert_eq!(errno(n.commit(0, &[], 0).await), libc::EINVAL);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn truncate_drops_and_cuts_blocks() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let f = n.create(ROOT, "f").await;
    n.commit(
        f.ino,
        &[(0, h(1), FULL), (1, h(2), FULL), (2, h(3), FULL)],
        3 * BS,
    )
    .await
    .unwrap();
    let a = n.truncate(f.ino, BS + 100).await;
    assert_eq!((a.size, a.data_version), (BS + 100, 2));
    let blocks: Vec<(u64, u32)> = n
        .blocks(f.ino)
        .await
        .blocks
        .iter()
        .map(|b| (b.index, b.len))
        .collect();
    assert_eq!(blocks, [(0, FULL), (1, 100)]);
    // The dropped block's hash is garbage now; the cut one is still referenced.
    assert_eq!(claim(&mut n.c, n.id).await, [h(3).to_vec()]);
    // Growing again leaves the cut block cut (the bytes past 100 read as zeros).
    assert_eq!(n.truncate(f.ino, 3 * BS).await.size, 3 * BS);
    let blocks: Vec<(u64, u32)> = n
        .blocks(f.ino)
        .await
        .blocks
        .iter()
        .map(|b| (b.index, b.len))
        .collect();
    assert_eq!(blocks, [(0, FULL), (1, 100)]);
    // Truncating exactly at a block boundary drops the block there.
    let a = n.truncate(f.ino, BS).await;
    assert_eq!(a.size, BS);
    assert_eq!(n.blocks(f.ino).await.blocks.len(), 1);
    n.truncate(f.ino, 0).await;
    assert!(n.blocks(f.ino).await.blocks.is_empty());
    let mut got = claim(&mut n.c, n.id).await;
    got.sort();
    assert_eq!(got, [h(1).to_vec(), h(2).to_vec(), h(3).to_vec()]);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn refcounts_move_blocks_to_gc_and_back() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    let g = a.create(ROOT, "g").await;
    a.commit(f.ino, &[(0, h(9), FULL), (1, h(9), FULL)], 2 * BS)
        .await
        .unwrap();
    b.commit(g.ino, &[(0, h(9), FULL)], BS).await.unwrap();
    // Both nodes hold the shared block.
    assert_eq!(a.blocks(g.ino).await.blocks[0].holders, [a.id, b.id]);
    a.unlink(ROOT, "f").await.unwrap();
    assert!(
        claim(&mut a.c, a.id).await.is_empty(),
        "still referenced by g"
    );
    // Overwrite g's block: the last reference goes.
    b.commit(g.ino, &[(0, h(10), FULL)], BS).await.unwrap();
    assert_eq!(claim(&mut a.c, a.id).await, [h(9).to_vec()]);
    assert_eq!(claim(&mut b.c, b.id).await, [h(9).to_vec()]);
    let other = s.node("c").await;
    assert!(claim(&mut b.c, other.id).await.is_empty());
    // a deletes its copy.
    let done = pb::GcDoneRequest {
        node_id: a.id,
        hashes: vec![h(9).to_vec()],
    };
    a.c.gc_done(done).await.unwrap();
    assert!(claim(&mut a.c, a.id).await.is_empty());
    assert_eq!(claim(&mut b.c, b.id).await, [h(9).to_vec()]);
    // Committed again while in gc: back out of gc, holders exactly the committer.
    a.commit(g.ino, &[(1, h(9), FULL)], 2 * BS).await.unwrap();
    assert!(claim(&mut b.c, b.id).await.is_empty());
    assert_eq!(a.blocks(g.ino).await.blocks[1].holders, [a.id]);
    // Done for a hash not in gc changes nothing; bad hashes are refused.
    let done = pb::GcDoneRequest {
        node_id: b.id,
        hashes: vec![h(9).to_vec()],
    };
    b.c.gc_done(done).await.unwrap();
    assert_eq!(a.blocks(g.ino).await.blocks[1].holders, [a.id]);
    let bad = pb::GcDoneRequest {
        node_id: b.id,
        hashes: vec![vec![0; 3]],
    };
    assert_eq!(errno(b.c.gc_done(bad).await), libc::EINVAL);
    assert_eq!(
        errno(
            b.c.gc_claim(pb::GcClaimRequest {
                node_id: 0,
                limit: 1
            })
            .await
        ),
        libc::EINVAL
    );
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn fallocate_modes() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let f = n.create(ROOT, "f").await;
    let req = |offset, length, mode| pb::FallocateRequest {
        session_id: n.sid,
        ino: f.ino,
        offset,
        length,
        mode,
    };
    let (grow, keep, punch, small, zero) = (
        req(100, 900, 0),
        req(0, 5000, 1),
        req(0, 10, 3),
        req(0, 10, 0),
        req(0, 0, 0),
    );
    let a = n.c.fallocate(grow).await.unwrap().into_inner();
    assert_eq!(a.size, 1000);
    assert!(a.mtime_ns >= f.mtime_ns);
    assert_eq!(n.c.fallocate(keep).await.unwrap().into_inner().size, 1000);
    assert_eq!(n.c.fallocate(small).await.unwrap().into_inner().size, 1000);
    assert_eq!(errno(n.c.fallocate(punch).await), libc::EOPNOTSUPP);
    assert_eq!(errno(n.c.fallocate(zero).await), libc::EINVAL);
    assert!(n.blocks(f.ino).await.blocks.is_empty());
}

#[tokio::test]
async fn xattrs() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let f = n.create(ROOT, "f").await;
    let sid = n.sid;
    let set = |name: &[u8], value: &[u8], flags| pb::SetXattrRequest {
        session_id: sid,
        ino: f.ino,
        name: name.to_vec(),
        value: value.to_vec(),
        flags,
    };
    let get = |name: &[u8]| pb::XattrRequest {
        session_id: sid,
        ino: f.ino,
        name: name.to_vec(),
    };
    assert_eq!(
        errno(n.c.set_xattr(set(b"user.a", b"1", 2)).await),
        libc::ENODATA
    );
    n.c.set_xattr(set(b"user.a", b"1", 1)).await.unwrap();
    assert_eq!(
        errno(n.c.set_xattr(set(b"user.a", b"2", 1)).await),
        libc::EEXIST
    );
    n.c.set_xattr(set(b"user.a", b"2", 2)).await.unwrap();
    n.c.set_xattr(set(b"user.b", b"", 0)).await.unwrap();
    assert_eq!(
        n.c.get_xattr(get(b"user.a"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b"2"
    );
    assert_eq!(
        n.c.get_xattr(get(b"user.b"))
            .await
            .unwrap()
            .into_inner()
            .value,
        b""
    );
    assert_eq!(errno(n.c.get_xattr(get(b"user.none")).await), libc::ENODATA);
    assert_eq!(
        errno(n.c.set_xattr(set(&[b'n'; 256], b"", 0)).await),
        libc::ERANGE
    );
    assert_eq!(
        errno(n.c.set_xattr(set(b"user.big", &vec![0; 65537], 0)).await),
        libc::E2BIG
    );
    n.c.set_xattr(set(b"user.max", &vec![7; 65536], 0))
        .await
        .unwrap();
    let names =
        n.c.list_xattr(pb::InoRequest { ino: f.ino })
            .await
            .unwrap()
            .into_inner()
            .names;
    assert_eq!(
        names,
        [b"user.a".to_vec(), b"user.b".to_vec(), b"user.max".to_vec()]
    );
    let before = n.getattr(f.ino).await.unwrap().ctime_ns;
    n.c.remove_xattr(get(b"user.a")).await.unwrap();
    assert!(n.getattr(f.ino).await.unwrap().ctime_ns >= before);
    assert_eq!(errno(n.c.remove_xattr(get(b"user.a")).await), libc::ENODATA);
    assert_eq!(errno(n.c.get_xattr(get(b"user.a")).await), libc::ENODATA);
    // Deleting the file deletes its xattrs.
    n.unlink(ROOT, "f").await.unwrap();
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn statfs_counts_up_nodes_and_inodes() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let _b = s.node("b").await;
    a.create(ROOT, "f").await;
    a.mkdir(ROOT, "d").await;
    let st = a.c.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        (
            st.block_size,
            st.total_bytes,
            st.free_bytes,
            st.files,
            st.name_max
        ),
        (BS, 2000, 1200, 3, 255)
    );
    assert!(st.files_free >= 1 << 40);
    let hb = pb::HeartbeatRequest {
        session_id: a.sid,
        capacity_bytes: 5000,
        free_bytes: 100,
    };
    a.c.heartbeat(hb).await.unwrap();
    let st = a.c.stat_fs(pb::Empty {}).await.unwrap().into_inner();
    assert_eq!((st.total_bytes, st.free_bytes), (6000, 700));
    a.unlink(ROOT, "f").await.unwrap();
    assert_eq!(
        a.c.stat_fs(pb::Empty {}).await.unwrap().into_inner().files,
        2
    );
    a.c.sync(pb::Empty {}).await.unwrap();
}
