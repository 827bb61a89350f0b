//! The address space: every mapping (with the file it maps and the
//! VmFlags a restore re-applies), the mm fields (brk, stack, argv/env,
//! auxv), the vDSO block, and the contents of the pages that are not in a
//! file: present or swapped anonymous pages, and private copies of
//! file pages. Pages never touched are not written (they read as zeros or
//! as the file again after restore).

use std::time::Instant;

use migfs_proto::image::{MemSegment, MemoryMap, Vma, VmaKind};
use nix::unistd::Pid;

use super::files::FileCtx;
use super::remote::Remote;
use crate::check;
use crate::error::{CaptureError, MigError};
use crate::image::format::MAX_SEGMENT;
use crate::image::persist::PagesWriter;
use crate::pages::ranges::{normalize, subtract};
use crate::sys::mem::{self, ProcMem};
use crate::sys::procfs::{self, MapEntry, Pagemap};
use crate::sys::vdso;

/// VmFlags a restore re-applies.
const KEPT_FLAGS: [&str; 8] = ["gd", "dc", "wf", "hg", "nh", "dd", "lo", "mw"];

/// Counters for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemStats {
    /// Bytes of page contents written.
    pub bytes: u64,
    /// Time spent copying them.
    pub copy: std::time::Duration,
}

/// How [`capture_mm`] treats memory.
#[derive(Debug)]
pub struct MemOptions<'a> {
    /// Leave private anonymous memory out (marked `lazy`).
    pub lazy_anon: bool,
    /// VmFlags of each mapping (smaps), by start address.
    pub flags: &'a crate::check::VmFlags,
    /// Memory a pre-copy already wrote to `pages` (not copied again).
    pub covered: Vec<(u64, u64)>,
    /// The segments of `covered`.
    pub premade: Vec<MemSegment>,
}

/// Captures the address space of frozen `pid` and writes its pages.
pub fn capture_mm(
    pid: Pid,
    maps: &[MapEntry],
    ctx: &mut FileCtx,
    remote: &Remote,
    pages: &mut PagesWriter,
    o: MemOptions<'_>,
) -> Result<(MemoryMap, MemStats), MigError> {
    let (lazy_anon, flags) = (o.lazy_anon, o.flags);
    let p = pid.as_raw();
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| CaptureError::Io {
            pid: p,
            what,
            source,
        }
    };
    let mut vmas = Vec::new();
    for m in maps.iter().filter(|m| m.path != "[vsyscall]") {
        let mut v = vma(pid, m, ctx)?;
        v.vm_flags = flags
            .get(&m.start)
            .into_iter()
            .flatten()
            .filter(|f| KEPT_FLAGS.contains(&f.as_str()))
            .cloned()
            .collect();
        v.lazy = lazy_anon && crate::pages::is_lazy_kind(v.kind, v.shared, v.prot);
        if v.kind == VmaKind::VmaFile as i32
            && v.shared
            && m.prot & libc::PROT_WRITE as u32 != 0
            && v.file.as_ref().is_some_and(|f| f.migfs.is_some())
        {
            let (ret, _) = remote.call(
                pid,
                libc::SYS_msync,
                |_| [m.start, m.end - m.start, libc::MS_SYNC as u64, 0, 0, 0],
                &[],
                0,
            )?;
            ret.map_err(|errno| CaptureError::Sys {
                pid: p,
                what: format!("msync {:x}-{:x}", m.start, m.end),
                errno,
            })?;
        }
        vmas.push(v);
    }
    let mut mm = mm_fields(pid, maps)?;
    if let Some(block) = vdso::find(maps) {
        mm.vdso_blake3 = vdso::text_hash(pid, &block)
            .map_err(io("read the vDSO"))?
            .to_vec();
    }
    let t = Instant::now();
    let mut segments = o.premade;
    segments.extend(dump_pages(pid, &vmas, pages, &normalize(o.covered))?);
    segments.sort_unstable_by_key(|s| s.vaddr);
    mm.segments = segments;
    let stats = MemStats {
        bytes: mm.segments.iter().map(|s| s.len).sum(),
        copy: t.elapsed(),
    };
    mm.vmas = vmas;
    Ok((mm, stats))
}

/// What a mapping is, from its line in /proc/PID/maps.
pub fn vma_kind(m: &MapEntry) -> VmaKind {
    let (path, deleted) = m.file_path();
    if vdso::is_vdso_part(m) {
        VmaKind::VmaVdsoBlock
    } else if m.path == "[heap]" {
        VmaKind::VmaHeap
    } else if m.path == "[stack]" {
        VmaKind::VmaStack
    } else if m.inode == 0 || path.starts_with('[') {
        if m.shared {
            VmaKind::VmaSharedAnon
        } else {
            VmaKind::VmaAnon
        }
    } else if path == "/dev/zero" {
        if m.shared && deleted {
            VmaKind::VmaSharedAnon
        } else {
            VmaKind::VmaAnon
        }
    } else {
        VmaKind::VmaFile
    }
}

fn vma(pid: Pid, m: &MapEntry, ctx: &mut FileCtx) -> Result<Vma, CaptureError> {
    let p = pid.as_raw();
    let range = format!("{:x}-{:x}", m.start, m.end);
    let kind = vma_kind(m);
    let blocker = check::mapping_blocker(m, &[]).filter(|_| kind == VmaKind::VmaFile);
    if let Some(why) =
        blocker.filter(|_| ctx.migfs_by_dev(libc::makedev(m.major, m.minor)).is_none())
    {
        return Err(CaptureError::Unsupported {
            pid: p,
            what: format!("mapping {range}: {why}"),
        });
    }
    let file = match kind {
        VmaKind::VmaFile => {
            Some(ctx.file_ref(&format!("/proc/{pid}/map_files/{range}"), &m.path, true)?)
        }
        _ => None,
    };
    Ok(Vma {
        start: m.start,
        end: m.end,
        prot: m.prot,
        shared: m.shared,
        kind: kind as i32,
        file,
        file_offset: m.offset,
        name: m.path.clone(),
        vm_flags: Vec::new(),
        lazy: false,
    })
}

/// brk, code/data bounds, stack, argv/env bounds from /proc/PID/stat,
/// and the auxv.
fn mm_fields(pid: Pid, maps: &[MapEntry]) -> Result<MemoryMap, CaptureError> {
    let p = pid.as_raw();
    let io = |what: &'static str| {
        move |source| CaptureError::Io {
            pid: p,
            what: what.into(),
            source,
        }
    };
    let f = procfs::stat_fields(pid).map_err(io("stat"))?;
    let n = |i| procfs::stat_field(&f, i).map_err(io("stat"));
    let start_brk = n(47)?;
    let brk = maps
        .iter()
        .find(|m| m.path == "[heap]")
        .map_or(start_brk, |h| h.end);
    Ok(MemoryMap {
        page_size: crate::sys::page_size(),
        start_code: n(26)?,
        end_code: n(27)?,
        start_stack: n(28)?,
        start_data: n(45)?,
        end_data: n(46)?,
        start_brk,
        brk,
        arg_start: n(48)?,
        arg_end: n(49)?,
        env_start: n(50)?,
        env_end: n(51)?,
        auxv: std::fs::read(format!("/proc/{pid}/auxv")).map_err(io("auxv"))?,
        ..Default::default()
    })
}

/// Whether the page with pagemap entry `e` in a mapping of `kind` holds
/// data that is not in a file.
fn wanted(kind: i32, shared: bool, e: u64) -> bool {
    let present = e & procfs::PM_PRESENT != 0;
    let swapped = e & procfs::PM_SWAP != 0;
    match VmaKind::try_from(kind) {
        Ok(VmaKind::VmaFile) => !shared && ((present && e & procfs::PM_FILE == 0) || swapped),
        Ok(VmaKind::VmaVdsoBlock) | Err(_) => false,
        Ok(_) => present || swapped,
    }
}

/// Runs of wanted pages `(start, len)`, each at most [`MAX_SEGMENT`].
pub fn runs(start: u64, entries: &[u64], page: u64, want: impl Fn(u64) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for (i, &e) in entries.iter().enumerate() {
        let addr = start + i as u64 * page;
        if want(e) {
            cur = match cur {
                Some((s, l)) if l < MAX_SEGMENT => Some((s, l + page)),
                Some(run) => {
                    out.push(run);
                    Some((addr, page))
                }
                None => Some((addr, page)),
            };
        } else if let Some(run) = cur.take() {
            out.push(run);
        }
    }
    out.extend(cur);
    out
}

/// Writes the wanted pages of `vmas` outside `skip` (normalized).
fn dump_pages(
    pid: Pid,
    vmas: &[Vma],
    pages: &mut PagesWriter,
    skip: &[(u64, u64)],
) -> Result<Vec<MemSegment>, MigError> {
    let p = pid.as_raw();
    let page = crate::sys::page_size();
    let pagemap = Pagemap::open(pid).map_err(|source| CaptureError::Io {
        pid: p,
        what: "pagemap".into(),
        source,
    })?;
    let procmem = ProcMem::open(pid, false).map_err(|source| CaptureError::Io {
        pid: p,
        what: "/proc/PID/mem".into(),
        source,
    })?;
    let mut buf = Vec::new();
    let mut segs = Vec::new();
    for v in vmas {
        if matches!(VmaKind::try_from(v.kind), Ok(VmaKind::VmaVdsoBlock))
            || (v.kind == VmaKind::VmaFile as i32 && v.shared)
            || v.lazy
            || subtract(&[(v.start, v.end)], skip).is_empty()
        {
            continue;
        }
        let entries = pagemap
            .entries(v.start, v.end, page)
            .map_err(|source| CaptureError::Io {
                pid: p,
                what: format!("pagemap {:x}-{:x}", v.start, v.end),
                source,
            })?;
        let all = runs(v.start, &entries, page, |e| wanted(v.kind, v.shared, e));
        let mut wanted_runs = all.iter().map(|&(a, l)| (a, a + l)).collect::<Vec<_>>();
        if !skip.is_empty() {
            wanted_runs = subtract(&normalize(wanted_runs), skip);
            wanted_runs = crate::predump::aligned_chunks(&wanted_runs, MAX_SEGMENT);
        }
        for (addr, len) in wanted_runs.into_iter().map(|(s, e)| (s, e - s)) {
            buf.resize(usize::try_from(len).unwrap_or(0), 0);
            if v.prot & libc::PROT_READ as u32 != 0 {
                mem::read_vm(pid, addr, &mut buf).map_err(|errno| CaptureError::Sys {
                    pid: p,
                    what: format!("read memory at {addr:#x} (+{len:#x})"),
                    errno,
                })?;
            } else {
                procmem
                    .read(addr, &mut buf)
                    .map_err(|source| CaptureError::Io {
                        pid: p,
                        what: format!("read protected memory at {addr:#x} (+{len:#x})"),
                        source,
                    })?;
            }
            let hash = blake3::hash(&buf);
            segs.push(pages.segment(addr, &buf, *hash.as_bytes())?);
        }
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps_and_at_the_segment_limit() {
        let p = procfs::PM_PRESENT;
        assert_eq!(MAX_SEGMENT % 4096, 0);
        let e = [p, p, 0, p, 0, 0];
        assert_eq!(
            runs(0x1000, &e, 0x1000, |x| x & p != 0),
            vec![(0x1000, 0x2000), (0x4000, 0x1000)]
        );
        let many = vec![p; usize::try_from(MAX_SEGMENT / 4096).unwrap() + 3];
        let r = runs(0, &many, 4096, |x| x & p != 0);
        assert_eq!(r, vec![(0, MAX_SEGMENT), (MAX_SEGMENT, 3 * 4096)]);
    }

    #[test]
    fn only_private_copies_of_file_pages_are_wanted() {
        let (file, anon) = (VmaKind::VmaFile as i32, VmaKind::VmaAnon as i32);
        let cached = procfs::PM_PRESENT | procfs::PM_FILE;
        assert!(!wanted(file, false, cached));
        assert!(wanted(file, false, procfs::PM_PRESENT));
        assert!(!wanted(file, true, procfs::PM_PRESENT));
        assert!(wanted(anon, false, procfs::PM_PRESENT));
        assert!(wanted(anon, false, procfs::PM_SWAP));
        assert!(!wanted(anon, false, 0));
    }
}
