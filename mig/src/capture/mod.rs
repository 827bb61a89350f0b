//! Capture (DESIGN "Migration" step 4): everything a restore needs, read
//! from a [`Frozen`] process into an image directory.
//!
//! - [`regs`]: per-thread registers, xsave, masks, rseq, robust list, ...
//! - [`mm`]: mappings, mm fields, vDSO, page contents.
//! - [`files`]: descriptors, locks, cwd, exe.
//! - [`signals`]: handlers and the shared pending queue.
//! - [`process`]: umask, rlimits, credentials, personality.
//! - [`remote`]: running single calls inside the frozen process.

pub mod files;
pub mod flags;
mod ghost;
pub mod mm;
pub mod process;
pub mod regs;
pub mod remote;
pub mod signals;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use migfs_proto::image::{Cpu, Image};

use crate::error::{FreezeError, MigError};
use crate::freeze::Frozen;
use crate::image::format::FORMAT_VERSION;
use crate::image::persist::{self, PagesWriter};
use crate::sys::{procfs, xsave};

/// Knobs of a capture.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// Files up to this size get a content hash a restore checks.
    pub hash_limit: u64,
    /// Leave private anonymous memory out of the image (marked `lazy`):
    /// a migration sends it from the frozen original afterwards.
    pub lazy_anon: bool,
    /// Inode numbers of pipes a migration agent feeds (a task's stdin
    /// relay): their read ends are recorded as relay pipes, not refused.
    pub relay_pipes: Vec<u64>,
    /// Copy deleted files up to this size into the image (ghosts); 0:
    /// none (a migration: the target reopens them by inode while the
    /// frozen original still holds them).
    pub ghost_limit: u64,
    /// VmFlags read before the freeze ([`flags::FlagsSnapshot`]): used if
    /// the mappings did not change, which spares the downtime a walk of
    /// every page table. The caller must then verify them
    /// ([`CaptureStats::flags_reused`]).
    pub flags_before: Option<std::sync::Arc<flags::FlagsSnapshot>>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            hash_limit: 64 << 20,
            lazy_anon: false,
            relay_pipes: Vec::new(),
            ghost_limit: 0,
            flags_before: None,
        }
    }
}

/// What a capture wrote and how long it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    /// Bytes of `image.pb`.
    pub image_bytes: u64,
    /// Bytes of `pages.img`.
    pub pages_bytes: u64,
    /// Time spent copying pages.
    pub copy: Duration,
    /// Whole capture.
    pub total: Duration,
    /// Locks the process holds on migfs files (kept in the metadata
    /// server: they go when the process ends unless parked).
    pub migfs_locks: usize,
    /// The VmFlags came from [`CaptureOptions::flags_before`].
    pub flags_reused: bool,
}

/// Writes the image of `frozen` to `dir`. `files` may carry hashes taken
/// before the freeze ([`files::FileCtx::prehash_mappings`]).
pub fn capture(
    frozen: &Frozen,
    dir: &Path,
    opts: &CaptureOptions,
    files: Option<files::FileCtx>,
) -> Result<CaptureStats, MigError> {
    capture_with(frozen, dir, opts, files, None)
}

/// [`capture`] into the page file of a pre-copy: the memory it covers is
/// not copied again, its segments join the image's.
#[tracing::instrument(skip_all, fields(pid = frozen.pid().as_raw(), dir = %dir.display()))]
pub fn capture_with(
    frozen: &Frozen,
    dir: &Path,
    opts: &CaptureOptions,
    files: Option<files::FileCtx>,
    premade: Option<crate::predump::Premade>,
) -> Result<CaptureStats, MigError> {
    let t0 = Instant::now();
    let pid = frozen.pid();
    let p = pid.as_raw();
    let smaps_err = |source| crate::error::CaptureError::Io {
        pid: p,
        what: "smaps".into(),
        source,
    };
    let (flags, flags_reused) = match &opts.flags_before {
        Some(before) => before.for_frozen(pid).map_err(smaps_err)?,
        None => (procfs::vm_flags(pid).map_err(smaps_err)?, false),
    };
    let blockers = crate::check::check_with(pid, &opts.relay_pipes, Some(&flags))?;
    if !blockers.is_empty() {
        return Err(FreezeError::Refused { pid: p, blockers }.into());
    }
    let t_check = t0.elapsed();
    let io = |what: &'static str| {
        move |source| crate::error::CaptureError::Io {
            pid: p,
            what: what.into(),
            source,
        }
    };
    let maps = procfs::maps(pid).map_err(io("maps"))?;
    let remote = remote::Remote::new(pid, &maps)?;
    let mut ctx = match files {
        Some(c) => c,
        None => files::FileCtx::new(pid, opts.hash_limit)?,
    };
    let threads = frozen
        .threads()
        .iter()
        .map(|t| regs::capture_thread(pid, t, &remote))
        .collect::<Result<Vec<_>, _>>()?;
    let sigactions = signals::sigactions(pid, &remote)?;
    let itimers = signals::itimers(pid, &remote)?;
    let shared_pending = signals::shared_pending(pid)?;
    let t_regs = t0.elapsed();
    let (fds, locks) = files::fds(&mut ctx, &opts.relay_pipes)?;
    let t_fds = t0.elapsed();
    let (cwd, exe) = files::cwd_and_exe(&mut ctx)?;
    let process = process::process(pid, cwd, exe)?;
    let (mut pages, covered, premade) = match premade {
        Some(p) => (p.writer, p.covered, p.segments),
        None => (PagesWriter::create(dir)?, Vec::new(), Vec::new()),
    };
    let (mm, mem) = mm::capture_mm(
        pid,
        &maps,
        &mut ctx,
        &remote,
        &mut pages,
        mm::MemOptions {
            lazy_anon: opts.lazy_anon,
            flags: &flags,
            covered,
            premade,
        },
    )?;
    let t_mm = t0.elapsed();
    let mut fds = fds;
    ghost::copy_deleted(pid, dir, opts.ghost_limit, &mut fds)?;
    let xsave0 = &threads[0].xsave;
    let cpu = Cpu {
        xfeatures: xsave::xfeatures(xsave0).unwrap_or(0),
        xsave_size: u32::try_from(xsave0.len()).unwrap_or(u32::MAX),
    };
    let frozen_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let img = Image {
        format_version: FORMAT_VERSION,
        arch: std::env::consts::ARCH.into(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        frozen_at_unix_ms: u64::try_from(frozen_at.as_millis()).unwrap_or(u64::MAX),
        process: Some(process),
        threads,
        mm: Some(mm),
        fds,
        sigactions,
        locks,
        shared_pending,
        cpu: Some(cpu),
        pages_size: pages.size(),
        itimers,
    };
    drop(pages);
    let image_bytes = persist::write_image(dir, &img)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::debug!(
        check_ms = ms(t_check),
        regs_ms = ms(t_regs - t_check),
        fds_ms = ms(t_fds - t_regs),
        mm_ms = ms(t_mm - t_fds),
        write_ms = ms(t0.elapsed() - t_mm),
        "captured"
    );
    let on_migfs = |fd: i32| {
        img.fds
            .iter()
            .find(|f| f.fd == fd)
            .and_then(|f| f.file.as_ref())
            .is_some_and(|f| f.migfs.is_some())
    };
    Ok(CaptureStats {
        image_bytes,
        pages_bytes: img.pages_size,
        copy: mem.copy,
        total: t0.elapsed(),
        migfs_locks: img.locks.iter().filter(|l| on_migfs(l.fd)).count(),
        flags_reused,
    })
}
