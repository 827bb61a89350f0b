//! Keeps the restorer's thread and its stub on one CPU while the stub is
//! rebuilt. Every injected call is a ptrace round trip between the two;
//! when they run on different CPUs each one wakes the other's, and in a
//! VM waking an idle vCPU costs tens of µs (the restore of a 64 MiB
//! process with lazy memory: ~3 ms pinned, 10-15 ms not, on the 2-vCPU
//! test VM). Before the process runs, every thread of it (and the lazy
//! fault handler, which started on the pinned thread) gets the mask the
//! restorer had back; dropping the [`Pin`] gives it back to the
//! restorer. Best effort: where a mask cannot be read or set, nothing is
//! pinned.

use nix::sched::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
use nix::unistd::Pid;

/// The restorer's thread pinned to the CPU it runs on.
#[derive(Debug)]
pub struct Pin {
    /// The mask it had (and the stub inherited).
    ours: CpuSet,
    one: CpuSet,
}

impl Pin {
    /// Pins the calling thread to its current CPU.
    pub fn here() -> Option<Pin> {
        let self_ = Pid::from_raw(0);
        let ours = sched_getaffinity(self_).ok()?;
        let cpu = sched_getcpu().ok()?;
        if !ours.is_set(cpu).ok()? {
            return None;
        }
        let mut one = CpuSet::new();
        one.set(cpu).ok()?;
        sched_setaffinity(self_, &one).ok()?;
        Some(Pin { ours, one })
    }

    /// Pins `tid` (the stub) to the same CPU; threads it makes inherit it.
    pub fn join(&self, tid: i32) {
        let _ = sched_setaffinity(Pid::from_raw(tid), &self.one);
    }

    /// Gives `tids` the restorer's mask back.
    pub fn release(&self, tids: impl IntoIterator<Item = i32>) {
        for t in tids {
            if let Err(errno) = sched_setaffinity(Pid::from_raw(t), &self.ours) {
                tracing::warn!(tid = t, %errno, "could not give a thread its CPU mask back");
            }
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = sched_setaffinity(Pid::from_raw(0), &self.ours);
    }
}
