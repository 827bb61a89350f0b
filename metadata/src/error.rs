//! [`MetaError`], the one error type of the crate, and its mapping to a
//! gRPC [`Status`] (the only place where that mapping happens).

use tonic::Status;

/// Result with [`MetaError`].
pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// Everything that can go wrong in the metadata server.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The request is refused with a POSIX error (ENOENT, EEXIST, ...) that
    /// the client hands to the application.
    #[error("{msg}")]
    Posix {
        /// The errno value (Linux numbering).
        errno: i32,
        /// What failed, naming the object.
        msg: String,
    },
    /// The underlying store failed.
    #[error("store {op} failed: {source}")]
    Store {
        /// The store operation.
        op: &'static str,
        /// The store's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record on disk does not decode.
    #[error("corrupt record in tree {tree}: {what}")]
    Corrupt {
        /// The tree holding the record.
        tree: &'static str,
        /// What is wrong with it.
        what: String,
    },
    /// A fault inside the server (a task that died, a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    /// A setting is out of range.
    #[error("bad configuration: {0}")]
    Config(String),
    /// The gRPC server could not run.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The database was written by an incompatible version.
    #[error("metadata format version {found} is not supported (this server reads {supported})")]
    Format {
        /// The version found in the database.
        found: u32,
        /// The version this code reads and writes.
        supported: u32,
    },
}

impl MetaError {
    /// A POSIX error with a message saying what failed.
    pub fn posix(errno: i32, msg: impl Into<String>) -> MetaError {
        MetaError::Posix {
            errno,
            msg: msg.into(),
        }
    }

    /// The errno this error carries to the client (EIO for internal faults).
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::Posix { errno, .. } => *errno,
            _ => libc::EIO,
        }
    }

    /// Wraps a store error.
    pub fn store(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> MetaError {
        MetaError::Store {
            op,
            source: source.into(),
        }
    }
}

/// Shorthand constructors for the errors requests fail with most.
pub(crate) mod e {
    use super::MetaError;

    macro_rules! errno_fn {
        ($($name:ident => $val:expr),* $(,)?) => {$(
            #[doc = concat!("A `", stringify!($name), "` error.")]
            pub(crate) fn $name(msg: impl Into<String>) -> MetaError {
                MetaError::posix($val, msg)
            }
        )*};
    }

    errno_fn! {
        enoent => libc::ENOENT,
        eexist => libc::EEXIST,
        einval => libc::EINVAL,
        enotdir => libc::ENOTDIR,
        eisdir => libc::EISDIR,
        enotempty => libc::ENOTEMPTY,
        eperm => libc::EPERM,
        estale => libc::ESTALE,
        enodata => libc::ENODATA,
        erange => libc::ERANGE,
        e2big => libc::E2BIG,
        enametoolong => libc::ENAMETOOLONG,
        eopnotsupp => libc::EOPNOTSUPP,
        efbig => libc::EFBIG,
        emlink => libc::EMLINK,
        ebusy => libc::EBUSY,
    }
}

impl From<MetaError> for Status {
    fn from(err: MetaError) -> Status {
        match &err {
            MetaError::Posix { errno, msg } => migfs_proto::errno::status(*errno, msg.clone()),
            _ => {
                tracing::error!(error = %err, "metadata server fault");
                let mut st = migfs_proto::errno::status(libc::EIO, err.to_string());
                // An internal fault is not the caller's precondition: say so.
                st = Status::with_metadata(
                    tonic::Code::Internal,
                    st.message(),
                    st.metadata().clone(),
                );
                st
            }
        }
    }
}
