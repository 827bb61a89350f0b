//! userfaultfd (linux/userfaultfd.h) for lazy restore: the fd is created
//! inside the restored process (it covers the mm of its creator), taken
//! with `pidfd_getfd`, and driven from here: API handshake, registering
//! ranges for missing-page faults, reading fault and event messages,
//! installing pages with `UFFDIO_COPY`. Closing the last reference
//! unregisters every range (the kernel's `userfaultfd_release`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_WAKE: u64 = 0x8010_aa02;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// Feature: tell us about mremap of registered ranges.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 1;
/// Feature: tell us about MADV_DONTNEED / MADV_REMOVE.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Feature: tell us about munmap.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;

/// A message read from a userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// A thread faulted on a missing page at this address.
    Fault(u64),
    /// `[from, from+len)` moved to `to` (mremap).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `[start, end)` was discarded (madvise) or unmapped.
    Removed(u64, u64),
    /// Another event (fork is not asked for).
    Other(u8),
}

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: `arg` is the repr(C) struct the request `req` expects, alive
    // and exclusively borrowed for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(arg)) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Takes descriptor `fd` of the process behind `pidfd` (a new descriptor here).
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors' numbers and flags 0 and
    // returns a new descriptor or -1.
    let r = unsafe { libc::syscall(438, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = i32::try_from(r).map_err(io::Error::other)?;
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// The API handshake, asking for `features`.
pub fn api(fd: &OwnedFd, features: u64) -> Result<(), Errno> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a)
}

/// Registers `[start, start+len)` for missing-page faults.
pub fn register(fd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut r = Register {
        range: Range { start, len },
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// Installs `data` at `dst` (page-aligned, whole pages) and wakes threads
/// waiting there. Returns the bytes installed before any error: on
/// `EEXIST` the page at `dst + returned` is already there.
pub fn copy(fd: &OwnedFd, dst: u64, data: &[u8]) -> (u64, Option<Errno>) {
    let mut c = Copy {
        dst,
        src: data.as_ptr() as u64,
        len: data.len() as u64,
        mode: 0,
        copy: 0,
    };
    // The kernel reads `len` bytes from `src`, which `data` holds for the call.
    match ioctl(fd, UFFDIO_COPY, &mut c) {
        Ok(()) => (data.len() as u64, None),
        Err(e) => (u64::try_from(c.copy).unwrap_or(0), Some(e)),
    }
}

/// Wakes threads waiting on `[start, start+len)`.
pub fn wake(fd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut r = Range { start, len };
    ioctl(fd, UFFDIO_WAKE, &mut r)
}

/// Reads the next message, or `None` when there is none (non-blocking fd).
pub fn read_msg(fd: &OwnedFd) -> Result<Option<Msg>, Errno> {
    let mut buf = [0u8; 32];
    // SAFETY: `buf` is 32 writable bytes, the size of one uffd_msg.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = Errno::last();
        return if e == Errno::EAGAIN { Ok(None) } else { Err(e) };
    }
    if n != 32 {
        return Err(Errno::EIO);
    }
    let word =
        |i: usize| u64::from_ne_bytes(buf[8 + i * 8..16 + i * 8].try_into().unwrap_or([0; 8]));
    Ok(Some(match buf[0] {
        0x12 => Msg::Fault(word(1)),
        0x14 => Msg::Remap {
            from: word(0),
            to: word(1),
            len: word(2),
        },
        0x15 | 0x16 => Msg::Removed(word(0), word(1)),
        other => Msg::Other(other),
    }))
}

/// Waits until `a` or `b` is readable; true when `a` is.
pub fn poll2(a: &OwnedFd, b: &OwnedFd) -> Result<bool, Errno> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    }
}

/// A pipe whose write end wakes a poller.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
}
