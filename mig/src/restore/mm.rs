//! The address space on the restoring side: the vDSO block at its old
//! address, every mapping at its old address (temporarily writable where
//! pages must be written), the page contents (each segment checked
//! against its blake3 before it is written), the final protections and
//! advice, and the mm fields.

use migfs_proto::image::{Image, MemoryMap, Vma, VmaKind};

use super::files::{Resolved, cause};
use super::inject::{Call, Target};
use crate::error::{RestoreCause, RestoreError, Step};
use crate::image::persist::PagesReader;
use crate::sys::abi::PrctlMmMap;

fn mm(img: &Image) -> &MemoryMap {
    static EMPTY: MemoryMap = MemoryMap {
        page_size: 0,
        vmas: Vec::new(),
        segments: Vec::new(),
        start_code: 0,
        end_code: 0,
        start_data: 0,
        end_data: 0,
        start_brk: 0,
        brk: 0,
        start_stack: 0,
        arg_start: 0,
        arg_end: 0,
        env_start: 0,
        env_end: 0,
        auxv: Vec::new(),
        vdso_blake3: Vec::new(),
    };
    img.mm.as_ref().unwrap_or(&EMPTY)
}

fn is(v: &Vma, k: VmaKind) -> bool {
    v.kind == k as i32
}

/// Maps a fresh vDSO block where the old one was and checks it has the
/// old shape ("place vdso" step).
pub fn place_vdso<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    let parts: Vec<&Vma> = mm(img)
        .vmas
        .iter()
        .filter(|v| is(v, VmaKind::VmaVdsoBlock))
        .collect();
    let Some(first) = parts.first() else {
        return Ok(());
    };
    let start = first.start;
    let e = |what: String| RestoreError::new(Step::PlaceVdso, RestoreCause::Refused(what));
    t.call(0, &Call::MapVdso { addr: start }).map_err(|err| {
        RestoreError::new(
            Step::PlaceVdso,
            cause(format!("arch_prctl(ARCH_MAP_VDSO_64, {start:#x})"), err),
        )
    })?;
    let got = t
        .vdso_block()
        .map_err(|err| RestoreError::new(Step::PlaceVdso, cause("read maps".into(), err)))?;
    let want: Vec<(String, u64, u64)> = parts
        .iter()
        .map(|v| (v.name.clone(), v.start - start, v.end - start))
        .collect();
    match got {
        Some(b) if b.start == start && b.parts == want => Ok(()),
        Some(b) => Err(e(format!(
            "the vDSO block landed at {:#x} as {:?}, wanted {start:#x} as {want:?}",
            b.start, b.parts
        ))),
        None => Err(e("no vDSO after ARCH_MAP_VDSO_64".into())),
    }
}

/// Which mappings receive pages (index into `vmas`).
fn receiving(m: &MemoryMap) -> Vec<bool> {
    let mut out = vec![false; m.vmas.len()];
    let mut i = 0;
    for s in &m.segments {
        while i < m.vmas.len() && m.vmas[i].end <= s.vaddr {
            i += 1;
        }
        if let Some(flag) = out.get_mut(i) {
            *flag = true;
        }
    }
    out
}

/// Maps every mapping at its address ("map memory" step).
pub fn map_memory<T: Target>(t: &mut T, img: &Image, r: &Resolved) -> Result<(), RestoreError> {
    let m = mm(img);
    let recv = receiving(m);
    let mut open: Vec<(String, bool, i32)> = Vec::new();
    let res = map_all(t, m, &recv, r, &mut open);
    for (_, _, fd) in open {
        let _ = t.call(0, &Call::Close { fd });
    }
    res
}

fn map_all<T: Target>(
    t: &mut T,
    m: &MemoryMap,
    recv: &[bool],
    r: &Resolved,
    open: &mut Vec<(String, bool, i32)>,
) -> Result<(), RestoreError> {
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for (v, &gets_pages) in m.vmas.iter().zip(recv) {
        if is(v, VmaKind::VmaVdsoBlock) {
            continue;
        }
        let what = format!("map {:x}-{:x} {}", v.start, v.end, v.name);
        let err = |e| RestoreError::new(Step::MapMemory, cause(what.clone(), e));
        let prot = if gets_pages { v.prot | rw } else { v.prot };
        let gd = v.vm_flags.iter().any(|f| f == "gd");
        let (flags, fd) = match VmaKind::try_from(v.kind) {
            Ok(VmaKind::VmaFile) => {
                let file = v.file.as_ref().ok_or_else(|| {
                    RestoreError::new(
                        Step::MapMemory,
                        RestoreCause::Refused(format!("{what}: no file")),
                    )
                })?;
                let path = r.path(file).to_owned();
                let write = v.shared
                    && (v.prot & libc::PROT_WRITE as u32 != 0
                        || v.vm_flags.iter().any(|f| f == "mw"));
                let fd = match open.iter().find(|(p, w, _)| *p == path && *w == write) {
                    Some(&(_, _, fd)) => fd,
                    None => {
                        let flags =
                            if write { libc::O_RDWR } else { libc::O_RDONLY }.cast_unsigned();
                        let fd = t.call(0, &Call::Open { path: &path, flags }).map_err(err)?;
                        let fd = i32::try_from(fd).unwrap_or(-1);
                        open.push((path, write, fd));
                        fd
                    }
                };
                let share = if v.shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                (share | libc::MAP_FIXED, fd)
            }
            Ok(VmaKind::VmaSharedAnon) => {
                (libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1)
            }
            _ => {
                let grows = if gd { libc::MAP_GROWSDOWN } else { 0 };
                (
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | grows,
                    -1,
                )
            }
        };
        let offset = if fd >= 0 { v.file_offset } else { 0 };
        let call = Call::Mmap {
            addr: v.start,
            len: v.end - v.start,
            prot,
            flags: flags.cast_unsigned(),
            fd,
            offset,
        };
        let got = t.call(0, &call).map_err(err)?;
        if got != v.start {
            return Err(RestoreError::new(
                Step::MapMemory,
                RestoreCause::Refused(format!("{what}: landed at {got:#x}")),
            ));
        }
    }
    Ok(())
}

/// Writes every segment, each checked against its blake3 first ("write
/// memory" step); returns the bytes written.
pub fn write_memory<T: Target>(
    t: &mut T,
    img: &Image,
    pages: &PagesReader,
) -> Result<u64, RestoreError> {
    let mut buf = Vec::new();
    let mut bytes = 0;
    for s in &mm(img).segments {
        pages
            .read(s, &mut buf)
            .map_err(|e| RestoreError::new(Step::WriteMemory, RestoreCause::Image(e)))?;
        t.write_memory(s.vaddr, &buf).map_err(|e| {
            RestoreError::new(
                Step::WriteMemory,
                cause(format!("write {:#x} (+{:#x})", s.vaddr, s.len), e),
            )
        })?;
        bytes += s.len;
    }
    Ok(bytes)
}

/// Final protections, advice and locks of the mappings (end of the "write
/// memory" step).
pub fn seal_memory<T: Target>(t: &mut T, img: &Image) -> Result<(), RestoreError> {
    let m = mm(img);
    let advice = [
        ("dc", libc::MADV_DONTFORK),
        ("wf", libc::MADV_WIPEONFORK),
        ("hg", libc::MADV_HUGEPAGE),
        ("nh", libc::MADV_NOHUGEPAGE),
        ("dd", libc::MADV_DONTDUMP),
    ];
    for (v, gets_pages) in m.vmas.iter().zip(receiving(m)) {
        if is(v, VmaKind::VmaVdsoBlock) {
            continue;
        }
        let (addr, len) = (v.start, v.end - v.start);
        let err = |what: String| move |e| RestoreError::new(Step::WriteMemory, cause(what, e));
        if gets_pages && v.prot != (libc::PROT_READ | libc::PROT_WRITE) as u32 {
            t.call(
                0,
                &Call::Mprotect {
                    addr,
                    len,
                    prot: v.prot,
                },
            )
            .map_err(err(format!("mprotect {addr:x}-{:x}", v.end)))?;
        }
        for (flag, adv) in advice {
            if v.vm_flags.iter().any(|f| f == flag) {
                t.call(
                    0,
                    &Call::Madvise {
                        addr,
                        len,
                        advice: adv,
                    },
                )
                .map_err(err(format!("madvise({adv}) {addr:x}")))?;
            }
        }
        if v.vm_flags.iter().any(|f| f == "lo") {
            t.call(0, &Call::Mlock { addr, len })
                .map_err(err(format!("mlock {addr:x}")))?;
        }
    }
    Ok(())
}

/// brk, code/data/stack bounds, argv/env, auxv and /proc/PID/exe ("mm
/// fields" step).
pub fn mm_fields<T: Target>(t: &mut T, img: &Image, r: &Resolved) -> Result<(), RestoreError> {
    let m = mm(img);
    let err =
        |what: &'static str| move |e| RestoreError::new(Step::MmFields, cause(what.into(), e));
    let exe = img
        .process
        .as_ref()
        .and_then(|p| p.exe.as_ref())
        .filter(|_| !r.exe_is_ours);
    let exe_fd = match exe {
        Some(f) => {
            let fd = t
                .call(
                    0,
                    &Call::Open {
                        path: r.path(f),
                        flags: libc::O_RDONLY as u32,
                    },
                )
                .map_err(err("open the executable"))?;
            u32::try_from(fd).unwrap_or(u32::MAX)
        }
        None => u32::MAX,
    };
    let map = PrctlMmMap {
        start_code: m.start_code,
        end_code: m.end_code,
        start_data: m.start_data,
        end_data: m.end_data,
        start_brk: m.start_brk,
        brk: m.brk,
        start_stack: m.start_stack,
        arg_start: m.arg_start,
        arg_end: m.arg_end,
        env_start: m.env_start,
        env_end: m.env_end,
        auxv: 0,
        auxv_size: 0,
        exe_fd,
    };
    let res = t
        .call(0, &Call::SetMmMap { map, auxv: &m.auxv })
        .map_err(err("prctl(PR_SET_MM_MAP)"));
    if exe_fd != u32::MAX {
        t.call(
            0,
            &Call::Close {
                fd: i32::try_from(exe_fd).unwrap_or(-1),
            },
        )
        .map_err(err("close the executable"))?;
    }
    res.map(drop)
}
