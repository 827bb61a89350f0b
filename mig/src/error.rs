//! The crate's errors: [`MigError`] and one sub-enum per operation. Every
//! message names the pid, thread, descriptor or restore step concerned.

use std::fmt;
use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

pub use crate::sys::inject::InjectError;

/// Anything this crate reports.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    /// Freezing (or refusing to freeze) the process.
    #[error(transparent)]
    Freeze(#[from] FreezeError),
    /// Reading the frozen process's state.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Writing or reading an image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Rebuilding a process from an image.
    #[error(transparent)]
    Restore(#[from] RestoreError),
    /// Lazy memory: reading the original, filling the copy, dirty tracking.
    #[error(transparent)]
    Pages(#[from] PagesError),
}

/// Why moving memory pages failed (`mig::pages`).
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    /// Reading /proc or another process's memory failed.
    #[error("pages of pid {pid}: {what}: {source}")]
    Io {
        /// The process.
        pid: i32,
        /// What was done, naming the range.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A system call (userfaultfd, PAGEMAP_SCAN, ...) failed.
    #[error("pages of pid {pid}: {what}: {errno}")]
    Sys {
        /// The process.
        pid: i32,
        /// What was done, naming the range.
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// A request outside what this process offers (not lazy memory, not
    /// page-aligned, a kernel without a needed feature).
    #[error("pages of pid {pid}: {what}")]
    Refused {
        /// The process.
        pid: i32,
        /// What and why.
        what: String,
    },
    /// The process of a lazy restore ended (exited or exec'd) before
    /// every page was in.
    #[error("pages of pid {pid}: the process is gone")]
    Gone {
        /// The process.
        pid: i32,
    },
    /// The fault handler of a lazy restore stopped on an error; the
    /// process was killed.
    #[error("lazy memory of pid {pid} failed: {why}")]
    Failed {
        /// The process.
        pid: i32,
        /// The first fatal error.
        why: String,
    },
}

/// Why a process was not frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// There is no such process (or it is a zombie).
    #[error("pid {pid}: no such process")]
    NoProcess {
        /// The pid asked for.
        pid: i32,
    },
    /// The process holds resources that cannot be moved (`--check` lists).
    #[error("pid {pid} cannot be moved: {}", .blockers.join("; "))]
    Refused {
        /// The process.
        pid: i32,
        /// One line per resource, e.g. `fd 5: pipe pipe:[1234]`.
        blockers: Vec<String>,
    },
    /// Reading /proc failed.
    #[error("cannot inspect pid {pid}: {what}: {source}")]
    Inspect {
        /// The process.
        pid: i32,
        /// What was read.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A ptrace request failed.
    #[error("thread {tid} of pid {pid}: {what}: {errno}")]
    Ptrace {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// The request.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// A thread did not stop in time (e.g. stuck in a FUSE request).
    #[error("thread {tid} of pid {pid} did not stop within {ms} ms (state {state})")]
    Timeout {
        /// The process.
        pid: i32,
        /// The thread.
        tid: i32,
        /// How long we waited.
        ms: u64,
        /// Its /proc state line.
        state: String,
    },
    /// The process ended while being frozen.
    #[error("pid {pid} ended while being frozen ({how})")]
    Gone {
        /// The process.
        pid: i32,
        /// Exit status or signal.
        how: String,
    },
}

/// Why the state of a frozen process could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Reading /proc or a file failed.
    #[error("capture of pid {pid}: {what}: {source}")]
    Io {
        /// The process.
        pid: i32,
        /// What was read.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A system call (ptrace, process_vm_readv, ...) failed.
    #[error("capture of pid {pid}: {what}: {errno}")]
    Sys {
        /// The process.
        pid: i32,
        /// What was done, naming the thread or range.
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// A call injected into the frozen thread failed.
    #[error("capture of pid {pid}: {what}: {source}")]
    Inject {
        /// The process.
        pid: i32,
        /// What was asked.
        what: String,
        /// The failure.
        source: InjectError,
    },
    /// The process's locks on migfs could not be parked before it ends;
    /// it keeps running.
    #[error(
        "checkpoint of pid {pid}: parking its locks on migfs failed: {why} (the process keeps running)"
    )]
    ParkLocks {
        /// The process.
        pid: i32,
        /// Why.
        why: String,
    },
    /// Something the image cannot describe.
    #[error("capture of pid {pid}: {what}")]
    Unsupported {
        /// The process.
        pid: i32,
        /// What it is.
        what: String,
    },
}

/// Why an image could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// I/O on the image files.
    #[error("image {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Not an image (magic bytes differ).
    #[error("image {path}: not a migfs image (bad magic)")]
    Magic {
        /// The file.
        path: PathBuf,
    },
    /// An image of another format version.
    #[error(
        "image {path}: format version {found} is not supported (this build reads version {supported})"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A part is larger than the limit.
    #[error("image {path}: {what} is {size}, more than the limit {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The file ends early.
    #[error("image {path}: truncated: {what}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A checksum does not match.
    #[error("image {path}: checksum mismatch in {what}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Which part.
        what: String,
    },
    /// prost could not decode the message.
    #[error("image {path}: cannot decode: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decode error.
        source: prost::DecodeError,
    },
    /// The message is inconsistent (overlapping segments, bad sizes, ...).
    #[error("image {path}: invalid: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The steps of a restore, in order; a failure names one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading and verifying the image.
    ReadImage,
    /// Architecture, CPU features, vDSO.
    CheckTarget,
    /// Every file the image refers to exists with the same content.
    CheckFiles,
    /// Forking the stub (with the old PID).
    CreateStub,
    /// Clearing the stub (rseq, descriptors, mappings).
    PrepareStub,
    /// Placing the vDSO block.
    PlaceVdso,
    /// Mapping the address space.
    MapMemory,
    /// Writing the page contents.
    WriteMemory,
    /// brk, stack, argv/env, auxv, exe.
    MmFields,
    /// Opening descriptors, cwd.
    OpenFiles,
    /// Re-taking file locks.
    Locks,
    /// Signal handlers.
    Signals,
    /// Creating the other threads and their per-thread state.
    Threads,
    /// umask, rlimits, names, personality.
    ProcessState,
    /// uid, gid, groups, capabilities.
    Credentials,
    /// Registers, pending signals, letting it run.
    Resume,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ReadImage => "read image",
            Step::CheckTarget => "check target",
            Step::CheckFiles => "check files",
            Step::CreateStub => "create stub",
            Step::PrepareStub => "prepare stub",
            Step::PlaceVdso => "place vdso",
            Step::MapMemory => "map memory",
            Step::WriteMemory => "write memory",
            Step::MmFields => "mm fields",
            Step::OpenFiles => "open files",
            Step::Locks => "take locks",
            Step::Signals => "signal handlers",
            Step::Threads => "threads",
            Step::ProcessState => "process state",
            Step::Credentials => "credentials",
            Step::Resume => "resume",
        })
    }
}

/// A restore that failed; nothing of the half-built process is left.
#[derive(Debug, thiserror::Error)]
#[error("restore failed at step \"{step}\": {cause}")]
pub struct RestoreError {
    /// The step that failed.
    pub step: Step,
    /// Why.
    pub cause: RestoreCause,
}

/// What went wrong in a restore step.
#[derive(Debug, thiserror::Error)]
pub enum RestoreCause {
    /// The image is bad.
    #[error(transparent)]
    Image(ImageError),
    /// A system call failed (in the stub or here).
    #[error("{what}: {errno}")]
    Sys {
        /// What was done.
        what: String,
        /// The errno.
        errno: Errno,
    },
    /// Driving the stub failed.
    #[error("{what}: {source}")]
    Inject {
        /// What was done.
        what: String,
        /// The failure.
        source: InjectError,
    },
    /// I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The PID is taken and was required.
    #[error("pid {pid} is in use")]
    PidInUse {
        /// The PID.
        pid: i32,
    },
    /// The target cannot take this image (missing or changed file, other
    /// CPU features or vDSO, ...).
    #[error("{0}")]
    Refused(String),
}

impl RestoreError {
    /// A failure at `step`.
    pub fn new(step: Step, cause: RestoreCause) -> RestoreError {
        RestoreError { step, cause }
    }
}
