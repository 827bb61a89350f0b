//! Tasks (global process names, one move at a time) and the hand-over of
//! a moving process's fcntl locks, through a real server.

mod common;

use common::{TestServer, errno};
use migfs_meta::Config;
use migfs_proto::meta::{self as pb, TaskState};

const ROOT: u64 = 1;
const WR: i32 = 1;

#[tokio::test]
async fn a_task_moves_once_at_a_time_and_follows_its_process() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let b = s.node("b").await;
    let t =
        a.c.task_create(pb::TaskCreateRequest {
            node_id: a.id,
            pid: 42,
            cmd: "counter".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (t.node.as_str(), t.pid, t.state()),
        ("a", 42, TaskState::TaskRunning)
    );
    // Naming the same process again gives the same task.
    let again =
        a.c.task_create(pb::TaskCreateRequest {
            node_id: a.id,
            pid: 42,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.task_id, t.task_id);
    let begin = |from, pid, to| pb::TaskBeginMoveRequest {
        task_id: t.task_id,
        from_node: from,
        pid,
        to_node: to,
    };
    assert_eq!(
        errno(a.c.task_begin_move(begin(a.id, 41, b.id)).await),
        libc::ESTALE
    );
    assert_eq!(
        errno(a.c.task_begin_move(begin(a.id, 42, a.id)).await),
        libc::EINVAL
    );
    assert_eq!(
        errno(a.c.task_begin_move(begin(a.id, 42, 999_999)).await),
        libc::ENOENT
    );
    let m =
        a.c.task_begin_move(begin(a.id, 42, b.id))
            .await
            .unwrap()
            .into_inner();
    assert_eq!((m.state(), m.moving_to), (TaskState::TaskMoving, b.id));
    let second =
        a.c.task_begin_move(begin(a.id, 42, b.id))
            .await
            .unwrap_err();
    assert_eq!(errno::<()>(Err(second.clone())), libc::EBUSY);
    assert!(
        second.message().contains("already being moved"),
        "{}",
        second.message()
    );
    // The old process's death is not the task's while it moves or after.
    let exited = |node, pid, code| pb::TaskExitedRequest {
        task_id: t.task_id,
        node_id: node,
        pid,
        exit_code: code,
    };
    let end = |commit, pid| pb::TaskEndMoveRequest {
        task_id: t.task_id,
        commit,
        to_node: b.id,
        new_pid: pid,
    };
    // A failed move leaves it where it was.
    a.c.task_end_move(end(false, 0)).await.unwrap();
    let t1 =
        a.c.task_get(pb::TaskGetRequest { task_id: t.task_id })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        (t1.node_id, t1.pid, t1.state()),
        (a.id, 42, TaskState::TaskRunning)
    );
    a.c.task_begin_move(begin(a.id, 42, b.id)).await.unwrap();
    let t2 = a.c.task_end_move(end(true, 77)).await.unwrap().into_inner();
    assert_eq!((t2.node.as_str(), t2.pid, t2.moves), ("b", 77, 1));
    assert_eq!(errno(a.c.task_end_move(end(true, 77)).await), libc::ESTALE);
    let t3 =
        a.c.task_exited(exited(a.id, 42, 137))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        t3.state(),
        TaskState::TaskRunning,
        "the frozen original's end is ignored"
    );
    let t4 =
        a.c.task_exited(exited(b.id, 77, 3))
            .await
            .unwrap()
            .into_inner();
    assert_eq!((t4.state(), t4.exit_code), (TaskState::TaskExited, 3));
    let live =
        a.c.task_list(pb::TaskListRequest {
            include_exited: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(live.tasks.is_empty());
    let all =
        a.c.task_list(pb::TaskListRequest {
            include_exited: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.tasks.len(), 1);
}

#[tokio::test]
async fn handed_over_locks_wait_for_their_process_and_can_be_given_back() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    // Process 7 on a holds bytes 0-9; process 8 on a holds 20-29.
    assert!(a.lock(f.ino, 7, (0, 9), WR, false).await);
    assert!(a.lock(f.ino, 8, (20, 29), WR, false).await);
    let moved =
        b.c.move_locks(pb::MoveLocksRequest {
            from_session: a.sid,
            from_pid: 7,
            to_session: b.sid,
            to_pid: 70,
        })
        .await
        .unwrap()
        .into_inner()
        .moved;
    assert_eq!(moved.len(), 1);
    assert_eq!((moved[0].start, moved[0].end, moved[0].owner), (0, 9, 7));
    // Nobody else gets it meanwhile: not the old holder, not another
    // process of the target.
    assert!(!a.lock(f.ino, 7, (0, 9), WR, false).await);
    assert!(!b.lock(f.ino, 8, (0, 9), WR, false).await);
    assert_eq!(a.test_lock(f.ino, 9, (0, 0), WR).await.3, 70);
    // Process 70 of the target takes it (a new kernel owner).
    assert!(b.lock(f.ino, 70, (0, 9), WR, false).await);
    // Undo: whatever b holds for 70 goes, a's lock comes back as it was.
    b.c.return_locks(pb::ReturnLocksRequest {
        to_session: b.sid,
        to_pid: 70,
        locks: moved,
    })
    .await
    .unwrap();
    assert!(!b.lock(f.ino, 70, (0, 9), WR, false).await);
    assert_eq!(b.test_lock(f.ino, 9, (0, 0), WR).await.3, 7);
    assert!(
        a.lock(f.ino, 7, (0, 9), WR, false).await,
        "a's owner 7 still holds it"
    );
    // Process 8's lock never moved.
    assert_eq!(b.test_lock(f.ino, 9, (25, 25), WR).await.3, 8);
}

#[tokio::test]
async fn handed_over_flock_locks_move_with_their_process_and_come_back() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    // Process 7 on a holds a flock on f and an fcntl lock on bytes 0-9.
    assert!(a.lock(f.ino, 7, (0, u64::MAX), WR, true).await);
    assert!(a.lock(f.ino, 7, (0, 9), WR, false).await);
    let moved =
        b.c.move_locks(pb::MoveLocksRequest {
            from_session: a.sid,
            from_pid: 7,
            to_session: b.sid,
            to_pid: 70,
        })
        .await
        .unwrap()
        .into_inner()
        .moved;
    let mut kinds: Vec<bool> = moved.iter().map(|l| l.flock).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, [false, true], "both locks move: {moved:?}");
    // Pending: no other process, on either node, takes the flock.
    assert!(!a.lock(f.ino, 9, (0, u64::MAX), WR, true).await);
    assert!(!b.lock(f.ino, 8, (0, u64::MAX), WR, true).await);
    // Process 70's flock request takes it; its fcntl lock is still pending
    // for its first fcntl request.
    assert!(b.lock(f.ino, 70, (0, u64::MAX), WR, true).await);
    assert!(!b.lock(f.ino, 8, (0, 9), WR, false).await);
    b.c.return_locks(pb::ReturnLocksRequest {
        to_session: b.sid,
        to_pid: 70,
        locks: moved,
    })
    .await
    .unwrap();
    // Given back: a's owner 7 holds both again, 70 nothing.
    assert!(!b.lock(f.ino, 70, (0, u64::MAX), WR, true).await);
    assert!(a.lock(f.ino, 7, (0, u64::MAX), WR, true).await);
    assert_eq!(b.test_lock(f.ino, 9, (0, 0), WR).await.3, 7);
}

#[tokio::test]
async fn parked_locks_stay_held_until_claimed_given_back_or_dropped() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let mut b = s.node("b").await;
    let f = a.create(ROOT, "f").await;
    assert!(a.lock(f.ino, 7, (0, u64::MAX), WR, true).await);
    assert!(a.lock(f.ino, 7, (0, 9), WR, false).await);
    let (a_sid, b_sid) = (a.sid, b.sid);
    let park = |token| pb::ParkLocksRequest {
        session_id: a_sid,
        pid: 7,
        token,
    };
    let refused = a.c.park_locks(park(0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let n = a.c.park_locks(park(42)).await.unwrap().into_inner().locks;
    assert_eq!(n, 2);
    // Parked: held by nobody, not even their old owner.
    assert!(!a.lock(f.ino, 7, (0, u64::MAX), WR, true).await);
    assert!(!a.lock(f.ino, 7, (0, 9), WR, false).await);
    assert!(!b.lock(f.ino, 8, (0, 9), WR, false).await);
    let claim = |token| pb::ClaimParkedRequest {
        from_session: a_sid,
        token,
        to_session: b_sid,
        to_pid: 70,
    };
    let none =
        b.c.claim_parked(claim(43))
            .await
            .unwrap()
            .into_inner()
            .moved;
    assert!(none.is_empty(), "another token claims nothing");
    let claimed =
        b.c.claim_parked(claim(42))
            .await
            .unwrap()
            .into_inner()
            .moved;
    assert_eq!(claimed.len(), 2);
    assert!(claimed.iter().all(|l| l.pending && l.owner == 42));
    // Only process 70 of b takes them.
    assert!(!b.lock(f.ino, 8, (0, u64::MAX), WR, true).await);
    assert!(b.lock(f.ino, 70, (0, u64::MAX), WR, true).await);
    assert!(b.lock(f.ino, 70, (0, 9), WR, false).await);
    // A failed restore gives them back: parked again, claimable again.
    b.c.return_locks(pb::ReturnLocksRequest {
        to_session: b.sid,
        to_pid: 70,
        locks: claimed,
    })
    .await
    .unwrap();
    assert!(!b.lock(f.ino, 70, (0, 9), WR, false).await);
    assert!(!a.lock(f.ino, 7, (0, 9), WR, false).await);
    // Dropped: free for anyone; a later claim finds nothing.
    a.c.drop_parked(pb::DropParkedRequest {
        session_id: a.sid,
        token: 42,
    })
    .await
    .unwrap();
    assert!(b.lock(f.ino, 8, (0, 9), WR, false).await);
    assert!(b.lock(f.ino, 8, (0, u64::MAX), WR, true).await);
    let late =
        b.c.claim_parked(claim(42))
            .await
            .unwrap()
            .into_inner()
            .moved;
    assert!(late.is_empty());
}

/// A move whose source node's session ends (its daemon, which runs the
/// agent, died and came back) is given up: another move may start at
/// once instead of after MOVE_STALE_MS. While the session lives, it may not.
#[tokio::test]
async fn a_move_whose_source_session_ended_can_be_taken_over_at_once() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let b = s.node("b").await;
    let t =
        a.c.task_create(pb::TaskCreateRequest {
            node_id: a.id,
            pid: 42,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let begin = pb::TaskBeginMoveRequest {
        task_id: t.task_id,
        from_node: a.id,
        pid: 42,
        to_node: b.id,
    };
    let m = a.c.task_begin_move(begin).await.unwrap().into_inner();
    assert_eq!(m.moving_session, a.sid);
    assert_eq!(
        errno(a.c.task_begin_move(begin).await),
        libc::EBUSY,
        "the source's session is alive: the move is its"
    );
    // Node a starts again: a new session ends the old one.
    let mut a2 = s.node("a").await;
    assert_eq!(a2.id, a.id);
    let m2 = a2.c.task_begin_move(begin).await.unwrap().into_inner();
    assert_eq!(
        (m2.state(), m2.moving_session),
        (TaskState::TaskMoving, a2.sid)
    );
    assert_eq!(
        errno(a2.c.task_begin_move(begin).await),
        libc::EBUSY,
        "the new move is not taken over"
    );
}
