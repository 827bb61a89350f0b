//! A lazy restore's pages from an image directory (`migfs restore
//! --lazy`; docs/checkpoint-restore.md "Lazy restore"): the private
//! anonymous memory of the image is left to the userfaultfd handler
//! ([`super::lazy`]), which takes it from `pages.img` through
//! [`ImagePages`] when the process touches it, while [`ImagePages::fill`]
//! installs every segment in the background.
//!
//! Every segment is read whole and checked against its blake3 before any
//! of its bytes reach the process, for a fault as for the fill. A
//! mismatch after the process resumed kills it (the handler's rule for a
//! failed fetch, [`super::LazyPages::abort`] for the fill); the error
//! names the segment.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use migfs_proto::image::{Image, MemSegment};
use parking_lot::Mutex;

use super::ranges::normalize;
use super::{LazyPages, PageFetch};
use crate::error::{MigError, PagesError};
use crate::image::persist::PagesReader;

/// Verified segments kept for the faults that follow (a read-ahead
/// window is much smaller than a segment).
const CACHED: usize = 8;

/// Pages of an image's lazy segments; see the module doc.
pub struct ImagePages {
    reader: PagesReader,
    /// Sorted by address, non-overlapping (checked by `read_image`).
    segs: Vec<MemSegment>,
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for ImagePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagePages")
            .field("path", &self.reader.path())
            .field("segments", &self.segs.len())
            .finish()
    }
}

/// What a fill did.
#[derive(Clone, Copy, Debug, Default)]
pub struct FillStats {
    /// Segments read and checked.
    pub segments: u64,
    /// Bytes read and checked.
    pub bytes: u64,
    /// Pages the fill installed (the rest were faulted in before).
    pub installed_pages: u64,
    /// Time from the start of the fill until every segment was in.
    pub elapsed: Duration,
    /// The process ended before the fill did (nothing left to fill).
    pub gone: bool,
}

/// Marks the private anonymous mappings of `img` lazy (the restore maps
/// them empty and registers them with its userfaultfd) and takes their
/// segments out of the ones written before the process runs; returns
/// those segments.
pub fn split_lazy(img: &mut Image) -> Vec<MemSegment> {
    let Some(mm) = img.mm.as_mut() else {
        return Vec::new();
    };
    for v in &mut mm.vmas {
        if super::is_lazy_kind(v.kind, v.shared, v.prot) {
            v.lazy = true;
        }
    }
    let lazy = normalize(
        mm.vmas
            .iter()
            .filter(|v| v.lazy)
            .map(|v| (v.start, v.end))
            .collect(),
    );
    let inside = |s: &MemSegment| {
        lazy.iter()
            .any(|&(a, b)| a <= s.vaddr && s.vaddr + s.len <= b)
    };
    let (out, eager): (Vec<_>, Vec<_>) = mm.segments.drain(..).partition(inside);
    mm.segments = eager;
    out
}

impl ImagePages {
    /// Serves `segs` (from [`split_lazy`]) out of `reader`.
    pub fn new(reader: PagesReader, segs: Vec<MemSegment>) -> ImagePages {
        ImagePages {
            reader,
            segs,
            cache: Mutex::new(VecDeque::new()),
        }
    }

    /// Bytes of the lazy segments.
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }

    /// The first lazy segment's range, if any.
    pub fn first(&self) -> Option<(u64, u64)> {
        self.segs.first().map(|s| (s.vaddr, s.vaddr + s.len))
    }

    /// Segment `i`, read whole and checked.
    fn verified(&self, i: usize) -> Result<Arc<Vec<u8>>, String> {
        if let Some((_, d)) = self.cache.lock().iter().find(|(j, _)| *j == i) {
            return Ok(Arc::clone(d));
        }
        let mut buf = Vec::new();
        self.reader
            .read(&self.segs[i], &mut buf)
            .map_err(|e| e.to_string())?;
        let d = Arc::new(buf);
        let mut c = self.cache.lock();
        if c.len() >= CACHED {
            c.pop_front();
        }
        c.push_back((i, Arc::clone(&d)));
        Ok(d)
    }

    /// Installs every lazy segment into the process of `lazy`, with
    /// `threads` threads, each segment checked first. A segment that
    /// fails its check kills the process ([`LazyPages::abort`]) and is
    /// named in the error; a process that ended meanwhile ends the fill
    /// early (`gone`).
    pub fn fill(&self, lazy: &LazyPages, pid: i32, threads: usize) -> Result<FillStats, MigError> {
        let t0 = Instant::now();
        let next = AtomicUsize::new(0);
        let results: Vec<Result<FillStats, MigError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads.max(1))
                .map(|_| s.spawn(|| self.fill_some(lazy, pid, &next)))
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        let why = "the fill thread panicked".to_owned();
                        lazy.abort(why.clone());
                        Err(PagesError::Failed { pid, why }.into())
                    })
                })
                .collect()
        });
        let mut total = FillStats::default();
        for r in results {
            let r = r?;
            total.segments += r.segments;
            total.bytes += r.bytes;
            total.installed_pages += r.installed_pages;
            total.gone |= r.gone;
        }
        if let Some(why) = lazy.failed() {
            return Err(PagesError::Failed { pid, why }.into());
        }
        total.elapsed = t0.elapsed();
        Ok(total)
    }

    /// One fill thread: takes the next segment until none is left.
    fn fill_some(
        &self,
        lazy: &LazyPages,
        pid: i32,
        next: &AtomicUsize,
    ) -> Result<FillStats, MigError> {
        let mut st = FillStats::default();
        let mut buf = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(seg) = self.segs.get(i) else {
                return Ok(st);
            };
            if let Err(e) = self.reader.read(seg, &mut buf) {
                let why = format!("{e}; the process was killed");
                lazy.abort(why.clone());
                return Err(PagesError::Failed { pid, why }.into());
            }
            match lazy.install(seg.vaddr, &buf) {
                Ok(n) => st.installed_pages += n,
                Err(MigError::Pages(PagesError::Gone { .. })) => {
                    st.gone = true;
                    return Ok(st);
                }
                Err(e) => {
                    // Already failed (the handler killed it), or a copy
                    // that cannot go on: it must not run on.
                    lazy.abort(e.to_string());
                    return Err(e);
                }
            }
            st.segments += 1;
            st.bytes += seg.len;
        }
    }
}

impl PageFetch for ImagePages {
    fn fetch(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        let end = addr + len as u64;
        let mut out = vec![0u8; len];
        let first = self.segs.partition_point(|s| s.vaddr + s.len <= addr);
        for (i, s) in self.segs.iter().enumerate().skip(first) {
            if s.vaddr >= end {
                break;
            }
            let data = self.verified(i)?;
            let (a, b) = (s.vaddr.max(addr), (s.vaddr + s.len).min(end));
            let at = |x: u64, base: u64| usize::try_from(x - base).unwrap_or(usize::MAX);
            let src = data
                .get(at(a, s.vaddr)..at(b, s.vaddr))
                .ok_or_else(|| format!("segment at {:#x}: short", s.vaddr))?;
            out[at(a, addr)..at(b, addr)].copy_from_slice(src);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::persist::PagesWriter;
    use migfs_proto::image::{MemoryMap, Vma, VmaKind};

    fn vma(start: u64, end: u64, kind: VmaKind, shared: bool) -> Vma {
        Vma {
            start,
            end,
            prot: 3,
            shared,
            kind: kind as i32,
            ..Default::default()
        }
    }

    fn seg(vaddr: u64, len: u64) -> MemSegment {
        MemSegment {
            vaddr,
            len,
            ..Default::default()
        }
    }

    #[test]
    fn only_private_anonymous_segments_become_lazy() {
        let mut img = Image {
            mm: Some(MemoryMap {
                vmas: vec![
                    vma(0x1000, 0x3000, VmaKind::VmaFile, false),
                    vma(0x3000, 0x5000, VmaKind::VmaHeap, false),
                    vma(0x5000, 0x6000, VmaKind::VmaSharedAnon, true),
                    vma(0x6000, 0x9000, VmaKind::VmaAnon, false),
                ],
                segments: vec![
                    seg(0x1000, 0x1000),
                    seg(0x3000, 0x2000),
                    seg(0x5000, 0x1000),
                    seg(0x7000, 0x1000),
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let lazy = split_lazy(&mut img);
        assert_eq!(lazy, vec![seg(0x3000, 0x2000), seg(0x7000, 0x1000)]);
        let mm = img.mm.unwrap();
        assert_eq!(mm.segments, vec![seg(0x1000, 0x1000), seg(0x5000, 0x1000)]);
        let flags: Vec<bool> = mm.vmas.iter().map(|v| v.lazy).collect();
        assert_eq!(flags, vec![false, true, false, true]);
    }

    #[test]
    fn fetch_checks_each_segment_and_fills_gaps_with_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = PagesWriter::create(dir.path()).unwrap();
        let a = vec![1u8; 0x2000];
        let b = vec![2u8; 0x1000];
        let sa = w
            .segment(0x10000, &a, *blake3::hash(&a).as_bytes())
            .unwrap();
        let sb = w
            .segment(0x13000, &b, *blake3::hash(&b).as_bytes())
            .unwrap();
        drop(w);
        let open = || PagesReader::open(&dir.path().join("pages.img")).unwrap();
        let p = ImagePages::new(open(), vec![sa.clone(), sb.clone()]);
        let got = p.fetch(0x11000, 0x3000).unwrap();
        assert_eq!(&got[..0x1000], &a[..0x1000]);
        assert!(got[0x1000..0x2000].iter().all(|&x| x == 0));
        assert_eq!(&got[0x2000..], &b[..]);
        assert_eq!(p.bytes(), 0x3000);
        // One flipped byte in the second segment: named, nothing returned.
        let path = dir.path().join("pages.img");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0x2000 + 7] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let p = ImagePages::new(open(), vec![sa, sb]);
        assert!(p.fetch(0x10000, 0x1000).is_ok());
        let e = p.fetch(0x12000, 0x2000).unwrap_err();
        assert!(
            e.contains("checksum mismatch in the segment at 0x13000 (+0x1000)"),
            "{e}"
        );
    }
}
