//! Page runs sent by the frozen original itself: a copy of the page
//! channel's socket is put into the process (over a unix socket, as
//! `SCM_RIGHTS`) and each run's bytes go out with a `sendto` run inside
//! it ([`crate::capture::remote`]), so the source copies every byte once
//! (memory to socket) instead of twice (`process_vm_readv` into a buffer,
//! then `send`). The frame headers are written here, on our descriptor
//! of the same socket, before each run.
//!
//! Only the thread that froze the process can run calls in it, so the
//! page server hands the work to the move's thread (agent/source.rs).
//! When the socket cannot be put into the process (another network
//! namespace, a failed call), nothing has been sent and the caller falls
//! back to reading the memory itself ([`Sent::NotHere`]). The descriptor
//! put into the process is closed again before this returns; its
//! registers and signal mask are given back after every call.

use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, MsgFlags, getsockopt, sendmsg, sockopt::PeerCredentials};
use nix::unistd::Pid;

use super::frame::{Frame, FrameKind};
use crate::capture::remote::Remote;
use crate::sys::abi::sx;
use crate::sys::procfs;

/// What [`send_runs`] did.
#[derive(Debug)]
pub enum Sent {
    /// Nothing was sent: the process cannot send (why).
    NotHere(String),
    /// The runs were sent (page bytes), or sending failed part-way (the
    /// connection is unusable).
    Done(io::Result<u64>),
}

/// Sends `chunks` of the frozen `pid`'s memory as run frames on `s`, from
/// inside the process. Must run on the thread that froze it.
pub fn send_runs(pid: Pid, s: &mut TcpStream, chunks: &[(u64, u64)]) -> Sent {
    let t = Instant::now();
    let maps = match procfs::maps(pid) {
        Ok(m) => m,
        Err(e) => return Sent::NotHere(format!("read its maps: {e}")),
    };
    let remote = match Remote::new(pid, &maps) {
        Ok(r) => r,
        Err(e) => return Sent::NotHere(e.to_string()),
    };
    let fd = match give_socket(&remote, s) {
        Ok(fd) => fd,
        Err(why) => return Sent::NotHere(why),
    };
    let setup = t.elapsed();
    let res = send_all(&remote, s, fd, chunks);
    if let Err(e) = close(&remote, fd) {
        tracing::warn!(pid = pid.as_raw(), fd, error = %e, "could not close the page socket in the original");
    }
    tracing::debug!(
        pid = pid.as_raw(),
        setup_us = setup.as_micros(),
        ms = t.elapsed().as_secs_f64() * 1e3,
        ok = res.is_ok(),
        "pages sent from inside the original"
    );
    Sent::Done(res)
}

fn close(remote: &Remote, fd: i32) -> Result<(), String> {
    let (r, _) = remote
        .call(
            remote.pid(),
            libc::SYS_close,
            |_| [sx(fd), 0, 0, 0, 0, 0],
            &[],
            0,
        )
        .map_err(|e| e.to_string())?;
    r.map(|_| ()).map_err(|e| e.to_string())
}

/// Puts a copy of `s` into the process; returns its number there.
fn give_socket(remote: &Remote, s: &TcpStream) -> Result<i32, String> {
    let pid = remote.pid();
    let mut tag = [0u8; 8];
    super::wire::new_token()
        .map(|t| tag.copy_from_slice(&t[..8]))
        .map_err(|e| format!("random name: {e}"))?;
    let name = format!("migfs-pages-{pid}-{:016x}", u64::from_ne_bytes(tag));
    let addr = UnixAddr::from_abstract_name(name.as_bytes()).map_err(|e| e.to_string())?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| format!("listen on @{name}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listen on @{name}: {e}"))?;
    let call = |nr: i64, args: [u64; 6], input: &[u8], out: usize| {
        let (r, bytes) = remote
            .call(pid, nr, |_| args, input, out)
            .map_err(|e| e.to_string())?;
        r.map(|v| (v, bytes)).map_err(|e: Errno| e.to_string())
    };
    let flags = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC).cast_unsigned();
    let (ufd, _) = call(
        libc::SYS_socket,
        [libc::AF_UNIX as u64, u64::from(flags), 0, 0, 0, 0],
        &[],
        0,
    )
    .map_err(|e| format!("socket() in the process: {e}"))?;
    let ufd = i32::try_from(ufd).unwrap_or(-1);
    let got = (|| {
        let scratch = remote.scratch();
        // struct sockaddr_un with an abstract name.
        let family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
        let mut sa = family.to_ne_bytes().to_vec();
        sa.push(0);
        sa.extend_from_slice(name.as_bytes());
        call(
            libc::SYS_connect,
            [sx(ufd), scratch, sa.len() as u64, 0, 0, 0],
            &sa,
            0,
        )
        .map_err(|e| format!("connect() in the process: {e}"))?;
        let (conn, _) = listener
            .accept()
            .map_err(|e| format!("accept the process's connection: {e}"))?;
        let peer = getsockopt(&conn, PeerCredentials).map_err(|e| format!("SO_PEERCRED: {e}"))?;
        if peer.pid() != pid.as_raw() {
            return Err(format!(
                "@{name} was connected to by pid {}, not {pid}",
                peer.pid()
            ));
        }
        let fds = [s.as_raw_fd()];
        sendmsg::<()>(
            conn.as_raw_fd(),
            &[io::IoSlice::new(&[0])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("send the socket: {e}"))?;
        let (input, cmsg_at) = recvmsg_args(scratch);
        let (_, out) = call(
            libc::SYS_recvmsg,
            [sx(ufd), scratch, sx(libc::MSG_CMSG_CLOEXEC), 0, 0, 0],
            &input,
            input.len(),
        )
        .map_err(|e| format!("recvmsg() in the process: {e}"))?;
        received_fd(&out[cmsg_at..]).ok_or_else(|| "the process received no descriptor".into())
    })();
    if let Err(e) = close(remote, ufd) {
        tracing::warn!(pid = pid.as_raw(), error = %e, "could not close the unix socket in the original");
    }
    got
}

/// `struct msghdr` is 56 bytes: the iovec follows it.
const IOVEC_AT: usize = 64;
const CMSG_AT: usize = 96;
const CMSG_SPACE: usize = 24;
const BYTE_AT: usize = 128;

/// The scratch bytes of `recvmsg(fd, msghdr, ...)` for one byte and one
/// descriptor, laid out at `scratch`; and where the control message is.
fn recvmsg_args(scratch: u64) -> (Vec<u8>, usize) {
    let mut b = vec![0u8; BYTE_AT + 8];
    let mut put = |at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    // struct msghdr: name, namelen, iov, iovlen, control, controllen, flags.
    put(0, 0);
    put(8, 0);
    put(16, scratch + IOVEC_AT as u64);
    put(24, 1);
    put(32, scratch + CMSG_AT as u64);
    put(40, CMSG_SPACE as u64);
    put(48, 0);
    // struct iovec: base, len.
    put(IOVEC_AT, scratch + BYTE_AT as u64);
    put(IOVEC_AT + 8, 1);
    (b, CMSG_AT)
}

/// The descriptor in an `SCM_RIGHTS` control message.
fn received_fd(c: &[u8]) -> Option<i32> {
    let word = |at: usize| {
        c.get(at..at + 4)
            .map(|w| i32::from_ne_bytes(w.try_into().unwrap_or([0; 4])))
    };
    let len = u64::from_ne_bytes(c.get(..8)?.try_into().ok()?);
    (len >= 20 && word(8)? == libc::SOL_SOCKET && word(12)? == libc::SCM_RIGHTS)
        .then(|| word(16))
        .flatten()
}

/// Each chunk: its header here, its bytes from inside.
fn send_all(remote: &Remote, s: &mut TcpStream, fd: i32, chunks: &[(u64, u64)]) -> io::Result<u64> {
    let pid = remote.pid();
    let mut bytes = 0u64;
    let mut calls = Duration::ZERO;
    for &(addr, end) in chunks {
        let len = end - addr;
        let head = Frame {
            kind: FrameKind::Run,
            len: u32::try_from(len).map_err(io::Error::other)?,
            addr,
        };
        s.write_all(&head.encode())?;
        let mut done = 0;
        while done < len {
            let t = Instant::now();
            let (r, _) = remote
                .call(
                    pid,
                    libc::SYS_sendto,
                    |_| {
                        [
                            sx(fd),
                            addr + done,
                            len - done,
                            sx(libc::MSG_NOSIGNAL),
                            0,
                            0,
                        ]
                    },
                    &[],
                    0,
                )
                .map_err(io::Error::other)?;
            calls += t.elapsed();
            match r {
                Ok(0) => return Err(io::Error::other("sendto() in the process sent nothing")),
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        bytes += len;
    }
    tracing::debug!(
        pid = pid.as_raw(),
        chunks = chunks.len(),
        ms = calls.as_secs_f64() * 1e3,
        "sendto calls"
    );
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_message_layout_is_the_kernels() {
        let (b, at) = recvmsg_args(0x1000);
        assert_eq!(b.len(), BYTE_AT + 8);
        assert_eq!(
            u64::from_ne_bytes(b[16..24].try_into().unwrap()),
            0x1000 + 64
        );
        assert_eq!(at + CMSG_SPACE, BYTE_AT - 8);
        assert_eq!(nix::cmsg_space!(std::os::fd::RawFd).capacity(), CMSG_SPACE);
        let mut c = vec![0u8; 24];
        c[..8].copy_from_slice(&20u64.to_ne_bytes());
        c[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        c[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        c[16..20].copy_from_slice(&7i32.to_ne_bytes());
        assert_eq!(received_fd(&c), Some(7));
        c[12..16].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(received_fd(&c), None);
    }
}
