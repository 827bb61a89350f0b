//! Lazy restore: the lazy ranges are mapped empty and registered with a
//! userfaultfd made inside the stub; a handler thread fills a missing page
//! (and a read-ahead window around it) from [`PageFetch`] when the process
//! first touches it, and [`LazyPages::install`] lets a caller push pages
//! in while it runs. Ranges the process discards (`MADV_DONTNEED`, munmap)
//! are never filled afterwards; ranges it moves (mremap) are fetched from
//! their old addresses. [`LazyPages::finish`] closes the userfaultfd,
//! which unregisters everything: after that the process owes nothing to
//! the source.
//!
//! A fetch that fails leaves the faulting thread with no page to read:
//! the process is killed with SIGKILL (it cannot go on correctly) and the
//! error is kept for [`LazyStats::error`].

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use migfs_proto::image::Image;
use nix::errno::Errno;
use parking_lot::Mutex;

use crate::error::{RestoreCause, RestoreError, Step};
use crate::restore::inject::{Call, Target};
use crate::sys::{reap, uffd};

/// Read-ahead window of a demand fault.
const WINDOW: u64 = 64 << 10;
const PAGE: u64 = 4096;
/// [`PAGE`] as a length.
const PAGE_LEN: usize = 4096;

/// Where missing pages come from (the source's page server).
pub trait PageFetch: Send + Sync {
    /// The `len` bytes at `addr` of the original.
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String>;
}

/// Installs pages before the process runs (stop-and-copy).
pub type Preload = Box<dyn FnOnce(&LazyPages) -> Result<(), String> + Send>;

/// How to restore lazily.
pub struct LazyConfig {
    /// Source of missing pages.
    pub fetch: Arc<dyn PageFetch>,
    /// Run after registration, before the process's threads run.
    pub preload: Option<Preload>,
}

/// Counters of a lazy restore.
#[derive(Clone, Debug, Default)]
pub struct LazyStats {
    /// Faults served.
    pub demand_faults: u64,
    /// Pages installed for faults (incl. read-ahead).
    pub demand_pages: u64,
    /// Pages installed through [`LazyPages::install`].
    pub installed_pages: u64,
    /// Bytes fetched for faults.
    pub demand_bytes: u64,
    /// The first fatal error, if any (the process was killed).
    pub error: Option<String>,
}

/// What the handler and the pushers share.
struct State {
    uffd: OwnedFd,
    pid: i32,
    lazy: Vec<(u64, u64)>,
    /// Discarded or unmapped: never filled again.
    removed: Mutex<Vec<(u64, u64)>>,
    /// mremap'd: (new start, old start, len).
    moved: Mutex<Vec<(u64, u64, u64)>>,
    demand_faults: AtomicU64,
    demand_pages: AtomicU64,
    installed_pages: AtomicU64,
    demand_bytes: AtomicU64,
    error: Mutex<Option<String>>,
}

/// A running lazy restore.
pub struct LazyPages {
    st: Option<Arc<State>>,
    stop: Option<OwnedFd>,
    handler: Option<JoinHandle<()>>,
}

fn sys(what: &str) -> impl FnOnce(Errno) -> RestoreError + '_ {
    move |errno| {
        RestoreError::new(
            Step::WriteMemory,
            RestoreCause::Sys {
                what: what.to_owned(),
                errno,
            },
        )
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
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

/// Registers the image's lazy ranges in the stub `t`, starts the fault
/// handler and runs the preload.
pub fn start<T: Target>(
    t: &mut T,
    img: &Image,
    cfg: LazyConfig,
) -> Result<LazyPages, RestoreError> {
    let lazy = super::lazy_ranges(img);
    let mut lp = LazyPages {
        st: None,
        stop: None,
        handler: None,
    };
    if !lazy.is_empty() {
        let st = Arc::new(make_state(t, lazy)?);
        let (stop_r, stop_w) = uffd::pipe().map_err(sys("pipe"))?;
        let (st2, fetch) = (Arc::clone(&st), Arc::clone(&cfg.fetch));
        let h = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || handle(&st2, fetch.as_ref(), &stop_r))
            .map_err(io_err("start the fault handler"))?;
        lp.st = Some(st);
        lp.stop = Some(stop_w);
        lp.handler = Some(h);
    }
    if let Some(pre) = cfg.preload {
        pre(&lp).map_err(|why| {
            RestoreError::new(
                Step::WriteMemory,
                RestoreCause::Refused(format!("preload: {why}")),
            )
        })?;
    }
    Ok(lp)
}

fn make_state<T: Target>(t: &mut T, lazy: Vec<(u64, u64)>) -> Result<State, RestoreError> {
    let flags = u32::try_from(libc::O_CLOEXEC | libc::O_NONBLOCK).unwrap_or(0);
    let fd = t.call(0, &Call::Userfaultfd { flags }).map_err(|e| {
        RestoreError::new(
            Step::WriteMemory,
            crate::restore::files::cause("userfaultfd".into(), e),
        )
    })?;
    let fd = i32::try_from(fd).map_err(|_| sys("userfaultfd")(Errno::EBADF))?;
    let pidfd = reap::pidfd_open(t.pid()).map_err(io_err("pidfd_open"))?;
    let ours = uffd::pidfd_getfd(&pidfd, fd).map_err(io_err("pidfd_getfd"))?;
    t.call(0, &Call::Close { fd }).map_err(|e| {
        RestoreError::new(
            Step::WriteMemory,
            crate::restore::files::cause("close".into(), e),
        )
    })?;
    let features =
        uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_EVENT_UNMAP | uffd::FEATURE_EVENT_REMAP;
    uffd::api(&ours, features).map_err(sys("UFFDIO_API"))?;
    for &(s, e) in &lazy {
        uffd::register(&ours, s, e - s)
            .map_err(|errno| sys(&format!("UFFDIO_REGISTER {s:#x}-{e:#x}"))(errno))?;
    }
    Ok(State {
        uffd: ours,
        pid: t.pid(),
        lazy,
        removed: Mutex::new(Vec::new()),
        moved: Mutex::new(Vec::new()),
        demand_faults: AtomicU64::new(0),
        demand_pages: AtomicU64::new(0),
        installed_pages: AtomicU64::new(0),
        demand_bytes: AtomicU64::new(0),
        error: Mutex::new(None),
    })
}

/// The fault loop, until `stop` becomes readable.
fn handle(st: &State, fetch: &dyn PageFetch, stop: &OwnedFd) {
    loop {
        match uffd::poll2(&st.uffd, stop) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                st.fail(format!("poll: {e}"));
                return;
            }
        }
        loop {
            match uffd::read_msg(&st.uffd) {
                Ok(None) => break,
                Ok(Some(m)) => st.on_msg(m, fetch),
                Err(e) => {
                    st.fail(format!("read: {e}"));
                    return;
                }
            }
        }
    }
}

impl State {
    fn fail(&self, why: String) {
        tracing::error!(pid = self.pid, error = %why, "lazy memory failed; killing the process");
        self.error.lock().get_or_insert(why);
        // SAFETY: kill takes a pid and a signal number.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    fn on_msg(&self, m: uffd::Msg, fetch: &dyn PageFetch) {
        match m {
            uffd::Msg::Fault(addr) => self.fault(addr & !(PAGE - 1), fetch),
            uffd::Msg::Removed(s, e) => self.removed.lock().push((s, e)),
            uffd::Msg::Remap { from, to, len } => {
                let old = self.origin(from);
                self.moved.lock().push((to, old, len));
                self.removed.lock().push((from, from + len));
            }
            uffd::Msg::Other(_) => {}
        }
    }

    /// Where the page now at `addr` lived in the original.
    fn origin(&self, addr: u64) -> u64 {
        self.moved
            .lock()
            .iter()
            .rev()
            .find(|&&(to, _, len)| to <= addr && addr < to + len)
            .map_or(addr, |&(to, old, _)| old + (addr - to))
    }

    fn is_removed(&self, addr: u64) -> bool {
        self.removed
            .lock()
            .iter()
            .any(|&(s, e)| s <= addr && addr < e)
    }

    fn fault(&self, page: u64, fetch: &dyn PageFetch) {
        self.demand_faults.fetch_add(1, Ordering::Relaxed);
        // A read-ahead window inside the lazy range, not crossing what was
        // discarded or moved.
        let moved = self
            .moved
            .lock()
            .iter()
            .any(|&(to, _, len)| to <= page && page < to + len);
        let (lo, hi) = if moved {
            (page, page + PAGE)
        } else {
            let r = self.lazy.iter().find(|&&(s, e)| s <= page && page < e);
            let start = (page & !(WINDOW - 1)).max(r.map_or(page, |r| r.0));
            let end = (start + WINDOW).min(r.map_or(page + PAGE, |r| r.1));
            (start, end.max(page + PAGE))
        };
        let len = usize::try_from(hi - lo).unwrap_or(4096);
        let data = if self.is_removed(page) {
            Ok(vec![0u8; PAGE_LEN])
        } else {
            fetch.fetch(self.origin(lo), len)
        };
        let data = match data {
            Ok(d) if d.len() as u64 == hi - lo || self.is_removed(page) => d,
            Ok(d) => {
                self.fail(format!(
                    "page server sent {} bytes for {lo:#x}+{len}",
                    d.len()
                ));
                return;
            }
            Err(e) => {
                self.fail(format!("fetch {page:#x}: {e}"));
                return;
            }
        };
        let base = if self.is_removed(page) { page } else { lo };
        let n = self.install_run(base, &data, true);
        self.demand_pages.fetch_add(n, Ordering::Relaxed);
        self.demand_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        // The faulting page may have been filled by someone else first.
        let _ = uffd::wake(&self.uffd, page, PAGE);
    }

    /// Installs `data` at `addr` page by page where missing; returns the
    /// pages installed.
    fn install_run(&self, addr: u64, data: &[u8], demand: bool) -> u64 {
        let mut at = 0usize;
        let mut pages = 0;
        while at < data.len() {
            let dst = addr + at as u64;
            if !demand && self.is_removed(dst) {
                at += PAGE_LEN;
                continue;
            }
            let (n, err) = uffd::copy(&self.uffd, dst, &data[at..]);
            pages += n / PAGE;
            at += usize::try_from(n).unwrap_or(0);
            match err {
                None => break,
                Some(Errno::EEXIST | Errno::ENOENT | Errno::EINVAL) => at += PAGE_LEN,
                Some(Errno::EAGAIN) => std::thread::yield_now(),
                Some(e) => {
                    tracing::warn!(addr = dst, error = %e, "UFFDIO_COPY failed");
                    break;
                }
            }
        }
        pages
    }
}

impl LazyPages {
    /// Installs `data` (whole pages) at `addr` of the original where the
    /// process has no page yet; returns the pages newly installed.
    pub fn install(&self, addr: u64, data: &[u8]) -> Result<u64, String> {
        let Some(st) = &self.st else { return Ok(0) };
        if let Some(e) = st.error.lock().clone() {
            return Err(e);
        }
        let dst = st.destination(addr);
        let n = st.install_run(dst, data, false);
        st.installed_pages.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// The counters so far.
    pub fn stats(&self) -> LazyStats {
        let Some(st) = &self.st else {
            return LazyStats::default();
        };
        LazyStats {
            demand_faults: st.demand_faults.load(Ordering::Relaxed),
            demand_pages: st.demand_pages.load(Ordering::Relaxed),
            installed_pages: st.installed_pages.load(Ordering::Relaxed),
            demand_bytes: st.demand_bytes.load(Ordering::Relaxed),
            error: st.error.lock().clone(),
        }
    }

    /// Stops the handler and closes the userfaultfd (unregistering every
    /// range); returns the final counters.
    pub fn finish(mut self) -> LazyStats {
        let stats = self.stats();
        self.stop_handler();
        stats
    }

    fn stop_handler(&mut self) {
        if let Some(w) = self.stop.take() {
            let _ = nix::unistd::write(&w, b"x");
        }
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        self.st = None;
    }
}

impl State {
    /// Where a page of the original at `addr` is now (after mremap).
    fn destination(&self, addr: u64) -> u64 {
        self.moved
            .lock()
            .iter()
            .rev()
            .find(|&&(_, old, len)| old <= addr && addr < old + len)
            .map_or(addr, |&(to, old, _)| to + (addr - old))
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
