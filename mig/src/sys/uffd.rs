//! userfaultfd (`linux/userfaultfd.h`) for lazy restore and dirty
//! tracking: the API handshake, registering ranges (missing-page or
//! write-protect mode), reading fault and event messages, installing pages
//! (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), waking waiters, write-protecting;
//! plus `pidfd_getfd` / `pidfd_send_signal`, which the callers use to take
//! a userfaultfd made inside another process and to kill it.
//!
//! A userfaultfd only covers the address space (mm) of the process that
//! created it, but once created it can be driven from any process that
//! holds it. Closing the last reference unregisters every range (the
//! kernel's `userfaultfd_release`) and wakes every waiting thread.
//!
//! Minimum kernel: 4.11 for the non-cooperative events, 5.7 for
//! write-protect, 6.4 for `UFFD_FEATURE_WP_UNPOPULATED`, 6.7 for
//! `UFFD_FEATURE_WP_ASYNC`; `pidfd_getfd` needs 5.6.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const UFFD_API: u64 = 0xaa;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 0x04, struct uffdio_zeropage)`.
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
/// `_IOWR(0xAA, 0x05, struct uffdio_move)`: run by a task of the
/// registered mm itself (the kernel refuses moves across address spaces),
/// so callers inject it; see [`move_args`].
pub const UFFDIO_MOVE: u64 = 0xc028_aa05;
/// Size of `struct uffdio_move`.
pub const MOVE_ARGS_LEN: usize = 40;

/// `userfaultfd(2)` flag: only faults from user mode are reported (what an
/// unprivileged caller may ask for when `vm.unprivileged_userfaultfd=0`).
pub const USER_MODE_ONLY: u32 = 1;

/// Register mode: report faults on missing pages.
pub const MODE_MISSING: u64 = 1;
/// Register mode: report (or, with [`FEATURE_WP_ASYNC`], resolve) writes
/// to write-protected pages.
pub const MODE_WP: u64 = 2;

/// Feature: tell us about fork; the child's userfaultfd comes with the
/// message (needs CAP_SYS_PTRACE).
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// Feature: tell us about mremap of registered ranges.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Feature: tell us about MADV_DONTNEED / MADV_REMOVE / MADV_FREE.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Feature: tell us about munmap (and mappings replaced by MAP_FIXED).
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Feature: write-protect also never-populated pages (pte markers).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Feature: the kernel resolves write-protect faults itself and only
/// records them (read back with `PAGEMAP_SCAN`, see [`super::pagemap`]).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Feature: `UFFDIO_MOVE` (6.8) moves pages already in the mm into a
/// registered range instead of allocating and copying.
pub const FEATURE_MOVE: u64 = 1 << 16;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// A message read from a userfaultfd.
#[derive(Debug)]
pub enum Msg {
    /// A thread faulted on a missing page at this address.
    Fault(u64),
    /// The process forked: the userfaultfd of the child's address space
    /// (now a descriptor of ours).
    Fork(OwnedFd),
    /// `[from, from+len)` moved to `to` (mremap).
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length (the old length).
        len: u64,
    },
    /// `[start, end)` was discarded (madvise).
    Removed(u64, u64),
    /// `[start, end)` was unmapped.
    Unmapped(u64, u64),
    /// Another event (not asked for).
    Other(u8),
}

/// A `struct uffd_msg` as bytes say it (a fork's descriptor as a number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawMsg {
    /// See [`Msg::Fault`].
    Fault(u64),
    /// See [`Msg::Fork`]: the descriptor number the kernel installed.
    Fork(u32),
    /// See [`Msg::Remap`].
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length (the old length).
        len: u64,
    },
    /// See [`Msg::Removed`].
    Removed(u64, u64),
    /// See [`Msg::Unmapped`].
    Unmapped(u64, u64),
    /// See [`Msg::Other`].
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

#[repr(C)]
struct ZeroPage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> Result<(), Errno> {
    // SAFETY: every caller passes the repr(C) struct (laid out as in
    // linux/userfaultfd.h) that request `req` expects; it is alive and
    // exclusively borrowed for the call. Pointers inside it (UFFDIO_COPY's
    // `src`) are checked by the callers.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, std::ptr::from_mut(arg)) };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Creates a userfaultfd in this process (`O_CLOEXEC | O_NONBLOCK` plus
/// `extra` flags such as [`USER_MODE_ONLY`]).
pub fn create(extra: u32) -> io::Result<OwnedFd> {
    let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK).cast_unsigned() | extra;
    // SAFETY: userfaultfd takes flags and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = i32::try_from(r).map_err(io::Error::other)?;
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// The features this kernel offers (a throw-away user-mode-only
/// userfaultfd made here, asked with features 0).
pub fn available_features() -> io::Result<u64> {
    let fd = create(USER_MODE_ONLY)?;
    api(&fd, 0).map_err(io::Error::from)
}

/// Takes descriptor `fd` of the process behind `pidfd` (a new descriptor
/// here, close-on-exec). Needs ptrace access to that process.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes two descriptors' numbers and flags 0 and
    // returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let r = i32::try_from(r).map_err(io::Error::other)?;
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Sends `sig` to the process behind `pidfd` (never to a reused pid).
pub fn pidfd_kill(pidfd: &OwnedFd, sig: i32) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal takes a descriptor, a signal number, a
    // null siginfo pointer and flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// The API handshake, asking for `features`; returns the features the
/// kernel offers (all of them when `features` is 0). Can be done once.
pub fn api(fd: &OwnedFd, features: u64) -> Result<u64, Errno> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_API, &mut a)?;
    Ok(a.features)
}

/// Registers `[start, start+len)` in `mode` ([`MODE_MISSING`], [`MODE_WP`]).
pub fn register(fd: &OwnedFd, start: u64, len: u64, mode: u64) -> Result<(), Errno> {
    let mut r = Register {
        range: Range { start, len },
        mode,
        ioctls: 0,
    };
    ioctl(fd, UFFDIO_REGISTER, &mut r)
}

/// Unregisters `[start, start+len)`.
pub fn unregister(fd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut r = Range { start, len };
    ioctl(fd, UFFDIO_UNREGISTER, &mut r)
}

/// What [`copy`] / [`zeropage`] did: `done` bytes installed from the
/// start, then `err` at `dst + done` (None: all of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Filled {
    /// Bytes installed.
    pub done: u64,
    /// Why it stopped early. A partial copy reports no error here: call
    /// again at `dst + done` to learn what stopped it.
    pub err: Option<Errno>,
}

/// Interprets the `copy` / `zeropage` field after the ioctl.
fn filled(res: Result<(), Errno>, len: u64, field: i64) -> Filled {
    match res {
        Ok(()) => Filled {
            done: len,
            err: None,
        },
        Err(e) if field > 0 => Filled {
            // A partial install reports EAGAIN with the bytes done.
            done: field.unsigned_abs().min(len),
            err: if e == Errno::EAGAIN { None } else { Some(e) },
        },
        Err(e) => Filled {
            done: 0,
            err: Some(e),
        },
    }
}

/// Installs `data` at `dst` (page-aligned, whole pages) in the
/// registered mm and wakes threads waiting there.
pub fn copy(fd: &OwnedFd, dst: u64, data: &[u8]) -> Filled {
    let mut c = Copy {
        dst,
        src: data.as_ptr() as u64,
        len: data.len() as u64,
        mode: 0,
        copy: 0,
    };
    // The kernel reads `len` bytes from `src`, which `data` holds for the
    // duration of the call.
    let res = ioctl(fd, UFFDIO_COPY, &mut c);
    filled(res, c.len, c.copy)
}

/// The bytes of a `struct uffdio_move` moving `len` bytes of pages from
/// `src` to `dst` (mode 0: wake waiters, no holes in `src`).
pub fn move_args(dst: u64, src: u64, len: u64) -> [u8; MOVE_ARGS_LEN] {
    let mut b = [0u8; MOVE_ARGS_LEN];
    b[..8].copy_from_slice(&dst.to_ne_bytes());
    b[8..16].copy_from_slice(&src.to_ne_bytes());
    b[16..24].copy_from_slice(&len.to_ne_bytes());
    b
}

/// What an injected `UFFDIO_MOVE` of `len` bytes did, from its return
/// value `ret` (0 or -errno) and the struct as it reads afterwards.
pub fn moved(ret: i64, args: &[u8; MOVE_ARGS_LEN], len: u64) -> Filled {
    let res = if ret == 0 {
        Ok(())
    } else {
        Err(Errno::from_raw(i32::try_from(-ret).unwrap_or(libc::EINVAL)))
    };
    let mut field = [0u8; 8];
    field.copy_from_slice(&args[32..40]);
    filled(res, len, i64::from_ne_bytes(field))
}

/// Maps the zero page at `[dst, dst+len)` and wakes waiters.
pub fn zeropage(fd: &OwnedFd, dst: u64, len: u64) -> Filled {
    let mut z = ZeroPage {
        range: Range { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    let res = ioctl(fd, UFFDIO_ZEROPAGE, &mut z);
    filled(res, len, z.zeropage)
}

/// Wakes threads waiting on `[start, start+len)`.
pub fn wake(fd: &OwnedFd, start: u64, len: u64) -> Result<(), Errno> {
    let mut r = Range { start, len };
    ioctl(fd, UFFDIO_WAKE, &mut r)
}

/// Write-protects (`protect`) or unprotects `[start, start+len)`.
pub fn write_protect(fd: &OwnedFd, start: u64, len: u64, protect: bool) -> Result<(), Errno> {
    let mut w = WriteProtect {
        range: Range { start, len },
        mode: u64::from(protect),
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut w)
}

/// Decodes one 32-byte `struct uffd_msg`.
pub fn decode(buf: &[u8; 32]) -> RawMsg {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[8 + i * 8..16 + i * 8]);
        u64::from_ne_bytes(w)
    };
    match buf[0] {
        EVENT_PAGEFAULT => RawMsg::Fault(word(1)),
        EVENT_FORK => RawMsg::Fork(u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]])),
        EVENT_REMAP => RawMsg::Remap {
            from: word(0),
            to: word(1),
            len: word(2),
        },
        EVENT_REMOVE => RawMsg::Removed(word(0), word(1)),
        EVENT_UNMAP => RawMsg::Unmapped(word(0), word(1)),
        other => RawMsg::Other(other),
    }
}

/// Takes ownership of the descriptor a fork message carries.
fn adopt(raw: RawMsg) -> Result<Msg, Errno> {
    Ok(match raw {
        RawMsg::Fault(a) => Msg::Fault(a),
        RawMsg::Fork(fd) => {
            let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
            // SAFETY: reading a fork message installed this descriptor in
            // our table for the reader; nothing else refers to it.
            Msg::Fork(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        RawMsg::Remap { from, to, len } => Msg::Remap { from, to, len },
        RawMsg::Removed(s, e) => Msg::Removed(s, e),
        RawMsg::Unmapped(s, e) => Msg::Unmapped(s, e),
        RawMsg::Other(ev) => Msg::Other(ev),
    })
}

/// Reads the next message, or `None` when there is none (non-blocking fd).
pub fn read_msg(fd: &OwnedFd) -> Result<Option<Msg>, Errno> {
    let mut buf = [0u8; 32];
    loop {
        // SAFETY: `buf` is 32 writable bytes, the size of one uffd_msg.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match Errno::last() {
                Errno::EAGAIN => return Ok(None),
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
        if n != 32 {
            return Err(Errno::EIO);
        }
        return adopt(decode(&buf)).map(Some);
    }
}

/// Waits until one of `fds` is readable (or hung up); returns which are.
pub fn poll(fds: &[&OwnedFd]) -> Result<Vec<bool>, Errno> {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    super::net::wait_readable(&borrowed, -1)
}

/// A non-blocking pipe (read end, write end) whose write end wakes a poller.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), Errno> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_messages() {
        let mut b = [0u8; 32];
        b[0] = EVENT_PAGEFAULT;
        b[16..24].copy_from_slice(&0x7000_1234u64.to_ne_bytes());
        assert_eq!(decode(&b), RawMsg::Fault(0x7000_1234));
        b[0] = EVENT_REMAP;
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[16..24].copy_from_slice(&0x9000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(
            decode(&b),
            RawMsg::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        b[0] = EVENT_REMOVE;
        assert_eq!(decode(&b), RawMsg::Removed(0x1000, 0x9000));
        b[0] = EVENT_UNMAP;
        assert_eq!(decode(&b), RawMsg::Unmapped(0x1000, 0x9000));
        b[0] = EVENT_FORK;
        assert_eq!(decode(&b), RawMsg::Fork(0x1000));
        b[0] = 0x17;
        assert_eq!(decode(&b), RawMsg::Other(0x17));
    }

    #[test]
    fn partial_installs_are_progress_not_errors() {
        assert_eq!(
            filled(Ok(()), 8192, 8192),
            Filled {
                done: 8192,
                err: None
            }
        );
        assert_eq!(
            filled(Err(Errno::EAGAIN), 8192, 4096),
            Filled {
                done: 4096,
                err: None
            }
        );
        assert_eq!(
            filled(Err(Errno::EEXIST), 8192, -17),
            Filled {
                done: 0,
                err: Some(Errno::EEXIST)
            }
        );
    }

    #[test]
    fn move_args_are_laid_out_as_the_kernel_reads_them() {
        let mut a = move_args(0x7000_0000, 0x5000_0000, 0x40_0000);
        assert_eq!(&a[..8], &0x7000_0000u64.to_ne_bytes());
        assert_eq!(&a[16..24], &0x40_0000u64.to_ne_bytes());
        assert_eq!(moved(0, &a, 0x40_0000).done, 0x40_0000);
        a[32..40].copy_from_slice(&8192i64.to_ne_bytes());
        assert_eq!(
            moved(-i64::from(libc::EEXIST), &a, 0x40_0000),
            Filled {
                done: 8192,
                err: Some(Errno::EEXIST)
            }
        );
        a[32..40].copy_from_slice(&(-i64::from(libc::EINVAL)).to_ne_bytes());
        assert_eq!(
            moved(-i64::from(libc::EINVAL), &a, 0x40_0000),
            Filled {
                done: 0,
                err: Some(Errno::EINVAL)
            }
        );
    }
}
