//! A whole checkpoint: check, freeze, capture, then end the original or
//! let it run on. Refusals happen before anything is frozen; a failed
//! capture thaws the process untouched.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::capture::{self, CaptureOptions, CaptureStats};

/// Deleted files up to this size travel in the image (see
/// [`CaptureOptions::ghost_limit`]).
pub const GHOST_LIMIT: u64 = 64 << 20;
use crate::error::{CaptureError, FreezeError, MigError};
use crate::freeze;
use crate::image::park::{self, LockPark};
use crate::predump::{PreDump, PrecopyOptions, PrecopyReport};
use crate::sys::procfs;

/// Keeps the locks a checkpointed process holds on migfs files held after
/// it ends, until a restore claims them: the node's agent parks them
/// (`agent::parked`) and, if the checkpoint fails afterwards, gives them
/// back to the process.
pub trait LockParking: Send + Sync {
    /// Parks the locks of `pid` (as its node numbers it).
    fn park(&self, pid: i32) -> Result<Parked, String>;
    /// Gives `parked` back to the process, which keeps running.
    fn unpark(&self, parked: Parked) -> Result<(), String>;
}

/// Locks a [`LockParking`] parked.
#[derive(Clone, Debug)]
pub struct Parked {
    /// Where, as written into the image.
    pub park: LockPark,
    /// The locks as they were (for [`LockParking::unpark`]).
    pub held: Vec<migfs_proto::meta::HeldLock>,
}

/// Knobs of [`checkpoint`].
#[derive(Clone)]
pub struct CheckpointOptions {
    /// Thaw the process afterwards instead of ending it.
    pub leave_running: bool,
    /// Park the process's locks on migfs before ending it (none: they go
    /// with it, and the restore takes them again afresh).
    pub park: Option<Arc<dyn LockParking>>,
    /// Give up when a thread does not stop within this time.
    pub freeze_timeout: Duration,
    /// Capture knobs.
    pub capture: CaptureOptions,
    /// Copy the memory into the image while the process runs first
    /// (`--precopy`, [`crate::predump`]).
    pub precopy: Option<PrecopyOptions>,
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        CheckpointOptions {
            leave_running: false,
            park: None,
            freeze_timeout: Duration::from_secs(10),
            capture: CaptureOptions {
                ghost_limit: GHOST_LIMIT,
                ..CaptureOptions::default()
            },
            precopy: None,
        }
    }
}

/// What a checkpoint did and how long each part took.
#[derive(Clone, Copy, Debug, Default)]
pub struct CheckpointReport {
    /// Threads frozen.
    pub threads: usize,
    /// Time to stop every thread.
    pub freeze: Duration,
    /// Capture (incl. writing the image).
    pub capture: CaptureStats,
    /// From the start of the freeze until the process was ended or thawed.
    pub frozen_for: Duration,
    /// From the start of the freeze until the image was complete.
    pub frozen_to_image: Duration,
    /// The pre-copy, with `--precopy`.
    pub precopy: Option<PrecopyReport>,
}

/// Checkpoints `pid` into `dir`.
#[tracing::instrument(skip_all, fields(pid = pid.as_raw(), dir = %dir.display()))]
pub fn checkpoint(
    pid: Pid,
    dir: &Path,
    opts: &CheckpointOptions,
) -> Result<CheckpointReport, MigError> {
    let blockers = crate::check::check(pid)?;
    if !blockers.is_empty() {
        return Err(FreezeError::Refused {
            pid: pid.as_raw(),
            blockers,
        }
        .into());
    }
    let mut files = capture::files::FileCtx::new(pid, opts.capture.hash_limit)?;
    files.prehash_mappings()?;
    // While it runs: a failure here leaves it running, untracked.
    let mut pre = match &opts.precopy {
        Some(p) => Some(PreDump::run(pid, dir, p)?),
        None => None,
    };
    let t0 = Instant::now();
    let frozen = freeze::freeze(pid, opts.freeze_timeout)?;
    let freeze = t0.elapsed();
    let threads = frozen.threads().len();
    let captured = pre
        .as_mut()
        .map(PreDump::finish)
        .transpose()
        .and_then(|premade| {
            capture::capture_with(&frozen, dir, &opts.capture, Some(files), premade)
        });
    let capture = match captured {
        Ok(c) => c,
        Err(e) => {
            thaw(frozen);
            return Err(e);
        }
    };
    let frozen_to_image = t0.elapsed();
    let precopy = pre.as_ref().map(PreDump::report);
    if opts.leave_running {
        thaw(frozen);
    } else {
        if let Some(parking) = opts.park.as_deref().filter(|_| capture.migfs_locks > 0)
            && let Err(e) = park_locks(parking, pid, dir)
        {
            thaw(frozen);
            if let Some(p) = pre {
                p.stop();
            }
            return Err(e);
        }
        frozen.kill()?;
    }
    let frozen_for = t0.elapsed();
    // Ending tracking walks every page table; the process does not wait
    // for it (or is gone).
    if let Some(p) = pre {
        p.stop();
    }
    Ok(CheckpointReport {
        threads,
        freeze,
        capture,
        frozen_for,
        frozen_to_image,
        precopy,
    })
}

/// Parks the frozen process's locks and names them in the image; on a
/// failure they are given back (the caller thaws the process).
fn park_locks(parking: &dyn LockParking, pid: Pid, dir: &Path) -> Result<(), MigError> {
    let p = pid.as_raw();
    let failed = |why: String| CaptureError::ParkLocks { pid: p, why };
    let parked = parking.park(p).map_err(failed)?;
    tracing::debug!(locks = parked.park.locks, "locks parked");
    if let Err(e) = park::write(dir, &parked.park) {
        let back = parking.unpark(parked).err();
        let why = match back {
            Some(b) => format!("{e}; and giving them back failed: {b}"),
            None => e.to_string(),
        };
        return Err(failed(why).into());
    }
    Ok(())
}

/// Lets `frozen` run on, queueing again the signals it was taking.
pub fn thaw(frozen: freeze::Frozen) {
    let pid = frozen.pid();
    let remote = procfs::maps(pid)
        .ok()
        .and_then(|m| capture::remote::Remote::new(pid, &m).ok());
    frozen.thaw_with(|tid, info| {
        let Some(r) = &remote else { return };
        let signo = u64::from(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]));
        let (tgid, t) = (
            u64::try_from(pid.as_raw()).unwrap_or(0),
            u64::try_from(tid.as_raw()).unwrap_or(0),
        );
        let res = r.call(
            tid,
            libc::SYS_rt_tgsigqueueinfo,
            |s| [tgid, t, signo, s, 0, 0],
            info,
            0,
        );
        if !matches!(res, Ok((Ok(_), _))) {
            tracing::warn!(
                tid = tid.as_raw(),
                signo,
                "could not queue a held signal again"
            );
        }
    });
}
