//! The engine of a lazy restore ([`super::lazy`]): the address spaces
//! being filled (the restored process, and any child it forks while
//! memory is still lazy), their origin maps, and the three ways pages
//! arrive: a fault (fetch a window, install it), a push (install at
//! every place the original's pages live now), the zero page (memory
//! with no origin).
//!
//! Locking: each address space's origin map is written only while its
//! userfaultfd messages are read and applied ([`State::drain`]), and
//! read across every `UFFDIO_COPY` / `UFFDIO_ZEROPAGE` into it. The list
//! of address spaces is never held while a map lock is taken.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::unistd::Pid;
use parking_lot::{Mutex, RwLock};

use super::lazy::{MAX_WINDOW, PageFetch, WINDOW};
use super::ranges::{OriginMap, Seg};
use super::staged::Staging;
use crate::sys::{procfs, uffd};

const PAGE: u64 = 4096;
/// Sequential scans followed at once.
const STREAMS: usize = 8;

/// Counters of a lazy restore.
#[derive(Default)]
pub(super) struct Counters {
    pub demand_faults: AtomicU64,
    pub demand_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub installed_pages: AtomicU64,
    pub bytes: AtomicU64,
    pub demand_bytes: AtomicU64,
    pub fetch_ns: AtomicU64,
    pub discards: AtomicU64,
    pub moves: AtomicU64,
    pub forks: AtomicU64,
}

/// Why an install stopped.
pub(super) enum Stop {
    /// The process is gone.
    Gone,
    /// Another errno.
    Sys(Errno),
}

/// One address space being filled.
pub(super) struct Mm {
    /// Its userfaultfd.
    pub uffd: OwnedFd,
    /// Its pagemap, to skip pages already there (the restored process's;
    /// a forked child's pid is not known).
    pagemap: Option<procfs::Pagemap>,
    map: RwLock<OriginMap>,
    /// Read-ahead: where a sequential fault would come next, and the
    /// window that led there (several, for threads scanning at once).
    streams: Mutex<[(u64, u64); STREAMS]>,
    /// A forked child (not the restored process).
    child: bool,
    /// Warm staging (the restored process only).
    staging: Option<Arc<Staging>>,
}

impl Mm {
    fn new(
        uffd: OwnedFd,
        pagemap: Option<procfs::Pagemap>,
        map: OriginMap,
        child: bool,
        staging: Option<Arc<Staging>>,
    ) -> Mm {
        Mm {
            uffd,
            pagemap,
            map: RwLock::new(map),
            streams: Mutex::new([(0, WINDOW); STREAMS]),
            child,
            staging,
        }
    }

    /// An event of the process touched `[s, e)`.
    fn touched(&self, s: u64, e: u64) {
        if let Some(sg) = &self.staging {
            sg.touched(s, e);
        }
    }
}

/// What the handler and the pushers share.
pub(super) struct State {
    /// The restored process.
    pub pid: i32,
    pidfd: OwnedFd,
    /// The restored process first, then forked children.
    mms: RwLock<Vec<Arc<Mm>>>,
    /// Faults read (by anyone) and not served yet.
    faults: Mutex<VecDeque<(Arc<Mm>, u64)>>,
    /// Written when faults were queued or an address space added.
    kick: OwnedFd,
    pub c: Counters,
    error: Mutex<Option<String>>,
}

impl State {
    /// The state of restored process `pid` whose userfaultfd `uffd` has
    /// `lazy` registered.
    pub fn new(
        pid: i32,
        pidfd: OwnedFd,
        uffd: OwnedFd,
        lazy: &[(u64, u64)],
        kick: OwnedFd,
        staging: Option<Arc<Staging>>,
    ) -> State {
        let pagemap = procfs::Pagemap::open(Pid::from_raw(pid)).ok();
        let root = Mm::new(uffd, pagemap, OriginMap::identity(lazy), false, staging);
        State {
            pid,
            pidfd,
            mms: RwLock::new(vec![Arc::new(root)]),
            faults: Mutex::new(VecDeque::new()),
            kick,
            c: Counters::default(),
            error: Mutex::new(None),
        }
    }

    /// The restored process's address space (always the first).
    fn root(&self) -> Arc<Mm> {
        Arc::clone(&self.mms.read()[0])
    }

    /// Pages moved in from warm staging so far.
    pub fn staged_pages(&self) -> u64 {
        self.root()
            .staging
            .as_ref()
            .map_or(0, |s| s.moved.load(Ordering::Relaxed))
    }

    /// Bytes of the warm staging area (0: none).
    pub fn staging_bytes(&self) -> u64 {
        self.root().staging.as_ref().map_or(0, |s| s.bytes())
    }

    /// The warm staging, if there is one and it still works.
    pub fn staging(&self) -> Option<Arc<Staging>> {
        self.root().staging.clone().filter(|s| s.alive())
    }

    /// Ends warm staging (once nothing installs any more).
    pub fn close_staging(&self) {
        let root = self.root();
        if let Some(sg) = &root.staging {
            sg.close(&root.uffd);
        }
    }

    /// The address spaces being filled, the restored process first.
    pub fn mms(&self) -> Vec<Arc<Mm>> {
        self.mms.read().clone()
    }

    /// The next fault to serve.
    pub fn next_fault(&self) -> Option<(Arc<Mm>, u64)> {
        self.faults.lock().pop_front()
    }

    /// Records the first fatal error and kills the process and every
    /// descendant (a forked child may be the one waiting for a page).
    pub fn fail(&self, why: String) {
        let mut e = self.error.lock();
        if e.is_none() {
            tracing::error!(pid = self.pid, error = %why, "lazy memory failed; killing the process");
            let children = descendants(self.pid);
            let _ = uffd::pidfd_kill(&self.pidfd, libc::SIGKILL);
            for c in children {
                let _ = crate::sys::task::kill(Pid::from_raw(c), libc::SIGKILL);
            }
            *e = Some(why);
        }
    }

    /// The first fatal error.
    pub fn failed(&self) -> Option<String> {
        self.error.lock().clone()
    }

    /// The original's ranges still to come into the restored process.
    pub fn pending_origins(&self) -> Vec<(u64, u64)> {
        let runs = self.root().map.read().runs();
        super::ranges::normalize(
            runs.iter()
                .map(|s| (s.origin, s.origin + (s.end - s.start)))
                .collect(),
        )
    }

    /// Reads every pending message of `mm`: applies events to its map
    /// under the write lock, queues faults, adopts forked children.
    /// Returns whether it read anything.
    pub fn drain(&self, mm: &Arc<Mm>) -> Result<bool, Errno> {
        let mut map = mm.map.write();
        let mut any = false;
        let mut kick = false;
        while let Some(m) = uffd::read_msg(&mm.uffd)? {
            any = true;
            match m {
                uffd::Msg::Fault(addr) => {
                    self.faults.lock().push_back((Arc::clone(mm), addr));
                    kick = true;
                }
                uffd::Msg::Removed(s, e) | uffd::Msg::Unmapped(s, e) => {
                    mm.touched(s, e);
                    map.discard(s, e);
                    self.c.discards.fetch_add(1, Ordering::Relaxed);
                }
                uffd::Msg::Remap { from, to, len } => {
                    mm.touched(from, from + len);
                    mm.touched(to, to + len);
                    map.moved(from, to, len);
                    self.c.moves.fetch_add(1, Ordering::Relaxed);
                }
                uffd::Msg::Fork(fd) => {
                    // The child has what the parent had at this moment.
                    let child = Mm::new(fd, None, map.clone(), true, None);
                    self.mms.write().push(Arc::new(child));
                    self.c.forks.fetch_add(1, Ordering::Relaxed);
                    kick = true;
                }
                uffd::Msg::Other(ev) => {
                    tracing::warn!(pid = self.pid, event = ev, "unexpected userfaultfd event");
                }
            }
        }
        drop(map);
        if kick {
            let _ = nix::unistd::write(&self.kick, b"k");
        }
        Ok(any)
    }

    /// Lets a pending event of `mm` be read (UFFDIO_COPY said EAGAIN).
    fn settle(&self, mm: &Arc<Mm>) {
        if !matches!(self.drain(mm), Ok(true)) {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Serves a fault at `addr` of `mm`.
    pub fn fault(&self, mm: &Arc<Mm>, addr: u64, fetch: &dyn PageFetch) {
        let page = addr & !(PAGE - 1);
        self.c.demand_faults.fetch_add(1, Ordering::Relaxed);
        if self.failed().is_none() {
            // A few rounds: the map may change under a slow fetch.
            for _ in 0..4 {
                match self.fault_once(mm, page, fetch) {
                    Ok(true) | Err(Stop::Gone) => break,
                    Ok(false) => {}
                    Err(Stop::Sys(e)) => {
                        self.fail(format!("install the page at {page:#x}: {e}"));
                        break;
                    }
                }
            }
        }
        // Someone else may have filled it (no wake then); waking twice is
        // harmless.
        let _ = uffd::wake(&mm.uffd, page, PAGE);
    }

    /// One attempt; true when the faulting page is dealt with.
    fn fault_once(&self, mm: &Arc<Mm>, page: u64, fetch: &dyn PageFetch) -> Result<bool, Stop> {
        let seg = mm.map.read().at(page);
        let Some(seg) = seg else {
            self.zero_fill(mm, page)?;
            return Ok(true);
        };
        let Some((lo, hi)) = window(mm, page, seg) else {
            return Ok(true);
        };
        let orig = seg.origin + (lo - seg.start);
        let len = usize::try_from(hi - lo).unwrap_or(0);
        let t = Instant::now();
        let data = fetch.fetch(orig, len);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.c.fetch_ns.fetch_add(ns, Ordering::Relaxed);
        let data = match data {
            Ok(d) if d.len() == len => d,
            Ok(d) => {
                let n = d.len();
                self.fail(format!(
                    "the page server sent {n} bytes for {orig:#x}+{len:#x}"
                ));
                return Ok(true);
            }
            Err(e) => {
                self.fail(format!(
                    "fetch {orig:#x}+{len:#x} (fault at {page:#x}): {e}"
                ));
                return Ok(true);
            }
        };
        self.c.demand_bytes.fetch_add(len as u64, Ordering::Relaxed);
        let n = self.install_orig(mm, orig, Bytes::Here(&data))?;
        self.c.demand_pages.fetch_add(n, Ordering::Relaxed);
        // Done unless the page now stands for something else.
        Ok(mm.map.read().at(page) == Some(seg))
    }

    /// Maps the zero page at `page` if it still has no origin.
    fn zero_fill(&self, mm: &Arc<Mm>, page: u64) -> Result<(), Stop> {
        loop {
            let map = mm.map.read();
            if map.at(page).is_some() {
                return Ok(());
            }
            let f = uffd::zeropage(&mm.uffd, page, PAGE);
            drop(map);
            match f.err {
                None => {
                    self.c.zero_pages.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Some(Errno::EEXIST | Errno::ENOENT | Errno::EINVAL) => return Ok(()),
                Some(Errno::EAGAIN) => self.settle(mm),
                Some(Errno::ESRCH) => return Err(Stop::Gone),
                Some(e) => return Err(Stop::Sys(e)),
            }
        }
    }

    /// A push: installs the original's `data` (here, or already staged)
    /// at `orig` in every address space; returns the pages new in the
    /// restored process. A forked child gets staged bytes read back; one
    /// that is gone (exited, exec'd) is dropped.
    pub fn install(&self, orig: u64, data: Bytes<'_>) -> Result<u64, Stop> {
        let mut root = 0;
        let mut back: Option<Vec<u8>> = None;
        for mm in self.mms() {
            let data = match data {
                Bytes::Staged { at, len } if mm.child => {
                    if back.is_none() {
                        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
                        self.root()
                            .staging
                            .as_ref()
                            .ok_or(Stop::Sys(Errno::EINVAL))?
                            .read_back(at, &mut buf)
                            .map_err(Stop::Sys)?;
                        back = Some(buf);
                    }
                    Bytes::Here(back.as_deref().unwrap_or_default())
                }
                d => d,
            };
            match self.install_orig(&mm, orig, data) {
                Ok(n) if !mm.child => root = n,
                Ok(_) => {}
                Err(Stop::Gone) if mm.child => self.mms.write().retain(|m| !Arc::ptr_eq(m, &mm)),
                Err(e) => return Err(e),
            }
        }
        Ok(root)
    }

    /// Installs the original's `data` at `orig` wherever it lives now in
    /// `mm`, skipping pages already there and ranges discarded; returns
    /// the pages installed.
    fn install_orig(&self, mm: &Arc<Mm>, orig: u64, data: Bytes<'_>) -> Result<u64, Stop> {
        let end = orig + data.len();
        let mut cursor = orig;
        let mut pages = 0;
        while cursor < end {
            let map = mm.map.read();
            let mut dests = map.destinations(cursor, end);
            // In original order, so that `cursor` says what is done.
            dests.sort_unstable_by_key(|d| d.1);
            let mut again = None;
            'dests: for (here, o, len) in dests {
                for (s, e) in missing(mm, here, here + len) {
                    let src = data
                        .sub(o - orig + (s - here), e - s)
                        .ok_or(Stop::Sys(Errno::EINVAL))?;
                    let (done, n, stop) = copy_run(mm, s, src);
                    pages += n;
                    match stop {
                        None => {}
                        Some(Errno::EAGAIN) => {
                            again = Some(o + (s - here) + done);
                            break 'dests;
                        }
                        Some(Errno::ESRCH) => return Err(Stop::Gone),
                        Some(e) => return Err(Stop::Sys(e)),
                    }
                }
            }
            drop(map);
            match again {
                Some(c) => {
                    cursor = c;
                    self.settle(mm);
                }
                None => break,
            }
        }
        self.c.bytes.fetch_add(pages * PAGE, Ordering::Relaxed);
        Ok(pages)
    }
}

/// `UFFDIO_COPY` of `src` to `dst` in `mm`, page by page past pages
/// already there or no longer registered. Returns the bytes dealt with,
/// the pages installed, and the errno that stopped it (EAGAIN: an event
/// is waiting to be read; call again at `dst + done`).
///
/// One copy may not span two mappings (the kernel refuses the whole call),
/// and a run of the original often does: adjacent mappings are one run
/// for the page server. So a refused copy of several pages is tried
/// again with half as many, down to one page; only a single page the
/// kernel refuses is skipped.
///
/// With warm staging the run is first staged and moved in whole
/// ([`Staging::place`], or [`Staging::move_staged`] when it was received
/// there); whatever that leaves is copied.
fn copy_run(mm: &Mm, dst: u64, src: Bytes<'_>) -> (u64, u64, Option<Errno>) {
    let gaps = |lo, hi| missing(mm, lo, hi);
    let placed = mm.staging.as_ref().and_then(|sg| match src {
        Bytes::Here(d) => sg.place(dst, d, &gaps),
        Bytes::Staged { at, len } => sg.move_staged(dst, at, len, &gaps),
    });
    let (dealt, moved) = placed.unwrap_or((0, 0));
    if dealt >= src.len() {
        return (dealt, moved / PAGE, None);
    }
    let (done, pages, err) = match src {
        Bytes::Here(d) => copy_pages(mm, dst + dealt, &d[usize::try_from(dealt).unwrap_or(0)..]),
        Bytes::Staged { at, len } => {
            let mut buf = vec![0u8; usize::try_from(len - dealt).unwrap_or(0)];
            let read = mm
                .staging
                .as_ref()
                .ok_or(Errno::EINVAL)
                .and_then(|sg| sg.read_back(at + dealt, &mut buf));
            match read {
                Ok(()) => copy_pages(mm, dst + dealt, &buf),
                Err(e) => (0, 0, Some(e)),
            }
        }
    };
    (dealt + done, moved / PAGE + pages, err)
}

/// The `UFFDIO_COPY` loop of [`copy_run`].
fn copy_pages(mm: &Mm, dst: u64, src: &[u8]) -> (u64, u64, Option<Errno>) {
    let len = src.len() as u64;
    let (mut at, mut pages) = (0u64, 0u64);
    let mut step = len;
    while at < len {
        let n = step.min(len - at);
        let from = usize::try_from(at).unwrap_or(usize::MAX);
        let to = usize::try_from(at + n).unwrap_or(usize::MAX);
        let f = uffd::copy(&mm.uffd, dst + at, &src[from..to]);
        at += f.done;
        pages += f.done / PAGE;
        match f.err {
            None => step = step.saturating_mul(2),
            // Already there: the next page may not be.
            Some(Errno::EEXIST) => at += PAGE,
            // Past the end of a mapping, or not registered there.
            Some(Errno::ENOENT | Errno::EINVAL) if n - f.done > PAGE => {
                step = ((n - f.done) / 2).next_multiple_of(PAGE);
            }
            Some(Errno::ENOENT | Errno::EINVAL) => {
                at += PAGE;
                step = len;
            }
            Some(e) => return (at, pages, Some(e)),
        }
    }
    (at, pages, None)
}

/// A run's bytes: here, or already in the staging area (received there).
#[derive(Clone, Copy)]
pub(super) enum Bytes<'a> {
    /// In this process.
    Here(&'a [u8]),
    /// `len` bytes at `at` of the staging area.
    Staged {
        /// Where.
        at: u64,
        /// How many.
        len: u64,
    },
}

impl Bytes<'_> {
    pub(super) fn len(&self) -> u64 {
        match self {
            Bytes::Here(d) => d.len() as u64,
            Bytes::Staged { len, .. } => *len,
        }
    }

    /// `n` bytes from `off`.
    fn sub(&self, off: u64, n: u64) -> Option<Bytes<'_>> {
        if off.checked_add(n)? > self.len() {
            return None;
        }
        Some(match self {
            Bytes::Here(d) => {
                let (o, n) = (usize::try_from(off).ok()?, usize::try_from(n).ok()?);
                Bytes::Here(d.get(o..o + n)?)
            }
            Bytes::Staged { at, .. } => Bytes::Staged {
                at: at + off,
                len: n,
            },
        })
    }
}

/// Whether pagemap entry `e` is a page the process has.
fn here(e: u64) -> bool {
    e & (procfs::PM_PRESENT | procfs::PM_SWAP) != 0 && !procfs::is_pte_marker(e)
}

/// The runs of `[lo, hi)` that `mm` has no page for (by its pagemap; all
/// of it when that cannot be read).
fn missing(mm: &Mm, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let Some(ents) = mm
        .pagemap
        .as_ref()
        .and_then(|pm| pm.entries(lo, hi, PAGE).ok())
    else {
        return vec![(lo, hi)];
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in ents.iter().enumerate() {
        if here(e) {
            continue;
        }
        let p = lo + i as u64 * PAGE;
        match runs.last_mut() {
            Some(r) if r.1 == p => r.1 = p + PAGE,
            _ => runs.push((p, p + PAGE)),
        }
    }
    runs
}

/// The read-ahead window for a fault at `page` in `seg`: [`WINDOW`]
/// aligned around it, or, when the fault comes where the last window of
/// a stream ended, twice that window forward (up to [`MAX_WINDOW`]);
/// inside `seg`, and only the run of still-missing pages around `page`.
/// `None` when `page` is already there.
fn window(mm: &Mm, page: u64, seg: Seg) -> Option<(u64, u64)> {
    let mut streams = mm.streams.lock();
    let hit = streams.iter().position(|s| s.0 == page);
    let (lo, hi, len) = match hit {
        Some(i) => {
            let len = (streams[i].1 * 2).min(MAX_WINDOW);
            (page, page + len, len)
        }
        None => {
            let base = page & !(WINDOW - 1);
            (base, base + WINDOW, WINDOW)
        }
    };
    let (lo, hi) = (lo.max(seg.start), hi.min(seg.end));
    let (lo, hi) = missing_around(mm, page, lo, hi)?;
    // The stream followed moves to the front; a new one pushes the
    // oldest out.
    let slot = hit.unwrap_or(STREAMS - 1);
    streams[..=slot].rotate_right(1);
    streams[0] = (hi, len);
    Some((lo, hi))
}

/// The run of pages of `[lo, hi)` around `page` that `mm` does not have
/// yet; `None` when it has `page`.
fn missing_around(mm: &Mm, page: u64, lo: u64, hi: u64) -> Option<(u64, u64)> {
    let Some(ents) = mm
        .pagemap
        .as_ref()
        .and_then(|pm| pm.entries(lo, hi, PAGE).ok())
    else {
        return Some((lo, hi));
    };
    let idx = usize::try_from((page - lo) / PAGE).ok()?;
    if idx >= ents.len() || here(ents[idx]) {
        return None;
    }
    let (mut a, mut b) = (idx, idx + 1);
    while a > 0 && !here(ents[a - 1]) {
        a -= 1;
    }
    while b < ents.len() && !here(ents[b]) {
        b += 1;
    }
    Some((lo + a as u64 * PAGE, lo + b as u64 * PAGE))
}

/// Every descendant of `pid` (children, theirs, ...), from
/// `/proc/PID/task/*/children`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if !out.contains(&c) {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}
