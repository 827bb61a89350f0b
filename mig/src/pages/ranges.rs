//! Range arithmetic on `[start, end)` address runs, and the
//! [`OriginMap`] of a lazy restore: for each address of the restored
//! process, where its data lives in the original (the same address until
//! the process moves memory with mremap; nowhere once it discards or
//! unmaps it).

use std::collections::BTreeMap;

/// Sorts `runs` and merges the ones that overlap or touch; drops empty ones.
pub fn normalize(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|&(s, e)| s < e);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` without `b` (both normalized); normalized.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut at = s;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while at < e {
            match b.get(k) {
                Some(&(bs, be)) if bs < e => {
                    if bs > at {
                        out.push((at, bs));
                    }
                    at = at.max(be);
                    k += 1;
                }
                _ => {
                    out.push((at, e));
                    at = e;
                }
            }
        }
    }
    out
}

/// The parts of `a` inside `b` (both normalized); normalized.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Total bytes of `runs`.
pub fn total(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|&(s, e)| e - s).sum()
}

/// Where the data of each address of a restored process lives in the
/// original. Addresses not covered have none: the process discarded,
/// unmapped or newly grew them, and a missing page there reads as zeros.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginMap {
    /// start → (end, original address of start).
    segs: BTreeMap<u64, (u64, u64)>,
    /// Segments whose original address differs from their own.
    moved: usize,
}

/// One covered run: `[start, end)` here holds what the original had at
/// `origin..origin + (end - start)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// First address here.
    pub start: u64,
    /// End here.
    pub end: u64,
    /// Original address of `start`.
    pub origin: u64,
}

impl OriginMap {
    /// Every address of `ranges` holds the original's data at the same
    /// address.
    pub fn identity(ranges: &[(u64, u64)]) -> OriginMap {
        let mut m = OriginMap::default();
        for (s, e) in normalize(ranges.to_vec()) {
            m.segs.insert(s, (e, s));
        }
        m
    }

    /// The covered run holding `addr`.
    pub fn at(&self, addr: u64) -> Option<Seg> {
        let (&start, &(end, origin)) = self.segs.range(..=addr).next_back()?;
        (addr < end).then_some(Seg { start, end, origin })
    }

    fn insert(&mut self, s: Seg) {
        if s.start < s.end {
            if s.origin != s.start {
                self.moved += 1;
            }
            self.segs.insert(s.start, (s.end, s.origin));
        }
    }

    fn remove(&mut self, start: u64) -> Option<Seg> {
        let (end, origin) = self.segs.remove(&start)?;
        if origin != start {
            self.moved -= 1;
        }
        Some(Seg { start, end, origin })
    }

    /// Uncovers `[s, e)`; returns the pieces that were covered.
    fn cut(&mut self, s: u64, e: u64) -> Vec<Seg> {
        let mut hit: Vec<u64> = Vec::new();
        if let Some(seg) = self.at(s) {
            hit.push(seg.start);
        }
        hit.extend(self.segs.range(s..e).map(|(&k, _)| k));
        hit.dedup();
        let mut pieces = Vec::new();
        for k in hit {
            let Some(seg) = self.remove(k) else { continue };
            let (cs, ce) = (seg.start.max(s), seg.end.min(e));
            if seg.start < cs {
                self.insert(Seg { end: cs, ..seg });
            }
            if ce < seg.end {
                self.insert(Seg {
                    start: ce,
                    end: seg.end,
                    origin: seg.origin + (ce - seg.start),
                });
            }
            if cs < ce {
                pieces.push(Seg {
                    start: cs,
                    end: ce,
                    origin: seg.origin + (cs - seg.start),
                });
            }
        }
        pieces
    }

    /// The process discarded or unmapped `[s, e)`.
    pub fn discard(&mut self, s: u64, e: u64) {
        self.cut(s, e);
    }

    /// The process moved `[from, from+len)` to `to` (mremap); whatever was
    /// at `to` is gone.
    pub fn moved(&mut self, from: u64, to: u64, len: u64) {
        let pieces = self.cut(from, from + len);
        self.cut(to, to + len);
        for p in pieces {
            self.insert(Seg {
                start: p.start - from + to,
                end: p.end - from + to,
                origin: p.origin,
            });
        }
    }

    /// Where the original's `[o_start, o_end)` lives now: `(here, original
    /// address, len)` runs, in address order here.
    pub fn destinations(&self, o_start: u64, o_end: u64) -> Vec<(u64, u64, u64)> {
        let clip = |seg: Seg| {
            let (os, oe) = (seg.origin, seg.origin + (seg.end - seg.start));
            let (s, e) = (os.max(o_start), oe.min(o_end));
            (s < e).then(|| (seg.start + (s - os), s, e - s))
        };
        let segs = |(&start, &(end, origin)): (&u64, &(u64, u64))| Seg { start, end, origin };
        if self.moved == 0 {
            // Every run is where it was: look only near `o_start`.
            let first = self.at(o_start).map_or(o_start, |s| s.start);
            return self
                .segs
                .range(first..o_end)
                .map(segs)
                .filter_map(clip)
                .collect();
        }
        self.segs.iter().map(segs).filter_map(clip).collect()
    }

    /// The covered runs, in address order.
    pub fn runs(&self) -> Vec<Seg> {
        self.segs
            .iter()
            .map(|(&start, &(end, origin))| Seg { start, end, origin })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_merges_overlaps_and_neighbours() {
        assert_eq!(
            normalize(vec![(10, 20), (0, 5), (5, 8), (15, 30), (40, 40)]),
            vec![(0, 8), (10, 30)]
        );
    }

    #[test]
    fn subtract_and_intersect() {
        let a = [(0, 10), (20, 30), (40, 50)];
        let b = [(5, 22), (25, 26), (45, 60)];
        assert_eq!(subtract(&a, &b), vec![(0, 5), (22, 25), (26, 30), (40, 45)]);
        assert_eq!(
            intersect(&a, &b),
            vec![(5, 10), (20, 22), (25, 26), (45, 50)]
        );
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(intersect(&a, &[]), vec![]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), vec![]);
        assert_eq!(total(&a), 30);
    }

    #[test]
    fn discard_splits_runs() {
        let mut m = OriginMap::identity(&[(0x1000, 0x9000)]);
        m.discard(0x3000, 0x5000);
        assert_eq!(
            m.at(0x2000),
            Some(Seg {
                start: 0x1000,
                end: 0x3000,
                origin: 0x1000
            })
        );
        assert_eq!(m.at(0x3000), None);
        assert_eq!(m.at(0x4fff), None);
        assert_eq!(
            m.at(0x5000).map(|s| (s.start, s.origin)),
            Some((0x5000, 0x5000))
        );
        assert_eq!(m.at(0x9000), None);
        assert_eq!(
            m.destinations(0x2000, 0x6000),
            vec![(0x2000, 0x2000, 0x1000), (0x5000, 0x5000, 0x1000)]
        );
    }

    #[test]
    fn moves_compose_and_uncover_the_old_place() {
        let mut m = OriginMap::identity(&[(0x10000, 0x20000)]);
        // Move 0x12000..0x14000 to 0x50000, then back onto 0x10000.
        m.moved(0x12000, 0x50000, 0x2000);
        assert_eq!(m.at(0x12000), None);
        assert_eq!(
            m.at(0x51000),
            Some(Seg {
                start: 0x50000,
                end: 0x52000,
                origin: 0x12000
            })
        );
        assert_eq!(
            m.destinations(0x11000, 0x13000),
            vec![(0x11000, 0x11000, 0x1000), (0x50000, 0x12000, 0x1000)]
        );
        m.moved(0x50000, 0x10000, 0x2000);
        assert_eq!(m.at(0x50000), None);
        assert_eq!(m.at(0x10000).map(|s| s.origin), Some(0x12000));
        assert_eq!(m.at(0x11fff).map(|s| s.origin), Some(0x12000));
        // The original's 0x10000..0x12000 was overwritten by the move.
        assert_eq!(
            m.destinations(0x10000, 0x14000),
            vec![(0x10000, 0x12000, 0x2000)]
        );
        m.discard(0, u64::MAX);
        assert_eq!(m.runs(), vec![]);
        assert_eq!(m.moved, 0);
    }

    #[test]
    fn growing_a_moved_run_leaves_the_tail_uncovered() {
        let mut m = OriginMap::identity(&[(0x1000, 0x3000)]);
        // mremap 0x1000+0x2000 → 0x8000 with a new length of 0x4000: the
        // event carries the old length.
        m.moved(0x1000, 0x8000, 0x2000);
        assert_eq!(m.at(0x9fff).map(|s| s.origin), Some(0x1000));
        assert_eq!(m.at(0xa000), None);
    }
}
