//! Namespace operations through a real server: names, create, link,
//! unlink, rmdir, rename, readdir cookies, setattr.

mod common;

use common::{TestServer, errno, fsck};
use migfs_meta::Config;
use migfs_proto::meta as pb;

const ROOT: u64 = 1;

#[tokio::test]
async fn root_exists_after_first_open() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let root = n.getattr(ROOT).await.unwrap();
    assert_eq!(
        (root.mode, root.uid, root.gid, root.nlink),
        (0o40755, 0, 0, 2)
    );
    assert!(n.names(ROOT).await.is_empty());
    assert_eq!(errno(n.getattr(0).await), libc::EINVAL);
    assert_eq!(errno(n.getattr(999_999).await), libc::ENOENT);
}

#[tokio::test]
async fn names_are_checked() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        assert_eq!(
            errno(n.try_mknod(ROOT, bad, 0o100_644).await),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    assert_eq!(
        errno(n.try_mknod(ROOT, &[b'x'; 256], 0o100_644).await),
        libc::ENAMETOOLONG
    );
    n.try_mknod(ROOT, &[b'x'; 255], 0o100_644).await.unwrap();
    assert_eq!(errno(n.lookup(ROOT, "missing").await), libc::ENOENT);
    let f = n.create(ROOT, "file").await;
    assert_eq!(errno(n.lookup(f.ino, "x").await), libc::ENOTDIR);
    assert_eq!(
        errno(n.try_mknod(f.ino, b"x", 0o100_644).await),
        libc::ENOTDIR
    );
    assert_eq!(errno(n.lookup(0, "x").await), libc::EINVAL);
    // mknod refuses directory and symlink types.
    assert_eq!(
        errno(n.try_mknod(ROOT, b"d", 0o040_755).await),
        libc::EINVAL
    );
}

#[tokio::test]
async fn create_sets_links_times_and_parent() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let before = n.getattr(ROOT).await.unwrap();
    let d = n.mkdir(ROOT, "d").await;
    assert_eq!((d.mode, d.nlink, d.uid, d.gid), (0o40755, 2, 1000, 1000));
    assert_eq!(d.atime_ns, d.mtime_ns);
    assert_eq!(d.mtime_ns, d.ctime_ns);
    let root = n.getattr(ROOT).await.unwrap();
    assert_eq!(root.nlink, 3);
    assert!(root.mtime_ns >= before.mtime_ns && root.mtime_ns == root.ctime_ns);
    assert!(root.mtime_ns >= d.mtime_ns);
    let f = n.create(d.ino, "f").await;
    assert_eq!((f.mode, f.nlink, f.size), (0o100_644, 1, 0));
    // Type 0 means a regular file.
    let g = n.try_mknod(d.ino, b"g", 0o600).await.unwrap();
    assert_eq!(g.mode, 0o100_600);
    let fifo = n.try_mknod(d.ino, b"fifo", 0o010_600).await.unwrap();
    assert_eq!(fifo.mode, 0o010_600);
    assert_eq!(
        errno(n.try_mknod(d.ino, b"f", 0o100_644).await),
        libc::EEXIST
    );
    assert_eq!(errno(n.try_mkdir(d.ino, b"f").await), libc::EEXIST);
    assert_eq!(n.lookup(d.ino, "f").await.unwrap().ino, f.ino);
    assert_eq!(n.getattr(d.ino).await.unwrap().nlink, 2);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn setgid_directory_passes_its_group_on() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let d = n.mkdir(ROOT, "shared").await;
    let req = pb::SetAttrRequest {
        session_id: n.sid,
        ino: d.ino,
        mode: Some(0o2775),
        gid: Some(50),
        ..Default::default()
    };
    let d = n.c.set_attr(req).await.unwrap().into_inner();
    assert_eq!((d.mode, d.gid), (0o42775, 50));
    let f = n.create(d.ino, "f").await;
    assert_eq!((f.gid, f.mode & 0o2000), (50, 0));
    let sub = n.mkdir(d.ino, "sub").await;
    assert_eq!((sub.gid, sub.mode), (50, 0o42755));
    let plain = n.mkdir(ROOT, "plain").await;
    assert_eq!(plain.gid, 1000);
}

#[tokio::test]
async fn symlink_and_readlink() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let req = |name: &str, target: &[u8]| pb::SymlinkRequest {
        session_id: n.sid,
        parent: ROOT,
        name: name.into(),
        target: target.to_vec(),
        uid: 7,
        gid: 8,
    };
    let (ok, empty) = (req("l", b"../some/where"), req("e", b""));
    let r = n.c.symlink(ok).await.unwrap().into_inner();
    let (l, p) = (r.attr.unwrap(), r.parent.unwrap());
    assert_eq!((l.mode, l.size, l.uid, l.nlink), (0o120_777, 13, 7, 1));
    // The reply carries the directory as it is after the change.
    assert_eq!(p.ino, ROOT);
    assert_eq!((p.mtime_ns, p.ctime_ns), (l.ctime_ns, l.ctime_ns));
    assert_eq!(n.getattr(ROOT).await.unwrap(), p);
    let t =
        n.c.readlink(pb::InoRequest { ino: l.ino })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(t.target, b"../some/where");
    assert_eq!(errno(n.c.symlink(empty).await), libc::ENOENT);
    let f = n.create(ROOT, "f").await;
    assert_eq!(
        errno(n.c.readlink(pb::InoRequest { ino: f.ino }).await),
        libc::EINVAL
    );
}

#[tokio::test]
async fn link_unlink_rmdir_rules() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let d = n.mkdir(ROOT, "d").await;
    let f = n.create(ROOT, "f").await;
    let link = |ino: u64, name: &str| pb::LinkRequest {
        session_id: n.sid,
        ino,
        new_parent: d.ino,
        new_name: name.into(),
    };
    let (l1, l2, l3) = (link(f.ino, "f2"), link(d.ino, "dd"), link(f.ino, "f2"));
    let r = n.c.link(l1).await.unwrap().into_inner();
    let a = r.attr.unwrap();
    assert_eq!((a.ino, a.nlink), (f.ino, 2));
    assert_eq!(r.parent.unwrap(), n.getattr(d.ino).await.unwrap());
    assert_eq!(errno(n.c.link(l2).await), libc::EPERM);
    assert_eq!(errno(n.c.link(l3).await), libc::EEXIST);
    assert_eq!(errno(n.unlink(ROOT, "d").await), libc::EISDIR);
    assert_eq!(errno(n.rmdir(ROOT, "f").await), libc::ENOTDIR);
    assert_eq!(errno(n.rmdir(ROOT, "d").await), libc::ENOTEMPTY);
    assert_eq!(errno(n.unlink(ROOT, "nothing").await), libc::ENOENT);
    n.unlink(ROOT, "f").await.unwrap();
    let a = n.getattr(f.ino).await.unwrap();
    assert_eq!(a.nlink, 1);
    assert!(a.ctime_ns >= f.ctime_ns);
    n.unlink(d.ino, "f2").await.unwrap();
    assert_eq!(errno(n.getattr(f.ino).await), libc::ENOENT);
    n.rmdir(ROOT, "d").await.unwrap();
    assert_eq!(errno(n.getattr(d.ino).await), libc::ENOENT);
    assert_eq!(n.getattr(ROOT).await.unwrap().nlink, 2);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn rename_refusals() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let a = n.mkdir(ROOT, "a").await;
    let b = n.mkdir(a.ino, "b").await;
    n.mkdir(ROOT, "full").await;
    let full = n.lookup(ROOT, "full").await.unwrap();
    n.create(full.ino, "x").await;
    n.mkdir(ROOT, "empty").await;
    n.create(ROOT, "f").await;
    let r = (ROOT, "a");
    assert_eq!(
        errno(n.rename((ROOT, "nope"), (ROOT, "z"), 0).await),
        libc::ENOENT
    );
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, "empty"), 0).await),
        libc::EISDIR
    );
    assert_eq!(errno(n.rename(r, (ROOT, "f"), 0).await), libc::ENOTDIR);
    assert_eq!(errno(n.rename(r, (ROOT, "full"), 0).await), libc::ENOTEMPTY);
    assert_eq!(errno(n.rename(r, (b.ino, "inside"), 0).await), libc::EINVAL);
    assert_eq!(errno(n.rename(r, (a.ino, "self"), 0).await), libc::EINVAL);
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, "empty"), 1).await),
        libc::EEXIST
    );
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, "none"), 2).await),
        libc::ENOENT
    );
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, "g"), 3).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, "g"), 4).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(n.rename((ROOT, "f"), (ROOT, ".."), 0).await),
        libc::EINVAL
    );
    // Nothing changed.
    let mut names = n.names(ROOT).await;
    names.sort();
    assert_eq!(names, ["a", "empty", "f", "full"]);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn rename_moves_replaces_and_exchanges() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let a = n.mkdir(ROOT, "a").await;
    let b = n.mkdir(ROOT, "b").await;
    let sub = n.mkdir(a.ino, "sub").await;
    let f = n.create(a.ino, "f").await;
    let g = n.create(b.ino, "g").await;
    // Same inode under both names: success, nothing changes.
    let l = pb::LinkRequest {
        session_id: n.sid,
        ino: f.ino,
        new_parent: a.ino,
        new_name: "f-link".into(),
    };
    n.c.link(l).await.unwrap();
    n.rename((a.ino, "f"), (a.ino, "f-link"), 0).await.unwrap();
    assert_eq!(n.getattr(f.ino).await.unwrap().nlink, 2);
    n.unlink(a.ino, "f-link").await.unwrap();
    // Move a directory across parents: parent pointer, nlinks, new cookie.
    let cookie_before = n
        .readdir(a.ino, 0, 100)
        .await
        .entries
        .iter()
        .find(|e| e.name == b"sub")
        .unwrap()
        .cookie;
    n.rename((a.ino, "sub"), (b.ino, "moved"), 0).await.unwrap();
    assert_eq!(n.getattr(a.ino).await.unwrap().nlink, 2);
    assert_eq!(n.getattr(b.ino).await.unwrap().nlink, 3);
    let moved = n
        .readdir(b.ino, 0, 100)
        .await
        .entries
        .into_iter()
        .find(|e| e.name == b"moved")
        .unwrap();
    assert_eq!(moved.attr.unwrap().ino, sub.ino);
    assert!(moved.cookie > cookie_before);
    n.create(sub.ino, "deep").await;
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    // Replace a file: the old target is gone.
    n.rename((a.ino, "f"), (b.ino, "g"), 0).await.unwrap();
    assert_eq!(errno(n.getattr(g.ino).await), libc::ENOENT);
    assert_eq!(n.lookup(b.ino, "g").await.unwrap().ino, f.ino);
    assert_eq!(errno(n.lookup(a.ino, "f").await), libc::ENOENT);
    // Replace an empty directory with a directory.
    let e = n.mkdir(a.ino, "empty").await;
    n.rename((b.ino, "moved"), (a.ino, "empty"), 0)
        .await
        .unwrap();
    assert_eq!(errno(n.getattr(e.ino).await), libc::ENOENT);
    assert_eq!(n.getattr(a.ino).await.unwrap().nlink, 3);
    assert_eq!(n.getattr(b.ino).await.unwrap().nlink, 2);
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
    // Exchange a directory (in a) and a file (in b).
    let t0 = n.getattr(sub.ino).await.unwrap().ctime_ns;
    n.rename((a.ino, "empty"), (b.ino, "g"), 2).await.unwrap();
    assert_eq!(n.lookup(a.ino, "empty").await.unwrap().ino, f.ino);
    assert_eq!(n.lookup(b.ino, "g").await.unwrap().ino, sub.ino);
    assert_eq!(n.getattr(a.ino).await.unwrap().nlink, 2);
    assert_eq!(n.getattr(b.ino).await.unwrap().nlink, 3);
    assert!(n.getattr(sub.ino).await.unwrap().ctime_ns >= t0);
    assert_eq!(n.names(sub.ino).await, ["deep"]);
    // Exchanging a directory into its own subtree is refused.
    n.mkdir(sub.ino, "kid").await;
    assert_eq!(
        errno(n.rename((b.ino, "g"), (sub.ino, "kid"), 2).await),
        libc::EINVAL
    );
    assert!(fsck(&s.db).is_empty(), "{:?}", fsck(&s.db));
}

#[tokio::test]
async fn readdir_cookies_stay_valid_while_entries_come_and_go() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let d = n.mkdir(ROOT, "d").await;
    for i in 0..50 {
        n.create(d.ino, &format!("f{i:02}")).await;
    }
    let first = n.readdir(d.ino, 0, 10).await;
    assert_eq!(first.entries.len(), 10);
    assert!(!first.eof);
    assert!(
        first
            .entries
            .iter()
            .all(|e| e.cookie > 2 && e.attr.is_some())
    );
    let seen: Vec<String> = first
        .entries
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    // Between pages: remove some seen and unseen entries, add new ones,
    // rename a seen entry (it comes back later under its new name).
    for name in ["f00", "f03", "f20", "f21", "f49"] {
        n.unlink(d.ino, name).await.unwrap();
    }
    n.create(d.ino, "new1").await;
    n.rename((d.ino, "f05"), (d.ino, "renamed"), 0)
        .await
        .unwrap();
    let mut after = first.entries.last().unwrap().cookie;
    let mut rest = Vec::new();
    loop {
        let page = n.readdir(d.ino, after, 10).await;
        for e in &page.entries {
            assert!(e.cookie > after);
            after = e.cookie;
            rest.push(String::from_utf8(e.name.clone()).unwrap());
        }
        if page.eof {
            break;
        }
    }
    let expect: Vec<String> = (10..50)
        .filter(|i| ![20, 21, 49].contains(i))
        .map(|i| format!("f{i:02}"))
        .chain(["new1".to_string(), "renamed".to_string()])
        .collect();
    assert_eq!(rest, expect);
    assert!(seen.iter().all(|s| !rest.contains(s)));
    // A cookie past the end, or of a removed entry, still works.
    assert!(n.readdir(d.ino, u64::MAX, 10).await.eof);
    let f = n.create(ROOT, "file").await;
    let req = pb::ReadDirRequest {
        session_id: 0,
        ino: f.ino,
        after_cookie: 0,
        limit: 0,
    };
    assert_eq!(errno(n.c.read_dir(req).await), libc::ENOTDIR);
}

#[tokio::test]
async fn setattr_changes_what_it_is_told() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let f = n.create(ROOT, "f").await;
    let base = pb::SetAttrRequest {
        session_id: n.sid,
        ino: f.ino,
        ..Default::default()
    };
    let r =
        n.c.set_attr(pb::SetAttrRequest {
            mode: Some(0o104_700),
            uid: Some(5),
            gid: Some(6),
            ..base
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.mode, r.uid, r.gid), (0o104_700, 5, 6));
    assert!(r.ctime_ns >= f.ctime_ns);
    let r =
        n.c.set_attr(pb::SetAttrRequest {
            mode: Some(0o040_777),
            ..base
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.mode, 0o100_777, "the file type never changes");
    let r =
        n.c.set_attr(pb::SetAttrRequest {
            atime_ns: Some(11),
            mtime_ns: Some(22),
            ctime_ns: Some(33),
            ..base
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.atime_ns, r.mtime_ns, r.ctime_ns), (11, 22, 33));
    let r =
        n.c.set_attr(pb::SetAttrRequest {
            atime_now: true,
            mtime_now: true,
            ..base
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.atime_ns > 1_000_000_000_000_000_000
            && r.mtime_ns == r.atime_ns
            && r.ctime_ns == r.atime_ns
    );
    let d = n.mkdir(ROOT, "d").await;
    let req = pb::SetAttrRequest {
        ino: d.ino,
        size: Some(0),
        ..base
    };
    assert_eq!(errno(n.c.set_attr(req).await), libc::EISDIR);
    let req = pb::SetAttrRequest {
        ino: 4242,
        uid: Some(0),
        ..base
    };
    assert_eq!(errno(n.c.set_attr(req).await), libc::ENOENT);
}

#[tokio::test]
async fn removals_and_renames_answer_the_directories_after_the_change() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let d = n.mkdir(ROOT, "d").await;
    n.mkdir(ROOT, "e").await;
    n.create(ROOT, "f").await;
    n.create(ROOT, "g").await;
    let name = |parent: u64, name: &str| pb::NameRequest {
        session_id: n.sid,
        parent,
        name: name.into(),
    };
    let (f, e) = (name(ROOT, "f"), name(ROOT, "e"));
    let r = n.c.unlink(f).await.unwrap().into_inner();
    assert_eq!(r.parent.unwrap(), n.getattr(ROOT).await.unwrap());
    let before = n.getattr(ROOT).await.unwrap().nlink;
    let r = n.c.rmdir(e).await.unwrap().into_inner();
    let p = r.parent.unwrap();
    assert_eq!(p.nlink, before - 1);
    assert_eq!(p, n.getattr(ROOT).await.unwrap());
    let rn = pb::RenameRequest {
        session_id: n.sid,
        parent: ROOT,
        name: "g".into(),
        new_parent: d.ino,
        new_name: "g2".into(),
        flags: 0,
    };
    let r = n.c.rename(rn).await.unwrap().into_inner();
    assert_eq!(r.parent.unwrap(), n.getattr(ROOT).await.unwrap());
    assert_eq!(r.new_parent.unwrap(), n.getattr(d.ino).await.unwrap());
}
