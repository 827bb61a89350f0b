//! A recording [`Target`] for unit tests of the restore sequence: it keeps
//! every request as a line of text and fails the first request whose line
//! starts with a chosen prefix.

use nix::errno::Errno;

use super::inject::{Call, CallError, Target, ThreadState};
use crate::sys::vdso::VdsoBlock;

/// Records requests; see the module doc.
#[derive(Default)]
pub struct Fake {
    /// One line per request, e.g. `0 Mmap { addr: 4096, .. }`.
    pub log: Vec<String>,
    /// Fail the first request whose line (without the thread prefix)
    /// starts with this, with this errno.
    pub fail: Option<(String, Errno)>,
    /// What `vdso_block` reports.
    pub vdso: Option<VdsoBlock>,
    /// What `xsave_layout` reports.
    pub xsave: (u64, usize),
    threads: usize,
    next_fd: u64,
}

impl Fake {
    /// A fake with one thread.
    pub fn new() -> Fake {
        Fake {
            threads: 1,
            next_fd: 3,
            ..Default::default()
        }
    }

    fn record(&mut self, thread: usize, line: String) -> Result<(), CallError> {
        let fail = self
            .fail
            .as_ref()
            .filter(|(p, _)| line.starts_with(p.as_str()))
            .map(|(_, e)| *e);
        self.log.push(format!("{thread} {line}"));
        match fail {
            Some(e) => {
                self.fail = None;
                Err(CallError::Errno(e))
            }
            None => Ok(()),
        }
    }

    /// Index of the first line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<usize> {
        self.log.iter().position(|l| l.contains(needle))
    }
}

impl Target for Fake {
    fn pid(&self) -> i32 {
        4242
    }

    fn call(&mut self, thread: usize, call: &Call<'_>) -> Result<u64, CallError> {
        assert!(
            thread < self.threads,
            "call in thread {thread} of {}",
            self.threads
        );
        self.record(thread, format!("{call:?}"))?;
        Ok(match *call {
            Call::Mmap { addr, .. } => addr,
            Call::Mremap { to, .. } => to,
            Call::Open { .. } => {
                self.next_fd += 1;
                self.next_fd - 1
            }
            _ => 0,
        })
    }

    fn write_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), CallError> {
        self.record(
            0,
            format!("WriteMemory {{ addr: {addr}, len: {} }}", data.len()),
        )
    }

    fn new_thread(&mut self, tid: i32, require: bool) -> Result<(usize, i32), CallError> {
        self.record(0, format!("NewThread {{ tid: {tid}, require: {require} }}"))?;
        self.threads += 1;
        Ok((self.threads - 1, tid))
    }

    fn xsave_layout(&mut self) -> Result<(u64, usize), CallError> {
        Ok(self.xsave)
    }

    fn vdso_block(&mut self) -> Result<Option<VdsoBlock>, CallError> {
        Ok(self.vdso.clone())
    }

    fn finish(&mut self, states: &[ThreadState<'_>]) -> Result<(), CallError> {
        assert_eq!(states.len(), self.threads);
        self.record(0, format!("Finish {{ threads: {} }}", states.len()))
    }
}
