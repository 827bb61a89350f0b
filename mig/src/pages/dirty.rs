//! Dirty-page tracking for pre-copy (DESIGN "Migration" step 2), without
//! soft-dirty: a userfaultfd made inside the running process (injected
//! `userfaultfd(2)` while it is briefly frozen, taken with
//! `pidfd_getfd`, closed there) in asynchronous write-protect mode
//! (`UFFD_FEATURE_WP_ASYNC` + `WP_UNPOPULATED`): the kernel resolves a
//! write to a protected page itself and only clears the page's protection
//! bit, which `PAGEMAP_SCAN` reports as `PAGE_IS_WRITTEN` and re-protects
//! in the same walk.
//!
//! [`Tracker::collect`] returns the pages whose contents may have changed
//! since the previous collect (or [`Tracker::start`]):
//! - pages written (`PAGE_IS_WRITTEN`, atomically protected again);
//! - pages that held data at the previous collect and hold none now
//!   (`MADV_DONTNEED` empties a page without writing it);
//! - every mapped page of the ranges in a mapping that is not tracked (a
//!   mapping made after start, or one that could not be registered):
//!   reported in full at every collect.
//!
//! Superset cases (documented, never a miss): a page discarded between
//! the presence scan and the write scan of one collect is reported again
//! at the next collect; a page swapped out since the last collect is
//! reported (it left RAM; reading it swaps it in again); untracked
//! mappings are always reported.
//! Not reported: addresses outside the ranges given to `start` (new
//! mappings elsewhere, memory mremap'd out of the ranges) and ranges
//! unmapped since the last collect: the caller treats what the final
//! capture maps outside the tracked ranges as dirty.
//!
//! [`Tracker::stop`] closes the userfaultfd; the kernel then drops every
//! protection and the process runs on unaffected. Needs Linux 6.7
//! (`PAGEMAP_SCAN`, `WP_ASYNC`) and root (ptrace, pidfd_getfd).

use std::os::fd::OwnedFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::unistd::Pid;

use super::ranges::{intersect, normalize, subtract};
use crate::capture::remote::Remote;
use crate::error::{MigError, PagesError};
use crate::freeze::{self, Frozen};
use crate::sys::pagemap::{self, Query, Scanner};
use crate::sys::{procfs, reap, uffd};

/// How long `start` waits for every thread to stop.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

/// Features the tracker needs.
const FEATURES: u64 = uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED;

/// Dirty tracking of a running process; see the module doc.
pub struct Tracker {
    pid: Pid,
    uffd: OwnedFd,
    scanner: Scanner,
    ranges: Vec<(u64, u64)>,
    /// Pages holding data at the last collect.
    present: Vec<(u64, u64)>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("pid", &self.pid)
            .field("ranges", &self.ranges.len())
            .finish()
    }
}

fn sys(pid: Pid, what: String) -> impl FnOnce(Errno) -> MigError {
    move |errno| {
        PagesError::Sys {
            pid: pid.as_raw(),
            what,
            errno,
        }
        .into()
    }
}

fn io(pid: Pid, what: &'static str) -> impl FnOnce(std::io::Error) -> MigError {
    move |source| {
        PagesError::Io {
            pid: pid.as_raw(),
            what: what.into(),
            source,
        }
        .into()
    }
}

/// Pages in RAM (not the shared zero page). Swapped pages are left out:
/// `PAGEMAP_SCAN` reports the write-protect markers of never-populated
/// pages as swapped too.
const PRESENT: Query = Query {
    flags: 0,
    inverted: pagemap::PAGE_IS_PFNZERO,
    mask: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_PFNZERO,
    anyof: 0,
    ret: pagemap::PAGE_IS_PRESENT,
};

/// Pages written since protected; protects them again.
const WRITTEN: Query = Query {
    flags: pagemap::PM_SCAN_WP_MATCHING,
    inverted: 0,
    mask: pagemap::PAGE_IS_WRITTEN,
    anyof: 0,
    ret: pagemap::PAGE_IS_WRITTEN,
};

/// Pages written since protected, left as they are (the last look).
const WRITTEN_PEEK: Query = Query {
    flags: 0,
    ..WRITTEN
};

/// Pages of mappings without asynchronous write-protection.
const UNTRACKED: Query = Query {
    flags: 0,
    inverted: pagemap::PAGE_IS_WPALLOWED,
    mask: pagemap::PAGE_IS_WPALLOWED,
    anyof: 0,
    ret: pagemap::PAGE_IS_WPALLOWED,
};

impl Tracker {
    /// Starts tracking writes to `ranges` of running process `pid`: a
    /// short freeze to make the userfaultfd inside it, registration and
    /// protection of every mapping in the ranges, thaw.
    pub fn start(pid: Pid, ranges: impl AsRef<[(u64, u64)]>) -> Result<Tracker, MigError> {
        let refuse = |what: String| -> MigError {
            PagesError::Refused {
                pid: pid.as_raw(),
                what,
            }
            .into()
        };
        let available = uffd::available_features().map_err(io(pid, "userfaultfd features"))?;
        if available & FEATURES != FEATURES {
            return Err(refuse(format!(
                "this kernel's userfaultfd has no asynchronous write-protect (features {available:#x})"
            )));
        }
        if !pagemap::supported() {
            return Err(refuse("this kernel has no PAGEMAP_SCAN".into()));
        }
        let ranges = normalize(ranges.as_ref().to_vec());
        let scanner = Scanner::open(pid).map_err(io(pid, "open pagemap"))?;
        let t0 = std::time::Instant::now();
        let frozen = freeze::freeze(pid, FREEZE_TIMEOUT)?;
        let res = setup(&frozen, &ranges);
        crate::checkpoint::thaw(frozen);
        let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
        let uffd = res?;
        let mut t = Tracker {
            pid,
            uffd,
            scanner,
            ranges,
            present: Vec::new(),
        };
        t.present = t.scan_all(&PRESENT, "presence")?;
        tracing::debug!(
            pid = pid.as_raw(),
            ranges = t.ranges.len(),
            frozen_ms,
            "dirty tracking started"
        );
        Ok(t)
    }

    /// The runs of pages that may have changed since the last collect (or
    /// start), in address order; written pages are protected again.
    pub fn collect(&mut self) -> Result<Vec<(u64, u64)>, MigError> {
        self.collect_with(&WRITTEN)
    }

    /// The last [`Tracker::collect`], of a frozen process: the written
    /// pages are not protected again (nothing is tracked after this).
    pub fn collect_last(&mut self) -> Result<Vec<(u64, u64)>, MigError> {
        self.collect_with(&WRITTEN_PEEK)
    }

    fn collect_with(&mut self, written: &Query) -> Result<Vec<(u64, u64)>, MigError> {
        // Presence before writes: a page discarded after this scan is
        // caught by the next collect.
        let present = self.scan_all(&PRESENT, "presence")?;
        let written = self.scan_all(written, "written pages")?;
        let untracked = self.scan_all(&UNTRACKED, "untracked mappings")?;
        let mapped = self.mapped()?;
        let emptied = intersect(&subtract(&self.present, &present), &mapped);
        self.present = present;
        let mut all = written;
        all.extend(emptied);
        all.extend(untracked);
        Ok(normalize(all))
    }

    /// Ends tracking: closes the userfaultfd (the kernel removes every
    /// protection; the process is not disturbed).
    pub fn stop(self) {
        let Tracker { uffd, .. } = self;
        drop(uffd);
    }

    /// The process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The ranges tracked (as given to `start`, normalized).
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    fn scan_all(&self, q: &Query, what: &str) -> Result<Vec<(u64, u64)>, MigError> {
        let mut out = Vec::new();
        for &(s, e) in &self.ranges {
            let runs = self.scanner.scan(s, e, q).map_err(sys(
                self.pid,
                format!("PAGEMAP_SCAN ({what}) {s:#x}-{e:#x}"),
            ))?;
            out.extend(runs);
        }
        Ok(normalize(pagemap::merge(out)))
    }

    fn mapped(&self) -> Result<Vec<(u64, u64)>, MigError> {
        let maps = procfs::maps(self.pid).map_err(io(self.pid, "maps"))?;
        Ok(normalize(maps.iter().map(|m| (m.start, m.end)).collect()))
    }
}

/// Inside the frozen process: make the userfaultfd, take it, close it
/// there; then the API handshake, registration and protection.
fn setup(frozen: &Frozen, ranges: &[(u64, u64)]) -> Result<OwnedFd, MigError> {
    let pid = frozen.pid();
    let maps = procfs::maps(pid).map_err(io(pid, "maps"))?;
    let remote = Remote::new(pid, &maps)?;
    let call = |nr: i64, a: u64| -> Result<Result<u64, Errno>, MigError> {
        Ok(remote.call(pid, nr, |_| [a, 0, 0, 0, 0, 0], &[], 0)?.0)
    };
    let flags = u64::from((libc::O_CLOEXEC | libc::O_NONBLOCK).cast_unsigned());
    // An unprivileged process may only make a user-mode-only one; that is
    // enough here (write faults are resolved by the kernel either way).
    let fd = match call(libc::SYS_userfaultfd, flags)? {
        Err(Errno::EPERM) => call(
            libc::SYS_userfaultfd,
            flags | u64::from(uffd::USER_MODE_ONLY),
        )?,
        other => other,
    }
    .map_err(sys(pid, "userfaultfd in the process".into()))?;
    let fd = i32::try_from(fd).map_err(|_| sys(pid, "userfaultfd".into())(Errno::EBADF))?;
    let pidfd = reap::pidfd_open(pid.as_raw()).map_err(io(pid, "pidfd_open"))?;
    let ours = uffd::pidfd_getfd(&pidfd, fd);
    let closed = call(libc::SYS_close, u64::try_from(fd).unwrap_or(0))?;
    let ours = ours.map_err(io(pid, "pidfd_getfd the userfaultfd"))?;
    closed.map_err(sys(pid, format!("close fd {fd} in the process")))?;
    uffd::api(&ours, FEATURES).map_err(sys(pid, "UFFDIO_API".into()))?;
    let vmas = maps
        .iter()
        .filter(|m| m.path != "[vsyscall]" && !crate::sys::vdso::is_vdso_part(m));
    for m in vmas {
        for (s, e) in intersect(ranges, &[(m.start, m.end)]) {
            register(&ours, pid, s, e)?;
        }
    }
    Ok(ours)
}

/// Registers and protects one piece of one mapping.
fn register(fd: &OwnedFd, pid: Pid, s: u64, e: u64) -> Result<(), MigError> {
    match uffd::register(fd, s, e - s, uffd::MODE_WP) {
        Ok(()) => {}
        // Not writable through this mapping (shared read-only file, ...):
        // left untracked, so reported in full by every collect.
        Err(Errno::EPERM | Errno::EINVAL) => {
            tracing::warn!(pid = pid.as_raw(), start = s, end = e, "range not tracked");
            return Ok(());
        }
        Err(errno) => return Err(sys(pid, format!("UFFDIO_REGISTER {s:#x}-{e:#x}"))(errno)),
    }
    uffd::write_protect(fd, s, e - s, true)
        .map_err(sys(pid, format!("UFFDIO_WRITEPROTECT {s:#x}-{e:#x}")))
}
