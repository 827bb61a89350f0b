//! `FsError`: everything the node can fail with, and its errno for FUSE.

use migfs_proto::ids::BlockHash;

/// An error of the FUSE client, the block store or the node daemon.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The metadata server answered with a POSIX error.
    #[error("{op}: {message} (errno {errno})")]
    Errno {
        /// The operation that failed.
        op: &'static str,
        /// The errno the server gave.
        errno: i32,
        /// The server's message.
        message: String,
    },
    /// The metadata server could not be reached in time, or failed.
    #[error("metadata server unreachable or failing during {op}: {status}")]
    Meta {
        /// The operation that failed.
        op: &'static str,
        /// The last status seen.
        status: tonic::Status,
    },
    /// No holder could supply a block whose bytes match its name.
    #[error("block {hash}: {reason}")]
    Block {
        /// The block.
        hash: BlockHash,
        /// What went wrong with every holder tried.
        reason: String,
    },
    /// A local I/O error (block store, mount).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A request the client refuses before sending it.
    #[error("{0}")]
    Invalid(String),
    /// Written data that this node could not store or replicate: the
    /// writes had succeeded, the bytes are gone.
    #[error("written data was lost: {message} (errno {errno})")]
    Lost {
        /// The errno of the failure (ENOSPC for a full data disk).
        errno: i32,
        /// What failed.
        message: String,
    },
    /// A local errno decided by the client itself.
    #[error("{op}: errno {errno}")]
    Local {
        /// The operation.
        op: &'static str,
        /// The errno.
        errno: i32,
    },
}

impl FsError {
    /// An I/O error with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> FsError {
        FsError::Io {
            what: what.into(),
            source,
        }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Errno { errno, .. }
            | FsError::Local { errno, .. }
            | FsError::Lost { errno, .. } => *errno,
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Meta { .. } | FsError::Block { .. } => libc::EIO,
        }
    }
}

/// Shorthand for the crate's results.
pub type Result<T> = std::result::Result<T, FsError>;
