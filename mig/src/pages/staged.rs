//! Warm staging for a lazy restore: pages go into memory the node had
//! already allocated, then `UFFDIO_MOVE` puts them in place, instead of
//! `UFFDIO_COPY` allocating each page while the process waits.
//!
//! The stub of a lazy move made from a warm-memory holder
//! ([`crate::restore::warm`]) keeps the holder's region mapped in its
//! address space (the staging area) and the holder itself alive, sharing
//! that address space. The kernel runs `UFFDIO_MOVE` only for a task of
//! the registered mm, so the holder is the one that runs it: before the
//! process runs, the first page of the area gets a few instructions (read
//! a system call and its arguments from a pipe, run it, write its result
//! back, again); the holder gets the pipes, the userfaultfd and the
//! pull's connection (`pidfd_getfd`, injected), takes on the process's
//! credentials and is let go to run them. The pull's runs are received
//! by the holder into the next unused piece of the area; a fault's window
//! is written there with `process_vm_writev` (a copy into pages that are
//! already there); either is then moved into place. What cannot be moved
//! (a page already there, a run that spans two mappings, an event
//! pending) is copied as before.
//!
//! The staging area is registered with the userfaultfd and marked
//! `MADV_DONTFORK`: a fork does not copy it, and if the process unmaps,
//! discards or moves any of it (it should not know it is there) the
//! event is read under the origin map's write lock, which every install
//! holds the read lock of, and staging stops for good. At the end the
//! range is unregistered, the holder is seized again, unmaps it and is
//! killed: the process keeps no trace of it. The holder cannot dump core
//! (`RLIMIT_CORE` 0, not dumpable) should anything make it fault.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nix::unistd::Pid;
use parking_lot::Mutex;

use migfs_proto::image::Creds;

use crate::restore::inject::{Call, Target};
use crate::restore::warm::Warm;
use crate::sys::{abi, inject, mem, procfs, ptrace, uffd};

const PAGE: u64 = 4096;
/// The area's first pages: the holder's code, then the calls' arguments;
/// pages are staged after them.
pub(super) const HEADER: u64 = 2 * PAGE;
/// A request to the holder: a system call's number and six arguments,
/// then 40 bytes for it to work on (at [`PAYLOAD`] in the arguments page);
/// the answer is those 40 bytes as the call left them, then its return
/// value.
const CALL: usize = 56;
const PAYLOAD: u64 = CALL as u64;
const REQ: usize = CALL + uffd::MOVE_ARGS_LEN;
const ANSWER: usize = uffd::MOVE_ARGS_LEN + 8;

/// A lazy restore's staging area and the holder that moves pages out of
/// it.
pub(super) struct Staging {
    holder: Mutex<Option<Warm>>,
    helper: Pid,
    /// The area: its first page holds the holder's code, the second the
    /// move's arguments, the rest the staged pages.
    start: u64,
    end: u64,
    next: Mutex<u64>,
    /// Staging has stopped (the area is not ours any more, or the holder
    /// failed): installs copy.
    dead: AtomicBool,
    /// The process unmapped, discarded or moved part of the area: it is
    /// not ours to unmap at the end.
    theirs: AtomicBool,
    /// Requests to the holder and its answers, one at a time.
    chan: Mutex<Option<(std::fs::File, std::fs::File)>>,
    /// The holder's descriptor of the userfaultfd.
    uffd_fd: u64,
    /// The pull's connection (not asked yet) and the holder's descriptor
    /// of it, until [`Staging::take_socket`].
    socket: Mutex<Option<(std::net::TcpStream, u64)>>,
    /// Pages moved into place.
    pub moved: AtomicU64,
    /// Time spent writing into the area and moving out of it, and moves.
    write_ns: AtomicU64,
    move_ns: AtomicU64,
    moves: AtomicU64,
}

impl Staging {
    /// Sets up the staging area `[start, end)` (the warm memory the stub
    /// `t` was made from, registered with `uffd`, this node's descriptor
    /// of its userfaultfd) and lets `holder` run the moves. `t` must
    /// still be stopped; this thread traces it.
    ///
    /// The holder takes `socket` too (a pull's connection), and takes on
    /// the process's `creds`.
    pub fn start<T: Target>(
        t: &mut T,
        holder: Warm,
        start: u64,
        end: u64,
        uffd: &OwnedFd,
        socket: Option<std::net::TcpStream>,
        creds: Option<&Creds>,
    ) -> Result<Staging, String> {
        let helper = holder.pid();
        if end - start <= HEADER {
            return Err("the warm memory is too small to stage in".into());
        }
        let (cmd_r, cmd_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (ans_r, ans_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let node = u64::from(std::process::id());
        let args = start + PAGE;
        // On any error below the holder is dropped, killed while traced:
        // it never runs its own code again.
        let insn = seize(helper)?;
        let call = |what: &str, nr: i64, a: [u64; 6]| -> Result<u64, String> {
            inject::syscall(helper, insn, nr, a)
                .map_err(|e| format!("{what} in the holder: {e}"))?
                .result()
                .map_err(|e| format!("{what} in the holder: {e}"))
        };
        let put = |at: u64, bytes: &[u8]| {
            mem::write_vm(helper, at, bytes).map_err(|e| format!("write into the holder: {e}"))
        };
        // It must never dump the process's memory.
        put(args, &[0u8; 16])?;
        call(
            "prlimit64",
            libc::SYS_prlimit64,
            [0, libc::RLIMIT_CORE as u64, args, 0, 0, 0],
        )?;
        let pidfd = call("pidfd_open", libc::SYS_pidfd_open, [node, 0, 0, 0, 0, 0])?;
        let take = |fd: i32| {
            let raw = u64::try_from(fd).unwrap_or(u64::MAX);
            call(
                "pidfd_getfd",
                libc::SYS_pidfd_getfd,
                [pidfd, raw, 0, 0, 0, 0],
            )
        };
        let fds = (|| {
            let fds = [
                take(cmd_r.as_raw_fd())?,
                take(uffd.as_raw_fd())?,
                take(ans_w.as_raw_fd())?,
            ];
            let sock = socket
                .map(|s| Ok::<_, String>((take(s.as_raw_fd())?, s)))
                .transpose()?;
            Ok::<_, String>((fds, sock))
        })();
        let _ = call("close", libc::SYS_close, [pidfd, 0, 0, 0, 0, 0]);
        let (fds, sock) = fds?;
        // From here it is the process, as far as the kernel can tell: its
        // groups, ids and capabilities (the process can rewrite the
        // holder's code, which must not run with more than it has), no
        // new privileges, not dumpable (no ptrace by the process either).
        if let Some(c) = creds {
            let ids = |v: &[u32]| -> Result<[u64; 3], String> {
                match v {
                    [r, e, s, ..] => Ok([u64::from(*r), u64::from(*e), u64::from(*s)]),
                    _ => Err("incomplete ids in the image".into()),
                }
            };
            let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
            if groups.len() > 2048 {
                return Err(format!("{} supplementary groups", c.groups.len()));
            }
            put(args + 1024, &groups)?;
            call(
                "setgroups",
                libc::SYS_setgroups,
                [c.groups.len() as u64, args + 1024, 0, 0, 0, 0],
            )?;
            let [r, e, s] = ids(&c.gids)?;
            call("setresgid", libc::SYS_setresgid, [r, e, s, 0, 0, 0])?;
            let [r, e, s] = ids(&c.uids)?;
            call("setresuid", libc::SYS_setresuid, [r, e, s, 0, 0, 0])?;
            let lo = |v: u64| (v & 0xffff_ffff).to_ne_bytes()[..4].to_vec();
            let hi = |v: u64| (v >> 32).to_ne_bytes()[..4].to_vec();
            let mut cap = Vec::with_capacity(32);
            cap.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
            cap.extend_from_slice(&0u32.to_ne_bytes());
            for half in [lo, hi] {
                cap.extend(half(c.cap_eff));
                cap.extend(half(c.cap_prm));
                cap.extend(half(c.cap_inh));
            }
            put(args, &cap)?;
            call("capset", libc::SYS_capset, [args, args + 8, 0, 0, 0, 0])?;
        }
        call(
            "prctl",
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        )?;
        call(
            "prctl",
            libc::SYS_prctl,
            [abi::PR_SET_DUMPABLE, 0, 0, 0, 0, 0],
        )?;
        // The OOM killer ends every process of an address space together:
        // the holder must not stand out (it had the highest score).
        std::fs::write(
            format!("/proc/{helper}/oom_score_adj"),
            crate::restore::warm::own_oom_score_adj(),
        )
        .map_err(|e| format!("the holder's oom_score_adj: {e}"))?;
        let code = mover_code(start + PAGE, fds[0], fds[2]);
        let res = (|| -> Result<(), String> {
            t.write_memory(start, &code)
                .map_err(|e| format!("write the code: {e}"))?;
            t.call(
                0,
                &Call::Mprotect {
                    addr: start,
                    len: PAGE,
                    prot: (libc::PROT_READ | libc::PROT_EXEC) as u32,
                },
            )
            .map_err(|e| format!("mprotect the code: {e}"))?;
            // Off it goes: from the code's first instruction, with no
            // call to restart.
            let mut regs = ptrace::getregs(helper).map_err(|e| e.to_string())?;
            regs[abi::reg::RIP] = start;
            regs[abi::reg::ORIG_RAX] = u64::MAX;
            regs[abi::reg::RAX] = 0;
            ptrace::setregs(helper, &regs).map_err(|e| e.to_string())?;
            Ok(())
        })();
        res?;
        ptrace::detach(helper).map_err(|e| format!("PTRACE_DETACH the holder: {e}"))?;
        drop((cmd_r, ans_w));
        Ok(Staging {
            holder: Mutex::new(Some(holder)),
            helper,
            start,
            end,
            next: Mutex::new(start + HEADER),
            dead: AtomicBool::new(false),
            theirs: AtomicBool::new(false),
            chan: Mutex::new(Some((
                std::fs::File::from(cmd_w),
                std::fs::File::from(ans_r),
            ))),
            uffd_fd: fds[1],
            socket: Mutex::new(sock.map(|(fd, s)| (s, fd))),
            moved: AtomicU64::new(0),
            write_ns: AtomicU64::new(0),
            move_ns: AtomicU64::new(0),
            moves: AtomicU64::new(0),
        })
    }

    /// The area's size.
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    /// System call `nr` run by the holder with `args` and `payload` (at
    /// the payload's place in the arguments page); its return value and
    /// the payload as it left it. `None` when it does not answer.
    fn call(&self, nr: i64, args: [u64; 6], payload: &[u8; 40]) -> Option<(i64, [u8; 40])> {
        use std::io::{Read, Write};
        let mut req = [0u8; REQ];
        req[..8].copy_from_slice(&nr.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            req[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        req[CALL..].copy_from_slice(payload);
        let mut chan = self.chan.lock();
        let (cmd, ans) = chan.as_mut()?;
        cmd.write_all(&req).ok()?;
        let mut a = [0u8; ANSWER];
        ans.read_exact(&mut a).ok()?;
        let mut out = [0u8; 40];
        out.copy_from_slice(&a[..40]);
        let mut ret = [0u8; 8];
        ret.copy_from_slice(&a[40..]);
        Some((i64::from_ne_bytes(ret), out))
    }

    /// One `UFFDIO_MOVE` run by the holder; `None` when it does not answer.
    fn request(&self, dst: u64, src: u64, len: u64) -> Option<uffd::Filled> {
        let args = [
            self.uffd_fd,
            uffd::UFFDIO_MOVE,
            self.start + PAGE + PAYLOAD,
            0,
            0,
            0,
        ];
        let (ret, out) = self.call(libc::SYS_ioctl, args, &uffd::move_args(dst, src, len))?;
        Some(uffd::moved(ret, &out, len))
    }

    /// Installs `data` at `dst` by staging and moving it. Returns the
    /// bytes dealt with from the start (moved, or skipped because the
    /// process has the page already) and the bytes moved; whatever is
    /// left the caller copies. `missing` says which runs of a range the
    /// process has no page for yet. `None` when staging cannot take it
    /// (full, stopped).
    pub fn place(
        &self,
        dst: u64,
        data: &[u8],
        missing: &dyn Fn(u64, u64) -> Vec<(u64, u64)>,
    ) -> Option<(u64, u64)> {
        let len = data.len() as u64;
        let at = self.reserve(len)?;
        let t = std::time::Instant::now();
        if let Err(e) = mem::write_vm(self.helper, at, data) {
            self.stop(&format!("write into the staging area: {e}"));
            return None;
        }
        self.write_ns.fetch_add(ns(t), Ordering::Relaxed);
        self.move_staged(dst, at, len, missing)
    }

    /// Whether staging still works.
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    /// The next `len` bytes of the area, if it has them.
    pub fn reserve(&self, len: u64) -> Option<u64> {
        if !self.alive() {
            return None;
        }
        let mut next = self.next.lock();
        if *next + len > self.end {
            return None;
        }
        let at = *next;
        *next += len;
        Some(at)
    }

    /// Reads staged bytes back (to copy what could not be moved).
    pub fn read_back(&self, at: u64, buf: &mut [u8]) -> Result<(), Errno> {
        mem::read_vm(self.helper, at, buf)
    }

    /// The pull's connection the holder has a descriptor of, and that
    /// descriptor (once).
    pub fn take_socket(&self) -> Option<(std::net::TcpStream, u64)> {
        self.socket.lock().take()
    }

    /// Closes the holder's descriptor `fd`.
    pub fn close_fd(&self, fd: u64) {
        let _ = self.call(libc::SYS_close, [fd, 0, 0, 0, 0, 0], &[0; 40]);
    }

    /// The holder receives exactly `len` bytes from its socket `sock`
    /// into the area at `at` (reserved).
    pub fn recv(&self, sock: u64, at: u64, len: u64) -> Result<(), String> {
        let t = std::time::Instant::now();
        let args = [sock, at, len, libc::MSG_WAITALL as u64, 0, 0];
        let helper = self.helper;
        let (ret, _) = self
            .call(libc::SYS_recvfrom, args, &[0; 40])
            .ok_or_else(|| format!("the warm-memory holder (pid {helper}) does not answer"))?;
        self.write_ns.fetch_add(ns(t), Ordering::Relaxed);
        if ret == i64::try_from(len).unwrap_or(-1) {
            return Ok(());
        }
        if ret < 0 {
            return Err(format!(
                "receive {len} bytes at {at:#x} in the warm-memory holder (pid {helper}): {}",
                Errno::from_raw(i32::try_from(-ret).unwrap_or(0))
            ));
        }
        Err(format!(
            "the page channel closed after {ret} of a run's {len} bytes (received by the warm-memory holder, pid {helper})"
        ))
    }

    /// Moves `len` bytes staged at `at` to `dst` (see [`Staging::place`]).
    pub fn move_staged(
        &self,
        dst: u64,
        at: u64,
        len: u64,
        missing: &dyn Fn(u64, u64) -> Vec<(u64, u64)>,
    ) -> Option<(u64, u64)> {
        if !self.alive() {
            return None;
        }
        let t_moves = std::time::Instant::now();
        let end = dst + len;
        let (mut cur, mut moved) = (dst, 0u64);
        // Ranges still to move, in order; the front one is `cur..`.
        let mut todo: std::collections::VecDeque<(u64, u64)> = [(dst, end)].into();
        'ranges: while let Some((s, e)) = todo.pop_front() {
            cur = s;
            // A move may not span two mappings: a refused one is tried
            // again with half as many pages.
            let mut step = e - s;
            while cur < e {
                let n = step.min(e - cur);
                let Some(f) = self.request(cur, at + (cur - dst), n) else {
                    self.stop("the holder does not answer");
                    break 'ranges;
                };
                self.moves.fetch_add(1, Ordering::Relaxed);
                cur += f.done;
                moved += f.done;
                match f.err {
                    None if f.done == n => step = step.saturating_mul(2),
                    None if f.done > 0 => {}
                    // Stopped by an event: the copy says which.
                    None => break 'ranges,
                    // The process has this page already (a fault filled
                    // it): move only what is still missing after it.
                    Some(Errno::EEXIST) => {
                        for r in missing(cur, e).into_iter().rev() {
                            todo.push_front(r);
                        }
                        // Past that page at least (the page map may not
                        // say it is there yet).
                        if let Some(front) = todo.front_mut()
                            && front.0 <= cur
                        {
                            front.0 = cur + PAGE;
                            if front.0 >= front.1 {
                                todo.pop_front();
                            }
                        }
                        cur = todo.front().map_or(end, |r| r.0);
                        continue 'ranges;
                    }
                    Some(Errno::EINVAL | Errno::ENOENT) if n - f.done > PAGE => {
                        step = ((n - f.done) / 2).next_multiple_of(PAGE);
                    }
                    Some(_) => break 'ranges,
                }
            }
            cur = todo.front().map_or(end, |r| r.0);
        }
        self.moved.fetch_add(moved / PAGE, Ordering::Relaxed);
        self.move_ns.fetch_add(ns(t_moves), Ordering::Relaxed);
        Some((cur.min(end) - dst, moved))
    }

    /// The process unmapped, discarded or moved `[s, e)`: if that touches
    /// the staging area, staging stops (its pages are not ours to move).
    pub fn touched(&self, s: u64, e: u64) {
        if s < self.end && e > self.start {
            self.theirs.store(true, Ordering::Relaxed);
            self.stop("the process changed the staging area");
        }
    }

    fn stop(&self, why: &str) {
        if !self.dead.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                helper = self.helper.as_raw(),
                why,
                "warm staging stopped; copying"
            );
        }
    }

    /// Ends staging: unregisters the area from `uffd`, has the holder
    /// unmap it (unless the process changed it; also after staging
    /// stopped on an error, if the holder still answers) and ends the
    /// holder. Call once nothing installs any more.
    pub fn close(&self, uffd: &OwnedFd) {
        let Some(holder) = self.holder.lock().take() else {
            return;
        };
        // Unregistered first: the unmap must not wait for its event. The
        // holder is seized while it waits for a request (at the end of
        // its pipe it would exit).
        let registered = uffd::unregister(uffd, self.start, self.end - self.start).is_ok();
        if registered && !self.theirs.load(Ordering::Relaxed) {
            let res = seize(self.helper).and_then(|insn| {
                let len = self.end - self.start;
                inject::syscall(
                    self.helper,
                    insn,
                    libc::SYS_munmap,
                    [self.start, len, 0, 0, 0, 0],
                )
                .map_err(|e| e.to_string())?
                .result()
                .map_err(|e| e.to_string())
            });
            if let Err(e) = res {
                tracing::warn!(
                    helper = self.helper.as_raw(),
                    error = %e,
                    "the staging area could not be unmapped: it stays mapped in the process"
                );
            }
        }
        drop(self.chan.lock().take());
        // Killed and collected (by this thread if it traces it now).
        drop(holder);
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        tracing::debug!(
            helper = self.helper.as_raw(),
            pages = self.moved.load(Ordering::Relaxed),
            moves = self.moves.load(Ordering::Relaxed),
            write_ms = ms(&self.write_ns),
            move_ms = ms(&self.move_ns),
            "warm staging closed"
        );
    }
}

fn ns(since: std::time::Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(0)
}

/// Seizes the holder (waiting in a call or blocked in its read) and finds
/// a `syscall` instruction in the vDSO of the address space.
fn seize(pid: Pid) -> Result<u64, String> {
    ptrace::seize(pid, abi::PTRACE_O_EXITKILL)
        .map_err(|e| format!("PTRACE_SEIZE the holder: {e}"))?;
    ptrace::interrupt(pid).map_err(|e| format!("PTRACE_INTERRUPT the holder: {e}"))?;
    match ptrace::wait(pid).map_err(|e| format!("waitpid the holder: {e}"))? {
        ptrace::Stop::Event { .. } => {}
        other => return Err(format!("the holder stopped with {other:?}")),
    }
    let maps = procfs::maps(pid).map_err(|e| format!("the holder's maps: {e}"))?;
    inject::vdso_syscall_insn(pid, &maps).map_err(|e| format!("the holder's address space: {e}"))
}

/// The holder's loop (x86-64, at the start of the area), its arguments
/// page at `args`, reading requests from descriptor `req` and answering
/// on `ans`:
///
/// ```text
/// again: if read(req, args, 96) != 96: exit_group(0)
///        rax = syscall(args[0]; args[1..7]); *(args + 96) = rax
///        write(ans, args + 56, 48); jmp again
/// ```
fn mover_code(args: u64, req: u64, ans: u64) -> Vec<u8> {
    let fd = |f: u64| u32::try_from(f).unwrap_or(u32::MAX);
    let imm = |n: usize| u32::try_from(n).unwrap_or(0);
    let mut c = Vec::with_capacity(160);
    let mov32 = |c: &mut Vec<u8>, op: u8, v: u32| {
        c.push(op);
        c.extend_from_slice(&v.to_le_bytes());
    };
    const EAX: u8 = 0xb8;
    const EDX: u8 = 0xba;
    const EDI: u8 = 0xbf;
    let movabs_rsi = |c: &mut Vec<u8>, v: u64| {
        c.extend_from_slice(&[0x48, 0xbe]);
        c.extend_from_slice(&v.to_le_bytes());
    };
    let syscall = |c: &mut Vec<u8>| c.extend_from_slice(&[0x0f, 0x05]);
    // again: read(req, args, 96)
    mov32(&mut c, EAX, 0);
    mov32(&mut c, EDI, fd(req));
    movabs_rsi(&mut c, args);
    mov32(&mut c, EDX, imm(REQ));
    syscall(&mut c);
    // cmp rax, 96; jne exit (rel32, patched below)
    c.extend_from_slice(&[0x48, 0x83, 0xf8, u8::try_from(REQ).unwrap_or(0)]);
    c.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]);
    let jne_at = c.len();
    // movabs rax, args; load rdi, rsi, rdx, r10, r8, r9, then rax
    c.extend_from_slice(&[0x48, 0xb8]);
    c.extend_from_slice(&args.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x8b, 0x78, 0x08]);
    c.extend_from_slice(&[0x48, 0x8b, 0x70, 0x10]);
    c.extend_from_slice(&[0x48, 0x8b, 0x50, 0x18]);
    c.extend_from_slice(&[0x4c, 0x8b, 0x50, 0x20]);
    c.extend_from_slice(&[0x4c, 0x8b, 0x40, 0x28]);
    c.extend_from_slice(&[0x4c, 0x8b, 0x48, 0x30]);
    c.extend_from_slice(&[0x48, 0x8b, 0x00]);
    syscall(&mut c);
    // movabs [args + 96], rax
    c.extend_from_slice(&[0x48, 0xa3]);
    c.extend_from_slice(&(args + REQ as u64).to_le_bytes());
    // write(ans, args + 56, 48)
    mov32(&mut c, EAX, 1);
    mov32(&mut c, EDI, fd(ans));
    movabs_rsi(&mut c, args + PAYLOAD);
    mov32(&mut c, EDX, imm(ANSWER));
    syscall(&mut c);
    // jmp again
    let back = -i32::try_from(c.len() + 5).unwrap_or(0);
    c.push(0xe9);
    c.extend_from_slice(&back.to_le_bytes());
    // exit: exit_group(0)
    let exit = i32::try_from(c.len() - jne_at).unwrap_or(0);
    c[jne_at - 4..jne_at].copy_from_slice(&exit.to_le_bytes());
    mov32(&mut c, EAX, 231);
    c.extend_from_slice(&[0x31, 0xff]);
    syscall(&mut c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holders_loop_jumps_where_it_should() {
        let c = mover_code(0x7000_1000, 3, 5);
        assert!((c.len() as u64) < PAGE);
        // The loop starts with read(3, 0x7000_1000, 96).
        assert_eq!(&c[..10], &[0xb8, 0, 0, 0, 0, 0xbf, 3, 0, 0, 0]);
        assert_eq!(&c[10..12], &[0x48, 0xbe]);
        assert_eq!(&c[12..20], &0x7000_1000u64.to_le_bytes());
        // The jmp at the end of the loop goes back to offset 0.
        let tail = c.len() - 9;
        assert_eq!(c[tail - 5], 0xe9);
        let rel = i32::from_le_bytes(c[tail - 4..tail].try_into().unwrap());
        assert_eq!(i64::try_from(tail).unwrap() + i64::from(rel), 0);
        // The jne lands on exit_group(0).
        let jne = c.windows(2).position(|w| w == [0x0f, 0x85]).unwrap();
        let rel = i32::from_le_bytes(c[jne + 2..jne + 6].try_into().unwrap());
        let to = usize::try_from(i64::try_from(jne + 6).unwrap() + i64::from(rel)).unwrap();
        assert_eq!(to, tail);
        assert_eq!(&c[to..], &[0xb8, 231, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]);
    }
}
