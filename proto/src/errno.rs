//! A POSIX errno inside a [`tonic::Status`].
//!
//! The server sets the `migfs-errno` metadata key on every error that has an
//! errno; the client reads it back. A status without it (transport failure,
//! server bug) is an I/O error to the caller.

use tonic::{Code, Status};

/// Metadata key that carries the errno as decimal ASCII.
pub const KEY: &str = "migfs-errno";

/// A status for `errno`, with a message saying what failed.
pub fn status(errno: i32, message: impl Into<String>) -> Status {
    let code = match errno {
        libc_consts::ENOENT => Code::NotFound,
        libc_consts::EEXIST => Code::AlreadyExists,
        libc_consts::EACCES | libc_consts::EPERM => Code::PermissionDenied,
        libc_consts::ENOSPC => Code::ResourceExhausted,
        libc_consts::EINVAL | libc_consts::ENAMETOOLONG => Code::InvalidArgument,
        _ => Code::FailedPrecondition,
    };
    let mut st = Status::new(code, message);
    if let Ok(v) = errno.to_string().parse() {
        st.metadata_mut().insert(KEY, v);
    }
    st
}

/// The errno a status carries, if the server put one there.
pub fn of(status: &Status) -> Option<i32> {
    status.metadata().get(KEY)?.to_str().ok()?.parse().ok()
}

/// The errno values used by [`status`] (x86-64 and aarch64 Linux agree).
mod libc_consts {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EACCES: i32 = 13;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const ENAMETOOLONG: i32 = 36;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_round_trips_through_status() {
        let st = status(39, "directory not empty");
        assert_eq!(of(&st), Some(39));
        assert_eq!(st.message(), "directory not empty");
        assert_eq!(of(&Status::unavailable("down")), None);
    }
}
