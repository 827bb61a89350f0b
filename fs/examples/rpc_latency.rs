//! Measures the round trip of one metadata call (GetAttr of the root)
//! against a running `migfs meta`: `rpc_latency URL SECRET_FILE [N]`.

use std::time::{Duration, Instant};

use migfs_fs::meta_client::Meta;
use migfs_proto::auth::Secret;
use migfs_proto::meta::InoRequest;

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
}
