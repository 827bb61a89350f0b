//! `PAGEMAP_SCAN` (`linux/fs.h`, 6.7): the `ioctl` on `/proc/PID/pagemap`
//! that returns runs of pages by category (present, swapped, written
//! since write-protected, ...) instead of one 64-bit entry per page, and
//! can write-protect the pages it reports in the same walk (the dirty
//! tracking of pre-copy, with a `UFFD_FEATURE_WP_ASYNC` userfaultfd).
//!
//! Minimum kernel: 6.7. [`supported`] probes it; callers fall back to
//! reading pagemap entries ([`super::procfs::Pagemap`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::Pid;

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = 0xc060_6610;

/// Category: the page's VMA has asynchronous write-protection.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Category: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Category: file-backed.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// Category: in RAM.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Category: swapped out.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Category: maps the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;

/// Flag: write-protect the pages that match.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Flag: fail (EPERM) on a VMA without asynchronous write-protection.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Regions asked for per call.
const BATCH: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Region {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct ScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// Which pages a scan reports (see `PAGEMAP_SCAN(2const)`): a page
/// matches when, after flipping the `inverted` categories, it has every
/// `mask` category and (if `anyof` is not 0) at least one `anyof` one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Categories that match when absent.
    pub inverted: u64,
    /// Categories a page must all have.
    pub mask: u64,
    /// Categories of which a page needs one.
    pub anyof: u64,
    /// Categories reported (runs are split where they differ).
    pub ret: u64,
}

/// `/proc/PID/pagemap`, opened for `PAGEMAP_SCAN`.
pub struct Scanner(File);

impl Scanner {
    /// Opens the pagemap of `pid`.
    pub fn open(pid: Pid) -> io::Result<Scanner> {
        Ok(Scanner(File::open(format!("/proc/{pid}/pagemap"))?))
    }

    /// The runs `(start, end, categories)` of matching pages in
    /// `[start, end)` (page-aligned), in address order; adjacent runs
    /// with equal categories may come back split.
    pub fn scan(&self, start: u64, end: u64, q: &Query) -> Result<Vec<(u64, u64, u64)>, Errno> {
        let mut out = Vec::new();
        let mut vec = vec![Region::default(); BATCH];
        let mut at = start;
        while at < end {
            let mut arg = ScanArg {
                size: std::mem::size_of::<ScanArg>() as u64,
                flags: q.flags,
                start: at,
                end,
                walk_end: 0,
                vec: vec.as_mut_ptr() as u64,
                vec_len: BATCH as u64,
                max_pages: 0,
                category_inverted: q.inverted,
                category_mask: q.mask,
                category_anyof_mask: q.anyof,
                return_mask: q.ret,
            };
            // SAFETY: `arg` is a struct pm_scan_arg of the size it states;
            // its `vec` points at `BATCH` writable page_regions that live
            // across the call; the kernel writes at most `vec_len` of them.
            let r = unsafe { libc::ioctl(self.0.as_raw_fd(), PAGEMAP_SCAN, &raw mut arg) };
            if r < 0 {
                return Err(Errno::last());
            }
            let n = usize::try_from(r).map_err(|_| Errno::EIO)?.min(BATCH);
            out.extend(vec[..n].iter().map(|g| (g.start, g.end, g.categories)));
            if arg.walk_end <= at {
                return Err(Errno::EIO);
            }
            at = arg.walk_end;
        }
        Ok(out)
    }
}

/// Whether this kernel has `PAGEMAP_SCAN` (a scan of one page of our own
/// address space).
pub fn supported() -> bool {
    let Ok(s) = Scanner::open(Pid::this()) else {
        return false;
    };
    let probe = [0u8; 1];
    let page = super::page_size();
    let at = (probe.as_ptr() as u64) & !(page - 1);
    let q = Query {
        ret: PAGE_IS_PRESENT,
        ..Query::default()
    };
    s.scan(at, at + page, &q).is_ok()
}

/// Merges `(start, end, _)` runs that touch into `(start, end)` runs.
pub fn merge(runs: impl IntoIterator<Item = (u64, u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e, _) in runs {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arg_and_region_have_the_kernel_sizes() {
        assert_eq!(std::mem::size_of::<ScanArg>(), 96);
        assert_eq!(std::mem::size_of::<Region>(), 24);
    }

    #[test]
    fn merges_touching_runs() {
        assert_eq!(
            merge([(0, 4, 8), (4, 8, 16), (12, 16, 8)]),
            vec![(0, 8), (12, 16)]
        );
    }

    #[test]
    fn scans_own_memory() {
        if !supported() {
            eprintln!("SKIP: no PAGEMAP_SCAN on this kernel");
            return;
        }
        let page = crate::sys::page_size();
        let len = usize::try_from(page * 8).unwrap();
        let mut v = vec![0u8; len + usize::try_from(page).unwrap()];
        let base = (v.as_ptr() as u64).next_multiple_of(page);
        // Touch pages 0, 1 and 5 of the aligned area.
        for i in [0u64, 1, 5] {
            let off = usize::try_from(base - v.as_ptr() as u64 + i * page).unwrap();
            v[off] = 1;
        }
        let s = Scanner::open(Pid::this()).unwrap();
        let q = Query {
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ret: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Query::default()
        };
        let got = merge(s.scan(base, base + page * 8, &q).unwrap());
        // The allocator may have touched other pages of the buffer; the
        // touched ones must be there.
        for i in [0u64, 1, 5] {
            let p = base + i * page;
            assert!(got.iter().any(|&(a, b)| a <= p && p < b), "{got:x?}");
        }
    }
}
