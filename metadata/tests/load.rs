//! Load reports (kept in memory, returned with the nodes) and task pins,
//! through a real server.

mod common;

use common::{TestServer, errno};
use migfs_meta::Config;
use migfs_proto::meta::{self as pb, TaskState};

fn load(runnable: f64, task: u64, cpu: f64) -> pb::NodeLoad {
    pb::NodeLoad {
        load1: runnable,
        runnable,
        cpu_busy: 0.5,
        cpus: 2,
        mem_total_bytes: 1 << 30,
        mem_available_bytes: 1 << 29,
        tasks: 1,
        processes: 3,
        task_loads: vec![pb::TaskLoad {
            task_id: task,
            cpu,
            cpu_used: cpu / 2.0,
            rss_bytes: 4096,
        }],
        seq: 1,
        sample_ms: 1000,
        ..Default::default()
    }
}

fn report(sid: u64, l: pb::NodeLoad) -> pb::ReportLoadRequest {
    pb::ReportLoadRequest {
        session_id: sid,
        load: Some(l),
    }
}

async fn nodes(c: &mut common::Client) -> Vec<pb::NodeInfo> {
    c.list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

#[tokio::test]
async fn each_node_lists_its_last_load_report_with_its_age() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let b = s.node("b").await;
    let listed = nodes(&mut a.c).await;
    assert!(
        listed.iter().all(|n| n.load.is_none()),
        "no report yet: {listed:?}"
    );
    a.c.report_load(report(a.sid, load(4.0, 7, 1.0)))
        .await
        .unwrap();
    a.c.report_load(report(a.sid, load(2.0, 7, 0.9)))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let listed = nodes(&mut a.c).await;
    let na = listed.iter().find(|n| n.node_id == a.id).unwrap();
    let l = na.load.as_ref().expect("a's load");
    assert_eq!(l.runnable, 2.0, "the last report wins");
    assert_eq!(l.task_loads[0].task_id, 7);
    assert_eq!(l.task_loads[0].cpu, 0.9);
    assert!(
        (50..10_000).contains(&l.age_ms),
        "age {} ms after 50 ms",
        l.age_ms
    );
    let nb = listed.iter().find(|n| n.node_id == b.id).unwrap();
    assert!(nb.load.is_none(), "b never reported");
}

#[tokio::test]
async fn a_report_needs_a_live_session_and_sane_figures() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    assert_eq!(
        errno(a.c.report_load(report(999_999, load(1.0, 1, 1.0))).await),
        libc::ESTALE
    );
    let mut nan = load(1.0, 1, 1.0);
    nan.task_loads[0].cpu = f64::NAN;
    assert_eq!(
        errno(a.c.report_load(report(a.sid, nan)).await),
        libc::EINVAL
    );
    let mut neg = load(1.0, 1, 1.0);
    neg.load5 = -1.0;
    assert_eq!(
        errno(a.c.report_load(report(a.sid, neg)).await),
        libc::EINVAL
    );
    let empty = pb::ReportLoadRequest {
        session_id: a.sid,
        load: None,
    };
    assert_eq!(errno(a.c.report_load(empty).await), libc::EINVAL);
    // A node that registered again has a new session; the old one is over.
    let old = a.sid;
    let again = s.node("a").await;
    assert_eq!(
        errno(a.c.report_load(report(old, load(1.0, 1, 1.0))).await),
        libc::ESTALE
    );
    assert!(nodes(&mut a.c).await.iter().all(|n| n.load.is_none()));
    let mut c = again.c.clone();
    c.report_load(report(again.sid, load(1.0, 1, 1.0)))
        .await
        .unwrap();
    assert!(nodes(&mut c).await[0].load.is_some());
}

#[tokio::test]
async fn a_task_is_pinned_and_unpinned_until_it_exits() {
    let s = TestServer::start(Config::default()).await;
    let mut a = s.node("a").await;
    let t =
        a.c.task_create(pb::TaskCreateRequest {
            node_id: a.id,
            pid: 42,
            cmd: "spin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!t.pinned);
    let pin = |pinned| pb::TaskPinRequest {
        task_id: t.task_id,
        pinned,
    };
    assert!(a.c.task_pin(pin(true)).await.unwrap().into_inner().pinned);
    let got =
        a.c.task_get(pb::TaskGetRequest { task_id: t.task_id })
            .await
            .unwrap()
            .into_inner();
    assert!(got.pinned, "the pin is stored");
    assert!(!a.c.task_pin(pin(false)).await.unwrap().into_inner().pinned);
    assert!(
        !a.c.task_get(pb::TaskGetRequest { task_id: t.task_id })
            .await
            .unwrap()
            .into_inner()
            .pinned
    );
    assert_eq!(
        errno(
            a.c.task_pin(pb::TaskPinRequest {
                task_id: 999_999,
                pinned: true
            })
            .await
        ),
        libc::ENOENT
    );
    let ended =
        a.c.task_exited(pb::TaskExitedRequest {
            task_id: t.task_id,
            node_id: a.id,
            pid: 42,
            exit_code: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state(), TaskState::TaskExited);
    assert_eq!(errno(a.c.task_pin(pin(true)).await), libc::ENOENT);
}
