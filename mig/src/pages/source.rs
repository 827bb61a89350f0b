//! The source's view of a frozen process's lazy memory: reads for the
//! page server (a fault on the target, a push), and which pages hold data
//! so a background push sends only those.
//!
//! The process must stay frozen (`mig::freeze::Frozen`) while a
//! [`PageSource`] serves it: reads are not atomic with respect to a
//! running process.

use nix::unistd::Pid;

use super::ranges;
use crate::error::{MigError, PagesError};
use crate::sys::pagemap::{self, Query, Scanner};
use crate::sys::{mem, procfs};

/// Pagemap entries read per step of the fallback (8 bytes each).
const FALLBACK_STEP: u64 = 64 << 20;

/// Pages of the lazy ranges of a frozen process. `Send + Sync`: reads
/// may come from any thread.
pub struct PageSource {
    pid: Pid,
    /// Normalized: adjacent lazy mappings are one run.
    ranges: Vec<(u64, u64)>,
    mem: mem::ProcMem,
    scanner: Option<Scanner>,
}

fn io(pid: Pid, what: String) -> impl FnOnce(std::io::Error) -> MigError {
    move |source| {
        PagesError::Io {
            pid: pid.as_raw(),
            what,
            source,
        }
        .into()
    }
}

impl PageSource {
    /// A reader of `pid`'s memory in `ranges` (see [`super::lazy_ranges`]).
    pub fn new(pid: Pid, ranges: Vec<(u64, u64)>) -> Result<PageSource, MigError> {
        let mem = mem::ProcMem::open(pid, false).map_err(io(pid, "open its memory".into()))?;
        let scanner = Scanner::open(pid).ok().filter(|_| pagemap::supported());
        Ok(PageSource {
            pid,
            ranges: ranges::normalize(ranges),
            mem,
            scanner,
        })
    }

    /// The lazy ranges served (adjacent ones merged).
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// `buf.len()` bytes at `addr`; only inside the lazy ranges.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MigError> {
        let end = addr.saturating_add(buf.len() as u64);
        if !self.ranges.iter().any(|&(s, e)| s <= addr && end <= e) {
            return Err(PagesError::Refused {
                pid: self.pid.as_raw(),
                what: format!("read {addr:#x}-{end:#x}: outside the lazy memory"),
            }
            .into());
        }
        if mem::read_vm(self.pid, addr, buf).is_ok() {
            return Ok(());
        }
        // Unreadable mappings (PROT_WRITE only, ...): /proc/PID/mem forces.
        self.mem
            .read(addr, buf)
            .map_err(io(self.pid, format!("read {addr:#x}-{end:#x}")))
    }

    /// Runs of pages in the lazy ranges that hold data (present or
    /// swapped), in address order; untouched pages (and pages only ever
    /// read, which map the zero page) are left out.
    pub fn present(&self) -> Result<Vec<(u64, u64)>, MigError> {
        match &self.scanner {
            Some(s) => self.present_scan(s),
            None => self.present_pagemap(),
        }
    }

    fn present_scan(&self, s: &Scanner) -> Result<Vec<(u64, u64)>, MigError> {
        let q = Query {
            inverted: pagemap::PAGE_IS_PFNZERO,
            mask: pagemap::PAGE_IS_PFNZERO,
            anyof: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            ret: pagemap::PAGE_IS_PRESENT | pagemap::PAGE_IS_SWAPPED,
            ..Query::default()
        };
        let mut runs = Vec::new();
        for &(start, end) in &self.ranges {
            let found = s.scan(start, end, &q).map_err(|errno| PagesError::Sys {
                pid: self.pid.as_raw(),
                what: format!("PAGEMAP_SCAN {start:#x}-{end:#x}"),
                errno,
            })?;
            for (s, e, cat) in found {
                if cat & pagemap::PAGE_IS_PRESENT != 0 {
                    runs.push((s, e, 0));
                } else {
                    // "Swapped" also means a write-protect marker (a dirty
                    // tracker still registered): keep real swap only.
                    runs.extend(self.swapped(s, e)?.into_iter().map(|(s, e)| (s, e, 0)));
                }
            }
        }
        Ok(pagemap::merge(runs))
    }

    /// The pages of `[start, end)` that are swapped out (not markers).
    fn swapped(&self, start: u64, end: u64) -> Result<Vec<(u64, u64)>, MigError> {
        let pm = procfs::Pagemap::open(self.pid).map_err(io(self.pid, "open pagemap".into()))?;
        let page = crate::sys::page_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = start;
        while at < end {
            let step = end.min(at + FALLBACK_STEP);
            let entries = pm
                .entries(at, step, page)
                .map_err(io(self.pid, format!("pagemap {at:#x}-{step:#x}")))?;
            for (i, &ent) in entries.iter().enumerate() {
                if ent & procfs::PM_SWAP == 0 || procfs::is_pte_marker(ent) {
                    continue;
                }
                let p = at + i as u64 * page;
                match runs.last_mut() {
                    Some(r) if r.1 == p => r.1 = p + page,
                    _ => runs.push((p, p + page)),
                }
            }
            at = step;
        }
        Ok(runs)
    }

    fn present_pagemap(&self) -> Result<Vec<(u64, u64)>, MigError> {
        let pm = procfs::Pagemap::open(self.pid).map_err(io(self.pid, "open pagemap".into()))?;
        let page = crate::sys::page_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in &self.ranges {
            let mut at = s;
            while at < e {
                let end = e.min(at + FALLBACK_STEP);
                let entries = pm
                    .entries(at, end, page)
                    .map_err(io(self.pid, format!("pagemap {at:#x}-{end:#x}")))?;
                for (i, &ent) in entries.iter().enumerate() {
                    if ent & (procfs::PM_PRESENT | procfs::PM_SWAP) == 0
                        || procfs::is_pte_marker(ent)
                    {
                        continue;
                    }
                    let p = at + i as u64 * page;
                    match runs.last_mut() {
                        Some(r) if r.1 == p => r.1 = p + page,
                        _ => runs.push((p, p + page)),
                    }
                }
                at = end;
            }
        }
        Ok(runs)
    }
}
