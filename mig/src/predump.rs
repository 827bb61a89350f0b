//! Pre-copy into an image (`migfs checkpoint --precopy`; DESIGN
//! "Migration" step 2 for a checkpoint): the process's private anonymous
//! memory is written to `pages.img` while it runs, round after round,
//! with a dirty tracker ([`Tracker`]: userfaultfd write-protect +
//! `PAGEMAP_SCAN`) naming what changed since; after the freeze only what
//! changed since the last round is copied ([`PreDump::finish`]).
//!
//! Bookkeeping ([`Book`]): every segment written so far, by address. A
//! round drops each segment that overlaps what was written since and
//! copies its whole range (and the dirty pages around it) again: a
//! segment's blake3 always covers exactly the bytes it names. Segments
//! are cut at 1 MiB address boundaries ([`aligned_chunks`]), so a
//! segment copied again usually has the length it had, and its new bytes
//! go where the old ones were; an extent no segment names (the memory
//! was emptied, or cut differently) stays in `pages.img` unnamed. The
//! image still lists sorted, non-overlapping segments inside mappings,
//! each with its blake3 (docs/image-format.md).
//!
//! Correctness: a page is read only after the tracker protected it (at
//! start, or at the collect that ended the round before), so a write
//! during or after its read is reported by the next collect, and the
//! segment holding it is copied again, at the latest while the process
//! is frozen. Reads of a running process that fail (memory unmapped
//! meanwhile) are retried in the next round.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use migfs_proto::image::MemSegment;
use nix::unistd::Pid;

use crate::error::{CaptureError, MigError};
use crate::image::format::MAX_SEGMENT;
use crate::image::persist::PagesWriter;
use crate::pages::ranges::{intersect, normalize, total};
use crate::pages::rounds::{RoundPolicy, Verdict};
use crate::pages::{PageSource, Tracker};
use crate::sys::procfs;

/// Knobs of a pre-copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct PrecopyOptions {
    /// When the rounds stop.
    pub rounds: RoundPolicy,
}

/// What a pre-copy did.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyReport {
    /// Rounds while the process ran.
    pub rounds: u32,
    /// Why they stopped.
    pub verdict: Verdict,
    /// Bytes copied while it ran (all rounds).
    pub copied: u64,
    /// Dirty bytes the last round left.
    pub last_dirty: u64,
    /// Time of the rounds (the process ran meanwhile).
    pub elapsed: Duration,
    /// Bytes copied again while it was frozen.
    pub frozen_bytes: u64,
    /// Time of that last copy.
    pub frozen_copy: Duration,
    /// Bytes of `pages.img` no segment names.
    pub unnamed: u64,
}

/// Segments written so far, and the extents of `pages.img` they left.
#[derive(Debug, Default)]
pub struct Book {
    segs: BTreeMap<u64, MemSegment>,
    /// `(offset, len)` of `pages.img` no segment names.
    free: Vec<(u64, u64)>,
}

impl Book {
    /// An empty book.
    pub fn new() -> Book {
        Book::default()
    }

    /// Drops every segment that overlaps `dirty`; returns the ranges to
    /// copy again: `dirty` and the dropped segments' ranges, normalized.
    pub fn invalidate(&mut self, dirty: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out = dirty.to_vec();
        for &(s, e) in dirty {
            // Sorted and non-overlapping: the ends are sorted too.
            let hit: Vec<u64> = self
                .segs
                .range(..e)
                .rev()
                .take_while(|(_, g)| g.vaddr + g.len > s)
                .map(|(&v, _)| v)
                .collect();
            for v in hit {
                out.push(self.drop_seg(v));
            }
        }
        normalize(out)
    }

    /// Drops every segment that does not lie wholly inside one of `keep`
    /// (one range per mapping, not merged); returns their ranges.
    pub fn retain_inside(&mut self, keep: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let out: Vec<u64> = self
            .segs
            .values()
            .filter(|g| {
                !keep
                    .iter()
                    .any(|&(s, e)| s <= g.vaddr && g.vaddr + g.len <= e)
            })
            .map(|g| g.vaddr)
            .collect();
        let dropped = out.into_iter().map(|v| self.drop_seg(v)).collect();
        normalize(dropped)
    }

    fn drop_seg(&mut self, vaddr: u64) -> (u64, u64) {
        match self.segs.remove(&vaddr) {
            Some(g) => {
                self.free.push((g.offset, g.len));
                (g.vaddr, g.vaddr + g.len)
            }
            None => (vaddr, vaddr),
        }
    }

    /// An extent of `len` bytes no segment names, taken for a new one.
    pub fn place(&mut self, len: u64) -> Option<u64> {
        let i = self.free.iter().position(|&(_, l)| l == len)?;
        Some(self.free.swap_remove(i).0)
    }

    /// Records a segment written (it must not overlap another).
    pub fn insert(&mut self, seg: MemSegment) {
        self.segs.insert(seg.vaddr, seg);
    }

    /// Bytes the segments name.
    pub fn bytes(&self) -> u64 {
        self.segs.values().map(|g| g.len).sum()
    }

    /// Bytes of `pages.img` no segment names.
    pub fn unnamed(&self) -> u64 {
        self.free.iter().map(|&(_, l)| l).sum()
    }

    /// The segments, in address order.
    pub fn segments(&self) -> Vec<MemSegment> {
        self.segs.values().cloned().collect()
    }
}

/// Splits runs at multiples of `max` (addresses), so the same memory is
/// cut into the same segments round after round.
pub fn aligned_chunks(runs: &[(u64, u64)], max: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(s, e) in runs {
        let mut at = s;
        while at < e {
            let end = e.min((at / max + 1) * max);
            out.push((at, end));
            at = end;
        }
    }
    out
}

/// Runs of `runs` inside each of `vmas` (one range per mapping), cut
/// with [`aligned_chunks`]: no piece crosses a mapping boundary.
pub fn per_mapping(runs: &[(u64, u64)], vmas: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &v in vmas {
        out.extend(aligned_chunks(&intersect(runs, &[v]), MAX_SEGMENT));
    }
    out.sort_unstable();
    out
}

/// What the capture takes from a pre-copy: the page file, the ranges it
/// covers (one per mapping) and their segments.
#[derive(Debug)]
pub struct Premade {
    /// `pages.img`, with the pre-copied segments in it.
    pub writer: PagesWriter,
    /// Memory whose pages are in `segments` (a capture skips it).
    pub covered: Vec<(u64, u64)>,
    /// The segments of `covered`.
    pub segments: Vec<MemSegment>,
}

/// A pre-copy in progress; see the module doc.
pub struct PreDump {
    pid: Pid,
    tracker: Tracker,
    source: PageSource,
    writer: Option<PagesWriter>,
    book: Book,
    /// The private anonymous mappings at the start, one range each.
    vmas: Vec<(u64, u64)>,
    /// Dirty since the last round copied.
    dirty: Vec<(u64, u64)>,
    buf: Vec<u8>,
    report: PrecopyReport,
}

impl std::fmt::Debug for PreDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreDump")
            .field("pid", &self.pid)
            .field("report", &self.report)
            .finish()
    }
}

fn io(pid: Pid, what: &'static str) -> impl FnOnce(std::io::Error) -> MigError {
    move |source| {
        CaptureError::Io {
            pid: pid.as_raw(),
            what: what.into(),
            source,
        }
        .into()
    }
}

impl PreDump {
    /// Starts an image in `dir` and copies the private anonymous memory
    /// of running `pid` into it in rounds, until the policy says stop.
    /// On error the process runs on untouched (tracking ends).
    #[tracing::instrument(skip_all, fields(pid = pid.as_raw(), dir = %dir.display()))]
    pub fn run(pid: Pid, dir: &Path, opts: &PrecopyOptions) -> Result<PreDump, MigError> {
        let t0 = Instant::now();
        let maps = procfs::maps(pid).map_err(io(pid, "maps"))?;
        let vmas = crate::pages::lazy_ranges_of_maps(&maps);
        let tracked = normalize(vmas.clone());
        let tracker = Tracker::start(pid, &tracked)?;
        let source = PageSource::new(pid, tracked.clone())?;
        let writer = PagesWriter::create(dir)?;
        let mut d = PreDump {
            pid,
            tracker,
            source,
            writer: Some(writer),
            book: Book::new(),
            vmas,
            dirty: tracked,
            buf: Vec::new(),
            report: PrecopyReport {
                rounds: 0,
                verdict: Verdict::Again,
                copied: 0,
                last_dirty: 0,
                elapsed: Duration::ZERO,
                frozen_bytes: 0,
                frozen_copy: Duration::ZERO,
                unnamed: 0,
            },
        };
        d.rounds(&opts.rounds)?;
        d.report.elapsed = t0.elapsed();
        Ok(d)
    }

    /// Rounds until `policy` says stop.
    fn rounds(&mut self, policy: &RoundPolicy) -> Result<(), MigError> {
        let mut last = None;
        loop {
            let todo = std::mem::take(&mut self.dirty);
            let (copied, failed) = self.copy(&todo, true)?;
            self.report.copied += copied;
            self.report.rounds += 1;
            let mut dirty = self.tracker.collect()?;
            dirty.extend(failed);
            self.dirty = normalize(dirty);
            let left = total(&self.dirty);
            let verdict = policy.decide(self.report.rounds, left, last);
            tracing::debug!(
                round = self.report.rounds,
                copied_kib = copied >> 10,
                dirty_kib = left >> 10,
                verdict = verdict.as_str(),
                "pre-copy round"
            );
            if verdict != Verdict::Again {
                self.report.verdict = verdict;
                self.report.last_dirty = left;
                return Ok(());
            }
            last = Some(left);
        }
    }

    /// Copies the present pages of `todo` (and of every segment it
    /// touches) again. Returns the bytes copied and, for a running
    /// process, the runs that could not be read (to retry).
    fn copy(
        &mut self,
        todo: &[(u64, u64)],
        running: bool,
    ) -> Result<(u64, Vec<(u64, u64)>), MigError> {
        let again = self.book.invalidate(todo);
        let present = self.source.present()?;
        let runs = per_mapping(&intersect(&present, &again), &self.vmas);
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| CaptureError::Unsupported {
                pid: self.pid.as_raw(),
                what: "pre-copy already finished".into(),
            })?;
        let (mut copied, mut failed) = (0, Vec::new());
        for (s, e) in runs {
            let len = usize::try_from(e - s).unwrap_or(0);
            self.buf.resize(len, 0);
            match self.source.read(s, &mut self.buf) {
                Ok(()) => {}
                Err(_) if running => {
                    failed.push((s, e));
                    continue;
                }
                Err(err) => return Err(err),
            }
            let hash = *blake3::hash(&self.buf).as_bytes();
            let seg = match self.book.place(e - s) {
                Some(off) => writer.segment_at(off, s, &self.buf, hash)?,
                None => writer.segment(s, &self.buf, hash)?,
            };
            self.book.insert(seg);
            copied += e - s;
        }
        Ok((copied, failed))
    }

    /// With the process frozen: copies what changed since the last round
    /// and hands the page file and the pre-copied segments to the
    /// capture. Memory mapped since the start, or outside the mappings
    /// tracked, is not covered: the capture copies it as usual.
    pub fn finish(&mut self) -> Result<Premade, MigError> {
        let t = Instant::now();
        let maps = procfs::maps(self.pid).map_err(io(self.pid, "maps"))?;
        let tracked = normalize(self.vmas.clone());
        let covered: Vec<(u64, u64)> = crate::pages::lazy_ranges_of_maps(&maps)
            .into_iter()
            .flat_map(|m| intersect(&tracked, &[m]))
            .collect();
        let mut stale = std::mem::take(&mut self.dirty);
        stale.extend(self.tracker.collect_last()?);
        stale.extend(self.book.retain_inside(&covered));
        self.vmas.clone_from(&covered);
        let (bytes, _) = self.copy(&normalize(stale), false)?;
        self.report.frozen_bytes = bytes;
        self.report.frozen_copy = t.elapsed();
        self.report.unnamed = self.book.unnamed();
        let writer = self
            .writer
            .take()
            .ok_or_else(|| CaptureError::Unsupported {
                pid: self.pid.as_raw(),
                what: "pre-copy already finished".into(),
            })?;
        tracing::debug!(
            frozen_kib = bytes >> 10,
            ms = t.elapsed().as_secs_f64() * 1e3,
            segments_mib = self.book.bytes() >> 20,
            "pre-copy finished"
        );
        Ok(Premade {
            writer,
            covered,
            segments: self.book.segments(),
        })
    }

    /// What it did so far.
    pub fn report(&self) -> PrecopyReport {
        self.report
    }

    /// Ends dirty tracking (the kernel lifts every protection).
    pub fn stop(self) {
        self.tracker.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = MAX_SEGMENT;

    fn seg(vaddr: u64, len: u64, offset: u64) -> MemSegment {
        MemSegment {
            vaddr,
            len,
            offset,
            blake3: vec![0; 32],
        }
    }

    #[test]
    fn chunks_are_cut_at_aligned_addresses() {
        assert_eq!(
            aligned_chunks(&[(M - 0x1000, 2 * M + 0x2000)], M),
            vec![(M - 0x1000, M), (M, 2 * M), (2 * M, 2 * M + 0x2000)]
        );
        assert_eq!(aligned_chunks(&[(0, M)], M), vec![(0, M)]);
        // Two mappings that touch are cut apart.
        assert_eq!(
            per_mapping(&[(0, 3 * M)], &[(M / 2, M + M / 2), (M + M / 2, 2 * M)]),
            vec![(M / 2, M), (M, M + M / 2), (M + M / 2, 2 * M)]
        );
    }

    #[test]
    fn a_dirty_page_drops_its_whole_segment_and_the_extent_is_reused() {
        let mut b = Book::new();
        b.insert(seg(0, M, 0));
        b.insert(seg(M, M, M));
        b.insert(seg(2 * M, 0x1000, 2 * M));
        // One page in the second segment, one just past the third (which
        // touches it but does not overlap: kept).
        let again = b.invalidate(&[(M + 0x3000, M + 0x4000), (2 * M + 0x1000, 2 * M + 0x2000)]);
        assert_eq!(again, vec![(M, 2 * M), (2 * M + 0x1000, 2 * M + 0x2000)]);
        assert_eq!(b.segments(), vec![seg(0, M, 0), seg(2 * M, 0x1000, 2 * M)]);
        assert_eq!(b.unnamed(), M);
        // A segment of the same length goes where the old one was.
        assert_eq!(b.place(0x1000), None);
        assert_eq!(b.place(M), Some(M));
        assert_eq!(b.place(M), None);
        assert_eq!(b.unnamed(), 0);
    }

    #[test]
    fn invalidating_clean_memory_changes_nothing() {
        let mut b = Book::new();
        b.insert(seg(M, M, 0));
        assert_eq!(b.invalidate(&[(0, M)]), vec![(0, M)]);
        assert_eq!(b.invalidate(&[(2 * M, 3 * M)]), vec![(2 * M, 3 * M)]);
        assert_eq!(b.invalidate(&[]), vec![]);
        assert_eq!(b.bytes(), M);
    }

    #[test]
    fn segments_outside_or_across_the_final_mappings_are_dropped() {
        let mut b = Book::new();
        b.insert(seg(0, M, 0));
        b.insert(seg(M, M, M));
        b.insert(seg(4 * M, M, 2 * M));
        // The second mapping was split at 1.5 MiB (mprotect), the third
        // unmapped.
        let dropped = b.retain_inside(&[(0, M + M / 2), (M + M / 2, 2 * M)]);
        assert_eq!(dropped, vec![(M, 2 * M), (4 * M, 5 * M)]);
        assert_eq!(b.segments(), vec![seg(0, M, 0)]);
        assert_eq!(b.unnamed(), 2 * M);
    }
}
