//! Pre-copied memory kept on the target until it is installed
//! (`agent::precopy`): runs of the original's pages as they arrived, each
//! in a [`Region`] of its own (left out of forks: a restore's stub is a
//! fork of the agent, and page tables of gigabytes of kept pages would
//! make every fork slower), with one bit per page saying whether it is
//! still current. A discarded page (written on the source since) is only
//! marked; a run with no current page left is freed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::LazyPages;
use crate::sys::mem::Region;

const PAGE: u64 = 4096;
/// Largest run kept in one piece; longer ones are split.
pub const MAX_RUN: u64 = 4 << 20;

/// One run as it arrived. Shared (an install reads it while faults may
/// too); only its bits change.
struct Kept {
    data: Region,
    /// Per page: still current.
    valid: Vec<AtomicBool>,
    live: AtomicUsize,
}

impl Kept {
    fn pages(&self) -> u64 {
        self.valid.len() as u64
    }

    fn is_valid(&self, i: usize) -> bool {
        self.valid.get(i).is_some_and(|v| v.load(Ordering::Relaxed))
    }
}

/// Runs by original start address, then arrival (a later run may start
/// where an earlier one still holds current pages).
type Runs = BTreeMap<(u64, u64), Arc<Kept>>;

/// Pre-copied pages of one move, by original address.
pub struct Store {
    runs: Mutex<Runs>,
    /// Arrivals so far.
    seq: std::sync::atomic::AtomicU64,
    born: Instant,
}

impl Default for Store {
    fn default() -> Store {
        Store::new()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store {
            runs: Mutex::new(BTreeMap::new()),
            seq: std::sync::atomic::AtomicU64::new(0),
            born: Instant::now(),
        }
    }

    /// Since when it exists.
    pub fn age(&self) -> Duration {
        self.born.elapsed()
    }

    /// Marks the pages of `[s, e)` in every run as no longer current.
    fn forget(runs: &mut Runs, s: u64, e: u64) {
        let mut empty = Vec::new();
        for (&(start, seq), k) in runs.range((s.saturating_sub(MAX_RUN - 1), 0)..(e, 0)) {
            let end = start + k.pages() * PAGE;
            let (lo, hi) = (s.max(start), e.min(end));
            if lo >= hi {
                continue;
            }
            let (a, b) = ((lo - start) / PAGE, (hi - start).div_ceil(PAGE));
            for i in usize::try_from(a).unwrap_or(0)..usize::try_from(b).unwrap_or(0) {
                if k.valid[i].swap(false, Ordering::Relaxed) {
                    k.live.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if k.live.load(Ordering::Relaxed) == 0 {
                empty.push((start, seq));
            }
        }
        for s in empty {
            runs.remove(&s);
        }
    }

    /// Forgets the pages in `ranges`.
    pub fn discard(&self, ranges: &[(u64, u64)]) {
        let mut runs = self.runs.lock();
        for &(s, e) in ranges {
            Store::forget(&mut runs, s, e);
        }
    }

    /// Keeps `data` (whole pages) that the original had at `addr`; it
    /// replaces what was kept there.
    pub fn put(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let len = data.len() as u64;
        if !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(format!(
                "pre-copied run {addr:#x}+{len:#x} not page-aligned"
            ));
        }
        for (i, piece) in data
            .chunks(usize::try_from(MAX_RUN).unwrap_or(usize::MAX))
            .enumerate()
        {
            let at = addr + i as u64 * MAX_RUN;
            let mut r = Region::new(piece.len())
                .map_err(|e| format!("memory for pre-copied pages: {e}"))?;
            r.as_mut_slice().copy_from_slice(piece);
            let n = piece.len() / 4096;
            let mut runs = self.runs.lock();
            Store::forget(&mut runs, at, at + piece.len() as u64);
            let kept = Kept {
                data: r,
                valid: (0..n).map(|_| AtomicBool::new(true)).collect(),
                live: AtomicUsize::new(n),
            };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            runs.insert((at, seq), Arc::new(kept));
        }
        Ok(())
    }

    /// Pages kept.
    pub fn len(&self) -> u64 {
        self.runs
            .lock()
            .values()
            .map(|k| k.live.load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// Whether no page is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `len` bytes at `addr` if every page is kept; with `zero_fill`,
    /// missing pages read as zeros.
    pub fn read(&self, addr: u64, len: usize, zero_fill: bool) -> Option<Vec<u8>> {
        let runs = self.runs.lock();
        let mut out = vec![0u8; len];
        for (i, chunk) in out.chunks_mut(4096).enumerate() {
            let p = addr + i as u64 * PAGE;
            let found = runs
                .range((p.saturating_sub(MAX_RUN - 1), 0)..=(p, u64::MAX))
                .rev()
                .find_map(|(&(start, _), k)| {
                    let idx = usize::try_from((p - start) / PAGE).ok()?;
                    k.is_valid(idx).then_some(())?;
                    let off = idx * 4096;
                    Some(&k.data.as_slice()[off..off + chunk.len()])
                });
            match found {
                Some(page) => chunk.copy_from_slice(page),
                None if zero_fill => {}
                None => return None,
            }
        }
        Some(out)
    }

    /// Installs every kept page the process does not have yet, a run of
    /// current pages at a time; returns the pages newly installed. Each
    /// run stays readable by the fault handler until it is installed (a
    /// page it serves meanwhile must not read as missing); the store is
    /// empty afterwards.
    pub fn install_all(&self, lazy: &LazyPages) -> Result<u64, String> {
        let all: Vec<((u64, u64), Arc<Kept>)> = self
            .runs
            .lock()
            .iter()
            .map(|(&key, k)| (key, Arc::clone(k)))
            .collect();
        let mut n = 0;
        for (key, k) in all {
            let start = key.0;
            let mut i = 0;
            while i < k.valid.len() {
                if !k.is_valid(i) {
                    i += 1;
                    continue;
                }
                let j = (i..k.valid.len())
                    .find(|&j| !k.is_valid(j))
                    .unwrap_or(k.valid.len());
                let at = start + i as u64 * PAGE;
                n += lazy
                    .install(at, &k.data.as_slice()[i * 4096..j * 4096])
                    .map_err(|e| format!("install pre-copied {at:#x}: {e}"))?;
                i = j;
            }
            // Installed: faults find it in the process now.
            self.runs.lock().remove(&key);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(first: u8, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| vec![first.wrapping_add(u8::try_from(i % 251).unwrap()); 4096])
            .collect()
    }

    #[test]
    fn keeps_discards_and_replaces_pages() {
        let s = Store::new();
        s.put(0x10000, &pages(1, 4)).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.read(0x11000, 8192, false).unwrap(), pages(2, 2));
        // A discarded page is missing (or zeros when asked).
        s.discard(&[(0x11000, 0x12000)]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.read(0x10000, 8192, false), None);
        let z = s.read(0x10000, 8192, true).unwrap();
        assert_eq!(&z[..4096], &pages(1, 1)[..]);
        assert!(z[4096..].iter().all(|&b| b == 0));
        // A newer run over an older one wins.
        s.put(0x11000, &pages(9, 2)).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.read(0x10000, 4 * 4096, false).unwrap(), {
            let mut v = pages(1, 1);
            v.extend(pages(9, 2));
            v.extend(pages(4, 1));
            v
        });
        // A shorter run where a longer one starts: the rest stays.
        s.put(0x10000, &pages(20, 1)).unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s.read(0x10000, 8192, false).unwrap(), {
            let mut v = pages(20, 1);
            v.extend(pages(9, 1));
            v
        });
        // A run with nothing current left is freed.
        s.discard(&[(0x10000, 0x14000)]);
        assert!(s.is_empty());
        assert_eq!(s.runs.lock().len(), 0);
        assert!(s.put(0x10001, &pages(1, 1)).is_err());
    }

    #[test]
    fn long_runs_are_split() {
        let s = Store::new();
        let n = usize::try_from(MAX_RUN / PAGE).unwrap() + 3;
        let data = pages(0, n);
        s.put(0x4000_0000, &data).unwrap();
        assert_eq!(s.runs.lock().len(), 2);
        assert_eq!(s.len(), n as u64);
        let at = 0x4000_0000 + MAX_RUN - PAGE;
        let off = usize::try_from(MAX_RUN - PAGE).unwrap();
        assert_eq!(
            s.read(at, 3 * 4096, false).unwrap(),
            &data[off..off + 3 * 4096]
        );
    }
}
