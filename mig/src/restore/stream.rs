//! Eager memory received by the stub itself: the pages of a migration's
//! lazy ranges arrive on a page-channel pull ([`Incoming`]) and the stub
//! reads each run's bytes with an injected `recvfrom` straight into the
//! mapping, so the bytes are copied once on this side (socket to memory)
//! instead of twice (socket to a buffer here, then `UFFDIO_COPY`).
//!
//! The restorer reads each frame's header on its own descriptor of the
//! connection; the stub holds a copy of the same socket (taken with
//! `pidfd_getfd` while it is still privileged), so the two read one byte
//! stream in turn. Every run must lie inside the image's lazy ranges: a
//! source cannot make the stub write anywhere else. Lazy mappings that
//! are not writable are made writable for the fill and given their
//! protection back after it.
//!
//! Each run's pages are allocated first (`MADV_POPULATE_WRITE`), then
//! received. With warm memory (the stub was made from a holder,
//! [`super::warm`]), each lazy mapping it has room for is first replaced
//! whole by a piece of it (`mremap`: allocated pages, moved, not
//! copied); runs inside those mappings are received without allocating,
//! and the pages no run filled are given back (`MADV_DONTNEED`) after the
//! last one, so the process's memory stays as sparse as it was.
//!
//! Allocating fresh 4 KiB pages costs more than receiving into
//! them on the 2-vCPU test VM (~0.55 s per GiB against ~0.3 s); allocating
//! them on another thread (zeros written with `process_vm_writev`, one
//! piece ahead of the receive) was measured no faster there, both CPUs
//! being busy with the two copies and the allocation.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::error::{RestoreCause, RestoreError, Step};
use migfs_proto::image::{Image, Vma};

use crate::pages::wire::Incoming;

use super::inject::{Call, Target};

const PAGE: u64 = 4096;

/// A pull the stub reads into place, and where to count what arrived.
pub struct StreamFill {
    /// The pull, asked already.
    pub pull: Incoming,
    /// Set to the pages received.
    pub pages: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Memory the node allocated ahead, to receive into: asked for with
    /// the bytes of mappings it could back ([`warm_need`]).
    pub warm: Option<super::warm::WarmTake>,
}

impl std::fmt::Debug for StreamFill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamFill")
            .field("peer", &self.pull.peer())
            .finish_non_exhaustive()
    }
}

fn failed(why: String) -> RestoreError {
    RestoreError::new(Step::WriteMemory, RestoreCause::Refused(why))
}

fn call_failed(what: String) -> impl FnOnce(super::inject::CallError) -> RestoreError {
    move |e| RestoreError::new(Step::WriteMemory, super::files::cause(what, e))
}

/// What [`fill`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filled {
    /// Bytes received.
    pub bytes: u64,
    /// Bytes of mappings placed from warm memory.
    pub warm: u64,
}

/// Receives every run of `s` into the lazy ranges of `img` in the stub
/// `t`.
pub fn fill<T: Target>(t: &mut T, img: &Image, mut s: StreamFill) -> Result<Filled, RestoreError> {
    let vmas: Vec<_> = img
        .mm
        .iter()
        .flat_map(|m| &m.vmas)
        .filter(|v| v.lazy)
        .collect();
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    let readonly: Vec<_> = vmas.iter().filter(|v| v.prot & rw != rw).collect();
    for v in &readonly {
        writable_for_fill(t, v)?;
    }
    let warm = place_warm(t, &vmas)?;
    let fd = take_socket(t, &s.pull)?;
    let res = receive(t, &vmas, &warm, &mut s.pull, fd);
    let _ = t.call(0, &Call::Close { fd });
    let (bytes, runs) = res?;
    give_back_holes(t, &warm, runs)?;
    for v in readonly {
        t.call(
            0,
            &Call::Mprotect {
                addr: v.start,
                len: v.end - v.start,
                prot: v.prot,
            },
        )
        .map_err(call_failed(format!("mprotect {:#x}-{:#x}", v.start, v.end)))?;
    }
    s.pages
        .store(bytes / PAGE, std::sync::atomic::Ordering::Relaxed);
    Ok(Filled {
        bytes,
        warm: crate::pages::ranges::total(&warm),
    })
}

/// Makes `v` readable and writable (with its own protection besides)
/// until the fill is done.
fn writable_for_fill<T: Target>(t: &mut T, v: &Vma) -> Result<(), RestoreError> {
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    t.call(
        0,
        &Call::Mprotect {
            addr: v.start,
            len: v.end - v.start,
            prot: v.prot | rw,
        },
    )
    .map_err(call_failed(format!(
        "mprotect {:#x}-{:#x} for the fill",
        v.start, v.end
    )))?;
    Ok(())
}

/// Whether a lazy mapping can be replaced by warm memory: private, and
/// not a stack (a moved-in piece would not grow down).
fn takes_warm(v: &Vma) -> bool {
    v.lazy && !v.shared && !v.vm_flags.iter().any(|f| f == "gd")
}

/// Bytes of the mappings of `img` that warm memory could back.
pub fn warm_need(img: &Image) -> u64 {
    img.mm
        .iter()
        .flat_map(|m| &m.vmas)
        .filter(|v| takes_warm(v))
        .map(|v| v.end - v.start)
        .sum()
}

/// Replaces each lazy mapping the stub's warm memory has room for with a
/// piece of it; returns the mappings replaced. What is left of the warm
/// memory is unmapped.
fn place_warm<T: Target>(t: &mut T, vmas: &[&Vma]) -> Result<Vec<(u64, u64)>, RestoreError> {
    let Some((mut at, end)) = t.take_warm() else {
        return Ok(Vec::new());
    };
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    let mut placed = Vec::new();
    for v in vmas.iter().filter(|v| takes_warm(v)) {
        let len = v.end - v.start;
        if end - at < len {
            continue;
        }
        t.call(
            0,
            &Call::Mremap {
                from: at,
                len,
                to: v.start,
            },
        )
        .map_err(call_failed(format!(
            "move warm memory under {:#x}-{:#x}",
            v.start, v.end
        )))?;
        if v.prot | rw != rw {
            writable_for_fill(t, v)?;
        }
        at += len;
        placed.push((v.start, v.end));
    }
    if at < end {
        t.call(
            0,
            &Call::Munmap {
                addr: at,
                len: end - at,
            },
        )
        .map_err(call_failed(format!(
            "unmap the unused warm memory {at:#x}-{end:#x}"
        )))?;
    }
    tracing::debug!(
        mappings = placed.len(),
        mib = crate::pages::ranges::total(&placed) >> 20,
        "warm memory placed"
    );
    Ok(placed)
}

/// The pages of the warm-backed mappings `placed` that no run in `runs`
/// filled: given back, as a fresh mapping would not have them.
fn give_back_holes<T: Target>(
    t: &mut T,
    placed: &[(u64, u64)],
    runs: Vec<(u64, u64)>,
) -> Result<(), RestoreError> {
    if placed.is_empty() {
        return Ok(());
    }
    let filled = crate::pages::ranges::normalize(runs);
    for (addr, end) in holes(placed, &filled) {
        t.call(
            0,
            &Call::Madvise {
                addr,
                len: end - addr,
                advice: libc::MADV_DONTNEED,
            },
        )
        .map_err(call_failed(format!("give back {addr:#x}-{end:#x}")))?;
    }
    Ok(())
}

/// The parts of the sorted ranges `within` that the sorted, disjoint
/// ranges `filled` do not cover.
fn holes(within: &[(u64, u64)], filled: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in within {
        let mut at = s;
        for &(fs, fe) in filled {
            if fe <= at || fs >= e {
                continue;
            }
            if fs > at {
                out.push((at, fs));
            }
            at = at.max(fe);
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// A copy of the pull's socket in the stub; returns its number there.
fn take_socket<T: Target>(t: &mut T, pull: &Incoming) -> Result<i32, RestoreError> {
    let pid = i32::try_from(std::process::id()).unwrap_or(0);
    let pidfd = t
        .call(0, &Call::PidfdOpen { pid })
        .map_err(call_failed("pidfd_open the restorer in the stub".into()))?;
    let pidfd = i32::try_from(pidfd).unwrap_or(-1);
    let fd = t.call(
        0,
        &Call::PidfdGetfd {
            pidfd,
            fd: pull.socket().as_raw_fd(),
        },
    );
    let _ = t.call(0, &Call::Close { fd: pidfd });
    let fd = fd.map_err(call_failed(
        "pidfd_getfd the page socket in the stub".into(),
    ))?;
    Ok(i32::try_from(fd).unwrap_or(-1))
}

/// The receive loop: each run's header here; its pages allocated in one
/// call (cheaper than faulting them in one by one under the copy, above
/// all in a VM), then its bytes received, in the stub.
fn receive<T: Target>(
    t: &mut T,
    vmas: &[&Vma],
    warm: &[(u64, u64)],
    pull: &mut Incoming,
    fd: i32,
) -> Result<(u64, Vec<(u64, u64)>), RestoreError> {
    let from = pull.peer();
    let lazy = crate::pages::ranges::normalize(vmas.iter().map(|v| (v.start, v.end)).collect());
    let (mut populate, mut recv, mut calls) = (Duration::ZERO, Duration::ZERO, 0u32);
    // With warm memory, the runs received (its holes are given back
    // after); adjacent warm mappings make one range, as a run may span
    // them.
    let warm = crate::pages::ranges::normalize(warm.to_vec());
    let mut filled = Vec::new();
    while let Some((addr, len)) = pull.next_run().map_err(failed)? {
        let len = len as u64;
        let end = addr.saturating_add(len);
        let inside = lazy.iter().any(|&(s, e)| s <= addr && end <= e);
        if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) || !inside {
            return Err(failed(format!(
                "the page server at {from} sent {addr:#x}+{len:#x}, which is not whole pages \
                 of the process's anonymous memory"
            )));
        }
        let t0 = Instant::now();
        if !warm.is_empty() {
            filled.push((addr, end));
        }
        if !warm.iter().any(|&(s, e)| s <= addr && end <= e) {
            // Where the kernel cannot (before 5.14), the copy faults them in.
            let _ = t.call(
                0,
                &Call::Madvise {
                    addr,
                    len,
                    advice: libc::MADV_POPULATE_WRITE,
                },
            );
        }
        populate += t0.elapsed();
        let t0 = Instant::now();
        let mut done = 0;
        while done < len {
            calls += 1;
            let n = t
                .call(
                    0,
                    &Call::Recv {
                        fd,
                        addr: addr + done,
                        len: len - done,
                    },
                )
                .map_err(call_failed(format!(
                    "receive {:#x}+{:#x} from {from} in the stub",
                    addr + done,
                    len - done
                )))?;
            if n == 0 {
                return Err(failed(format!(
                    "the page server at {from} closed the connection in the middle of a run"
                )));
            }
            done += n;
        }
        recv += t0.elapsed();
    }
    tracing::debug!(
        mib = pull.bytes() >> 20,
        populate_ms = populate.as_secs_f64() * 1e3,
        recv_ms = recv.as_secs_f64() * 1e3,
        calls,
        warm = !warm.is_empty(),
        "pages received in the stub"
    );
    Ok((pull.bytes(), filled))
}

#[cfg(test)]
mod tests {
    use super::holes;

    #[test]
    fn holes_are_what_no_run_filled() {
        let within = [(0x1000, 0x9000), (0x10000, 0x12000)];
        let filled = [(0x1000, 0x3000), (0x4000, 0x5000), (0x8000, 0x11000)];
        assert_eq!(
            holes(&within, &filled),
            vec![(0x3000, 0x4000), (0x5000, 0x8000), (0x11000, 0x12000)]
        );
        assert_eq!(holes(&within, &[]), within.to_vec());
        assert!(holes(&within, &[(0, 0x20000)]).is_empty());
    }
}
