//! The source's view of a frozen process's memory: reads for the page
//! server, and which pages hold data (so a push sends only those).

use nix::unistd::Pid;

use crate::error::{CaptureError, MigError};
use crate::sys::{mem, procfs};

/// Pages of the lazy ranges of a frozen process.
pub struct PageSource {
    pid: Pid,
    ranges: Vec<(u64, u64)>,
    mem: mem::ProcMem,
}

fn io(pid: Pid, what: &str) -> impl FnOnce(std::io::Error) -> MigError + '_ {
    move |source| {
        CaptureError::Io {
            pid: pid.as_raw(),
            what: what.to_owned(),
            source,
        }
        .into()
    }
}

impl PageSource {
    /// A reader of `pid`'s memory in `ranges`.
    pub fn new(pid: Pid, ranges: Vec<(u64, u64)>) -> Result<PageSource, MigError> {
        let mem = mem::ProcMem::open(pid, false).map_err(io(pid, "open its memory"))?;
        Ok(PageSource { pid, ranges, mem })
    }

    /// `buf.len()` bytes at `addr`; only inside the lazy ranges.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MigError> {
        let end = addr + buf.len() as u64;
        if !self.ranges.iter().any(|&(s, e)| s <= addr && end <= e) {
            return Err(io(self.pid, "read")(std::io::Error::other(format!(
                "{addr:#x}-{end:#x} is outside the lazy memory"
            ))));
        }
        if mem::read_vm(self.pid, addr, buf).is_ok() {
            return Ok(());
        }
        self.mem.read(addr, buf).map_err(io(self.pid, "read"))
    }

    /// Runs of pages in the lazy ranges that hold data (present or
    /// swapped); untouched pages are left out.
    pub fn present(&self) -> Result<Vec<(u64, u64)>, MigError> {
        let pm = procfs::Pagemap::open(self.pid).map_err(io(self.pid, "pagemap"))?;
        let page = crate::sys::page_size();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(s, e) in &self.ranges {
            let mut at = s;
            while at < e {
                let end = e.min(at + (256 << 20));
                let entries = pm.entries(at, end, page).map_err(io(self.pid, "pagemap"))?;
                for (i, ent) in entries.iter().enumerate() {
                    if ent & (procfs::PM_PRESENT | procfs::PM_SWAP) == 0 {
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
