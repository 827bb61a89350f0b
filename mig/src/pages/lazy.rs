//! Lazy restore (copy-on-reference): the lazy ranges of an image are
//! mapped empty and registered with a userfaultfd made inside the stub; a
//! handler thread here fills a missing page (and a read-ahead window
//! around it) from [`PageFetch`] when the process first touches it, and
//! [`LazyPages::install`] lets any thread push pages in while it runs.
//! [`LazyPages::finish`] closes the userfaultfd, which unregisters
//! everything: after that the process owes nothing to the source. With
//! warm memory ([`LazyConfig::warm`]) pages are staged in it and moved
//! into place (`super::staged`); [`LazyPages::receive`] has a pull's runs
//! received straight into it.
//!
//! # What the process does to its memory meanwhile
//! The userfaultfd reports `MADV_DONTNEED`/`MADV_FREE` (remove), munmap
//! (unmap) and mremap (remap) of lazy memory. An [`OriginMap`](super::ranges::OriginMap) tracks,
//! for every address, where its data is in the original: discarded and
//! unmapped ranges have none (a missing page there is filled with the zero
//! page, and a push never fills it), a moved range is fetched from its old
//! address, and memory the process grows (stack, mremap) reads as zeros.
//! Events are applied under the map's write lock, and every install holds
//! the read lock while it checks the map and copies, so a push cannot fill
//! a range after the process discarded it: the kernel blocks `UFFDIO_COPY`
//! (EAGAIN) while an event is not yet read, and the reader applies it
//! before anyone copies again.
//!
//!
//! A `fork` while memory is lazy hands us the child's userfaultfd (fork
//! event): the child is served like its parent, from a copy of the
//! parent's origin map at the fork, and pushes fill it too; a child that
//! exits or execs is dropped at the next push that finds it gone.
//!
//! # Errors
//! A fetch that fails (or returns the wrong length) leaves a thread with
//! no page to read: the process and its descendants are killed with
//! SIGKILL (the process through its pidfd; it cannot go on correctly),
//! the error is kept ([`LazyPages::failed`], [`LazyStats::error`]) and
//! later installs return it. A restore still in progress then fails
//! naming it.
//!
//! # Limits
//! - A thread touching the destination of an `mremap(MREMAP_FIXED)` that
//!   another thread is still doing may get zeros there.
//! - [`PageFetch::fetch`] must return in bounded time: the handler (and
//!   [`LazyPages::finish`]) waits for it.
//! - Pages still missing at [`LazyPages::finish`] read as zeros after it:
//!   finish only after every page was pushed.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use migfs_proto::image::Image;
use nix::errno::Errno;

use super::fill::{Bytes, State, Stop};
use super::wire::{Incoming, Link};
use crate::error::{MigError, PagesError, RestoreCause, RestoreError, Step};
use crate::restore::inject::{Call, Target};
use crate::sys::{reap, uffd};

/// Read-ahead window of a demand fault.
pub const WINDOW: u64 = 64 << 10;
/// Largest window: faults that follow each other (a sequential scan)
/// double it up to this.
pub const MAX_WINDOW: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// Features a lazy restore needs (plus [`uffd::FEATURE_MOVE`] to stage).
const FEATURES: u64 = uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_EVENT_UNMAP
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_FORK;

/// Where missing pages come from (the source's page server).
pub trait PageFetch: Send + Sync {
    /// The `len` bytes at `addr` of the original (page-aligned, inside
    /// one lazy range).
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String>;
}

/// How to restore lazily.
pub struct LazyConfig {
    /// Source of missing pages.
    pub fetch: Arc<dyn PageFetch>,
    /// Warm memory to stage pages in ([`super::staged`]), asked for
    /// [`staging_need`] bytes.
    pub warm: Option<crate::restore::warm::WarmTake>,
    /// A bulk connection to the page server that has asked for nothing
    /// yet ([`super::wire::Incoming::connect`]): the staging holder takes
    /// it before the process runs and [`LazyPages::receive`] pulls on it.
    pub pull_socket: Option<std::net::TcpStream>,
}

/// Bytes of warm memory a lazy restore of `img` stages its pages in: its
/// lazy ranges after the area's header (the holder's code and arguments).
pub fn staging_need(img: &Image) -> u64 {
    let lazy = super::ranges::normalize(super::lazy_ranges(img));
    lazy.iter().map(|(s, e)| e - s).sum::<u64>() + super::staged::HEADER
}

/// Counters of a lazy restore.
#[derive(Clone, Debug, Default)]
pub struct LazyStats {
    /// Faults served (including ones another install had already filled).
    pub demand_faults: u64,
    /// Pages installed for faults (incl. read-ahead).
    pub demand_pages: u64,
    /// Faults served with the zero page (discarded, unmapped or grown
    /// memory).
    pub zero_pages: u64,
    /// Pages installed through [`LazyPages::install`].
    pub installed_pages: u64,
    /// Pages (either way) moved in from warm staging instead of copied.
    pub staged_pages: u64,
    /// Bytes installed, both ways.
    pub bytes: u64,
    /// Bytes fetched for faults.
    pub demand_bytes: u64,
    /// Time spent in [`PageFetch::fetch`].
    pub fetch_time: Duration,
    /// Discard and unmap events seen.
    pub discards: u64,
    /// mremap events seen.
    pub moves: u64,
    /// Children forked while memory was lazy (served too).
    pub forks: u64,
    /// The first fatal error, if any (the process was killed).
    pub error: Option<String>,
}

/// A running lazy restore. `Send + Sync`: [`LazyPages::install`] may be
/// called from several threads at once.
pub struct LazyPages {
    inner: Option<Inner>,
}

struct Inner {
    st: Arc<State>,
    stop: OwnedFd,
    handler: Option<JoinHandle<()>>,
    handler_tid: Option<i32>,
}

fn restore_err(what: &str) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| {
        RestoreError::new(
            Step::WriteMemory,
            RestoreCause::Io {
                what: what.to_owned(),
                source,
            },
        )
    }
}

fn restore_sys(what: String) -> impl FnOnce(Errno) -> RestoreError {
    move |errno| RestoreError::new(Step::WriteMemory, RestoreCause::Sys { what, errno })
}

/// A push of the original's bytes at `addr` (whole pages): installed
/// wherever the process has no page yet, counted; the pages new to it.
fn push(st: &State, addr: u64, data: Bytes<'_>) -> Result<u64, MigError> {
    let (pid, len) = (st.pid, data.len());
    if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err(PagesError::Refused {
            pid,
            what: format!("install {addr:#x}+{len:#x}: not whole pages"),
        }
        .into());
    }
    if let Some(why) = st.failed() {
        return Err(PagesError::Failed { pid, why }.into());
    }
    match st.install(addr, data) {
        Ok(n) => {
            st.c.installed_pages.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        }
        Err(Stop::Gone) => Err(PagesError::Gone { pid }.into()),
        Err(Stop::Sys(errno)) => Err(PagesError::Sys {
            pid,
            what: format!("install {addr:#x}+{len:#x}"),
            errno,
        }
        .into()),
    }
}

/// Registers the image's lazy ranges in the stub `t` and starts the fault
/// handler (with no lazy ranges: nothing; installs do nothing).
pub fn start<T: Target>(
    t: &mut T,
    img: &Image,
    cfg: LazyConfig,
) -> Result<LazyPages, RestoreError> {
    let lazy = super::ranges::normalize(super::lazy_ranges(img));
    let mut lp = LazyPages { inner: None };
    if !lazy.is_empty() {
        let (st, kick_r) = make_state(t, img, &lazy, cfg.pull_socket)?;
        let st = Arc::new(st);
        let (stop_r, stop_w) = uffd::pipe().map_err(restore_sys("pipe".into()))?;
        let (st2, fetch) = (Arc::clone(&st), Arc::clone(&cfg.fetch));
        let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
        let h = std::thread::Builder::new()
            .name(format!("uffd-{}", t.pid()))
            .spawn(move || {
                let _ = tid_tx.send(nix::unistd::gettid().as_raw());
                handler(&st2, fetch.as_ref(), &stop_r, &kick_r);
            })
            .map_err(restore_err("start the fault handler"))?;
        lp.inner = Some(Inner {
            st,
            stop: stop_w,
            handler: Some(h),
            handler_tid: tid_rx.recv_timeout(Duration::from_secs(1)).ok(),
        });
        tracing::debug!(pid = t.pid(), ranges = lazy.len(), "lazy memory registered");
    }
    Ok(lp)
}

/// The lazy state of the stub `t`: its userfaultfd with every lazy range
/// registered. Also returns the read end of the kick pipe.
fn make_state<T: Target>(
    t: &mut T,
    img: &Image,
    lazy: &[(u64, u64)],
    socket: Option<std::net::TcpStream>,
) -> Result<(State, OwnedFd), RestoreError> {
    let available = uffd::available_features().map_err(restore_err("userfaultfd features"))?;
    if available & FEATURES != FEATURES {
        return Err(RestoreError::new(
            Step::WriteMemory,
            RestoreCause::Refused(format!(
                "this kernel's userfaultfd lacks fork/remove/unmap/remap events (features {available:#x})"
            )),
        ));
    }
    let (ours, pidfd) = take_uffd(t)?;
    let holder = t.take_holder();
    let features = if holder.is_some() && available & uffd::FEATURE_MOVE != 0 {
        FEATURES | uffd::FEATURE_MOVE
    } else {
        FEATURES
    };
    uffd::api(&ours, features).map_err(restore_sys("UFFDIO_API".into()))?;
    for &(s, e) in lazy {
        uffd::register(&ours, s, e - s, uffd::MODE_MISSING)
            .map_err(restore_sys(format!("UFFDIO_REGISTER {s:#x}-{e:#x}")))?;
    }
    let staging = match holder {
        Some(h) if features & uffd::FEATURE_MOVE != 0 => stage(t, img, &ours, h, socket),
        // Dropped: the holder is killed; the stub unmaps its memory.
        _ => None,
    };
    let (kick_r, kick_w) = uffd::pipe().map_err(restore_sys("pipe".into()))?;
    Ok((
        State::new(t.pid(), pidfd, ours, lazy, kick_w, staging),
        kick_r,
    ))
}

/// Makes the warm memory the stub `t` was made from its staging area,
/// moved out of by `holder` ([`super::staged`]); `None` (after a warning)
/// when that cannot be set up, and then the stub unmaps the area.
fn stage<T: Target>(
    t: &mut T,
    img: &Image,
    uffd: &OwnedFd,
    holder: crate::restore::warm::Warm,
    socket: Option<std::net::TcpStream>,
) -> Option<Arc<super::staged::Staging>> {
    let pid = holder.pid().as_raw();
    let (start, end) = t.take_warm()?;
    let res = (|| -> Result<super::staged::Staging, String> {
        t.call(
            0,
            &Call::Madvise {
                addr: start,
                len: end - start,
                advice: libc::MADV_DONTFORK,
            },
        )
        .map_err(|e| format!("MADV_DONTFORK: {e}"))?;
        uffd::register(uffd, start, end - start, uffd::MODE_MISSING)
            .map_err(|e| format!("register the staging area: {e}"))?;
        let creds = img.process.as_ref().and_then(|p| p.creds.as_ref());
        super::staged::Staging::start(t, holder, start, end, uffd, socket, creds).inspect_err(
            |_| {
                let _ = uffd::unregister(uffd, start, end - start);
            },
        )
    })();
    match res {
        Ok(s) => {
            tracing::debug!(
                holder = pid,
                mib = (end - start) >> 20,
                "lazy pages staged in warm memory"
            );
            Some(Arc::new(s))
        }
        Err(e) => {
            tracing::warn!(holder = pid, error = %e, "warm staging could not be set up; copying");
            let _ = t.call(
                0,
                &Call::Munmap {
                    addr: start,
                    len: end - start,
                },
            );
            None
        }
    }
}

/// A userfaultfd made in the stub (it covers the mm of its maker; the
/// stub is still privileged, so faults from kernel mode are reported
/// too), taken here with `pidfd_getfd` and closed there; and the stub's
/// pidfd.
fn take_uffd<T: Target>(t: &mut T) -> Result<(OwnedFd, OwnedFd), RestoreError> {
    let cause = |what: &str| {
        let what = what.to_owned();
        move |e| RestoreError::new(Step::WriteMemory, crate::restore::files::cause(what, e))
    };
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK).cast_unsigned();
    let fd = t
        .call(0, &Call::Userfaultfd { flags })
        .map_err(cause("userfaultfd in the stub"))?;
    let fd = i32::try_from(fd).map_err(|_| restore_sys("userfaultfd".into())(Errno::EBADF))?;
    let pidfd = reap::pidfd_open(t.pid()).map_err(restore_err("pidfd_open the stub"))?;
    let ours = uffd::pidfd_getfd(&pidfd, fd);
    t.call(0, &Call::Close { fd })
        .map_err(cause("close the userfaultfd in the stub"))?;
    let ours = ours.map_err(restore_err("pidfd_getfd the userfaultfd"))?;
    Ok((ours, pidfd))
}

/// The fault loop, until `stop` becomes readable: serves queued faults,
/// then waits for a message on any address space's userfaultfd.
fn handler(st: &State, fetch: &dyn PageFetch, stop: &OwnedFd, kick: &OwnedFd) {
    loop {
        while let Some((mm, addr)) = st.next_fault() {
            st.fault(&mm, addr, fetch);
        }
        let mms = st.mms();
        let mut fds: Vec<&OwnedFd> = vec![stop, kick];
        fds.extend(mms.iter().map(|m| &m.uffd));
        let ready = match uffd::poll(&fds) {
            Ok(r) => r,
            Err(e) => {
                st.fail(format!("poll the userfaultfd: {e}"));
                return;
            }
        };
        if ready[1] {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(kick, &mut buf), Ok(n) if n > 0) {}
        }
        for (mm, _) in mms.iter().zip(&ready[2..]).filter(|(_, r)| **r) {
            if let Err(e) = st.drain(mm) {
                st.fail(format!("read the userfaultfd: {e}"));
                return;
            }
        }
        if ready[0] {
            // Serve what is already asked for, then stop.
            for mm in &mms {
                let _ = st.drain(mm);
            }
            while let Some((mm, addr)) = st.next_fault() {
                st.fault(&mm, addr, fetch);
            }
            return;
        }
    }
}

impl LazyPages {
    /// Installs `data` (whole pages) that the original had at `addr`,
    /// wherever the process has no page for it yet; returns the pages
    /// newly installed. Pages the process already has, discarded or
    /// unmapped are skipped. Safe to call from several threads, and while
    /// the fault handler runs (the background push).
    pub fn install(&self, addr: u64, data: &[u8]) -> Result<u64, MigError> {
        match &self.inner {
            Some(inner) => push(&inner.st, addr, Bytes::Here(data)),
            None => Ok(0),
        }
    }

    /// Pulls every present page of the original (inside `only` unless it
    /// is empty) from `link` and installs it: with warm staging the holder
    /// reads each run off its connection into the staging area
    /// (one copy, into memory that is there already) and it is moved into
    /// place; otherwise (or once the area is full) runs are read here and
    /// installed as [`LazyPages::install`] does. Returns the pages newly
    /// installed, the bytes received and the time spent installing.
    pub fn receive(
        &self,
        link: &Link,
        only: &[(u64, u64)],
    ) -> Result<(u64, u64, Duration), MigError> {
        let Some(inner) = &self.inner else {
            return Err(PagesError::Refused {
                pid: 0,
                what: "no lazy memory to receive into".into(),
            }
            .into());
        };
        let st = &inner.st;
        let pid = st.pid;
        let refused = |what: String| MigError::from(PagesError::Refused { pid, what });
        // The holder's connection while staging works, else a new one,
        // received here.
        let taken = st.staging().and_then(|sg| Some((sg.take_socket()?, sg)));
        let (mut pull, sock) = match taken {
            Some(((s, fd), sg)) => (
                Incoming::request(s, link, only).map_err(refused)?,
                Some((sg, fd)),
            ),
            None => (Incoming::pull(link, only).map_err(refused)?, None),
        };
        let res = (|| {
            let (mut n, mut busy) = (0u64, Duration::ZERO);
            let mut buf = Vec::new();
            while let Some((addr, len)) = pull.next_run().map_err(refused)? {
                let size = len as u64;
                if !addr.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
                    return Err(refused(format!(
                        "the page server sent {addr:#x}+{size:#x}: not whole pages"
                    )));
                }
                if let Some(why) = st.failed() {
                    return Err(PagesError::Failed { pid, why }.into());
                }
                let t = std::time::Instant::now();
                let staged = sock
                    .as_ref()
                    .and_then(|(sg, fd)| Some((sg, *fd, sg.reserve(size)?)));
                let bytes = match staged {
                    Some((sg, fd, at)) => {
                        sg.recv(fd, at, size).map_err(refused)?;
                        Bytes::Staged { at, len: size }
                    }
                    None => {
                        buf.resize(len, 0);
                        std::io::Read::read_exact(&mut pull.socket(), &mut buf)
                            .map_err(|e| refused(format!("receive from the page server: {e}")))?;
                        Bytes::Here(&buf)
                    }
                };
                n += push(st, addr, bytes)?;
                busy += t.elapsed();
            }
            Ok((n, pull.bytes(), busy))
        })();
        if let Some((sg, fd)) = sock {
            sg.close_fd(fd);
        }
        res
    }

    /// The counters so far.
    pub fn stats(&self) -> LazyStats {
        let Some(inner) = &self.inner else {
            return LazyStats::default();
        };
        let c = &inner.st.c;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LazyStats {
            demand_faults: get(&c.demand_faults),
            demand_pages: get(&c.demand_pages),
            zero_pages: get(&c.zero_pages),
            installed_pages: get(&c.installed_pages),
            staged_pages: inner.st.staged_pages(),
            bytes: get(&c.bytes),
            demand_bytes: get(&c.demand_bytes),
            fetch_time: Duration::from_nanos(get(&c.fetch_ns)),
            discards: get(&c.discards),
            moves: get(&c.moves),
            forks: get(&c.forks),
            error: inner.st.failed(),
        }
    }

    /// Ends the lazy restore on an error found outside the handler (a
    /// push whose pages are bad): kills the process and its descendants
    /// and keeps `why` as the fatal error (the first one wins).
    pub fn abort(&self, why: String) {
        if let Some(inner) = &self.inner {
            inner.st.fail(why);
        }
    }

    /// The handler's fatal error, if it had one (the process was killed).
    pub fn failed(&self) -> Option<String> {
        self.inner.as_ref().and_then(|i| i.st.failed())
    }

    /// The thread id of the fault handler (for its CPU mask).
    pub fn handler_tid(&self) -> Option<i32> {
        self.inner.as_ref().and_then(|i| i.handler_tid)
    }

    /// Bytes of warm memory its pages are staged in (0: none).
    pub fn staging_bytes(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.st.staging_bytes())
    }

    /// Whether there is lazy memory at all.
    pub fn is_active(&self) -> bool {
        self.inner.is_some()
    }

    /// Runs `[start, end)` of the process whose data is still to come from
    /// the original (after discards and moves), in original addresses.
    pub fn pending_origins(&self) -> Vec<(u64, u64)> {
        let Some(inner) = &self.inner else {
            return Vec::new();
        };
        inner.st.pending_origins()
    }

    /// Stops the handler (after serving the faults already reported) and
    /// closes the userfaultfd, which unregisters every range; returns the
    /// final counters. Pages not installed by then read as zeros.
    pub fn finish(mut self) -> LazyStats {
        self.stop_handler();
        let stats = self.stats();
        self.inner = None;
        stats
    }

    fn stop_handler(&mut self) {
        if let Some(inner) = &mut self.inner {
            let _ = nix::unistd::write(&inner.stop, b"x");
            if let Some(h) = inner.handler.take() {
                let _ = h.join();
            }
            inner.st.close_staging();
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        self.stop_handler();
    }
}

impl std::fmt::Debug for LazyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPages")
            .field("stats", &self.stats())
            .finish()
    }
}
