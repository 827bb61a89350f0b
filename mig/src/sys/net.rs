//! Waiting on sockets and pipes together (the page channel's accept loop
//! waits for a connection or for its stop pipe).

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// Waits until one of `fds` is readable (or hung up), at most
/// `timeout_ms` (-1: no limit); returns which are (all false on timeout).
pub fn wait_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> Result<Vec<bool>, Errno> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(p.len()).map_err(|_| Errno::EINVAL)?;
    loop {
        // SAFETY: `p` is a valid array of `n` pollfds for the call; the
        // descriptors are borrowed, so open, for its duration.
        let r = unsafe { libc::poll(p.as_mut_ptr(), n, timeout_ms) };
        if r >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn reports_the_readable_one_and_times_out() {
        let (r1, w1) = nix::unistd::pipe().unwrap();
        let (r2, _w2) = nix::unistd::pipe().unwrap();
        assert_eq!(
            wait_readable(&[r1.as_fd(), r2.as_fd()], 10).unwrap(),
            vec![false, false]
        );
        nix::unistd::write(&w1, b"x").unwrap();
        assert_eq!(
            wait_readable(&[r1.as_fd(), r2.as_fd()], -1).unwrap(),
            vec![true, false]
        );
    }
}
