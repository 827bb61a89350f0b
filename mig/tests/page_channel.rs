//! The page channel (`pages::wire`) over real loopback sockets: a page
//! server serving this test process's own memory (read with
//! `process_vm_readv` like a frozen original's), demand fetches, a full
//! pull, wrong tokens and moves, errors passed through, and close ending
//! everything: no descriptor or thread is left behind.
//!
//! One test function runs the steps in order: the descriptor and thread
//! counts of this process are only meaningful when nothing else runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use migfs_mig::pages::PageSource;
use migfs_mig::pages::frame::Kind;
use migfs_mig::pages::wire::{
    Fetcher, Link, Origin, PageServer, Rendezvous, pull, push_runs, receive_pushed,
};
use parking_lot::Mutex;

const PAGE: usize = 4096;
const MOVE: u64 = 0x42;

/// Page-aligned memory of this process: `pages` pages, of which the
/// touched ones hold a pattern naming their index; the others were never
/// written (not present).
struct Memory {
    buf: Vec<u8>,
    off: usize,
    pages: usize,
}

impl Memory {
    fn new(pages: usize, touched: impl Fn(usize) -> bool) -> Memory {
        // calloc of this size maps fresh zero pages: untouched ones stay
        // absent.
        let mut buf = vec![0u8; (pages + 1) * PAGE];
        let off = buf.as_ptr().align_offset(PAGE);
        for p in (0..pages).filter(|&p| touched(p)) {
            let at = off + p * PAGE;
            for (i, b) in buf[at..at + PAGE].iter_mut().enumerate() {
                *b = u8::try_from((p * 7 + i) % 251).unwrap();
            }
        }
        Memory { buf, off, pages }
    }

    fn start(&self) -> u64 {
        self.buf[self.off..].as_ptr() as u64
    }

    fn range(&self) -> (u64, u64) {
        (self.start(), self.start() + (self.pages * PAGE) as u64)
    }

    fn at(&self, addr: u64, len: usize) -> &[u8] {
        let i = self.off + usize::try_from(addr - self.start()).unwrap();
        &self.buf[i..i + len]
    }
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn serve(mem: &Memory) -> PageServer {
    let pid = nix::unistd::getpid();
    let src = PageSource::new(pid, vec![mem.range()]).unwrap();
    let origin: Arc<dyn Origin> = Arc::new(src);
    PageServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), MOVE, origin).unwrap()
}

fn link(s: &PageServer) -> Link {
    Link {
        addr: s.addr(),
        move_id: MOVE,
        token: s.token(),
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn page_channel_over_loopback() {
    // 20 MiB with holes: every 5th page and a 1 MiB block never touched.
    let mem = Memory::new(5120, |p| p % 5 != 3 && !(1000..1256).contains(&p));
    let (fds0, threads0) = (fds(), threads());
    let server = serve(&mem);
    assert!(server.addr().ip().is_loopback());

    // Demand fetches, from several threads at once (a small pool).
    let fetcher = Arc::new(Fetcher::new(link(&server)));
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let (f, mem) = (Arc::clone(&fetcher), &mem);
            sc.spawn(move || {
                for i in 0..50u64 {
                    let addr = mem.start() + ((t * 1000 + i * 17) % 5000) * PAGE as u64;
                    let got = f.get(addr, 16 * PAGE).unwrap();
                    assert_eq!(got, mem.at(addr, 16 * PAGE), "fetch at {addr:#x}");
                }
            });
        }
    });
    let fetched = server.served_bytes();
    assert_eq!(fetched, 200 * 16 * PAGE as u64);

    // An error comes back as text and the connection stays usable.
    let outside = mem.range().1;
    let e = fetcher.get(outside, PAGE).unwrap_err();
    assert!(e.contains("outside the lazy memory"), "{e}");
    let e = fetcher.get(mem.start() + 1, PAGE).unwrap_err();
    assert!(e.contains("bad page request"), "{e}");
    assert_eq!(
        fetcher.get(mem.start(), PAGE).unwrap(),
        mem.at(mem.start(), PAGE)
    );

    // A full pull: every present page once, in runs, nothing else.
    let got: Mutex<BTreeMap<u64, Vec<u8>>> = Mutex::new(BTreeMap::new());
    let install = |addr: u64, data: &[u8]| -> Result<u64, String> {
        got.lock().insert(addr, data.to_vec());
        Ok((data.len() / PAGE) as u64)
    };
    let before = server.served_bytes();
    let pulled = pull(&link(&server), &[], &install).unwrap();
    let present = (0..mem.pages)
        .filter(|p| p % 5 != 3 && !(1000..1256).contains(p))
        .count();
    assert_eq!(pulled.installed, present as u64);
    assert_eq!(pulled.bytes, (present * PAGE) as u64);
    assert_eq!(server.served_bytes() - before, pulled.bytes);
    for (addr, data) in got.lock().iter() {
        assert_eq!(&data[..], mem.at(*addr, data.len()), "run at {addr:#x}");
    }

    // Only some ranges.
    let only = [(mem.start(), mem.start() + 10 * PAGE as u64)];
    let pulled = pull(&link(&server), &only, &|_, d| Ok((d.len() / PAGE) as u64)).unwrap();
    assert_eq!(pulled.installed, 8);

    // An installer error stops the pull and is the error reported.
    let e = pull(&link(&server), &[], &|_, _| Err("no room".into())).unwrap_err();
    assert_eq!(e, "no room");

    // A wrong token, a wrong move: refused, and said so.
    let mut bad = link(&server);
    bad.token[0] ^= 1;
    let e = bad.connect(Kind::Fetch).unwrap_err();
    assert!(e.contains("refused move 66"), "{e}");
    let mut bad = link(&server);
    bad.move_id += 1;
    let e = Fetcher::new(bad).get(mem.start(), PAGE).unwrap_err();
    assert!(e.contains("refused move 67"), "{e}");

    // A push the source starts, to a target that connects back (pre-copy
    // rounds); a wrong token is turned away first.
    let rz = Rendezvous::bind(IpAddr::V4(Ipv4Addr::LOCALHOST), MOVE).unwrap();
    let back = Link {
        addr: rz.addr().unwrap(),
        move_id: MOVE,
        token: rz.token(),
    };
    let mut wrong = back.clone();
    wrong.token[3] ^= 0xff;
    let src = PageSource::new(nix::unistd::getpid(), vec![mem.range()]).unwrap();
    let chunks = migfs_mig::pages::chunks(&src.present().unwrap(), 1 << 20);
    let kept: Mutex<u64> = Mutex::new(0);
    std::thread::scope(|sc| {
        let target = sc.spawn(|| {
            let e = receive_pushed(&wrong, &|_, _| Ok(0)).unwrap_err();
            assert!(e.contains("refused move 66"), "{e}");
            receive_pushed(&back, &|addr, data| {
                assert_eq!(data, mem.at(addr, data.len()), "pushed run at {addr:#x}");
                *kept.lock() += data.len() as u64;
                Ok(0)
            })
            .unwrap()
        });
        let mut s = rz.accept(Duration::from_secs(10)).unwrap();
        let served = AtomicU64::new(0);
        let (bytes, _) = push_runs(&mut s, &src, &chunks, &served).unwrap();
        drop(s);
        let got = target.join().unwrap();
        assert_eq!(got.bytes, bytes);
        assert_eq!(*kept.lock(), bytes);
        assert_eq!(served.load(Ordering::Relaxed), bytes);
    });
    let e = rz.accept(Duration::from_millis(50)).unwrap_err();
    assert!(e.contains("did not connect"), "{e}");
    drop(rz);
    drop(src);

    // Close: connections end (a pooled one fails clearly), nothing
    // listens any more, every thread and descriptor is gone.
    server.close();
    let e = fetcher.get(mem.start(), PAGE).unwrap_err();
    assert!(
        e.contains("closed the connection") || e.contains("reset"),
        "{e}"
    );
    let e = link(&server).connect(Kind::Fetch).unwrap_err();
    assert!(e.contains("connect to the page server"), "{e}");
    drop(fetcher);
    drop(server);
    wait_until("threads ended", || threads() == threads0);
    assert_eq!(fds(), fds0, "descriptors left open");
}
