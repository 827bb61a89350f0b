//! Reading and writing another process's memory.
//!
//! `process_vm_readv`/`writev` (3.2) copy directly between address spaces
//! and are the fast path; they fail on pages the target cannot read or
//! write. `/proc/PID/mem` goes through FOLL_FORCE and so also reaches
//! PROT_NONE and read-only private pages (slower: one bounce page).

use std::fs::File;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::Pid;

/// Copies `buf.len()` bytes at `addr` in `pid` into `buf`.
pub fn read_vm(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let mut done = 0usize;
    while done < buf.len() {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: `local` covers the unfilled tail of `buf`, which we own
        // mutably; `remote` is only an address in the other process.
        let n = unsafe {
            libc::process_vm_readv(pid.as_raw(), &raw const local, 1, &raw const remote, 1, 0)
        };
        let n = Errno::result(n)?;
        if n == 0 {
            return Err(Errno::EFAULT);
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

/// Copies `data` to `addr` in `pid` (the pages must be writable there).
pub fn write_vm(pid: Pid, addr: u64, data: &[u8]) -> Result<(), Errno> {
    let mut done = 0usize;
    while done < data.len() {
        let local = libc::iovec {
            iov_base: data[done..].as_ptr() as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr + done as u64) as *mut libc::c_void,
            iov_len: data.len() - done,
        };
        // SAFETY: `local` covers the rest of `data`, which the kernel only
        // reads; `remote` is only an address in the other process.
        let n = unsafe {
            libc::process_vm_writev(pid.as_raw(), &raw const local, 1, &raw const remote, 1, 0)
        };
        let n = Errno::result(n)?;
        if n == 0 {
            return Err(Errno::EFAULT);
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

/// `/proc/PID/mem`, for pages [`read_vm`] cannot reach.
pub struct ProcMem(File);

impl ProcMem {
    /// Opens `/proc/PID/mem` for reading (and writing if `write`).
    pub fn open(pid: Pid, write: bool) -> std::io::Result<ProcMem> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(format!("/proc/{pid}/mem"))?;
        Ok(ProcMem(f))
    }

    /// Fills `buf` from `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, addr)
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(data, addr)
    }
}
