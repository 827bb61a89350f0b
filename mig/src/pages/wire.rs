//! The page channel: raw TCP between the source's page server and the
//! target (docs/migration.md "Page channel"). Page bytes travel in
//! [`super::frame`] frames, never in protobuf.
//!
//! The source starts a [`PageServer`] per served move: a listener on its
//! node's own address (port 0) and a random [`Token`] that the target
//! learns in the authenticated Receive stream. A target connects
//! ([`Link`]), presents move id and token (anything else: the connection
//! is closed and logged) and then either
//! - asks for demand fetches on a [`Fetcher`] connection (request/reply,
//!   `TCP_NODELAY`; a small pool serves concurrent faults), or
//! - pulls every present page once on a bulk connection ([`pull`]).
//!
//! Both ends keep their buffers: the source reads the frozen original
//! (`process_vm_readv`) straight into the send buffer on one thread while
//! another sends the previous one; the target receives into reused
//! buffers on one thread while another installs the previous run.
//!
//! Every wait is bounded: a connection must say hello within
//! [`HELLO_TIMEOUT`], a read on the target waits at most
//! [`FETCH_TIMEOUT`], a write at most [`WRITE_TIMEOUT`].
//! [`PageServer::close`] (also on drop) stops the listener, shuts every
//! connection down and joins every thread.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::frame::{self, Frame, FrameKind, HEADER_LEN, Hello, Kind, Token};
use super::lazy::PageFetch;
use super::source::PageSource;

/// Bytes per frame of a pull.
pub const CHUNK: usize = 4 << 20;
/// Buffers per pull end: one being filled, one being drained, one spare.
const BUFFERS: usize = 3;
/// Connections one served move may have at once.
const MAX_CONNS: usize = 8;
/// Fetch connections a target keeps open.
const FETCH_POOL: usize = 4;
/// How long a new connection may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a write may block (the other side stopped reading).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the target waits for any read (a fetch's reply, the next
/// frame of a pull) before it gives up.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PAGE: u64 = 4096;

/// What a page server serves: the memory of a frozen original.
pub trait Origin: Send + Sync {
    /// Fills `buf` with the original's bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String>;
    /// The runs of pages that hold data, in address order.
    fn present(&self) -> Result<Vec<(u64, u64)>, String>;
    /// Sends `chunks` as run frames on `s` by some faster way than
    /// [`Origin::read`] (from inside the process, [`super::inside`]), if
    /// it has one: `None` when it has not and nothing was sent; else the
    /// page bytes sent (an error leaves `s` unusable).
    fn send_runs(&self, s: &mut TcpStream, chunks: &[(u64, u64)]) -> Option<io::Result<u64>> {
        let _ = (s, chunks);
        None
    }
}

impl Origin for PageSource {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        PageSource::read(self, addr, buf).map_err(|e| e.to_string())
    }

    fn present(&self) -> Result<Vec<(u64, u64)>, String> {
        PageSource::present(self).map_err(|e| e.to_string())
    }
}

/// A fresh random token (from the kernel's random pool).
pub fn new_token() -> io::Result<Token> {
    let mut t = [0u8; frame::TOKEN_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut t)?;
    Ok(t)
}

/// The source's page server of one move.
pub struct PageServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The stop pipe's write end and the accept thread, until closed.
    stopper: Mutex<Option<(OwnedFd, JoinHandle<()>)>>,
}

struct Shared {
    move_id: u64,
    token: Token,
    origin: Arc<dyn Origin>,
    served: AtomicU64,
    conns: Mutex<Vec<Conn>>,
}

/// An accepted connection: a handle to shut it down, its thread.
struct Conn {
    stream: TcpStream,
    thread: JoinHandle<()>,
}

impl PageServer {
    /// Listens on `ip` (port 0) for the target of move `move_id`, serving
    /// `origin`, with a new random token.
    pub fn start(ip: IpAddr, move_id: u64, origin: Arc<dyn Origin>) -> io::Result<PageServer> {
        let listener = TcpListener::bind((ip, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop_r, stop_w) = crate::sys::uffd::pipe().map_err(io::Error::from)?;
        let shared = Arc::new(Shared {
            move_id,
            token: new_token()?,
            origin,
            served: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let sh = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name(format!("pages-{move_id:x}"))
            .spawn(move || accept_loop(&listener, &stop_r, &sh))?;
        tracing::debug!(move_id, %addr, "page server listening");
        Ok(PageServer {
            addr,
            shared,
            stopper: Mutex::new(Some((stop_w, accept))),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token a target must present.
    pub fn token(&self) -> Token {
        self.shared.token
    }

    /// Page bytes sent so far (fetches and pulls).
    pub fn served_bytes(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// Stops listening, shuts every connection down and waits for their
    /// threads. Idempotent.
    pub fn close(&self) {
        let Some((stop, accept)) = self.stopper.lock().take() else {
            return;
        };
        let _ = nix::unistd::write(&stop, b"x");
        let _ = accept.join();
        let conns = std::mem::take(&mut *self.shared.conns.lock());
        for c in &conns {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        for c in conns {
            let _ = c.thread.join();
        }
        tracing::debug!(move_id = self.shared.move_id, "page server closed");
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(listener: &TcpListener, stop: &OwnedFd, sh: &Arc<Shared>) {
    loop {
        let ready = match crate::sys::net::wait_readable(&[listener.as_fd(), stop.as_fd()], -1) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(move_id = sh.move_id, error = %e, "page server: poll failed");
                return;
            }
        };
        if ready[1] {
            return;
        }
        loop {
            match listener.accept() {
                Ok((s, peer)) => admit(sh, s, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(move_id = sh.move_id, error = %e, "page server: accept failed");
                    // Out of descriptors, say: do not spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// Starts serving an accepted connection on a thread of its own, if the
/// move has room for one more.
fn admit(sh: &Arc<Shared>, s: TcpStream, peer: SocketAddr) {
    let mut conns = sh.conns.lock();
    let (done, live): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut *conns)
        .into_iter()
        .partition(|c| c.thread.is_finished());
    *conns = live;
    for c in done {
        let _ = c.thread.join();
    }
    if conns.len() >= MAX_CONNS {
        tracing::warn!(move_id = sh.move_id, %peer, "page server: too many connections; closed");
        return;
    }
    let Ok(handle) = s.try_clone() else {
        return;
    };
    let sh2 = Arc::clone(sh);
    let spawned = std::thread::Builder::new()
        .name(format!("pages-{:x}-c", sh.move_id))
        .spawn(move || {
            let mut s = s;
            if let Err(e) = serve(&sh2, &mut s, peer) {
                tracing::debug!(move_id = sh2.move_id, %peer, error = %e, "page connection ended");
            }
            // The handle kept for close() holds the socket open: end the
            // connection itself.
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
    match spawned {
        Ok(thread) => conns.push(Conn {
            stream: handle,
            thread,
        }),
        Err(e) => tracing::warn!(move_id = sh.move_id, error = %e, "page server: no thread"),
    }
}

/// Sets up an accepted connection (blocking, no Nagle, timeouts) and
/// reads its hello.
fn read_hello(s: &mut TcpStream) -> io::Result<Hello> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(HELLO_TIMEOUT))?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut b = [0u8; frame::HELLO_LEN];
    s.read_exact(&mut b)?;
    Hello::decode(&b).map_err(io::Error::other)
}

/// One connection: hello, then fetches or one pull.
fn serve(sh: &Shared, s: &mut TcpStream, peer: SocketAddr) -> io::Result<()> {
    let hello = read_hello(s)?;
    if hello.move_id != sh.move_id || !frame::same_token(&hello.token, &sh.token) {
        tracing::warn!(
            move_id = sh.move_id,
            asked = hello.move_id,
            %peer,
            "page server: wrong move or token; connection closed"
        );
        return Ok(());
    }
    s.write_all(&frame::welcome(0))?;
    // Idle between faults for as long as the move lasts; close() ends it.
    s.set_read_timeout(None)?;
    match hello.kind {
        Kind::Fetch => serve_fetches(sh, s),
        Kind::Bulk => serve_pull(sh, s),
        // Only a Rendezvous takes those.
        Kind::Pushed => Ok(()),
    }
}

/// Reads exactly `buf`, or nothing at all (the other side closed): false.
fn read_or_eof(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn send_error(s: &mut TcpStream, why: &str) -> io::Result<()> {
    let msg = &why.as_bytes()[..why.len().min(4096)];
    let f = Frame {
        kind: FrameKind::Error,
        len: u32::try_from(msg.len()).unwrap_or(0),
        addr: 0,
    };
    s.write_all(&f.encode())?;
    s.write_all(msg)
}

fn serve_fetches(sh: &Shared, s: &mut TcpStream) -> io::Result<()> {
    let window = usize::try_from(super::lazy::WINDOW).unwrap_or(1 << 16);
    let mut buf = vec![0u8; HEADER_LEN + window];
    let mut req = [0u8; HEADER_LEN];
    while read_or_eof(s, &mut req)? {
        let (addr, len) = frame::decode_fetch(&req).map_err(io::Error::other)?;
        if !addr.is_multiple_of(PAGE) {
            send_error(s, &format!("bad page request {addr:#x}+{len}"))?;
            continue;
        }
        let n = len as usize;
        if buf.len() < HEADER_LEN + n {
            buf.resize(HEADER_LEN + n, 0);
        }
        let t = Instant::now();
        match sh.origin.read(addr, &mut buf[HEADER_LEN..HEADER_LEN + n]) {
            Ok(()) => {
                Frame {
                    kind: FrameKind::Run,
                    len,
                    addr,
                }
                .encode_into(&mut buf);
                sh.served.fetch_add(u64::from(len), Ordering::Relaxed);
                s.write_all(&buf[..HEADER_LEN + n])?;
            }
            Err(e) => send_error(s, &format!("read {addr:#x}+{len}: {e}"))?,
        }
        tracing::trace!(addr, len, us = t.elapsed().as_micros(), "page fetch served");
    }
    Ok(())
}

fn serve_pull(sh: &Shared, s: &mut TcpStream) -> io::Result<()> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head)?;
    let n = frame::decode_pull(&head).map_err(io::Error::other)?;
    let mut rb = vec![0u8; n * 16];
    s.read_exact(&mut rb)?;
    let only = frame::decode_ranges(&rb).map_err(io::Error::other)?;
    let t = Instant::now();
    let runs = match sh.origin.present() {
        Ok(r) if only.is_empty() => r,
        Ok(r) => super::ranges::intersect(&r, &super::ranges::normalize(only)),
        Err(e) => return send_error(s, &format!("pagemap: {e}")),
    };
    let chunks = super::chunks(&runs, CHUNK as u64);
    deep_buffers(s);
    let scan_ms = t.elapsed().as_secs_f64() * 1e3;
    let (bytes, read_time) = match sh.origin.send_runs(s, &chunks) {
        Some(sent) => {
            let bytes = sent?;
            sh.served.fetch_add(bytes, Ordering::Relaxed);
            let end = Frame {
                kind: FrameKind::End,
                len: 0,
                addr: bytes,
            };
            s.write_all(&end.encode())?;
            (bytes, Duration::ZERO)
        }
        None => push_runs(s, sh.origin.as_ref(), &chunks, &sh.served)?,
    };
    tracing::debug!(
        move_id = sh.move_id,
        mib = bytes >> 20,
        scan_ms,
        read_ms = read_time.as_secs_f64() * 1e3,
        ms = t.elapsed().as_secs_f64() * 1e3,
        "pages pushed"
    );
    Ok(())
}

/// Sends `chunks` of `origin` on `s` as run frames, then the end frame
/// (or an error frame when a read fails): one thread reads into reused
/// buffers while this one sends the previous. Counts the page bytes sent
/// in `served`; returns them and the time spent reading.
pub fn push_runs(
    s: &mut TcpStream,
    origin: &dyn Origin,
    chunks: &[(u64, u64)],
    served: &AtomicU64,
) -> io::Result<(u64, Duration)> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(Vec<u8>, usize), String>>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS.min(chunks.len()).max(1) {
        let _ = empty_tx.send(vec![0u8; HEADER_LEN + CHUNK]);
    }
    std::thread::scope(|sc| {
        let reader = sc.spawn(move || read_chunks(origin, chunks, &full_tx, &empty_rx));
        let sent = send_chunks(s, full_rx, empty_tx, served);
        let read_time = reader.join().unwrap_or_default();
        sent.map(|b| (b, read_time))
    })
}

/// The push's reader: each chunk of the original into an empty buffer
/// (after room for the frame header), handed to the sender; stops at the
/// first error (handed on) or when the sender is gone. Returns the time
/// spent reading.
fn read_chunks(
    origin: &dyn Origin,
    chunks: &[(u64, u64)],
    full: &mpsc::SyncSender<Result<(Vec<u8>, usize), String>>,
    empty: &mpsc::Receiver<Vec<u8>>,
) -> Duration {
    let mut busy = Duration::ZERO;
    for &(addr, end) in chunks {
        let Ok(mut buf) = empty.recv() else {
            return busy;
        };
        let len = usize::try_from(end - addr).unwrap_or(CHUNK).min(CHUNK);
        let t = Instant::now();
        let r = origin
            .read(addr, &mut buf[HEADER_LEN..HEADER_LEN + len])
            .map_err(|e| format!("read {addr:#x}+{len}: {e}"));
        busy += t.elapsed();
        let item = r.map(|()| {
            Frame {
                kind: FrameKind::Run,
                len: u32::try_from(len).unwrap_or(0),
                addr,
            }
            .encode_into(&mut buf);
            (buf, HEADER_LEN + len)
        });
        let failed = item.is_err();
        if full.send(item).is_err() || failed {
            return busy;
        }
    }
    busy
}

/// The push's sender: writes each filled buffer, gives it back, then the
/// end frame (or the reader's error). Takes the channels so that the
/// reader stops when this returns.
fn send_chunks(
    s: &mut TcpStream,
    full: mpsc::Receiver<Result<(Vec<u8>, usize), String>>,
    empty: mpsc::Sender<Vec<u8>>,
    served: &AtomicU64,
) -> io::Result<u64> {
    let mut sent = 0u64;
    for item in full {
        let (buf, n) = match item {
            Ok(x) => x,
            Err(e) => {
                send_error(s, &e)?;
                return Ok(sent);
            }
        };
        s.write_all(&buf[..n])?;
        let bytes = (n - HEADER_LEN) as u64;
        sent += bytes;
        served.fetch_add(bytes, Ordering::Relaxed);
        let _ = empty.send(buf);
    }
    let end = Frame {
        kind: FrameKind::End,
        len: 0,
        addr: sent,
    };
    s.write_all(&end.encode())?;
    Ok(sent)
}

/// Socket buffers of a bulk connection, each way: several frames, so that
/// neither end waits for the other while it does something else between
/// two runs (the target allocating the next run's pages).
const BULK_BUFFER: usize = 32 << 20;

/// Gives a bulk connection [`BULK_BUFFER`]-byte socket buffers (beyond
/// `net.core.*mem_max` when privileged; else what the kernel allows).
fn deep_buffers(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::SndBufForce, &BULK_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &BULK_BUFFER);
    }
    if setsockopt(s, sockopt::RcvBufForce, &BULK_BUFFER).is_err() {
        let _ = setsockopt(s, sockopt::RcvBuf, &BULK_BUFFER);
    }
}

/// Where a move's pages are served, as its target knows it.
#[derive(Clone, Debug)]
pub struct Link {
    /// The page server's address.
    pub addr: SocketAddr,
    /// The move.
    pub move_id: u64,
    /// Its token.
    pub token: Token,
}

/// Words for an I/O error on the page channel.
fn io_words(addr: SocketAddr, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "no answer from the page server at {addr} within {} s",
            FETCH_TIMEOUT.as_secs()
        ),
        io::ErrorKind::UnexpectedEof => {
            format!("the page server at {addr} closed the connection")
        }
        _ => format!("page server at {addr}: {e}"),
    }
}

impl Link {
    /// A connection of `kind`, past the hello.
    pub fn connect(&self, kind: Kind) -> Result<TcpStream, String> {
        let err = |e: io::Error| io_words(self.addr, &e);
        let mut s = TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect to the page server at {}: {e}", self.addr))?;
        s.set_nodelay(true).map_err(err)?;
        s.set_read_timeout(Some(FETCH_TIMEOUT)).map_err(err)?;
        s.set_write_timeout(Some(FETCH_TIMEOUT)).map_err(err)?;
        let hello = Hello {
            kind,
            move_id: self.move_id,
            token: self.token,
        };
        s.write_all(&hello.encode()).map_err(err)?;
        let mut w = [0u8; frame::WELCOME_LEN];
        s.read_exact(&mut w).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                format!(
                    "the page server at {} refused move {} (not served there, or a wrong token)",
                    self.addr, self.move_id
                )
            } else {
                err(e)
            }
        })?;
        match frame::decode_welcome(&w) {
            Ok(0) => Ok(s),
            Ok(st) => Err(format!("the page server at {} said {st}", self.addr)),
            Err(e) => Err(format!("page server at {}: {e}", self.addr)),
        }
    }
}

/// Reads the message of an error frame of `len` bytes.
fn error_text(s: &mut TcpStream, len: u32, addr: SocketAddr) -> String {
    let mut m = vec![0u8; len as usize];
    match s.read_exact(&mut m) {
        Ok(()) => String::from_utf8_lossy(&m).into_owned(),
        Err(e) => io_words(addr, &e),
    }
}

/// Demand fetches from a page server, over a small pool of connections
/// (one per fetch in flight, at most [`FETCH_POOL`] kept).
pub struct Fetcher {
    link: Link,
    pool: Mutex<Vec<TcpStream>>,
}

impl Fetcher {
    /// Fetches from `link` (connections are made on first use).
    pub fn new(link: Link) -> Fetcher {
        Fetcher {
            link,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// The `len` bytes at `addr` of the original.
    pub fn get(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        let n = u32::try_from(len)
            .ok()
            .filter(|&n| n > 0 && n <= frame::MAX_RUN)
            .ok_or_else(|| format!("fetch of {len} bytes"))?;
        let pooled = self.pool.lock().pop();
        let mut s = match pooled {
            Some(s) => s,
            None => self.link.connect(Kind::Fetch)?,
        };
        let a = self.link.addr;
        s.write_all(&frame::fetch(addr, n))
            .map_err(|e| io_words(a, &e))?;
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).map_err(|e| io_words(a, &e))?;
        let f = Frame::decode(&h).map_err(|e| format!("page server at {a}: {e}"))?;
        let res = match f.kind {
            FrameKind::Run if f.addr == addr && f.len == n => {
                let mut data = vec![0u8; len];
                s.read_exact(&mut data).map_err(|e| io_words(a, &e))?;
                Ok(data)
            }
            FrameKind::Error => Err(error_text(&mut s, f.len, a)),
            _ => return Err(format!("page server at {a}: unexpected answer {f:?}")),
        };
        let mut pool = self.pool.lock();
        if pool.len() < FETCH_POOL {
            pool.push(s);
        }
        res
    }
}

impl PageFetch for Fetcher {
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        let t = Instant::now();
        let res = self.get(addr, len).map_err(|e| format!("page server: {e}"));
        tracing::debug!(
            addr,
            len,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "page fetch"
        );
        res
    }
}

/// What a pull did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pulled {
    /// The sum of what `install` returned (pages new to the process).
    pub installed: u64,
    /// Page bytes received.
    pub bytes: u64,
    /// Time spent in `install`.
    pub install_time: Duration,
}

/// Installs a run of the original at an address; returns the pages new
/// to the process.
pub type Install<'a> = dyn Fn(u64, &[u8]) -> Result<u64, String> + Sync + 'a;

/// A run of received pages, in a buffer of the pull's pool.
struct Run {
    buf: Vec<u8>,
    addr: u64,
    len: usize,
}

/// Pulls every present page of the original (those inside `only` unless
/// it is empty) from `link`: one thread receives, another hands each run
/// to `install` meanwhile.
pub fn pull(link: &Link, only: &[(u64, u64)], install: &Install<'_>) -> Result<Pulled, String> {
    let mut s = link.connect(Kind::Bulk)?;
    s.write_all(&frame::pull(only))
        .map_err(|e| io_words(link.addr, &e))?;
    receive_pipelined(&mut s, link.addr, install)
}

/// Runs pushed to us on `s` until the end frame: one thread receives into
/// reused buffers, another hands each run to `install` meanwhile.
fn receive_pipelined(
    s: &mut TcpStream,
    addr: SocketAddr,
    install: &Install<'_>,
) -> Result<Pulled, String> {
    let (full_tx, full_rx) = mpsc::sync_channel::<Run>(BUFFERS);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..BUFFERS {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|sc| {
        let installer = sc.spawn(move || -> Result<(u64, Duration), String> {
            let (mut n, mut busy) = (0, Duration::ZERO);
            for run in full_rx {
                let t = Instant::now();
                n += install(run.addr, &run.buf[..run.len])?;
                busy += t.elapsed();
                let _ = empty_tx.send(run.buf);
            }
            Ok((n, busy))
        });
        let receiver = sc.spawn(move || receive_runs(s, addr, full_tx, empty_rx));
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err("the page receiver panicked".into()));
        let installed = installer
            .join()
            .unwrap_or_else(|_| Err("the page installer panicked".into()))?;
        let bytes = received?;
        Ok(Pulled {
            installed: installed.0,
            bytes,
            install_time: installed.1,
        })
    })
}

/// The target's end of a push the source starts ([`Rendezvous`]):
/// connects to it and hands every run to `install` until the end.
pub fn receive_pushed(link: &Link, install: &Install<'_>) -> Result<Pulled, String> {
    let mut s = link.connect(Kind::Pushed)?;
    receive_pipelined(&mut s, link.addr, install)
}

/// A listener for one move whose target connects back for pushes the
/// source starts (pre-copy rounds): [`Rendezvous::accept`] hands over a
/// connection that presented the token. Closed on drop.
pub struct Rendezvous {
    listener: TcpListener,
    move_id: u64,
    token: Token,
}

impl Rendezvous {
    /// Listens on `ip` (port 0) for move `move_id`, with a new token.
    pub fn bind(ip: IpAddr, move_id: u64) -> io::Result<Rendezvous> {
        let listener = TcpListener::bind((ip, 0))?;
        listener.set_nonblocking(true)?;
        Ok(Rendezvous {
            listener,
            move_id,
            token: new_token()?,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The token the target must present.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The next connection that presents the move and token, within
    /// `timeout`; others are closed (and logged).
    pub fn accept(&self, timeout: Duration) -> Result<TcpStream, String> {
        let t0 = Instant::now();
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "the target did not connect within {} s",
                    timeout.as_secs()
                ));
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            crate::sys::net::wait_readable(&[self.listener.as_fd()], ms)
                .map_err(|e| format!("wait for the target: {e}"))?;
            let (mut s, peer) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("accept: {e}")),
            };
            match self.hello(&mut s) {
                Ok(true) => return Ok(s),
                Ok(false) => tracing::warn!(
                    move_id = self.move_id,
                    %peer,
                    "page channel: wrong move or token; connection closed"
                ),
                Err(e) => {
                    tracing::debug!(move_id = self.move_id, %peer, error = %e, "page channel: no hello")
                }
            }
        }
    }

    fn hello(&self, s: &mut TcpStream) -> io::Result<bool> {
        let h = read_hello(s)?;
        if h.kind != Kind::Pushed
            || h.move_id != self.move_id
            || !frame::same_token(&h.token, &self.token)
        {
            return Ok(false);
        }
        s.write_all(&frame::welcome(0))?;
        Ok(true)
    }
}

/// The pull's receiver: frames into empty buffers, handed to the
/// installer, until the end frame; returns the bytes received. Takes the
/// channels so that the installer stops when this returns.
fn receive_runs(
    s: &mut TcpStream,
    a: SocketAddr,
    full: mpsc::SyncSender<Run>,
    empty: mpsc::Receiver<Vec<u8>>,
) -> Result<u64, String> {
    let mut runs = Runs::new(a);
    while let Some((addr, len)) = runs.next(s)? {
        // No buffer back: the installer stopped (it says why).
        let mut buf = empty.recv().map_err(|_| "the installer stopped")?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        s.read_exact(&mut buf[..len]).map_err(|e| io_words(a, &e))?;
        full.send(Run { buf, addr, len })
            .map_err(|_| "the installer stopped")?;
    }
    Ok(runs.bytes)
}

/// The frames of a pull or push as they arrive: each run's header, whose
/// bytes the caller then reads from the connection itself.
struct Runs {
    a: SocketAddr,
    bytes: u64,
}

impl Runs {
    fn new(a: SocketAddr) -> Runs {
        Runs { a, bytes: 0 }
    }

    /// The next run's address and length (its bytes follow on `s`), or
    /// `None` at an end frame that matches what arrived.
    fn next(&mut self, s: &mut TcpStream) -> Result<Option<(u64, usize)>, String> {
        let a = self.a;
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).map_err(|e| io_words(a, &e))?;
        let f = Frame::decode(&h).map_err(|e| format!("page server at {a}: {e}"))?;
        match f.kind {
            FrameKind::Run => {
                self.bytes += u64::from(f.len);
                Ok(Some((f.addr, f.len as usize)))
            }
            FrameKind::End if f.addr == self.bytes => Ok(None),
            FrameKind::End => Err(format!(
                "page server at {a}: sent {} bytes, {} arrived",
                f.addr, self.bytes
            )),
            FrameKind::Error => Err(error_text(s, f.len, a)),
        }
    }
}

/// A pull whose runs the caller reads off the connection itself (a stub
/// that receives its pages straight into place,
/// [`crate::restore::stream`]).
pub struct Incoming {
    s: TcpStream,
    runs: Runs,
}

impl Incoming {
    /// Asks `link` for every present page of the original (those inside
    /// `only` unless it is empty).
    pub fn pull(link: &Link, only: &[(u64, u64)]) -> Result<Incoming, String> {
        Incoming::request(Incoming::connect(link)?, link, only)
    }

    /// A bulk connection to `link`, past the hello, that has asked for
    /// nothing yet (a lazy target hands it to its staging holder before
    /// the process runs, [`crate::pages::LazyConfig::pull_socket`]).
    pub fn connect(link: &Link) -> Result<TcpStream, String> {
        let s = link.connect(Kind::Bulk)?;
        deep_buffers(&s);
        Ok(s)
    }

    /// [`Incoming::pull`] on `s`, from [`Incoming::connect`].
    pub fn request(mut s: TcpStream, link: &Link, only: &[(u64, u64)]) -> Result<Incoming, String> {
        s.write_all(&frame::pull(only))
            .map_err(|e| io_words(link.addr, &e))?;
        Ok(Incoming {
            s,
            runs: Runs::new(link.addr),
        })
    }

    /// The connection: a run's bytes are read from it (by anyone holding
    /// the same open socket) before the next call of [`Incoming::next_run`].
    pub fn socket(&self) -> &TcpStream {
        &self.s
    }

    /// Where the pages come from.
    pub fn peer(&self) -> SocketAddr {
        self.runs.a
    }

    /// The next run's address and length, or `None` at the end (checked
    /// against the bytes announced so far). An error frame of the source
    /// is returned as its text.
    pub fn next_run(&mut self) -> Result<Option<(u64, usize)>, String> {
        self.runs.next(&mut self.s)
    }

    /// The page bytes announced so far.
    pub fn bytes(&self) -> u64 {
        self.runs.bytes
    }
}
