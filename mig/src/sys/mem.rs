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

/// Anonymous memory of this process that forks leave out
/// (`MADV_DONTFORK`): memory the agent keeps for a while (pre-copied
/// pages) must not lengthen the fork that makes each restore's stub,
/// which would otherwise copy its page tables. Unmapped on drop.
pub struct Region {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: a Region owns its mapping exclusively (nothing else holds the
// pointer); shared access only reads it, mutation needs `&mut`.
unsafe impl Send for Region {}
// SAFETY: as above: `&Region` only gives out `&[u8]`.
unsafe impl Sync for Region {}

impl Region {
    /// A new zero-filled region of `len` bytes (more than 0).
    pub fn new(len: usize) -> Result<Region, Errno> {
        use nix::sys::mman::{MapFlags, MmapAdvise, ProtFlags, madvise, mmap_anonymous};
        let size = std::num::NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks overlaps nothing of ours.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        let r = Region { ptr, len };
        // SAFETY: the advice only concerns the mapping just made, which is
        // ours alone.
        unsafe { madvise(r.ptr, len, MmapAdvise::MADV_DONTFORK) }?;
        Ok(r)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes, alive as long as
        // `self`; writes need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing refers to it any more.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_zeroed_writable_and_left_out_of_forks() {
        let mut r = Region::new(3 * 4096).unwrap();
        assert!(r.as_slice().iter().all(|&b| b == 0));
        r.as_mut_slice()[5000] = 7;
        assert_eq!(r.as_slice()[5000], 7);
        let addr = r.as_slice().as_ptr() as u64;
        let maps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let contains = |l: &str| {
            let Some((range, _)) = l.split_once(' ') else {
                return false;
            };
            let Some((s, e)) = range.split_once('-') else {
                return false;
            };
            match (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
                (Ok(s), Ok(e)) => s <= addr && addr < e,
                _ => false,
            }
        };
        let flags = maps
            .lines()
            .skip_while(|l| !contains(l))
            .find(|l| l.starts_with("VmFlags"))
            .unwrap_or_default();
        assert!(flags.contains(" dc"), "not MADV_DONTFORK: {flags}");
        assert!(Region::new(0).is_err());
    }
}
