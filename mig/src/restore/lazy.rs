//! `migfs restore --from DIR --lazy` (docs/checkpoint-restore.md "Lazy
//! restore"): the image's private anonymous memory (heap, stack,
//! anonymous mappings) is mapped empty and registered with a userfaultfd
//! made in the stub, the rest is restored as usual, and the process runs
//! at once. A page it touches comes from `pages.img`
//! ([`ImagePages`](crate::pages::image::ImagePages), each segment checked
//! against its blake3 first); [`LazyRestore::fill`] installs the rest.
//!
//! What a lazy restore guarantees when `pages.img` is bad: a segment of
//! the eager memory, or a lazy one touched while the process is rebuilt,
//! fails the restore before the process runs (no process is left); a lazy
//! segment found bad after the process resumed kills it, and the error
//! names the segment. A plain restore checks every segment before the
//! process runs: the lazy one trades that for less downtime.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::error::{MigError, PagesError, RestoreCause, RestoreError, Step};
use crate::image::persist;
use crate::pages::image::{FillStats, ImagePages, split_lazy};
use crate::pages::{LazyConfig, LazyStats};

use super::{Extras, RestoreOptions, Restored, refused};

/// A restored process whose private anonymous memory is still coming in.
#[derive(Debug)]
pub struct LazyRestore {
    /// The process, running (`lazy` holds its fault handler).
    pub restored: Restored,
    pages: Arc<ImagePages>,
}

/// A lazy restore whose memory is all in.
#[derive(Debug)]
pub struct LazyDone {
    /// The process (`lazy` is `None`: the userfaultfd is closed).
    pub restored: Restored,
    /// The background fill.
    pub fill: FillStats,
    /// The fault handler's counters.
    pub faults: LazyStats,
}

/// Restores the image in `dir` with its private anonymous memory lazy
/// (`extras` may add what a plain restore takes, not `lazy`); returns
/// once the process runs. Refuses (before any process exists)
/// an image with no such memory, and an image whose lazy memory is not in
/// it (a migration's).
#[tracing::instrument(skip_all, fields(dir = %dir.display()))]
pub fn restore_lazy(
    dir: &Path,
    opts: &RestoreOptions,
    extras: Extras,
) -> Result<LazyRestore, RestoreError> {
    let t0 = Instant::now();
    let image_err = |e| RestoreError::new(Step::ReadImage, RestoreCause::Image(e));
    let persist::ImageDir { mut image, pages } = persist::read_image(dir).map_err(image_err)?;
    let elsewhere = crate::pages::lazy_ranges(&image);
    if !elsewhere.is_empty() {
        return Err(refused(
            Step::ReadImage,
            format!(
                "--lazy: the image leaves {} KiB of memory to a page source (a migration's image); \
                 {} does not hold it",
                crate::pages::ranges::total(&elsewhere) >> 10,
                dir.display()
            ),
        ));
    }
    let segs = split_lazy(&mut image);
    if segs.is_empty() {
        return Err(refused(
            Step::ReadImage,
            "--lazy: the image has no private anonymous memory (heap, stack, anonymous \
             mappings) to restore lazily; restore it without --lazy"
                .into(),
        ));
    }
    let src = Arc::new(ImagePages::new(pages.try_clone().map_err(image_err)?, segs));
    tracing::debug!(lazy_kib = src.bytes() >> 10, first = ?src.first(), "lazy restore");
    let extras = Extras {
        lazy: Some(LazyConfig {
            fetch: Arc::clone(&src) as Arc<dyn crate::pages::PageFetch>,
            warm: None,
            pull_socket: None,
        }),
        ..extras
    };
    let restored = super::restore_image(dir, opts, extras, t0, &image, &pages)?;
    Ok(LazyRestore {
        restored,
        pages: src,
    })
}

impl LazyRestore {
    /// The PID of the running process.
    pub fn pid(&self) -> i32 {
        self.restored.pid
    }

    /// Installs every page still missing (`threads` threads besides the
    /// fault handler), then closes the userfaultfd: the process owes
    /// nothing to the image any more. On a bad segment the process has
    /// been killed and the error names the segment.
    pub fn fill(mut self, threads: usize) -> Result<LazyDone, MigError> {
        let pid = self.restored.pid;
        let Some(lazy) = self.restored.lazy.take() else {
            return Err(PagesError::Refused {
                pid,
                what: "no lazy memory to fill".into(),
            }
            .into());
        };
        let fill = self.pages.fill(&lazy, pid, threads);
        let faults = lazy.finish();
        let fill = fill?;
        if let Some(why) = faults.error.clone() {
            return Err(PagesError::Failed { pid, why }.into());
        }
        Ok(LazyDone {
            restored: self.restored,
            fill,
            faults,
        })
    }
}
