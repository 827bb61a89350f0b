//! Measures the round trip of one metadata call (GetAttr of the root)
//! against a running `migfs meta`: `rpc_latency URL SECRET_FILE [N]`.

use std::time::{Duration, Instant};

use migfs_fs::meta_client::Meta;
use migfs_proto::auth::Secret;
use migfs_proto::meta::{InoRequest, LookupRequest, MknodRequest, NameRequest};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secret = Secret::new(&std::fs::read_to_string(&args[2]).expect("secret")).expect("secret");
    let n: u32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = rt.enter();
    let meta = Meta::new(&args[1], secret, Duration::from_secs(5)).expect("client");
    let call = || {
        rt.block_on(meta.call("getattr", |mut c| async move {
            c.get_attr(InoRequest { ino: 1 }).await
        }))
    };
    call().expect("first call");
    let t = Instant::now();
    for _ in 0..n {
        call().expect("call");
    }
    println!(
        "block_on from outside: {:.0} us per call",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
    let t = Instant::now();
    rt.block_on(async {
        for _ in 0..n {
            meta.call("getattr", |mut c| async move {
                c.get_attr(InoRequest { ino: 1 }).await
            })
            .await
            .expect("call");
        }
    });
    println!(
        "inside the runtime:    {:.0} us per call",
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    );
    // Create, look up and unlink files in the root (no FUSE in the way).
    let names: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("rpc-latency-{i}").into_bytes())
        .collect();
    let t = Instant::now();
    rt.block_on(async {
        for name in &names {
            let req = MknodRequest {
                parent: 1,
                name: name.clone(),
                mode: libc::S_IFREG | 0o644,
                ..MknodRequest::default()
            };
            meta.call("mknod", |mut c| {
                let req = req.clone();
                async move { c.mknod(req).await }
            })
            .await
            .expect("mknod");
        }
    });
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    println!("mknod:                 {:.0} us per call", per(t));
    let t = Instant::now();
    rt.block_on(async {
        for name in &names {
            let req = LookupRequest {
                parent: 1,
                name: name.clone(),
                session_id: 0,
            };
            meta.call("lookup", |mut c| {
                let req = req.clone();
                async move { c.lookup(req).await }
            })
            .await
            .expect("lookup");
        }
    });
    println!("lookup:                {:.0} us per call", per(t));
    let t = Instant::now();
    rt.block_on(async {
        for name in &names {
            let req = NameRequest {
                session_id: 0,
                parent: 1,
                name: name.clone(),
            };
            meta.call("unlink", |mut c| {
                let req = req.clone();
                async move { c.unlink(req).await }
            })
            .await
            .expect("unlink");
        }
    });
    println!("unlink:                {:.0} us per call", per(t));
}
