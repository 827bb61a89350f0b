//! The framed TCP transport (`migfs_proto::frame`) against a real metadata
//! server: the same answers as HTTP/2 on the same port, the secret checked,
//! errors carried, idle connections to a restarted server replaced.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{SECRET, TestServer};
use migfs_meta::{Config, MemStore, MetaDb};
use migfs_proto::auth::{Present, Secret};
use migfs_proto::frame::FrameChannel;
use migfs_proto::meta::meta_client::MetaClient;
use migfs_proto::meta::{self as pb};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;

const ROOT: u64 = 1;

type Framed = MetaClient<InterceptedService<FrameChannel, Present>>;

fn framed(addr: SocketAddr, secret: &str) -> Framed {
    let ch = FrameChannel::new(
        &format!("http://{addr}"),
        Duration::from_secs(2),
        Duration::from_secs(5),
    );
    MetaClient::with_interceptor(ch, Present(Secret::new(secret).unwrap()))
}

#[tokio::test]
async fn framed_calls_answer_as_http2_does_on_the_same_port() {
    let s = TestServer::start(Config::default()).await;
    let mut h2 = s.client().await;
    let mut fr = framed(s.addr, SECRET);
    let a = fr.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap();
    let b = h2.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap();
    assert_eq!(a.into_inner(), b.into_inner());
    let missing = || pb::LookupRequest {
        session_id: 0,
        parent: ROOT,
        name: b"nothing".to_vec(),
    };
    let ea = fr.lookup(missing()).await.unwrap_err();
    let eb = h2.lookup(missing()).await.unwrap_err();
    assert_eq!((ea.code(), ea.message()), (eb.code(), eb.message()));
    assert_eq!(common::errno(Err::<(), _>(ea)), libc::ENOENT);
    let mut wrong = framed(s.addr, "not-the-secret");
    let e = wrong
        .get_attr(pb::InoRequest { ino: ROOT })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn concurrent_framed_calls_each_get_their_own_answer() {
    let s = TestServer::start(Config::default()).await;
    let mut n = s.node("a").await;
    let mut made = Vec::new();
    for i in 0..20 {
        made.push(n.create(ROOT, &format!("f{i}")).await);
    }
    let fr = framed(s.addr, SECRET);
    let tasks: Vec<_> = made
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (mut c, ino) = (fr.clone(), a.ino);
            tokio::spawn(async move {
                for _ in 0..25 {
                    let r = c
                        .lookup(pb::LookupRequest {
                            session_id: 0,
                            parent: ROOT,
                            name: format!("f{i}").into_bytes(),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.ino, ino);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn serve_at(
    addr: SocketAddr,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let db = Arc::new(MetaDb::open(Arc::new(MemStore::new()), Config::default()).unwrap());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let secret = Secret::new(SECRET).unwrap();
    let task = tokio::spawn(async move {
        migfs_meta::server::serve(db, listener, secret, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (tx, task)
}

#[tokio::test]
async fn a_down_server_is_unavailable_and_a_restarted_one_is_reached_again() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let (stop, task) = serve_at(addr).await;
    let mut fr = framed(addr, SECRET);
    fr.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();
    let e = fr.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // The pooled connection is dead; a new server on the same address is
    // reached through a new one.
    let (stop, task) = serve_at(addr).await;
    fr.get_attr(pb::InoRequest { ino: ROOT }).await.unwrap();
    stop.send(()).unwrap();
    task.await.unwrap();
}
