//! Process migration for migfs: freeze an unmodified Linux process,
//! capture its state into a versioned image, and rebuild it from that
//! image on this node or another one (docs/checkpoint-restore.md).
//!
//! # Layout
//! - [`agent`]: the migration agent every node runs (moves, page server, tasks).
//! - [`check`]: can this process be moved, and if not, what stops it.
//! - [`freeze`]: PTRACE_SEIZE + PTRACE_INTERRUPT of every thread; thaw.
//! - [`capture`]: registers, memory, files, signals → image.
//! - [`checkpoint`]: check + freeze + capture + end (or thaw) in one call.
//! - [`predump`]: pre-copy of a running process's memory into an image
//!   (`migfs checkpoint --precopy`).
//! - [`image`]: the image format (prost messages, blake3 per segment).
//! - [`policy`]: what to move where (the balancer's policies); pure code
//!   that the mechanism never imports.
//! - [`pages`]: lazy memory: the page reader of a frozen original and the
//!   userfaultfd handler of its restored copy.
//! - [`restore`]: rebuild a process by driving a stub with ptrace.
//! - [`sys`]: the only place with `unsafe`: ptrace, clone3, memory, /proc.
//! - [`error`]: [`MigError`] and its parts.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use nix::unistd::Pid;
//! let pid = Pid::from_raw(1234);
//! assert!(migfs_mig::check::check(pid)?.is_empty());
//! let frozen = migfs_mig::freeze::freeze(pid, Duration::from_secs(10))?;
//! migfs_mig::capture::capture(&frozen, "/migfs/img".as_ref(), &Default::default(), None)?;
//! frozen.kill()?;
//! let back = migfs_mig::restore::restore("/migfs/img".as_ref(), &Default::default())?;
//! println!("running again as {}", back.pid);
//! # Ok::<(), migfs_mig::MigError>(())
//! ```
#![warn(missing_docs)]

#[cfg(feature = "agent")]
pub mod agent;
pub mod capture;
pub mod check;
pub mod checkpoint;
pub mod error;
pub mod freeze;
pub mod image;
pub mod pages;
pub mod policy;
pub mod predump;
pub mod restore;
pub mod sys;

pub use error::MigError;
